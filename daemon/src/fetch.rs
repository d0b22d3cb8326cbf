//! HTTP(S) requests tpacct makes itself — downloading rule providers, proxy providers and
//! geodata, and delay tests — through any outbound, with a size limit, a deadline, and up to
//! five redirects followed for downloads.

use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;

use crate::outbound::{Outbounds, Target};

/// A request that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: not an http:// or https:// URL")]
    Url(String),
    #[error("{url}: {message}")]
    Failed { url: String, message: String },
    #[error("{0}: timed out")]
    Timeout(String),
}

fn failed(url: &url::Url, message: impl std::fmt::Display) -> Error {
    Error::Failed {
        url: url.to_string(),
        message: message.to_string(),
    }
}

/// One response: status, the time to its headers, and (for GET) the body.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers_after: Duration,
    /// `Location` of a redirect.
    pub location: Option<String>,
    pub body: Bytes,
}

/// What to fetch and how.
#[derive(Debug, Clone)]
pub struct Request_<'a> {
    pub url: &'a url::Url,
    pub method: Method,
    /// The outbound to go through (a proxy or group name).
    pub via: &'a str,
    pub timeout: Duration,
    pub max_body: usize,
    /// Verify the server's certificate (https).
    pub verify: bool,
}

/// Sends one request (no redirects followed).
pub async fn once(outbounds: &Outbounds, r: &Request_<'_>) -> Result<Response, Error> {
    let url = r.url;
    tokio::time::timeout(r.timeout, exchange(outbounds, r))
        .await
        .map_err(|_| Error::Timeout(url.to_string()))?
}

/// GET `url`, following up to five redirects; the body of the final 2xx answer.
pub async fn get(outbounds: &Outbounds, r: &Request_<'_>) -> Result<Bytes, Error> {
    let mut url = r.url.clone();
    for _ in 0..=5 {
        let resp = once(
            outbounds,
            &Request_ {
                url: &url,
                ..r.clone()
            },
        )
        .await?;
        if resp.status.is_success() {
            return Ok(resp.body);
        }
        if !resp.status.is_redirection() {
            return Err(failed(&url, format!("answered {}", resp.status)));
        }
        let location = resp
            .location
            .ok_or_else(|| failed(&url, "redirect without a location"))?;
        url = url
            .join(&location)
            .map_err(|e| failed(&url, format!("redirect to {location}: {e}")))?;
    }
    Err(failed(&url, "too many redirects"))
}

async fn exchange(outbounds: &Outbounds, r: &Request_<'_>) -> Result<Response, Error> {
    let url = r.url;
    let https = match url.scheme() {
        "http" => false,
        "https" => true,
        _ => return Err(Error::Url(url.to_string())),
    };
    let host = url.host_str().ok_or_else(|| Error::Url(url.to_string()))?;
    let port = url
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    let target = match host.trim_matches(['[', ']']).parse() {
        Ok(ip) => Target::Ip(std::net::SocketAddr::new(ip, port)),
        Err(_) => Target::Host(host.to_owned(), port),
    };
    let start = Instant::now();
    let (leaf, _) = outbounds.resolve(r.via).map_err(|e| failed(url, e))?;
    let stream = outbounds
        .dial_tcp(&leaf, &target)
        .await
        .map_err(|e| failed(url, e))?;
    let stream: crate::outbound::Upstream = if https {
        let name =
            crate::tls::server_name(host.trim_matches(['[', ']'])).map_err(|e| failed(url, e))?;
        let tls = crate::tls::connector(!r.verify)
            .connect(name, stream)
            .await
            .map_err(|e| failed(url, format!("TLS: {e}")))?;
        crate::outbound::Upstream::Boxed(Box::new(tls))
    } else {
        stream
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed(url, e))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let authority = match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    let request = Request::builder()
        .method(r.method.clone())
        .uri(if path.is_empty() { "/" } else { path })
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("tpacct/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(url, e))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed(url, e))?;
    let headers_after = start.elapsed();
    let status = response.status();
    let location = response
        .headers()
        .get(hyper::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = if r.method == Method::HEAD {
        Bytes::new()
    } else {
        Limited::new(response.into_body(), r.max_body)
            .collect()
            .await
            .map_err(|e| failed(url, format!("body: {e}")))?
            .to_bytes()
    };
    driver.abort();
    Ok(Response {
        status,
        headers_after,
        location,
        body,
    })
}
