//! One TPROXY UDP session's life, in the same order as a TCP flow: track the client leg (the
//! reply socket bound to the destination), register, name (DNS mapping), route, open the
//! outbound's UDP session, pump until idle, closed or evicted, finish. DNS answers relayed to
//! port-53 sessions teach the DNS map.

use std::{
    cell::RefCell,
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use socket2::SockRef;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::{
    Shared, TPROXY_IN_TYPE, TPROXY_NAME, TPROXY_TYPE, sys,
    udp::{Activity, Key, MAX_DATAGRAM, State, Table},
};
use crate::{
    flow::{
        Flow, FlowMeta, Leg, Network, RouteInfo,
        pipeline::{Finisher, query},
    },
    outbound::{Kind, Target, UdpSession},
    route::Net,
};

/// Runs `f` with this thread's datagram buffer: sessions share one per worker thread instead
/// of holding 64 KiB each. Never held across an await.
fn with_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
    }
    BUF.with_borrow_mut(|b| f(b))
}

/// A live session.
#[derive(Debug)]
pub(super) struct Session {
    /// Towards the destination; None when the route rejects (datagrams are dropped).
    upstream: Option<UdpSession>,
    /// Counts the session among its leaf's active flows.
    _active: Option<crate::outbound::Active>,
    flow: Arc<Flow>,
    /// Whether replies are DNS answers to learn names from.
    dns: bool,
}

impl Session {
    /// A client datagram that reached the shared listener instead of the reply socket (the
    /// first ones, before it existed): counted here, as the reply socket never saw it.
    pub(super) fn forward_from_listener(&self, data: &[u8]) {
        self.flow.adjust.add(data.len() as u64, 0);
        self.forward(data);
    }

    fn forward(&self, data: &[u8]) {
        if let Some(up) = &self.upstream
            && let Err(e) = up.send(data)
        {
            tracing::debug!(
                "{} udp → {:?}: {e}",
                self.flow.id,
                self.flow.meta.destination()
            );
        }
    }
}

/// Sets up one session, then pumps it until it idles out, is closed or evicted.
pub(super) async fn session(
    key: Key,
    inbound: SocketAddr,
    shared: Arc<Shared>,
    table: Arc<Table>,
    last: Arc<Activity>,
    evict: CancellationToken,
    cancel: CancellationToken,
) {
    let opened = open(&shared, key, inbound).await;
    let (session, reply, finisher) = match opened {
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
        session.forward_from_listener(datagram);
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
    drop(session);
    if evict.is_cancelled() {
        table.closing.fetch_sub(1, Ordering::Relaxed);
    }
    finisher.finish().await;
}

async fn open(
    shared: &Shared,
    (source, destination): Key,
    inbound: SocketAddr,
) -> io::Result<(Arc<Session>, UdpSocket, Finisher)> {
    let pipeline = &shared.pipeline;
    if !pipeline.admit() {
        return Err(io::Error::other("refused: memory over the limit"));
    }
    let reply = sys::reply_socket(destination, source)?;
    let tracked = pipeline
        .registry
        .accounting()
        .track_as(&reply, crate::accounting::Proto::Udp)
        .map_err(io::Error::other)?;
    let meta = FlowMeta {
        network: Network::Udp,
        inbound_type: TPROXY_TYPE,
        in_type: TPROXY_IN_TYPE,
        inbound_name: TPROXY_NAME,
        source,
        destination_ip: Some(destination.ip()),
        destination_port: destination.port(),
        host: None,
        inbound: shared.inbound_for(source, inbound),
        inbound_user: None,
    };
    let flow = pipeline.registry.open(meta, tracked, Leg::Client);
    let finisher = Finisher::new(flow.clone(), pipeline.registry.clone());
    if let Some(name) = pipeline.dns.name(destination.ip()) {
        flow.set_host(name, crate::flow::DnsMode::Mapping);
    }
    // The client's socket sent to the original destination.
    pipeline
        .attribute(&flow, destination, &pipeline.router.routing())
        .await;
    let (route, routing) = pipeline.router.route(&query(&flow, Net::Udp));
    flow.set_route(RouteInfo {
        rule: route.rule,
        payload: route.payload.clone(),
        chains: route.chains.clone(),
    });
    let (upstream, active) = match route.leaf.kind {
        Kind::Reject | Kind::RejectDrop | Kind::Pass | Kind::Compatible => (None, None),
        _ => {
            let (session, active) = routing
                .outbounds
                .open_udp(&route.chains, &route.leaf, &Target::Ip(destination))
                .await
                .map_err(|e| io::Error::new(e.kind(), e.to_string()))?;
            if let Some(addr) = session.destination() {
                flow.set_dialed(addr);
            }
            (Some(session), Some(active))
        }
    };
    let session = Session {
        upstream,
        _active: active,
        flow,
        dns: destination.port() == 53,
    };
    Ok((Arc::new(session), reply, finisher))
}

/// Moves every datagram waiting on the upstream session to the client.
fn drain_upstream(session: &Session, up: &UdpSession, reply: &UdpSocket, shared: &Shared) -> bool {
    with_buffer(|buf| {
        loop {
            match up.try_recv(buf) {
                Ok(n) => {
                    if session.dns {
                        shared.pipeline.dns.learn(&buf[..n]);
                    }
                    // Counted before it is sent: once the client has the datagram, the live
                    // counters already include it. A datagram goes whole or not at all.
                    let meter = session.flow.meter();
                    meter.add_tx(n as u64);
                    if SockRef::from(reply).send(&buf[..n]).is_err() {
                        meter.take_back_tx(n as u64);
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

/// Moves every client datagram waiting on the reply socket towards the destination.
fn drain_client(session: &Session, reply: &UdpSocket) -> bool {
    with_buffer(|buf| {
        loop {
            match reply.try_recv(buf) {
                Ok(n) => {
                    session.flow.meter().add_rx(n as u64);
                    session.forward(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    tracing::debug!("udp: {e}");
                    return false;
                }
            }
        }
    })
}

/// Pumps replies to the client and the client's datagrams (which reach the reply socket once
/// it exists) until the session idles out, is closed or evicted.
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
    let ended = async {
        match &session.upstream {
            Some(up) => up.ended().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(ended);
    loop {
        let quiet_until = last.at.load(Ordering::Relaxed) + idle_ms;
        let now = table.now();
        if now >= quiet_until {
            return;
        }
        let deadline = tokio::time::sleep(Duration::from_millis(quiet_until - now));
        let readable_up = async {
            match &session.upstream {
                Some(up) => up.readable().await.map(|()| up),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = flow.close_token().cancelled() => return,
            () = evict.cancelled() => return,
            () = &mut ended => return,
            () = deadline => {}
            r = readable_up => {
                let Ok(up) = r else { return };
                last.answered.store(true, Ordering::Relaxed);
                touch();
                if !drain_upstream(session, up, reply, shared) {
                    return;
                }
            }
            r = reply.readable() => {
                if r.is_err() {
                    return;
                }
                touch();
                if !drain_client(session, reply) {
                    return;
                }
            }
        }
    }
}
