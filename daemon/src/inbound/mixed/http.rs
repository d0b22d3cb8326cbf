//! The HTTP proxy: `CONNECT host:port` tunnels (answered `200 Connection established`, or a
//! 403/502/504 from the dial's outcome), absolute-form requests (`GET http://host/…`, handed
//! to [`super::plain`]), `Proxy-Authorization` (407 with `Proxy-Authenticate`). The request
//! head is found by peeking and then read exactly, so a client's first tunnel bytes stay in
//! the socket for the relay.

use std::{io, net::SocketAddr};

use base64::Engine;
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream};

use super::{Ctx, HANDSHAKE_TIMEOUT, MAX_HEAD};
use crate::{
    flow::{Network, pipeline::Answer},
    outbound,
    proto::socks5::Addr,
};

/// A parsed request head.
pub(super) struct Head {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Length of the head in bytes.
    pub len: usize,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses a request head at the start of `bytes`: Ok(None) while incomplete.
pub(super) fn parse_head(bytes: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(Head {
            method: req.method.unwrap_or_default().to_owned(),
            target: req.path.unwrap_or_default().to_owned(),
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_vec()))
                .collect(),
            len,
        })),
        Ok(httparse::Status::Partial) if bytes.len() >= MAX_HEAD => {
            Err(format!("request head larger than {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("not an HTTP request: {e}")),
    }
}

/// Peeks until a whole request head is in the socket; it is not consumed.
async fn peek_head(conn: &TcpStream) -> io::Result<Head> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut seen = 0;
    loop {
        let n = conn.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before a request",
            ));
        }
        match parse_head(&buf[..n]) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) if n == seen => {
                // Nothing new yet: wait a little for the rest of the head.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Ok(None) => seen = n,
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// `host:port` → an address.
pub(super) fn authority(text: &str, default_port: u16) -> Option<Addr> {
    let (host, port) = match text.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (text, default_port),
        Some((h, p)) => (h, p.parse().ok()?),
        None => (text, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some(match host.parse() {
        Ok(ip) => Addr::Ip(SocketAddr::new(ip, port)),
        Err(_) => Addr::Domain(host.to_ascii_lowercase(), port),
    })
}

/// The user named by a valid `Proxy-Authorization: Basic …`.
pub(super) fn authorized(ctx: &Ctx, head: &Head) -> Option<String> {
    let value = std::str::from_utf8(head.header("proxy-authorization")?).ok()?;
    let token = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    ctx.access.check(user, pass)
}

pub(super) const NEED_AUTH: &[u8] = b"HTTP/1.1 407 Proxy Authentication Required\r\n\
    Proxy-Authenticate: Basic realm=\"tpacct\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
pub(super) const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Answers a CONNECT after the dial.
struct Connected;

impl Answer for Connected {
    fn waits(&self) -> bool {
        true
    }

    async fn answer(
        &mut self,
        client: &mut TcpStream,
        outcome: Result<(), &outbound::Error>,
    ) -> io::Result<u64> {
        let reply: &[u8] = match outcome {
            Ok(()) => b"HTTP/1.1 200 Connection established\r\n\r\n",
            Err(outbound::Error::Rejected(_)) => {
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                b"HTTP/1.1 504 Gateway Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            }
            Err(_) => b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        };
        client.write_all(reply).await?;
        Ok(reply.len() as u64)
    }
}

pub(super) async fn serve(mut conn: TcpStream, peer: SocketAddr, ctx: &Ctx) -> io::Result<()> {
    let local = conn.local_addr()?;
    let head = match tokio::time::timeout(HANDSHAKE_TIMEOUT, peek_head(&conn)).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            conn.write_all(BAD_REQUEST).await?;
            return Err(e);
        }
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head timed out",
            ));
        }
    };
    let user = match ctx.access.needs_auth(peer.ip()) {
        false => None,
        true => match authorized(ctx, &head) {
            Some(u) => Some(u),
            None => {
                conn.write_all(NEED_AUTH).await?;
                return Ok(());
            }
        },
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let Some(addr) = authority(&head.target, 443) else {
            conn.write_all(BAD_REQUEST).await?;
            return Ok(());
        };
        // Consume exactly the head: what follows belongs to the tunnel.
        let mut skip = vec![0u8; head.len];
        conn.read_exact(&mut skip).await?;
        let meta = super::socks::meta(
            ctx,
            Network::Tcp,
            ("HTTPS", "HTTPS"),
            peer,
            local,
            &addr,
            user,
        );
        ctx.pipeline
            .tcp(conn, meta, (head.len as u64, 0), Connected)
            .await;
        return Ok(());
    }
    super::plain::serve(conn, peer, local, user, ctx).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_authorities() {
        let h =
            parse_head(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\nrest")
                .expect("valid")
                .expect("complete");
        assert_eq!(
            (h.method.as_str(), h.target.as_str()),
            ("CONNECT", "example.com:443")
        );
        assert_eq!(h.len, 59);
        assert!(
            parse_head(b"CONNECT example.com:443 HTTP/1.1\r\nHo")
                .expect("valid")
                .is_none()
        );
        assert!(parse_head(b"\x16\x03\x01 not http\r\n\r\n").is_err());
        assert_eq!(
            authority("example.com:8443", 443),
            Some(Addr::Domain("example.com".into(), 8443))
        );
        assert_eq!(
            authority("[::1]:80", 443),
            Some(Addr::Ip("[::1]:80".parse().expect("addr")))
        );
        assert_eq!(
            authority("10.0.0.1", 80),
            Some(Addr::Ip("10.0.0.1:80".parse().expect("addr")))
        );
        assert_eq!(authority(":80", 443), None);
    }

    #[test]
    fn oversized_heads_are_refused_not_buffered() {
        let mut big = b"GET http://a/ HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert!(parse_head(&big).is_err());
    }
}
