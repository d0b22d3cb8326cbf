//! TCP through TPROXY in client/gateway/server namespaces with the managed firewall: bulk
//! transfer with checksums and exact registry totals, half-close, server-first protocols,
//! sniffing, unreachable upstreams, close on demand, IPv6.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use crate::common::topo::{
    CLIENT4, SERVER4, SERVER6, Topology, read_all, socket, spawn_in, transfer, with_gateway,
};
use tpacct::{config::AccountingMode, registry::Traffic};

/// The server reads everything the client sends, then answers with `reply` bytes; the
/// client checks the answer. Returns the closed flow's traffic.
pub(crate) fn exchange(
    topo: &Topology,
    gw: &crate::common::topo::Gateway,
    server_ip: &str,
    up: u64,
    down: u64,
) {
    let target = socket(server_ip, 5001);
    transfer(topo, target, up, down);

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
    assert_eq!(closed.meta.destination(), Some(target));
    assert_eq!(closed.route.rule, "Match");
    assert_eq!(closed.route.chains, ["DIRECT"]);
    assert_eq!(closed.dialed, Some(target));
    assert_eq!(
        closed.meta.source.ip().to_string(),
        if server_ip == SERVER4 {
            CLIENT4
        } else {
            crate::common::topo::CLIENT6
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

fn half_close_reply_arrives_in_full() {
    // The client shuts its write side after 1 KiB; the server reads to EOF and only then
    // sends 5 MB back over the half-open connection.
    with_gateway(
        "half_close",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            exchange(topo, gw, SERVER4, 1024, 5_000_000);
        },
    );
}

/// A server listening on `port` in the server namespace that runs `serve` on one connection.
fn one_shot_server<T: Send + 'static>(
    topo: &Topology,
    port: u16,
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, port)).expect("server bind");
        ready_tx.send(()).expect("ready");
        let (conn, _) = listener.accept().expect("accept");
        serve(conn)
    });
    ready_rx.recv().expect("server ready");
    handle
}

fn server_first_banner_is_not_held_back() {
    with_gateway(
        "banner",
        AccountingMode::Ebpf,
        |_| {},
        |topo, _gw| {
            let banner = b"220 smtp.example ESMTP ready\r\n";
            let server = one_shot_server(topo, 25, move |mut conn| {
                conn.write_all(banner).expect("banner");
                let _ = read_all(&mut conn);
            });
            let elapsed = Topology::run_in(&topo.client, move || {
                let mut conn = TcpStream::connect(socket(SERVER4, 25)).expect("connect");
                let start = Instant::now();
                let mut got = vec![0u8; banner.len()];
                conn.read_exact(&mut got).expect("banner");
                assert_eq!(got, banner);
                start.elapsed()
            });
            server.join().expect("server");
            assert!(elapsed < crate::common::AT_ONCE, "banner took {elapsed:?}");
            eprintln!("banner arrived {elapsed:?} after connect");
        },
    );
}

fn sni_and_host_are_sniffed() {
    with_gateway(
        "sniff",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            // A real ClientHello from OpenSSL; the server only needs to read it.
            let server = one_shot_server(topo, 443, |mut conn| {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
            });
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &topo.client.name, "openssl", "s_client"])
                .args([
                    "-connect",
                    &format!("{SERVER4}:443"),
                    "-servername",
                    "sni.example.test",
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run openssl s_client");
            eprintln!("openssl s_client exited {status} (the server never answers the hello)");
            server.join().expect("server");
            gw.wait_until(10, "the TLS flow to close", |r| {
                r.live_count() == 0 && !r.closed(1).is_empty()
            });
            assert_eq!(
                gw.registry.closed(1)[0].sniffed_host.as_deref(),
                Some("sni.example.test")
            );

            let server = one_shot_server(topo, 80, |mut conn| {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                conn.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .expect("reply");
            });
            Topology::run_in(&topo.client, || {
                let mut conn = TcpStream::connect(socket(SERVER4, 80)).expect("connect");
                conn.write_all(b"GET /index.html HTTP/1.1\r\nHost: Host.Example.Test:80\r\nAccept: */*\r\n\r\n")
                .expect("request");
                let mut reply = String::new();
                conn.read_to_string(&mut reply).expect("reply");
                assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");
            });
            server.join().expect("server");
            gw.wait_until(10, "the HTTP flow to close", |r| {
                r.live_count() == 0 && r.closed(2).len() == 2
            });
            assert_eq!(
                gw.registry.closed(1)[0].sniffed_host.as_deref(),
                Some("host.example.test")
            );
        },
    );
}

