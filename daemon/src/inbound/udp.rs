//! TPROXY UDP: one session per (client, original destination), each with a socket towards the
//! destination and a reply socket bound to the destination's address, so the client hears
//! back from where it sent. The receive loop never waits: a new session is set up by its own
//! task while its first datagrams wait in a small queue. Sessions end after
//! `udp-idle-timeout` without traffic, and at most `udp-max-sessions` live at once (to make
//! room, a session that never got an answer goes first, then the one idle longest).

use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use socket2::SockRef;
use tokio::net::UdpSocket;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Shared, TPROXY_NAME, TPROXY_TYPE, sys};
use crate::registry::{Flow, FlowMeta, Leg, Network};

type Key = (SocketAddr, SocketAddr);

const MAX_DATAGRAM: usize = 65_536;
/// Datagrams held for a session while it is set up; more are dropped.
const QUEUE: usize = 16;
/// At most one log line about evictions per this interval.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// Runs `f` with this thread's datagram buffer: sessions share one per worker thread instead
/// of holding 64 KiB each. Never held across an await.
fn with_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
    }
    BUF.with_borrow_mut(|b| f(b))
}

/// Sends without waiting: a UDP socket whose buffer is full drops the datagram, as the
/// network would.
fn send_now(socket: &UdpSocket, data: &[u8]) -> io::Result<usize> {
    SockRef::from(socket).send(data)
}

/// A live session: the socket towards the destination and its flow.
#[derive(Debug)]
struct Session {
    upstream: UdpSocket,
    flow: Arc<Flow>,
}

impl Session {
    /// Sends one client datagram towards the destination.
    fn forward(&self, data: &[u8]) {
        match send_now(&self.upstream, data) {
            Ok(n) => self.flow.meter().add_tx(n as u64),
            Err(e) => tracing::debug!("{} udp → {}: {e}", self.flow.id, self.flow.meta.destination),
        }
    }
}

#[derive(Debug)]
enum State {
    /// Being set up; datagrams that arrive meanwhile.
    Pending(Vec<Box<[u8]>>),
    Ready(Arc<Session>),
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Milliseconds since the table's epoch at the last datagram either way, and whether
    /// the destination ever answered.
    last: Arc<Activity>,
    /// Fired when the session is evicted.
    evict: CancellationToken,
}

/// When a session last moved a datagram, and whether its destination ever answered.
#[derive(Debug, Default)]
struct Activity {
    at: AtomicU64,
    answered: std::sync::atomic::AtomicBool,
}

/// The sessions of one listener.
#[derive(Debug)]
struct Table {
    map: Mutex<HashMap<Key, Entry>>,
    max: usize,
    epoch: Instant,
    evicted: AtomicU64,
    /// Sessions closed to make room whose sockets are not released yet; new sessions wait
    /// while there are [`Table::closing_max`] of them, so descriptors stay bounded.
    closing: std::sync::atomic::AtomicUsize,
    last_log: Mutex<Option<Instant>>,
}

