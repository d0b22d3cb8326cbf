//! Prometheus `/metrics`: the counters flows feed as they dial and sniff ([`Hooks`], owned by
//! the pipeline), and figures read at scrape time from the registry (flows and bytes by
//! network, inbound, outbound and rule type: bounded label sets, never a per-flow label), the
//! accounting (kernel map occupancy and losses) and the process (RSS, memory limit). Text in
//! the OpenMetrics format from `prometheus-client`.

use std::{collections::HashMap, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry as Prom,
};

use crate::{
    api::ApiState,
    outbound,
    registry::{ClosedByRoute, Registry},
};

/// `outbound` (the leaf's type) on dial figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialLabels {
    pub outbound: String,
}

/// `reason` of a failed dial.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// How a flow's local process was found (`kernel`, `sock_diag`, `proc_scan`) or `missed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FoundLabels {
    pub how: &'static str,
}

/// `result` of sniffing a flow: `found`, `skipped` (a name in `skip-domain`), `none`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SniffLabels {
    pub result: &'static str,
}

fn dial_buckets() -> Histogram {
    // 1 ms … ~8 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 14,
    ))
}

/// What flows report as they go.
#[derive(Debug)]
pub struct Hooks {
    dial_seconds: Family<DialLabels, Histogram, fn() -> Histogram>,
    dial_failures: Family<ReasonLabels, Counter>,
    sniffs: Family<SniffLabels, Counter>,
    /// The fast path's kernel counters, once it runs.
    pub fast_path: std::sync::OnceLock<std::sync::Arc<crate::fastpath::StatsReader>>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            dial_seconds: Family::new_with_constructor(dial_buckets),
            dial_failures: Family::default(),
            sniffs: Family::default(),
            fast_path: std::sync::OnceLock::new(),
        }
    }
}

impl Hooks {
    /// A dial through `outbound` (a type name: `Direct`, `Socks5`…) that took `took`.
    pub fn dialed(&self, outbound: &str, took: Duration, result: Result<(), &outbound::Error>) {
        match result {
            Ok(()) => self
                .dial_seconds
                .get_or_create(&DialLabels {
                    outbound: outbound.to_owned(),
                })
                .observe(took.as_secs_f64()),
            Err(e) => {
                self.dial_failures
                    .get_or_create(&ReasonLabels { reason: e.reason() })
                    .inc();
            }
        }
    }

