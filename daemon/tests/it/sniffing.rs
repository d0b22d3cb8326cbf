//! mihomo's sniffer keys on real flows: a name in `skip-domain` (here through an inline
//! rule-set) is ignored as if none was found, and a destination whose first bytes never tell
//! a name (a server-first protocol on a sniffed port) stops being waited on after more than
//! five failures. DNS answers relayed over TCP name later flows that send no name.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tpacct::config::AccountingMode;

use crate::common::topo::{
    Gateway, SERVER4, Topology, routing_from_yaml, socket, spawn_in, with_gateway,
};

const ROUTING: &str = r#"
rule-providers:
  skipset: {type: inline, behavior: domain, payload: ['+.skip.test']}
rules:
  - DOMAIN-SUFFIX,skip.test,DIRECT
  - DOMAIN-SUFFIX,keep.test,DIRECT
  - DOMAIN,second.tcp.test,DIRECT
  - MATCH,DIRECT
sniffer:
  enable: true
  override-destination: false
  skip-domain: ['rule-set:skipset', 'exact-skip.test']
  timeout: 400
  sniff:
    TLS: {ports: [443, 8443]}
"#;

/// How long a client waits for a server that speaks first on a sniffed port.
const SNIFF_WAIT: Duration = Duration::from_millis(400);

/// A server on `port` accepting `n` connections, one at a time: each gets `banner` first (if
/// any), then is read to its end, or only once when there is no banner (a TLS client waits
/// for an answer that never comes). Returns the bytes read.
fn server(
    topo: &Topology,
    port: u16,
    n: usize,
    banner: &'static [u8],
) -> std::thread::JoinHandle<usize> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, port)).expect("server bind");
        ready_tx.send(()).expect("ready");
        let mut read = 0;
        for _ in 0..n {
            let (mut conn, _) = listener.accept().expect("accept");
            conn.write_all(banner).expect("banner");
            let mut buf = [0u8; 4096];
            while let Ok(k) = conn.read(&mut buf) {
                if k == 0 {
                    break;
                }
                read += k;
                if banner.is_empty() {
                    break;
                }
            }
        }
        read
    });
    ready_rx.recv().expect("server ready");
    handle
}

/// A TLS ClientHello for `sni` from OpenSSL to port 443; returns the closed flow.
fn hello(topo: &Topology, gw: &Gateway, sni: &str) -> tpacct::registry::ClosedFlow {
    let closed = gw.registry.closed(usize::MAX).len();
    let server = server(topo, 443, 1, b"");
    let status = Command::new("ip")
        .args(["netns", "exec", &topo.client.name, "openssl", "s_client"])
        .args(["-connect", &format!("{SERVER4}:443"), "-servername", sni])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run openssl s_client");
    eprintln!("openssl s_client for {sni} exited {status}");
    let read = server.join().expect("server");
    gw.wait_until(10, "the TLS flow to close", |r| {
        r.live_count() == 0 && r.closed(usize::MAX).len() > closed
    });
    let flow = gw.registry.closed(1).remove(0);
    eprintln!("{sni}: server read {read} B, rule {}", flow.route.rule);
    flow
}

fn skip_domain_is_ignored_like_no_name() {
    with_gateway(
        "sniff-skip",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, ROUTING),
        |topo, gw| {
            let kept = hello(topo, gw, "www.keep.test");
            assert_eq!(kept.sniffed_host.as_deref(), Some("www.keep.test"));
            assert_eq!(kept.route.rule, "DomainSuffix");
            for sni in ["www.skip.test", "exact-skip.test"] {
                let skipped = hello(topo, gw, sni);
                assert_eq!(skipped.sniffed_host, None, "{sni}");
                assert_eq!(skipped.route.rule, "Match", "{sni}: routed by IP");
                assert!(
                    skipped.traffic.upload > 100,
                    "{sni}: the hello went through"
                );
            }
        },
    );
}

fn a_server_first_destination_stops_being_waited_on() {
    with_gateway(
        "sniff-failing",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, ROUTING),
        |topo, gw| {
            let banner = b"SSH-2.0-OpenSSH_9.6\r\n";
            let server = server(topo, 8443, 7, banner);
            let waits = Topology::run_in(&topo.client, move || {
                (0..7)
                    .map(|_| {
                        let mut conn = TcpStream::connect(socket(SERVER4, 8443)).expect("connect");
                        let start = Instant::now();
                        let mut got = vec![0u8; banner.len()];
                        conn.read_exact(&mut got).expect("banner");
                        assert_eq!(got, banner);
                        start.elapsed()
                    })
                    .collect::<Vec<_>>()
            });
            server.join().expect("server");
            eprintln!("banner waits: {waits:?}");
            for (i, w) in waits[..6].iter().enumerate() {
                assert!(*w >= SNIFF_WAIT, "connection {i} was not sniffed: {w:?}");
            }
            assert!(
                waits[6] < SNIFF_WAIT,
                "the seventh connection still waited {:?}",
                waits[6]
            );
            gw.wait_until(10, "the seven flows to close", |r| {
                r.live_count() == 0 && r.closed(usize::MAX).len() == 7
            });
            let closed = gw.registry.closed(7);
            assert!(closed.iter().all(|f| f.sniffed_host.is_none()));
            assert!(
                closed
                    .iter()
                    .all(|f| f.traffic.download == banner.len() as u64)
            );
        },
    );
}

