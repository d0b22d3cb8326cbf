//! The fast path: flows the first packet decides DIRECT are forwarded by the kernel (no
//! proxied socket) and counted exactly from sequence numbers, with loss and reordering; flows
//! the rules cannot decide at the first packet are proxied as before.

use std::{
    net::{Shutdown, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use crate::common::{
    run,
    topo::{
        CLIENT4, CLIENT6, SERVER4, SERVER6, Topology, read_all, socket, spawn_in, transfer,
        with_gateway, write_pattern,
    },
};
use tpacct::{
    config::{AccountingMode, Config, FastPathConfig},
    registry::{ClosedFlow, Traffic},
};

pub(crate) const FAST_PORT: u16 = 5001;
const PROXIED_PORT: u16 = 6003;

pub(crate) fn fast_config(config: &mut Config) {
    config.fast_path = FastPathConfig {
        enable: true,
        interfaces: vec!["g1".into()],
        ..FastPathConfig::default()
    };
    config.rules = vec![
        format!("DST-PORT,{FAST_PORT}-{},DIRECT", FAST_PORT + 9),
        // Needs the name: everything below it is decided by the proxy.
        "DOMAIN-SUFFIX,example.com,DIRECT".into(),
        "MATCH,DIRECT".into(),
    ];
}

/// One TCP connection to `server_ip`:`port` (see [`transfer`]).
pub(crate) fn exchange(topo: &Topology, server_ip: &str, port: u16, up: u64, down: u64) {
    transfer(topo, socket(server_ip, port), up, down);
}

/// Waits for the flow to `port` to close and returns it.
pub(crate) fn closed_to(gw: &crate::common::topo::Gateway, port: u16) -> ClosedFlow {
    let mut found = None;
    gw.wait_until(15, "the flow to close", |r| {
        found = r
            .closed(100)
            .into_iter()
            .find(|c| c.meta.destination_port == port);
        found.is_some()
    });
    found.expect("closed")
}

/// Drops one in `n` non-SYN TCP segments sent and received by the client and the server (this
/// kernel has no netem): the gateway sees holes filled later (reordering) and duplicates.
fn lossy(topo: &Topology, n: u32) {
    let drop = format!("tcp flags & syn == 0 numgen random mod {n} == 0 drop");
    let script = format!(
        "add table inet lossy; \
         add chain inet lossy o {{ type filter hook output priority 0; }}; \
         add chain inet lossy i {{ type filter hook input priority 0; }}; \
         add rule inet lossy o {drop}; add rule inet lossy i {drop}"
    );
    for ns in [&topo.server, &topo.client] {
        run(&["ip", "netns", "exec", &ns.name, "nft", &script]);
    }
}

fn tcp_is_forwarded_and_counted_exactly() {
    with_gateway("fast_tcp", AccountingMode::Ebpf, fast_config, |topo, gw| {
        // (server, up, down); loss on both sides of the gateway from the fourth on.
        let runs = [
            (SERVER4, 0, 0),
            (SERVER4, 1, 1),
            (SERVER4, 1 << 20, 100 << 20),
            (SERVER4, 7, 1 << 20),
            (SERVER6, 1 << 20, 3 << 20),
        ];
        for (i, (server, up, down)) in runs.into_iter().enumerate() {
            if i == 3 {
                lossy(topo, 20);
            }
            let port = FAST_PORT + i as u16;
            exchange(topo, server, port, up, down);
            let closed = closed_to(gw, port);
            assert_eq!(
                closed.traffic,
                Traffic {
                    upload: up,
                    download: down
                },
                "{up} B up, {down} B down"
            );
            assert_eq!(closed.meta.inbound_name, "DEFAULT-FASTPATH");
            assert_eq!(closed.route.chains, ["DIRECT"]);
            assert_eq!(closed.route.rule, "DstPort");
            let client = if server == SERVER4 { CLIENT4 } else { CLIENT6 };
            assert_eq!(closed.meta.source.ip().to_string(), client);
            gw.registry
                .closed(100)
                .iter()
                .for_each(|c| assert_eq!(c.meta.inbound_name, "DEFAULT-FASTPATH"));
        }
    });
}

fn undecided_flows_are_proxied_and_ipv6_is_forwarded() {
    with_gateway(
        "fast_split",
        AccountingMode::Ebpf,
        fast_config,
        |topo, gw| {
            for (server, port, inbound, up, down) in [
                (SERVER4, PROXIED_PORT, "DEFAULT-TPROXY", 3_000, 50_000),
                (SERVER6, FAST_PORT, "DEFAULT-FASTPATH", 70_000, 9),
            ] {
                exchange(topo, server, port, up, down);
                let closed = closed_to(gw, port);
                assert_eq!(closed.meta.inbound_name, inbound);
                assert_eq!(
                    closed.traffic,
                    Traffic {
                        upload: up,
                        download: down
                    }
                );
            }
        },
    );
}

/// Datagrams of several sizes (one fragmented) to `server_ip`, each answered with twice its
/// size; with `options`, every client datagram carries an IPv6 destination-options header.
fn udp_round(topo: &Topology, gw: &crate::common::topo::Gateway, server_ip: &str, options: bool) {
    let server_addr = socket(server_ip, FAST_PORT);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sizes = [1usize, 100, 1400, 8000];
    let server = spawn_in(&topo.server, move || {
        let sock = UdpSocket::bind(server_addr).expect("bind");
        ready_tx.send(()).expect("ready");
        let mut buf = vec![0u8; 65_536];
        for _ in sizes {
            let (n, from) = sock.recv_from(&mut buf).expect("recv");
            sock.send_to(&buf[..n * 2], from).expect("reply");
        }
    });
    ready_rx.recv().expect("ready");
    spawn_in(&topo.client, move || {
        let any = if server_addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = UdpSocket::bind(any).expect("bind");
        if options {
            // An 8-byte destination-options header holding one PadN option.
            let header: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
            // SAFETY: a valid socket; the option value is `header`, of the length given.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_DSTOPTS,
                    header.as_ptr().cast(),
                    header.len() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "IPV6_DSTOPTS");
        }
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = vec![0u8; 65_536];
        for n in sizes {
            sock.send_to(&vec![b'u'; n], server_addr).expect("send");
            let (got, from) = sock.recv_from(&mut buf).expect("reply");
            assert_eq!((got, from), (n * 2, server_addr));
        }
    })
    .join()
    .expect("client");
    server.join().expect("server");
    let up: usize = sizes.iter().sum();
    let closed = closed_to(gw, FAST_PORT);
    assert_eq!(closed.meta.inbound_name, "DEFAULT-FASTPATH");
    assert_eq!(
        closed.traffic,
        Traffic {
            upload: up as u64,
            download: 2 * up as u64
        }
    );
}

fn udp_datagrams_are_counted_until_idle() {
    with_gateway("fast_udp", AccountingMode::Ebpf, fast_config, |topo, gw| {
        udp_round(topo, gw, SERVER4, false);
    });
}

fn ipv6_extension_headers_are_skipped() {
    with_gateway(
        "fast_udp6",
        AccountingMode::Ebpf,
        fast_config,
        |topo, gw| {
            udp_round(topo, gw, SERVER6, true);
        },
    );
}

/// TcpExtTCPFastOpenActive in `ns`: connections whose SYN carried data.
fn fast_opens(ns: &crate::common::Netns) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "nstat",
            "-az",
            "TcpExtTCPFastOpenActive",
        ])
        .output()
        .expect("nstat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("TcpExtTCPFastOpenActive")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn set_int(socket: &socket2::Socket, name: libc::c_int, value: libc::c_int) {
    // SAFETY: a valid socket and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_TCP,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt {name}");
}

