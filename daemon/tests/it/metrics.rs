//! `/metrics` scraped from the gateway after a known transfer and a failed dial: accepted by
//! Prometheus's own `promtool check metrics`, parsed by the Python client's parser (the one
//! Prometheus users script with), and its numbers equal to the registry's.

use std::process::{Command, Stdio};

use tpacct::config::AccountingMode;

use crate::common::{
    harness::Skip,
    topo::{SERVER4, Topology, socket, with_gateway},
};

/// The exposition at `url`, from inside the gateway namespace.
pub(crate) fn scrape(topo: &Topology, url: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.gateway.name, "curl", "-sf"])
        .arg(url)
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET /metrics failed");
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Debian's promtool, unpacked by `cargo xtask setup`.
fn promtool_path() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/promtool")
}

/// Runs `program args` with `text` on its stdin; asserts it succeeded: (stdout, stderr).
fn feed(program: &std::path::Path, args: &[&str], text: &str) -> (String, String) {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes())
        .expect("feed the exposition");
    let out = child.wait_with_output().expect("wait");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{} rejected the exposition: {stdout}{stderr}",
        program.display()
    );
    (stdout, stderr)
}

/// Every sample as (name, labels, value), through `prometheus_client.parser`.
pub(crate) fn parsed(text: &str) -> Vec<(String, serde_json::Value, f64)> {
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       print(json.dumps([s.name, s.labels, s.value]))\n";
    feed("python3".as_ref(), &["-c", script], text)
        .0
        .lines()
        .map(|l| serde_json::from_str::<(String, serde_json::Value, f64)>(l).expect("sample"))
        .collect()
}

pub(crate) fn sum(
    samples: &[(String, serde_json::Value, f64)],
    name: &str,
    labels: &[(&str, &str)],
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l[k] == *v))
        .map(|(_, _, v)| v)
        .sum()
}

/// One metric's value (its samples summed) from the gateway's controller.
pub(crate) fn metric(topo: &Topology, name: &str) -> f64 {
    sum(
        &parsed(&scrape(topo, "http://127.0.0.1:9090/metrics")),
        name,
        &[],
    )
}

/// Polls `cond` every 50 ms for up to `secs` seconds.
pub(crate) fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `metrics-address` in the test.
const METRICS_ADDRESS: &str = "127.0.0.1:9101";

fn metrics_match_the_registry() -> Result<(), Skip> {
    if !promtool_path().exists() {
        return Err(Skip(
            "no target/tools/promtool: run cargo xtask setup".into(),
        ));
    }
    with_gateway(
        "metrics",
        AccountingMode::Ebpf,
        |c| c.metrics_address = Some(METRICS_ADDRESS.parse().expect("address")),
        |topo, gw| {
            crate::tproxy_tcp::exchange(topo, gw, SERVER4, 300_000, 1_000_000);
            // A refused dial (nothing listens on 6999).
            Topology::run_in(&topo.client, || {
                let _ = std::net::TcpStream::connect(socket(SERVER4, 6999))
                    .and_then(|mut c| std::io::Read::read(&mut c, &mut [0u8; 1]));
            });
            gw.wait_until(10, "both flows closed", |r| {
                r.live_count() == 0 && r.closed(usize::MAX).len() == 2
            });
            let text = scrape(topo, "http://127.0.0.1:9090/metrics");
            let (out, err) = feed(&promtool_path(), &["check", "metrics"], &text);
            let lint = out + &err;
            eprintln!(
                "promtool: {}",
                if lint.is_empty() { "clean" } else { &lint }
            );
            let samples = parsed(&text);
            let totals = gw.registry.totals();
            let direct = [("outbound", "DIRECT"), ("rule", "Match")];
            let up = sum(
                &samples,
                "tpacct_bytes_total",
                &[("direction", "upload"), direct[0], direct[1]],
            );
            let down = sum(
                &samples,
                "tpacct_bytes_total",
                &[("direction", "download"), direct[0], direct[1]],
            );
            assert_eq!((up as u64, down as u64), (totals.upload, totals.download));
            assert_eq!((up as u64, down as u64), (300_000, 1_000_000));
            let opened = sum(
                &samples,
                "tpacct_flows_opened_total",
                &[("network", "tcp"), ("inbound", "DEFAULT-TPROXY")],
            );
            assert_eq!(opened as u64, gw.registry.opened().0);
            assert_eq!(
                sum(
                    &samples,
                    "tpacct_dial_failures_total",
                    &[("reason", "refused")]
                ),
                1.0
            );
            assert_eq!(
                sum(
                    &samples,
                    "tpacct_dial_seconds_count",
                    &[("outbound", "Direct")]
                ),
                1.0
            );
            assert_eq!(sum(&samples, "tpacct_flows_active", &[]), 0.0);
            assert_eq!(
                sum(&samples, "tpacct_accounting_info", &[("mode", "ebpf")]),
                1.0
            );
            assert!(sum(&samples, "tpacct_resident_memory_bytes", &[]) > 1e6);
            // The same figures alone on `metrics-address`.
            let own = parsed(&scrape(topo, &format!("http://{METRICS_ADDRESS}/metrics")));
            let own_up = sum(&own, "tpacct_bytes_total", &[("direction", "upload")]);
            assert_eq!(own_up as u64, totals.upload);
        },
    );
    Ok(())
}

crate::tests![root metrics_match_the_registry];
