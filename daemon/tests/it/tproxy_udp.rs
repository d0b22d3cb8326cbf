//! UDP through TPROXY: request/response where the reply's source is the original destination,
//! session expiry after the idle timeout, exact totals in both accounting modes, IPv6.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use crate::common::topo::{SERVER4, SERVER6, Topology, socket, spawn_in, with_gateway};
use tpacct::{
    config::AccountingMode,
    registry::{Network, Traffic},
};

const REQUESTS: [usize; 6] = [1, 40, 512, 1200, 8000, 30_000];

/// Replies to each request with a datagram twice its size (capped), REQUESTS.len() times.
fn reply_size(request: usize) -> usize {
    (request * 2).min(60_000)
}

pub(crate) fn request_response(
    topo: &Topology,
    gw: &crate::common::topo::Gateway,
    server_ip: &str,
) {
    let port = 5353;
    let server_addr = socket(server_ip, port);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in(&topo.server, move || {
        let sock = UdpSocket::bind(server_addr).expect("server bind");
        ready_tx.send(()).expect("ready");
        let mut buf = vec![0u8; 65_536];
        for _ in REQUESTS {
            let (n, from) = sock.recv_from(&mut buf).expect("recv");
            sock.send_to(&vec![b'r'; reply_size(n)], from)
                .expect("reply");
        }
    });
    ready_rx.recv().expect("server ready");
    let last_reply = spawn_in(&topo.client, move || {
        let unspecified = if server_addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let sock = UdpSocket::bind(unspecified).expect("client bind");
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = vec![0u8; 65_536];
        for size in REQUESTS {
            sock.send_to(&vec![b'q'; size], server_addr).expect("send");
            let (n, from) = sock.recv_from(&mut buf).expect("reply");
            assert_eq!(
                from, server_addr,
                "the reply comes from the original destination"
            );
            assert_eq!(n, reply_size(size));
        }
        Instant::now()
    })
    .join()
    .expect("client");
    server.join().expect("server");

    let up: usize = REQUESTS.iter().sum();
    let down: usize = REQUESTS.iter().map(|&r| reply_size(r)).sum();
    let live = gw.registry.live();
    assert_eq!(live.len(), 1, "one session for the whole conversation");
    assert_eq!(live[0].flow.meta.network, Network::Udp);
    assert_eq!(live[0].flow.meta.destination(), Some(server_addr));
    assert_eq!(
        live[0].traffic,
        Traffic {
            upload: up as u64,
            download: down as u64
        },
        "live counters are exact between datagrams"
    );

    // udp-idle-timeout is 2 s in the test config.
    gw.wait_until(10, "the session to expire", |r| r.live_count() == 0);
    let idle_for = last_reply.elapsed();
    assert!(
        idle_for >= Duration::from_millis(1900) && idle_for < Duration::from_secs(4),
        "expired after {idle_for:?} of silence"
    );
    let closed = gw.registry.closed(1).remove(0);
    assert_eq!(
        closed.traffic,
        Traffic {
            upload: up as u64,
            download: down as u64
        }
    );
    assert_eq!(closed.route.chains, ["DIRECT"]);
}

fn request_response_ebpf() {
    with_gateway(
        "udp_ebpf",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            request_response(topo, gw, SERVER4);
        },
    );
}

fn request_response_userspace() {
    with_gateway(
        "udp_user",
        AccountingMode::Userspace,
        |_| {},
        |topo, gw| {
            request_response(topo, gw, SERVER4);
        },
    );
}

fn ipv6_udp() {
    with_gateway(
        "udp6",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            request_response(topo, gw, SERVER6);
        },
    );
}

crate::tests![
    root request_response_ebpf,
    root request_response_userspace,
    root ipv6_udp,
];
