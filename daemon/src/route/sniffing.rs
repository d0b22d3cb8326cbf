//! mihomo's `sniffer:` block as flows ask it: `force-domain` and `skip-domain` compiled once
//! per routing (plain patterns, `geosite:a,b`, `rule-set:x,y`), and the destinations whose
//! sniffing keeps failing (mihomo skips a destination after more than 5 failures in a row,
//! for 10 minutes, remembering at most 128 of them).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use lru::LruCache;

use super::{
    Net,
    check::Problem,
    engine::{self, Env, Query},
    rules::Cond,
    sets::{DomainPattern, DomainSet, DomainSetBuilder},
};
use crate::config::SniffConfig;

/// Failures in a row after which a destination is no longer sniffed (mihomo's).
const FAILURES_TO_SKIP: u8 = 5;
/// How long failures are remembered (mihomo's).
const FAILURES_KEPT: Duration = Duration::from_secs(600);
/// Destinations remembered at most (mihomo's).
const FAILING_DESTINATIONS: usize = 128;

/// A `force-domain` or `skip-domain` list.
#[derive(Debug, Default)]
struct Domains {
    set: DomainSet,
    /// `geosite:` and `rule-set:` entries.
    conds: Vec<Cond>,
}

impl Domains {
    fn new(
        entries: &[String],
        key: &str,
        known_sets: &dyn Fn(&str) -> bool,
    ) -> Result<Domains, Problem> {
        let mut set = DomainSetBuilder::default();
        let mut conds = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let lower = entry.to_ascii_lowercase();
            if let Some(names) = lower.strip_prefix("geosite:") {
                conds.extend(names.split(',').map(|n| Cond::GeoSite(n.trim().to_owned())));
            } else if let Some(names) = entry.strip_prefix("rule-set:") {
                for name in names.split(',').map(str::trim) {
                    if !known_sets(name) {
                        return Err((
                            format!("{key}[{i}]"),
                            format!("no rule-provider named `{name}`"),
                        ));
                    }
                    conds.push(Cond::RuleSet {
                        name: name.to_owned(),
                        src: false,
                    });
                }
            } else {
                let pattern = DomainPattern::from_entry(&lower)
                    .ok_or_else(|| (format!("{key}[{i}]"), format!("`{entry}` is not a domain")))?;
                set.add(pattern, 0);
            }
        }
        Ok(Domains {
            set: set.build().map_err(|e| (key.to_owned(), e))?,
            conds,
        })
    }

    fn matches(&self, host: &str, env: Env<'_>) -> bool {
        if self.set.first(host).is_some() {
            return true;
        }
        if self.conds.is_empty() {
            return false;
        }
        let q = Query {
            network: Net::Tcp,
            source: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            destination: None,
            destination_port: 0,
            host: Some(host),
            in_port: 0,
            in_type: "",
            in_name: "",
            in_user: None,
            uid: None,
            process: None,
            process_path: None,
        };
        self.conds.iter().any(|c| engine::eval(c, &q, env))
    }
}

/// The sniffer of one routing.
#[derive(Debug)]
pub struct Sniffing {
    pub config: SniffConfig,
    force: Domains,
    skip: Domains,
    /// Destination → (failures in a row, last failure).
    failing: Mutex<LruCache<(IpAddr, u16), (u8, Instant)>>,
}

impl Sniffing {
    /// Compiles `config`; `known_sets` tells which rule-provider names exist.
    pub fn new(
        config: &SniffConfig,
        known_sets: &dyn Fn(&str) -> bool,
    ) -> Result<Sniffing, Problem> {
        Ok(Sniffing {
            force: Domains::new(&config.force_domain, "sniffer.force-domain", known_sets)?,
            skip: Domains::new(&config.skip_domain, "sniffer.skip-domain", known_sets)?,
            config: config.clone(),
            failing: Mutex::new(LruCache::new(
                NonZeroUsize::new(FAILING_DESTINATIONS).expect("non-zero"),
            )),
        })
    }

