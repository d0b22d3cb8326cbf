//! Final totals of tracked sockets as the kernel reports them: the close-event ring, and the
//! entries the kernel keeps (marked closed) when the ring was full, collected by a sweep so a
//! full ring never loses a flow's totals.

use std::os::fd::AsFd;
use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, RingBuf};
use dashmap::{DashMap, mapref::entry::Entry};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::oneshot,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tpacct_common::{CloseEvent, Stat, TcpSock, UdpSock, tcp_flags, udp_flags};

use super::{Counters, Error};

/// How often the sweep runs even without close events, so a loss right after the last event
/// is still collected.
const BACKSTOP: Duration = Duration::from_secs(1);
/// At most one log line about a full ring per this interval.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// What is known of a tracked socket's end.
#[derive(Debug)]
enum Slot {
    Open,
    Closed(Counters),
    Waiting(oneshot::Sender<Counters>),
}

/// Tracked sockets by cookie, and what became of them.
#[derive(Debug, Default)]
pub(super) struct Slots {
    map: DashMap<u64, Slot>,
    untracked: AtomicU64,
    /// Close events recovered from the maps after the ring was full.
    pub(super) recovered: AtomicU64,
}

/// How [`Slots::wait`] ended.
pub(super) enum Wait {
    Now(Counters),
    Later(oneshot::Receiver<Counters>),
}

impl Slots {
    pub(super) fn watch(&self, cookie: u64) {
        self.map.insert(cookie, Slot::Open);
    }

    fn deliver(&self, cookie: u64, totals: Counters) {
        match self.map.entry(cookie) {
            Entry::Occupied(mut slot) => {
                if matches!(slot.get(), Slot::Waiting(_)) {
                    if let Slot::Waiting(tx) = slot.remove() {
                        let _ = tx.send(totals);
                    }
                } else {
                    slot.insert(Slot::Closed(totals));
                }
            }
            Entry::Vacant(_) => {
                self.untracked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The final totals if the socket has closed.
    pub(super) fn closed(&self, cookie: u64) -> Option<Counters> {
        match self.map.get(&cookie).as_deref() {
            Some(Slot::Closed(c)) => Some(*c),
            _ => None,
        }
    }

    /// The totals now if they arrived, else a receiver for them.
    pub(super) fn wait(&self, cookie: u64) -> Wait {
        let (tx, rx) = oneshot::channel();
        match self.map.entry(cookie) {
            Entry::Occupied(slot) if matches!(slot.get(), Slot::Closed(_)) => {
                if let Slot::Closed(totals) = slot.remove() {
                    return Wait::Now(totals);
                }
                unreachable!("matched Closed above")
            }
            Entry::Occupied(mut slot) => {
                slot.insert(Slot::Waiting(tx));
            }
            Entry::Vacant(slot) => {
                slot.insert(Slot::Waiting(tx));
            }
        }
        Wait::Later(rx)
    }

    /// Forgets `cookie`; its totals if they arrived meanwhile.
    pub(super) fn forget(&self, cookie: u64) -> Option<Counters> {
        match self.map.remove(&cookie) {
            Some((_, Slot::Closed(totals))) => Some(totals),
            _ => None,
        }
    }

    pub(super) fn untracked(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }
}

/// Second handles on the maps (the daemon's own are read-only), for deleting the entries the
/// kernel kept because the ring was full.
struct Sweeper {
    tcp: HashMap<MapData, u64, TcpSock>,
    udp: HashMap<MapData, u64, UdpSock>,
    stats: PerCpuArray<MapData, u64>,
    /// Ring-full losses already swept.
    seen: u64,
    last_log: Option<Instant>,
}

/// A second handle on the same map from a duplicate of its descriptor (reopening it by id
/// would need CAP_SYS_ADMIN, which the service does not have).
fn reopen(original: &MapData, name: &'static str) -> Result<MapData, Error> {
    let fd = original
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| Error::Socket {
            what: "a map descriptor",
            source,
        })?;
    MapData::from_fd(fd).map_err(|source| Error::Map { name, source })
}

/// A second typed handle on `original`.
fn second<T>(original: &MapData, name: &'static str, wrap: fn(MapData) -> Map) -> Result<T, Error>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(wrap(reopen(original, name)?)).map_err(|source| Error::Map { name, source })
}

impl Sweeper {
    fn new(tcp: &MapData, udp: &MapData, stats: &MapData) -> Result<Sweeper, Error> {
        use tpacct_common::{STATS_MAP, TCP_MAP, UDP_MAP};
        Ok(Sweeper {
            tcp: second(tcp, TCP_MAP, Map::HashMap)?,
            udp: second(udp, UDP_MAP, Map::HashMap)?,
            stats: second(stats, STATS_MAP, Map::PerCpuArray)?,
            seen: 0,
            last_log: None,
        })
    }

    fn losses(&self) -> u64 {
        self.stats
            .get(&(Stat::CloseRingFull as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Sweeps if the kernel lost close events since the last sweep.
    fn check(&mut self, slots: &Slots) {
        let losses = self.losses();
        if losses > self.seen {
            self.seen = losses;
            self.sweep(slots);
        }
    }

    /// Delivers and deletes every entry the kernel marked closed.
    fn sweep(&mut self, slots: &Slots) {
        let tcp: Vec<(u64, Counters)> = self
            .tcp
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, e)| e.flags & tcp_flags::CLOSED != 0)
            .map(|(cookie, e)| (cookie, Counters { rx: e.rx, tx: e.tx }))
            .collect();
        let udp: Vec<(u64, Counters)> = self
            .udp
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, e)| e.flags & udp_flags::CLOSED != 0)
            .map(|(cookie, e)| (cookie, Counters { rx: e.rx, tx: e.tx }))
            .collect();
        for (cookie, totals) in &tcp {
            slots.deliver(*cookie, *totals);
            let _ = self.tcp.remove(cookie);
        }
        for (cookie, totals) in &udp {
            slots.deliver(*cookie, *totals);
            let _ = self.udp.remove(cookie);
        }
        let found = (tcp.len() + udp.len()) as u64;
        slots.recovered.fetch_add(found, Ordering::Relaxed);
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.last_log = Some(Instant::now());
            tracing::warn!(
                "close-event ring full ({} events lost so far): {found} final totals collected \
                 from the kernel maps instead",
                self.seen
            );
        }
    }
}

