//! Per-second rates: every second, each live flow's bytes since the previous second (for
//! `uploadSpeed`/`downloadSpeed`) and the global totals' delta (for `/traffic`); also the
//! process's memory for `/memory`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use axum::extract::ws::Utf8Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::registry::{Registry, Traffic};

/// `/traffic`: bytes in the last second and since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTick {
    pub up: u64,
    pub down: u64,
    pub up_total: u64,
    pub down_total: u64,
}

/// id → (traffic at the last sample, speed over the second before it). foldhash: looked up
/// once per flow by every snapshot, where SipHash showed in the profile.
pub type Samples = HashMap<Uuid, (Traffic, Traffic), foldhash::fast::RandomState>;

/// Per-flow speeds from the last sample, replaced whole each second.
#[derive(Debug, Default)]
pub struct Speeds {
    flows: ArcSwap<Samples>,
}

impl Speeds {
    /// Every flow's bytes per second over the last second (a flow younger than a sample is
    /// absent), loaded once for reading many.
    pub fn all(&self) -> Arc<Samples> {
        self.flows.load_full()
    }
}

/// The next sample from the previous one and the live flows' traffic now: linear in the
/// number of flows; flows that ended drop out, new ones start at speed zero.
pub fn advance(prev: &Samples, live: impl Iterator<Item = (Uuid, Traffic)>) -> Samples {
    live.map(|(id, now)| {
        let before = prev.get(&id).map_or(now, |e| e.0);
        let speed = Traffic {
            upload: now.upload.saturating_sub(before.upload),
            download: now.download.saturating_sub(before.download),
        };
        (id, (now, speed))
    })
    .collect()
}

/// A `/connections` frame and when it was made (None: not yet).
pub type Frame = (Option<std::time::Instant>, Utf8Bytes);

/// The sampler's outputs.
#[derive(Debug, Clone)]
pub struct Rates {
    pub speeds: Arc<Speeds>,
    pub traffic: watch::Receiver<TrafficTick>,
    /// `/connections` as JSON, serialized once per tick while someone subscribes (the
    /// WebSockets at the default interval): every client sends the same bytes.
    pub connections: Arc<watch::Sender<Frame>>,
    /// The last first frame made for a WebSocket that found no frame of this tick: clients
    /// connecting together wait on the one being made instead of each making their own.
    pub first: Arc<tokio::sync::Mutex<Frame>>,
}

/// Samples `registry` once a second until `cancel`.
pub fn start(
    registry: Arc<Registry>,
    cancel: CancellationToken,
) -> (Rates, impl Future<Output = ()>) {
    let speeds = Arc::new(Speeds::default());
    let initial = registry.totals();
    let (tx, rx) = watch::channel(TrafficTick {
        up_total: initial.upload,
        down_total: initial.download,
        ..TrafficTick::default()
    });
    let connections = Arc::new(watch::Sender::new((None, Utf8Bytes::default())));
    let rates = Rates {
        speeds: speeds.clone(),
        traffic: rx,
        connections: connections.clone(),
        first: Arc::default(),
    };
    let task = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut last = initial;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Milliseconds at 10k flows (a batch read, maybe a frame): off the workers.
            let (registry, speeds, connections) =
                (registry.clone(), speeds.clone(), connections.clone());
            let sampled =
                tokio::task::spawn_blocking(move || sample(&registry, &speeds, &connections));
            let Ok(totals) = sampled.await else { return };
            let _ = tx.send(TrafficTick {
                up: totals.upload.saturating_sub(last.upload),
                down: totals.download.saturating_sub(last.download),
                up_total: totals.upload,
                down_total: totals.download,
            });
            last = totals;
        }
    };
    (rates, task)
}

/// One tick: every live flow's speed, the shared `/connections` frame when someone follows
/// it, and the totals.
fn sample(registry: &Registry, speeds: &Speeds, connections: &watch::Sender<Frame>) -> Traffic {
    let (live, totals) = registry.live_and_totals();
    let next = advance(
        &speeds.flows.load(),
        live.iter().map(|f| (f.flow.id, f.traffic)),
    );
    speeds.flows.store(Arc::new(next));
    if connections.receiver_count() > 0 {
        let frame = crate::snapshot::json_of(&live, totals, speeds);
        connections.send_replace((Some(std::time::Instant::now()), frame.into()));
    }
    totals
}

/// Resident set size of this process in bytes.
pub fn rss() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(upload: u64, download: u64) -> Traffic {
        Traffic { upload, download }
    }

    #[test]
    fn speeds_are_deltas_and_ended_flows_drop_out() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let first = advance(
            &Samples::default(),
            [(a, t(10, 20)), (b, t(5, 5))].into_iter(),
        );
        assert_eq!(first[&a], (t(10, 20), t(0, 0)), "a new flow starts at zero");
        let second = advance(&first, [(a, t(110, 20)), (c, t(1, 1))].into_iter());
        assert_eq!(second[&a].1, t(100, 0));
        assert!(!second.contains_key(&b), "ended flows drop out");
        assert_eq!(second.len(), 2);
    }

    /// 200,000 flows: a quadratic step would take hours; a linear one a fraction of a second.
    #[test]
    fn a_tick_is_linear_in_the_number_of_flows() {
        let ids: Vec<Uuid> = (0..200_000).map(|_| Uuid::new_v4()).collect();
        let mut samples = Samples::default();
        for tick in 1..=3u64 {
            samples = advance(&samples, ids.iter().map(|id| (*id, t(tick * 10, tick))));
        }
        assert_eq!(samples.len(), ids.len());
        assert!(samples.values().all(|e| e.1 == t(10, 1)));
    }
}
