//! 20,000 short TCP connections: each gets exact final totals, and afterwards the kernel map
//! holds no entry for any of them (entries live exactly as long as their socket).

mod common;

use std::time::Duration;

use common::{GRACE, counters, recv_to_eof, send};
use futures_util::{StreamExt, stream};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tpacct::accounting::{Accounting, Mode};

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
            pair_totals(&acc, client.expect("connect"), accepted.expect("accept").0).await
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    assert_eq!(cookies.len(), CONNECTIONS);
    if acc.mode() == Mode::Ebpf {
        // Close events precede removal; give the last removals a moment to land.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let held = cookies
            .iter()
            .flatten()
            .filter(|&&c| acc.kernel_holds(c))
            .count();
        assert_eq!(held, 0, "kernel entries left for closed sockets");
        let stats = acc.kernel_stats().expect("ebpf stats");
        assert_eq!(stats.tcp_entries, 0, "{stats:?}");
        assert_eq!(stats.tcp_map_full + stats.close_ring_full, 0, "{stats:?}");
    }
}

/// One connection: the client sends REQUEST bytes and half-closes; the server reads them and
/// closes. Both ends' totals are checked; their cookies returned.
async fn pair_totals(acc: &Accounting, mut client: TcpStream, mut server: TcpStream) -> [u64; 2] {
    let (ct, st) = (
        acc.track(&client).expect("track"),
        acc.track(&server).expect("track"),
    );
    let (cm, sm) = (ct.meter().clone(), st.meter().clone());
    tokio::join!(
        async move {
            send(&mut client, REQUEST, &cm).await;
            client.shutdown().await.expect("shutdown");
            assert_eq!(recv_to_eof(&mut client, &cm).await, 0);
        },
        async move {
            assert_eq!(recv_to_eof(&mut server, &sm).await, REQUEST);
        }
    );
    let cookies = [ct.cookie(), st.cookie()];
    let (c, s) = tokio::join!(acc.finish(ct, GRACE), acc.finish(st, GRACE));
    assert_eq!((c, s), (counters(0, REQUEST), counters(REQUEST, 0)));
    cookies
}

#[test]
fn churn_leaves_no_entries_ebpf() {
    common::with_accounting("churn_ebpf", Mode::Ebpf, churn);
}

#[test]
fn churn_userspace() {
    common::with_accounting("churn_user", Mode::Userspace, churn);
}
