//! The Clash JSON model of flows (`/connections`), built from the registry. Field for field
//! what mihomo sends — ports as strings, text as strings, lists as lists, never null — plus
//! tpacct's per-connection speeds and the closed-flow view.

use std::{net::SocketAddr, time::SystemTime};

use serde::Serialize;

mod json;

use crate::{
    flow::{DnsMode, RouteInfo},
    registry::{ClosedFlow, Flow, FlowMeta, Registry, Traffic},
    speed::Speeds,
};

/// `GET /connections`. Every text is borrowed or written straight into the output (numbers,
/// addresses, ids and times through `Display`): serializing 10,000 flows allocates nothing per
/// flow.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot<'a> {
    pub download_total: u64,
    pub upload_total: u64,
    pub connections: Vec<Connection<'a>>,
    pub memory: u64,
}

/// A value serialized as the string its `Display` writes, without an intermediate `String`.
#[derive(Debug, Clone, Copy)]
pub struct Text<T>(pub T);

impl<T: std::fmt::Display> Serialize for Text<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// An optional value: its text, or the empty string.
#[derive(Debug, Clone, Copy)]
pub struct OrEmpty<T>(pub Option<T>);

impl<T: std::fmt::Display> Serialize for OrEmpty<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(v) => s.collect_str(v),
            None => s.serialize_str(""),
        }
    }
}

/// `n` empty strings (mihomo's `providerChains` beside `chains`).
#[derive(Debug, Clone, Copy)]
pub struct Blanks(pub usize);

impl Serialize for Blanks {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(std::iter::repeat_n("", self.0))
    }
}

/// An empty list.
const NONE: [&str; 0] = [];

/// One live connection.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection<'a> {
    pub id: Text<uuid::Uuid>,
    pub metadata: Metadata<'a>,
    pub upload: u64,
    pub download: u64,
    pub start: Text<humantime::Rfc3339Timestamp>,
    pub chains: &'a [String],
    pub provider_chains: Blanks,
    pub rule: &'a str,
    pub rule_payload: &'a str,
    /// Bytes per second over the last second (tpacct only).
    pub upload_speed: u64,
    pub download_speed: u64,
}

/// One closed connection (`GET /connections/closed`, tpacct only).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Closed<'a> {
    #[serde(flatten)]
    pub connection: Connection<'a>,
    pub closed_at: Text<humantime::Rfc3339Timestamp>,
}

/// mihomo's connection metadata.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata<'a> {
    pub network: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(rename = "sourceIP")]
    pub source_ip: Text<std::net::IpAddr>,
    #[serde(rename = "destinationIP")]
    pub destination_ip: OrEmpty<std::net::IpAddr>,
    #[serde(rename = "sourceGeoIP")]
    pub source_geo_ip: [&'static str; 0],
    #[serde(rename = "destinationGeoIP")]
    pub destination_geo_ip: [&'static str; 0],
    #[serde(rename = "sourceIPASN")]
    pub source_ip_asn: &'static str,
    #[serde(rename = "destinationIPASN")]
    pub destination_ip_asn: &'static str,
    pub source_port: Text<u16>,
    pub destination_port: Text<u16>,
    #[serde(rename = "inboundIP")]
    pub inbound_ip: Text<std::net::IpAddr>,
    pub inbound_port: Text<u16>,
    pub inbound_name: &'static str,
    pub inbound_user: &'a str,
    pub host: &'a str,
    pub dns_mode: &'static str,
    pub uid: u32,
    pub process: &'a str,
    pub process_path: &'a str,
    pub special_proxy: &'static str,
    pub special_rules: &'static str,
    pub remote_destination: OrEmpty<std::net::IpAddr>,
    pub dscp: u8,
    pub sniff_host: &'a str,
}

/// RFC 3339 with nanoseconds, UTC, as mihomo writes times.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// What a flow says of itself besides its metadata, live or closed.
struct Seen<'a> {
    host: Option<&'a str>,
    dns_mode: DnsMode,
    sniffed: Option<&'a str>,
    route: Option<&'a RouteInfo>,
    dialed: Option<SocketAddr>,
    owner: Option<&'a crate::process::Owner>,
}

