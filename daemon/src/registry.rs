//! Live flows (one per TCP connection or UDP session), the ring of closed ones, global totals,
//! and close-on-demand handles: the single source of truth the API and metrics read.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    accounting::{Accounting, Counters, Tracked},
    route::Route,
};

/// TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Which socket the flow's counters come from, and which way its counters point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The accepted client socket: upload = its rx, download = its tx.
    Client,
    /// The socket towards the destination: upload = its tx, download = its rx.
    Upstream,
}

/// What is known of a flow when it is registered.
#[derive(Debug, Clone)]
pub struct FlowMeta {
    pub network: Network,
    /// Inbound type as Clash shows it (`TProxy`).
    pub inbound_type: &'static str,
    /// Inbound name (`DEFAULT-TPROXY`).
    pub inbound_name: String,
    /// The client.
    pub source: SocketAddr,
    /// Where the client was going (TPROXY's original destination).
    pub destination: SocketAddr,
    /// The local address the client's packets reached.
    pub inbound: SocketAddr,
    pub route: Route,
}

/// A live flow.
#[derive(Debug)]
pub struct Flow {
    pub id: Uuid,
    pub meta: FlowMeta,
    pub start: SystemTime,
    /// Host from the TLS SNI or HTTP Host header, once sniffed.
    sniffed: OnceLock<String>,
    /// The address actually dialed.
    dialed: OnceLock<SocketAddr>,
    tracked: Tracked,
    leg: Leg,
    close: CancellationToken,
}

impl Flow {
    pub fn sniffed_host(&self) -> Option<&str> {
        self.sniffed.get().map(String::as_str)
    }

    pub fn set_sniffed_host(&self, host: String) {
        let _ = self.sniffed.set(host);
    }

    pub fn dialed(&self) -> Option<SocketAddr> {
        self.dialed.get().copied()
    }

    pub fn set_dialed(&self, addr: SocketAddr) {
        let _ = self.dialed.set(addr);
    }

    /// Fires when the flow is closed on demand.
    pub fn close_token(&self) -> &CancellationToken {
        &self.close
    }

    /// Where the relay reports bytes (user-space accounting).
    pub fn meter(&self) -> &crate::accounting::Meter {
        self.tracked.meter()
    }

    fn orient(&self, c: Counters) -> Traffic {
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
    pub sniffed_host: Option<String>,
    pub dialed: Option<SocketAddr>,
    pub traffic: Traffic,
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    accounting: Accounting,
    live: DashMap<Uuid, Arc<Flow>>,
    closed: Mutex<VecDeque<ClosedFlow>>,
    closed_capacity: usize,
    closed_upload: AtomicU64,
    closed_download: AtomicU64,
    /// How long closing waits for the kernel's final totals.
    grace: Duration,
    /// Flows ever opened, and when the last one was.
    opened: AtomicU64,
    last_opened: Mutex<Option<SystemTime>>,
    /// Held for writing while a flow moves from live to the closed ring (and totals), for
    /// reading while totals are summed, so no flow is counted twice or not at all.
    moving: std::sync::RwLock<()>,
}

impl Registry {
    pub fn new(accounting: Accounting, closed_capacity: usize) -> Registry {
        Registry {
            accounting,
            live: DashMap::new(),
            closed: Mutex::new(VecDeque::with_capacity(closed_capacity.min(4096))),
            closed_capacity: closed_capacity.max(1),
            closed_upload: AtomicU64::new(0),
            closed_download: AtomicU64::new(0),
            grace: Duration::from_secs(5),
            opened: AtomicU64::new(0),
            last_opened: Mutex::new(None),
            moving: std::sync::RwLock::new(()),
        }
    }

    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    /// Registers a flow (once: each call makes a new id).
    pub fn open(&self, meta: FlowMeta, tracked: Tracked, leg: Leg) -> Arc<Flow> {
        let flow = Arc::new(Flow {
            id: Uuid::new_v4(),
            meta,
            start: SystemTime::now(),
            sniffed: OnceLock::new(),
            dialed: OnceLock::new(),
            tracked,
            leg,
            close: CancellationToken::new(),
        });
        self.live.insert(flow.id, flow.clone());
        self.opened.fetch_add(1, Ordering::Relaxed);
        *self.last_opened.lock().unwrap_or_else(|p| p.into_inner()) = Some(flow.start);
        flow
    }

