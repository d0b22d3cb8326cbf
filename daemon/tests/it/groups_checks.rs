//! Checks that cost little and test what they say: never more than 10 tests at once across
//! every group (counted at the probe), the first member before anything was tested; lazy
//! groups stop without flows and a flow resumes them at once; a result within the interval is
//! not tested again; `expected-status` in mihomo's forms; HTTPS tests through every outbound
//! type with the probe's certificate trusted by `tls.custom-certifactes` (and refused where
//! the name does not match); a proxy provider's `health-check` runs by itself.

use std::time::{Duration, Instant};

use serde_json::Value;
use tpacct::config::AccountingMode;

use super::groups::{PROBE, PROBE_TLS, start_probe, yaml};
use crate::common::{
    probe::{self, api_until},
    topo::{
        Gateway, SERVER4, Topology, gateway_config, http, routing_from_yaml, socket,
        with_prepared_gateway,
    },
    upstreams::{self, DANTE_OUT, MICROSOCKS_OUT, TINYPROXY_OUT, fetch, identify_server},
};

/// 40 members, all through dante, in two url-test groups.
fn forty() -> String {
    let mut text = String::from("proxies:\n");
    for i in 0..40 {
        text += &format!("  - {{name: p{i}, type: socks5, server: 10.91.2.10, port: 1080}}\n");
    }
    let members =
        |r: std::ops::Range<usize>| r.map(|i| format!("p{i}")).collect::<Vec<_>>().join(", ");
    let check = "url: \"http://10.91.2.2:8204/t\", interval: 600, timeout: 30000, lazy: false";
    text += &format!(
        "proxy-groups:\n  - {{name: G1, type: url-test, proxies: [{}], {check}}}\n  \
         - {{name: G2, type: fallback, proxies: [{}], {check}}}\n",
        members(0..20),
        members(20..40)
    );
    text + "rules:\n  - DST-PORT,6100,G1\n  - MATCH,DIRECT\n"
}

fn ten_tests_at_once_across_every_group() {
    with_prepared_gateway(
        "groups_bound",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, &forty()),
        |topo| {
            let procs = upstreams::start(&topo.server);
            let held = probe::start(
                &topo.server,
                socket(SERVER4, PROBE),
                &[socket(SERVER4, PROBE_TLS)],
                false,
                Duration::from_millis(100),
            );
            identify_server(&topo.server, socket(SERVER4, 6100));
            (procs, held)
        },
        |topo, gw, (_procs, (probe, _))| {
            // Nothing tested yet: the first member.
            fetch(&topo.client, socket(SERVER4, 6100), "x", 1);
            gw.wait_until(10, "the flow to close", |r| {
                r.live_count() == 0 && r.opened().0 > 0
            });
            assert_eq!(gw.registry.closed(1)[0].route.chains, ["p0", "G1"]);
            probe.wait(20, "ten tests held", |p| p.in_flight() == 10);
            probe.release();
            probe.wait(30, "all forty members tested", |p| p.total() >= 40);
            probe.wait(10, "the last answers", |p| p.in_flight() == 0);
            assert_eq!(probe.total(), 40, "each member once");
            assert_eq!(
                probe
                    .max_in_flight
                    .load(std::sync::atomic::Ordering::SeqCst),
                10,
                "never more than 10 tests at once, across both groups"
            );
            let v = api_until(topo, 10, "/proxies/p39", "p39's result", |v| {
                v["history"].as_array().is_some_and(|h| !h.is_empty())
            });
            assert_eq!(v["alive"], true);

            // GET /group/{name}/delay tests every member at once, within the same bound.
            probe.hold();
            let path = "/group/G2/delay?url=http%3A%2F%2F10.91.2.2%3A8204%2Ft&timeout=30000";
            let asked = {
                let topo_gateway = topo.gateway.name.clone();
                std::thread::spawn(move || {
                    let out = std::process::Command::new("ip")
                        .args(["netns", "exec", &topo_gateway, "curl", "-s"])
                        .arg(format!("http://{}{path}", crate::common::topo::API))
                        .output()
                        .expect("curl");
                    serde_json::from_slice::<Value>(&out.stdout).expect("json")
                })
            };
            probe.wait(20, "ten group tests held", |p| p.in_flight() == 10);
            probe.release();
            let delays = asked.join().expect("group delay");
            assert_eq!(delays.as_object().map(|m| m.len()), Some(20), "{delays}");
            assert_eq!(
                probe
                    .max_in_flight
                    .load(std::sync::atomic::Ordering::SeqCst),
                10,
                "the API's group test keeps the bound too"
            );
        },
    );
}

