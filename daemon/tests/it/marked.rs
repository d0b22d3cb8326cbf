//! Sockets carrying `SO_MARK` (the daemon's own upstream dials, marked with `routing-mark`)
//! are left out of the kernel's counting: no map entry, no per-packet work, no close event.
//! The client-facing socket of the same connection is counted as always.

use nix::sys::socket::{setsockopt, sockopt::Mark};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, UdpSocket},
};
use tpacct::accounting::Accounting;

use crate::common::{GRACE, counters, with_ebpf};

const MARK: u32 = 6666;

async fn tcp(acc: Accounting) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
    let target = listener.local_addr().expect("addr");
    let socket = TcpSocket::new_v4().expect("socket");
    setsockopt(&socket, Mark, &MARK).expect("SO_MARK");
    let (client, accepted) = tokio::join!(socket.connect(target), listener.accept());
    let (mut client, mut server) = (client.expect("connect"), accepted.expect("accept").0);
    let (client_t, server_t) = (
        acc.track(&client).expect("track"),
        acc.track(&server).expect("track"),
    );
    client.write_all(&[7u8; 1000]).await.expect("write");
    client.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.expect("read");
    assert_eq!(got.len(), 1000);
    assert!(acc.kernel_holds(server_t.cookie()), "the unmarked side");
    assert!(!acc.kernel_holds(client_t.cookie()), "the marked side");
    drop((client, server));
    assert_eq!(acc.finish(&server_t, GRACE).await, counters(1000, 0));
}

async fn udp(acc: Accounting) {
    let server = UdpSocket::bind(("127.0.0.1", 0)).await.expect("bind");
    let client = UdpSocket::bind(("127.0.0.1", 0)).await.expect("bind");
    setsockopt(&client, Mark, &MARK).expect("SO_MARK");
    client
        .connect(server.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (client_t, server_t) = (
        acc.track(&client).expect("track"),
        acc.track(&server).expect("track"),
    );
    client.send(&[1u8; 300]).await.expect("send");
    let mut buf = [0u8; 1000];
    let (n, from) = server.recv_from(&mut buf).await.expect("recv");
    assert_eq!(n, 300);
    server.send_to(&buf[..120], from).await.expect("reply");
    assert_eq!(client.recv(&mut buf).await.expect("recv"), 120);
    assert!(acc.kernel_holds(server_t.cookie()), "the unmarked side");
    assert!(!acc.kernel_holds(client_t.cookie()), "the marked side");
    drop((client, server));
    assert_eq!(acc.finish(&server_t, GRACE).await, counters(300, 120));
}

fn marked_tcp_sockets_are_not_counted() {
    with_ebpf("marked-tcp", tcp);
}

fn marked_udp_sockets_are_not_counted() {
    with_ebpf("marked-udp", udp);
}

crate::tests![
    root marked_tcp_sockets_are_not_counted,
    root marked_udp_sockets_are_not_counted,
];
