//! Groups that heal, through real upstreams whose delay the probe sets: url-test picks the
//! fastest, keeps its choice within the tolerance and switches beyond it (closing the flows
//! through the old member only where `interrupt-exist-connections` says so), with TCP and UDP
//! chosen apart; fallback leaves a stopped proxy and comes back to it; real dials open the
//! circuit breaker, which recovers; load-balance keeps a site on one member, and sticky
//! sessions survive a restart that adds a member.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tpacct::config::{AccountingMode, Config};

use crate::common::{
    probe::{self, api_until, held},
    topo::{
        Gateway, SERVER4, Topology, gateway_config, routing_from_yaml, socket,
        with_prepared_gateway,
    },
    upstreams::{self, DANTE_OUT, MICROSOCKS_OUT, PROXY_IP, TINYPROXY_OUT, fetch, identify_server},
};

/// The check URL's server, and its HTTPS twin.
pub const PROBE: u16 = 8204;
pub const PROBE_TLS: u16 = 8205;
/// The stoppable microsocks: where it listens and the address it leaves from.
const SPARE_PORT: u16 = 1090;
const SPARE_OUT: &str = "10.91.2.14";

const PROXIES: &str = r#"
proxies:
  - {name: dante, type: socks5, server: 10.91.2.10, port: 1080, udp: true}
  - {name: micro, type: socks5, server: 10.91.2.10, port: 1081, username: tp, password: s3cret}
  - {name: tiny, type: http, server: 10.91.2.10, port: 3128, username: tp, password: s3cret}
  - {name: spare, type: socks5, server: 10.91.2.10, port: 1090}
"#;

/// The proxies plus `rest` (groups, rules...).
pub fn yaml(rest: &str) -> String {
    format!("{PROXIES}{rest}")
}

fn now(v: &Value) -> &str {
    v["now"].as_str().unwrap_or_default()
}

fn peer(topo: &Topology, port: u16) -> String {
    fetch(&topo.client, socket(SERVER4, port), "x.test", 1)
        .0
        .to_string()
}

/// The newest delay `/proxies/{name}` shows.
fn last_delay(v: &Value) -> u64 {
    v["history"]
        .as_array()
        .and_then(|h| h.last())
        .and_then(|r| r["delay"].as_u64())
        .unwrap_or(0)
}

const URL_TEST: &str = r#"
proxy-groups:
  - {name: Auto, type: url-test, proxies: [dante, micro, tiny], url: "http://10.91.2.2:8204/t", interval: 1, tolerance: 150, lazy: false, interrupt-exist-connections: true}
  - {name: Keep, type: url-test, proxies: [dante, micro, tiny], url: "http://10.91.2.2:8204/t", interval: 1, tolerance: 150, lazy: false}
rules:
  - NETWORK,udp,Auto
  - DST-PORT,6100,Auto
  - DST-PORT,6102,Auto
  - DST-PORT,6103,Keep
  - MATCH,DIRECT
"#;

fn url_test_follows_delay_within_tolerance() {
    with_prepared_gateway(
        "groups_url_test",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, &yaml(URL_TEST)),
        |topo| {
            let procs = upstreams::start(&topo.server);
            let probe = start_probe(topo);
            for (ip, ms) in [(DANTE_OUT, 300), (MICROSOCKS_OUT, 20), (TINYPROXY_OUT, 200)] {
                probe.0.set_delay(ip, ms);
            }
            identify_server(&topo.server, socket(SERVER4, 6100));
            upstreams::udp_identify_server(&topo.server, socket(SERVER4, 5353));
            (procs, probe)
        },
        |topo, gw, (_procs, (probe, _))| {
            for g in ["Auto", "Keep"] {
                api_until(
                    topo,
                    20,
                    &format!("/proxies/{g}"),
                    "micro, the fastest",
                    |v| now(v) == "micro",
                );
            }
            assert_eq!(peer(topo, 6100), MICROSOCKS_OUT);
            // UDP is chosen apart: of the members only dante carries it.
            let udp = crate::common::topo::Topology::run_in(&topo.client, || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
                sock.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                sock.send_to(b"u", socket(SERVER4, 5353)).expect("send");
                let mut buf = [0u8; 256];
                let (n, _) = sock.recv_from(&mut buf).expect("reply");
                String::from_utf8_lossy(&buf[..n]).into_owned()
            });
            assert!(udp.starts_with(&format!("peer={DANTE_OUT}")), "{udp}");

            // Faster by less than the tolerance: the choice stays.
            probe.set_delay(MICROSOCKS_OUT, 300);
            probe.set_delay(TINYPROXY_OUT, 220);
            api_until(topo, 20, "/proxies/micro", "micro's new delay", |v| {
                last_delay(v) >= 250
            });
            api_until(topo, 20, "/proxies/tiny", "tiny's new delay", |v| {
                (220..=400).contains(&last_delay(v))
            });
            let seen = probe.count(MICROSOCKS_OUT);
            probe.wait(20, "two more rounds", |p| {
                p.count(MICROSOCKS_OUT) >= seen + 2
            });
            let (_, auto) = crate::common::topo::http(topo, "GET", "/proxies/Auto");
            assert_eq!(
                now(&auto),
                "micro",
                "tiny is faster by less than 150 ms: {auto}"
            );

            // Flows through each group, then tiny faster by far more than the tolerance.
            let interrupted = held(&topo.client, &topo.server, socket(SERVER4, 6102));
            let kept = held(&topo.client, &topo.server, socket(SERVER4, 6103));
            gw.wait_until(10, "both held flows", |r| r.live_count() >= 2);
            probe.set_delay(TINYPROXY_OUT, 0);
            for g in ["Auto", "Keep"] {
                api_until(
                    topo,
                    20,
                    &format!("/proxies/{g}"),
                    "the switch to tiny",
                    |v| now(v) == "tiny",
                );
            }
            let ended = interrupted.recv_timeout(Duration::from_secs(10));
            assert!(
                ended.is_ok(),
                "Auto's flow through micro was closed on the switch"
            );
            assert!(
                kept.recv_timeout(Duration::from_secs(2)).is_err(),
                "Keep does not interrupt: its flow through micro stays"
            );
            assert_eq!(peer(topo, 6100), TINYPROXY_OUT);
        },
    );
}

