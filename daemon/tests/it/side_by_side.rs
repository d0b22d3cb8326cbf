//! The same mihomo config through tpacct and through a real mihomo (1.19.23, from the PyPI
//! wheel), each behind the same TPROXY rules in the gateway namespace, for the same flows held
//! open: every flow leaves by the same upstream, and `/connections` gives the same `rule`,
//! `rulePayload`, `chains` and the metadata fields rules and dashboards read.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tpacct::config::{AccountingMode, BindAddress};

use crate::common::{
    harness::Skip,
    topo::{
        Gateway, SERVER4, TPROXY_PORT, Topology, gateway_config, routing_from_yaml, socket,
        spawn_in,
    },
    upstreams,
};

const ROUTING: &str = r#"
proxies:
  - {name: dante, type: socks5, server: 10.91.2.10, port: 1080, udp: true}
  - {name: micro, type: socks5, server: 10.91.2.10, port: 1081, username: tp, password: s3cret}
  - {name: tiny, type: http, server: 10.91.2.10, port: 3128, username: tp, password: s3cret}
proxy-groups:
  - {name: PROXY, type: select, proxies: [Inner, DIRECT]}
  - {name: Inner, type: select, proxies: [dante, micro]}
rules:
  - DOMAIN-SUFFIX,via-group.test,PROXY
  - DOMAIN,exact.test,tiny
  - DOMAIN-KEYWORD,kwd,micro
  - IP-CIDR,10.91.2.4/32,tiny,no-resolve
  - DST-PORT,6003,micro
  - AND,((NETWORK,tcp),(DST-PORT,6005)),dante
  - OR,((DST-PORT,6006),(DOMAIN,or.test)),micro
  - NOT,((DST-PORT,80)),Inner
  - DOMAIN-REGEX,^re[0-9]+\.test$,dante
  - MATCH,DIRECT
sniffer:
  enable: true
  override-destination: false
  sniff:
    HTTP: {ports: [80]}
"#;

/// The flows: (server address, port, Host header).
const FLOWS: [(&str, u16, &str); 10] = [
    (SERVER4, 80, "a.via-group.test"),
    (SERVER4, 80, "exact.test"),
    (SERVER4, 80, "a-kwd-b.test"),
    ("10.91.2.4", 6000, "x"),
    (SERVER4, 6003, "x"),
    (SERVER4, 6005, "x"),
    (SERVER4, 80, "or.test"),
    (SERVER4, 6007, "x"),
    (SERVER4, 80, "re42.test"),
    (SERVER4, 80, "plain.test"),
];

/// Metadata fields both must agree on.
const FIELDS: [&str; 9] = [
    "network",
    "type",
    "host",
    "sniffHost",
    "destinationIP",
    "destinationPort",
    "sourceIP",
    "dnsMode",
    "inboundName",
];

/// A server on `addr` answering each request head with the peer it saw, then holding the
/// connection until the client closes it.
fn holding_server(topo: &Topology, addr: SocketAddr) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(addr).expect("bind holding server");
        ready_tx.send(()).expect("ready");
        for conn in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let peer = conn.peer_addr().map(|a| a.ip().to_string());
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nX-Peer: {}\r\nContent-Length: 0\r\n\r\n",
                    peer.unwrap_or_default()
                );
                let mut conn = conn;
                let _ = conn.write_all(head.as_bytes());
                let _ = reader.read_to_end(&mut Vec::new());
            });
        }
    });
    ready_rx.recv().expect("holding server");
}

/// Opens every flow from the client and keeps it: (client port, the peer the server saw).
fn open_all(topo: &Topology) -> (Vec<(Ports, String)>, Vec<TcpStream>) {
    Topology::run_in(&topo.client, || {
        let mut seen = Vec::new();
        let mut held = Vec::new();
        for (ip, port, host) in FLOWS {
            let mut conn = TcpStream::connect(socket(ip, port)).expect("connect");
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            // One write, as real clients send a request head (mihomo sniffs only the first
            // segment; tpacct waits for the rest of a split head).
            let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
            conn.write_all(request.as_bytes()).expect("request");
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut peer = String::new();
            let mut line = String::new();
            while reader.read_line(&mut line).expect("answer head") > 2 {
                if let Some(p) = line.strip_prefix("X-Peer: ") {
                    peer = p.trim().to_owned();
                }
                line.clear();
            }
            let local = conn.local_addr().expect("local").port();
            seen.push(((local, port), peer));
            held.push(conn);
        }
        (seen, held)
    })
}

/// A connection's client port and destination port: the client may reuse one source port for
/// two destinations, so the source port alone does not name a connection.
type Ports = (u16, u16);

