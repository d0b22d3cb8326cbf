//! Per-second rates: every second, each live flow's bytes since the previous second (for
//! `uploadSpeed`/`downloadSpeed`) and the global totals' delta (for `/traffic`); also the
//! process's memory for `/memory`.

use std::{sync::Arc, time::Duration};

use dashmap::DashMap;
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

/// Per-flow speeds from the last sample.
#[derive(Debug, Default)]
pub struct Speeds {
    /// id → (traffic at the last sample, speed over the second before it)
    flows: DashMap<Uuid, (Traffic, Traffic)>,
}

impl Speeds {
    /// Bytes per second over the last second (zero for a flow younger than a sample).
    pub fn of(&self, id: &Uuid) -> Traffic {
        self.flows.get(id).map(|e| e.1).unwrap_or_default()
    }
}

/// The sampler's outputs.
#[derive(Debug, Clone)]
pub struct Rates {
    pub speeds: Arc<Speeds>,
    pub traffic: watch::Receiver<TrafficTick>,
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
    let rates = Rates {
        speeds: speeds.clone(),
        traffic: rx,
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
            let (live, totals) = registry.live_and_totals();
            for f in &live {
                let now = f.traffic;
                let mut entry = speeds
                    .flows
                    .entry(f.flow.id)
                    .or_insert((now, Traffic::default()));
                let (prev, _) = *entry;
                *entry = (
                    now,
                    Traffic {
                        upload: now.upload.saturating_sub(prev.upload),
                        download: now.download.saturating_sub(prev.download),
                    },
                );
            }
            speeds
                .flows
                .retain(|id, _| live.iter().any(|f| f.flow.id == *id));
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

/// The memory limit of this process's cgroup (v2 `memory.max`, else v1), 0 if none.
pub fn memory_limit() -> u64 {
    let v2 = crate::cgroup::own()
        .ok()
        .and_then(|dir| std::fs::read_to_string(dir.join("memory.max")).ok());
    let limit = v2.or_else(|| {
        let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = membership
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()))?;
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory{rel}/memory.limit_in_bytes")).ok()
    });
    limit
        .and_then(|l| l.trim().parse::<u64>().ok())
        // v1 reports "no limit" as a huge page-aligned number.
        .filter(|&l| l < (1 << 62))
        .unwrap_or(0)
}
