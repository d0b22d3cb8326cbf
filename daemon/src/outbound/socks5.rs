//! The SOCKS5 client: greeting (no auth or username/password), CONNECT over any stream, and
//! UDP ASSOCIATE (the association lives as long as its control connection).

use std::{io, net::SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::proto::socks5::{self as wire, Addr};

/// How long the handshake with the proxy may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn proto_error(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// A failure the proxy reported for a request.
fn reply_error(code: u8) -> io::Error {
    use wire::reply::*;
    let (kind, what) = match code {
        NOT_ALLOWED => (
            io::ErrorKind::PermissionDenied,
            "not allowed by the ruleset",
        ),
        NETWORK_UNREACHABLE => (io::ErrorKind::NetworkUnreachable, "network unreachable"),
        HOST_UNREACHABLE => (io::ErrorKind::HostUnreachable, "host unreachable"),
        CONNECTION_REFUSED => (io::ErrorKind::ConnectionRefused, "connection refused"),
        TTL_EXPIRED => (io::ErrorKind::TimedOut, "TTL expired"),
        COMMAND_NOT_SUPPORTED => (io::ErrorKind::Unsupported, "command not supported"),
        ADDRESS_NOT_SUPPORTED => (io::ErrorKind::Unsupported, "address type not supported"),
        _ => (io::ErrorKind::Other, "general failure"),
    };
    io::Error::new(kind, format!("the SOCKS5 proxy answered: {what} ({code})"))
}

/// Greets the proxy and authenticates if it asks for it.
async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    auth: Option<(&str, &str)>,
) -> io::Result<()> {
    let methods: &[u8] = if auth.is_some() {
        &[wire::NO_AUTH, wire::USER_PASS]
    } else {
        &[wire::NO_AUTH]
    };
    let mut hello = vec![wire::VERSION, methods.len() as u8];
    hello.extend(methods);
    s.write_all(&hello).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    if choice[0] != wire::VERSION {
        return Err(proto_error("not a SOCKS5 proxy"));
    }
    match (choice[1], auth) {
        (wire::NO_AUTH, _) => Ok(()),
        (wire::USER_PASS, Some((user, pass))) => {
            let (u, p) = (user.as_bytes(), pass.as_bytes());
            if u.len() > 255 || p.len() > 255 {
                return Err(proto_error(
                    "username and password must be at most 255 bytes",
                ));
            }
            let mut req = vec![1, u.len() as u8];
            req.extend(u);
            req.push(p.len() as u8);
            req.extend(p);
            s.write_all(&req).await?;
            let mut status = [0u8; 2];
            s.read_exact(&mut status).await?;
            if status[1] != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the SOCKS5 proxy refused the username and password",
                ));
            }
            Ok(())
        }
        (wire::USER_PASS, None) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the SOCKS5 proxy wants a username and password",
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the SOCKS5 proxy accepts none of our authentication methods",
        )),
    }
}

/// Sends a request and reads the reply's bound address.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    command: u8,
    addr: &Addr,
) -> io::Result<Addr> {
    let mut req = vec![wire::VERSION, command, 0];
    addr.encode(&mut req);
    s.write_all(&req).await?;
    let mut head = [0u8; 3];
    s.read_exact(&mut head).await?;
    if head[0] != wire::VERSION {
        return Err(proto_error("not a SOCKS5 reply"));
    }
    if head[1] != wire::reply::SUCCEEDED {
        return Err(reply_error(head[1]));
    }
    // The bound address: ATYP, then up to 255 + 2 bytes.
    let mut buf = Vec::with_capacity(32);
    let mut byte = [0u8; 1];
    loop {
        s.read_exact(&mut byte).await?;
        buf.push(byte[0]);
        match Addr::decode(&buf).map_err(proto_error)? {
            Some((bound, _)) => return Ok(bound),
            None if buf.len() > 262 => return Err(proto_error("reply address too long")),
            None => {}
        }
    }
}

/// CONNECT to `addr` over `s` (a connection to the proxy).
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    auth: Option<(&str, &str)>,
    addr: &Addr,
) -> io::Result<()> {
    let handshake = async {
        greet(s, auth).await?;
        request(s, wire::CMD_CONNECT, addr).await.map(drop)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS5 handshake timed out"))?
}

/// UDP ASSOCIATE over `s`: the address datagrams go to. A reply of the unspecified address
/// means "the proxy's own address" (`proxy`).
pub async fn associate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    auth: Option<(&str, &str)>,
    proxy: SocketAddr,
) -> io::Result<SocketAddr> {
    let handshake = async {
        greet(s, auth).await?;
        let any = Addr::Ip(SocketAddr::new(
            if proxy.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            0,
        ));
        request(s, wire::CMD_UDP_ASSOCIATE, &any).await
    };
    let bound = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "SOCKS5 handshake timed out"))??;
    match bound {
        Addr::Ip(a) if a.ip().is_unspecified() => Ok(SocketAddr::new(proxy.ip(), a.port())),
        Addr::Ip(a) => Ok(a),
        Addr::Domain(..) => Err(proto_error("the proxy bound UDP to a name")),
    }
}
