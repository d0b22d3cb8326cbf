//! A full close-event ring never loses a flow's totals: with a one-page ring, hundreds of
//! sockets close at once while the reader cannot run; the kernel keeps their entries, marked
//! closed, and every socket still gets its exact totals.

use futures_util::future::join_all;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpacct::{
    accounting::Accounting,
    config::{AccountingMode, AccountingSettings},
};

use crate::common::{GRACE, counters, tcp_pair, with_settings};

const PAIRS: usize = 300;
/// One page: room for about a hundred close events.
const RING: u32 = 4096;

async fn simultaneous_closes(acc: Accounting) {
    let mut pairs = Vec::new();
    for i in 0..PAIRS {
        let mut pair = tcp_pair(&acc, "127.0.0.1").await;
        let n = 1000 + i;
        pair.client.write_all(&vec![7u8; n]).await.expect("write");
        let mut got = vec![0u8; n];
        pair.server.read_exact(&mut got).await.expect("read");
        pairs.push((pair, n as u64));
    }
    // Close every connection in order from both ends without yielding: the runtime's ring
    // reader cannot run until all 600 sockets have reached TCP_CLOSE.
    let mut tracked = Vec::new();
    for (pair, n) in pairs {
        for s in [&pair.client, &pair.server] {
            SockRef::from(s)
                .shutdown(std::net::Shutdown::Write)
                .expect("shutdown");
        }
        drop((pair.client, pair.server));
        tracked.push((pair.client_t, pair.server_t, n));
    }
    let finals = join_all(
        tracked
            .iter()
            .map(|(c, s, _)| async { tokio::join!(acc.finish(c, GRACE), acc.finish(s, GRACE)) }),
    )
    .await;
    let stats = acc.kernel_stats().expect("ebpf");
    assert!(
        stats.close_ring_full > 0,
        "the ring should have overflowed: {stats:?}"
    );
    for ((client, server), (_, _, n)) in finals.into_iter().zip(&tracked) {
        assert_eq!(client, counters(0, *n), "client of {n} B");
        assert_eq!(server, counters(*n, 0), "server of {n} B");
    }
    assert!(stats.closes_recovered >= stats.close_ring_full, "{stats:?}");
    assert_eq!(
        stats.tcp_entries, 0,
        "recovered entries are deleted: {stats:?}"
    );
    eprintln!(
        "{} of {} close events lost to the full ring, all recovered from the map",
        stats.close_ring_full,
        2 * PAIRS
    );
}

fn full_ring_loses_no_totals() {
    let settings = AccountingSettings {
        close_ring_bytes: RING,
        ..AccountingSettings::with_mode(AccountingMode::Ebpf)
    };
    with_settings("ring_full", settings, simultaneous_closes);
}

crate::tests![root full_ring_loses_no_totals];
