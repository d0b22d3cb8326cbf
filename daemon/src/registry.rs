//! Live flows (one per TCP connection or UDP session), the ring of closed ones, global totals,
//! and close-on-demand handles: the single source of truth the API and metrics read.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use dashmap::DashMap;
use uuid::Uuid;

use crate::accounting::{Accounting, Observed, Tracked};
pub use crate::flow::{ClosedFlow, Flow, FlowMeta, Leg, LiveFlow, Network, Traffic};

/// The registry's maps hash with foldhash: their keys are ours (ids, route names), not an
/// attacker's, and SipHash showed in the churn profile.
type Fast = foldhash::fast::RandomState;

/// Bytes by (outbound, rule type): (upload, download).
pub type ClosedByRoute = std::collections::HashMap<(String, &'static str), (u64, u64)>;

/// The registry.
#[derive(Debug)]
pub struct Registry {
    accounting: Accounting,
    live: DashMap<Uuid, Arc<Flow>, Fast>,
    /// How many of the live flows are UDP sessions (which kernel map is worth a batch read).
    live_udp: std::sync::atomic::AtomicUsize,
    closed: Mutex<VecDeque<ClosedFlow>>,
    closed_capacity: usize,
    closed_upload: AtomicU64,
    closed_download: AtomicU64,
    /// How long closing waits for the kernel's final totals.
    grace: Duration,
    /// Flows ever opened, and when the last one was.
    opened: AtomicU64,
    last_opened: Mutex<Option<SystemTime>>,
    /// Flows opened by (network, inbound name), for metrics.
    opened_by: DashMap<(Network, &'static str), u64, Fast>,
    /// Bytes of closed flows by (outbound: the chain's leaf, rule type), for metrics.
    closed_by_route: DashMap<(String, &'static str), (u64, u64), Fast>,
    /// Held for writing while a flow moves from live to the closed ring (and totals), for
    /// reading while totals are summed, so no flow is counted twice or not at all.
    moving: std::sync::RwLock<()>,
    /// Each flow as it closes, for `/connections/events`.
    closes: tokio::sync::broadcast::Sender<Arc<ClosedFlow>>,
    /// Where closed flows are kept, when history is on.
    store: std::sync::OnceLock<Arc<crate::store::Store>>,
}

/// Close events a slow `/connections/events` client may fall behind by before it is told.
const CLOSES_QUEUED: usize = 4096;

impl Registry {
    /// Every flow that closes from now on, with its final totals.
    pub fn closes(&self) -> tokio::sync::broadcast::Receiver<Arc<ClosedFlow>> {
        self.closes.subscribe()
    }

    pub fn new(accounting: Accounting, closed_capacity: usize) -> Registry {
        Registry {
            accounting,
            live: DashMap::default(),
            live_udp: std::sync::atomic::AtomicUsize::new(0),
            closed: Mutex::new(VecDeque::with_capacity(closed_capacity.min(4096))),
            closed_capacity: closed_capacity.max(1),
            closed_upload: AtomicU64::new(0),
            closed_download: AtomicU64::new(0),
            grace: Duration::from_secs(5),
            opened: AtomicU64::new(0),
            last_opened: Mutex::new(None),
            opened_by: DashMap::default(),
            closed_by_route: DashMap::default(),
            moving: std::sync::RwLock::new(()),
            store: std::sync::OnceLock::new(),
            closes: tokio::sync::broadcast::channel(CLOSES_QUEUED).0,
        }
    }

    /// Keeps every flow that closes from now on in `store`.
    pub fn set_store(&self, store: Arc<crate::store::Store>) {
        let _ = self.store.set(store);
    }

    /// The history store, when on.
    pub fn store(&self) -> Option<&Arc<crate::store::Store>> {
        self.store.get()
    }

    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    /// Registers a flow (once: each call makes a new id).
    pub fn open(&self, meta: FlowMeta, tracked: Tracked, leg: Leg) -> Arc<Flow> {
        self.open_since(meta, tracked, leg, SystemTime::now())
    }

    /// Registers a flow that began at `start` (one the kernel forwarded before we saw it).
    pub fn open_since(
        &self,
        meta: FlowMeta,
        tracked: Tracked,
        leg: Leg,
        start: SystemTime,
    ) -> Arc<Flow> {
        let mut flow = Flow::new(meta, tracked, leg);
        flow.start = start;
        let flow = Arc::new(flow);
        self.live.insert(flow.id, flow.clone());
        if flow.meta.network == Network::Udp {
            self.live_udp.fetch_add(1, Ordering::Relaxed);
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        *self
            .opened_by
            .entry((flow.meta.network, flow.meta.inbound_name))
            .or_default() += 1;
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

    /// Flows opened by (network, inbound name).
    pub fn opened_by(&self) -> Vec<((Network, &'static str), u64)> {
        self.opened_by
            .iter()
            .map(|e| (*e.key(), *e.value()))
            .collect()
    }

    /// Bytes of closed flows by (outbound, rule type) as (upload, download), and the live
    /// flows, read in one step (no flow in both or neither).
    pub fn closed_by_route_and_live(&self) -> (ClosedByRoute, Vec<LiveFlow>) {
        // The kernel's counters are read before the lock: no system call under it.
        let seen = self.observe();
        let _moving = self.moving.read().unwrap_or_else(|p| p.into_inner());
        let closed = self
            .closed_by_route
            .iter()
            .map(|e| (e.key().clone(), *e.value()))
            .collect();
        (closed, self.live_in(seen.as_ref()))
    }

    /// The closed flows still in the ring (newest first) and the live flows, read in one step:
    /// no flow is in both or in neither.
    pub fn recent_and_live(&self) -> (Vec<ClosedFlow>, Vec<LiveFlow>) {
        let seen = self.observe();
        let _moving = self.moving.read().unwrap_or_else(|p| p.into_inner());
        (self.closed(usize::MAX), self.live_in(seen.as_ref()))
    }

    /// The kernel's counters for reading every live flow at once (see
    /// [`Accounting::observe`]); read before taking `moving`: no system call under it.
    fn observe(&self) -> Option<Observed> {
        let udp = self.live_udp.load(Ordering::Relaxed);
        self.accounting
            .observe(self.live.len().saturating_sub(udp), udp)
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
        let closed = flow.closed(traffic);
        if let Some(store) = self.store.get() {
            store.record(&closed);
        }
        tracing::info!(
            "[{}] {} --> {}{} match {}{} using {} closed: up {} B, down {} B",
            flow.meta.network.as_str().to_uppercase(),
            flow.meta.source,
            flow.meta.destination().map_or_else(
                || format!(":{}", flow.meta.destination_port),
                |d| d.to_string()
            ),
            closed
                .host
                .as_deref()
                .or(closed.sniffed_host.as_deref())
                .map(|h| format!(" ({h})"))
                .unwrap_or_default(),
            closed.route.rule,
            if closed.route.payload.is_empty() {
                String::new()
            } else {
                format!("({})", closed.route.payload)
            },
            closed.route.chains.join(" < "),
            traffic.upload,
            traffic.download,
        );
        let route_key = (
            closed.route.chains.first().cloned().unwrap_or_default(),
            closed.route.rule,
        );
        // One step: a reader sees the flow live or closed, never neither nor both.
        let _moving = self.moving.write().unwrap_or_else(|p| p.into_inner());
        let mut event = None;
        {
            let mut ring = self.closed.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == self.closed_capacity {
                ring.pop_front();
            }
            if self.closes.receiver_count() > 0 {
                // Sent once the flow has left the live map (below, still in this step).
                event = Some(Arc::new(closed.clone()));
            }
            ring.push_back(closed);
        }
        if self.live.remove(&flow.id).is_some() && flow.meta.network == Network::Udp {
            self.live_udp.fetch_sub(1, Ordering::Relaxed);
        }
        {
            let mut e = self.closed_by_route.entry(route_key).or_default();
            e.0 += traffic.upload;
            e.1 += traffic.download;
        }
        self.closed_upload
            .fetch_add(traffic.upload, Ordering::Relaxed);
        self.closed_download
            .fetch_add(traffic.download, Ordering::Relaxed);
        drop(_moving);
        if let Some(event) = event {
            let _ = self.closes.send(event);
        }
    }

    /// Closes one flow's sockets; false if no such live flow.
    pub fn close(&self, id: &Uuid) -> bool {
        match self.live.get(id) {
            Some(flow) => {
                flow.close_token().cancel();
                true
            }
            None => false,
        }
    }

    /// Closes every live flow.
    pub fn close_all(&self) {
        for flow in self.live.iter() {
            flow.close_token().cancel();
        }
    }

    /// Closes up to `n` live flows not already closing, the newest first; how many.
    pub fn close_newest(&self, n: usize) -> usize {
        let mut open: Vec<Arc<Flow>> = self
            .live
            .iter()
            .filter(|f| !f.close_token().is_cancelled())
            .map(|f| f.clone())
            .collect();
        open.sort_unstable_by_key(|f| std::cmp::Reverse(f.start));
        let closing = open.len().min(n);
        for flow in &open[..closing] {
            flow.close_token().cancel();
        }
        closing
    }

    /// Closes the live flows whose chain passes through group `group` to `member` (a group
    /// switched away from it); returns how many.
    pub fn close_through(&self, group: &str, member: &str) -> usize {
        let mut closed = 0;
        for flow in self.live.iter() {
            let Some(route) = flow.route() else { continue };
            let at = route.chains.iter().position(|c| c == group);
            // chains run leaf first: the member sits just before its group.
            if at.is_some_and(|i| i > 0 && route.chains[i - 1] == member) {
                flow.close_token().cancel();
                closed += 1;
            }
        }
        closed
    }

    pub fn get(&self, id: &Uuid) -> Option<Arc<Flow>> {
        self.live.get(id).map(|f| f.clone())
    }

    /// Every live flow with its counters (the kernel's read in one batch).
    pub fn live(&self) -> Vec<LiveFlow> {
        self.live_in(self.observe().as_ref())
    }

    /// Every live flow with its counters as `seen` has them.
    fn live_in(&self, seen: Option<&Observed>) -> Vec<LiveFlow> {
        self.live
            .iter()
            .map(|f| LiveFlow {
                traffic: f.orient(self.accounting.live_in(seen, &f.tracked)),
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
        let seen = self.observe();
        let _moving = self.moving.read().unwrap_or_else(|p| p.into_inner());
        let live = self.live_in(seen.as_ref());
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
