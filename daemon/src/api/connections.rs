//! `/connections`: the live snapshot (HTTP, or a WebSocket pushing one every `interval` ms),
//! the closed ring, and closing flows.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    extract::{Path, Query, State, ws::Utf8Bytes},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::{StreamExt, stream};
use serde::Deserialize;
use uuid::Uuid;

use super::{
    ApiError, ApiState,
    streams::{self, MaybeWs},
};
use crate::{snapshot, speed};

/// WebSocket pushes no faster than this.
const MIN_INTERVAL_MS: u64 = 100;
/// The sampler's period: WebSockets at this interval share its frames.
const SAMPLED_MS: u64 = 1000;

/// An optional numeric query value: `default` when absent or empty, a 400 naming `key` when
/// it is not a `what`.
fn number<T: std::str::FromStr>(
    value: Option<&str>,
    key: &str,
    what: &str,
    default: T,
) -> Result<T, ApiError> {
    match value {
        None | Some("") => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{key}: `{v}` is not {what}"))),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    interval: Option<String>,
}

pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<ListQuery>,
    MaybeWs(ws): MaybeWs,
) -> Result<Response, ApiError> {
    let interval =
        number(q.interval.as_deref(), "interval", "milliseconds", 1000)?.max(MIN_INTERVAL_MS);
    let Some(ws) = ws else {
        let body = fresh(state.clone())
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("snapshot: {e}")))?;
        return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
    };
    let source = state.clone();
    // A frame that cannot be made (the runtime shutting down) is sent empty.
    let now = move || {
        let source = source.clone();
        async move { Utf8Bytes::from(fresh(source).await.unwrap_or_default()) }
    };
    if interval != SAMPLED_MS {
        // Its own pace: its own reads (each a batch read of the kernel's maps, no lock the
        // relay takes).
        let frames = streams::every(Duration::from_millis(interval), now);
        return Ok(streams::websocket(&state, ws, frames));
    }
    // The sampler's pace: one frame now, then the sampler's, serialized once for everyone.
    let mut shared = state.rates.connections.subscribe();
    let last = shared.borrow_and_update().clone();
    let first = stream::once(first_frame(state.clone(), last, now));
    let rest = stream::unfold(shared, |mut rx| async move {
        rx.changed().await.ok()?;
        let frame = rx.borrow_and_update().1.clone();
        Some((frame, rx))
    });
    Ok(streams::websocket(&state, ws, first.chain(rest)))
}

/// A WebSocket's first frame at the sampler's pace: the sampler's `last` when it is from this
/// tick, else the one another client made within the tick, else made now (once the upgrade
/// is answered). Twenty dashboards opening at once cost one frame, not twenty.
async fn first_frame<F: Future<Output = Utf8Bytes>>(
    state: Arc<ApiState>,
    last: speed::Frame,
    make: impl Fn() -> F,
) -> Utf8Bytes {
    let this_tick = |frame: &speed::Frame| {
        frame
            .0
            .is_some_and(|at| at.elapsed() < Duration::from_millis(SAMPLED_MS))
    };
    if this_tick(&last) {
        return last.1;
    }
    let mut made = state.rates.first.lock().await;
    if !this_tick(&made) {
        *made = (Some(std::time::Instant::now()), make().await);
    }
    made.1.clone()
}

/// `/connections` now, made on a blocking thread: milliseconds of work at 10k flows, kept
/// off the runtime's workers, which relay.
async fn fresh(state: Arc<ApiState>) -> Result<String, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || snapshot::snapshot(&state.registry, &state.rates.speeds))
        .await
}

#[derive(Debug, Deserialize)]
pub(super) struct ClosedQuery {
    limit: Option<String>,
}

pub(super) async fn closed(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<ClosedQuery>,
) -> Result<Response, ApiError> {
    let limit = number(q.limit.as_deref(), "limit", "a count", usize::MAX)?;
    let ring = state.registry.closed(limit);
    let closed: Vec<_> = ring.iter().map(snapshot::closed).collect();
    Ok(Json(serde_json::json!({ "connections": closed })).into_response())
}

pub(super) async fn close_one(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request(format!("`{id}` is not a connection id")))?;
    if state.registry.close(&id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no live connection {id}")))
    }
}

pub(super) async fn close_all(State(state): State<Arc<ApiState>>) -> StatusCode {
    state.registry.close_all();
    StatusCode::NO_CONTENT
}
