//! Exact TCP payload totals at close from the eBPF programs: transfers of 0 B to 100 MiB
//! each way, half-close, abortive close (RST), IPv6.

use crate::common::{
    GRACE, Pair, abort, counters, one_way, quickack, recv_to_eof, recv_up_to, send, tcp_pair,
    with_ebpf,
};
use tokio::io::AsyncWriteExt;
use tpacct::accounting::Accounting;

const SIZES: [u64; 5] = [0, 1, 64 * 1024, 1 << 20, 100 << 20];

async fn sizes_both_ways(acc: Accounting) {
    for n in SIZES {
        for upload in [true, false] {
            one_way(&acc, tcp_pair(&acc, "127.0.0.1").await, n, upload).await;
        }
    }
    for upload in [true, false] {
        one_way(&acc, tcp_pair(&acc, "::1").await, 1 << 20, upload).await;
    }
}

/// The client sends a request and shuts its write side; the server reads to EOF, then replies
/// in full over the half-open connection and closes.
async fn half_close(acc: Accounting) {
    let (request, reply) = (300_000u64, 5_000_000u64);
    let Pair {
        mut client,
        mut server,
        client_t,
        server_t,
    } = tcp_pair(&acc, "127.0.0.1").await;
    let client_side = async move {
        send(&mut client, request).await;
        client.shutdown().await.expect("shutdown");
        assert_eq!(recv_to_eof(&mut client).await, reply);
    };
    let server_side = async move {
        assert_eq!(recv_to_eof(&mut server).await, request);
        send(&mut server, reply).await;
    };
    tokio::join!(client_side, server_side);
    let (c, s) = tokio::join!(acc.finish(&client_t, GRACE), acc.finish(&server_t, GRACE));
    assert_eq!(c, counters(reply, request), "client");
    assert_eq!(s, counters(request, reply), "server");
}

/// The client sends, the server confirms receipt with one byte, the client resets the
/// connection (SO_LINGER 0). Every byte was delivered and acknowledged before the reset.
async fn reset(acc: Accounting) {
    let n = 1_000_000u64;
    let Pair {
        mut client,
        mut server,
        client_t,
        server_t,
    } = tcp_pair(&acc, "127.0.0.1").await;
    let client_side = async move {
        send(&mut client, n).await;
        quickack(&client);
        assert_eq!(recv_up_to(&mut client, 1).await, 1);
        quickack(&client);
        abort(client);
    };
    let server_side = async move {
        assert_eq!(recv_up_to(&mut server, n).await, n);
        send(&mut server, 1).await;
        // The reset ends the server's reads with ECONNRESET (or EOF if it lands first).
        let mut byte = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut server, &mut byte).await;
    };
    tokio::join!(client_side, server_side);
    let (c, s) = tokio::join!(acc.finish(&client_t, GRACE), acc.finish(&server_t, GRACE));
    assert_eq!(c, counters(1, n), "client (reset sender)");
    assert_eq!(s, counters(n, 1), "server (reset receiver)");
}

fn sizes_each_way() {
    with_ebpf("sizes", sizes_both_ways);
}

fn half_close_totals() {
    with_ebpf("half_close", half_close);
}

fn reset_totals() {
    with_ebpf("reset", reset);
}

crate::tests![root sizes_each_way, root half_close_totals, root reset_totals];
