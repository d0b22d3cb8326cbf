//! Proxy groups and how each picks a member for a flow. `select`: the user's choice (kept in
//! the state directory), else the first member. `url-test`: the fastest by the shared delay
//! history, kept until another is faster by more than `tolerance`; a member with no result is
//! never preferred to one with; TCP and UDP choices are separate. `fallback`: the first member
//! alive. `load-balance`: consistent hashing on the destination (its registrable domain when
//! the flow has a name), round-robin, or sticky sessions. Every kind skips members whose
//! circuit breaker is open; with none left it says so and uses its first.

use std::{
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{Outbounds, checks::Activity, health::TestSpec};
use crate::config::GroupKind;

/// sing-box's default `idle_timeout`: lazy groups stop checking after 30 minutes unused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(1800);

/// What a flow offers for picking a member.
#[derive(Debug, Clone, Copy)]
pub struct Pick<'a> {
    pub udp: bool,
    pub source: IpAddr,
    /// The flow's name and address, for [`Pick::key`] (made only for load-balance groups).
    pub host: Option<&'a str>,
    pub destination: Option<IpAddr>,
}

impl Pick<'_> {
    /// The destination key: the registrable domain of its name, else its address.
    pub fn key(&self) -> String {
        destination_key(self.host, self.destination)
    }
}

/// `load-balance` strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    ConsistentHashing,
    RoundRobin,
    StickySessions,
}

/// How a group checks its members.
#[derive(Debug, Clone)]
pub struct CheckSpec {
    pub spec: TestSpec,
    pub interval: Duration,
    pub lazy: bool,
}

impl CheckSpec {
    /// `expected-status` as mihomo shows it (`*` for any).
    pub fn expected_text(&self) -> String {
        if self.spec.expected.is_empty() {
            return "*".to_owned();
        }
        let parts: Vec<String> = self
            .spec
            .expected
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        parts.join("/")
    }
}

/// A group of outbounds.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub kind: GroupKind,
    /// Member names (proxies, groups, provider proxies), in order.
    pub members: Vec<String>,
    /// The user's choice (select; fixed for url-test and fallback).
    selected: Mutex<Option<String>>,
    pub hidden: bool,
    pub icon: String,
    /// Health checks, for the kinds that run them.
    pub check: Option<CheckSpec>,
    pub tolerance: u64,
    pub max_failed_times: u32,
    pub strategy: Strategy,
    pub interrupt: bool,
    /// Members may not carry UDP (`disable-udp: true`).
    pub disable_udp: bool,
    /// How long a sticky session keeps its member unused.
    pub affinity_ttl: Duration,
    /// When flows last used the group (lazy checks), and its check loop's wake-up.
    pub activity: Arc<Activity>,
    /// The same for the proxy providers whose proxies it has.
    pub providers: Vec<Arc<Activity>>,
    /// Dials through the group that failed since the last check (`max-failed-times`).
    failed: AtomicU32,
    /// url-test's choices: [TCP, UDP].
    chosen: Mutex<[Option<String>; 2]>,
    round_robin: AtomicUsize,
    last_all_dead_log: Mutex<Option<Instant>>,
}

impl Group {
    pub fn new(name: String, kind: GroupKind, members: Vec<String>) -> Group {
        Group {
            name,
            kind,
            members,
            selected: Mutex::new(None),
            hidden: false,
            icon: String::new(),
            check: None,
            tolerance: 0,
            max_failed_times: 5,
            strategy: Strategy::ConsistentHashing,
            interrupt: false,
            disable_udp: false,
            affinity_ttl: super::affinity::TTL,
            activity: Arc::new(Activity::new(IDLE_TIMEOUT)),
            providers: Vec::new(),
            failed: AtomicU32::new(0),
            chosen: Mutex::new([None, None]),
            round_robin: AtomicUsize::new(0),
            last_all_dead_log: Mutex::new(None),
        }
    }

