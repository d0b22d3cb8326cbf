//! The HTTP proxy client: `CONNECT host:port` with optional Basic credentials and extra
//! headers, over any stream (plain TCP or TLS to an HTTPS proxy).

use std::io;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest response head accepted from the proxy.
const MAX_HEAD: usize = 16 * 1024;
/// How long the CONNECT exchange may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The CONNECT request for `authority` (`host:port`, IPv6 in brackets).
fn request(authority: &str, auth: Option<(&str, &str)>, headers: &[(String, String)]) -> String {
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some((user, pass)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Opens a tunnel to `authority` through the proxy at the other end of `s`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    authority: &str,
    auth: Option<(&str, &str)>,
    headers: &[(String, String)],
) -> io::Result<()> {
    let exchange = async {
        s.write_all(request(authority, auth, headers).as_bytes())
            .await?;
        s.flush().await?;
        // Byte by byte: nothing after the head may be consumed (it is the tunnel's).
        let mut head = Vec::with_capacity(128);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_HEAD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the proxy's response head is too long",
                ));
            }
            if s.read(&mut byte).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the proxy closed the connection during CONNECT",
                ));
            }
            head.push(byte[0]);
        }
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not an HTTP response: {line:?}"),
                )
            })?;
        match status {
            200..=299 => Ok(()),
            407 => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the HTTP proxy wants (other) credentials: 407",
            )),
            403 => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the HTTP proxy refused the tunnel: {line}"),
            )),
            502..=504 => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the HTTP proxy could not reach the destination: {line}"),
            )),
            _ => Err(io::Error::other(format!("the HTTP proxy answered: {line}"))),
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "HTTP CONNECT timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests_carry_credentials_and_headers() {
        let r = request(
            "example.com:443",
            Some(("u", "p")),
            &[("X-Test".into(), "1".into())],
        );
        assert_eq!(
            r,
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\
             Proxy-Authorization: Basic dTpw\r\nX-Test: 1\r\n\r\n"
        );
    }
}
