//! Helpers for the controller tests: the router over user-space accounting (called with
//! `oneshot`, or served on a loopback port), requests, and the mihomo captures the answers are
//! compared with key by key and type by type.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, header},
};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tpacct::{
    accounting::Accounting,
    api::{ApiState, router},
    config::{AccountingMode, AccountingSettings, Config},
    flow::{RouteInfo, pipeline::Pipeline},
    registry::{FlowMeta, Leg, Network, Registry},
    route, speed,
};

pub struct Api {
    pub router: Router,
    pub registry: Arc<Registry>,
    pub state: Arc<ApiState>,
    // Kept alive: the flow's socket pair.
    pub sockets: Vec<tokio::net::TcpStream>,
}

/// A fresh state directory for one test's daemon parts.
pub fn state_dir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = super::scratch::path(&format!("{tag}-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The controller over user-space accounting, with `config`'s routing.
pub async fn api_with(config: Config) -> Api {
    let accounting = Accounting::start(
        &AccountingSettings::with_mode(AccountingMode::Userspace),
        &CancellationToken::new(),
        &TaskTracker::new(),
    )
    .expect("userspace accounting");
    let registry = Arc::new(Registry::new(accounting, 10));
    let (rates, sampler) = speed::start(registry.clone(), CancellationToken::new());
    // Runs as long as the test's runtime: `/traffic` follows it.
    tokio::spawn(sampler);
    let dir = state_dir("api");
    let routing = route::build(&config, &dir, Default::default())
        .await
        .expect("routing");
    let pipeline = Arc::new(Pipeline {
        registry: registry.clone(),
        router: route::Router::new(config.mode, routing),
        dns: Arc::default(),
        tcp_idle: None,
        hooks: Default::default(),
        processes: Arc::new(tpacct::process::Finder::new(config.find_process_mode, None)),
        killswitch: Arc::new(tpacct::killswitch::KillSwitch::new(
            &config,
            tpacct::memory::Memory::Rss,
        )),
    });
    let state = ApiState::new(registry.clone(), rates, &config, pipeline, dir);
    Api {
        router: router(state.clone()),
        registry,
        state,
        sockets: Vec::new(),
    }
}

/// The controller with the built-in routing and `secret`.
pub async fn api(secret: &str) -> Api {
    api_with(Config {
        secret: Some(secret.to_owned()),
        ..Config::default()
    })
    .await
}

/// Registers one TCP flow over a real loopback socket pair, with 1234 B up and 5678 B down.
pub async fn with_flow(api: &mut Api) -> uuid::Uuid {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (client, (server, source)) = (client.expect("connect"), accepted.expect("accept"));
    let tracked = api.registry.accounting().track(&server).expect("track");
    tracked.meter().add_rx(1234);
    tracked.meter().add_tx(5678);
    let destination: SocketAddr = "93.184.216.34:443".parse().expect("addr");
    let flow = api.registry.open(
        FlowMeta {
            network: Network::Tcp,
            inbound_type: "TProxy",
            in_type: "TPROXY",
            inbound_name: "DEFAULT-TPROXY",
            source,
            destination_ip: Some(destination.ip()),
            destination_port: destination.port(),
            host: None,
            inbound: "10.0.0.1:7893".parse().expect("addr"),
            inbound_user: None,
        },
        tracked,
        Leg::Client,
    );
    flow.set_route(RouteInfo {
        rule: "Match",
        payload: String::new(),
        chains: vec!["DIRECT".into()],
    });
    flow.set_sniffed_host("example.com".into());
    flow.set_dialed(destination);
    api.sockets.extend([client, server]);
    flow.id
}

pub async fn call(api: &Api, req: Request<Body>) -> (StatusCode, Value, axum::http::HeaderMap) {
    let resp = api.router.clone().oneshot(req).await.expect("response");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    let json = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, json, headers)
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).expect("request")
}

pub fn with_body(method: &str, uri: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request")
}

/// First line of a streaming (chunked) response.
pub async fn first_line(api: &Api, uri: &str) -> Value {
    let resp = api
        .router
        .clone()
        .oneshot(get(uri))
        .await
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK, "{uri}");
    let mut body = resp.into_body();
    let frame = body.frame().await.expect("a frame").expect("frame ok");
    let data = frame.into_data().expect("data");
    let line = String::from_utf8_lossy(&data);
    serde_json::from_str(line.lines().next().expect("a line")).expect("json line")
}

pub fn reference(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mihomo-v1.19.23")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    serde_json::from_str(&text).unwrap_or_else(|_| serde_json::from_str(first).expect("json"))
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Every key of `theirs` is in `ours` with the same JSON type (mihomo's `null` lists may be
/// `[]` here); with `all_keys` false, only keys both have are compared.
pub fn same_shape(path: &str, ours: &Value, theirs: &Value, all_keys: bool) {
    match (ours, theirs) {
        (_, Value::Null) => {}
        (Value::Object(o), Value::Object(t)) => {
            for (k, tv) in t {
                match o.get(k) {
                    Some(ov) => same_shape(&format!("{path}.{k}"), ov, tv, all_keys),
                    None if all_keys => panic!("{path}.{k} is missing (mihomo sends it)"),
                    None => {}
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            if let (Some(ov), Some(tv)) = (o.first(), t.first()) {
                same_shape(&format!("{path}[0]"), ov, tv, all_keys);
            }
        }
        (o, t) => assert_eq!(kind(o), kind(t), "{path}: ours {o}, mihomo's {t}"),
    }
}
