//! 20,000 short TCP connections: each gets exact final totals, and afterwards the kernel map
//! holds no entry for any of them (entries live exactly as long as their socket).

use std::time::Duration;

use crate::common::{Pair, one_way, with_ebpf};
use futures_util::{StreamExt, stream};
use tokio::net::{TcpListener, TcpStream};
use tpacct::accounting::Accounting;

const CONNECTIONS: usize = 20_000;
const CONCURRENCY: usize = 64;
const REQUEST: u64 = 100;

async fn churn(acc: Accounting) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
    // Accepts are matched to connects by the listener's queue; one acceptor at a time keeps
    // each pair together.
    let lock = tokio::sync::Mutex::new(listener);
    let cookies: Vec<[u64; 2]> = stream::iter(0..CONNECTIONS)
        .map(|_| async {
            let guard = lock.lock().await;
            let target = guard.local_addr().expect("addr");
            let (client, accepted) = tokio::join!(TcpStream::connect(target), guard.accept());
            drop(guard);
            let (client, server) = (client.expect("connect"), accepted.expect("accept").0);
            let pair = Pair {
                client_t: acc.track(&client).expect("track"),
                server_t: acc.track(&server).expect("track"),
                client,
                server,
            };
            one_way(&acc, pair, REQUEST, true).await
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    assert_eq!(cookies.len(), CONNECTIONS);
    // The kernel removes an entry right after its close event; wait for the last removals.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let held = |acc: &Accounting| {
        cookies
            .iter()
            .flatten()
            .filter(|&&c| acc.kernel_holds(c))
            .count()
    };
    while held(&acc) > 0 && std::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    assert_eq!(held(&acc), 0, "kernel entries left for closed sockets");
    let stats = acc.kernel_stats().expect("ebpf stats");
    assert_eq!(stats.tcp_entries, 0, "{stats:?}");
    assert_eq!(stats.tcp_map_full + stats.close_ring_full, 0, "{stats:?}");
}

fn short_connections() {
    with_ebpf("churn", churn);
}

crate::tests![root short_connections];
