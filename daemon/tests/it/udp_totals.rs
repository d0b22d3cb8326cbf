//! Exact UDP payload totals: datagrams of known sizes each way over IPv4 and IPv6; live values
//! exact after each exchange; entries gone once the sockets are released.

use crate::common::{GRACE, counters, with_ebpf};
use tokio::net::UdpSocket;
use tpacct::accounting::Accounting;

/// Sizes sent by the client, then by the server (0-byte datagrams included).
const UP: [usize; 7] = [0, 1, 100, 512, 1400, 9000, 65_000];
const DOWN: [usize; 5] = [1, 3, 1200, 30_000, 0];

/// Sends one datagram of each size from `from` to `to`, checking each arrives whole.
async fn datagrams(from: &UdpSocket, to: &UdpSocket, sizes: &[usize]) {
    let mut buf = vec![0u8; 70_000];
    for (i, &size) in sizes.iter().enumerate() {
        let payload = vec![i as u8; size];
        assert_eq!(from.send(&payload).await.expect("send"), size);
        let got = to.recv(&mut buf).await.expect("recv");
        assert_eq!(got, size);
    }
}

async fn exchange(acc: Accounting, addr: &str) {
    let server = UdpSocket::bind((addr, 0)).await.expect("bind server");
    let client = UdpSocket::bind((addr, 0)).await.expect("bind client");
    client
        .connect(server.local_addr().expect("addr"))
        .await
        .expect("connect client");
    server
        .connect(client.local_addr().expect("addr"))
        .await
        .expect("connect server");
    let client_t = acc.track(&client).expect("track client");
    let server_t = acc.track(&server).expect("track server");

    datagrams(&client, &server, &UP).await;
    datagrams(&server, &client, &DOWN).await;
    let (up, down) = (
        UP.iter().sum::<usize>() as u64,
        DOWN.iter().sum::<usize>() as u64,
    );
    // Datagrams are counted as they pass: live values are already exact.
    assert_eq!(
        acc.live(&client_t),
        counters(down, up),
        "client live over {addr}"
    );
    assert_eq!(
        acc.live(&server_t),
        counters(up, down),
        "server live over {addr}"
    );

    let (client_cookie, server_cookie) = (client_t.cookie(), server_t.cookie());
    drop((client, server));
    let (c, s) = tokio::join!(acc.finish(&client_t, GRACE), acc.finish(&server_t, GRACE));
    assert_eq!(c, counters(down, up), "client final over {addr}");
    assert_eq!(s, counters(up, down), "server final over {addr}");
    assert!(!acc.kernel_holds(client_cookie) && !acc.kernel_holds(server_cookie));
}

async fn both_families(acc: Accounting) {
    exchange(acc.clone(), "127.0.0.1").await;
    exchange(acc, "::1").await;
}

fn datagrams_both_families() {
    with_ebpf("udp_totals", both_families);
}

crate::tests![root datagrams_both_families];