    /// The explicit choice, if any.
    pub fn selected(&self) -> Option<String> {
        self.selected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Chooses (or fixes) `member`; false if it is not one.
    pub fn select(&self, member: &str) -> bool {
        if !self.members.iter().any(|m| m == member) {
            return false;
        }
        *self.selected.lock().unwrap_or_else(|p| p.into_inner()) = Some(member.to_owned());
        true
    }

    /// Clears a fixed choice (`DELETE /proxies/{group}`).
    pub fn unfix(&self) {
        *self.selected.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Notes a flow's use: lazy checks of the group and its providers resume.
    pub fn touch(&self) {
        self.activity.touch();
        for p in &self.providers {
            p.touch();
        }
    }

    /// A dial through the group failed: after `max-failed-times` of them a check runs now.
    pub fn dial_failed(&self) {
        let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        if self.check.is_some() && n >= self.max_failed_times.max(1) {
            self.failed.store(0, Ordering::Relaxed);
            tracing::info!("group {}: {n} dials failed; checking now", self.name);
            self.activity.force();
        }
    }

    /// A check round ran: the failure count starts again.
    pub fn checked(&self) {
        self.failed.store(0, Ordering::Relaxed);
    }

    /// The member shown as `now` (the TCP choice).
    pub fn now(&self, reg: &Outbounds) -> String {
        self.choose(reg, None).unwrap_or_default()
    }

    fn candidates<'a>(&'a self, reg: &Outbounds, udp: bool) -> Vec<&'a String> {
        self.members
            .iter()
            .filter(|m| !udp || reg.carries_udp(m))
            .collect()
    }

    fn alive<'a>(&self, reg: &Outbounds, of: &[&'a String], depth: usize) -> Vec<&'a String> {
        of.iter()
            .copied()
            .filter(|m| reg.alive_at(m, depth))
            .collect()
    }

    fn all_dead(&self) {
        let mut last = self
            .last_all_dead_log
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!("group {}: every member is down; using its first", self.name);
        }
    }

    /// The member a flow (or, without `pick`, the API's view) goes to now.
    pub fn choose(&self, reg: &Outbounds, pick: Option<&Pick<'_>>) -> Option<String> {
        self.choose_at(reg, pick, 0)
    }

    /// [`Group::choose`] at nesting `depth` (members that are groups choose one level deeper).
    pub(super) fn choose_at(
        &self,
        reg: &Outbounds,
        pick: Option<&Pick<'_>>,
        depth: usize,
    ) -> Option<String> {
        let udp = pick.is_some_and(|p| p.udp);
        let candidates = self.candidates(reg, udp);
        let first = candidates
            .first()
            .map(|m| (*m).clone())
            .or_else(|| self.members.first().cloned());
        let alive = self.alive(reg, &candidates, depth);
        match self.kind {
            GroupKind::Select => {
                let chosen = self.selected();
                chosen.filter(|s| self.members.contains(s)).or(first)
            }
            GroupKind::UrlTest | GroupKind::Fallback => {
                if let Some(fixed) = self.selected().filter(|f| alive.contains(&f)) {
                    return Some(fixed);
                }
                if alive.is_empty() {
                    self.all_dead();
                    return first;
                }
                if self.kind == GroupKind::Fallback {
                    return alive.first().map(|m| (*m).clone());
                }
                let slot = usize::from(udp);
                let current = self.chosen.lock().unwrap_or_else(|p| p.into_inner())[slot].clone();
                match current.filter(|c| alive.contains(&c)) {
                    Some(c) => Some(c),
                    None => self.fastest(reg, &alive, None, depth),
                }
            }
            GroupKind::LoadBalance => {
                if alive.is_empty() {
                    self.all_dead();
                    return first;
                }
                let key = pick.map(|p| p.key()).unwrap_or_default();
                let key = key.as_str();
                match self.strategy {
                    Strategy::RoundRobin => {
                        let i = self.round_robin.fetch_add(1, Ordering::Relaxed);
                        Some(alive[i % alive.len()].clone())
                    }
                    Strategy::ConsistentHashing => Some(rendezvous(&alive, key)),
                    Strategy::StickySessions => {
                        let Some(p) = pick else {
                            return Some(rendezvous(&alive, key));
                        };
                        let health = reg.health();
                        let ttl = self.affinity_ttl;
                        let kept = health.affinity.get(&self.name, p.source, key);
                        if let Some(m) = kept.filter(|m| alive.contains(&m)) {
                            health.breakers.affinity(&self.name, true);
                            health.affinity.put(&self.name, p.source, key, &m, ttl);
                            return Some(m);
                        }
                        // New, expired, or its member died: (re)home the pair.
                        health.breakers.affinity(&self.name, false);
                        let m = rendezvous(&alive, &format!("{}|{key}", p.source));
                        health.affinity.put(&self.name, p.source, key, &m, ttl);
                        Some(m)
                    }
                }
            }
        }
    }

    /// url-test: the fastest of `alive`, keeping `current` unless another is faster by more
    /// than the tolerance; members without a result only when none has one.
    fn fastest(
        &self,
        reg: &Outbounds,
        alive: &[&String],
        current: Option<&String>,
        depth: usize,
    ) -> Option<String> {
        let delay = |m: &String| reg.delay_at(m, depth);
        let mut best: Option<(&String, u64)> = current.and_then(|c| delay(c).map(|d| (c, d)));
        for m in alive {
            let Some(d) = delay(m) else { continue };
            match best {
                Some((_, b)) if b <= d + self.tolerance => {}
                _ => best = Some((m, d)),
            }
        }
        best.map(|(m, _)| m.clone())
            .or_else(|| current.cloned())
            .or_else(|| alive.first().map(|m| (*m).clone()))
    }

    /// url-test after a check round: recomputes both choices; returns (old, new) for each
    /// that changed.
    pub fn reselect(&self, reg: &Outbounds) -> Vec<(String, String)> {
        if self.kind != GroupKind::UrlTest {
            return Vec::new();
        }
        let mut changes = Vec::new();
        for (slot, udp) in [(0usize, false), (1, true)] {
            let candidates = self.candidates(reg, udp);
            let alive = self.alive(reg, &candidates, 0);
            let mut chosen = self.chosen.lock().unwrap_or_else(|p| p.into_inner());
            let current = chosen[slot].clone().filter(|c| alive.contains(&c));
            let next = self.fastest(reg, &alive, current.as_ref(), 0);
            if let (Some(old), Some(new)) = (&chosen[slot], &next)
                && old != new
            {
                changes.push((old.clone(), new.clone()));
            }
            chosen[slot] = next;
        }
        changes
    }
}

