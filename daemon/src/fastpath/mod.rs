//! The fast path: loads the tc programs onto the LAN interfaces, keeps their rule table in step
//! with the routing, and hands the flows they forward to the registry like any other flow.

mod compile;
mod flows;

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TcAttachType, tc},
};
use ipnet::IpNet;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tpacct_common::fastpath::{
    COUNTED_MARK, FAST_CTRL, FAST_EVENTS, FAST_FLOWS, FAST_MARK, FAST_RULES, FAST_STATS, FastCtrl,
    FastFlow, FastRule, FastStat, FlowKey, MAX_FAST_RULES,
};

pub use compile::{NO_RULE, Table, compile, never};

use crate::{config::FastPathConfig, registry::Registry, route::Router};

/// The object built from `ebpf/src/fast.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tpacct-fast"));

/// Errors setting the fast path up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fast-path: loading the programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("fast-path: `{0}` is missing from the programs' object")]
    Missing(&'static str),
    #[error("fast-path: program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("fast-path: map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("fast-path: event ring: {0}")]
    Ring(std::io::Error),
    #[error("fast-path: interface {iface}: {source}")]
    Attach {
        iface: String,
        source: aya::programs::ProgramError,
    },
}

/// What a rule index means for the API: (type, payload) per rule of one generation.
pub(crate) type Labels = Vec<(&'static str, String)>;

/// The running fast path; programs detach when it drops.
pub struct FastPath {
    stats: Arc<StatsReader>,
    _ebpf: Ebpf,
}

/// Reads the kernel programs' counters (for `/metrics`).
pub struct StatsReader(PerCpuArray<MapData, u64>);

impl std::fmt::Debug for StatsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsReader")
    }
}

impl StatsReader {
    /// The counters now, summed over CPUs.
    pub fn read(&self) -> Stats {
        let read = |s: FastStat| {
            self.0
                .get(&(s as u32), 0)
                .map_or(0, |per_cpu| per_cpu.iter().sum())
        };
        Stats {
            map_full: read(FastStat::MapFull),
            ring_full: read(FastStat::RingFull),
            dropped: read(FastStat::Dropped),
            decided: read(FastStat::Decided),
        }
    }
}

/// The kernel's rule table and what its rule indexes mean, kept in step with the router by
/// the flow owner.
pub(crate) struct Tables {
    rules: Mutex<Rules>,
    /// Rule labels by generation (recent generations only).
    labels: Mutex<Vec<(u32, Arc<Labels>)>>,
    bypass: Vec<IpNet>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath").finish_non_exhaustive()
    }
}

struct Rules {
    table: Array<MapData, FastRule>,
    ctrl: Array<MapData, FastCtrl>,
    current: FastCtrl,
    /// What the active table was compiled to, and its labels: a reload that compiles the same
    /// (the periodic address check, most of the time) writes nothing.
    compiled: Option<(Table, Labels)>,
}

/// Kernel-side counters, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub map_full: u64,
    pub ring_full: u64,
    pub dropped: u64,
    pub decided: u64,
}

fn map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Missing(name))?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

