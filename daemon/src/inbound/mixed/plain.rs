//! Plain HTTP proxying: absolute-form requests (`GET http://host/path`) forwarded with the
//! hop-by-hop headers removed, bodies framed by `Content-Length` or chunked encoding, and
//! keep-alive on both sides. Each request is its own flow with its own host (its socket is
//! shared, so it is counted by the bytes relayed for it: request head and body up, response
//! head and body down).

use std::{io, net::SocketAddr};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    Ctx, HANDSHAKE_TIMEOUT, MAX_HEAD,
    http::{BAD_REQUEST, Head, NEED_AUTH, authority, authorized, parse_head},
};
use crate::{
    flow::{Flow, Network},
    outbound::{Kind, Target, Upstream},
    proto::socks5::Addr,
};

/// How long a kept-alive client connection may wait for its next request.
const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(60);

/// Headers that concern one hop only (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
];

/// A stream with a read buffer allocated once.
struct Buffered<S> {
    inner: S,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Buffered<S> {
    fn new(inner: S) -> Buffered<S> {
        Buffered {
            inner,
            buf: vec![0; MAX_HEAD],
            start: 0,
            end: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more; false at EOF.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        let n = self.inner.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }

    /// The next head (request or response, by `parse`); None on a clean EOF before one.
    async fn head<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Result<Option<T>, String>,
    ) -> io::Result<Option<T>> {
        loop {
            match parse(self.data()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
                Some(h) => return Ok(Some(h)),
                None => {
                    if !self.fill().await? {
                        return if self.data().is_empty() {
                            Ok(None)
                        } else {
                            Err(io::ErrorKind::UnexpectedEof.into())
                        };
                    }
                }
            }
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n.min(self.end - self.start);
    }

    /// One CRLF-terminated line (for chunk sizes), consumed; at most 4 KiB.
    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.data().windows(2).position(|w| w == b"\r\n") {
                let line = self.data()[..i].to_vec();
                self.consume(i + 2);
                return Ok(line);
            }
            if self.data().len() > 4096 || !self.fill().await? {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunk line"));
            }
        }
    }

    /// Copies exactly `n` bytes to `to` (or, with `n` None, until EOF); returns bytes copied.
    async fn copy(
        &mut self,
        n: Option<u64>,
        to: &mut (impl AsyncWrite + Unpin),
    ) -> io::Result<u64> {
        let mut left = n.unwrap_or(u64::MAX);
        let mut copied = 0;
        while left > 0 {
            if self.data().is_empty() && !self.fill().await? {
                return match n {
                    None => Ok(copied),
                    Some(_) => Err(io::ErrorKind::UnexpectedEof.into()),
                };
            }
            let take = (self.data().len() as u64).min(left) as usize;
            to.write_all(&self.data()[..take]).await?;
            self.consume(take);
            left -= take as u64;
            copied += take as u64;
        }
        Ok(copied)
    }
}

/// How a message's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn framing(headers: &[(String, Vec<u8>)], response: bool) -> Result<Body, String> {
    if header(headers, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().ends_with(b"chunked"))
    {
        return Ok(Body::Chunked);
    }
    match header(headers, "content-length") {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Body::Length)
            .ok_or_else(|| "bad Content-Length".to_owned()),
        None if response => Ok(Body::UntilClose),
        None => Ok(Body::None),
    }
}

/// Copies a body framed as `body`; returns the bytes copied.
async fn copy_body<S: AsyncRead + AsyncWrite + Unpin>(
    from: &mut Buffered<S>,
    to: &mut (impl AsyncWrite + Unpin),
    body: Body,
) -> io::Result<u64> {
    match body {
        Body::None => Ok(0),
        Body::Length(n) => from.copy(Some(n), to).await,
        Body::UntilClose => from.copy(None, to).await,
        Body::Chunked => {
            let mut total = 0;
            loop {
                let line = from.line().await?;
                to.write_all(&line).await?;
                to.write_all(b"\r\n").await?;
                total += line.len() as u64 + 2;
                let size = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| u64::from_str_radix(l.split(';').next()?.trim(), 16).ok())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        let t = from.line().await?;
                        to.write_all(&t).await?;
                        to.write_all(b"\r\n").await?;
                        total += t.len() as u64 + 2;
                        if t.is_empty() {
                            return Ok(total);
                        }
                    }
                }
                total += from.copy(Some(size + 2), to).await?;
            }
        }
    }
}

/// A response head.
struct Response {
    status: u16,
    close: bool,
    headers: Vec<(String, Vec<u8>)>,
    len: usize,
}

fn parse_response(bytes: &[u8]) -> Result<Option<Response>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => {
            let headers: Vec<(String, Vec<u8>)> = r
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_vec()))
                .collect();
            let close = r.version == Some(0)
                || header(&headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
            Ok(Some(Response {
                status: r.code.unwrap_or(0),
                close,
                headers,
                len,
            }))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(format!("not an HTTP response: {e}")),
    }
}

/// The request head as forwarded: origin-form target, hop-by-hop headers gone, `Host` set.
fn forwarded(head: &Head, path: &str, host: &str) -> Vec<u8> {
    let connection_listed: Vec<String> = header(&head.headers, "connection")
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect()
        })
        .unwrap_or_default();
    let mut out = format!("{} {path} HTTP/1.1\r\n", head.method).into_bytes();
    if header(&head.headers, "host").is_none() {
        out.extend(format!("Host: {host}\r\n").as_bytes());
    }
    for (k, v) in &head.headers {
        let lower = k.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) || connection_listed.contains(&lower) {
            continue;
        }
        out.extend(k.as_bytes());
        out.extend(b": ");
        out.extend(v);
        out.extend(b"\r\n");
    }
    out.extend(b"\r\n");
    out
}

