//! A fast-path flow's life: live counters while it runs (with no proxied socket for it),
//! DELETE ending it (what is left is dropped, never forwarded uncounted), RST, and a full flow
//! map sending the overflow to the proxy, counted.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
};

use crate::{
    common::topo::{Gateway, SERVER4, Topology, http, http_with, socket, spawn_in, with_gateway},
    fastpath::{FAST_PORT, closed_to, fast_config},
};
use tpacct::{config::AccountingMode, registry::Traffic};

/// An echo server on `port` for `conns` connections, each echoing until EOF.
fn echo_server(topo: &Topology, port: u16, conns: usize) -> std::thread::JoinHandle<()> {
    let listen = socket(SERVER4, port);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(listen).expect("bind");
        ready_tx.send(()).expect("ready");
        let mut threads = Vec::new();
        for _ in 0..conns {
            let (mut conn, _) = listener.accept().expect("accept");
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }));
        }
        for t in threads {
            let _ = t.join();
        }
    });
    ready_rx.recv().expect("server ready");
    server
}

/// Connects from the client namespace and has `n` bytes echoed.
fn connect_and_echo(topo: &Topology, port: u16, n: usize) -> TcpStream {
    let target = socket(SERVER4, port);
    crate::common::topo::Topology::run_in(&topo.client, move || {
        let mut c = TcpStream::connect(target).expect("connect");
        c.write_all(&vec![b'e'; n]).expect("write");
        let mut back = vec![0u8; n];
        c.read_exact(&mut back).expect("echo");
        c
    })
}

/// Closes `stream` with a reset (SO_LINGER 0).
fn abort(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(std::time::Duration::ZERO))
        .expect("SO_LINGER");
}

/// TCP sockets in the gateway namespace to `port` (the proxy's dials would be there).
fn gateway_sockets_to(topo: &Topology, port: u16) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &topo.gateway.name, "ss", "-tanH"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!(":{port} ")) || l.ends_with(&format!(":{port}")))
        .count()
}

