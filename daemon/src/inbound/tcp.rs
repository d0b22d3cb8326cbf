//! TPROXY TCP: the accept loop (connection limit, back-off when out of descriptors) and the
//! per-connection handler (register, dial, sniff, relay, finish).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Shared, TPROXY_NAME, TPROXY_TYPE};
use crate::{
    registry::{Flow, FlowMeta, Leg, Network},
    relay,
    route::Outbound,
    sniff::{self, Sniffed},
};

/// Back-off after accept fails for want of descriptors.
const FD_BACKOFF: Duration = Duration::from_millis(100);
/// How long sniffing may wait for the rest of a split ClientHello or request head.
const SNIFF_WAIT: Duration = Duration::from_millis(100);

pub(super) async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let inbound = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("tproxy tcp: {e}");
            return;
        }
    };
    let limit = Arc::new(Semaphore::new(max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, source)) => {
                let shared = shared.clone();
                tracker.spawn(async move {
                    handle(client, source, inbound, &shared).await;
                    drop(permit);
                });
            }
            Err(e) if is_out_of_fds(&e) => {
                tracing::warn!("tproxy tcp: accept: {e}; pausing {FD_BACKOFF:?}");
                tokio::time::sleep(FD_BACKOFF).await;
            }
            Err(e) => tracing::debug!("tproxy tcp: accept: {e}"),
        }
    }
}

fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

async fn handle(client: TcpStream, source: SocketAddr, inbound: SocketAddr, shared: &Shared) {
    let Ok(destination) = client.local_addr() else {
        return;
    };
    if is_self(destination, shared.port) {
        tracing::debug!("tproxy tcp: {source} connected to the proxy port itself; refused");
        relay::reset(&client);
        return;
    }
    let accounting = shared.registry.accounting();
    let tracked = match accounting.track(&client) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("tproxy tcp: {source} → {destination}: {e}");
            return;
        }
    };
    let meta = FlowMeta {
        network: Network::Tcp,
        inbound_type: TPROXY_TYPE,
        inbound_name: TPROXY_NAME.to_owned(),
        source,
        destination,
        inbound: shared.inbound_for(source, inbound),
        route: shared.router.route(),
    };
    let reject = meta.route.outbound == Outbound::Reject;
    let flow = shared.registry.open(meta, tracked, Leg::Client);
    if reject {
        relay::reset(&client);
        drop(client);
        shared.registry.finish(flow).await;
        return;
    }
    let dialed = tokio::select! {
        r = shared.direct.connect_tcp(destination) => Some(r),
        () = flow.close_token().cancelled() => None,
    };
    match dialed {
        Some(Ok(upstream)) => {
            if let Ok(addr) = upstream.peer_addr() {
                flow.set_dialed(addr);
            }
            let opts = relay::Options {
                client_meter: flow.meter().clone(),
                cancel: flow.close_token().clone(),
                idle: shared.tcp_idle,
                activity: || {
                    let t = shared.registry.traffic(&flow);
                    t.upload + t.download
                },
            };
            let port = destination.port();
            let (tls, http) = (shared.sniff.tls_on(port), shared.sniff.http_on(port));
            let end = relay::tcp(
                &client,
                &upstream,
                opts,
                sniff_client(&client, &flow, tls, http),
            )
            .await;
            tracing::debug!("{} {source} → {destination}: {end:?}", flow.id);
        }
        Some(Err(e)) => {
            tracing::debug!("{} {source} → {destination}: {e}", flow.id);
            relay::reset(&client);
        }
        None => {}
    }
    drop(client);
    shared.registry.finish(flow).await;
}

/// Peeks at the client's first bytes (without consuming them) for a TLS SNI or HTTP Host.
async fn sniff_client(client: &TcpStream, flow: &Flow, tls: bool, http: bool) {
    if !tls && !http {
        return;
    }
    let mut buf = vec![0u8; 8192];
    let mut deadline = None;
    loop {
        let n = match client.peek(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ => return,
        };
        match sniff::sniff(&buf[..n], tls, http) {
            Sniffed::Host(host) => return flow.set_sniffed_host(host),
            Sniffed::No => return,
            Sniffed::Incomplete => {
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + SNIFF_WAIT);
                if n == buf.len() || Instant::now() >= deadline {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}

/// A connection made to the proxy port of this host itself (not redirected): relaying it
/// would connect back to ourselves forever.
fn is_self(destination: SocketAddr, port: u16) -> bool {
    if destination.port() != port {
        return false;
    }
    let ip = destination.ip();
    ip.is_loopback() || ip.is_unspecified() || is_local(ip)
}

/// Whether `ip` is one of this host's addresses: only those can be bound without
/// IP_TRANSPARENT (two syscalls, no interface listing; with `net.ipv4.ip_nonlocal_bind` set
/// every address binds, and a redirected connection to another host's port `tproxy-port` is
/// refused rather than looped).
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
