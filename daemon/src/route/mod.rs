//! Routing: a flow's metadata → a [`Route`] (the rule that matched, the leaf outbound and
//! mihomo's `chains`). The mode (`rule`, `global`, `direct`) and the current [`Routing`] — the
//! compiled rules, rule providers, geodata and the outbound registry — live in the [`Router`];
//! a reload swaps the whole `Routing` at once, and flows in progress keep what they were given.

mod build;
pub mod check;
pub mod dnsmap;
pub mod engine;
pub mod geo;
pub mod geo_update;
pub mod providers;
pub mod refresh;
pub mod rules;
pub mod sets;
pub mod sniffing;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use arc_swap::ArcSwap;

pub use build::{BuildError, build};
pub use engine::{Env, Query, RuleSets};
pub use rules::Net;

use crate::{
    config::Mode,
    outbound::{GLOBAL, Outbounds, Pick, Proxy},
};

/// Where a flow goes and why.
#[derive(Debug, Clone)]
pub struct Route {
    /// The rule as Clash clients show its type (`DomainSuffix`, `Match`; empty outside rule
    /// mode or when nothing matched).
    pub rule: &'static str,
    /// The rule's payload.
    pub payload: String,
    /// Outbounds from the leaf to the rule's target (mihomo's `chains` order).
    pub chains: Vec<String>,
    /// The leaf that dials.
    pub leaf: Arc<Proxy>,
}

/// Hit counts of one rule.
#[derive(Debug, Default)]
pub struct Hits {
    pub count: AtomicU64,
    /// Unix time of the last hit in nanoseconds (0: never).
    pub last: AtomicU64,
}

impl Hits {
    fn hit(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        self.last.store(now, Ordering::Relaxed);
    }
}

/// Everything a routing decision reads, built from one config.
#[derive(Debug)]
pub struct Routing {
    pub outbounds: Outbounds,
    pub rules: engine::Compiled,
    pub hits: Vec<Hits>,
    pub sub_rules: HashMap<String, engine::Compiled>,
    pub rule_sets: RuleSets,
    pub rule_providers: Vec<Arc<providers::RuleProvider>>,
    /// Proxy providers: name → the proxies they supplied.
    pub proxy_providers: indexmap::IndexMap<String, Vec<String>>,
    pub geo: geo::Geo,
    pub sniffer: sniffing::Sniffing,
    /// [`Routing::needs_process`], worked out once (rule-provider refreshes keep it).
    pub process_needed: std::sync::OnceLock<bool>,
}

impl AsRef<Outbounds> for Routing {
    fn as_ref(&self) -> &Outbounds {
        &self.outbounds
    }
}

impl Routing {
    /// Whether a flow that has `host` is sniffed anyway (`sniffer.force-domain`).
    pub fn sniff_forced(&self, host: &str) -> bool {
        self.sniffer.forced(host, self.env())
    }

    /// Whether a sniffed `host` is ignored (`sniffer.skip-domain`).
    pub fn sniff_skipped(&self, host: &str) -> bool {
        self.sniffer.skipped(host, self.env())
    }

    /// Whether a rule can need the flow's process (`find-process-mode: strict` looks then).
    pub fn needs_process(&self) -> bool {
        *self
            .process_needed
            .get_or_init(|| self.rules.needs_process(self.env()))
    }

