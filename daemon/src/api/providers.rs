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

use super::{ApiError, ApiState, delay, meta};

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
        meta::proxy_names(state)
            .into_iter()
            .filter(|n| n != meta::GLOBAL_NAME)
            .collect(),
    )];
    for group in meta::group_names(state) {
        if group == meta::GLOBAL_NAME {
            continue;
        }
        if let Ok(members) = meta::members(state, &group) {
            all.push((group, members));
        }
    }
    all
}

fn provider_json(state: &ApiState, name: &str, members: &[String]) -> Value {
    let proxies: Vec<Value> = members
        .iter()
        .filter_map(|m| meta::find(state, m).ok())
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
    delay::test_all(&state, &members, &delay::Test::default_check()).await;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn proxy(
    State(state): State<Arc<ApiState>>,
    Path((provider, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if !members_of(&state, &provider)?.contains(&name) {
        return Err(not_found());
    }
    meta::find(&state, &name).map(Json)
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

pub(super) async fn rules() -> Json<Value> {
    Json(json!({ "providers": {} }))
}

pub(super) async fn update_rules(Path(_name): Path<String>) -> ApiError {
    not_found()
}