/// `GET /connections` from inside the gateway namespace, by client and destination port.
fn connections(topo: &Topology) -> Vec<(Ports, Value)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.gateway.name, "curl", "-sf"])
        .arg("http://127.0.0.1:9090/connections")
        .output()
        .expect("curl");
    let body: Value = serde_json::from_slice(&out.stdout).expect("/connections is JSON");
    body["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter_map(|c| {
            let port = |key: &str| c["metadata"][key].as_str()?.parse().ok();
            Some(((port("sourcePort")?, port("destinationPort")?), c.clone()))
        })
        .collect()
}

/// What is compared of one flow: the upstream it left by, its route and metadata.
fn describe(seen: &[(Ports, String)], listed: &[(Ports, Value)]) -> Vec<String> {
    seen.iter()
        .map(|(port, peer)| {
            let c = listed
                .iter()
                .find(|(p, _)| p == port)
                .map(|(_, c)| c)
                .unwrap_or_else(|| panic!("no connection {port:?} in {listed:?}"));
            let meta: Vec<String> = FIELDS
                .iter()
                .map(|f| format!("{f}={}", c["metadata"][f]))
                .collect();
            format!(
                "peer={peer} rule={} payload={} chains={} {}",
                c["rule"],
                c["rulePayload"],
                c["chains"],
                meta.join(" ")
            )
        })
        .collect()
}

/// mihomo in the gateway namespace; killed on drop.
struct Mihomo(Child);

impl Drop for Mihomo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_mihomo(topo: &Topology, binary: &std::path::Path) -> Mihomo {
    let home = crate::common::api::state_dir("mihomo-side");
    std::fs::create_dir_all(&home).expect("home");
    let config = format!(
        "tproxy-port: {TPROXY_PORT}\nrouting-mark: 6666\nallow-lan: true\nbind-address: '*'\n\
         ipv6: false\nmode: rule\nlog-level: warning\nexternal-controller: 127.0.0.1:9090\n\
         secret: ''\n{ROUTING}"
    );
    std::fs::write(home.join("config.yaml"), config).expect("config");
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.gateway.name])
        .arg(binary)
        .arg("-d")
        .arg(&home)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mihomo");
    let mihomo = Mihomo(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = Command::new("ip")
            .args(["netns", "exec", &topo.gateway.name, "curl", "-sf"])
            .arg("http://127.0.0.1:9090/version")
            .output()
            .is_ok_and(|o| o.status.success());
        if up {
            return mihomo;
        }
        assert!(
            Instant::now() < deadline,
            "mihomo's controller never came up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn the_same_config_routes_like_mihomo() -> Result<(), Skip> {
    let binary = upstreams::mihomo()
        .ok_or_else(|| Skip("no target/tools/mihomo: run cargo xtask setup".into()))?;
    let _turn = crate::common::serial();
    let topo = Topology::new();
    let _procs = upstreams::start(&topo.server);
    let mut addrs: Vec<(&str, u16)> = FLOWS.iter().map(|(ip, port, _)| (*ip, *port)).collect();
    addrs.dedup();
    addrs.sort_unstable();
    addrs.dedup();
    for (ip, port) in addrs {
        holding_server(&topo, socket(ip, port));
    }

    let mut config = gateway_config(
        AccountingMode::Ebpf,
        crate::common::test_cgroup("side-by-side"),
    );
    routing_from_yaml(&mut config, ROUTING);
    let firewall = config.tproxy_firewall.clone().expect("firewall");
    let gw = Gateway::start(&topo, config);
    let (seen, held) = open_all(&topo);
    let ours = describe(&seen, &connections(&topo));
    drop(held);
    gw.wait_until(10, "tpacct's flows to close", |r| r.live_count() == 0);
    gw.stop();

    let installed = Topology::run_in(&topo.gateway, move || {
        tpacct::firewall::install(&firewall, TPROXY_PORT, 6666, BindAddress::Any, None)
            .expect("the same TPROXY rules")
    });
    let mihomo = start_mihomo(&topo, &binary);
    let (seen, held) = open_all(&topo);
    let theirs = describe(&seen, &connections(&topo));
    drop(held);
    drop(mihomo);
    Topology::run_in(&topo.gateway, move || installed.remove());

    for (i, (ours, theirs)) in ours.iter().zip(&theirs).enumerate() {
        eprintln!("{:?}\n  tpacct: {ours}\n  mihomo: {theirs}", FLOWS[i]);
    }
    assert_eq!(ours, theirs);
    Ok(())
}

crate::tests![root the_same_config_routes_like_mihomo];
