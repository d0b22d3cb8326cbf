//! Delay tests: a real HTTP HEAD through an outbound, timed; one shared history (the latest
//! result per proxy) that `/proxies` reports. A failed test removes the proxy's entry.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ApiError, ApiState, meta};
use crate::{outbound::Direct, route::Outbound, snapshot::rfc3339};

/// The latest delay result per proxy.
#[derive(Debug, Default)]
pub struct History(Mutex<HashMap<String, (SystemTime, u64)>>);

impl History {
    /// `history` as `/proxies` shows it: the latest result, or nothing.
    pub fn of(&self, name: &str) -> Value {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(name) {
            Some((time, delay)) => json!([{ "time": rfc3339(*time), "delay": delay }]),
            None => json!([]),
        }
    }

    fn record(&self, name: &str, result: Option<u64>) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Some(delay) => {
                map.insert(name.to_owned(), (SystemTime::now(), delay));
            }
            None => {
                map.remove(name);
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct DelayQuery {
    url: Option<String>,
    timeout: Option<String>,
    expected: Option<String>,
}

/// A validated test request.
pub(super) struct Test {
    url: url::Url,
    timeout: Duration,
    expected: Vec<(u16, u16)>,
}

/// mihomo's default test URL.
pub(super) const DEFAULT_URL: &str = "https://www.gstatic.com/generate_204";

impl Test {
    /// A health check with mihomo's defaults (its URL, 5 s, any status).
    pub(super) fn default_check() -> Test {
        Test {
            url: url::Url::parse(DEFAULT_URL).unwrap_or_else(|_| unreachable!("a valid URL")),
            timeout: Duration::from_secs(5),
            expected: Vec::new(),
        }
    }
}

impl DelayQuery {
    fn validate(&self) -> Result<Test, ApiError> {
        let raw = self
            .url
            .as_deref()
            .ok_or_else(|| ApiError::bad_request("url: missing"))?;
        let url = url::Url::parse(raw)
            .map_err(|e| ApiError::bad_request(format!("url: `{raw}`: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ApiError::bad_request(format!(
                "url: `{raw}`: test URLs are http:// or https://"
            )));
        }
        if url.host_str().is_none() {
            return Err(ApiError::bad_request(format!("url: `{raw}` has no host")));
        }
        let timeout = match self.timeout.as_deref() {
            Some(t) => t
                .parse::<u64>()
                .ok()
                .filter(|&ms| ms > 0)
                .map(Duration::from_millis)
                .ok_or_else(|| {
                    ApiError::bad_request(format!("timeout: `{t}` is not milliseconds"))
                })?,
            None => return Err(ApiError::bad_request("timeout: missing")),
        };
        let expected = match self.expected.as_deref() {
            None | Some("") => Vec::new(),
            Some(spec) => parse_expected(spec).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "expected: `{spec}` is not a status list like 204 or 200-299/301"
                ))
            })?,
        };
        Ok(Test {
            url,
            timeout,
            expected,
        })
    }
}

/// mihomo's `expected`: status codes and ranges separated by `/`.
fn parse_expected(spec: &str) -> Option<Vec<(u16, u16)>> {
    spec.split('/')
        .map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            (a <= b).then_some((a, b))
        })
        .collect()
}

pub(super) enum Failure {
    Timeout,
    Error(String),
}

/// Mozilla's roots, ring as the crypto provider; built once.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, Failure> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(config.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Failure::Error(format!("TLS setup: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

/// Sends HEAD for `url` over `conn` and returns the response's status code.
async fn head<S>(conn: &mut S, url: &url::Url, host: &str) -> Result<u16, Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let path = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let request = format!(
        "HEAD {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tpacct/{}\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    let io = |e: std::io::Error| Failure::Error(e.to_string());
    conn.write_all(request.as_bytes()).await.map_err(io)?;
    conn.flush().await.map_err(io)?;
    let mut head = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") && head.len() < 1024 {
        match conn.read(&mut byte).await.map_err(io)? {
            1 => head.push(byte[0]),
            _ => {
                return Err(Failure::Error(
                    "connection closed before a status line".into(),
                ));
            }
        }
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Failure::Error(format!("not an HTTP status line: {line:?}")))
}

/// One timed HEAD request through DIRECT (TLS for https).
async fn measure(direct: &Direct, test: &Test) -> Result<u64, Failure> {
    let start = Instant::now();
    let run = async {
        let host = test.url.host_str().unwrap_or_default();
        let port = test.url.port_or_known_default().unwrap_or(80);
        let addr: SocketAddr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Failure::Error(format!("resolving {host}: {e}")))?
            .next()
            .ok_or_else(|| Failure::Error(format!("{host} has no address")))?;
        let mut conn = direct
            .connect_tcp(addr)
            .await
            .map_err(|e| Failure::Error(e.to_string()))?;
        let status = if test.url.scheme() == "https" {
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| Failure::Error(format!("{host}: {e}")))?;
            let mut tls = tokio_rustls::TlsConnector::from(tls_config()?)
                .connect(name, conn)
                .await
                .map_err(|e| Failure::Error(format!("TLS with {host}: {e}")))?;
            head(&mut tls, &test.url, host).await?
        } else {
            head(&mut conn, &test.url, host).await?
        };
        if !test.expected.is_empty()
            && !test
                .expected
                .iter()
                .any(|(a, b)| (*a..=*b).contains(&status))
        {
            return Err(Failure::Error(format!("status {status} was not expected")));
        }
        Ok(start.elapsed().as_millis() as u64)
    };
    match tokio::time::timeout(test.timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout),
    }
}

/// Tests `name` (a group: its selection), records the result under `name`.
async fn test_proxy(state: &ApiState, name: &str, test: &Test) -> Result<u64, Failure> {
    let leaf = meta::resolve(state, name);
    let result = match Outbound::from_name(&leaf) {
        Some(Outbound::Direct) => measure(&state.direct, test).await,
        _ => Err(Failure::Error(format!("{leaf} rejects every connection"))),
    };
    state.delays.record(name, result.as_ref().ok().copied());
    result
}

fn failure(f: Failure) -> ApiError {
    match f {
        Failure::Timeout => ApiError(StatusCode::GATEWAY_TIMEOUT, "Timeout".into()),
        Failure::Error(e) => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("An error occurred in the delay test: {e}"),
        ),
    }
}

pub(super) async fn proxy(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<DelayQuery>,
) -> Result<Json<Value>, ApiError> {
    meta::exists(&state, &name)?;
    let test = q.validate()?;
    let delay = test_proxy(&state, &name, &test).await.map_err(failure)?;
    Ok(Json(json!({ "delay": delay })))
}

/// Tests every member of a group at once; answers the ones that succeeded.
pub(super) async fn group(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<DelayQuery>,
) -> Result<Json<Value>, ApiError> {
    let members = meta::members(&state, &name)?;
    let test = q.validate()?;
    let mut out = serde_json::Map::new();
    for (member, result) in members.iter().zip(test_all(&state, &members, &test).await) {
        if let Ok(delay) = result {
            out.insert(member.clone(), json!(delay));
        }
    }
    Ok(Json(Value::Object(out)))
}

/// Tests each of `names` at once, recording every result.
pub(super) async fn test_all(
    state: &ApiState,
    names: &[String],
    test: &Test,
) -> Vec<Result<u64, Failure>> {
    futures_util::future::join_all(names.iter().map(|m| test_proxy(state, m, test))).await
}
