//! The registry of outbounds by name, built from the config (and the proxies providers
//! supplied): resolving a name through groups to a leaf with its `chains`, dialing through a
//! leaf (with `dialer-proxy` chains), and group choices kept in the state directory.

use std::{collections::HashMap, future::Future, path::PathBuf, pin::Pin, sync::Arc};

use indexmap::IndexMap;

use super::{
    CheckSpec, Error, Group, Health, Kind, Pick, Proxy, ProxySpec, SocketOpts, Strategy, Target,
    UdpSession, Upstream, checks::Activity, health, http, socks5,
};
use crate::config::{Config, GroupConfig, GroupKind, HealthCheckConfig, ProxyConfig, ProxyKind};

/// The name of the group `mode: global` follows.
pub const GLOBAL: &str = "GLOBAL";
/// Built-in leaves, in the order mihomo lists them.
pub const BUILTINS: [&str; 5] = ["DIRECT", "REJECT", "REJECT-DROP", "PASS", "COMPATIBLE"];
/// How deep groups may nest.
const MAX_DEPTH: usize = 32;
/// The file in the state directory holding group choices.
pub const SELECTIONS_FILE: &str = "selections.json";

/// A named outbound.
#[derive(Debug, Clone)]
pub enum Node {
    Proxy(Arc<Proxy>),
    Group(Arc<Group>),
}

/// Every outbound, by name, in mihomo's order.
#[derive(Debug, Default)]
pub struct Outbounds {
    nodes: IndexMap<String, Node>,
    /// Where group choices are kept (None: not kept).
    selections: Option<PathBuf>,
    /// Delay history, breakers, sticky sessions: shared with the registries before and after.
    health: Arc<Health>,
    /// Proxy providers with `health-check.enable`.
    pub provider_checks: Vec<ProviderCheck>,
}

/// A flow using a leaf: counted in the leaf's active flows until dropped.
#[derive(Debug)]
pub struct Active {
    health: Arc<Health>,
    leaf: String,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.health.breakers.ended(&self.leaf);
    }
}

/// A proxy provider's `health-check`.
#[derive(Debug)]
pub struct ProviderCheck {
    pub name: String,
    /// Its proxies.
    pub members: Vec<String>,
    pub check: CheckSpec,
    /// When groups holding its proxies were last used.
    pub activity: Arc<Activity>,
}

/// A check spec from a group's or provider's keys, mihomo's defaults filled in.
fn check_spec(
    url: Option<&str>,
    interval: Option<u64>,
    timeout: Option<u64>,
    lazy: Option<bool>,
    expected: Option<&str>,
) -> CheckSpec {
    let mut spec = health::TestSpec::default();
    if let Some(u) = url.and_then(|u| url::Url::parse(u).ok()) {
        spec.url = u;
    }
    if let Some(ms) = timeout.filter(|&ms| ms > 0) {
        spec.timeout = std::time::Duration::from_millis(ms);
    }
    spec.expected = expected
        .and_then(health::parse_expected)
        .unwrap_or_default();
    CheckSpec {
        spec,
        interval: std::time::Duration::from_secs(
            interval.unwrap_or(health::DEFAULT_INTERVAL).max(1),
        ),
        lazy: lazy.unwrap_or(true),
    }
}

fn provider_check(c: &HealthCheckConfig) -> CheckSpec {
    check_spec(
        c.url.as_deref(),
        c.interval,
        c.timeout,
        c.lazy,
        c.expected_status.as_deref(),
    )
}