fn unreachable_upstreams_reset_the_client_promptly() {
    with_gateway(
        "unreachable",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            let fds = crate::common::open_fds();
            // A closed port (the server answers with a reset) and an address with no route,
            // on ports no sniffer waits on (the client sends nothing).
            for (target, what) in [
                (socket(SERVER4, 9), "refused"),
                (socket("10.91.3.3", 81), "unroutable"),
            ] {
                let elapsed = Topology::run_in(&topo.client, move || {
                    let mut conn = TcpStream::connect(target).expect("tproxy accepts");
                    let start = Instant::now();
                    let mut buf = [0u8; 16];
                    let r = conn.read(&mut buf);
                    assert!(
                        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                        "{what}: expected a reset, got {r:?}"
                    );
                    start.elapsed()
                });
                assert!(
                    elapsed < crate::common::AT_ONCE,
                    "{what}: reset took {elapsed:?}"
                );
            }
            gw.wait_until(10, "both flows to close", |r| {
                r.live_count() == 0 && r.closed(2).len() == 2
            });
            for closed in gw.registry.closed(2) {
                assert_eq!(closed.traffic, Traffic::default());
                assert_eq!(closed.dialed, None);
            }
            // Nothing left open in the daemon (settle: the gateway's sockets close asynchronously).
            let deadline = Instant::now() + Duration::from_secs(5);
            while crate::common::open_fds() > fds && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                crate::common::open_fds() <= fds,
                "fds: {} before, {} after",
                fds,
                crate::common::open_fds()
            );
        },
    );
}

/// Closing a flow resets both of its sockets at once: the server streams far more than the
/// client reads, and after the close the client gets a reset (not whatever was still queued
/// in the gateway), the server's next write fails, and the flow is in the closed list with
/// at most what the client read — all within 100 ms.
fn closing_a_flow_resets_both_sockets_within_100ms() {
    const STREAM: u64 = 200 << 20;
    with_gateway(
        "close_flow",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            let server = one_shot_server(topo, 5002, |mut conn| {
                let mut buf = [0u8; 5];
                conn.read_exact(&mut buf).expect("hello");
                // Writes until the gateway resets the connection.
                let chunk = vec![b'd'; 64 * 1024];
                let mut sent = 0u64;
                while sent < STREAM {
                    match conn.write(&chunk) {
                        Ok(n) => sent += n as u64,
                        Err(e) => return (sent, Some(e.kind()), Instant::now()),
                    }
                }
                (sent, None, Instant::now())
            });
            let (connected_tx, connected_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let client = spawn_in(&topo.client, move || {
                let mut conn = TcpStream::connect(socket(SERVER4, 5002)).expect("connect");
                conn.write_all(b"hello").expect("write");
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0u64;
                // Read 1 MiB, then stop reading until the flow has been closed.
                while got < 1 << 20 {
                    got += conn.read(&mut buf).expect("read") as u64;
                }
                connected_tx.send(()).expect("connected");
                go_rx.recv().expect("go");
                loop {
                    match conn.read(&mut buf) {
                        Ok(0) => return (got, None, Instant::now()),
                        Ok(n) => got += n as u64,
                        Err(e) => return (got, Some(e.kind()), Instant::now()),
                    }
                }
            });
            connected_rx.recv().expect("client connected");
            gw.wait_until(5, "the flow to register", |r| r.live_count() == 1);
            let id = gw.registry.live()[0].flow.id;
            let closed_at = Instant::now();
            assert!(gw.registry.close(&id));
            gw.wait_until(5, "the flow to move to the closed list", |r| {
                r.live_count() == 0 && r.closed(1).len() == 1
            });
            let listed_closed = closed_at.elapsed();
            go_tx.send(()).expect("go");
            let (client_got, client_err, _) = client.join().expect("client");
            let (_, server_err, server_end) = server.join().expect("server");
            assert_eq!(
                client_err,
                Some(std::io::ErrorKind::ConnectionReset),
                "the client is reset"
            );
            assert_eq!(
                server_err,
                Some(std::io::ErrorKind::ConnectionReset),
                "the server is reset"
            );
            let server_took = server_end.duration_since(closed_at);
            assert!(
                server_took < Duration::from_millis(100),
                "the server saw the close after {server_took:?}"
            );
            assert!(
                listed_closed < Duration::from_millis(100),
                "closed after {listed_closed:?}"
            );
            let closed = gw.registry.closed(1).remove(0);
            assert_eq!(closed.traffic.upload, 5);
            assert!(
                closed.traffic.download <= client_got,
                "counted {} B, the client read {client_got} B",
                closed.traffic.download
            );
        },
    );
}

crate::tests![
    root bulk_each_way_ebpf,
    root bulk_each_way_userspace,
    root ipv6_tcp,
    root half_close_reply_arrives_in_full,
    root server_first_banner_is_not_held_back,
    root sni_and_host_are_sniffed,
    root unreachable_upstreams_reset_the_client_promptly,
    root closing_a_flow_resets_both_sockets_within_100ms,
];
