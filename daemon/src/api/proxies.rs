//! `/proxies`, `/group` and `/rules` in mihomo's shapes, from the outbound registry and the
//! compiled rules in force: every outbound with its type, `now`/`all` for groups, `history`
//! and `alive` from the shared delay history, rules with real hit counts.

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
    outbound::{GLOBAL, Node, Outbounds, Proxy},
    route::Routing,
    snapshot::rfc3339,
};

/// `history` as mihomo shows it: `[{time, delay}]`, oldest first.
fn history(outbounds: &Outbounds, name: &str) -> Value {
    outbounds
        .health()
        .history
        .of(name)
        .into_iter()
        .map(|(time, delay)| json!({ "time": rfc3339(time), "delay": delay }))
        .collect()
}

/// tpacct's per-outbound figures, under `extra` where mihomo keeps per-URL results (clients
/// look those up by URL, so another key leaves them be).
fn figures(outbounds: &Outbounds, name: &str) -> Value {
    let health = outbounds.health();
    let f = health.breakers.figures(name);
    json!({ "tpacct": {
        "active": f.active,
        "dials": f.dials,
        "dialFailures": f.dial_failures,
        "dialMeanMs": f.dial_mean_ms(),
        "dialP99Ms": f.dial_p99_ms(),
        "healthy": outbounds.alive(name),
        "affinityRequests": f.affinity_requests,
        "affinityHits": f.affinity_hits,
    }})
}

fn leaf_json(outbounds: &Outbounds, p: &Proxy) -> Value {
    let spec = p.spec();
    json!({
        "alive": outbounds.alive(&p.name),
        "dialer-proxy": spec.and_then(|s| s.dialer_proxy.clone()).unwrap_or_default(),
        "extra": figures(outbounds, &p.name),
        "history": history(outbounds, &p.name),
        "id": "",
        "interface": p.opts.device.clone().unwrap_or_default(),
        "mptcp": p.opts.mptcp,
        "name": p.name,
        "provider-name": "",
        "routing-mark": p.opts.mark,
        "smux": false,
        "tfo": p.opts.tfo,
        "type": p.clash_type(),
        "udp": p.udp(),
        "uot": false,
        "xudp": false,
    })
}

fn group_json(outbounds: &Outbounds, g: &crate::outbound::Group) -> Value {
    let now = g.now(outbounds);
    let udp = !g.disable_udp && outbounds.resolve(&g.name).is_ok_and(|(leaf, _)| leaf.udp());
    // A group's history is its current member's.
    let shown = outbounds
        .resolve(&g.name)
        .map(|(leaf, _)| leaf.name.clone())
        .unwrap_or_default();
    let check = g.check.as_ref();
    let mut v = json!({
        "alive": outbounds.alive(&g.name),
        "all": g.members,
        "dialer-proxy": "",
        "extra": figures(outbounds, &g.name),
        "hidden": g.hidden,
        "history": history(outbounds, &shown),
        "icon": g.icon,
        "interface": "",
        "mptcp": false,
        "name": g.name,
        "now": now,
        "provider-name": "",
        "routing-mark": 0,
        "smux": false,
        "testUrl": check.map(|c| c.spec.url.to_string()).unwrap_or_default(),
        "tfo": false,
        "type": g.kind.clash_name(),
        "udp": udp,
        "uot": false,
        "xudp": false,
    });
    if g.kind != crate::config::GroupKind::Select {
        v["expectedStatus"] = json!(check.map_or_else(|| "*".to_owned(), |c| c.expected_text()));
        v["fixed"] = json!(g.selected().unwrap_or_default());
    }
    v
}

/// The JSON of outbound `name`, as `/proxies/{name}` answers it.
pub(super) fn find(state: &ApiState, name: &str) -> Result<Value, ApiError> {
    let routing = state.routing();
    node_json(&routing, name)
}

fn node_json(routing: &Routing, name: &str) -> Result<Value, ApiError> {
    match routing.outbounds.get(name) {
        Some(Node::Proxy(p)) => Ok(leaf_json(&routing.outbounds, p)),
        Some(Node::Group(g)) => Ok(group_json(&routing.outbounds, g)),
        None => Err(ApiError::not_found(format!("no proxy named `{name}`"))),
    }
}

