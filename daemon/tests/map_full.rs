//! A full kernel map is counted and logged (aya-log, through the daemon's `tracing`) and never
//! fatal: sockets that found no room are counted in user space, with the same exact totals.

#[path = "common/mod.rs"]
mod common;

use std::{
    io::Write,
    sync::{Arc, Mutex},
};

use common::{GRACE, counters, one_way, tcp_pair};
use futures_util::future::join_all;
use tokio::net::UdpSocket;
use tpacct::{
    accounting::Accounting,
    config::{AccountingMode, AccountingSettings},
};

const CAPACITY: u32 = 8;
const PAIRS: usize = 12;
const BYTES: u64 = 10_000;

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

async fn overflow(acc: Accounting) {
    // 24 TCP sockets (both ends of 12 pairs), established before any closes: 8 fit.
    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        pairs.push(tcp_pair(&acc, "127.0.0.1").await);
    }
    let in_kernel = pairs
        .iter()
        .flat_map(|p| [p.client_t.in_kernel(), p.server_t.in_kernel()])
        .filter(|&k| k)
        .count();
    assert_eq!(in_kernel, CAPACITY as usize);

    let transfers = pairs
        .into_iter()
        .map(|pair| one_way(&acc, pair, BYTES, true));
    join_all(transfers).await;

    // UDP: 12 sockets each send one datagram to a sink while all are open; the sink takes one
    // entry, 7 senders fit, the other 5 are counted in user space.
    let sink = UdpSocket::bind(("127.0.0.1", 0)).await.expect("bind sink");
    let sink_addr = sink.local_addr().expect("addr");
    let mut senders = Vec::new();
    for i in 0..PAIRS {
        let s = UdpSocket::bind(("127.0.0.1", 0)).await.expect("bind");
        s.connect(sink_addr).await.expect("connect");
        let t = acc.track(&s).expect("track");
        let payload = vec![7u8; 100 + i];
        s.send(&payload).await.expect("send");
        t.meter().add_tx(payload.len() as u64);
        senders.push((s, t, payload.len() as u64));
    }
    let mut finals = Vec::new();
    for (s, t, sent) in senders {
        drop(s);
        finals.push((acc.finish(&t, GRACE).await, sent));
    }
    for (total, sent) in finals {
        assert_eq!(total, counters(0, sent));
    }
    let stats = acc.kernel_stats().expect("ebpf");
    assert_eq!(
        stats.tcp_map_full,
        (2 * PAIRS) as u64 - u64::from(CAPACITY),
        "{stats:?}"
    );
    assert_eq!(
        stats.udp_map_full,
        (PAIRS + 1) as u64 - u64::from(CAPACITY),
        "{stats:?}"
    );
    assert_eq!(stats.close_ring_full, 0, "{stats:?}");
}

fn full_maps_are_counted_logged_and_not_fatal() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_env_filter("info")
        .with_ansi(false)
        .init();
    let settings = AccountingSettings {
        max_sockets: CAPACITY,
        ..AccountingSettings::with_mode(AccountingMode::Ebpf)
    };
    common::with_settings("map_full", settings, overflow);
    // Kernel log records are read asynchronously; they were flushed before the runtime ended.
    let text = captured.text();
    assert!(text.contains("tcp socket map full"), "{text}");
    assert!(text.contains("udp socket map full"), "{text}");
}

tests![root full_maps_are_counted_logged_and_not_fatal];

fn main() {
    common::harness::main(tests());
}
