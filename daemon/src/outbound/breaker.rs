//! The health circuit breaker and the per-outbound figures an operator watches. Real traffic
//! feeds the breaker as much as health checks do: a leaf whose dials fail `max-failures` times
//! within a window is dead for a recovery time that doubles on each failed retry up to a cap;
//! a successful check or dial restores it at once.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// When the breaker opens and for how long (the `circuit-breaker:` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Failures within `window` that open the breaker.
    pub max_failures: u32,
    pub window: Duration,
    /// The first recovery time; doubled on each failed retry up to `recovery_cap`.
    pub recovery: Duration,
    pub recovery_cap: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params::from(&crate::config::CircuitBreakerConfig::default())
    }
}

impl From<&crate::config::CircuitBreakerConfig> for Params {
    fn from(c: &crate::config::CircuitBreakerConfig) -> Params {
        Params {
            max_failures: u32::try_from(c.max_failures.0).unwrap_or(u32::MAX),
            window: c.failure_window.duration(),
            recovery: c.recovery_time.duration(),
            recovery_cap: c.max_recovery_time.duration(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Failures within the window.
    failures: Vec<Instant>,
    /// Dead until then.
    open_until: Option<Instant>,
    /// The recovery time the next opening uses.
    backoff: Option<Duration>,
}

/// Dial-time buckets (upper bounds, ms) for the mean and p99.
const BUCKETS: [u64; 12] = [
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10_000,
    u64::MAX,
];

/// What one outbound has done.
#[derive(Debug, Default, Clone)]
pub struct Figures {
    pub active: u64,
    pub dials: u64,
    pub dial_failures: u64,
    dial_ms_sum: u64,
    dial_ms: [u64; BUCKETS.len()],
    /// Sticky-session lookups, and those that found a live member.
    pub affinity_requests: u64,
    pub affinity_hits: u64,
}

impl Figures {
    pub fn dial_mean_ms(&self) -> u64 {
        let ok = self.dials - self.dial_failures;
        self.dial_ms_sum.checked_div(ok).unwrap_or(0)
    }

    /// The bucket bound under which 99 % of successful dials fell.
    pub fn dial_p99_ms(&self) -> u64 {
        let total: u64 = self.dial_ms.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = total - total / 100;
        let mut seen = 0;
        for (i, n) in self.dial_ms.iter().enumerate() {
            seen += n;
            if seen >= want {
                return BUCKETS[i].min(10_000);
            }
        }
        10_000
    }
}

/// Breakers and figures by leaf name.
#[derive(Debug, Default)]
pub struct Breakers {
    params: Mutex<Params>,
    states: Mutex<HashMap<String, State>>,
    figures: Mutex<HashMap<String, Figures>>,
}

impl Breakers {
    /// Takes new parameters (a reload); breakers already open keep their time.
    pub fn configure(&self, params: Params) {
        *self.params.lock().unwrap_or_else(|p| p.into_inner()) = params;
    }

    /// Whether `leaf` is dead now.
    pub fn open(&self, leaf: &str) -> bool {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .get(leaf)
            .and_then(|s| s.open_until)
            .is_some_and(|until| Instant::now() < until)
    }

    /// A failure (a dial or a check); returns true when it opened the breaker.
    pub fn failure(&self, leaf: &str) -> bool {
        let p = *self.params.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let s = states.entry(leaf.to_owned()).or_default();
        s.failures.retain(|t| now.duration_since(*t) < p.window);
        s.failures.push(now);
        let was_open = s.open_until.is_some_and(|u| now < u);
        // A retry after the recovery time that fails again opens for twice as long.
        let retry_failed = s.open_until.is_some_and(|u| now >= u);
        if !was_open && (s.failures.len() as u32 >= p.max_failures.max(1) || retry_failed) {
            let backoff = match (retry_failed, s.backoff) {
                (true, Some(b)) => (b * 2).min(p.recovery_cap),
                _ => p.recovery,
            };
            s.backoff = Some(backoff);
            s.open_until = Some(now + backoff);
            s.failures.clear();
            return true;
        }
        false
    }

    /// A success: the leaf is healthy again.
    pub fn success(&self, leaf: &str) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.remove(leaf);
    }

    /// Records a dial's outcome in the figures.
    pub fn dialed(&self, leaf: &str, ok: bool, took: Duration) {
        let mut figures = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        let f = figures.entry(leaf.to_owned()).or_default();
        f.dials += 1;
        if ok {
            let ms = took.as_millis() as u64;
            f.dial_ms_sum += ms;
            let i = BUCKETS
                .iter()
                .position(|b| ms <= *b)
                .unwrap_or(BUCKETS.len() - 1);
            f.dial_ms[i] += 1;
            f.active += 1;
        } else {
            f.dial_failures += 1;
        }
    }

    /// A flow through `leaf` ended.
    pub fn ended(&self, leaf: &str) {
        let mut figures = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = figures.get_mut(leaf) {
            f.active = f.active.saturating_sub(1);
        }
    }

    /// A sticky-session lookup in group `name`: `hit` if it kept the flow on its member.
    pub fn affinity(&self, name: &str, hit: bool) {
        let mut figures = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        let f = figures.entry(name.to_owned()).or_default();
        f.affinity_requests += 1;
        f.affinity_hits += u64::from(hit);
    }

    pub fn figures(&self, name: &str) -> Figures {
        let figures = self.figures.lock().unwrap_or_else(|p| p.into_inner());
        figures.get(name).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_max_failures_and_a_success_restores() {
        let b = Breakers::default();
        assert!(!b.failure("p") && !b.failure("p"));
        assert!(b.failure("p"), "the third failure opens it");
        assert!(b.open("p"));
        b.success("p");
        assert!(!b.open("p"));
    }

    #[test]
    fn a_failed_retry_doubles_the_recovery_up_to_the_cap() {
        let b = Breakers::default();
        b.configure(Params {
            max_failures: 1,
            window: Duration::from_secs(60),
            recovery: Duration::from_millis(20),
            recovery_cap: Duration::from_millis(50),
        });
        let open_for = |b: &Breakers| {
            let states = b.states.lock().expect("lock");
            let until = states["p"].open_until.expect("open");
            until.duration_since(Instant::now()).as_millis()
        };
        assert!(b.failure("p"));
        assert!(open_for(&b) <= 20);
        // The breaker is still open: more failures change nothing.
        assert!(!b.failure("p"));
        std::thread::sleep(Duration::from_millis(25));
        assert!(!b.open("p"), "recovered: the next dial is the retry");
        assert!(b.failure("p"), "the retry failed");
        assert!((21..=40).contains(&open_for(&b)));
        std::thread::sleep(Duration::from_millis(45));
        assert!(b.failure("p"));
        assert!((41..=50).contains(&open_for(&b)), "capped");
    }

    #[test]
    fn figures_mean_and_p99() {
        let b = Breakers::default();
        for ms in [10, 20, 30] {
            b.dialed("p", true, Duration::from_millis(ms));
        }
        b.dialed("p", false, Duration::ZERO);
        b.ended("p");
        let f = b.figures("p");
        assert_eq!((f.dials, f.dial_failures, f.active), (4, 1, 2));
        assert_eq!(f.dial_mean_ms(), 20);
        assert_eq!(f.dial_p99_ms(), 50);
    }
}
