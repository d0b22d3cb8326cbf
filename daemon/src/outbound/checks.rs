//! Health checks that cost little: one loop per checking group and per proxy provider with
//! `health-check.enable`, a round at start and then every `interval`; members tested within
//! the interval are skipped unless the round is forced (by `max-failed-times`); lazy groups stop
//! after `idle-timeout` without flows and resume (at once) on the next; every test in every
//! loop shares one bound of [`super::health::MAX_TESTS`]. A watcher follows the delay history's
//! updates and recomputes url-test and fallback choices, closing flows through a member left
//! behind when the group says `interrupt-exist-connections`.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::{
    CheckSpec, Node, Outbounds,
    health::{self, Failure, TestSpec},
};
use crate::config::GroupKind;

/// When something (a group, a provider) was last used, and the wake-up of its check loop.
#[derive(Debug)]
pub struct Activity {
    /// Milliseconds since `epoch`, plus one (0: never used).
    last_used: AtomicU64,
    epoch: Instant,
    idle_timeout: Duration,
    wake: tokio::sync::Notify,
    /// The next round tests every member, fresh or not.
    force: AtomicBool,
}

impl Activity {
    pub fn new(idle_timeout: Duration) -> Activity {
        Activity {
            last_used: AtomicU64::new(0),
            epoch: Instant::now(),
            idle_timeout,
            wake: tokio::sync::Notify::new(),
            force: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        1 + self.epoch.elapsed().as_millis() as u64
    }

    /// A flow used it; true if it had been idle (a lazy loop resumes now).
    pub fn touch(&self) {
        let now = self.now();
        let before = self.last_used.swap(now, Ordering::Relaxed);
        if before == 0 || now - before > self.idle_timeout.as_millis() as u64 {
            self.wake.notify_one();
        }
    }

    /// No flow for the idle timeout (or ever).
    pub fn idle(&self) -> bool {
        let last = self.last_used.load(Ordering::Relaxed);
        last == 0 || self.now() - last > self.idle_timeout.as_millis() as u64
    }

    /// Asks for a forced round now.
    pub fn force(&self) {
        self.force.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
}

/// Tests leaf `leaf` within the global bound and records the result (history, breaker).
pub async fn test(reg: &Outbounds, leaf: &str, spec: &TestSpec) -> Result<u64, Failure> {
    let health = reg.health();
    let _permit = health.tests.acquire().await;
    let result = health::measure(reg, leaf, spec).await;
    health.history.record(leaf, result.as_ref().copied());
    match &result {
        Ok(_) => health.breakers.success(leaf),
        Err(_) => {
            health.breakers.failure(leaf);
        }
    }
    result
}

/// One round over `members`: each leaf once, skipping fresh results unless forced.
async fn round(reg: &Outbounds, members: &[String], check: &CheckSpec, force: bool) {
    let history = &reg.health().history;
    let mut seen = HashSet::new();
    let leaves: Vec<String> = members
        .iter()
        .filter_map(|m| reg.resolve(m).ok().map(|(leaf, _)| leaf.name.clone()))
        .filter(|leaf| seen.insert(leaf.clone()))
        .filter(|leaf| {
            force
                || history
                    .last(leaf)
                    .is_none_or(|(t, _)| t.elapsed().map_or(true, |age| age >= check.interval))
        })
        .collect();
    futures_util::future::join_all(leaves.iter().map(|leaf| test(reg, leaf, &check.spec))).await;
}

/// What one loop checks.
struct Job {
    name: String,
    members: Vec<String>,
    check: CheckSpec,
    activity: Arc<Activity>,
}

async fn run<T: AsRef<Outbounds>>(owner: Arc<T>, job: Job, cancel: CancellationToken) {
    let mut first = true;
    loop {
        if !first && job.check.lazy && job.activity.idle() {
            tracing::debug!("{}: idle; checks wait for a flow", job.name);
            tokio::select! {
                () = job.activity.wake.notified() => {}
                () = cancel.cancelled() => return,
            }
        }
        first = false;
        let force = job.activity.force.swap(false, Ordering::Relaxed);
        tokio::select! {
            () = round((*owner).as_ref(), &job.members, &job.check, force) => {}
            () = cancel.cancelled() => return,
        }
        if let Some(g) = (*owner).as_ref().group(&job.name) {
            g.checked();
        }
        tokio::select! {
            () = tokio::time::sleep(job.check.interval) => {}
            () = job.activity.wake.notified() => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Recomputes url-test and fallback choices whenever the history changes.
async fn watch<T: AsRef<Outbounds>>(owner: Arc<T>, cancel: CancellationToken) {
    let mut updates = (*owner).as_ref().health().history.subscribe();
    loop {
        let reg = (*owner).as_ref();
        for (_, node) in reg.iter() {
            let Node::Group(g) = node else { continue };
            for (old, new) in g.reselect(reg) {
                tracing::info!("group {}: {old} → {new}", g.name);
                if g.interrupt
                    && let Some(close) = reg.health().on_switch.get()
                {
                    close(&g.name, &old);
                }
            }
        }
        tokio::select! {
            r = updates.changed() => if r.is_err() { return },
            () = cancel.cancelled() => return,
        }
    }
}

/// Starts the checks of `owner`'s outbounds; they stop when the token is cancelled.
pub fn spawn<T: AsRef<Outbounds> + Send + Sync + 'static>(owner: Arc<T>) -> CancellationToken {
    let cancel = CancellationToken::new();
    let reg = (*owner).as_ref();
    let mut jobs = Vec::new();
    for (name, node) in reg.iter() {
        if let Node::Group(g) = node
            && let Some(check) = &g.check
            && g.kind != GroupKind::Select
        {
            jobs.push(Job {
                name: name.clone(),
                members: g.members.clone(),
                check: check.clone(),
                activity: g.activity.clone(),
            });
        }
    }
    for p in &reg.provider_checks {
        jobs.push(Job {
            name: p.name.clone(),
            members: p.members.clone(),
            check: p.check.clone(),
            activity: p.activity.clone(),
        });
    }
    for job in jobs {
        tokio::spawn(run(owner.clone(), job, cancel.clone()));
    }
    tokio::spawn(watch(owner, cancel.clone()));
    cancel
}
