//! TPROXY UDP: one session per (client, original destination), each with a socket towards the
//! destination and a reply socket bound to the destination's address, so the client hears
//! back from where it sent. Sessions end after `udp-idle-timeout` without traffic.

use std::{io, net::SocketAddr, sync::Arc};

use dashmap::DashMap;
use tokio::{net::UdpSocket, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Shared, TPROXY_NAME, TPROXY_TYPE, sys};
use crate::registry::{Flow, FlowMeta, Leg, Network};

type Key = (SocketAddr, SocketAddr);

const MAX_DATAGRAM: usize = 65_536;

/// A live session: the socket towards the destination and its flow.
#[derive(Debug)]
struct Session {
    upstream: UdpSocket,
    flow: Arc<Flow>,
}

impl Session {
    /// Sends one client datagram towards the destination.
    async fn forward(&self, data: &[u8]) {
        match self.upstream.send(data).await {
            Ok(n) => self.flow.meter().add_tx(n as u64),
            Err(e) => tracing::debug!("{} udp → {}: {e}", self.flow.id, self.flow.meta.destination),
        }
    }
}

type Sessions = DashMap<Key, Arc<Session>>;

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
    let sessions: Arc<Sessions> = Arc::default();
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
        let existing = sessions.get(&key).map(|s| s.clone());
        let session = match existing {
            Some(s) => s,
            None => match open(&shared, key, inbound).await {
                Ok((session, reply)) => {
                    sessions.insert(key, session.clone());
                    tracker.spawn(run(
                        session.clone(),
                        reply,
                        key,
                        sessions.clone(),
                        shared.clone(),
                        cancel.clone(),
                    ));
                    session
                }
                Err(e) => {
                    tracing::debug!("tproxy udp: {source} → {destination}: {e}");
                    continue;
                }
            },
        };
        session.forward(&buf[..n]).await;
    }
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

/// Pumps replies to the client (and the client's later datagrams, which reach the reply
/// socket once it exists) until the session idles out or is closed.
async fn run(
    session: Arc<Session>,
    reply: UdpSocket,
    key: Key,
    sessions: Arc<Sessions>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let flow = session.flow.clone();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut deadline = Instant::now() + shared.udp_idle;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = flow.close_token().cancelled() => break,
            () = tokio::time::sleep_until(deadline) => break,
            r = session.upstream.readable() => {
                if r.is_err() { break; }
                match session.upstream.try_recv(&mut buf) {
                    Ok(n) => {
                        flow.meter().add_rx(n as u64);
                        if let Err(e) = reply.send(&buf[..n]).await {
                            tracing::debug!("{} udp reply to {}: {e}", flow.id, key.0);
                        }
                        deadline = Instant::now() + shared.udp_idle;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // An ICMP error for an earlier datagram (port unreachable, say).
                    Err(e) => tracing::debug!("{} udp from {}: {e}", flow.id, key.1),
                }
            }
            r = reply.readable() => {
                if r.is_err() { break; }
                match reply.try_recv(&mut buf) {
                    Ok(n) => {
                        session.forward(&buf[..n]).await;
                        deadline = Instant::now() + shared.udp_idle;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => tracing::debug!("{} udp from {}: {e}", flow.id, key.0),
                }
            }
        }
    }
    sessions.remove(&key);
    drop(reply);
    let flow = session.flow.clone();
    drop(session);
    shared.registry.finish(flow).await;
}