/// Tests the probe saw from dante and micro.
fn counts(probe: &probe::Probe) -> (usize, usize) {
    (probe.count(DANTE_OUT), probe.count(MICROSOCKS_OUT))
}

const LAZY: &str = r#"
proxy-groups:
  - {name: L, type: url-test, proxies: [dante, micro], url: "http://10.91.2.2:8204/t", interval: 2, idle-timeout: 3}
rules:
  - DST-PORT,6100,L
  - MATCH,DIRECT
"#;

fn lazy_groups_stop_without_flows_and_resume_at_once() {
    with_prepared_gateway(
        "groups_lazy",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, &yaml(LAZY)),
        |topo| {
            let procs = upstreams::start(&topo.server);
            let probe = start_probe(topo);
            identify_server(&topo.server, socket(SERVER4, 6100));
            (procs, probe)
        },
        |topo, _gw, (_procs, (probe, _))| {
            probe.wait(10, "the round at start", |p| counts(p) == (1, 1));
            // Idle from the start: the promise under test is that time passes without tests.
            std::thread::sleep(Duration::from_secs(4));
            assert_eq!(counts(&probe), (1, 1), "no flow, no checks");
            let flowed = Instant::now();
            fetch(&topo.client, socket(SERVER4, 6100), "x", 1);
            probe.wait(5, "the resumed round", |p| counts(p) == (2, 2));
            assert!(
                flowed.elapsed() < Duration::from_secs(2),
                "the flow woke the checks before the 2 s interval: {:?}",
                flowed.elapsed()
            );
            // Idle again after 3 s: at most the rounds before that, then nothing.
            std::thread::sleep(Duration::from_secs(6));
            let settled = counts(&probe);
            assert!(settled.0 <= 4, "{settled:?}");
            std::thread::sleep(Duration::from_secs(4));
            assert_eq!(counts(&probe), settled, "idle again: checks stopped");
        },
    );
}

const FRESH: &str = r#"
proxy-groups:
  - {name: F, type: url-test, proxies: [dante, micro], url: "http://10.91.2.2:8204/t", interval: 6, idle-timeout: 1}
rules:
  - DST-PORT,6100,F
  - MATCH,DIRECT
"#;

fn results_within_the_interval_are_not_tested_again() {
    with_prepared_gateway(
        "groups_fresh",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, &yaml(FRESH)),
        |topo| {
            let procs = upstreams::start(&topo.server);
            let probe = start_probe(topo);
            identify_server(&topo.server, socket(SERVER4, 6100));
            (procs, probe)
        },
        |topo, _gw, (_procs, (probe, _))| {
            probe.wait(10, "the round at start", |p| counts(p) == (1, 1));
            let start = probe.last(MICROSOCKS_OUT).expect("micro tested");
            std::thread::sleep(
                (start + Duration::from_secs(3)).saturating_duration_since(Instant::now()),
            );
            let (status, _) = http(
                topo,
                "GET",
                "/proxies/dante/delay?url=http%3A%2F%2F10.91.2.2%3A8204%2Ft&timeout=5000",
            );
            assert_eq!(status, 200);
            assert_eq!(counts(&probe), (2, 1));
            std::thread::sleep(
                (start + Duration::from_millis(6500)).saturating_duration_since(Instant::now()),
            );
            // The flow resumes the lazy group: micro's result is stale, dante's is not.
            fetch(&topo.client, socket(SERVER4, 6100), "x", 1);
            api_until(topo, 10, "/proxies/micro", "micro tested again", |v| {
                v["history"].as_array().is_some_and(|h| h.len() == 2)
            });
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(counts(&probe), (2, 2), "dante was fresh: skipped");
        },
    );
}

const STATUS: &str = r#"
  - {name: secure, type: http, server: 10.91.2.10, port: 8443, tls: true, skip-cert-verify: true, username: tp, password: s3cret}
  - {name: strict, type: socks5, server: 10.91.2.10, port: 1080}
  - {name: loose, type: socks5, server: 10.91.2.10, port: 1080}
proxy-providers:
  pool:
    type: inline
    health-check: {enable: true, url: "http://10.91.2.2:8204/status/204", interval: 1, lazy: false, expected-status: "204"}
    payload:
      - {name: pooled, type: socks5, server: 10.91.2.10, port: 1081, username: tp, password: s3cret}
