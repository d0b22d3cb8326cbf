//! The one owner of every flow the fast path forwards: registers it when the kernel map shows
//! it, feeds its counters to the registry each tick, and finishes it on its close event, its
//! idle expiry, or a DELETE (removing its entry, after which nftables and the egress program
//! drop what is left of it rather than forward it uncounted).

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap, IterableMap, MapData, RingBuf};
use foldhash::{HashMap as Std, HashMapExt, HashSet, HashSetExt};
use futures_util::{FutureExt, StreamExt, stream::FuturesUnordered};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tpacct_common::{
    AF_INET,
    fastpath::{FastEvent, FastFlow, FlowKey, fast_flags},
};

use super::Tables;
use crate::{
    accounting::Proto,
    flow::{Flow, FlowMeta, Leg, Network, RouteInfo},
    registry::Registry,
    route::Router,
};

/// `FlowKey::proto` of a TCP flow (UDP otherwise).
const TCP: u8 = 6;

/// How often live counters are read from the kernel map.
const TICK: Duration = Duration::from_secs(1);
/// How long a closed flow's entry stays so its last packets (the final ACK, a retransmitted
/// FIN) still pass.
const LINGER: Duration = Duration::from_secs(3);

/// How often this host's own addresses are looked up again (they stay off the fast path).
const ADDRESSES_EVERY: Duration = Duration::from_secs(30);

/// The inbound name a fast-path flow shows (`inboundName`): the kernel was its inbound.
pub const INBOUND_NAME: &str = "DEFAULT-FASTPATH";

struct Live {
    flow: Arc<Flow>,
    first_ns: u64,
    /// (upload, download) already reported to the flow's meter.
    reported: (u64, u64),
}

/// A flow's close token, resolving to the flow (key and first packet's time) when it fires: on
/// a DELETE, or when the owner finishes the flow itself (so none outlives its flow).
type Closing = Pin<Box<dyn Future<Output = (FlowKey, u64)> + Send>>;

pub(super) struct Owner {
    map: HashMap<MapData, FlowKey, FastFlow>,
    registry: Arc<Registry>,
    tables: Arc<Tables>,
    router: Arc<Router>,
    /// When the kernel table was last compiled here (for this host's addresses).
    compiled: Instant,
    live: Std<FlowKey, Live>,
    closing: FuturesUnordered<Closing>,
    lingering: VecDeque<(Instant, FlowKey, u64)>,
    tcp_idle: Duration,
    udp_idle: Duration,
    stats: Arc<super::StatsReader>,
    /// Flows proxied for a full map, as last logged.
    map_full: u64,
}

impl Owner {
    pub(super) fn new(
        map: HashMap<MapData, FlowKey, FastFlow>,
        registry: Arc<Registry>,
        tables: Arc<Tables>,
        router: Arc<Router>,
        tcp_idle: Duration,
        udp_idle: Duration,
        stats: Arc<super::StatsReader>,
    ) -> Owner {
        Owner {
            map,
            registry,
            tables,
            compiled: Instant::now(),
            router,
            live: Std::new(),
            closing: FuturesUnordered::new(),
            lingering: VecDeque::new(),
            tcp_idle,
            udp_idle,
            stats,
            map_full: 0,
        }
    }