const FALLBACK: &str = r#"
proxy-groups:
  - {name: Safe, type: fallback, proxies: [spare, dante], url: "http://10.91.2.2:8204/t", interval: 1, lazy: false}
rules:
  - DST-PORT,6100,Safe
  - MATCH,DIRECT
"#;

fn fallback_leaves_a_stopped_proxy_and_comes_back() {
    with_prepared_gateway(
        "groups_fallback",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, &yaml(FALLBACK)),
        |topo| {
            let procs = upstreams::start(&topo.server);
            let spare = probe::microsocks(&topo.server, socket(PROXY_IP, SPARE_PORT), SPARE_OUT);
            let probe = start_probe(topo);
            identify_server(&topo.server, socket(SERVER4, 6100));
            (procs, spare, probe)
        },
        |topo, _gw, (_procs, mut spare, _probe)| {
            api_until(topo, 20, "/proxies/spare", "spare tested", |v| {
                v["alive"] == true && last_delay(v) > 0
            });
            assert_eq!(peer(topo, 6100), SPARE_OUT);
            spare.stop();
            let dead = api_until(topo, 20, "/proxies/spare", "spare's failed test", |v| {
                v["alive"] == false
            });
            assert_eq!(
                dead["history"],
                serde_json::json!([]),
                "a failure deletes the history"
            );
            api_until(topo, 5, "/proxies/Safe", "dante chosen", |v| {
                now(v) == "dante"
            });
            assert_eq!(peer(topo, 6100), DANTE_OUT);
            let _spare = probe::microsocks(&topo.server, socket(PROXY_IP, SPARE_PORT), SPARE_OUT);
            api_until(topo, 20, "/proxies/Safe", "spare back", |v| {
                now(v) == "spare"
            });
            assert_eq!(peer(topo, 6100), SPARE_OUT);
        },
    );
}

/// The probe, open, answering at once.
pub fn start_probe(topo: &Topology) -> (std::sync::Arc<probe::Probe>, String) {
    probe::start(
        &topo.server,
        socket(SERVER4, PROBE),
        &[socket(SERVER4, PROBE_TLS)],
        true,
        Duration::ZERO,
    )
}

const BREAKER: &str = r#"
circuit-breaker: {max-failures: 2, failure-window: 60, recovery-time: 2}
proxy-groups:
  - {name: Safe, type: fallback, proxies: [spare, dante], url: "http://10.91.2.2:8204/t", interval: 3600, lazy: false, max-failed-times: 100}
rules:
  - DST-PORT,6100,Safe
  - MATCH,DIRECT
"#;

/// A connection through the gateway that the failed dial answers with a reset.
fn refused(topo: &Topology, to: SocketAddr) {
    crate::common::topo::Topology::run_in(&topo.client, move || {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(to).expect("connect");
        let _ = conn.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = [0u8; 64];
        assert!(
            !matches!(conn.read(&mut buf), Ok(n) if n > 0),
            "no answer through a dead proxy"
        );
    });
}