pub(super) async fn serve(
    conn: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    user: Option<String>,
    ctx: &Ctx,
) -> io::Result<()> {
    let mut client = Buffered::new(conn);
    let mut upstream: Option<(Target, Buffered<Upstream>)> = None;
    // Counts the upstream connection among its leaf's active flows while it is kept.
    let mut _active: Option<crate::outbound::Active> = None;
    let mut first = true;
    loop {
        let wait = if first { HANDSHAKE_TIMEOUT } else { KEEP_ALIVE };
        let head = match tokio::time::timeout(wait, client.head(parse_head)).await {
            Ok(Ok(Some(h))) => h,
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) => {
                let _ = client.inner.write_all(BAD_REQUEST).await;
                return Err(e);
            }
        };
        // Credentials were checked on the first request; later ones must carry them too.
        if !first && ctx.access.needs_auth(peer.ip()) && authorized(ctx, &head).is_none() {
            client.inner.write_all(NEED_AUTH).await?;
            return Ok(());
        }
        first = false;
        let Ok(url) = url::Url::parse(&head.target) else {
            client.inner.write_all(BAD_REQUEST).await?;
            return Ok(());
        };
        let (Some(host), "http") = (url.host_str(), url.scheme()) else {
            client.inner.write_all(BAD_REQUEST).await?;
            return Ok(());
        };
        let Some(addr) = authority(&format!("{host}:{}", url.port().unwrap_or(80)), 80) else {
            client.inner.write_all(BAD_REQUEST).await?;
            return Ok(());
        };
        let path = &url[url::Position::BeforePath..url::Position::AfterQuery];
        let request_close = header(&head.headers, "connection")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"close"))
            || header(&head.headers, "proxy-connection")
                .is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
        let request_body = framing(&head.headers, false)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let meta = super::socks::meta(
            ctx,
            Network::Tcp,
            ("HTTP", "HTTP"),
            peer,
            local,
            &addr,
            user.clone(),
        );
        if !ctx.pipeline.admit() {
            client
                .inner
                .write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            return Ok(());
        }
        let (flow, finisher, route, routing) = ctx.pipeline.request(meta).await;
        let target = match &addr {
            Addr::Ip(a) => Target::Ip(*a),
            Addr::Domain(h, p) => Target::Host(h.clone(), *p),
        };
        if matches!(
            route.leaf.kind,
            Kind::Reject | Kind::RejectDrop | Kind::Pass | Kind::Compatible
        ) {
            client
                .inner
                .write_all(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            finisher.finish().await;
            return Ok(());
        }
        // One upstream connection per host, kept while the client keeps its connection.
        if upstream.as_ref().is_none_or(|(t, _)| *t != target) {
            let dialed = tokio::select! {
                r = routing.outbounds.connect(&route.chains, &route.leaf, &target) => r,
                () = flow.close_token().cancelled() => return Ok(()),
            };
            match dialed {
                Ok((up, active)) => {
                    if let Some(a) = up.peer_addr() {
                        flow.set_dialed(a);
                    }
                    upstream = Some((target.clone(), Buffered::new(up)));
                    _active = Some(active);
                }
                Err(e) => {
                    tracing::debug!("{} http → {target}: {e}", flow.id);
                    client.inner.write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
                    finisher.finish().await;
                    return Ok(());
                }
            }
        }
        let Some((_, up)) = upstream.as_mut() else {
            return Ok(());
        };
        let exchange = exchange(&mut client, up, &head, path, host, request_body, &flow);
        let outcome = tokio::select! {
            r = exchange => r,
            () = flow.close_token().cancelled() => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "closed on demand")),
        };
        finisher.finish().await;
        match outcome {
            Ok(keep) if keep && !request_close => {}
            Ok(_) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Forwards one request and its response; returns whether both sides keep the connection.
async fn exchange(
    client: &mut Buffered<TcpStream>,
    up: &mut Buffered<Upstream>,
    head: &Head,
    path: &str,
    host: &str,
    request_body: Body,
    flow: &Flow,
) -> io::Result<bool> {
    let meter = flow.meter();
    up.inner.write_all(&forwarded(head, path, host)).await?;
    client.consume(head.len);
    meter.add_rx(head.len as u64);
    let sent = copy_body(client, &mut up.inner, request_body).await?;
    meter.add_rx(sent);
    up.inner.flush().await?;
    let response = up.head(parse_response).await?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "upstream closed before a response",
        )
    })?;
    let response_head = up.data()[..response.len].to_vec();
    up.consume(response.len);
    client.inner.write_all(&response_head).await?;
    meter.add_tx(response_head.len() as u64);
    let body = if head.method.eq_ignore_ascii_case("HEAD")
        || matches!(response.status, 100..=199 | 204 | 304)
    {
        Body::None
    } else {
        framing(&response.headers, true)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
    };
    let received = copy_body(up, &mut client.inner, body).await?;
    meter.add_tx(received);
    client.inner.flush().await?;
    Ok(!response.close && body != Body::UntilClose)
}