impl Table {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn closing_max(&self) -> usize {
        (self.max / 8).max(16)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
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
                State::Ready(session) => session.forward(data),
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
        tracker.spawn(session(
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

/// Sets up one session, then pumps it until it idles out, is closed or evicted.
async fn session(
    key: Key,
    inbound: SocketAddr,
    shared: Arc<Shared>,
    table: Arc<Table>,
    last: Arc<Activity>,
    evict: CancellationToken,
    cancel: CancellationToken,
) {
    let (session, reply) = match open(&shared, key, inbound).await {
        Ok(opened) => opened,
        Err(e) => {
            tracing::debug!("tproxy udp: {} → {}: {e}", key.0, key.1);
            if evict.is_cancelled() {
                table.closing.fetch_sub(1, Ordering::Relaxed);
            } else {
                table.lock().remove(&key);
            }
            return;
        }
    };
    // Ready: take what queued meanwhile (unless evicted while setting up).
    let queued = {
        let mut map = table.lock();
        match map.get_mut(&key) {
            Some(entry) if !evict.is_cancelled() => {
                match std::mem::replace(&mut entry.state, State::Ready(session.clone())) {
                    State::Pending(queue) => queue,
                    State::Ready(_) => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    };
    for datagram in &queued {
        session.forward(datagram);
    }
    run(&session, &reply, &table, &last, &evict, &shared, &cancel).await;
    {
        let mut map = table.lock();
        // Only our own entry: an evicted key may already hold a new session.
        if map
            .get(&key)
            .is_some_and(|e| matches!(&e.state, State::Ready(s) if Arc::ptr_eq(s, &session)))
        {
            map.remove(&key);
        }
    }
    drop(reply);
    let flow = session.flow.clone();
    drop(session);
    if evict.is_cancelled() {
        table.closing.fetch_sub(1, Ordering::Relaxed);
    }
    shared.registry.finish(flow).await;
}

async fn open(
    shared: &Shared,
    (source, destination): Key,
    inbound: SocketAddr,
) -> io::Result<(Arc<Session>, UdpSocket)> {
    let route = shared.router.route();
    if route.outbound == crate::route::Outbound::Reject {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("rejected by {}", route.chains.join(" < ")),
        ));
    }
    let upstream = shared
        .direct
        .connect_udp(destination)
        .await
        .map_err(io::Error::other)?;
    let reply = sys::reply_socket(destination, source)?;
    let tracked = shared
        .registry
        .accounting()
        .track(&upstream)
        .map_err(io::Error::other)?;
    let meta = FlowMeta {
        network: Network::Udp,
        inbound_type: TPROXY_TYPE,
        inbound_name: TPROXY_NAME.to_owned(),
        source,
        destination,
        inbound: shared.inbound_for(source, inbound),
        route,
    };
    let flow = shared.registry.open(meta, tracked, Leg::Upstream);
    flow.set_dialed(destination);
    Ok((Arc::new(Session { upstream, flow }), reply))
}

/// Moves every datagram waiting on `from` to `to`, reporting each received and each sent;
/// false if `from` failed for good.
fn drain(from: &UdpSocket, to: &UdpSocket, received: impl Fn(usize), sent: impl Fn(usize)) -> bool {
    with_buffer(|buf| {
        loop {
            match from.try_recv(buf) {
                Ok(n) => {
                    received(n);
                    if let Ok(m) = send_now(to, &buf[..n]) {
                        sent(m);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                // An ICMP error for an earlier datagram (port unreachable, say).
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    tracing::debug!("udp: {e}");
                    return false;
                }
            }
        }
    })
}

/// Pumps replies to the client (and the client's later datagrams, which reach the reply
/// socket once it exists) until the session idles out, is closed or evicted.
async fn run(
    session: &Session,
    reply: &UdpSocket,
    table: &Table,
    last: &Activity,
    evict: &CancellationToken,
    shared: &Shared,
    cancel: &CancellationToken,
) {
    let flow = &session.flow;
    let idle_ms = shared.udp_idle.as_millis() as u64;
    let touch = || last.at.store(table.now(), Ordering::Relaxed);
    loop {
        let quiet_until = last.at.load(Ordering::Relaxed) + idle_ms;
        let now = table.now();
        if now >= quiet_until {
            return;
        }
        let deadline = tokio::time::sleep(Duration::from_millis(quiet_until - now));
        tokio::select! {
            () = cancel.cancelled() => return,
            () = flow.close_token().cancelled() => return,
            () = evict.cancelled() => return,
            () = deadline => {}
            r = session.upstream.readable() => {
                let received = |n: usize| {
                    flow.meter().add_rx(n as u64);
                    last.answered.store(true, Ordering::Relaxed);
                    touch();
                };
                if r.is_err() || !drain(&session.upstream, reply, received, |_| {}) {
                    return;
                }
            }
            r = reply.readable() => {
                let sent = |n: usize| flow.meter().add_tx(n as u64);
                if r.is_err() || !drain(reply, &session.upstream, |_| touch(), sent) {
                    return;
                }
            }
        }
    }
}
