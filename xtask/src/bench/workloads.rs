//! One contender's round: throughput, churn, latency, the mixed port and the scale run, each
//! a real client in the client namespace against the gateway; and the process facts (CPU,
//! RSS) they are weighed with.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use super::{
    Children, Contender, Durations, ECHO_PORT, IPERF_PORT, SINK_PORT, Samples, contenders, history,
    median_min_max, profile,
};
use crate::netns::Topology;

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
pub(super) struct Run<'a> {
    pub(super) who: Contender,
    pub(super) topo: &'a Topology,
    /// This program (the benchmark clients).
    pub(super) me: &'a Path,
    pub(super) d: &'a Durations,
    pub(super) pid: Option<u32>,
    pub(super) churn_only: bool,
    /// Where to keep profiles, when this contender is profiled.
    pub(super) profile: Option<&'a Path>,
}

pub(super) fn measure(run: &Run<'_>, samples: &mut Samples) -> Result<()> {
    let (who, topo, me, d, pid) = (run.who, run.topo, run.me, run.d, run.pid);
    let server = topo.server_ip();
    let echo = format!("{server}:{ECHO_PORT}");
    if who.setup_only() || run.churn_only {
        churn(run, samples)?;
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
    churn(run, samples)?;
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
        for (n, rss_key, api_key, metrics_key, large) in [
            (d.scale.0, "rss_small", "api_small", "metrics_small", false),
            (d.scale.1, "rss_large", "api_large", "metrics_large", true),
        ] {
            let s = scale(topo, me, pid, n, metrics, large.then_some(run.profile))?;
            samples.add(rss_key, who, s.per_connection);
            samples.add(api_key, who, s.connections_ms);
            if let Some(ms) = s.metrics_ms {
                samples.add(metrics_key, who, ms);
            }
            if let Some(cpu) = s.ws_cpu {
                samples.add("ws_cpu_large", who, cpu);
            }
        }
    }
    samples.add("rounds", who, 1.0);
    Ok(())
}

/// Connection churn through the gateway; with history on, what the store did meanwhile.
fn churn(run: &Run<'_>, samples: &mut Samples) -> Result<()> {
    let (who, topo, me, d, pid) = (run.who, run.topo, run.me, run.d, run.pid);
    let echo = format!("{}:{ECHO_PORT}", topo.server_ip());
    let recording = match (run.profile, pid) {
        (Some(dir), Some(pid)) => Some(profile::start(pid, dir, "churn")?),
        _ => None,
    };
    let before = (who == Contender::TpacctEbpf)
        .then(|| history::store_counts(topo))
        .transpose()?;
    let writer_before = pid.and_then(|p| thread_cpu_seconds(p, "tpacct-store"));
    let counted_before = who
        .is_tpacct()
        .then(|| history::counted_bytes(topo))
        .transpose()?;
    let cpu_before = pid.and_then(cpu_seconds);
    let started = Instant::now();
    let rate = client(topo, me, &["churn", &echo, &d.churn.as_secs().to_string()])?;
    if let Some(r) = recording {
        r.stop()?;
    }
    samples.add("churn", who, rate[0]);
    if let (Some(before), Some(after)) = (cpu_before, pid.and_then(cpu_seconds)) {
        let connections = rate[0] * d.churn.as_secs_f64();
        samples.add(
            "churn_cpu",
            who,
            (after - before) * 1e6 / connections.max(1.0),
        );
    }
    if let (Some((up0, down0)), &[_, up, down]) = (counted_before, &rate[..]) {
        // Every flow of the churn counted to the byte: what tpacctd counted minus what moved.
        let (up1, down1) = history::counted_bytes(topo)?;
        let missed = ((up1 - up0) - up).abs() + ((down1 - down0) - down).abs();
        samples.add("churn_exact", who, missed);
    }
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
    // After the store's figures: the traced churn is slower and not measured.
    if let (Some(dir), Some(pid)) = (run.profile, pid) {
        profile::syscalls(pid, dir, || {
            client(topo, me, &["churn", &echo, "3"]).map(drop)
        })?;
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
fn api_ms(topo: &Topology, path: &str, held: usize) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let out = Topology::exec(&topo.gateway, Path::new("curl"))
            .args([
                "-sf",
                // A contender that stops answering fails the workload instead of hanging it.
                "--max-time",
                "30",
                "-H",
                "Authorization: Bearer bench",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total}",
                &format!("http://127.0.0.1:9090{path}"),
            ])
            .output()?;
        match String::from_utf8_lossy(&out.stdout).trim().parse::<f64>() {
            Ok(secs) if out.status.success() => times.push(secs * 1000.0),
            // A contender that failed once is not waited on four more times.
            _ => bail!(
                "GET {path} failed (curl exit {:?}, {} held connections)",
                out.status.code(),
                held
            ),
        }
    }
    Ok(median_min_max(&times).0)
}

