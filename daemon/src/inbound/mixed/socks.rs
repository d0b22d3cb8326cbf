//! The SOCKS server side: SOCKS5 (no auth or username/password, CONNECT and UDP ASSOCIATE,
//! IPv4/IPv6/domain addresses, reply codes from the dial's outcome) and SOCKS4/4a CONNECT.
//! The handshake is read with exact reads, so not a byte of the tunnel is consumed.

use std::{io, net::SocketAddr};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{Ctx, HANDSHAKE_TIMEOUT};
use crate::{
    flow::{FlowMeta, Network, pipeline::Answer},
    outbound,
    proto::socks5::{self as wire, Addr, reply},
};

fn bad(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// A SOCKS5 request after the greeting: what the client asked for, who it is, and the bytes
/// the handshake took each way.
struct Request {
    command: u8,
    addr: Addr,
    user: Option<String>,
    read: u64,
    written: u64,
}

async fn handshake5(
    conn: &mut TcpStream,
    peer: SocketAddr,
    ctx: &Ctx,
) -> io::Result<Option<Request>> {
    let (mut read, mut written) = (0u64, 0u64);
    let mut head = [0u8; 2];
    conn.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    conn.read_exact(&mut methods).await?;
    read += 2 + methods.len() as u64;
    let auth = ctx.access.needs_auth(peer.ip());
    let wanted = if auth { wire::USER_PASS } else { wire::NO_AUTH };
    if !methods.contains(&wanted) {
        conn.write_all(&[wire::VERSION, wire::NO_ACCEPTABLE])
            .await?;
        return Ok(None);
    }
    conn.write_all(&[wire::VERSION, wanted]).await?;
    written += 2;
    let mut user = None;
    if auth {
        let mut ver_len = [0u8; 2];
        conn.read_exact(&mut ver_len).await?;
        let mut name = vec![0u8; usize::from(ver_len[1])];
        conn.read_exact(&mut name).await?;
        let mut plen = [0u8; 1];
        conn.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; usize::from(plen[0])];
        conn.read_exact(&mut pass).await?;
        read += 3 + name.len() as u64 + pass.len() as u64;
        let name = String::from_utf8_lossy(&name);
        let pass = String::from_utf8_lossy(&pass);
        match ctx.access.check(&name, &pass) {
            Some(u) => {
                conn.write_all(&[1, 0]).await?;
                written += 2;
                user = Some(u);
            }
            None => {
                conn.write_all(&[1, 1]).await?;
                tracing::debug!("socks5 {peer}: wrong username or password");
                return Ok(None);
            }
        }
    }
    let mut req = [0u8; 4];
    conn.read_exact(&mut req).await?;
    if req[0] != wire::VERSION {
        return Err(bad("not a SOCKS5 request"));
    }
    // The address: its type, then up to 255 + 2 bytes, read exactly.
    let mut addr = vec![req[3]];
    let more = match req[3] {
        wire::ATYP_V4 => 4 + 2,
        wire::ATYP_V6 => 16 + 2,
        wire::ATYP_DOMAIN => {
            let mut n = [0u8; 1];
            conn.read_exact(&mut n).await?;
            addr.push(n[0]);
            usize::from(n[0]) + 2
        }
        _ => {
            let r = wire::reply_bytes(reply::ADDRESS_NOT_SUPPORTED, &unspecified());
            conn.write_all(&r).await?;
            return Ok(None);
        }
    };
    let start = addr.len();
    addr.resize(start + more, 0);
    conn.read_exact(&mut addr[start..]).await?;
    read += 4 + addr.len() as u64 - 1;
    let (addr, _) = Addr::decode(&addr)
        .map_err(bad)?
        .ok_or_else(|| bad("short address"))?;
    Ok(Some(Request {
        command: req[1],
        addr,
        user,
        read,
        written,
    }))
}

