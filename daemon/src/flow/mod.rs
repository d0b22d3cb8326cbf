//! A flow — one TCP connection or UDP session — and its one owner: [`pipeline`] runs its
//! whole life (track → register → sniff → route → dial → relay → finish), with a guard that
//! finishes it exactly once even on a panic or an early return.

mod answer;
mod finisher;
pub mod pipeline;

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::accounting::{Counters, Meter, Tracked};

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Network {
    Tcp,
    Udp,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Tcp => "tcp",
            Network::Udp => "udp",
        }
    }
}

/// Which way the tracked socket's counters point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// A socket facing the client: upload = its rx, download = its tx.
    Client,
    /// A socket facing the destination: upload = its tx, download = its rx.
    Upstream,
}

/// What an inbound knows of a flow when it hands it over.
#[derive(Debug, Clone)]
pub struct FlowMeta {
    pub network: Network,
    /// Inbound type as Clash shows it (`TProxy`, `HTTP`, `HTTPS`, `Socks5`).
    pub inbound_type: &'static str,
    /// Inbound type as IN-TYPE rules name it (`TPROXY`, `HTTP`, `HTTPS`, `SOCKS5`).
    pub in_type: &'static str,
    /// Inbound name (`DEFAULT-TPROXY`, `DEFAULT-MIXED`).
    pub inbound_name: &'static str,
    /// The client.
    pub source: SocketAddr,
    /// The destination address, when the client gave one (TPROXY always does).
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    /// The name the client asked for (a proxy request), if any.
    pub host: Option<String>,
    /// The local address the client's packets reached.
    pub inbound: SocketAddr,
    /// The user the inbound authenticated.
    pub inbound_user: Option<String>,
}

impl FlowMeta {
    /// The destination as an address, when known.
    pub fn destination(&self) -> Option<SocketAddr> {
        self.destination_ip
            .map(|ip| SocketAddr::new(ip, self.destination_port))
    }
}

/// How the flow's host was learned, as mihomo's `dnsMode` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    Normal,
    /// From a DNS answer tpacct relayed.
    Mapping,
}

impl DnsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsMode::Normal => "normal",
            DnsMode::Mapping => "mapping",
        }
    }
}

/// Where the flow went and why, as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteInfo {
    pub rule: &'static str,
    pub payload: String,
    pub chains: Vec<String>,
}

/// Bytes counted outside the tracked socket (added) and handshake bytes on it that are not
/// payload (taken out).
#[derive(Debug, Default)]
pub struct Adjust {
    add_rx: AtomicU64,
    add_tx: AtomicU64,
    skip_rx: AtomicU64,
    skip_tx: AtomicU64,
}

impl Adjust {
    pub fn add(&self, rx: u64, tx: u64) {
        self.add_rx.fetch_add(rx, Ordering::Relaxed);
        self.add_tx.fetch_add(tx, Ordering::Relaxed);
    }

    pub fn skip(&self, rx: u64, tx: u64) {
        self.skip_rx.fetch_add(rx, Ordering::Relaxed);
        self.skip_tx.fetch_add(tx, Ordering::Relaxed);
    }

    fn apply(&self, c: Counters) -> Counters {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            rx: (c.rx + r(&self.add_rx)).saturating_sub(r(&self.skip_rx)),
            tx: (c.tx + r(&self.add_tx)).saturating_sub(r(&self.skip_tx)),
        }
    }
}

/// A live flow.
#[derive(Debug)]
pub struct Flow {
    pub id: Uuid,
    pub meta: FlowMeta,
    pub start: SystemTime,
    /// mihomo's `host`: given by the client, mapped from DNS, or sniffed with override.
    host: OnceLock<(String, DnsMode)>,
    /// The name sniffed from the client's first bytes.
    sniffed: OnceLock<String>,
    route: OnceLock<RouteInfo>,
    /// The address actually dialed.
    dialed: OnceLock<SocketAddr>,
    /// The local process that opened the client socket, when looked up and found.
    owner: OnceLock<crate::process::Owner>,
    pub(crate) tracked: Tracked,
    leg: Leg,
    pub adjust: Adjust,
    close: CancellationToken,
}

