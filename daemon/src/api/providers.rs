//! `/providers/proxies` and `/providers/rules`, in mihomo's shapes: every proxy is in the
//! `default` compatible provider and each group's members in one named after the group (that
//! is how mihomo lists them, and dashboards draw their proxy pages from it).

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
};
use serde_json::{Value, json};

use crate::outbound::{BUILTINS, GLOBAL};

use super::{ApiError, ApiState, delay, proxies};

/// The name mihomo gives the provider of every configured proxy.
const DEFAULT: &str = "default";

/// mihomo's "never updated" time.
const NEVER: &str = "0001-01-01T00:00:00Z";

fn not_found() -> ApiError {
    ApiError::not_found("Resource not found")
}

/// Provider name → its proxies' names.
fn providers(state: &ApiState) -> Vec<(String, Vec<String>)> {
    let mut all = vec![(
        DEFAULT.to_owned(),
        proxies::names(state)
            .into_iter()
            .filter(|n| n != GLOBAL && !BUILTINS[2..].contains(&n.as_str()))
            .collect(),
    )];
    for group in proxies::group_names(state) {
        if group == GLOBAL {
            continue;
        }
        if let Ok(members) = proxies::members(state, &group) {
            all.push((group, members));
        }
    }
    all
}

fn provider_json(state: &ApiState, name: &str, members: &[String]) -> Value {
    let proxies: Vec<Value> = members
        .iter()
        .filter_map(|m| proxies::find(state, m).ok())
        .collect();
    json!({
        "name": name, "type": "Proxy", "vehicleType": "Compatible", "proxies": proxies,
        "testUrl": "", "expectedStatus": "*", "updatedAt": NEVER,
    })
}

fn members_of(state: &ApiState, provider: &str) -> Result<Vec<String>, ApiError> {
    providers(state)
        .into_iter()
        .find(|(n, _)| n == provider)
        .map(|(_, m)| m)
        .ok_or_else(not_found)
}

pub(super) async fn list(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let all: serde_json::Map<String, Value> = providers(&state)
        .into_iter()
        .map(|(name, members)| {
            let json = provider_json(&state, &name, &members);
            (name, json)
        })
        .collect();
    Json(json!({ "providers": all }))
}

pub(super) async fn one(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let members = members_of(&state, &name)?;
    Ok(Json(provider_json(&state, &name, &members)))
}

/// Compatible providers have nothing to fetch: updating one succeeds at once.
pub(super) async fn update(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    members_of(&state, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Tests every proxy of the provider (mihomo answers 204 and records the results).
pub(super) async fn healthcheck(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let members = members_of(&state, &name)?;
    // The provider's own check (a real provider's `health-check`, a group's url), else mihomo's.
    let routing = state.routing();
    let spec = routing
        .outbounds
        .group(&name)
        .and_then(|g| g.check.clone())
        .or_else(|| {
            let checks = &routing.outbounds.provider_checks;
            checks
                .iter()
                .find(|c| c.name == name)
                .map(|c| c.check.clone())
        })
        .map(|c| c.spec)
        .unwrap_or_default();
    delay::test_all(&state, &members, &spec).await;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn proxy(
    State(state): State<Arc<ApiState>>,
    Path((provider, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if !members_of(&state, &provider)?.contains(&name) {
        return Err(not_found());
    }
    proxies::find(&state, &name).map(Json)
}

pub(super) async fn proxy_healthcheck(
    State(state): State<Arc<ApiState>>,
    Path((provider, name)): Path<(String, String)>,
    query: Query<delay::DelayQuery>,
) -> Result<Json<Value>, ApiError> {
    if !members_of(&state, &provider)?.contains(&name) {
        return Err(not_found());
    }
    delay::proxy(State(state), Path(name), query).await
}

pub(super) async fn rules(State(state): State<Arc<ApiState>>) -> Json<Value> {
    let routing = state.routing();
    let all: serde_json::Map<String, Value> = routing
        .rule_providers
        .iter()
        .map(|p| (p.name.clone(), rule_provider_json(p)))
        .collect();
    Json(json!({ "providers": all }))
}

fn rule_provider_json(p: &crate::route::providers::RuleProvider) -> Value {
    use crate::config::{RuleFormat, Vehicle};
    let format = match (p.config.vehicle, p.config.format) {
        (Vehicle::Inline, _) => "",
        (_, RuleFormat::Yaml) => "YamlRule",
        (_, RuleFormat::Text) => "TextRule",
        (_, RuleFormat::Mrs) => "MrsRule",
    };
    let updated = *p.updated.lock().unwrap_or_else(|e| e.into_inner());
    let mut v = json!({
        "behavior": p.config.behavior.clash_name(),
        "format": format,
        "name": p.name,
        "ruleCount": p.count.load(std::sync::atomic::Ordering::Relaxed),
        "type": "Rule",
        "vehicleType": p.config.vehicle.clash_name(),
        "updatedAt": crate::snapshot::rfc3339(updated),
    });
    if p.config.vehicle == Vehicle::Inline {
        v["payload"] = json!(*p.entries.lock().unwrap_or_else(|e| e.into_inner()));
    }
    v
}

/// `PUT /providers/rules/{name}`: fetches (http) or re-reads (file) the provider now.
pub(super) async fn update_rules(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let routing = state.routing();
    let provider = routing
        .rule_providers
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(not_found)?;
    provider
        .refresh(&routing.outbounds, &routing.geo)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(StatusCode::NO_CONTENT)
}