    /// GEOSITE lists the block names (so they are loaded with the rules' own).
    pub fn geosites(config: &SniffConfig) -> impl Iterator<Item = String> + '_ {
        config
            .force_domain
            .iter()
            .chain(&config.skip_domain)
            .filter_map(|e| {
                e.to_ascii_lowercase()
                    .strip_prefix("geosite:")
                    .map(str::to_owned)
            })
            .flat_map(|names| {
                names
                    .split(',')
                    .map(|n| n.trim().to_owned())
                    .collect::<Vec<_>>()
            })
    }

    /// Whether a flow that already has `host` is sniffed anyway.
    pub fn forced(&self, host: &str, env: Env<'_>) -> bool {
        self.force.matches(host, env)
    }

    /// Whether a sniffed `host` is ignored.
    pub fn skipped(&self, host: &str, env: Env<'_>) -> bool {
        self.skip.matches(host, env)
    }

    /// Whether sniffing `to` failed too often lately to try again.
    pub fn failing(&self, to: (IpAddr, u16)) -> bool {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match failing.get(&to) {
            Some(&(n, at)) if at.elapsed() < FAILURES_KEPT => n > FAILURES_TO_SKIP,
            Some(_) => {
                failing.pop(&to);
                false
            }
            None => false,
        }
    }

    /// Records how sniffing `to` went.
    pub fn record(&self, to: (IpAddr, u16), found: bool) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if found {
            failing.pop(&to);
            return;
        }
        let now = Instant::now();
        let n = match failing.get(&to) {
            Some(&(n, at)) if at.elapsed() < FAILURES_KEPT => n,
            _ => 0,
        };
        failing.put(to, (n.saturating_add(1).min(FAILURES_TO_SKIP + 1), now));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::route::geo::Geo;

    fn env<'a>(
        geo: &'a Geo,
        sets: &'a engine::RuleSets,
        subs: &'a HashMap<String, engine::Compiled>,
    ) -> Env<'a> {
        Env {
            geo,
            rule_sets: sets,
            sub_rules: subs,
        }
    }

    #[test]
    fn patterns_match_like_mihomo_and_bad_entries_name_their_key() {
        let config = SniffConfig {
            force_domain: vec!["+.Force.test".into(), "exact.test".into()],
            skip_domain: vec!["*.skip.test".into()],
            ..SniffConfig::default()
        };
        let s = Sniffing::new(&config, &|_| false).expect("compiles");
        let (geo, sets, subs) = (Geo::default(), HashMap::new(), HashMap::new());
        let env = env(&geo, &sets, &subs);
        assert!(s.forced("a.b.force.test", env));
        assert!(s.forced("force.test", env));
        assert!(s.forced("exact.test", env));
        assert!(!s.forced("x.exact.test", env));
        assert!(s.skipped("one.skip.test", env));
        assert!(!s.skipped("two.one.skip.test", env));
        let bad = SniffConfig {
            skip_domain: vec!["ok.test".into(), "rule-set:missing".into()],
            ..SniffConfig::default()
        };
        let e = Sniffing::new(&bad, &|_| false).expect_err("unknown set");
        assert_eq!(e.0, "sniffer.skip-domain[1]", "{e:?}");
        assert_eq!(
            Sniffing::geosites(&SniffConfig {
                force_domain: vec!["GEOSITE:cn,google".into()],
                ..SniffConfig::default()
            })
            .collect::<Vec<_>>(),
            ["cn", "google"]
        );
    }

    #[test]
    fn a_destination_is_skipped_after_more_than_five_failures_until_one_succeeds() {
        let s = Sniffing::new(&SniffConfig::default(), &|_| false).expect("compiles");
        let to = (IpAddr::from([10, 0, 0, 1]), 443);
        for _ in 0..5 {
            s.record(to, false);
            assert!(!s.failing(to));
        }
        s.record(to, false);
        assert!(s.failing(to));
        assert!(!s.failing((to.0, 444)));
        s.record(to, true);
        assert!(!s.failing(to));
        for i in 0..1000u16 {
            s.record((to.0, i), false);
        }
        assert_eq!(s.failing.lock().expect("lock").len(), FAILING_DESTINATIONS);
    }
}
