//! Pushed streams: `/traffic` and `/memory` each second, `/logs` as records happen; each as a
//! WebSocket when upgraded, else as chunked HTTP with one JSON object per line.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{
        FromRequestParts, Query, State, WebSocketUpgrade,
        ws::{Message, Utf8Bytes},
    },
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, Stream, StreamExt, stream};
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

/// How long one frame may take to reach a client's socket before the client is dropped: a
/// client that stops reading costs its socket buffer and one frame, never more.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends each item of `frames` as a WebSocket text message while reading the client side at
/// the same time: a Close is answered with a Close and ends the stream, a Ping is answered with
/// a Pong, and a client that stops reading for [`SEND_TIMEOUT`] is dropped. At most
/// [`super::MAX_WEBSOCKETS`] are open at once (503 beyond).
pub(super) fn websocket<T: Into<Utf8Bytes> + Send + 'static>(
    state: &ApiState,
    ws: WebSocketUpgrade,
    frames: impl Stream<Item = T> + Send + 'static,
) -> Response {
    let Ok(permit) = state.websockets.clone().try_acquire_owned() else {
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many WebSockets open (at most {})",
                super::MAX_WEBSOCKETS
            ),
        )
        .into_response();
    };
    ws.on_upgrade(move |socket| async move {
        let (mut tx, mut rx) = socket.split();
        let mut frames = std::pin::pin!(frames);
        loop {
            tokio::select! {
                incoming = rx.next() => match incoming {
                    Some(Ok(Message::Close(_))) => {
                        // The library queued the Close reply; flushing sends it.
                        let _ = tokio::time::timeout(SEND_TIMEOUT, tx.close()).await;
                        break;
                    }
                    Some(Ok(Message::Ping(payload))) => {
                        let pong = tx.send(Message::Pong(payload));
                        if !matches!(tokio::time::timeout(SEND_TIMEOUT, pong).await, Ok(Ok(()))) {
                            break;
                        }
                    }
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break,
                },
                frame = frames.next() => {
                    let Some(frame) = frame else { break };
                    let sent = tx.send(Message::Text(frame.into()));
                    if !matches!(tokio::time::timeout(SEND_TIMEOUT, sent).await, Ok(Ok(()))) {
                        break;
                    }
                }
            }
        }
        drop(permit);
    })
}

/// A WebSocket if upgraded, else newline-delimited JSON over chunked HTTP.
fn respond(
    state: &ApiState,
    MaybeWs(ws): MaybeWs,
    frames: impl Stream<Item = String> + Send + 'static,
) -> Response {
    match ws {
        Some(ws) => websocket(state, ws, frames),
        None => {
            let body = Body::from_stream(frames.map(|f| Ok::<_, Infallible>(f + "\n")));
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}

/// `make()` at once, then every `period`.
pub(super) fn every<T: Send + 'static, F: Future<Output = T> + Send>(
    period: Duration,
    make: impl Fn() -> F + Send + 'static,
) -> impl Stream<Item = T> + Send + 'static {
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
            let frame = make().await;
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
    respond(&state, ws, frames)
}

pub(super) async fn memory(State(state): State<Arc<ApiState>>, ws: MaybeWs) -> Response {
    let switch = state.pipeline.killswitch.clone();
    let frames = every(Duration::from_secs(1), move || {
        // mihomo always says 0; tpacct gives the kill switch's limit (0: off).
        std::future::ready(
            serde_json::json!({ "inuse": speed::rss(), "oslimit": switch.limit_now() }).to_string(),
        )
    });
    respond(&state, ws, frames)
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

pub(super) async fn logs(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<LogQuery>,
    ws: MaybeWs,
) -> Result<Response, ApiError> {
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
    Ok(respond(&state, ws, frames))
}
