//! `/`, `/version` and `/configs` (GET, PATCH, and PUT to reload) in mihomo's shapes.

use std::sync::Arc;

use axum::{Json, extract::State, http::StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState};
use crate::config::{BindAddress, LogLevel, Mode};

pub(super) async fn hello() -> Json<Value> {
    Json(json!({ "hello": "clash" }))
}

pub(super) async fn version() -> Json<Value> {
    Json(json!({ "version": format!("tpacct {}", env!("CARGO_PKG_VERSION")), "meta": true }))
}

fn mode(state: &ApiState) -> Mode {
    state.pipeline.router.mode()
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
        state.pipeline.router.set_mode(mode);
        tracing::info!("mode set to {mode:?} through the API");
    }
    if let (Some(level), Some(logging)) = (level, crate::logging::get()) {
        logging.set_level(level);
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
pub(super) struct ReloadBody {
    #[serde(default)]
    path: String,
    #[serde(default)]
    payload: String,
}

/// `PUT /configs[?force=true]` with `{"path": …}` or `{"payload": …}` (mihomo's body): reloads
/// the config; a bad one is a 400 naming the key, and the old config keeps running. A path
/// must be the file tpacctd started with or sit beside it or in the state directory.
pub(super) async fn reload(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<ReloadBody>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let body = match body {
        Ok(Json(b)) => b,
        Err(axum::extract::rejection::JsonRejection::MissingJsonContentType(_)) => {
            ReloadBody::default()
        }
        Err(e) => return Err(ApiError::bad_request(e.body_text())),
    };
    let source = if !body.payload.is_empty() {
        crate::reload::Source::Text(body.payload)
    } else if body.path.is_empty() {
        crate::reload::Source::File(None)
    } else {
        let path = std::path::PathBuf::from(&body.path);
        let allowed = |dir: Option<&std::path::Path>| dir.is_some_and(|d| path.starts_with(d));
        let started = state.config.source.as_deref();
        if !path.is_absolute()
            || path
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            || !(Some(path.as_path()) == started
                || allowed(started.and_then(|s| s.parent()))
                || allowed(Some(&state.dir)))
        {
            return Err(ApiError::bad_request(format!(
                "path: `{}` is not the started config's directory or the state directory",
                body.path
            )));
        }
        crate::reload::Source::File(Some(path))
    };
    state.reloader.reload(source).await.map_err(|e| {
        let message = match e.key() {
            Some(key) => format!("{e} (key `{key}`)"),
            None => e.to_string(),
        };
        ApiError::bad_request(message)
    })?;
    Ok(StatusCode::NO_CONTENT)
}