impl Flow {
    pub(crate) fn new(meta: FlowMeta, tracked: Tracked, leg: Leg) -> Flow {
        let host = OnceLock::new();
        if let Some(h) = &meta.host {
            let _ = host.set((h.clone(), DnsMode::Normal));
        }
        Flow {
            // Time-ordered (v7): the history's id index grows at its end instead of dirtying a
            // random page per flow, and ids sort by start. Clients read it as an opaque UUID.
            id: Uuid::now_v7(),
            meta,
            start: SystemTime::now(),
            host,
            sniffed: OnceLock::new(),
            route: OnceLock::new(),
            dialed: OnceLock::new(),
            owner: OnceLock::new(),
            tracked,
            leg,
            adjust: Adjust::default(),
            close: CancellationToken::new(),
        }
    }

    /// Takes handshake bytes (a proxy protocol's greeting, request and reply) out of the
    /// counts: the kernel counted them on the socket; user-space counting never saw them.
    pub fn skip_handshake(&self, rx: u64, tx: u64) {
        if self.tracked.in_kernel() {
            self.adjust.skip(rx, tx);
        }
    }

    /// mihomo's `host`.
    pub fn host(&self) -> Option<&str> {
        self.host.get().map(|(h, _)| h.as_str())
    }

    pub fn dns_mode(&self) -> DnsMode {
        self.host.get().map_or(DnsMode::Normal, |(_, m)| *m)
    }

    /// Sets the host (first writer wins).
    pub fn set_host(&self, host: String, mode: DnsMode) {
        let _ = self.host.set((host, mode));
    }

    /// The name sniffed from the client's first bytes.
    pub fn sniffed_host(&self) -> Option<&str> {
        self.sniffed.get().map(String::as_str)
    }

    pub fn set_sniffed_host(&self, host: String) {
        let _ = self.sniffed.set(host);
    }

    /// The name rules see: sniffed, else the host (mihomo's `RuleHost`).
    pub fn rule_host(&self) -> Option<&str> {
        self.sniffed_host().or_else(|| self.host())
    }

    pub fn route(&self) -> Option<&RouteInfo> {
        self.route.get()
    }

    pub fn set_route(&self, route: RouteInfo) {
        let _ = self.route.set(route);
    }

    pub fn dialed(&self) -> Option<SocketAddr> {
        self.dialed.get().copied()
    }

    pub fn set_dialed(&self, addr: SocketAddr) {
        let _ = self.dialed.set(addr);
    }

    /// The local process that opened the client socket.
    pub fn owner(&self) -> Option<&crate::process::Owner> {
        self.owner.get()
    }

    pub fn set_owner(&self, owner: crate::process::Owner) {
        let _ = self.owner.set(owner);
    }

    /// Fires when the flow is closed on demand.
    pub fn close_token(&self) -> &CancellationToken {
        &self.close
    }

    /// Where the relay reports bytes (user-space accounting).
    pub fn meter(&self) -> &Meter {
        self.tracked.meter()
    }

    /// Socket counters → the flow's traffic.
    pub(crate) fn orient(&self, c: Counters) -> Traffic {
        let c = self.adjust.apply(c);
        match self.leg {
            Leg::Client => Traffic {
                upload: c.rx,
                download: c.tx,
            },
            Leg::Upstream => Traffic {
                upload: c.tx,
                download: c.rx,
            },
        }
    }

    /// What the closed ring keeps.
    pub(crate) fn closed(&self, traffic: Traffic) -> ClosedFlow {
        ClosedFlow {
            id: self.id,
            meta: self.meta.clone(),
            start: self.start,
            closed_at: SystemTime::now(),
            host: self.host().map(str::to_owned),
            dns_mode: self.dns_mode(),
            sniffed_host: self.sniffed_host().map(str::to_owned),
            route: self.route().cloned().unwrap_or_default(),
            dialed: self.dialed(),
            owner: self.owner().cloned(),
            traffic,
        }
    }
}

/// Payload bytes of a flow: upload = client → destination, download = destination → client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub upload: u64,
    pub download: u64,
}

/// A live flow with its counters now.
#[derive(Debug, Clone)]
pub struct LiveFlow {
    pub flow: Arc<Flow>,
    pub traffic: Traffic,
}

/// A closed flow with its exact final totals.
#[derive(Debug, Clone)]
pub struct ClosedFlow {
    pub id: Uuid,
    pub meta: FlowMeta,
    pub start: SystemTime,
    pub closed_at: SystemTime,
    pub host: Option<String>,
    pub dns_mode: DnsMode,
    pub sniffed_host: Option<String>,
    pub route: RouteInfo,
    pub dialed: Option<SocketAddr>,
    pub owner: Option<crate::process::Owner>,
    pub traffic: Traffic,
}
