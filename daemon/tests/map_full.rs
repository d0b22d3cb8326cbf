//! A full kernel map is counted and logged (aya-log, through the daemon's `tracing`) and never
//! fatal: flows whose sockets found no room are counted by the relay instead, with the same
//! exact totals. (Its own binary: it installs the process-wide log subscriber.)

#[path = "common/mod.rs"]
mod common;

use std::{
    io::Write,
    net::{Shutdown, TcpListener, TcpStream, UdpSocket},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::topo::{
    Gateway, SERVER4, Topology, read_all, socket, spawn_in, with_gateway, write_pattern,
};
use tpacct::config::{AccountingMode, MaxSockets};

const CAPACITY: u32 = 8;
const FLOWS: usize = 12;

/// Everything the global subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// 12 TCP flows held open at once through the gateway (24 sockets in the accounting cgroup,
/// 8 fit the map), then 12 UDP sessions at once: every flow's totals are exact, whether the
/// kernel or the relay counted it.
fn overflow(topo: &Topology, gw: &Gateway) {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    let server = spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, 6100)).expect("bind");
        let udp = UdpSocket::bind(socket(SERVER4, 6101)).expect("bind udp");
        bound_tx.send(()).expect("bound");
        let handlers: Vec<_> = (0..FLOWS)
            .map(|_| {
                let (mut conn, _) = listener.accept().expect("accept");
                std::thread::spawn(move || {
                    let (n, _) = read_all(&mut conn);
                    write_pattern(&mut conn, 2 * n);
                })
            })
            .collect();
        for h in handlers {
            h.join().expect("handler");
        }
        let mut buf = [0u8; 2048];
        for _ in 0..FLOWS {
            let (n, from) = udp.recv_from(&mut buf).expect("udp recv");
            udp.send_to(&buf[..n / 2], from).expect("udp reply");
        }
    });
    // The gateway dials the server as each client connects: a dial before the server listens
    // is refused and its flow closes at once (seen once on a busy machine).
    bound_rx.recv().expect("the server is listening");
    // Every connection is open before any closes, so the map overflows.
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..FLOWS)
        .map(|i| {
            let opened = opened_tx.clone();
            spawn_in(&topo.client, move || {
                let conn = TcpStream::connect(socket(SERVER4, 6100)).expect("connect");
                opened.send(()).expect("opened");
                (conn, 1000 + i as u64)
            })
        })
        .collect();
    for _ in 0..FLOWS {
        opened_rx.recv().expect("opened");
    }
    gw.wait_until(5, "every flow to register", |r| {
        let (live, closed) = (r.live_count(), r.closed(FLOWS).len());
        assert_eq!(
            closed, 0,
            "a flow closed before the transfers began ({live} live)"
        );
        live == FLOWS
    });
    let mut sizes = Vec::new();
    for c in clients {
        let (mut conn, up) = c.join().expect("client");
        sizes.push(up);
        std::thread::spawn(move || {
            write_pattern(&mut conn, up);
            conn.shutdown(Shutdown::Write).expect("shutdown");
            assert_eq!(read_all(&mut conn).0, 2 * up);
        });
    }
    gw.wait_until(10, "the TCP flows to close", |r| {
        r.live_count() == 0 && r.closed(FLOWS).len() == FLOWS
    });
    let mut got: Vec<(u64, u64)> = gw
        .registry
        .closed(FLOWS)
        .iter()
        .map(|c| (c.traffic.upload, c.traffic.download))
        .collect();
    got.sort_unstable();
    let want: Vec<(u64, u64)> = sizes.iter().map(|&n| (n, 2 * n)).collect();
    assert_eq!(got, want, "every TCP flow exact");

    // UDP: every session is open (its first datagram sent) before any reply.
    Topology::run_in(&topo.client, || {
        let socks: Vec<UdpSocket> = (0..FLOWS)
            .map(|i| {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.send_to(&vec![1u8; 100 + 2 * i], socket(SERVER4, 6101))
                    .expect("send");
                s
            })
            .collect();
        for (i, s) in socks.iter().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = [0u8; 2048];
            assert_eq!(s.recv(&mut buf).expect("reply"), 50 + i);
        }
    });
    server.join().expect("server");
    gw.wait_until(10, "the UDP sessions to expire", |r| {
        r.live_count() == 0 && r.closed(2 * FLOWS).len() == 2 * FLOWS
    });
    let mut got: Vec<(u64, u64)> = gw
        .registry
        .closed(FLOWS)
        .iter()
        .map(|c| (c.traffic.upload, c.traffic.download))
        .collect();
    got.sort_unstable();
    let want: Vec<(u64, u64)> = (0..FLOWS as u64).map(|i| (100 + 2 * i, 50 + i)).collect();
    assert_eq!(got, want, "every UDP session exact");

    let stats = gw.registry.accounting().kernel_stats().expect("ebpf");
    assert!(stats.tcp_map_full > 0, "{stats:?}");
    assert!(stats.udp_map_full > 0, "{stats:?}");
    assert_eq!(stats.close_ring_full, 0, "{stats:?}");
    eprintln!("{stats:?}");
}

fn full_maps_are_counted_logged_and_not_fatal() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_env_filter("info")
        .with_ansi(false)
        .init();
    with_gateway(
        "map_full",
        AccountingMode::Ebpf,
        |c| c.accounting_max_sockets = Some(MaxSockets(CAPACITY)),
        overflow,
    );
    // Kernel log records are read asynchronously; they were flushed before the gateway ended.
    let text = captured.text();
    assert!(text.contains("tcp socket map full"), "{text}");
    assert!(text.contains("udp socket map full"), "{text}");
}

tests![root full_maps_are_counted_logged_and_not_fatal];

fn main() {
    common::harness::main(tests());
}