proxy-groups:
  - {name: Strict, type: url-test, proxies: [strict], url: "http://10.91.2.2:8204/status/200", expected-status: "204", interval: 600, lazy: false}
  - {name: Loose, type: url-test, proxies: [loose], url: "http://10.91.2.2:8204/status/200", expected-status: "200/204", interval: 600, lazy: false}
  - {name: Pool, type: select, use: [pool]}
"#;

/// `GET /proxies/{name}/delay` for `url` with `expected`; the status.
fn delay(topo: &Topology, name: &str, url: &str, expected: &str) -> (u16, Value) {
    let q = |s: &str| s.replace(':', "%3A").replace('/', "%2F");
    let path = format!(
        "/proxies/{name}/delay?url={}&timeout=5000&expected={}",
        q(url),
        q(expected)
    );
    http(topo, "GET", &path)
}

fn expected_status_and_https_through_every_outbound_type() {
    let _turn = crate::common::serial();
    let topo = Topology::new();
    let _procs = upstreams::start(&topo.server);
    // The certificate names 10.91.2.2; the same server on 10.91.2.4 does not match it.
    let (probe, pem) = probe::start(
        &topo.server,
        socket(SERVER4, PROBE),
        &[socket(SERVER4, PROBE_TLS), socket("10.91.2.4", PROBE_TLS)],
        true,
        Duration::ZERO,
    );
    let mut config = gateway_config(AccountingMode::Ebpf, crate::common::test_cgroup("status"));
    let pem_yaml: String = pem.lines().map(|l| format!("      {l}\n")).collect();
    let text = yaml(STATUS).replacen(
        "proxy-providers:",
        &format!("tls:\n  custom-certifactes:\n    - |\n{pem_yaml}proxy-providers:"),
        1,
    );
    routing_from_yaml(&mut config, &text);
    let gw = Gateway::start(&topo, config);

    let https = "https://10.91.2.2:8205/t";
    for (name, from) in [
        ("DIRECT", Some("10.91.2.1")),
        ("dante", Some(DANTE_OUT)),
        ("micro", Some(MICROSOCKS_OUT)),
        ("tiny", Some(TINYPROXY_OUT)),
        ("secure", None),
    ] {
        let before = (probe.total(), from.map(|ip| probe.count(ip)));
        let (status, v) = delay(&topo, name, https, "204");
        assert_eq!(status, 200, "HTTPS through {name}: {v}");
        assert!(v["delay"].as_u64() > Some(0));
        assert_eq!(probe.total(), before.0 + 1);
        if let (Some(ip), Some(n)) = (from, before.1) {
            assert_eq!(probe.count(ip), n + 1, "{name}'s test left from {ip}");
        }
    }
    let (status, v) = delay(&topo, "dante", "https://10.91.2.4:8205/t", "*");
    assert_eq!(
        status, 503,
        "a certificate for another address is refused: {v}"
    );
    let (_, v) = http(&topo, "GET", "/proxies/dante");
    assert_eq!(
        (v["alive"].as_bool(), v["history"].as_array().map(Vec::len)),
        (Some(false), Some(0))
    );

    let plain = |code: u16| format!("http://10.91.2.2:8204/status/{code}");
    for (code, expected, ok) in [
        (204, "204", true),
        (200, "204", false),
        (200, "200/204", true),
        (204, "200/204", true),
        (299, "200-299", true),
        (301, "200-299", false),
        (500, "*", true),
    ] {
        let (status, v) = delay(&topo, "micro", &plain(code), expected);
        assert_eq!(status == 200, ok, "{code} against {expected}: {status} {v}");
    }
    let strict = api_until(&topo, 10, "/proxies/Strict", "the failed check", |v| {
        v["alive"] == false
    });
    assert_eq!(strict["expectedStatus"], "204");
    assert_eq!(strict["history"], serde_json::json!([]));
    let loose = api_until(&topo, 10, "/proxies/Loose", "the passed check", |v| {
        v["history"].as_array().is_some_and(|h| h.len() == 1)
    });
    assert_eq!(
        (loose["alive"].as_bool(), loose["expectedStatus"].as_str()),
        (Some(true), Some("200/204"))
    );
    api_until(
        &topo,
        10,
        "/proxies/pooled",
        "the provider's own check",
        |v| v["history"].as_array().is_some_and(|h| h.len() >= 2),
    );
    gw.stop();
}

crate::tests![
    root ten_tests_at_once_across_every_group,
    root lazy_groups_stop_without_flows_and_resume_at_once,
    root results_within_the_interval_are_not_tested_again,
    root expected_status_and_https_through_every_outbound_type,
];
