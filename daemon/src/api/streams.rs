//! Pushed streams: `/traffic` and `/memory` each second, `/logs` as records happen; each as a
//! WebSocket when upgraded, else as chunked HTTP with one JSON object per line.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{FromRequestParts, Query, State, WebSocketUpgrade, ws::Message},
    http::{header, request::Parts},
    response::{IntoResponse, Response},
};
use futures_util::{Stream, StreamExt, stream};
use serde::Deserialize;

use super::{ApiError, ApiState};
use crate::{config::LogLevel, speed};

/// A WebSocket upgrade if the request asked for one.
#[derive(Debug)]
pub(super) struct MaybeWs(pub Option<WebSocketUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for MaybeWs {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Infallible> {
        Ok(MaybeWs(
            WebSocketUpgrade::from_request_parts(parts, state)
                .await
                .ok(),
        ))
    }
}

/// Sends each item of `frames` as a WebSocket text message until either side stops.
pub(super) fn websocket(
    ws: WebSocketUpgrade,
    frames: impl Stream<Item = String> + Send + 'static,
) -> Response {
    ws.on_upgrade(move |mut socket| async move {
        let mut frames = std::pin::pin!(frames);
        while let Some(frame) = frames.next().await {
            if socket.send(Message::Text(frame.into())).await.is_err() {
                break;
            }
        }
    })
}

/// A WebSocket if upgraded, else newline-delimited JSON over chunked HTTP.
fn respond(MaybeWs(ws): MaybeWs, frames: impl Stream<Item = String> + Send + 'static) -> Response {
    match ws {
        Some(ws) => websocket(ws, frames),
        None => {
            let body = Body::from_stream(frames.map(|f| Ok::<_, Infallible>(f + "\n")));
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}

/// `make()` at once, then every `period`.
pub(super) fn every(
    period: Duration,
    make: impl Fn() -> String + Send + 'static,
) -> impl Stream<Item = String> + Send + 'static {
    stream::unfold(
        (None::<tokio::time::Interval>, make),
        move |(tick, make)| async move {
            let mut tick = match tick {
                Some(t) => t,
                None => {
                    let mut t = tokio::time::interval(period);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                }
            };
            tick.tick().await;
            let frame = make();
            Some((frame, (Some(tick), make)))
        },
    )
}

pub(super) async fn traffic(State(state): State<Arc<ApiState>>, ws: MaybeWs) -> Response {
    let rx = state.rates.traffic.clone();
    let frames = stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let tick = *rx.borrow_and_update();
        Some((
            serde_json::to_string(&tick).unwrap_or_default(),
            (rx, false),
        ))
    });
    respond(ws, frames)
}

pub(super) async fn memory(ws: MaybeWs) -> Response {
    let limit = speed::memory_limit();
    let frames = every(Duration::from_secs(1), move || {
        serde_json::json!({ "inuse": speed::rss(), "oslimit": limit }).to_string()
    });
    respond(ws, frames)
}

#[derive(Debug, Deserialize)]
pub(super) struct LogQuery {
    level: Option<String>,
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warning => "warning",
        LogLevel::Error => "error",
        LogLevel::Silent => "silent",
    }
}

pub(super) async fn logs(Query(q): Query<LogQuery>, ws: MaybeWs) -> Result<Response, ApiError> {
    let wanted = match q.level.as_deref() {
        None | Some("") => LogLevel::Info,
        Some(name) => {
            serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|_| {
                ApiError::bad_request(format!(
                    "level: `{name}` is not debug, info, warning, error or silent"
                ))
            })?
        }
    };
    let Some(logging) = crate::logging::get() else {
        return Err(ApiError(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "logging is not initialised".into(),
        ));
    };
    let rx = logging.subscribe();
    let frames = stream::unfold(rx, move |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(r) if r.level >= wanted && wanted != LogLevel::Silent => {
                    let frame =
                        serde_json::json!({ "type": level_name(r.level), "payload": r.payload });
                    return Some((frame.to_string(), rx));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    });
    Ok(respond(ws, frames))
}
