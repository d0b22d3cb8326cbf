//! Rules route real flows through real upstreams: dante (SOCKS5), microsocks (SOCKS5 with a
//! password), tinyproxy (HTTP CONNECT with Basic auth) and pproxy (an HTTPS proxy), in the
//! server namespace. Each flow's path is told by the address the server saw, and its
//! `rule`, `rulePayload` and `chains` by the gateway; totals are exact on the client leg.

use std::net::{IpAddr, SocketAddr};

use tpacct::{config::AccountingMode, registry::Registry};

use crate::common::{
    topo::{Gateway, SERVER4, Topology, http_with, routing_from_yaml, socket, with_gateway},
    upstreams::{self, DANTE_OUT, MICROSOCKS_OUT, TINYPROXY_OUT, fetch, identify_server},
};

const ROUTING: &str = r#"
proxies:
  - {name: dante, type: socks5, server: 10.91.2.10, port: 1080, udp: true}
  - {name: micro, type: socks5, server: 10.91.2.10, port: 1081, username: tp, password: s3cret}
  - {name: tiny, type: http, server: 10.91.2.10, port: 3128, username: tp, password: s3cret}
  - {name: secure, type: http, server: 10.91.2.10, port: 8443, tls: true, skip-cert-verify: true, username: tp, password: s3cret}
proxy-groups:
  - {name: PROXY, type: select, proxies: [Inner, DIRECT]}
  - {name: Inner, type: select, proxies: [dante, micro]}
rules:
  - DOMAIN-SUFFIX,via-group.test,PROXY
  - DOMAIN,exact.test,tiny
  - DOMAIN-KEYWORD,kwd,micro
  - IP-CIDR,10.91.2.4/32,tiny,no-resolve
  - DST-PORT,6003,micro
  - AND,((NETWORK,tcp),(DST-PORT,6004)),REJECT
  - DOMAIN-REGEX,^re[0-9]+\.test$,dante
  - DOMAIN,localhost,secure
  - NETWORK,udp,dante
  - MATCH,DIRECT
sniffer:
  enable: true
  override-destination: false
  sniff:
    HTTP: {ports: [80]}
    TLS: {ports: [443]}
"#;

/// The gateway's address facing the server: what DIRECT flows come from.
const GATEWAY_OUT: &str = "10.91.2.1";

/// The newest closed flow.
fn last_closed(r: &Registry) -> tpacct::registry::ClosedFlow {
    r.closed(1).remove(0)
}

/// One request through the gateway; checks the path the server saw and the route and exact
/// totals the gateway recorded.
fn check(
    topo: &Topology,
    gw: &Gateway,
    to: SocketAddr,
    host: &str,
    peer: &str,
    (rule, payload, chains): (&str, &str, &[&str]),
) {
    let before = gw.registry.opened().0;
    let (seen, sent, received) = fetch(&topo.client, to, host, 20_000);
    assert_eq!(
        seen,
        peer.parse::<IpAddr>().expect("ip"),
        "{host} → {to}: the path"
    );
    gw.wait_until(10, "the flow to close", |r| {
        r.opened().0 > before && r.live_count() == 0
    });
    let closed = last_closed(&gw.registry);
    assert_eq!(
        (
            closed.route.rule,
            closed.route.payload.as_str(),
            closed.route.chains.as_slice()
        ),
        (
            rule,
            payload,
            &chains.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>()[..]
        ),
        "{host} → {to}"
    );
    assert_eq!(
        (closed.traffic.upload, closed.traffic.download),
        (sent, received),
        "{host} → {to}: exact totals on the client leg"
    );
}

