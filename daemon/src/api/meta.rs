//! Everything but flows: `/`, `/version`, `/configs`, `/proxies`, `/group`, `/rules` — in
//! mihomo's shapes, over the routing tpacct has today (DIRECT, REJECT, a GLOBAL selector and
//! the `Match` rule).

use std::{sync::Arc, time::UNIX_EPOCH};

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState};
use crate::{
    config::{BindAddress, LogLevel, Mode},
    route::{GLOBAL, Outbound},
    snapshot::rfc3339,
};

pub(super) async fn hello() -> Json<Value> {
    Json(json!({ "hello": "clash" }))
}

pub(super) async fn version() -> Json<Value> {
    Json(json!({ "version": format!("tpacct {}", env!("CARGO_PKG_VERSION")), "meta": true }))
}

fn mode(state: &ApiState) -> Mode {
    state.selection.mode()
}

fn log_level(state: &ApiState) -> LogLevel {
    crate::logging::get().map_or(state.config.log_level, |l| l.level())
}

pub(super) async fn configs(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let c = &state.config;
    let bind = match c.bind_address {
        BindAddress::Any => "*".to_owned(),
        BindAddress::One(ip) => ip.to_string(),
    };
    Json(json!({
        "port": 0,
        "socks-port": 0,
        "redir-port": 0,
        "tproxy-port": c.tproxy_port,
        "mixed-port": 0,
        "tun": {
            "enable": false, "device": "", "stack": "", "dns-hijack": [],
            "auto-route": false, "auto-detect-interface": false
        },
        "authentication": [],
        "skip-auth-prefixes": [],
        "lan-allowed-ips": ["0.0.0.0/0", "::/0"],
        "lan-disallowed-ips": [],
        "allow-lan": !matches!(c.bind_address, BindAddress::One(ip) if ip.is_loopback()),
        "bind-address": bind,
        "inbound-tfo": false,
        "inbound-mptcp": false,
        "mode": mode(&state),
        "unified-delay": false,
        "log-level": log_level(&state),
        "ipv6": true,
        "interface-name": c.interface_name.clone().unwrap_or_default(),
        "routing-mark": c.routing_mark,
        "sniffing": c.sniffer.enable,
        "tcp-concurrent": false,
        "find-process-mode": "off",
        "global-client-fingerprint": "",
        "global-ua": format!("tpacct/{}", env!("CARGO_PKG_VERSION")),
        "keep-alive-idle": 0,
        "keep-alive-interval": 0,
        "disable-keep-alive": false,
    }))
}

#[derive(Debug, Deserialize)]
pub(super) struct ConfigPatch {
    mode: Option<String>,
    #[serde(rename = "log-level")]
    log_level: Option<String>,
}

/// A lower-case enum value from a PATCH body.
fn parse<T: serde::de::DeserializeOwned>(key: &str, v: &str) -> Result<T, ApiError> {
    serde_json::from_value(Value::String(v.to_ascii_lowercase()))
        .map_err(|_| ApiError::bad_request(format!("{key}: `{v}` is not a valid value")))
}