fn data_on_a_fast_open_syn_is_counted() {
    with_gateway("fast_tfo", AccountingMode::Ebpf, fast_config, |topo, gw| {
        for ns in [&topo.client, &topo.server] {
            run(&[
                "ip",
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_fastopen=3",
            ]);
        }
        let listen = socket(SERVER4, FAST_PORT);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = spawn_in(&topo.server, move || {
            let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            l.set_reuse_address(true).expect("reuse");
            l.bind(&listen.into()).expect("bind");
            set_int(&l, libc::TCP_FASTOPEN, 16);
            l.listen(16).expect("listen");
            let l: TcpListener = l.into();
            ready_tx.send(()).expect("ready");
            for _ in 0..2 {
                let (mut c, _) = l.accept().expect("accept");
                let (got, _) = read_all(&mut c);
                write_pattern(&mut c, got * 2);
            }
        });
        ready_rx.recv().expect("ready");
        let before = fast_opens(&topo.client);
        let sizes = [300u64, 900];
        spawn_in(&topo.client, move || {
            for n in sizes {
                // The first connection fetches the cookie; the second sends its data in the SYN.
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                set_int(&s, libc::TCP_FASTOPEN_CONNECT, 1);
                s.connect(&listen.into()).expect("connect");
                let mut c: TcpStream = s.into();
                write_pattern(&mut c, n);
                c.shutdown(Shutdown::Write).expect("shutdown");
                assert_eq!(read_all(&mut c).0, n * 2);
            }
        })
        .join()
        .expect("client");
        server.join().expect("server");
        assert!(fast_opens(&topo.client) > before, "a SYN carried data");
        gw.wait_until(10, "both flows closed", |r| r.closed(10).len() == 2);
        let mut totals: Vec<Traffic> = gw.registry.closed(10).iter().map(|c| c.traffic).collect();
        totals.sort_unstable_by_key(|t| t.upload);
        assert_eq!(
            totals,
            [
                Traffic {
                    upload: 300,
                    download: 600
                },
                Traffic {
                    upload: 900,
                    download: 1_800
                },
            ]
        );
    });
}

crate::tests![
    root tcp_is_forwarded_and_counted_exactly,
    root undecided_flows_are_proxied_and_ipv6_is_forwarded,
    root udp_datagrams_are_counted_until_idle,
    root ipv6_extension_headers_are_skipped,
    root data_on_a_fast_open_syn_is_counted,
];
