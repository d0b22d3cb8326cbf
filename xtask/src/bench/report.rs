//! The bench's report: medians with min–max and ratios, as markdown and JSON.

use super::{Durations, Samples, contenders::Contender, open_files_limit};

/// Workloads in report order: (key, description, unit, higher is better).
pub(super) const METRICS: [(&str, &str, &str, bool); 18] = [
    ("tput1", "TCP throughput, 1 stream", "Gbit/s", true),
    ("tput8", "TCP throughput, 8 streams", "Gbit/s", true),
    ("cpu1", "gateway CPU per GB, 1 stream", "CPU s/GB", false),
    ("churn", "connection churn", "conn/s", true),
    (
        "churn_cpu",
        "gateway process CPU per connection, churn",
        "µs",
        false,
    ),
    (
        "churn_exact",
        "bytes counted − bytes moved, churn (0: every flow exact)",
        "bytes",
        false,
    ),
    (
        "socks_tput",
        "TCP throughput through the mixed port (SOCKS5), 1 stream",
        "Gbit/s",
        true,
    ),
    (
        "socks_churn",
        "SOCKS5 connection set-up through the mixed port",
        "conn/s",
        true,
    ),
    ("rr_p50", "request/response latency p50", "µs", false),
    ("rr_p99", "request/response latency p99", "µs", false),
    (
        "rss_small",
        "RSS per idle connection (slope, half to all held, small)",
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
        "metrics_small",
        "GET /metrics (scale run, small)",
        "ms",
        false,
    ),
    (
        "rss_large",
        "RSS per idle connection (slope, half to all held, large)",
        "bytes",
        false,
    ),
    (
        "api_large",
        "GET /connections (scale run, large)",
        "ms",
        false,
    ),
    (
        "metrics_large",
        "GET /metrics (scale run, large)",
        "ms",
        false,
    ),
    (
        "ws_cpu_large",
        "CPU while 20 WebSockets follow /connections (scale run, large)",
        "% of a core",
        false,
    ),
    ("rounds", "rounds", "", true),
];

pub(super) fn report(samples: &Samples, d: &Durations, quick: bool) -> (String, String) {
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
        let kernel_m = median_of(Contender::Kernel);
        for who in Contender::ALL {
            match samples.0.get(&(key, who)) {
                Some(v) => {
                    let (m, lo, hi) = median_min_max(v);
                    let against = |base: Option<f64>, tag: &str| {
                        base.filter(|b| *b > 0.0)
                            .map(|b| format!(", {:.2}× {tag}", m / b))
                            .unwrap_or_default()
                    };
                    let ratio = match (who, who.rival()) {
                        (Contender::Kernel, _) => String::new(),
                        (_, Some(rival)) => format!(
                            "{}{}",
                            against(kernel_m, "kernel"),
                            against(median_of(rival), "mihomo")
                        ),
                        (_, None) => against(kernel_m, "kernel"),
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
         mihomo and haproxy run behind the same nftables TPROXY rule as tpacctd's managed firewall; \
         tpacctd and mihomo also open the same mixed port (SOCKS5 rows: our own client through \
         it, to the same server). The 10k-rules columns run the churn workload with 10,000 \
         domain and CIDR rules ahead of MATCH in both cores' configs. The fast-path column is \
         tpacctd with `fast-path` on: every flow is decided DIRECT at its SYN and forwarded by \
         the kernel, counted in tc (the daemon moves no payload, so its CPU per GB is near 0). \
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

pub(super) fn median_min_max(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}