pub(super) async fn patch_configs(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<ConfigPatch>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(patch) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mode: Option<Mode> = patch
        .mode
        .as_deref()
        .map(|v| parse("mode", v))
        .transpose()?;
    let level: Option<LogLevel> = patch
        .log_level
        .as_deref()
        .map(|v| parse("log-level", v))
        .transpose()?;
    if let Some(mode) = mode {
        state.selection.set_mode(mode);
        tracing::info!("mode set to {mode:?} through the API");
    }
    if let (Some(level), Some(logging)) = (level, crate::logging::get()) {
        logging.set_level(level);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The leaf proxies' names.
fn leaf_names() -> Vec<&'static str> {
    Outbound::ALL.iter().map(|o| o.name()).collect()
}

fn leaf(state: &ApiState, name: &str, kind: &str, mark: u32) -> Value {
    json!({
        "alive": true, "dialer-proxy": "", "extra": {}, "history": state.delays.of(name), "id": "",
        "interface": "", "mptcp": false, "name": name, "provider-name": "",
        "routing-mark": mark, "smux": false, "tfo": false, "type": kind, "udp": true,
        "uot": false, "xudp": false,
    })
}

fn global(state: &ApiState) -> Value {
    let now = state.selection.global().name();
    json!({
        "alive": true, "all": leaf_names(),
        "dialer-proxy": "", "extra": {}, "hidden": false, "history": state.delays.of(GLOBAL), "icon": "",
        "interface": "", "mptcp": false, "name": GLOBAL, "now": now, "provider-name": "",
        "routing-mark": 0, "smux": false, "testUrl": "", "tfo": false, "type": "Selector",
        "udp": true, "uot": false, "xudp": false,
    })
}

pub(super) const GLOBAL_NAME: &str = GLOBAL;

/// Every proxy and group, in mihomo's `default` provider order (leaves, then groups).
pub(super) fn proxy_names(_state: &ApiState) -> Vec<String> {
    leaf_names()
        .into_iter()
        .chain([GLOBAL])
        .map(str::to_owned)
        .collect()
}

/// Every group.
pub(super) fn group_names(_state: &ApiState) -> Vec<String> {
    vec![GLOBAL.to_owned()]
}

pub(super) fn find(state: &ApiState, name: &str) -> Result<Value, ApiError> {
    if name == GLOBAL {
        return Ok(global(state));
    }
    Outbound::from_name(name)
        .map(|o| {
            let mark = if o == Outbound::Direct {
                state.config.routing_mark
            } else {
                0
            };
            leaf(state, o.name(), o.kind(), mark)
        })
        .ok_or_else(|| ApiError::not_found(format!("no proxy named `{name}`")))
}

/// 404 unless `name` is a proxy.
pub(super) fn exists(state: &ApiState, name: &str) -> Result<(), ApiError> {
    find(state, name).map(drop)
}

/// The leaf a proxy name stands for now (a group: its selection).
pub(super) fn resolve(state: &ApiState, name: &str) -> String {
    if name == GLOBAL {
        state.selection.global().name().to_owned()
    } else {
        name.to_owned()
    }
}

/// The members of group `name`.
pub(super) fn members(_state: &ApiState, name: &str) -> Result<Vec<String>, ApiError> {
    if name == GLOBAL {
        Ok(leaf_names().into_iter().map(str::to_owned).collect())
    } else {
        Err(ApiError::not_found(format!("no group named `{name}`")))
    }
}

pub(super) async fn proxies(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let mut all = serde_json::Map::new();
    for name in leaf_names().into_iter().chain([GLOBAL]) {
        if let Ok(p) = find(&state, name) {
            all.insert(name.to_owned(), p);
        }
    }
    Json(json!({ "proxies": all }))
}

pub(super) async fn proxy(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find(&state, &name).map(Json)
}

#[derive(Debug, Deserialize)]
pub(super) struct Selection {
    name: String,
}

pub(super) async fn select(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Result<Json<Selection>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(choice) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    find(&state, &name)?;
    if name != GLOBAL {
        return Err(ApiError::bad_request(format!("`{name}` is not a Selector")));
    }
    let Some(outbound) = Outbound::from_name(&choice.name) else {
        return Err(ApiError::bad_request(format!(
            "`{}` is not one of GLOBAL's proxies",
            choice.name
        )));
    };
    state.selection.select_global(outbound);
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn groups(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({ "proxies": [global(&state)] }))
}

pub(super) async fn group(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if name == GLOBAL {
        Ok(Json(global(&state)))
    } else {
        Err(ApiError::not_found(format!("no group named `{name}`")))
    }
}

pub(super) async fn rules(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let (hits, last) = state.registry.opened();
    Json(json!({ "rules": [{
        "index": 0, "type": "Match", "payload": "", "proxy": "DIRECT", "size": -1,
        "extra": {
            "disabled": false,
            "hitCount": hits,
            "hitAt": rfc3339(last.unwrap_or(UNIX_EPOCH)),
            "missCount": 0,
            "missAt": rfc3339(UNIX_EPOCH),
        }
    }]}))
}