fn metadata<'a>(meta: &'a FlowMeta, seen: &Seen<'a>) -> Metadata<'a> {
    Metadata {
        network: meta.network.as_str(),
        kind: meta.inbound_type,
        source_ip: Text(meta.source.ip()),
        destination_ip: OrEmpty(meta.destination_ip),
        source_geo_ip: NONE,
        destination_geo_ip: NONE,
        source_ip_asn: "",
        destination_ip_asn: "",
        source_port: Text(meta.source.port()),
        destination_port: Text(meta.destination_port),
        inbound_ip: Text(meta.inbound.ip()),
        inbound_port: Text(meta.inbound.port()),
        inbound_name: meta.inbound_name,
        inbound_user: meta.inbound_user.as_deref().unwrap_or_default(),
        host: seen.host.unwrap_or_default(),
        dns_mode: seen.dns_mode.as_str(),
        uid: seen.owner.map_or(0, |o| o.uid),
        process: seen.owner.map_or("", |o| &o.name),
        process_path: seen.owner.map_or("", |o| &o.path),
        special_proxy: "",
        special_rules: "",
        remote_destination: OrEmpty(seen.dialed.map(|a| a.ip())),
        dscp: 0,
        sniff_host: seen.sniffed.unwrap_or_default(),
    }
}

fn connection<'a>(
    id: uuid::Uuid,
    meta: &'a FlowMeta,
    seen: &Seen<'a>,
    start: SystemTime,
    traffic: Traffic,
    speed: Traffic,
) -> Connection<'a> {
    let (rule, payload, chains) = seen.route.map_or(("", "", &[][..]), |r| {
        (r.rule, r.payload.as_str(), &r.chains[..])
    });
    Connection {
        id: Text(id),
        metadata: metadata(meta, seen),
        upload: traffic.upload,
        download: traffic.download,
        start: Text(humantime::format_rfc3339_nanos(start)),
        chains,
        provider_chains: Blanks(chains.len()),
        rule,
        rule_payload: payload,
        upload_speed: speed.upload,
        download_speed: speed.download,
    }
}

/// A live flow in Clash's shape.
pub fn live(flow: &Flow, traffic: Traffic, speed: Traffic) -> Connection<'_> {
    let seen = Seen {
        host: flow.host(),
        dns_mode: flow.dns_mode(),
        sniffed: flow.sniffed_host(),
        route: flow.route(),
        dialed: flow.dialed(),
        owner: flow.owner(),
    };
    connection(flow.id, &flow.meta, &seen, flow.start, traffic, speed)
}

/// A closed flow in Clash's shape, with `closedAt`.
pub fn closed(flow: &ClosedFlow) -> Closed<'_> {
    Closed {
        connection: connection(
            flow.id,
            &flow.meta,
            &Seen {
                host: flow.host.as_deref(),
                dns_mode: flow.dns_mode,
                sniffed: flow.sniffed_host.as_deref(),
                route: Some(&flow.route),
                dialed: flow.dialed,
                owner: flow.owner.as_ref(),
            },
            flow.start,
            flow.traffic,
            Traffic::default(),
        ),
        closed_at: Text(humantime::format_rfc3339_nanos(flow.closed_at)),
    }
}

/// `GET /connections` now, as JSON.
pub fn snapshot(registry: &Registry, speeds: &Speeds) -> String {
    let (live, totals) = registry.live_and_totals();
    json::to_string(&of(&live, totals, speeds))
}

/// `/connections` as JSON from the live flows and totals read in one step.
pub fn json_of(live: &[crate::registry::LiveFlow], totals: Traffic, speeds: &Speeds) -> String {
    json::to_string(&of(live, totals, speeds))
}

/// `/connections` from the live flows and totals read in one step.
pub fn of<'a>(
    live: &'a [crate::registry::LiveFlow],
    totals: Traffic,
    speeds: &Speeds,
) -> Snapshot<'a> {
    Snapshot {
        download_total: totals.download,
        upload_total: totals.upload,
        connections: {
            // One load of the speeds for every flow.
            let speeds = speeds.all();
            live.iter().map(|f| live_connection(f, &speeds)).collect()
        },
        memory: crate::speed::rss(),
    }
}

fn live_connection<'a>(
    f: &'a crate::registry::LiveFlow,
    speeds: &crate::speed::Samples,
) -> Connection<'a> {
    let speed = speeds.get(&f.flow.id).map(|e| e.1).unwrap_or_default();
    live(&f.flow, f.traffic, speed)
}