/// Every outbound's name, in mihomo's order.
pub(super) fn names(state: &ApiState) -> Vec<String> {
    state
        .routing()
        .outbounds
        .iter()
        .map(|(n, _)| n.clone())
        .collect()
}

/// Every group's name, GLOBAL last.
pub(super) fn group_names(state: &ApiState) -> Vec<String> {
    let routing = state.routing();
    let mut groups: Vec<String> = routing
        .outbounds
        .iter()
        .filter(|(n, node)| matches!(node, Node::Group(_)) && *n != GLOBAL)
        .map(|(n, _)| n.clone())
        .collect();
    groups.push(GLOBAL.to_owned());
    groups
}

/// The members of group `name`.
pub(super) fn members(state: &ApiState, name: &str) -> Result<Vec<String>, ApiError> {
    state
        .routing()
        .outbounds
        .group(name)
        .map(|g| g.members.clone())
        .ok_or_else(|| ApiError::not_found(format!("no group named `{name}`")))
}

pub(super) async fn proxies(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let routing = state.routing();
    let all: serde_json::Map<String, Value> = routing
        .outbounds
        .iter()
        .filter_map(|(name, _)| Some((name.clone(), node_json(&routing, name).ok()?)))
        .collect();
    Json(json!({ "proxies": all }))
}

pub(super) async fn proxy(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find(&state, &name).map(Json)
}

/// `DELETE /proxies/{group}`: a url-test or fallback group chooses by health again.
pub(super) async fn unfix(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let routing = state.routing();
    if routing.outbounds.get(&name).is_none() {
        return Err(ApiError::not_found(format!("no proxy named `{name}`")));
    }
    routing
        .outbounds
        .unfix(&name)
        .map_err(ApiError::bad_request)?;
    tracing::info!("group {name}: the fixed choice was cleared through the API");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub(super) struct Choice {
    name: String,
}

/// `PUT /proxies/{group}`: chooses a select group's member, or fixes a url-test or fallback
/// group's (kept across restarts).
pub(super) async fn select(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    body: Result<Json<Choice>, axum::extract::rejection::JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(choice) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let routing = state.routing();
    if routing.outbounds.get(&name).is_none() {
        return Err(ApiError::not_found(format!("no proxy named `{name}`")));
    }
    routing
        .outbounds
        .select(&name, &choice.name)
        .map_err(ApiError::bad_request)?;
    tracing::info!("group {name}: {} selected through the API", choice.name);
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn groups(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let routing = state.routing();
    let list: Vec<Value> = group_names(&state)
        .iter()
        .filter_map(|n| node_json(&routing, n).ok())
        .collect();
    Json(json!({ "proxies": list }))
}

pub(super) async fn group(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let routing = state.routing();
    match routing.outbounds.group(&name) {
        Some(g) => Ok(Json(group_json(&routing.outbounds, g))),
        None => Err(ApiError::not_found(format!("no group named `{name}`"))),
    }
}

pub(super) async fn rules(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let routing = state.routing();
    let list: Vec<Value> = routing
        .rules
        .rules
        .iter()
        .zip(&routing.hits)
        .enumerate()
        .map(|(i, (rule, hits))| {
            let count = hits.count.load(std::sync::atomic::Ordering::Relaxed);
            let last = hits.last.load(std::sync::atomic::Ordering::Relaxed);
            let size = match &rule.cond {
                crate::route::rules::Cond::RuleSet { name, .. } => routing
                    .rule_providers
                    .iter()
                    .find(|p| &p.name == name)
                    .map_or(-1, |p| {
                        p.count.load(std::sync::atomic::Ordering::Relaxed) as i64
                    }),
                _ => -1,
            };
            json!({
                "index": i, "type": rule.kind, "payload": rule.payload, "proxy": rule.target,
                "size": size,
                "extra": {
                    "disabled": false,
                    "hitCount": count,
                    "hitAt": rfc3339(UNIX_EPOCH + std::time::Duration::from_nanos(last)),
                    "missCount": 0,
                    "missAt": rfc3339(UNIX_EPOCH),
                }
            })
        })
        .collect();
    Json(json!({ "rules": list }))
}
