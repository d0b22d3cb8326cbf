//! `GET /connections/events`: each flow's life as events, so a client never diffs snapshots —
//! `opened` (its connection as `/connections` shows it), `updated` (the bytes moved since the
//! previous event, and the totals, at the client's `interval`), and `closed` (its exact final
//! totals and `closedAt`, including what moved after the last `updated`). A flow that opens
//! and closes between two ticks is only `closed`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    extract::{Query, State},
    response::Response,
};
use futures_util::stream;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use super::{ApiError, ApiState, streams};
use crate::{
    flow::{ClosedFlow, Traffic},
    registry::Registry,
    snapshot,
};

#[derive(Debug, Deserialize)]
pub(super) struct Params {
    interval: Option<u64>,
}

struct Events {
    registry: Arc<Registry>,
    closes: tokio::sync::broadcast::Receiver<Arc<ClosedFlow>>,
    tick: tokio::time::Interval,
    /// The flows this client has been told of, at the bytes it was told.
    known: HashMap<Uuid, Traffic>,
    pending: std::collections::VecDeque<String>,
}

impl Events {
    /// Queues the frames for one tick: new flows opened, known ones updated.
    fn scan(&mut self) {
        for live in self.registry.live() {
            let now = live.traffic;
            match self.known.insert(live.flow.id, now) {
                None => {
                    let connection = snapshot::live(&live.flow, now, Traffic::default());
                    self.pending.push_back(
                        json!({ "type": "opened", "connection": connection }).to_string(),
                    );
                }
                Some(before) if before != now => {
                    self.pending.push_back(
                        json!({
                            "type": "updated",
                            "id": live.flow.id.to_string(),
                            "upload": now.upload.saturating_sub(before.upload),
                            "download": now.download.saturating_sub(before.download),
                            "uploadTotal": now.upload,
                            "downloadTotal": now.download,
                        })
                        .to_string(),
                    );
                }
                Some(_) => {}
            }
        }
    }

    fn closed(&mut self, flow: &ClosedFlow) {
        let told = self.known.remove(&flow.id).unwrap_or_default();
        let closed = snapshot::closed(flow);
        self.pending.push_back(
            json!({
                "type": "closed",
                "connection": closed,
                "upload": flow.traffic.upload.saturating_sub(told.upload),
                "download": flow.traffic.download.saturating_sub(told.download),
            })
            .to_string(),
        );
    }

    async fn next(mut self) -> Option<(String, Events)> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some((frame, self));
            }
            tokio::select! {
                closed = self.closes.recv() => match closed {
                    Ok(flow) => self.closed(&flow),
                    Err(RecvError::Lagged(missed)) => {
                        // Their close events are gone: say so, and forget them.
                        self.pending.push_back(
                            json!({ "type": "lagged", "missed": missed }).to_string(),
                        );
                        let live: std::collections::HashSet<Uuid> =
                            self.registry.live().iter().map(|l| l.flow.id).collect();
                        self.known.retain(|id, _| live.contains(id));
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = self.tick.tick() => self.scan(),
            }
        }
    }
}

pub(super) async fn events(
    State(state): State<Arc<ApiState>>,
    Query(params): Query<Params>,
    ws: streams::MaybeWs,
) -> Result<Response, ApiError> {
    let interval = params.interval.unwrap_or(1000);
    if !(100..=60_000).contains(&interval) {
        return Err(ApiError::bad_request(format!(
            "interval: {interval} is not from 100 to 60000 (ms)"
        )));
    }
    let streams::MaybeWs(Some(ws)) = ws else {
        return Err(ApiError::bad_request("/connections/events is a WebSocket"));
    };
    // Subscribed before the first scan: no close is missed between the two.
    let closes = state.registry.closes();
    let mut tick = tokio::time::interval(Duration::from_millis(interval));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = Events {
        registry: state.registry.clone(),
        closes,
        tick,
        known: HashMap::new(),
        pending: Default::default(),
    };
    let frames = stream::unfold(events, Events::next);
    Ok(streams::websocket(&state, ws, frames))
}
