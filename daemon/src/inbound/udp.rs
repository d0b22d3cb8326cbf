//! TPROXY UDP: one session per (client, original destination), each with a socket towards the
//! destination and a reply socket bound to the destination's address, so the client hears
//! back from where it sent. The receive loop never waits: a new session is set up by its own
//! task while its first datagrams wait in a small queue. Sessions end after
//! `udp-idle-timeout` without traffic, and at most `udp-max-sessions` live at once (to make
//! room, a session that never got an answer goes first, then the one idle longest).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Shared, sys};

pub(super) type Key = (SocketAddr, SocketAddr);

pub(super) const MAX_DATAGRAM: usize = 65_536;
/// Datagrams held for a session while it is set up; more are dropped.
const QUEUE: usize = 16;
/// At most one log line about evictions per this interval.
const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(super) enum State {
    /// Being set up; datagrams that arrive meanwhile.
    Pending(Vec<Box<[u8]>>),
    Ready(Arc<super::udp_session::Session>),
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) state: State,
    /// Milliseconds since the table's epoch at the last datagram either way, and whether
    /// the destination ever answered.
    pub(super) last: Arc<Activity>,
    /// Fired when the session is evicted.
    pub(super) evict: CancellationToken,
}

/// When a session last moved a datagram, and whether its destination ever answered.
#[derive(Debug, Default)]
pub(super) struct Activity {
    pub(super) at: AtomicU64,
    pub(super) answered: std::sync::atomic::AtomicBool,
}

/// The sessions of one listener.
#[derive(Debug)]
pub(super) struct Table {
    map: Mutex<HashMap<Key, Entry>>,
    max: usize,
    epoch: Instant,
    evicted: AtomicU64,
    /// Sessions closed to make room whose sockets are not released yet; new sessions wait
    /// while there are [`Table::closing_max`] of them, so descriptors stay bounded.
    pub(super) closing: std::sync::atomic::AtomicUsize,
    last_log: Mutex<Option<Instant>>,
}

impl Table {
    pub(super) fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn closing_max(&self) -> usize {
        (self.max / 8).max(16)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes a session to make room (called with the table locked): like conntrack's early
    /// drop, one whose destination never answered goes first, and among those the one idle
    /// longest; then the one idle longest.
    fn evict_one(&self, map: &mut HashMap<Key, Entry>) {
        let Some(oldest) = map
            .iter()
            .min_by_key(|(_, e)| {
                (
                    e.last.answered.load(Ordering::Relaxed),
                    e.last.at.load(Ordering::Relaxed),
                )
            })
            .map(|(k, _)| *k)
        else {
            return;
        };
        if let Some(entry) = map.remove(&oldest) {
            self.closing.fetch_add(1, Ordering::Relaxed);
            entry.evict.cancel();
        }
        let total = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                "udp-max-sessions ({}) reached: closed the session idle longest ({} → {}); \
                 {total} closed this way so far",
                self.max,
                oldest.0,
                oldest.1
            );
        }
    }
}

pub(super) async fn serve(
    socket: UdpSocket,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    use sys::TransparentUdp;
    let Ok(inbound) = socket.local_addr() else {
        return;
    };
    let table = Arc::new(Table {
        map: Mutex::new(HashMap::new()),
        max: shared.udp_max_sessions,
        epoch: Instant::now(),
        evicted: AtomicU64::new(0),
        closing: std::sync::atomic::AtomicUsize::new(0),
        last_log: Mutex::new(None),
    });
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, source, destination) = tokio::select! {
            () = cancel.cancelled() => return,
            r = socket.recv_orig(&mut buf) => match r {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!("tproxy udp: {e}");
                    continue;
                }
            },
        };
        let key = (source, destination);
        let data = &buf[..n];
        let mut map = table.lock();
        if let Some(entry) = map.get_mut(&key) {
            entry.last.at.store(table.now(), Ordering::Relaxed);
            match &mut entry.state {
                State::Ready(session) => session.forward_from_listener(data),
                State::Pending(queue) if queue.len() < QUEUE => queue.push(data.into()),
                State::Pending(_) => {
                    tracing::debug!("tproxy udp: {source} → {destination}: queue full")
                }
            }
            continue;
        }
        if map.len() >= table.max {
            if table.closing.load(Ordering::Relaxed) >= table.closing_max() {
                tracing::debug!(
                    "tproxy udp: {source} → {destination}: dropped while sessions close"
                );
                continue;
            }
            table.evict_one(&mut map);
        }
        let last = Arc::new(Activity {
            at: AtomicU64::new(table.now()),
            ..Activity::default()
        });
        let evict = CancellationToken::new();
        map.insert(
            key,
            Entry {
                state: State::Pending(vec![data.into()]),
                last: last.clone(),
                evict: evict.clone(),
            },
        );
        drop(map);
        tracker.spawn(super::udp_session::session(
            key,
            inbound,
            shared.clone(),
            table.clone(),
            last,
            evict,
            cancel.clone(),
        ));
    }
}
