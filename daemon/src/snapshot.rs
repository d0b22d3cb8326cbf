//! The Clash JSON model of flows (`/connections`), built from the registry. Field for field
//! what mihomo sends — ports as strings, text as strings, lists as lists, never null — plus
//! tpacct's per-connection speeds and the closed-flow view.

use std::{net::SocketAddr, time::SystemTime};

use serde::Serialize;

use crate::{
    flow::{DnsMode, RouteInfo},
    registry::{ClosedFlow, Flow, FlowMeta, Registry, Traffic},
    speed::Speeds,
};

/// `GET /connections`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub download_total: u64,
    pub upload_total: u64,
    pub connections: Vec<Connection>,
    pub memory: u64,
}

/// One live connection.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub id: String,
    pub metadata: Metadata,
    pub upload: u64,
    pub download: u64,
    pub start: String,
    pub chains: Vec<String>,
    pub provider_chains: Vec<String>,
    pub rule: String,
    pub rule_payload: String,
    /// Bytes per second over the last second (tpacct only).
    pub upload_speed: u64,
    pub download_speed: u64,
}

/// One closed connection (`GET /connections/closed`, tpacct only).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Closed {
    #[serde(flatten)]
    pub connection: Connection,
    pub closed_at: String,
}

/// mihomo's connection metadata.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub network: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(rename = "sourceIP")]
    pub source_ip: String,
    #[serde(rename = "destinationIP")]
    pub destination_ip: String,
    #[serde(rename = "sourceGeoIP")]
    pub source_geo_ip: Vec<String>,
    #[serde(rename = "destinationGeoIP")]
    pub destination_geo_ip: Vec<String>,
    #[serde(rename = "sourceIPASN")]
    pub source_ip_asn: String,
    #[serde(rename = "destinationIPASN")]
    pub destination_ip_asn: String,
    pub source_port: String,
    pub destination_port: String,
    #[serde(rename = "inboundIP")]
    pub inbound_ip: String,
    pub inbound_port: String,
    pub inbound_name: String,
    pub inbound_user: String,
    pub host: String,
    pub dns_mode: &'static str,
    pub uid: u32,
    pub process: String,
    pub process_path: String,
    pub special_proxy: String,
    pub special_rules: String,
    pub remote_destination: String,
    pub dscp: u8,
    pub sniff_host: String,
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

fn metadata(meta: &FlowMeta, seen: &Seen<'_>) -> Metadata {
    Metadata {
        network: meta.network.as_str(),
        kind: meta.inbound_type,
        source_ip: meta.source.ip().to_string(),
        destination_ip: meta
            .destination_ip
            .map(|ip| ip.to_string())
            .unwrap_or_default(),
        source_geo_ip: Vec::new(),
        destination_geo_ip: Vec::new(),
        source_ip_asn: String::new(),
        destination_ip_asn: String::new(),
        source_port: meta.source.port().to_string(),
        destination_port: meta.destination_port.to_string(),
        inbound_ip: meta.inbound.ip().to_string(),
        inbound_port: meta.inbound.port().to_string(),
        inbound_name: meta.inbound_name.to_owned(),
        inbound_user: meta.inbound_user.clone().unwrap_or_default(),
        host: seen.host.unwrap_or_default().to_owned(),
        dns_mode: seen.dns_mode.as_str(),
        uid: seen.owner.map_or(0, |o| o.uid),
        process: seen.owner.map(|o| o.name.to_string()).unwrap_or_default(),
        process_path: seen.owner.map(|o| o.path.to_string()).unwrap_or_default(),
        special_proxy: String::new(),
        special_rules: String::new(),
        remote_destination: seen.dialed.map(|a| a.ip().to_string()).unwrap_or_default(),
        dscp: 0,
        sniff_host: seen.sniffed.unwrap_or_default().to_owned(),
    }
}

fn connection(
    id: uuid::Uuid,
    meta: &FlowMeta,
    seen: &Seen<'_>,
    start: SystemTime,
    traffic: Traffic,
    speed: Traffic,
) -> Connection {
    let route = seen.route.cloned().unwrap_or_default();
    Connection {
        id: id.to_string(),
        metadata: metadata(meta, seen),
        upload: traffic.upload,
        download: traffic.download,
        start: rfc3339(start),
        provider_chains: vec![String::new(); route.chains.len()],
        chains: route.chains,
        rule: route.rule.to_owned(),
        rule_payload: route.payload,
        upload_speed: speed.upload,
        download_speed: speed.download,
    }
}

/// A live flow in Clash's shape.
pub fn live(flow: &Flow, traffic: Traffic, speed: Traffic) -> Connection {
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
pub fn closed(flow: &ClosedFlow) -> Closed {
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
        closed_at: rfc3339(flow.closed_at),
    }
}

/// `GET /connections` now.
pub fn snapshot(registry: &Registry, speeds: &Speeds) -> Snapshot {
    let (live, totals) = registry.live_and_totals();
    of(&live, totals, speeds)
}

/// `/connections` from the live flows and totals read in one step.
pub fn of(live: &[crate::registry::LiveFlow], totals: Traffic, speeds: &Speeds) -> Snapshot {
    Snapshot {
        download_total: totals.download,
        upload_total: totals.upload,
        connections: live.iter().map(|f| live_connection(f, speeds)).collect(),
        memory: crate::speed::rss(),
    }
}

fn live_connection(f: &crate::registry::LiveFlow, speeds: &Speeds) -> Connection {
    live(&f.flow, f.traffic, speeds.of(&f.flow.id))
}