fn the_breaker_opens_on_failed_dials_and_recovers() {
    with_prepared_gateway(
        "groups_breaker",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, &yaml(BREAKER)),
        |topo| {
            let procs = upstreams::start(&topo.server);
            let spare = probe::microsocks(&topo.server, socket(PROXY_IP, SPARE_PORT), SPARE_OUT);
            let probe = start_probe(topo);
            identify_server(&topo.server, socket(SERVER4, 6100));
            (procs, spare, probe)
        },
        |topo, _gw, (_procs, mut spare, _probe)| {
            api_until(topo, 20, "/proxies/spare", "the check at start", |v| {
                last_delay(v) > 0
            });
            assert_eq!(peer(topo, 6100), SPARE_OUT);
            spare.stop();
            // No check runs for an hour: only real dials tell.
            refused(topo, socket(SERVER4, 6100));
            let (_, s) = crate::common::topo::http(topo, "GET", "/proxies/spare");
            assert_eq!(s["extra"]["tpacct"]["healthy"], true, "one failure: {s}");
            refused(topo, socket(SERVER4, 6100));
            let s = api_until(topo, 5, "/proxies/spare", "the breaker open", |v| {
                v["extra"]["tpacct"]["healthy"] == false
            });
            let f = &s["extra"]["tpacct"];
            assert_eq!(
                (f["dials"].as_u64(), f["dialFailures"].as_u64()),
                (Some(3), Some(2)),
                "{s}"
            );
            assert_eq!(peer(topo, 6100), DANTE_OUT, "the dead member is skipped");
            let _spare = probe::microsocks(&topo.server, socket(PROXY_IP, SPARE_PORT), SPARE_OUT);
            // The recovery time is the promise: after it, the next flow retries spare.
            api_until(topo, 10, "/proxies/Safe", "the recovery", |v| {
                now(v) == "spare"
            });
            assert_eq!(peer(topo, 6100), SPARE_OUT);
            let (_, s) = crate::common::topo::http(topo, "GET", "/proxies/spare");
            let f = &s["extra"]["tpacct"];
            assert_eq!(
                (f["dials"].as_u64(), f["healthy"].as_bool()),
                (Some(4), Some(true)),
                "{s}"
            );
            assert_eq!(f["active"].as_u64(), Some(0), "every flow ended: {s}");
        },
    );
}

const BALANCE: &str = r#"
proxy-groups:
  - {name: Hash, type: load-balance, proxies: [dante, micro, tiny], url: "http://10.91.2.2:8204/t", interval: 60, lazy: false}
  - {name: Sticky, type: load-balance, strategy: sticky-sessions, proxies: [dante, micro, tiny], url: "http://10.91.2.2:8204/t", interval: 60, lazy: false}
rules:
  - DOMAIN-KEYWORD,hash,Hash
  - DOMAIN-KEYWORD,sticky,Sticky
  - MATCH,DIRECT
sniffer:
  enable: true
  override-destination: false
  sniff:
    HTTP: {ports: [80]}
"#;

/// The same groups with a fourth member.
fn balance_grown() -> String {
    yaml(BALANCE).replace(
        "proxies: [dante, micro, tiny]",
        "proxies: [dante, micro, tiny, spare]",
    )
}

/// Where each of 16 sites (`{prefix}{i}.test`, two names under each) goes.
fn homes(topo: &Topology, prefix: &str) -> Vec<String> {
    (0..16)
        .map(|i| {
            let site = format!("{prefix}{i}.test");
            let a = fetch(&topo.client, socket(SERVER4, 80), &format!("a.{site}"), 1).0;
            let b = fetch(&topo.client, socket(SERVER4, 80), &format!("www.{site}"), 1).0;
            assert_eq!(a, b, "{site}: one site, one member");
            a.to_string()
        })
        .collect()
}

fn load_balance_keeps_sites_and_sticky_sessions_survive_a_restart() {
    let _turn = crate::common::serial();
    let topo = Topology::new();
    // One state directory for both runs.
    let base: Config = gateway_config(AccountingMode::Ebpf, crate::common::test_cgroup("lb"));
    let config = |text: &str| {
        let mut c = base.clone();
        routing_from_yaml(&mut c, text);
        c
    };
    let _procs = upstreams::start(&topo.server);
    let _spare = probe::microsocks(&topo.server, socket(PROXY_IP, SPARE_PORT), SPARE_OUT);
    let _probe = start_probe(&topo);
    identify_server(&topo.server, socket(SERVER4, 80));
    let gw = Gateway::start(&topo, config(&yaml(BALANCE)));
    let hashed = homes(&topo, "hash");
    let mut spread = hashed.clone();
    spread.sort();
    spread.dedup();
    assert!(spread.len() >= 2, "16 sites over 3 members: {hashed:?}");
    let stuck = homes(&topo, "sticky");
    gw.stop();

    // A fourth member: hashing moves some sites to it, sticky sessions move none.
    let gw = Gateway::start(&topo, config(&balance_grown()));
    let rehashed = homes(&topo, "hash");
    let moved: Vec<usize> = (0..16).filter(|&i| hashed[i] != rehashed[i]).collect();
    assert!(
        !moved.is_empty(),
        "consistent hashing gives the new member a share"
    );
    assert!(
        moved.iter().all(|&i| rehashed[i] == SPARE_OUT),
        "only sites going to the new member move: {hashed:?} → {rehashed:?}"
    );
    assert_eq!(
        homes(&topo, "sticky"),
        stuck,
        "sticky sessions were kept across the restart"
    );
    let (_, s) = crate::common::topo::http(&topo, "GET", "/proxies/Sticky");
    assert!(
        s["extra"]["tpacct"]["affinityHits"].as_u64() >= Some(32),
        "{s}"
    );
    gw.stop();
}

crate::tests![
    root url_test_follows_delay_within_tolerance,
    root fallback_leaves_a_stopped_proxy_and_comes_back,
    root the_breaker_opens_on_failed_dials_and_recovers,
    root load_balance_keeps_sites_and_sticky_sessions_survive_a_restart,
];