/// A DNS server over TCP on `SERVER4:53` for one connection: it answers each query for
/// `first.tcp.test` with 10.91.2.77 and any other with the server's own address, the second
/// answer written a byte at a time.
fn tcp_dns_server(topo: &Topology) -> std::thread::JoinHandle<()> {
    use hickory_proto::{
        op::{Message, MessageType},
        rr::{RData, Record, rdata::A},
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, 53)).expect("bind dns");
        ready_tx.send(()).expect("ready");
        let (mut conn, _) = listener.accept().expect("accept");
        for n in 0.. {
            let mut len = [0u8; 2];
            if conn.read_exact(&mut len).is_err() {
                return;
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            conn.read_exact(&mut query).expect("query");
            let query = Message::from_vec(&query).expect("a DNS query");
            let mut answer = Message::new();
            answer
                .set_id(query.id())
                .set_message_type(MessageType::Response);
            for q in query.queries() {
                answer.add_query(q.clone());
                let ip = if q.name().to_ascii().starts_with("first.") {
                    [10, 91, 2, 77]
                } else {
                    SERVER4.parse::<std::net::Ipv4Addr>().expect("ip").octets()
                };
                answer.add_answer(Record::from_rdata(
                    q.name().clone(),
                    300,
                    RData::A(A::from(std::net::Ipv4Addr::from(ip))),
                ));
            }
            let bytes = answer.to_vec().expect("encode");
            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            if n == 0 {
                conn.write_all(&framed).expect("answer");
            } else {
                for b in framed {
                    conn.write_all(&[b]).expect("answer");
                    conn.flush().expect("flush");
                }
            }
        }
    });
    ready_rx.recv().expect("dns server ready");
    handle
}

/// Queries `names` over one TCP connection from the client; returns the bytes received.
fn tcp_resolve(topo: &Topology, names: &'static [&'static str]) -> u64 {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RecordType},
    };
    Topology::run_in(&topo.client, move || {
        let mut conn = TcpStream::connect(socket(SERVER4, 53)).expect("connect dns");
        let mut got = 0;
        for (id, name) in names.iter().enumerate() {
            let mut q = Message::new();
            q.set_id(id as u16).set_recursion_desired(true);
            let name = <Name as std::str::FromStr>::from_str(name).expect("name");
            q.add_query(Query::query(name, RecordType::A));
            let bytes = q.to_vec().expect("encode");
            conn.write_all(&(bytes.len() as u16).to_be_bytes())
                .expect("query");
            conn.write_all(&bytes).expect("query");
            let mut len = [0u8; 2];
            conn.read_exact(&mut len).expect("answer length");
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
            conn.read_exact(&mut answer).expect("answer");
            Message::from_vec(&answer).expect("a DNS answer");
            got += 2 + answer.len() as u64;
        }
        got
    })
}

fn dns_answers_over_tcp_name_later_flows() {
    with_gateway(
        "tcp-dns",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, ROUTING),
        |topo, gw| {
            let dns = tcp_dns_server(topo);
            let got = tcp_resolve(topo, &["first.tcp.test", "second.tcp.test"]);
            dns.join().expect("dns server");
            gw.wait_until(10, "the DNS flow to close", |r| {
                r.live_count() == 0 && r.closed(1).len() == 1
            });
            let dns_flow = gw.registry.closed(1).remove(0);
            assert_eq!(
                dns_flow.traffic.download, got,
                "exact over the copying relay"
            );

            let server = server(topo, 6100, 1, b"hi");
            Topology::run_in(&topo.client, || {
                let mut conn = TcpStream::connect(socket(SERVER4, 6100)).expect("connect");
                let mut hi = [0u8; 2];
                conn.read_exact(&mut hi).expect("hi");
            });
            server.join().expect("server");
            gw.wait_until(10, "the named flow to close", |r| {
                r.live_count() == 0 && r.closed(usize::MAX).len() == 2
            });
            let named = gw.registry.closed(1).remove(0);
            assert_eq!(named.meta.destination_port, 6100);
            assert_eq!(named.host.as_deref(), Some("second.tcp.test"));
            assert_eq!(named.dns_mode.as_str(), "mapping");
            assert_eq!(
                (named.route.rule, named.route.payload.as_str()),
                ("Domain", "second.tcp.test")
            );
        },
    );
}

crate::tests![
    root dns_answers_over_tcp_name_later_flows,
    root skip_domain_is_ignored_like_no_name,
    root a_server_first_destination_stops_being_waited_on,
];
