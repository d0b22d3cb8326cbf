//! The proxy inbounds: `mixed-port` (HTTP and SOCKS on one port, told apart by the first
//! byte), `port` (HTTP) and `socks-port` (SOCKS5 and SOCKS4). They accept, check who may use
//! them (`allow-lan`, `lan-allowed-ips`, `lan-disallowed-ips`, `authentication`,
//! `skip-auth-prefixes`), read the client's request within a deadline and a size bound, and
//! hand each tunnel or request to the flow pipeline — registered once, counted once.

mod http;
mod plain;
#[cfg(test)]
mod props;
mod socks;
mod udp;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::Error;
use crate::{
    config::{BindAddress, Config},
    flow::pipeline::Pipeline,
};

/// How long a client may take to send its request (greeting, auth, CONNECT or request head).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request head accepted.
pub const MAX_HEAD: usize = 64 * 1024;

/// Which protocols a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mixed,
    Http,
    Socks,
}

impl Kind {
    /// The inbound name mihomo gives it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mixed => "DEFAULT-MIXED",
            Kind::Http => "DEFAULT-HTTP",
            Kind::Socks => "DEFAULT-SOCKS",
        }
    }
}

/// Who may use the proxy ports, and with which credentials.
#[derive(Debug)]
pub(crate) struct Access {
    allow_lan: bool,
    allowed: Vec<IpNet>,
    disallowed: Vec<IpNet>,
    users: Vec<(String, String)>,
    skip_auth: Vec<IpNet>,
}

impl Access {
    fn from(config: &Config) -> Access {
        Access {
            allow_lan: config.allow_lan,
            allowed: config.lan_allowed_ips.clone(),
            disallowed: config.lan_disallowed_ips.clone(),
            users: config
                .authentication
                .iter()
                .filter_map(|e| e.split_once(':'))
                .map(|(u, p)| (u.to_owned(), p.to_owned()))
                .collect(),
            skip_auth: config.skip_auth_prefixes.clone(),
        }
    }

    /// Whether a client at `ip` may connect at all.
    fn admits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if ip.is_loopback() {
            return true;
        }
        self.allow_lan
            && self.allowed.iter().any(|n| n.contains(&ip))
            && !self.disallowed.iter().any(|n| n.contains(&ip))
    }

    /// Whether a client at `ip` must give credentials.
    pub(crate) fn needs_auth(&self, ip: IpAddr) -> bool {
        !self.users.is_empty() && !self.skip_auth.iter().any(|n| n.contains(&ip))
    }

    /// The user these credentials belong to.
    pub(crate) fn check(&self, user: &str, pass: &str) -> Option<String> {
        self.users
            .iter()
            .find(|(u, p)| {
                bool::from(subtle::ConstantTimeEq::ct_eq(u.as_bytes(), user.as_bytes()))
                    & bool::from(subtle::ConstantTimeEq::ct_eq(p.as_bytes(), pass.as_bytes()))
            })
            .map(|(u, _)| u.clone())
    }
}

/// What every proxy connection needs.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub kind: Kind,
    pub pipeline: Arc<Pipeline>,
    pub access: Access,
    pub udp_idle: Duration,
    pub cancel: CancellationToken,
    pub tracker: TaskTracker,
}

/// Binds the proxy ports the config turns on; returns (kind, address) for each listener.
pub fn start(
    config: &Config,
    pipeline: Arc<Pipeline>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Vec<(Kind, SocketAddr)>, Error> {
    let mut bound = Vec::new();
    for (kind, port) in [
        (Kind::Mixed, config.mixed_port),
        (Kind::Http, config.port),
        (Kind::Socks, config.socks_port),
    ] {
        if port == 0 {
            continue;
        }
        let ips: Vec<IpAddr> = match (config.allow_lan, config.bind_address) {
            // Without allow-lan only this host may connect: listen on loopback.
            (false, _) => vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
            (true, BindAddress::Any) => {
                vec![Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()]
            }
            (true, BindAddress::One(ip)) => vec![ip],
        };
        let ctx = Arc::new(Ctx {
            kind,
            pipeline: pipeline.clone(),
            access: Access::from(config),
            udp_idle: config.udp_idle_timeout.duration(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        });
        for ip in ips {
            let addr = SocketAddr::new(ip, port);
            let listener = match listen(addr) {
                Ok(l) => l,
                // A host without IPv6 still serves IPv4.
                Err(e) if ip.is_ipv6() => {
                    tracing::warn!("{}: {addr}: {e}; IPv4 only", kind.name());
                    continue;
                }
                Err(source) => {
                    return Err(Error::Bind {
                        addr,
                        proto: "tcp",
                        source,
                    });
                }
            };
            tracing::info!("{}: listening on {addr}", kind.name());
            tracker.spawn(serve(listener, ctx.clone()));
            bound.push((kind, addr));
        }
    }
    Ok(bound)
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn serve(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let accepted = tokio::select! {
            () = ctx.cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((conn, peer)) => {
                let ctx2 = ctx.clone();
                ctx.tracker.spawn(async move {
                    if let Err(e) = handle(conn, peer, &ctx2).await {
                        tracing::debug!("{} {peer}: {e}", ctx2.kind.name());
                    }
                });
            }
            Err(e) => {
                tracing::debug!("{}: accept: {e}", ctx.kind.name());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The first byte tells the protocol apart: 5 SOCKS5, 4 SOCKS4, anything else HTTP.
async fn handle(conn: TcpStream, peer: SocketAddr, ctx: &Ctx) -> io::Result<()> {
    if !ctx.access.admits(peer.ip()) {
        tracing::debug!(
            "{}: {peer} is not allowed (allow-lan, lan-allowed-ips)",
            ctx.kind.name()
        );
        return Ok(());
    }
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.peek(&mut first))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    if n == 0 {
        return Ok(());
    }
    match (ctx.kind, first[0]) {
        (Kind::Socks | Kind::Mixed, 5) => socks::serve5(conn, peer, ctx).await,
        (Kind::Socks | Kind::Mixed, 4) => socks::serve4(conn, peer, ctx).await,
        (Kind::Http | Kind::Mixed, _) => http::serve(conn, peer, ctx).await,
        (Kind::Socks, b) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not SOCKS (first byte {b:#x})"),
        )),
    }
}