/// Reads close events until `cancel`, delivering them to `slots`, and sweeps the maps after
/// each batch (and every second) when the kernel reports lost events.
pub(super) fn spawn_reader(
    ring: RingBuf<MapData>,
    maps: [&MapData; 3],
    slots: Arc<Slots>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), Error> {
    let mut sweeper = Sweeper::new(maps[0], maps[1], maps[2])?;
    let mut ring = readable(ring).map_err(Error::Ring)?;
    let cancel = cancel.clone();
    tracker.spawn(async move {
        let mut backstop = tokio::time::interval(BACKSTOP);
        backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = backstop.tick() => {}
                guard = ring.readable_mut() => match guard {
                    Ok(mut guard) => {
                        let ring = guard.get_inner_mut();
                        while let Some(item) = ring.next() {
                            if let Some(event) = record::<CloseEvent>(&item) {
                                slots.deliver(event.cookie, Counters { rx: event.rx, tx: event.tx });
                            }
                        }
                        guard.clear_ready();
                    }
                    Err(e) => {
                        tracing::error!("close-event ring: {e}");
                        return;
                    }
                },
            }
            sweeper.check(&slots);
        }
    });
    Ok(())
}

/// Registers a map-backed reader with the reactor for readability.
pub(crate) fn readable<T: AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: ring buffers and the log reader own their map fd and return that same fd until
    // dropped, which is when the AsyncFd drops.
    Ok(unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }?)
}

/// A ring-buffer record read as `T` (an `aya::Pod` event type), if it is long enough.
pub(crate) fn record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; `T: Pod` is plain integers, valid for any bit pattern.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}
