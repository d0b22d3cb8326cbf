//! The OOM kill switch (sing-box's, made adaptive): memory is sampled more often as it nears
//! the limit; above it, flows are closed — the newest first until usage is under the low-water
//! mark, or all of them with `memory-kill-all` — and new flows are refused for a cool-down.
//! Closed flows finish as any closed flow does, so their totals are kept. One log line per trip.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{config::Config, memory::Memory, registry::Registry};

/// Share of the cgroup's limit used when `memory-limit` is not given.
const DEFAULT_SHARE: f64 = 0.8;
/// Closing stops once usage is under this share of the limit.
const LOW_WATER: f64 = 0.9;
/// How long closed flows get to release their memory before usage is read again.
const SETTLE: Duration = Duration::from_millis(20);

/// The switch and what it has done.
#[derive(Debug)]
pub struct KillSwitch {
    memory: Memory,
    /// The configured limit (`memory-limit`); None: a share of the cgroup's.
    configured: Option<u64>,
    kill_all: bool,
    cooldown: Duration,
    refusing: AtomicBool,
    /// The limit as last read, bytes (0: off).
    limit: AtomicU64,
    /// Last usage read, bytes.
    pub usage: AtomicU64,
    pub trips: AtomicU64,
    pub closed: AtomicU64,
    pub refused: AtomicU64,
}

impl KillSwitch {
    pub fn new(config: &Config, memory: Memory) -> KillSwitch {
        let switch = KillSwitch {
            memory,
            configured: config.memory_limit.map(|b| b.0),
            kill_all: config.memory_kill_all,
            cooldown: Duration::from_secs(config.memory_cooldown.0),
            refusing: AtomicBool::new(false),
            limit: AtomicU64::new(0),
            usage: AtomicU64::new(0),
            trips: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        };
        let limit = switch.limit();
        switch.limit.store(limit, Ordering::Relaxed);
        if limit > 0 {
            tracing::info!(
                "memory kill switch: limit {} ({:?})",
                mib(limit),
                switch.memory
            );
        }
        switch
    }

    /// The limit as last read (0: off).
    pub fn limit_now(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// The limit in force, bytes (0: the switch is off). Read again each time: an operator
    /// may change the cgroup's limit while the daemon runs.
    fn limit(&self) -> u64 {
        match self.configured {
            Some(limit) => limit,
            None => (self.memory.limit() as f64 * DEFAULT_SHARE) as u64,
        }
    }

    /// Whether a new flow may start now; a refusal is counted.
    pub fn admit(&self) -> bool {
        if self.refusing.load(Ordering::Relaxed) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Whether new flows are being refused (tripped or cooling down).
    pub fn tripped(&self) -> bool {
        self.refusing.load(Ordering::Relaxed)
    }

    fn sample(&self) -> u64 {
        let used = self.memory.usage();
        self.usage.store(used, Ordering::Relaxed);
        used
    }

    /// Watches memory until `cancel`.
    pub async fn run(self: Arc<Self>, registry: Arc<Registry>, cancel: CancellationToken) {
        loop {
            let limit = self.limit();
            self.limit.store(limit, Ordering::Relaxed);
            let used = self.sample();
            if limit > 0 && used > limit {
                self.trip(&registry, used, limit).await;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(self.cooldown) => {}
                }
                self.refusing.store(false, Ordering::Relaxed);
                tracing::info!("memory kill switch: accepting new flows again");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(interval(used, limit)) => {}
            }
        }
    }

    async fn trip(&self, registry: &Registry, used: u64, limit: u64) {
        self.refusing.store(true, Ordering::Relaxed);
        self.trips.fetch_add(1, Ordering::Relaxed);
        let low = (limit as f64 * LOW_WATER) as u64;
        let mut closed = 0;
        let now = loop {
            let batch = if self.kill_all {
                usize::MAX
            } else {
                (registry.live_count() / 16).max(1)
            };
            let n = registry.close_newest(batch);
            closed += n;
            tokio::time::sleep(SETTLE).await;
            trim();
            let now = self.sample();
            if n == 0 || self.kill_all || now <= low {
                break now;
            }
        };
        self.closed.fetch_add(closed as u64, Ordering::Relaxed);
        tracing::warn!(
            "memory kill switch: {} in use over the limit of {}; closed {closed} flows ({}), \
             now {}; refusing new flows for {} s",
            mib(used),
            mib(limit),
            if self.kill_all { "all" } else { "newest first" },
            mib(now),
            self.cooldown.as_secs(),
        );
    }
}

/// How long until the next sample: a second when far from the limit, down to 10 ms near it.
fn interval(used: u64, limit: u64) -> Duration {
    if limit == 0 {
        return Duration::from_secs(5);
    }
    let ratio = used as f64 / limit as f64;
    Duration::from_millis(match ratio {
        r if r < 0.5 => 1000,
        r if r < 0.8 => 250,
        r if r < 0.95 => 50,
        _ => 10,
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Gives freed heap back to the kernel (what sing-box does with `debug.FreeOSMemory`).
fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_quickens_near_the_limit() {
        let gib = 1 << 30;
        let steps: Vec<u64> = [0, gib / 2, gib * 85 / 100, gib * 96 / 100, 2 * gib]
            .iter()
            .map(|&u| interval(u, gib).as_millis() as u64)
            .collect();
        assert_eq!(steps, [1000, 250, 50, 10, 10]);
        assert_eq!(interval(gib, 0), Duration::from_secs(5));
    }
}