/// What the scale run measured.
struct Scale {
    /// RSS growth per held connection between half and all held, bytes.
    per_connection: f64,
    /// Median milliseconds for the gateway's `GET /connections`, and `GET /metrics`.
    connections_ms: f64,
    metrics_ms: Option<f64>,
    /// The gateway's CPU, percent of one core, while WebSocket clients follow `/connections`.
    ws_cpu: Option<f64>,
}

/// How long the WebSocket followers follow while measured, after connecting and their first
/// frames.
const WS_SECS: u64 = 6;
const WS_WARMUP: u64 = 2;

/// Holds `n` idle connections through the gateway and measures it ([`Scale`]); `/metrics`
/// when `metrics`. With `large`, also [`super::ws::CLIENTS`] WebSocket followers, and a
/// profile while it answers `/connections` when `large` holds a directory for one.
fn scale(
    topo: &Topology,
    me: &Path,
    pid: u32,
    n: usize,
    metrics: bool,
    large: Option<Option<&Path>>,
) -> Result<Scale> {
    let open_fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let baseline = open_fds();
    // Two descriptors per held connection must fit beside what the contender still has open
    // (mihomo closes released connections lazily): more would leave it out of descriptors,
    // refusing even its API.
    let room = open_files_limit(pid).map_or(n, |limit| {
        limit.saturating_sub(baseline as u64 + 512) as usize / 2
    });
    if room < n {
        eprintln!(
            "bench: scale run of {n} connections capped at {room}: the gateway has {baseline} descriptors open"
        );
    }
    let n = n.min(room);
    let target = format!("{}:{SINK_PORT}", topo.server_ip());
    // Two halves, RSS after each: the slope between them is what one more connection costs,
    // whatever the allocator kept from earlier workloads (freed buffers it hands out again
    // would hide part of the first half's cost).
    let (first, second) = (n - n / 2, n / 2);
    let mut holders = Children(vec![hold(topo, me, &target, first)?]);
    let half = rss_bytes(pid).context("gateway RSS")?;
    holders.0.push(hold(topo, me, &target, second)?);
    let after = rss_bytes(pid).context("gateway RSS")?;
    let recording = large
        .flatten()
        .map(|dir| profile::start(pid, dir, "connections"))
        .transpose()?;
    let connections = api_ms(topo, "/connections", n)?;
    if let Some(recording) = recording {
        recording.stop()?;
    }
    let metrics_ms = if metrics {
        Some(api_ms(topo, "/metrics", n)?)
    } else {
        None
    };
    let ws_cpu = match large {
        Some(_) => Some(followed_cpu(topo, me, pid)?),
        None => None,
    };
    // Release the connections and let the gateway drain before the next run.
    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds() > baseline + 64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Scale {
        per_connection: (after - half).max(0.0) / second as f64,
        connections_ms: connections,
        metrics_ms,
        ws_cpu,
    })
}

/// The soft open-files limit of process `pid`.
fn open_files_limit(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `n` more idle connections held through the gateway, once it has accepted and dialed them.
fn hold(topo: &Topology, me: &Path, target: &str, n: usize) -> Result<std::process::Child> {
    let mut holder = Topology::exec(&topo.client, me)
        .args(["bench-client", "hold", target, &n.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .context("holding client")?;
    let mut line = String::new();
    BufReader::new(holder.stdout.take().context("holder stdout")?).read_line(&mut line)?;
    if line.trim() != n.to_string() {
        let _ = holder.kill();
        let _ = holder.wait();
        bail!("holding client opened {} of {n} connections", line.trim());
    }
    // Let the gateway finish accepting and dialing.
    std::thread::sleep(Duration::from_millis(500 + n as u64 / 20));
    Ok(holder)
}

/// The gateway's CPU (percent of one core) while WebSocket clients follow `/connections`,
/// from [`WS_WARMUP`] after they start (connected, first frames sent) until they end.
fn followed_cpu(topo: &Topology, me: &Path, pid: u32) -> Result<f64> {
    let follow = (WS_WARMUP + WS_SECS).to_string();
    let followers = Topology::exec(&topo.gateway, me)
        .args(["bench-client", "ws", "127.0.0.1:9090", &follow])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("WebSocket followers")?;
    std::thread::sleep(Duration::from_secs(WS_WARMUP));
    let before = cpu_seconds(pid).context("gateway CPU")?;
    let started = Instant::now();
    let out = followers.wait_with_output()?;
    let secs = started.elapsed().as_secs_f64();
    let after = cpu_seconds(pid).context("gateway CPU")?;
    let frames: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    if !out.status.success() || frames == 0 {
        bail!(
            "WebSocket followers got {frames} frames: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((after - before) / secs * 100.0)
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