    /// How many flows were ever opened, and when the last one was.
    pub fn opened(&self) -> (u64, Option<SystemTime>) {
        (
            self.opened.load(Ordering::Relaxed),
            *self.last_opened.lock().unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// The flow's counters now.
    pub fn traffic(&self, flow: &Flow) -> Traffic {
        flow.orient(self.accounting.live(&flow.tracked))
    }

    /// Ends a flow once its sockets are closed: waits for its final totals, moves it to the
    /// closed ring and adds it to the global totals.
    pub async fn finish(&self, flow: Arc<Flow>) {
        let totals = self.accounting.finish(&flow.tracked, self.grace).await;
        let traffic = flow.orient(totals);
        tracing::info!(
            "[{}] {} --> {}{} match {} using {} closed: up {} B, down {} B",
            flow.meta.network.as_str().to_uppercase(),
            flow.meta.source,
            flow.meta.destination,
            flow.sniffed_host()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default(),
            flow.meta.route.rule,
            flow.meta.route.chains.join(" < "),
            traffic.upload,
            traffic.download,
        );
        let closed = ClosedFlow {
            id: flow.id,
            meta: flow.meta.clone(),
            start: flow.start,
            closed_at: SystemTime::now(),
            sniffed_host: flow.sniffed_host().map(str::to_owned),
            dialed: flow.dialed(),
            traffic,
        };
        // One step: a reader sees the flow live or closed, never neither nor both.
        let _moving = self.moving.write().unwrap_or_else(|p| p.into_inner());
        {
            let mut ring = self.closed.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == self.closed_capacity {
                ring.pop_front();
            }
            ring.push_back(closed);
        }
        self.live.remove(&flow.id);
        self.closed_upload
            .fetch_add(traffic.upload, Ordering::Relaxed);
        self.closed_download
            .fetch_add(traffic.download, Ordering::Relaxed);
    }

    /// Closes one flow's sockets; false if no such live flow.
    pub fn close(&self, id: &Uuid) -> bool {
        match self.live.get(id) {
            Some(flow) => {
                flow.close.cancel();
                true
            }
            None => false,
        }
    }

    /// Closes every live flow.
    pub fn close_all(&self) {
        for flow in self.live.iter() {
            flow.close.cancel();
        }
    }

    pub fn get(&self, id: &Uuid) -> Option<Arc<Flow>> {
        self.live.get(id).map(|f| f.clone())
    }

    /// Every live flow with its counters.
    pub fn live(&self) -> Vec<LiveFlow> {
        self.live
            .iter()
            .map(|f| LiveFlow {
                traffic: self.traffic(&f),
                flow: f.clone(),
            })
            .collect()
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Closed flows, newest first, at most `limit`.
    pub fn closed(&self, limit: usize) -> Vec<ClosedFlow> {
        let ring = self.closed.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().take(limit).cloned().collect()
    }

    /// Bytes moved by every flow since start: closed flows' totals plus live flows' counters.
    pub fn totals(&self) -> Traffic {
        self.live_and_totals().1
    }

    /// The live flows and the totals, read consistently (no flow counted twice or missed
    /// while it moves to the closed ring).
    pub fn live_and_totals(&self) -> (Vec<LiveFlow>, Traffic) {
        let _moving = self.moving.read().unwrap_or_else(|p| p.into_inner());
        let live = self.live();
        let sum = live.iter().fold(Traffic::default(), |t, f| Traffic {
            upload: t.upload + f.traffic.upload,
            download: t.download + f.traffic.download,
        });
        let totals = Traffic {
            upload: self.closed_upload.load(Ordering::Relaxed) + sum.upload,
            download: self.closed_download.load(Ordering::Relaxed) + sum.download,
        };
        (live, totals)
    }
}