/// Applies a group's keys beyond its members.
fn configure(group: &mut Group, g: &GroupConfig) {
    group.hidden = g.hidden;
    group.icon = g.icon.clone();
    group.disable_udp = g.disable_udp;
    group.interrupt = g.interrupt_exist_connections;
    group.tolerance = g.tolerance.unwrap_or(0).max(0) as u64;
    group.max_failed_times = g.max_failed_times.unwrap_or(5);
    group.strategy = match g.strategy.as_deref() {
        Some("round-robin") => Strategy::RoundRobin,
        Some("sticky-sessions") => Strategy::StickySessions,
        _ => Strategy::ConsistentHashing,
    };
    if let Some(t) = g.idle_timeout {
        group.activity = Arc::new(Activity::new(t.duration()));
    }
    if let Some(t) = g.affinity_ttl {
        group.affinity_ttl = t.duration();
    }
    if g.kind != GroupKind::Select {
        group.check = Some(check_spec(
            g.url.as_deref(),
            g.interval,
            g.timeout,
            g.lazy,
            g.expected_status.as_deref(),
        ));
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The socket options a configured proxy uses: its own mark and device, else the globals.
fn proxy_opts(config: &Config, p: &ProxyConfig) -> SocketOpts {
    SocketOpts {
        mark: p.routing_mark.unwrap_or(config.routing_mark),
        device: p
            .interface_name
            .clone()
            .or_else(|| config.interface_name.clone()),
        connect_timeout: config.connect_timeout.duration(),
        ip_version: p.ip_version,
        tfo: p.tfo,
        mptcp: p.mptcp,
    }
}

/// The leaf for a configured proxy.
pub fn proxy(config: &Config, p: &ProxyConfig) -> Proxy {
    let spec = Box::new(ProxySpec {
        server: p.server.clone(),
        port: p.port,
        auth: match (&p.username, &p.password) {
            (Some(u), Some(pw)) => Some((u.clone(), pw.clone())),
            (Some(u), None) => Some((u.clone(), String::new())),
            _ => None,
        },
        tls: p.tls.then(|| {
            (
                p.sni.clone().unwrap_or_else(|| p.server.clone()),
                p.skip_cert_verify,
            )
        }),
        udp: p.udp,
        headers: p
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        dialer_proxy: p.dialer_proxy.clone(),
    });
    Proxy {
        name: p.name.clone(),
        kind: match p.kind {
            ProxyKind::Socks5 => Kind::Socks5(spec),
            ProxyKind::Http => Kind::Http(spec),
        },
        opts: proxy_opts(config, p),
    }
}

/// Regexes of a group's `filter`/`exclude-filter` (mihomo separates alternatives with `` ` ``).
fn name_filter(filter: Option<&str>) -> Vec<regex::Regex> {
    filter
        .into_iter()
        .flat_map(|f| f.split('`'))
        .filter(|f| !f.is_empty())
        .filter_map(|f| regex::Regex::new(f).ok())
        .collect()
}

impl Outbounds {
    /// Builds the registry from `config`, with `provided` proxies by provider name, and group
    /// choices from `state_dir` (kept there from now on).
    pub fn build(
        config: &Config,
        provided: &IndexMap<String, Vec<ProxyConfig>>,
        state_dir: Option<PathBuf>,
        health: Arc<Health>,
    ) -> Outbounds {
        health.breakers.configure((&config.circuit_breaker).into());
        let global_opts = SocketOpts {
            mark: config.routing_mark,
            device: config.interface_name.clone(),
            connect_timeout: config.connect_timeout.duration(),
            ip_version: Default::default(),
            tfo: false,
            mptcp: false,
        };
        let mut nodes = IndexMap::new();
        for (name, kind) in BUILTINS.iter().zip([
            Kind::Direct,
            Kind::Reject,
            Kind::RejectDrop,
            Kind::Pass,
            Kind::Compatible,
        ]) {
            let leaf = Proxy {
                name: (*name).to_owned(),
                kind,
                opts: global_opts.clone(),
            };
            nodes.insert((*name).to_owned(), Node::Proxy(Arc::new(leaf)));
        }
        let mut configured = Vec::new();
        for p in &config.proxies {
            nodes.insert(p.name.clone(), Node::Proxy(Arc::new(proxy(config, p))));
            configured.push(p.name.clone());
        }
        let mut from_providers: IndexMap<&str, Vec<String>> = IndexMap::new();
        for (provider, list) in provided {
            for p in list {
                nodes
                    .entry(p.name.clone())
                    .or_insert_with(|| Node::Proxy(Arc::new(proxy(config, p))));
                from_providers
                    .entry(provider.as_str())
                    .or_default()
                    .push(p.name.clone());
            }
        }
        let provider_checks: Vec<ProviderCheck> = config
            .proxy_providers
            .iter()
            .filter(|(_, p)| p.health_check.enable)
            .map(|(name, p)| ProviderCheck {
                name: name.clone(),
                members: from_providers
                    .get(name.as_str())
                    .cloned()
                    .unwrap_or_default(),
                check: provider_check(&p.health_check),
                activity: Arc::new(Activity::new(super::group::IDLE_TIMEOUT)),
            })
            .collect();
        let group_names: Vec<String> = config.proxy_groups.iter().map(|g| g.name.clone()).collect();
        for g in &config.proxy_groups {
            let mut members: Vec<String> = g.proxies.clone();
            let (keep, drop) = (
                name_filter(g.filter.as_deref()),
                name_filter(g.exclude_filter.as_deref()),
            );
            let filtered = |name: &String| {
                (keep.is_empty() || keep.iter().any(|r| r.is_match(name)))
                    && !drop.iter().any(|r| r.is_match(name))
            };
            let mut extra: Vec<String> = Vec::new();
            if g.include_all || g.include_all_proxies {
                extra.extend(configured.iter().cloned());
            }
            let providers: Vec<&str> = if g.include_all || g.include_all_providers {
                from_providers.keys().copied().collect()
            } else {
                g.uses.iter().map(String::as_str).collect()
            };
            let mut activities = Vec::new();
            for p in providers {
                extra.extend(from_providers.get(p).into_iter().flatten().cloned());
                if let Some(c) = provider_checks.iter().find(|c| c.name == p) {
                    activities.push(c.activity.clone());
                }
            }
            members.extend(extra.into_iter().filter(filtered));
            let mut seen = std::collections::HashSet::new();
            members.retain(|m| seen.insert(m.clone()));
            if members.is_empty() {
                members.push("COMPATIBLE".to_owned());
            }
            let mut group = Group::new(g.name.clone(), g.kind, members);
            configure(&mut group, g);
            group.providers = activities;
            nodes.insert(g.name.clone(), Node::Group(Arc::new(group)));
        }
        if !nodes.contains_key(GLOBAL) {
            // mihomo's GLOBAL: DIRECT, REJECT, every proxy, every group.
            let mut all: Vec<String> = vec!["DIRECT".into(), "REJECT".into()];
            all.extend(configured.iter().cloned());
            all.extend(from_providers.values().flatten().cloned());
            all.extend(group_names);
            let mut seen = std::collections::HashSet::new();
            all.retain(|m| seen.insert(m.clone()));
            let group = Group::new(GLOBAL.to_owned(), GroupKind::Select, all);
            nodes.insert(GLOBAL.to_owned(), Node::Group(Arc::new(group)));
        }
        let outbounds = Outbounds {
            nodes,
            selections: state_dir.map(|d| d.join(SELECTIONS_FILE)),
            health,
            provider_checks,
        };
        outbounds.load_selections();
        outbounds
    }

    pub fn get(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Every outbound, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    pub fn group(&self, name: &str) -> Option<&Arc<Group>> {
        match self.nodes.get(name) {
            Some(Node::Group(g)) => Some(g),
            _ => None,
        }
    }

    /// The leaf `name` stands for now, and mihomo's `chains` (leaf first, then each group
    /// outwards), as the API shows it.
    pub fn resolve(&self, name: &str) -> Result<(Arc<Proxy>, Vec<String>), Error> {
        self.resolve_for(name, None)
    }

    /// The leaf a flow described by `pick` goes to through `name`; the groups on the way
    /// note the use (lazy groups resume their checks).
    pub fn resolve_for(
        &self,
        name: &str,
        pick: Option<&Pick<'_>>,
    ) -> Result<(Arc<Proxy>, Vec<String>), Error> {
        let mut chains = Vec::new();
        let mut current = name.to_owned();
        for depth in 0..MAX_DEPTH {
            match self.nodes.get(&current) {
                Some(Node::Proxy(p)) => {
                    chains.push(p.name.clone());
                    chains.reverse();
                    return Ok((p.clone(), chains));
                }
                Some(Node::Group(g)) => {
                    chains.push(g.name.clone());
                    if pick.is_some() {
                        g.touch();
                    }
                    current = g
                        .choose_at(self, pick, depth)
                        .unwrap_or_else(|| "COMPATIBLE".to_owned());
                }
                None => return Err(Error::Unknown(current)),
            }
        }
        Err(Error::TooDeep(MAX_DEPTH))
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The leaf `name` stands for (itself, or a group's choice), at nesting `depth`.
    fn leaf_at(&self, name: &str, depth: usize) -> Option<Arc<Proxy>> {
        if depth >= MAX_DEPTH {
            return None;
        }
        match self.nodes.get(name)? {
            Node::Proxy(p) => Some(p.clone()),
            Node::Group(g) => self.leaf_at(&g.choose_at(self, None, depth + 1)?, depth + 1),
        }
    }

    /// Whether flows may go to `name`: its last test did not fail and its breaker is closed
    /// (a group: its choice's).
    pub fn alive(&self, name: &str) -> bool {
        self.alive_at(name, 0)
    }

    pub(super) fn alive_at(&self, name: &str, depth: usize) -> bool {
        self.leaf_at(name, depth).is_some_and(|leaf| {
            self.health.history.alive(&leaf.name) && !self.health.breakers.open(&leaf.name)
        })
    }

    /// The newest delay of `name` (a group: of its choice).
    pub fn delay(&self, name: &str) -> Option<u64> {
        self.delay_at(name, 0)
    }

    pub(super) fn delay_at(&self, name: &str, depth: usize) -> Option<u64> {
        let leaf = self.leaf_at(name, depth)?;
        self.health.history.last(&leaf.name).map(|(_, d)| d)
    }

    /// Whether UDP flows can go through `name`.
    pub fn carries_udp(&self, name: &str) -> bool {
        match self.nodes.get(name) {
            Some(Node::Proxy(p)) => p.udp(),
            Some(Node::Group(g)) => !g.disable_udp,
            None => false,
        }
    }

    /// A flow's TCP connection to `target` through `leaf` (reached by `chains`, leaf first),
    /// reported to the leaf's breaker and figures; the flow holds the [`Active`] while it lasts.
    pub async fn connect(
        &self,
        chains: &[String],
        leaf: &Proxy,
        target: &Target,
    ) -> Result<(Upstream, Active), Error> {
        let started = std::time::Instant::now();
        let dialed = self.dial_tcp(leaf, target).await;
        self.report_dial(chains, dialed.is_ok(), started.elapsed());
        dialed.map(|u| (u, self.active(&leaf.name)))
    }

    /// A flow's UDP session, reported like [`Outbounds::connect`].
    pub async fn open_udp(
        &self,
        chains: &[String],
        leaf: &Proxy,
        target: &Target,
    ) -> Result<(UdpSession, Active), Error> {
        let started = std::time::Instant::now();
        let opened = self.udp(leaf, target).await;
        self.report_dial(chains, opened.is_ok(), started.elapsed());
        opened.map(|u| (u, self.active(&leaf.name)))
    }

    fn active(&self, leaf: &str) -> Active {
        Active {
            health: self.health.clone(),
            leaf: leaf.to_owned(),
        }
    }

    /// A dial through `chains` (leaf first) ended with `ok` after `took`: feeds the leaf's
    /// breaker and figures, and the groups' `max-failed-times`.
    fn report_dial(&self, chains: &[String], ok: bool, took: std::time::Duration) {
        let Some(leaf) = chains.first() else { return };
        let breakers = &self.health.breakers;
        breakers.dialed(leaf, ok, took);
        if ok {
            breakers.success(leaf);
            return;
        }
        if breakers.failure(leaf) {
            tracing::warn!("{leaf}: dials keep failing; not used until it recovers");
            self.health.history.changed();
        }
        for g in chains[1..].iter().filter_map(|n| self.group(n)) {
            g.dial_failed();
        }
    }

    /// Chooses `member` in select group `group` and keeps the choice.
    pub fn select(&self, group: &str, member: &str) -> Result<(), String> {
        let Some(Node::Group(g)) = self.nodes.get(group) else {
            return Err(format!("`{group}` is not a group"));
        };
        if g.kind == GroupKind::LoadBalance {
            return Err(format!(
                "`{group}` is a LoadBalance group: it has no choice"
            ));
        }
        if !g.select(member) {
            return Err(format!("`{member}` is not one of `{group}`'s proxies"));
        }
        self.save_selections();
        Ok(())
    }

    /// Clears a url-test or fallback group's fixed choice (`DELETE /proxies/{group}`).
    pub fn unfix(&self, group: &str) -> Result<(), String> {
        let Some(Node::Group(g)) = self.nodes.get(group) else {
            return Err(format!("`{group}` is not a group"));
        };
        if !matches!(g.kind, GroupKind::UrlTest | GroupKind::Fallback) {
            return Err(format!("`{group}` has no fixed choice to clear"));
        }
        g.unfix();
        self.save_selections();
        Ok(())
    }

    fn load_selections(&self) {
        let Some(path) = &self.selections else {
            return;
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let Ok(map) = serde_json::from_str::<HashMap<String, String>>(&text) else {
            tracing::warn!("{}: not a selections file; ignored", path.display());
            return;
        };
        for (group, member) in map {
            if let Some(Node::Group(g)) = self.nodes.get(&group)
                && g.kind != GroupKind::LoadBalance
                && !g.select(&member)
            {
                tracing::info!("group {group}: the kept choice {member} is no longer a member");
            }
        }
    }

    fn save_selections(&self) {
        let Some(path) = &self.selections else {
            return;
        };
        let map: HashMap<&String, String> = self
            .nodes
            .iter()
            .filter_map(|(name, node)| match node {
                Node::Group(g) => g.selected().map(|s| (name, s)),
                Node::Proxy(_) => None,
            })
            .collect();
        let text = serde_json::to_string_pretty(&map).unwrap_or_default();
        let written = path
            .parent()
            .map_or(Ok(()), crate::state::ensure)
            .map_err(|e| e.to_string())
            .and_then(|()| crate::state::write_private(path, &text).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::warn!("keeping group choices in {}: {e}", path.display());
        }
    }

    /// A TCP connection to `target` through leaf `proxy`.
    pub fn dial_tcp<'a>(
        &'a self,
        proxy: &'a Proxy,
        target: &'a Target,
    ) -> BoxFuture<'a, Result<Upstream, Error>> {
        Box::pin(async move {
            let failed = |source| Error::Proxy {
                proxy: proxy.name.clone(),
                source,
            };
            match &proxy.kind {
                Kind::Direct => Ok(Upstream::Tcp(proxy.opts.connect(target).await?)),
                Kind::Socks5(spec) => {
                    let mut s = self.reach(proxy, spec).await?;
                    let auth = spec.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
                    socks5::connect(&mut s, auth, &target.socks())
                        .await
                        .map_err(failed)?;
                    Ok(s)
                }
                Kind::Http(spec) => {
                    let mut s = self.reach(proxy, spec).await?;
                    let auth = spec.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
                    http::connect(&mut s, &target.authority(), auth, &spec.headers)
                        .await
                        .map_err(failed)?;
                    Ok(s)
                }
                Kind::Reject | Kind::RejectDrop | Kind::Pass | Kind::Compatible => {
                    Err(Error::Rejected(proxy.name.clone()))
                }
            }
        })
    }

    /// A connection to the proxy server of `proxy` (through its `dialer-proxy`, if any; with
    /// TLS, if configured).
    async fn reach(&self, proxy: &Proxy, spec: &ProxySpec) -> Result<Upstream, Error> {
        let server = match spec.server.parse() {
            Ok(ip) => Target::Ip(std::net::SocketAddr::new(ip, spec.port)),
            Err(_) => Target::Host(spec.server.clone(), spec.port),
        };
        let stream = match &spec.dialer_proxy {
            Some(via) => {
                let (leaf, _) = self.resolve(via)?;
                self.dial_tcp(&leaf, &server).await?
            }
            None => Upstream::Tcp(proxy.opts.connect(&server).await?),
        };
        let Some((sni, skip_verify)) = &spec.tls else {
            return Ok(stream);
        };
        let failed = |source| Error::Proxy {
            proxy: proxy.name.clone(),
            source,
        };
        let name = crate::tls::server_name(sni).map_err(failed)?;
        let tls = crate::tls::connector(*skip_verify)
            .connect(name, stream)
            .await
            .map_err(failed)?;
        Ok(Upstream::Boxed(Box::new(tls)))
    }

    /// A UDP session to `target` through leaf `proxy`.
    pub async fn udp(&self, proxy: &Proxy, target: &Target) -> Result<UdpSession, Error> {
        match &proxy.kind {
            Kind::Direct => {
                let addr = proxy.opts.addresses(target).await?[0];
                Ok(UdpSession::Direct(proxy.opts.udp_connected(addr).await?))
            }
            Kind::Socks5(spec) if spec.udp => {
                let failed = |source| Error::Proxy {
                    proxy: proxy.name.clone(),
                    source,
                };
                let mut control = self.reach(proxy, spec).await?;
                let server = match control.peer_addr() {
                    Some(a) => a,
                    None => {
                        let t = Target::Host(spec.server.clone(), spec.port);
                        proxy.opts.addresses(&t).await?[0]
                    }
                };
                let auth = spec.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
                let relay = socks5::associate(&mut control, auth, server)
                    .await
                    .map_err(failed)?;
                let socket = proxy.opts.udp_connected(relay).await?;
                Ok(UdpSession::socks5(control, socket, target.socks()))
            }
            Kind::Reject | Kind::RejectDrop | Kind::Pass | Kind::Compatible => {
                Err(Error::Rejected(proxy.name.clone()))
            }
            _ => Err(Error::NoUdp(proxy.name.clone())),
        }
    }
}