impl FastPath {
    /// Loads the programs, writes the rule table for the routing in force, starts the flow
    /// owner, and attaches to every interface in `config`. Call it after the firewall is in
    /// place: a flow the program marks must find the rules that skip the proxy.
    pub fn start(
        config: &FastPathConfig,
        bypass: &[IpNet],
        router: Arc<Router>,
        registry: Arc<Registry>,
        udp_idle: std::time::Duration,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<FastPath, Error> {
        let mut ebpf = EbpfLoader::new()
            .override_global(FAST_MARK, &config.mark, true)
            .override_global(COUNTED_MARK, &config.counted_mark, true)
            .map_max_entries(FAST_FLOWS, config.max_flows)
            .load(OBJECT)?;
        let flows: HashMap<MapData, FlowKey, FastFlow> = map(&mut ebpf, FAST_FLOWS)?;
        let events: RingBuf<MapData> = map(&mut ebpf, FAST_EVENTS)?;
        let stats: PerCpuArray<MapData, u64> = map(&mut ebpf, FAST_STATS)?;
        let rules = Rules {
            table: map(&mut ebpf, FAST_RULES)?,
            ctrl: map(&mut ebpf, FAST_CTRL)?,
            current: FastCtrl::default(),
            compiled: None,
        };
        let tables = Arc::new(Tables {
            rules: Mutex::new(rules),
            labels: Mutex::default(),
            bypass: bypass.to_vec(),
        });
        tables.reload(&router)?;
        let on_change = tables.clone();
        router.on_change(Box::new(move |router| {
            if let Err(e) = on_change.reload(router) {
                tracing::error!("{e}; the previous rule table stays");
            }
        }));
        let stats = Arc::new(StatsReader(stats));
        flows::spawn(
            flows::Owner::new(
                flows,
                registry,
                tables,
                router,
                std::time::Duration::from_secs(config.tcp_idle_timeout),
                udp_idle,
                stats.clone(),
            ),
            events,
            cancel,
            tracker,
        )
        .map_err(Error::Ring)?;
        let mut fast = FastPath { stats, _ebpf: ebpf };
        for (name, direction) in [
            ("tpacct_fast_ingress", TcAttachType::Ingress),
            ("tpacct_fast_egress", TcAttachType::Egress),
        ] {
            let program: &mut SchedClassifier = fast
                ._ebpf
                .program_mut(name)
                .ok_or(Error::Missing(name))?
                .try_into()
                .map_err(|source| Error::Program { name, source })?;
            program
                .load()
                .map_err(|source| Error::Program { name, source })?;
            for iface in &config.interfaces {
                // Without TCX (kernels before 6.6) the programs hang off a clsact qdisc.
                let _ = tc::qdisc_add_clsact(iface);
                program
                    .attach(iface, direction)
                    .map_err(|source| Error::Attach {
                        iface: iface.clone(),
                        source,
                    })?;
            }
        }
        tracing::info!(
            "fast-path: DIRECT flows decided at their first packet are forwarded by the kernel \
             on {:?}",
            config.interfaces
        );
        Ok(fast)
    }

    /// A reader of the kernel programs' counters.
    pub fn stats(&self) -> Arc<StatsReader> {
        self.stats.clone()
    }
}

impl Tables {
    /// Compiles the routing in force into the idle table and makes it the active one: a flow
    /// is decided by one table or the other, never a mix; flows in progress keep their path.
    pub(crate) fn reload(&self, router: &Router) -> Result<(), Error> {
        let routing = router.routing();
        let rules = &routing.rules.rules;
        let table = compile(
            router.mode(),
            rules,
            &never(&local_addresses(), &self.bypass),
        );
        let mut labels: Labels = rules.iter().map(|r| (r.kind, r.payload.clone())).collect();
        labels.shrink_to_fit();
        let mut state = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        if state
            .compiled
            .as_ref()
            .is_some_and(|(t, l)| *t == table && *l == labels)
        {
            return Ok(());
        }
        let next = FastCtrl {
            table: state.current.table ^ 1,
            generation: state.current.generation.wrapping_add(1),
        };
        let base = next.table * MAX_FAST_RULES;
        let map_err = |source| Error::Map {
            name: FAST_RULES,
            source,
        };
        for i in 0..MAX_FAST_RULES {
            let rule = table.rules.get(i as usize).copied().unwrap_or_default();
            state.table.set(base + i, rule, 0).map_err(map_err)?;
        }
        {
            let mut all = self.labels.lock().unwrap_or_else(|p| p.into_inner());
            all.push((next.generation, Arc::new(labels.clone())));
            // Flows decided by older tables than these are long gone or keep their labels.
            let excess = all.len().saturating_sub(4);
            all.drain(..excess);
        }
        state.ctrl.set(0, next, 0).map_err(|source| Error::Map {
            name: FAST_CTRL,
            source,
        })?;
        state.current = next;
        let stopped_at = table.stopped_at;
        state.compiled = Some((table, labels));
        match stopped_at {
            None => tracing::info!("fast-path: every rule is decided in the kernel"),
            Some(i) => tracing::info!(
                "fast-path: rules before #{i} are decided in the kernel; flows they leave \
                 undecided are proxied"
            ),
        }
        Ok(())
    }

    /// What rule `rule` of table `generation` was: (type, payload).
    fn label(&self, generation: u32, rule: u32) -> (&'static str, String) {
        if rule == NO_RULE {
            return ("", String::new());
        }
        let labels = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        labels
            .iter()
            .find(|(g, _)| *g == generation)
            .and_then(|(_, l)| l.get(rule as usize).cloned())
            .unwrap_or(("", String::new()))
    }
}

/// This host's (this network namespace's) addresses and subnet broadcasts.
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        for s in [a.address, a.broadcast].into_iter().flatten() {
            if let Some(v4) = s.as_sockaddr_in() {
                out.push(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = s.as_sockaddr_in6() {
                out.push(IpAddr::V6(v6.ip()));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