/// Packets the fast path's nftables rule dropped as uncounted.
fn dropped_uncounted(topo: &Topology) -> u64 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.gateway.name,
            "nft",
            "list",
            "chain",
            "inet",
            "tpacct",
            "fastpath",
        ])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains("drop"))
        .filter_map(|l| {
            l.split("packets ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn live_then_deleted(topo: &Topology, gw: &Gateway) {
    let server = echo_server(topo, FAST_PORT, 1);
    let mut client = connect_and_echo(topo, FAST_PORT, 3_000);
    let mut id = None;
    gw.wait_until(10, "the live fast flow at its bytes", |r| {
        let live = r.live();
        id = live.first().map(|l| l.flow.id);
        matches!(&live[..], [one] if one.traffic == Traffic { upload: 3_000, download: 3_000 }
            && one.flow.meta.inbound_name == "DEFAULT-FASTPATH")
    });
    assert_eq!(
        gateway_sockets_to(topo, FAST_PORT),
        0,
        "no proxied socket for a forwarded flow"
    );
    // The Clash API shows it like any flow, field for field.
    let (status, body) = http(topo, "GET", "/connections");
    assert_eq!(status, 200);
    let c = &body["connections"][0];
    assert_eq!(c["metadata"]["inboundName"], "DEFAULT-FASTPATH", "{body}");
    assert_eq!(c["metadata"]["type"], "TProxy");
    assert_eq!(c["metadata"]["destinationPort"], FAST_PORT.to_string());
    assert_eq!(c["chains"], serde_json::json!(["DIRECT"]));
    assert_eq!(c["rule"], "DstPort");
    assert_eq!(
        (c["upload"].as_u64(), c["download"].as_u64()),
        (Some(3_000), Some(3_000))
    );
    let id = id.expect("id");
    assert_eq!(c["id"], id.to_string());
    let (status, _) = http(topo, "DELETE", &format!("/connections/{id}"));
    assert_eq!(status, 204);
    let closed = closed_to(gw, FAST_PORT);
    assert_eq!(
        closed.traffic,
        Traffic {
            upload: 3_000,
            download: 3_000
        }
    );
    // What the client sends now is dropped at the gateway, not forwarded uncounted.
    client.write_all(b"after the end").expect("write");
    gw.wait_until(10, "the uncounted segment to be dropped", |_| {
        dropped_uncounted(topo) > 0
    });
    assert_eq!(gw.registry.live_count(), 0);
    abort(client);
    drop(server);
}

fn a_deleted_flow_ends_and_what_is_left_is_dropped() {
    with_gateway(
        "fast_delete",
        AccountingMode::Ebpf,
        fast_config,
        live_then_deleted,
    );
}

fn a_reset_ends_the_flow_with_what_was_seen() {
    with_gateway("fast_rst", AccountingMode::Ebpf, fast_config, |topo, gw| {
        let server = echo_server(topo, FAST_PORT, 1);
        let client = connect_and_echo(topo, FAST_PORT, 1_234);
        abort(client);
        let closed = closed_to(gw, FAST_PORT);
        assert_eq!(
            closed.traffic,
            Traffic {
                upload: 1_234,
                download: 1_234
            }
        );
        assert_eq!(closed.meta.inbound_name, "DEFAULT-FASTPATH");
        server.join().expect("server");
    });
}

fn a_full_map_sends_the_overflow_to_the_proxy_counted() {
    with_gateway(
        "fast_full",
        AccountingMode::Ebpf,
        |c| {
            fast_config(c);
            c.fast_path.max_flows = 2;
        },
        |topo, gw| {
            let server = echo_server(topo, FAST_PORT, 4);
            let clients: Vec<TcpStream> = (1..=4)
                .map(|i| connect_and_echo(topo, FAST_PORT, 1_000 * i))
                .collect();
            gw.wait_until(10, "four live flows", |r| r.live_count() == 4);
            for c in clients {
                drop(c);
            }
            gw.wait_until(15, "four closed flows", |r| {
                r.live_count() == 0 && r.closed(10).len() == 4
            });
            let mut by_inbound: Vec<(&str, u64)> = gw
                .registry
                .closed(10)
                .iter()
                .map(|c| {
                    assert_eq!(c.traffic.upload, c.traffic.download);
                    (c.meta.inbound_name, c.traffic.upload)
                })
                .collect();
            by_inbound.sort_unstable();
            assert_eq!(
                by_inbound,
                [
                    ("DEFAULT-FASTPATH", 1_000),
                    ("DEFAULT-FASTPATH", 2_000),
                    ("DEFAULT-TPROXY", 3_000),
                    ("DEFAULT-TPROXY", 4_000),
                ]
            );
            server.join().expect("server");
            let metric = |name| crate::metrics::metric(topo, name);
            assert_eq!(metric("tpacct_fast_path_decided_total"), 2.0);
            assert_eq!(metric("tpacct_fast_path_map_full_total"), 2.0);
        },
    );
}

fn a_reload_recompiles_and_flows_in_progress_keep_their_path() {
    with_gateway(
        "fast_reload",
        AccountingMode::Ebpf,
        fast_config,
        |topo, gw| {
            let server = echo_server(topo, FAST_PORT, 2);
            let mut held = connect_and_echo(topo, FAST_PORT, 500);
            // Port 5001 now needs the proxy (REJECT); everything else is decided DIRECT at once.
            let payload = serde_json::json!({
                "payload": format!("rules:\n  - DST-PORT,{FAST_PORT},REJECT\n  - MATCH,DIRECT\n")
            })
            .to_string();
            let (status, body) = http_with(topo, "PUT", "/configs?force=true", &payload);
            assert_eq!(status, 204, "{body}");
            // The flow in progress keeps the fast path: it still echoes, counted.
            let more = Topology::run_in(&topo.client, move || {
                held.write_all(&[b'm'; 700]).expect("write");
                let mut back = [0u8; 700];
                held.read_exact(&mut back).expect("echo");
                held
            });
            let refused = Topology::run_in(&topo.client, || {
                let mut c = TcpStream::connect(socket(SERVER4, FAST_PORT)).expect("connect");
                let mut b = [0u8; 1];
                matches!(c.read(&mut b), Ok(0) | Err(_))
            });
            assert!(refused, "a new flow to the port follows the new rules");
            drop(more);
            gw.wait_until(10, "both flows closed", |r| {
                r.live_count() == 0 && r.closed(10).len() == 2
            });
            let closed = gw.registry.closed(10);
            let fast = closed
                .iter()
                .find(|c| c.meta.inbound_name == "DEFAULT-FASTPATH")
                .expect("the held flow");
            assert_eq!(
                fast.traffic,
                Traffic {
                    upload: 1_200,
                    download: 1_200
                }
            );
            assert_eq!(
                fast.route.rule, "DstPort",
                "labelled by the rules it was decided by"
            );
            let rejected = closed
                .iter()
                .find(|c| c.meta.inbound_name == "DEFAULT-TPROXY")
                .expect("the refused flow");
            assert_eq!(rejected.route.chains, ["REJECT"]);
            drop(server);
        },
    );
}

crate::tests![
    root a_deleted_flow_ends_and_what_is_left_is_dropped,
    root a_reset_ends_the_flow_with_what_was_seen,
    root a_full_map_sends_the_overflow_to_the_proxy_counted,
    root a_reload_recompiles_and_flows_in_progress_keep_their_path,
];
