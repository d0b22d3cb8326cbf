//! The TPROXY inbound: TCP and UDP listeners on `tproxy-port` (IPv4 and IPv6) that take
//! redirected traffic, register each connection or session as a flow, and hand it on.

pub mod mixed;
mod sys;
mod tcp;
mod udp;
mod udp_session;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{BindAddress, Config},
    flow::pipeline::Pipeline,
};

/// Inbound name and type as Clash clients show them.
pub const TPROXY_TYPE: &str = "TProxy";
pub const TPROXY_NAME: &str = "DEFAULT-TPROXY";
/// The inbound type as IN-TYPE rules name it.
pub const TPROXY_IN_TYPE: &str = "TPROXY";

/// Errors starting the inbound.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tproxy-port: cannot listen on {addr} ({proto}): {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        source: io::Error,
    },
}

/// What every flow handler needs.
#[derive(Debug)]
struct Shared {
    /// This host's address facing each client (cached routing lookups).
    facing: dashmap::DashMap<IpAddr, IpAddr>,
    pipeline: Arc<Pipeline>,
    udp_idle: Duration,
    udp_max_sessions: usize,
    port: u16,
}

impl Shared {
    /// The inbound address Clash clients see for a flow from `client` that reached `listener`:
    /// this host's own address on the route back to the client (what the client actually
    /// talks to), not the listener's wildcard.
    fn inbound_for(&self, client: SocketAddr, listener: SocketAddr) -> SocketAddr {
        if !listener.ip().is_unspecified() {
            return listener;
        }
        let ip = client.ip();
        if let Some(local) = self.facing.get(&ip) {
            return SocketAddr::new(*local, listener.port());
        }
        let Some(local) = route_source(client) else {
            return listener;
        };
        if self.facing.len() > 4096 {
            self.facing.clear();
        }
        self.facing.insert(ip, local);
        SocketAddr::new(local, listener.port())
    }
}

/// The source address the kernel would use to reach `peer` (a UDP connect sends nothing).
fn route_source(peer: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if peer.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

/// Binds the TPROXY listeners and serves them on `tracker` until `cancel`. Returns the
/// addresses listened on (TCP and UDP share them).
pub fn start(
    config: &Config,
    pipeline: Arc<Pipeline>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Vec<SocketAddr>, Error> {
    if config.tproxy_port == 0 {
        return Ok(Vec::new());
    }
    sys::raise_nofile_limit();
    let port = config.tproxy_port;
    let addrs: Vec<SocketAddr> = match config.bind_address {
        BindAddress::Any => vec![
            (IpAddr::V4(Ipv4Addr::UNSPECIFIED), port).into(),
            (IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into(),
        ],
        BindAddress::One(ip) => vec![(ip, port).into()],
    };
    let shared = Arc::new(Shared {
        facing: dashmap::DashMap::new(),
        pipeline,
        udp_idle: config.udp_idle_timeout.duration(),
        udp_max_sessions: config.udp_max_sessions.get(),
        port,
    });
    let mut bound = Vec::new();
    for addr in addrs {
        // With `*`, a host without IPv6 still serves IPv4.
        let optional = config.bind_address == BindAddress::Any && addr.is_ipv6();
        let listeners = sys::transparent_tcp_listener(addr, 1024)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| Error::Bind {
                addr,
                proto: "tcp",
                source,
            })
            .and_then(|tcp| {
                let udp = sys::transparent_udp_socket(addr)
                    .and_then(tokio::net::UdpSocket::from_std)
                    .map_err(|source| Error::Bind {
                        addr,
                        proto: "udp",
                        source,
                    })?;
                Ok((tcp, udp))
            });
        let (tcp, udp) = match listeners {
            Ok(pair) => pair,
            Err(e) if optional => {
                tracing::warn!("{e}; serving IPv4 only");
                continue;
            }
            Err(e) => return Err(e),
        };
        tracing::info!("tproxy: listening on {addr} (tcp, udp)");
        tracker.spawn(tcp::serve(
            tcp,
            shared.clone(),
            config.max_connections.get(),
            cancel.clone(),
            tracker.clone(),
        ));
        tracker.spawn(udp::serve(
            udp,
            shared.clone(),
            cancel.clone(),
            tracker.clone(),
        ));
        bound.push(addr);
    }
    Ok(bound)
}