fn rules_route_through_real_upstreams() {
    with_gateway(
        "routing",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, ROUTING),
        |topo, gw| {
            let _procs = upstreams::start(&topo.server);
            for (ip, port) in [
                (SERVER4, 80),
                ("10.91.2.4", 6000),
                (SERVER4, 6000),
                (SERVER4, 6003),
                (SERVER4, 6004),
                ("127.0.0.1", 80),
            ] {
                identify_server(&topo.server, socket(ip, port));
            }
            let web = socket(SERVER4, 80);
            let ds = (
                "DomainSuffix",
                "via-group.test",
                &["dante", "Inner", "PROXY"][..],
            );
            check(topo, gw, web, "a.via-group.test", DANTE_OUT, ds);
            check(topo, gw, web, "via-group.test", DANTE_OUT, ds);
            let exact = ("Domain", "exact.test", &["tiny"][..]);
            check(topo, gw, web, "exact.test", TINYPROXY_OUT, exact);
            let kw = ("DomainKeyword", "kwd", &["micro"][..]);
            check(topo, gw, web, "a-kwd-b.test", MICROSOCKS_OUT, kw);
            let cidr = ("IPCIDR", "10.91.2.4/32", &["tiny"][..]);
            check(
                topo,
                gw,
                socket("10.91.2.4", 6000),
                "x",
                TINYPROXY_OUT,
                cidr,
            );
            let port = ("DstPort", "6003", &["micro"][..]);
            check(topo, gw, socket(SERVER4, 6003), "x", MICROSOCKS_OUT, port);
            let re = ("DomainRegex", r"^re[0-9]+\.test$", &["dante"][..]);
            check(topo, gw, web, "re42.test", DANTE_OUT, re);
            // And their near misses, all the way to MATCH.
            let direct = ("Match", "", &["DIRECT"][..]);
            for host in ["xvia-group.test", "notexact.test", "kw.test", "rex.test"] {
                check(topo, gw, web, host, GATEWAY_OUT, direct);
            }
            check(topo, gw, socket(SERVER4, 6000), "x", GATEWAY_OUT, direct);

            // A logic rule rejecting: the client is reset, the flow recorded with its rule.
            let reset = Topology::run_in(&topo.client, || {
                use std::io::Read;
                let mut c = std::net::TcpStream::connect(socket(SERVER4, 6004)).expect("connect");
                c.read(&mut [0u8; 8]).map_err(|e| e.kind())
            });
            assert_eq!(reset, Err(std::io::ErrorKind::ConnectionReset));
            gw.wait_until(10, "the rejected flow", |r| r.live_count() == 0);
            let closed = last_closed(&gw.registry);
            assert_eq!(
                (closed.route.rule, closed.route.chains.clone()),
                ("AND", vec!["REJECT".to_owned()])
            );

            // Switching groups through the API changes where new flows go.
            let put = |group: &str, name: &str| {
                let body = format!(r#"{{"name":"{name}"}}"#);
                http_with(topo, "PUT", &format!("/proxies/{group}"), &body).0
            };
            assert_eq!(put("PROXY", "DIRECT"), 204);
            let group_direct = ("DomainSuffix", "via-group.test", &["DIRECT", "PROXY"][..]);
            check(topo, gw, web, "a.via-group.test", GATEWAY_OUT, group_direct);
            assert_eq!(put("PROXY", "Inner"), 204);
            assert_eq!(put("Inner", "micro"), 204);
            let nested = (
                "DomainSuffix",
                "via-group.test",
                &["micro", "Inner", "PROXY"][..],
            );
            check(topo, gw, web, "a.via-group.test", MICROSOCKS_OUT, nested);
            assert_eq!(put("Inner", "nope"), 400);
        },
    );
}

fn https_proxy_gets_the_sniffed_name_when_it_overrides() {
    let yaml = ROUTING.replace("override-destination: false", "override-destination: true");
    with_gateway(
        "routing_tls",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, &yaml),
        |topo, gw| {
            let _procs = upstreams::start(&topo.server);
            identify_server(&topo.server, socket("127.0.0.1", 80));
            identify_server(&topo.server, socket(SERVER4, 80));
            // The proxy is asked for `localhost:80`, not the address the client dialed: it
            // connects to its own loopback, which answers with peer 127.0.0.1.
            let secure = ("Domain", "localhost", &["secure"][..]);
            check(
                topo,
                gw,
                socket(SERVER4, 80),
                "localhost",
                "127.0.0.1",
                secure,
            );
            assert!(
                upstreams::pproxy_log().contains("localhost:80"),
                "{}",
                upstreams::pproxy_log()
            );
            let closed = last_closed(&gw.registry);
            assert_eq!(
                closed.host.as_deref(),
                Some("localhost"),
                "host is the sniffed name"
            );
        },
    );
}

fn udp_through_socks5_is_exact_on_the_client_leg() {
    with_gateway(
        "routing_udp",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, ROUTING),
        |topo, gw| {
            let _procs = upstreams::start(&topo.server);
            upstreams::udp_identify_server(&topo.server, socket(SERVER4, 5353));
            let (sent, received) = Topology::run_in(&topo.client, || {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
                sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .expect("timeout");
                let (mut sent, mut received) = (0u64, 0u64);
                let mut buf = [0u8; 2048];
                for size in [1usize, 100, 1000, 1400] {
                    let payload = vec![b'u'; size];
                    sock.send_to(&payload, socket(SERVER4, 5353)).expect("send");
                    let (n, from) = sock.recv_from(&mut buf).expect("reply through dante");
                    assert_eq!(
                        from,
                        socket(SERVER4, 5353),
                        "replies come from the destination"
                    );
                    let text = String::from_utf8_lossy(&buf[..n]);
                    assert!(text.starts_with(&format!("peer={DANTE_OUT}\n")), "{text}");
                    sent += size as u64;
                    received += n as u64;
                }
                (sent, received)
            });
            gw.wait_until(10, "the session to expire", |r| r.live_count() == 0);
            let closed = last_closed(&gw.registry);
            assert_eq!(closed.route.chains, ["dante"]);
            assert_eq!(
                (closed.route.rule, closed.route.payload.as_str()),
                ("Network", "udp")
            );
            assert_eq!(
                (closed.traffic.upload, closed.traffic.download),
                (sent, received),
                "the client leg: payload only, whatever SOCKS5 adds"
            );
        },
    );
}

crate::tests![
    root rules_route_through_real_upstreams,
    root https_proxy_gets_the_sniffed_name_when_it_overrides,
    root udp_through_socks5_is_exact_on_the_client_leg,
];