    /// Takes the close events waiting (first, so an entry that replaced a closed one is
    /// never read before the old one's event), then reads every entry: registers new flows,
    /// reports counters, expires idle ones, collects closes whose event was lost, and removes
    /// entries whose linger is over.
    async fn tick(&mut self, ring: &mut RingBuf<MapData>) {
        for event in drain(ring) {
            self.closed(event).await;
        }
        self.recompile();
        let full = self.stats.read().map_full;
        if full > self.map_full {
            tracing::warn!(
                "fast-path: {} flows decided DIRECT were proxied because the flow map was full \
                 ({} live); raise `fast-path.max-flows`",
                full - self.map_full,
                self.live.len()
            );
            self.map_full = full;
        }
        let now_ns = monotonic_ns();
        let mut seen = HashSet::with_capacity(self.live.len());
        let entries = self.entries();
        for (key, value) in entries {
            seen.insert(key);
            if value.flags & fast_flags::CLOSED != 0 {
                if value.flags & fast_flags::EVENT_LOST != 0 {
                    // The ring was full: collect the totals here, once.
                    let _ = self.map.remove(&key);
                    self.finish(key, &value).await;
                }
                continue;
            }
            let idle = if key.proto == TCP {
                self.tcp_idle
            } else {
                self.udp_idle
            };
            if now_ns.saturating_sub(value.last_ns) >= idle.as_nanos() as u64 {
                let _ = self.map.remove(&key);
                self.finish(key, &value).await;
                continue;
            }
            if !self.live_matches(&key, &value) {
                if self.live.contains_key(&key) {
                    // The 5-tuple was reused and the old flow's event was lost.
                    self.finish_with(key, self.reported(&key)).await;
                }
                self.open(key, &value);
            }
            self.report(&key, value.traffic());
        }
        // Entries gone from the map without an event: finish them with what was counted.
        let gone: Vec<FlowKey> = self
            .live
            .keys()
            .filter(|k| !seen.contains(*k))
            .copied()
            .collect();
        for key in gone {
            self.finish_with(key, self.reported(&key)).await;
        }
        let now = Instant::now();
        while let Some(&(at, key, first_ns)) = self.lingering.front() {
            if at > now {
                break;
            }
            self.lingering.pop_front();
            // Not if a new connection took the 5-tuple meanwhile.
            if self.map.get(&key, 0).is_ok_and(|v| v.first_ns == first_ns) {
                let _ = self.map.remove(&key);
            }
        }
    }

    /// Recompiles the kernel table now and then for this host's addresses (changes of mode
    /// or routing recompile it at once, see [`super::FastPath::start`]).
    fn recompile(&mut self) {
        if self.compiled.elapsed() < ADDRESSES_EVERY {
            return;
        }
        self.compiled = Instant::now();
        if let Err(e) = self.tables.reload(&self.router) {
            tracing::error!("{e}; the previous rule table stays");
        }
    }

    /// Every entry, a few thousand per system call (entry by entry where the kernel cannot).
    fn entries(&self) -> Vec<(FlowKey, FastFlow)> {
        use std::os::fd::AsFd;
        match crate::accounting::read_map_batched(self.map.map().fd().as_fd()) {
            Ok(all) => all,
            Err(_) => self.map.iter().filter_map(Result::ok).collect(),
        }
    }

    /// What the live flow on `key` has reported so far.
    fn reported(&self, key: &FlowKey) -> (u64, u64) {
        self.live.get(key).map(|l| l.reported).unwrap_or_default()
    }

    /// Ends the live flow on `key` with its entry's final values when the entry is still its
    /// own, else with what it reported.
    async fn end(&mut self, key: FlowKey, first_ns: u64) {
        match self.map.get(&key, 0) {
            Ok(value) if value.first_ns == first_ns => {
                let _ = self.map.remove(&key);
                self.finish(key, &value).await;
            }
            _ => self.finish_with(key, self.reported(&key)).await,
        }
    }

    fn live_matches(&self, key: &FlowKey, value: &FastFlow) -> bool {
        self.live
            .get(key)
            .is_some_and(|l| l.first_ns == value.first_ns)
    }

    fn open(&mut self, key: FlowKey, value: &FastFlow) {
        let (client, server) = addresses(&key);
        let (network, proto) = if key.proto == TCP {
            (Network::Tcp, Proto::Tcp)
        } else {
            (Network::Udp, Proto::Udp)
        };
        let meta = FlowMeta {
            network,
            inbound_type: "TProxy",
            in_type: "TPROXY",
            inbound_name: INBOUND_NAME,
            source: client,
            destination_ip: Some(server.ip()),
            destination_port: server.port(),
            host: None,
            inbound: server,
            inbound_user: None,
        };
        let age = Duration::from_nanos(monotonic_ns().saturating_sub(value.first_ns));
        let start = SystemTime::now()
            .checked_sub(age)
            .unwrap_or_else(SystemTime::now);
        let tracked = self.registry.accounting().untracked(proto);
        let flow = self.registry.open_since(meta, tracked, Leg::Client, start);
        let (rule, payload) = self.tables.label(value.generation, value.rule);
        flow.set_route(RouteInfo {
            rule,
            payload,
            chains: vec!["DIRECT".to_owned()],
        });
        flow.set_dialed(server);
        let token = flow.close_token().clone();
        let first_ns = value.first_ns;
        self.closing.push(Box::pin(
            token.cancelled_owned().map(move |()| (key, first_ns)),
        ));
        self.live.insert(
            key,
            Live {
                flow,
                first_ns: value.first_ns,
                reported: (0, 0),
            },
        );
    }