/// Rendezvous (highest random weight) hashing: a key keeps its member while members join or
/// leave, and only the keys of a leaving member move.
fn rendezvous(members: &[&String], key: &str) -> String {
    members
        .iter()
        .max_by_key(|m| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            key.hash(&mut h);
            m.hash(&mut h);
            h.finish()
        })
        .map(|m| (*m).clone())
        .unwrap_or_default()
}

/// The destination key load balancing hashes: the registrable domain (eTLD+1) of `host`, else
/// the address.
pub fn destination_key(host: Option<&str>, ip: Option<IpAddr>) -> String {
    match host {
        Some(h) => psl::domain_str(h).unwrap_or(h).to_owned(),
        None => ip.map(|i| i.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_only_the_keys_of_a_leaving_member() {
        let names: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
        let all: Vec<&String> = names.iter().collect();
        let without: Vec<&String> = names.iter().filter(|n| *n != "m2").collect();
        let mut moved = 0;
        for k in 0..1000 {
            let key = format!("site{k}.example");
            let (a, b) = (rendezvous(&all, &key), rendezvous(&without, &key));
            if a != "m2" {
                assert_eq!(a, b, "{key} moved though its member stayed");
            } else {
                moved += 1;
            }
        }
        assert!((100..300).contains(&moved), "{moved} keys were on m2");
    }

    #[test]
    fn destination_keys_are_registrable_domains() {
        assert_eq!(
            destination_key(Some("a.b.example.co.uk"), None),
            "example.co.uk"
        );
        assert_eq!(destination_key(Some("www.google.com"), None), "google.com");
        assert_eq!(
            destination_key(None, Some("10.0.0.1".parse().expect("ip"))),
            "10.0.0.1"
        );
    }
}