    fn env(&self) -> Env<'_> {
        Env {
            geo: &self.geo,
            rule_sets: &self.rule_sets,
            sub_rules: &self.sub_rules,
        }
    }

    /// The route for `q` in rule mode.
    fn by_rules(&self, q: &Query<'_>) -> Route {
        let env = self.env();
        let mut found = self.rules.first(q, env);
        // PASS: matching goes on after that rule.
        while let Some(i) = found {
            let rule = &self.rules.rules[i];
            if rule.sub_rule.is_none() && rule.target == "PASS" {
                found = (i + 1..self.rules.rules.len())
                    .find(|&j| engine::eval(&self.rules.rules[j].cond, q, env));
                continue;
            }
            break;
        }
        let Some(i) = found else {
            // Nothing matched: mihomo goes DIRECT with no rule.
            return self.to("DIRECT", "", String::new(), q);
        };
        self.hits[i].hit();
        let rule = &self.rules.rules[i];
        match &rule.sub_rule {
            None => self.to(&rule.target, rule.kind, rule.payload.clone(), q),
            Some(list) => {
                let sub = &self.sub_rules[list];
                match sub.first(q, env) {
                    Some(j) => {
                        let inner = &sub.rules[j];
                        self.to(&inner.target, inner.kind, inner.payload.clone(), q)
                    }
                    None => self.to("DIRECT", "", String::new(), q),
                }
            }
        }
    }

    /// The route of flow `q` to outbound `name` for `rule`; an outbound that cannot be
    /// resolved (a reload removed it) falls back to DIRECT, saying so.
    fn to(&self, name: &str, rule: &'static str, payload: String, q: &Query<'_>) -> Route {
        let pick = Pick {
            udp: q.network == Net::Udp,
            source: q.source.ip(),
            host: q.host,
            destination: q.destination,
        };
        let (leaf, chains) = match self.outbounds.resolve_for(name, Some(&pick)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("route to {name}: {e}; using DIRECT");
                match self.outbounds.resolve("DIRECT") {
                    Ok(r) => r,
                    Err(_) => unreachable!("DIRECT is built in"),
                }
            }
        };
        Route {
            rule,
            payload,
            chains,
            leaf,
        }
    }
}

/// The mode and the current routing, changed at run time (API, reload).
#[derive(Debug)]
pub struct Router {
    mode: Mutex<Mode>,
    routing: ArcSwap<Routing>,
    /// Stops the health checks of the routing in force.
    checks: Mutex<tokio_util::sync::CancellationToken>,
    /// Told of every change of mode or routing, in the changer's thread (the fast path
    /// recompiles its kernel table before the change is reported done).
    listeners: Listeners,
}

/// A callback run on every change of mode or routing.
pub type OnChange = Box<dyn Fn(&Router) + Send + Sync>;

/// The callbacks.
#[derive(Default)]
struct Listeners(Mutex<Vec<OnChange>>);

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Listeners")
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
    }
}

impl Router {
    /// The router for `routing`, its health checks started (on the current Tokio runtime).
    pub fn new(mode: Mode, routing: Routing) -> Arc<Router> {
        let routing = Arc::new(routing);
        let checks = crate::outbound::checks::spawn(routing.clone());
        Arc::new(Router {
            mode: Mutex::new(mode),
            routing: ArcSwap::new(routing),
            checks: Mutex::new(checks),
            listeners: Listeners::default(),
        })
    }

    pub fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
        self.changed();
    }

    /// Runs `f` after every change of mode or routing from now on.
    pub fn on_change(&self, f: OnChange) {
        self.listeners
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(f);
    }

    fn changed(&self) {
        let listeners = self.listeners.0.lock().unwrap_or_else(|p| p.into_inner());
        for f in listeners.iter() {
            f(self);
        }
    }

    /// The routing in force now.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// Swaps in a new routing (a reload); flows in progress keep theirs, health checks move
    /// to the new one.
    pub fn replace(&self, routing: Routing) {
        let routing = Arc::new(routing);
        let checks = crate::outbound::checks::spawn(routing.clone());
        self.routing.store(routing);
        self.changed();
        let old = std::mem::replace(
            &mut *self.checks.lock().unwrap_or_else(|p| p.into_inner()),
            checks,
        );
        old.cancel();
    }

    /// The route for a new flow, and the routing it came from (to dial with).
    pub fn route(&self, q: &Query<'_>) -> (Route, Arc<Routing>) {
        let routing = self.routing();
        let route = match self.mode() {
            Mode::Rule => routing.by_rules(q),
            Mode::Direct => routing.to("DIRECT", "", String::new(), q),
            Mode::Global => routing.to(GLOBAL, "", String::new(), q),
        };
        (route, routing)
    }
}