    /// Moves the flow's meter up to `traffic` (counters only grow).
    fn report(&mut self, key: &FlowKey, traffic: (u64, u64)) {
        if let Some(live) = self.live.get_mut(key) {
            let (up, down) = live.reported;
            let meter = live.flow.meter();
            if traffic.0 > up {
                meter.add_rx(traffic.0 - up);
            }
            if traffic.1 > down {
                meter.add_tx(traffic.1 - down);
            }
            live.reported = (traffic.0.max(up), traffic.1.max(down));
        }
    }

    /// Finishes the flow whose final entry is `value` (registering it first if it opened and
    /// closed between two ticks).
    async fn finish(&mut self, key: FlowKey, value: &FastFlow) {
        if !self.live_matches(&key, value) {
            match self.live.get(&key).map(|l| (l.first_ns, l.reported)) {
                // Already finished (its entry vanished before the event was read).
                Some((newer, _)) if newer > value.first_ns => return,
                Some((_, old)) => self.finish_with(key, old).await,
                None => {}
            }
            self.open(key, value);
        }
        self.finish_with(key, value.traffic()).await;
    }

    async fn finish_with(&mut self, key: FlowKey, traffic: (u64, u64)) {
        self.report(&key, traffic);
        if let Some(live) = self.live.remove(&key) {
            // Resolves its entry in `closing`, which `kill` then finds gone.
            live.flow.close_token().cancel();
            self.registry.finish(live.flow).await;
        }
    }

    /// A close event: final totals now, the entry removed after [`LINGER`].
    async fn closed(&mut self, event: FastEvent) {
        self.finish(event.key, &event.flow).await;
        self.lingering
            .push_back((Instant::now() + LINGER, event.key, event.flow.first_ns));
    }

    /// DELETE of the flow that began at `first_ns`: the entry goes now, so what is left of the
    /// connection is dropped. Nothing when that flow is already finished.
    async fn kill(&mut self, key: FlowKey, first_ns: u64) {
        if self.live.get(&key).is_some_and(|l| l.first_ns == first_ns) {
            self.end(key, first_ns).await;
        }
    }

    /// Shutdown: every flow ends with what was counted (a newer flow on its 5-tuple too).
    async fn finish_all(&mut self) {
        let keys: Vec<FlowKey> = self.live.keys().copied().collect();
        for key in keys {
            match self.map.get(&key, 0) {
                Ok(value) => self.finish(key, &value).await,
                Err(_) => self.finish_with(key, self.reported(&key)).await,
            }
        }
    }
}

/// Runs the owner until `cancel`.
pub(super) fn spawn(
    mut owner: Owner,
    ring: RingBuf<MapData>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<()> {
    let mut ring = crate::accounting::readable(ring)?;
    let cancel = cancel.clone();
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => owner.tick(ring.get_mut()).await,
                Some((key, first_ns)) = owner.closing.next() => owner.kill(key, first_ns).await,
                guard = ring.readable_mut() => match guard {
                    Ok(mut guard) => {
                        let events = drain(guard.get_inner_mut());
                        guard.clear_ready();
                        for event in events {
                            owner.closed(event).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!("fast-path event ring: {e}");
                        break;
                    }
                },
            }
        }
        owner.finish_all().await;
    });
    Ok(())
}

/// Every event waiting in the ring.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<FastEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.extend(crate::accounting::record::<FastEvent>(&item));
    }
    events
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// The key's client and server addresses.
fn addresses(key: &FlowKey) -> (SocketAddr, SocketAddr) {
    let ip = |words: &[u32; 4]| -> IpAddr {
        if u32::from(key.family) == AF_INET {
            IpAddr::V4(Ipv4Addr::from(u32::from_be(words[0])))
        } else {
            let mut octets = [0u8; 16];
            for (chunk, w) in octets.chunks_exact_mut(4).zip(words) {
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
    };
    (
        SocketAddr::new(ip(&key.client), key.client_port),
        SocketAddr::new(ip(&key.server), key.server_port),
    )
}
