//! TPROXY TCP: the accept loop (connection limit, back-off when out of descriptors); each
//! connection is described and handed to the flow pipeline.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use futures_util::FutureExt;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Shared, TPROXY_IN_TYPE, TPROXY_NAME, TPROXY_TYPE};
use crate::{
    flow::{FlowMeta, Network, pipeline::Transparent},
    relay,
};

/// Back-off after accept fails for want of descriptors.
const FD_BACKOFF: Duration = Duration::from_millis(100);

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
                if let Some(flow) = handle(client, source, inbound, &shared) {
                    // Mapped, not awaited in a block, which would hold the flow twice.
                    tracker.spawn(flow.map(move |()| drop(permit)));
                }
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

/// Describes an accepted connection; the flow to spawn, unless it is refused.
fn handle(
    client: TcpStream,
    source: SocketAddr,
    inbound: SocketAddr,
    shared: &Shared,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let destination = client.local_addr().ok()?;
    if is_self(destination, shared.port) {
        tracing::debug!("tproxy tcp: {source} connected to the proxy port itself; refused");
        relay::reset(&client);
        return None;
    }
    let meta = FlowMeta {
        network: Network::Tcp,
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
    Some(shared.pipeline.tcp(client, meta, (0, 0), Transparent))
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