    pub fn sniffed(&self, result: &'static str) {
        self.sniffs.get_or_create(&SniffLabels { result }).inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    network: &'static str,
    inbound: &'static str,
    outbound: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    outbound: String,
    rule: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpenedLabels {
    network: &'static str,
    inbound: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

/// `(upload, download)` of closed and live flows by (outbound, rule type), and live flows
/// by (network, inbound, outbound).
fn flows(registry: &Registry) -> (ClosedByRoute, HashMap<FlowLabels, i64>) {
    let (mut bytes, live) = registry.closed_by_route_and_live();
    let mut active = HashMap::new();
    for live in live {
        let route = live.flow.route();
        let outbound = route
            .and_then(|r| r.chains.first().cloned())
            .unwrap_or_default();
        let rule = route.map_or("", |r| r.rule);
        let e = bytes.entry((outbound.clone(), rule)).or_default();
        e.0 += live.traffic.upload;
        e.1 += live.traffic.download;
        *active
            .entry(FlowLabels {
                network: live.flow.meta.network.as_str(),
                inbound: live.flow.meta.inbound_name,
                outbound,
            })
            .or_default() += 1;
    }
    (bytes, active)
}

fn info(prom: &mut Prom, name: &str, help: &str, key: &str, value: &str) {
    let family = Family::<Vec<(String, String)>, Gauge>::default();
    family
        .get_or_create(&vec![(key.to_owned(), value.to_owned())])
        .set(1);
    prom.register(name, help, family);
}

fn gauge(prom: &mut Prom, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    prom.register(name, help, g);
}

fn gauge_f64(prom: &mut Prom, name: &str, help: &str, value: f64) {
    let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
    g.set(value);
    prom.register(name, help, g);
}

fn counter(prom: &mut Prom, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    prom.register(name, help, c);
}

/// The exposition for one scrape.
pub fn render(state: &ApiState) -> String {
    let mut prom = Prom::with_prefix("tpacct");
    // Info as a gauge of 1 (Prometheus's convention; its text parser knows no `info` type).
    info(
        &mut prom,
        "build_info",
        "tpacctd's version",
        "version",
        env!("CARGO_PKG_VERSION"),
    );
    let registry = &state.registry;
    let (bytes, active) = flows(registry);
    let by_route = Family::<BytesLabels, Counter>::default();
    for ((outbound, rule), (up, down)) in bytes {
        for (direction, n) in [("upload", up), ("download", down)] {
            by_route
                .get_or_create(&BytesLabels {
                    direction,
                    outbound: outbound.clone(),
                    rule,
                })
                .inc_by(n);
        }
    }
    prom.register(
        "bytes",
        "Payload bytes of closed and live flows on the client leg, by outbound (the chain's leaf) and rule type",
        by_route,
    );
    let live = Family::<FlowLabels, Gauge>::default();
    for (labels, n) in active {
        live.get_or_create(&labels).set(n);
    }
    prom.register("flows_active", "Live flows", live);
    let opened = Family::<OpenedLabels, Counter>::default();
    for ((network, inbound), n) in registry.opened_by() {
        opened
            .get_or_create(&OpenedLabels {
                network: network.as_str(),
                inbound,
            })
            .inc_by(n);
    }
    prom.register("flows_opened", "Flows opened", opened);
    let hooks = &state.pipeline.hooks;
    prom.register(
        "dial_seconds",
        "Time to dial an upstream, by outbound type",
        hooks.dial_seconds.clone(),
    );
    prom.register(
        "dial_failures",
        "Dials that failed, by reason",
        hooks.dial_failures.clone(),
    );
    prom.register("sniffs", "Flows sniffed, by result", hooks.sniffs.clone());
    let routing = state.pipeline.router.routing();
    let alive = Family::<NameLabels, Gauge>::default();
    let delay = Family::<NameLabels, Gauge>::default();
    for (name, node) in routing.outbounds.iter() {
        if !matches!(node, outbound::Node::Proxy(_)) {
            continue;
        }
        let labels = NameLabels { name: name.clone() };
        alive
            .get_or_create(&labels)
            .set(i64::from(routing.outbounds.alive(name)));
        if let Some(ms) = routing.outbounds.delay(name) {
            delay
                .get_or_create(&labels)
                .set(ms.min(i64::MAX as u64) as i64);
        }
    }
    prom.register(
        "outbound_alive",
        "Whether the outbound passes its health checks",
        alive,
    );
    prom.register(
        "outbound_delay_milliseconds",
        "The outbound's last measured delay",
        delay,
    );
    let accounting = registry.accounting();
    let mode = format!("{:?}", accounting.mode()).to_lowercase();
    info(
        &mut prom,
        "accounting_info",
        "How bytes are counted",
        "mode",
        &mode,
    );
    if let Some(k) = accounting.kernel_stats() {
        gauge(
            &mut prom,
            "kernel_tcp_entries",
            "Live TCP entries in the kernel map",
            k.tcp_entries as i64,
        );
        gauge(
            &mut prom,
            "kernel_udp_entries",
            "Live UDP entries in the kernel map",
            k.udp_entries as i64,
        );
        counter(
            &mut prom,
            "kernel_tcp_map_full",
            "TCP sockets not counted in the kernel: map full",
            k.tcp_map_full,
        );
        counter(
            &mut prom,
            "kernel_udp_map_full",
            "UDP sockets not counted in the kernel: map full",
            k.udp_map_full,
        );
        counter(
            &mut prom,
            "kernel_close_ring_full",
            "Close events lost to a full ring (totals recovered from the map)",
            k.close_ring_full,
        );
    }
    if let Some(fast) = state.pipeline.hooks.fast_path.get() {
        fast_path(&mut prom, fast.read());
    }
    processes(&mut prom, &state.pipeline.processes.counts);
    gauge(
        &mut prom,
        "resident_memory_bytes",
        "Resident memory of the daemon",
        crate::speed::rss() as i64,
    );
    killswitch(&mut prom, &state.pipeline.killswitch);
    if let Some(store) = registry.store() {
        history(&mut prom, store);
    }
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &prom);
    prometheus_text(&text)
}

fn fast_path(prom: &mut Prom, s: crate::fastpath::Stats) {
    for (name, help, n) in [
        (
            "fast_path_decided",
            "Flows the first packet decided DIRECT, forwarded by the kernel",
            s.decided,
        ),
        (
            "fast_path_map_full",
            "Flows decided DIRECT but proxied because the fast path's map was full",
            s.map_full,
        ),
        (
            "fast_path_ring_full",
            "Fast-path close events lost to a full ring (totals collected from the map)",
            s.ring_full,
        ),
        (
            "fast_path_dropped",
            "Download packets of a forwarded flow dropped because its entry was gone",
            s.dropped,
        ),
    ] {
        counter(prom, name, help, n);
    }
}

fn history(prom: &mut Prom, store: &crate::store::Store) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let c = &store.counts;
    counter(
        prom,
        "store_flows_written",
        "Closed flows committed to the history",
        load(&c.written),
    );
    counter(
        prom,
        "store_batches",
        "History transactions committed",
        load(&c.batches),
    );
    gauge_f64(
        prom,
        "store_last_batch_seconds",
        "How long the last history commit took",
        load(&c.last_batch_us) as f64 / 1e6,
    );
    gauge(
        prom,
        "store_pending_flows",
        "Closed flows queued or waiting for a retry",
        load(&c.pending) as i64,
    );
    counter(
        prom,
        "store_errors",
        "History writes or opens that failed (their flows wait for a retry)",
        load(&c.errors),
    );
    counter(
        prom,
        "store_dropped_flows",
        "Closed flows the history lost (queue or retry buffer full)",
        load(&c.dropped),
    );
    gauge(
        prom,
        "store_database_bytes",
        "The history database and its write-ahead log",
        store.size().min(i64::MAX as u64) as i64,
    );
}

fn killswitch(prom: &mut Prom, k: &crate::killswitch::KillSwitch) {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    gauge(
        prom,
        "memory_limit_bytes",
        "The kill switch's memory limit (0: off)",
        k.limit_now().min(i64::MAX as u64) as i64,
    );
    gauge(
        prom,
        "memory_used_bytes",
        "Memory charged where the limit applies (the cgroup's, else RSS), as last sampled",
        load(&k.usage).min(i64::MAX as u64) as i64,
    );
    gauge(
        prom,
        "killswitch_tripped",
        "1 while the kill switch refuses new flows (tripped or cooling down)",
        i64::from(k.tripped()),
    );
    counter(
        prom,
        "killswitch_trips",
        "Times memory went over the limit",
        load(&k.trips),
    );
    counter(
        prom,
        "killswitch_closed_flows",
        "Flows the kill switch closed",
        load(&k.closed),
    );
    counter(
        prom,
        "killswitch_refused_flows",
        "New flows refused while tripped or cooling down",
        load(&k.refused),
    );
}

fn processes(prom: &mut Prom, counts: &crate::process::Counts) {
    let found = Family::<FoundLabels, Counter>::default();
    for (how, n) in [
        ("kernel", &counts.kernel),
        ("sock_diag", &counts.diag),
        ("proc_scan", &counts.scanned),
        ("missed", &counts.missed),
    ] {
        found
            .get_or_create(&FoundLabels { how })
            .inc_by(n.load(std::sync::atomic::Ordering::Relaxed));
    }
    prom.register(
        "process_lookups",
        "Local flows whose process was looked up, by how it was found",
        found,
    );
    counter(
        prom,
        "process_scans",
        "Walks of /proc for socket owners (each serves every lookup waiting)",
        counts.scans.load(std::sync::atomic::Ordering::Relaxed),
    );
}

/// OpenMetrics text as Prometheus's text format 0.0.4 (what `promtool check metrics` and every
/// scraper read): a counter's HELP and TYPE name its `_total` samples, no `# EOF`/`# UNIT`.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}
