//! Delay tests and the one delay history every consumer shares (the API's `/proxies` and delay
//! endpoints, group health checks): an HTTP(S) HEAD through an outbound, the delay being the
//! time to the response headers; the last 10 results per leaf, newest last, as mihomo keeps
//! them. A failed test clears the leaf's history and marks it not alive.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use super::{Outbounds, affinity::Affinity, breaker::Breakers};

/// Delay tests running at once, across every group and check round.
pub const MAX_TESTS: usize = 10;

/// Flow switches a group's choice change should cause: (group, old member).
type OnSwitch = Box<dyn Fn(&str, &str) + Send + Sync>;

/// Everything about outbounds' health that outlives a reload: the delay history, circuit
/// breakers and figures, sticky sessions, and the bound on concurrent tests.
pub struct Health {
    pub history: History,
    pub breakers: Breakers,
    pub affinity: Affinity,
    pub tests: tokio::sync::Semaphore,
    /// Closes the flows through a group's old member (`interrupt-exist-connections`).
    pub on_switch: std::sync::OnceLock<OnSwitch>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

impl Health {
    /// Health with sticky sessions kept in `state_dir`.
    pub fn new(state_dir: Option<std::path::PathBuf>) -> Health {
        Health {
            history: History::default(),
            breakers: Breakers::default(),
            affinity: Affinity::load(state_dir),
            tests: tokio::sync::Semaphore::new(MAX_TESTS),
            on_switch: std::sync::OnceLock::new(),
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new(None)
    }
}

/// How often sticky sessions are written to the state directory (and at shutdown).
const AFFINITY_SAVE: Duration = Duration::from_secs(60);

/// Writes sticky sessions that changed every [`AFFINITY_SAVE`] until `cancel`.
pub async fn keep_affinity(
    health: std::sync::Arc<Health>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(AFFINITY_SAVE) => health.affinity.save_if_changed(),
            () = cancel.cancelled() => return,
        }
    }
}

/// Results kept per outbound.
pub const KEEP: usize = 10;
/// mihomo's default test URL.
pub const DEFAULT_URL: &str = "https://www.gstatic.com/generate_204";
/// mihomo's default check interval, in seconds.
pub const DEFAULT_INTERVAL: u64 = 300;
/// mihomo's default test timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5000);

/// One delay test's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestSpec {
    pub url: url::Url,
    pub timeout: Duration,
    /// Accepted statuses as inclusive ranges; empty: any.
    pub expected: Vec<(u16, u16)>,
}

impl Default for TestSpec {
    fn default() -> Self {
        TestSpec {
            url: url::Url::parse(DEFAULT_URL).unwrap_or_else(|_| unreachable!("a valid URL")),
            timeout: DEFAULT_TIMEOUT,
            expected: Vec::new(),
        }
    }
}

/// mihomo's `expected-status`: `*`, codes and ranges separated by `/` (`204`, `200/204`,
/// `200-299`).
pub fn parse_expected(spec: &str) -> Option<Vec<(u16, u16)>> {
    if spec.trim() == "*" {
        return Some(Vec::new());
    }
    spec.split('/')
        .map(|part| {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
            (a <= b).then_some((a, b))
        })
        .collect()
}

/// Why a test failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Error(String),
}

/// One test through outbound `via` (a leaf or group name): the delay in milliseconds.
pub async fn measure(outbounds: &Outbounds, via: &str, spec: &TestSpec) -> Result<u64, Failure> {
    let request = crate::fetch::Request_ {
        url: &spec.url,
        method: hyper::Method::HEAD,
        via,
        timeout: spec.timeout,
        max_body: 0,
        verify: true,
    };
    let response = crate::fetch::once(outbounds, &request)
        .await
        .map_err(|e| match e {
            crate::fetch::Error::Timeout(_) => Failure::Timeout,
            e => Failure::Error(e.to_string()),
        })?;
    let status = response.status.as_u16();
    if !spec.expected.is_empty()
        && !spec
            .expected
            .iter()
            .any(|(a, b)| (*a..=*b).contains(&status))
    {
        return Err(Failure::Error(format!("status {status} was not expected")));
    }
    Ok(response.headers_after.as_millis().max(1) as u64)
}

#[derive(Debug, Default)]
struct Entry {
    results: VecDeque<(SystemTime, u64)>,
    alive: bool,
}

/// Delay results by leaf name.
#[derive(Debug)]
pub struct History {
    map: Mutex<HashMap<String, Entry>>,
    /// Bumped on every result: whoever chooses by delay looks again (the update hook).
    updated: tokio::sync::watch::Sender<u64>,
}

impl Default for History {
    fn default() -> Self {
        History {
            map: Mutex::default(),
            updated: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl History {
    /// Changes whenever a result is recorded (or [`History::changed`] is called).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.updated.subscribe()
    }

    /// Tells subscribers that aliveness changed otherwise (a breaker opened).
    pub fn changed(&self) {
        self.updated.send_modify(|n| *n += 1);
    }

    /// Records a result for `name`: a delay is kept (10 at most); a failure clears the history.
    pub fn record(&self, name: &str, result: Result<u64, &Failure>) {
        {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            let entry = map.entry(name.to_owned()).or_default();
            match result {
                Ok(delay) => {
                    if entry.results.len() == KEEP {
                        entry.results.pop_front();
                    }
                    entry.results.push_back((SystemTime::now(), delay));
                    entry.alive = true;
                }
                Err(_) => {
                    entry.results.clear();
                    entry.alive = false;
                }
            }
        }
        self.changed();
    }

    /// The results for `name`, oldest first.
    pub fn of(&self, name: &str) -> Vec<(SystemTime, u64)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name)
            .map(|e| e.results.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The newest delay, if the last test succeeded.
    pub fn last(&self, name: &str) -> Option<(SystemTime, u64)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).and_then(|e| e.results.back().copied())
    }

    /// False once a test failed (until one succeeds); true for an outbound never tested.
    pub fn alive(&self, name: &str) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).is_none_or(|e| e.alive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mihomos_expected_status_forms() {
        assert_eq!(parse_expected("204"), Some(vec![(204, 204)]));
        assert_eq!(
            parse_expected("200/204"),
            Some(vec![(200, 200), (204, 204)])
        );
        assert_eq!(parse_expected("200-299"), Some(vec![(200, 299)]));
        assert_eq!(parse_expected("*"), Some(vec![]));
        assert_eq!(parse_expected("299-200"), None);
        assert_eq!(parse_expected("abc"), None);
    }

    #[test]
    fn ten_results_newest_last_and_a_failure_clears() {
        let h = History::default();
        assert!(h.alive("p"), "never tested");
        for d in 1..=12 {
            h.record("p", Ok(d));
        }
        let got: Vec<u64> = h.of("p").iter().map(|r| r.1).collect();
        assert_eq!(got, (3..=12).collect::<Vec<_>>());
        h.record("p", Err(&Failure::Timeout));
        assert!(h.of("p").is_empty() && !h.alive("p"));
        h.record("p", Ok(5));
        assert!(h.alive("p"));
    }
}