fn unspecified() -> Addr {
    Addr::Ip(SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The reply code for a dial's failure.
fn code(e: &outbound::Error) -> u8 {
    match e {
        outbound::Error::Rejected(_) => reply::NOT_ALLOWED,
        outbound::Error::Timeout(..) => reply::TTL_EXPIRED,
        outbound::Error::Resolve(..) => reply::HOST_UNREACHABLE,
        e => match e.kind() {
            io::ErrorKind::ConnectionRefused => reply::CONNECTION_REFUSED,
            io::ErrorKind::NetworkUnreachable => reply::NETWORK_UNREACHABLE,
            io::ErrorKind::HostUnreachable | io::ErrorKind::TimedOut => reply::HOST_UNREACHABLE,
            io::ErrorKind::PermissionDenied => reply::NOT_ALLOWED,
            _ => reply::GENERAL_FAILURE,
        },
    }
}

/// Answers a SOCKS5 CONNECT after the dial.
struct Answer5(SocketAddr);

impl Answer for Answer5 {
    fn waits(&self) -> bool {
        true
    }

    async fn answer(
        &mut self,
        client: &mut TcpStream,
        outcome: Result<(), &outbound::Error>,
    ) -> io::Result<u64> {
        let bytes = match outcome {
            Ok(()) => wire::reply_bytes(reply::SUCCEEDED, &Addr::Ip(self.0)),
            Err(e) => wire::reply_bytes(code(e), &unspecified()),
        };
        client.write_all(&bytes).await?;
        Ok(bytes.len() as u64)
    }
}

/// Describes a proxy request for the pipeline.
pub(super) fn meta(
    ctx: &Ctx,
    network: Network,
    (clash_type, in_type): (&'static str, &'static str),
    peer: SocketAddr,
    local: SocketAddr,
    addr: &Addr,
    user: Option<String>,
) -> FlowMeta {
    let (ip, host) = match addr {
        Addr::Ip(a) => (Some(a.ip()), None),
        Addr::Domain(h, _) => (None, Some(h.clone())),
    };
    FlowMeta {
        network,
        inbound_type: clash_type,
        in_type,
        inbound_name: ctx.kind.name(),
        source: peer,
        destination_ip: ip,
        destination_port: addr.port(),
        host,
        inbound: local,
        inbound_user: user,
    }
}

pub(super) async fn serve5(mut conn: TcpStream, peer: SocketAddr, ctx: &Ctx) -> io::Result<()> {
    let local = conn.local_addr()?;
    let request = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake5(&mut conn, peer, ctx))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS5 handshake timed out"))??;
    let Some(r) = request else {
        return Ok(());
    };
    match r.command {
        wire::CMD_CONNECT => {
            let meta = meta(
                ctx,
                Network::Tcp,
                ("Socks5", "SOCKS5"),
                peer,
                local,
                &r.addr,
                r.user,
            );
            ctx.pipeline
                .tcp(conn, meta, (r.read, r.written), Answer5(local))
                .await;
            Ok(())
        }
        wire::CMD_UDP_ASSOCIATE => super::udp::associate(conn, peer, local, r.user, ctx).await,
        _ => {
            let reply = wire::reply_bytes(reply::COMMAND_NOT_SUPPORTED, &unspecified());
            conn.write_all(&reply).await
        }
    }
}

/// Answers a SOCKS4 CONNECT after the dial.
struct Answer4;

impl Answer for Answer4 {
    fn waits(&self) -> bool {
        true
    }

    async fn answer(
        &mut self,
        client: &mut TcpStream,
        outcome: Result<(), &outbound::Error>,
    ) -> io::Result<u64> {
        let granted = if outcome.is_ok() { 90 } else { 91 };
        client.write_all(&[0, granted, 0, 0, 0, 0, 0, 0]).await?;
        Ok(8)
    }
}

/// Reads a NUL-terminated field of at most 255 bytes.
async fn field(conn: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        conn.read_exact(&mut b).await?;
        if b[0] == 0 {
            return Ok(out);
        }
        if out.len() == 255 {
            return Err(bad("SOCKS4 field too long"));
        }
        out.push(b[0]);
    }
}

pub(super) async fn serve4(mut conn: TcpStream, peer: SocketAddr, ctx: &Ctx) -> io::Result<()> {
    let local = conn.local_addr()?;
    let read = async {
        let mut head = [0u8; 8];
        conn.read_exact(&mut head).await?;
        let user = field(&mut conn).await?;
        let port = u16::from_be_bytes([head[2], head[3]]);
        let ip = std::net::Ipv4Addr::new(head[4], head[5], head[6], head[7]);
        // SOCKS4a: 0.0.0.x with a name after the user id.
        let (addr, extra) = if ip.octets()[..3] == [0, 0, 0] && ip.octets()[3] != 0 {
            let name = field(&mut conn).await?;
            let n = name.len() as u64 + 1;
            (
                Addr::Domain(String::from_utf8_lossy(&name).to_ascii_lowercase(), port),
                n,
            )
        } else {
            (Addr::Ip(SocketAddr::new(ip.into(), port)), 0)
        };
        Ok::<_, io::Error>((head[1], addr, 8 + user.len() as u64 + 1 + extra))
    };
    let (command, addr, read) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS4 handshake timed out"))??;
    // SOCKS4 has no password: it is refused where credentials are required.
    if command != wire::CMD_CONNECT || ctx.access.needs_auth(peer.ip()) {
        conn.write_all(&[0, 91, 0, 0, 0, 0, 0, 0]).await?;
        return Ok(());
    }
    let meta = meta(
        ctx,
        Network::Tcp,
        ("Socks4", "SOCKS4"),
        peer,
        local,
        &addr,
        None,
    );
    ctx.pipeline.tcp(conn, meta, (read, 0), Answer4).await;
    Ok(())
}
