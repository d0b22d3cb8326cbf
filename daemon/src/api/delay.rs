//! `GET /proxies/{name}/delay` and `GET /group/{name}/delay`: a real HTTP(S) HEAD through the
//! outbound (a group: its current member; for group delay: every member at once), recorded in
//! the shared history `/proxies` shows. 504 on timeout, 503 on any other failure.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState, proxies};
use crate::outbound::health::{self, Failure, TestSpec};

#[derive(Debug, Deserialize)]
pub(super) struct DelayQuery {
    url: Option<String>,
    timeout: Option<String>,
    expected: Option<String>,
}

impl DelayQuery {
    fn validate(&self) -> Result<TestSpec, ApiError> {
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
            Some(spec) => health::parse_expected(spec).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "expected: `{spec}` is not a status list like 204 or 200-299/301"
                ))
            })?,
        };
        Ok(TestSpec {
            url,
            timeout,
            expected,
        })
    }
}

/// Tests `name` (a group: its current member) within the global bound of tests at once, and
/// records the result under the leaf.
pub(super) async fn test(state: &ApiState, name: &str, spec: &TestSpec) -> Result<u64, Failure> {
    let routing = state.routing();
    let leaf = routing
        .outbounds
        .resolve(name)
        .map(|(leaf, _)| leaf.name.clone())
        .unwrap_or_else(|_| name.to_owned());
    crate::outbound::checks::test(&routing.outbounds, &leaf, spec).await
}

/// Tests each of `names` at once.
pub(super) async fn test_all(
    state: &ApiState,
    names: &[String],
    spec: &TestSpec,
) -> Vec<Result<u64, Failure>> {
    futures_util::future::join_all(names.iter().map(|m| test(state, m, spec))).await
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
    proxies::find(&state, &name)?;
    let spec = q.validate()?;
    let delay = test(&state, &name, &spec).await.map_err(failure)?;
    Ok(Json(json!({ "delay": delay })))
}

/// Tests every member of a group at once; answers the ones that succeeded.
pub(super) async fn group(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(q): Query<DelayQuery>,
) -> Result<Json<Value>, ApiError> {
    let members = proxies::members(&state, &name)?;
    let spec = q.validate()?;
    let mut out = serde_json::Map::new();
    for (member, result) in members.iter().zip(test_all(&state, &members, &spec).await) {
        if let Ok(delay) = result {
            out.insert(member.clone(), json!(delay));
        }
    }
    Ok(Json(Value::Object(out)))
}
