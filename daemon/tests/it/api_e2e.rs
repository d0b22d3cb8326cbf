//! The Clash API end to end: real flows through TPROXY in namespaces, observed and closed
//! over HTTP and WebSocket on the gateway's external-controller.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::common::topo::{SERVER4, Topology, socket, spawn_in, with_gateway};
use futures_util::StreamExt;
use serde_json::Value;
use tpacct::config::AccountingMode;

const API: &str = "127.0.0.1:9090";

use crate::common::topo::{block_on_in, http, http_with, spawn_async_in};

fn connections(topo: &Topology) -> Vec<Value> {
    let (status, body) = http(topo, "GET", "/connections");
    assert_eq!(status, 200);
    body["connections"].as_array().cloned().unwrap_or_default()
}

/// Server side of held-open connections: reads `up` bytes, answers `down`, then waits for
/// EOF; reports when each connection ended.
fn holding_server(
    topo: &Topology,
    port: u16,
    count: usize,
    up: usize,
    down: usize,
) -> mpsc::Receiver<Instant> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (ended_tx, ended_rx) = mpsc::channel();
    spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, port)).expect("bind");
        ready_tx.send(()).expect("ready");
        for _ in 0..count {
            let (mut conn, _) = listener.accept().expect("accept");
            let ended = ended_tx.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; up];
                conn.read_exact(&mut buf).expect("request");
                conn.write_all(&vec![b'd'; down]).expect("reply");
                let mut rest = Vec::new();
                let _ = conn.read_to_end(&mut rest);
                let _ = ended.send(Instant::now());
            });
        }
    });
    ready_rx.recv().expect("server ready");
    ended_rx
}

/// Client side: opens a connection, sends `up`, reads `down`, then reports when the gateway
/// ends it (EOF or reset).
fn holding_client(
    topo: &Topology,
    port: u16,
    up: usize,
    down: usize,
) -> (mpsc::Receiver<()>, mpsc::Receiver<Instant>) {
    let (open_tx, open_rx) = mpsc::channel();
    let (ended_tx, ended_rx) = mpsc::channel();
    spawn_in(&topo.client, move || {
        let mut conn = TcpStream::connect(socket(SERVER4, port)).expect("connect");
        conn.write_all(&vec![b'u'; up]).expect("request");
        let mut buf = vec![0u8; down];
        conn.read_exact(&mut buf).expect("reply");
        open_tx.send(()).expect("open");
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        let _ = ended_tx.send(Instant::now());
    });
    (open_rx, ended_rx)
}

fn a_live_flow_is_listed_with_metadata_and_counters_then_closed_by_id() {
    with_gateway(
        "api_flow",
        AccountingMode::Ebpf,
        |_| {},
        |topo, _gw| {
            let server_ended = holding_server(topo, 5001, 2, 1000, 2000);
            let (open_a, ended_a) = holding_client(topo, 5001, 1000, 2000);
            open_a.recv().expect("a open");
            let (open_b, ended_b) = holding_client(topo, 5001, 1000, 2000);
            open_b.recv().expect("b open");

            let deadline = Instant::now() + Duration::from_secs(5);
            let listed = loop {
                let list = connections(topo);
                if list.len() == 2
                    && list
                        .iter()
                        .all(|c| c["upload"] == 1000 && c["download"] == 2000)
                {
                    break list;
                }
                assert!(
                    Instant::now() < deadline,
                    "flows not listed with exact counters: {list:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            let c = &listed[0];
            let m = &c["metadata"];
            assert_eq!(m["network"], "tcp");
            assert_eq!(m["type"], "TProxy");
            assert_eq!(m["sourceIP"], "10.91.1.2");
            assert_eq!(m["destinationIP"], SERVER4);
            assert_eq!(m["destinationPort"], "5001");
            assert_eq!(m["remoteDestination"], SERVER4);
            assert_eq!(
                m["inboundIP"], "10.91.1.1",
                "the gateway's address facing the client"
            );
            assert_eq!(m["inboundPort"], "7893");
            assert_eq!(c["chains"], serde_json::json!(["DIRECT"]));
            assert_eq!(c["rule"], "Match");

            // DELETE one id: exactly that flow's sockets end, within 100 ms.
            let id = c["id"].as_str().expect("id").to_owned();
            let sent = Instant::now();
            let (status, _) = http(topo, "DELETE", &format!("/connections/{id}"));
            assert_eq!(status, 204);
            // The listing's order is not the connect order: exactly one of the two clients ends.
            let a = ended_a.recv_timeout(Duration::from_secs(2)).ok();
            let b = ended_b.recv_timeout(Duration::from_millis(300)).ok();
            let client_end = match (a, b) {
                (Some(end), None) | (None, Some(end)) => end,
                (a, b) => panic!("exactly one client should end: {a:?} {b:?}"),
            };
            let took = client_end.duration_since(sent);
            assert!(
                took < Duration::from_millis(100),
                "client ended after {took:?}"
            );
            let server_end = server_ended
                .recv_timeout(Duration::from_secs(2))
                .expect("server side ended");
            assert!(server_end.duration_since(sent) < Duration::from_millis(100));
            assert!(
                server_ended
                    .recv_timeout(Duration::from_millis(200))
                    .is_err(),
                "the other flow is untouched"
            );
            assert_eq!(connections(topo).len(), 1);

            // DELETE all ends the rest.
            let (status, _) = http(topo, "DELETE", "/connections");
            assert_eq!(status, 204);
            assert!(
                ended_a.recv_timeout(Duration::from_secs(2)).is_ok()
                    || ended_b.recv_timeout(Duration::from_secs(2)).is_ok()
            );
            server_ended
                .recv_timeout(Duration::from_secs(2))
                .expect("second server side ended");
            let deadline = Instant::now() + Duration::from_secs(5);
            while !connections(topo).is_empty() {
                assert!(Instant::now() < deadline, "flows still listed");
                std::thread::sleep(Duration::from_millis(20));
            }
            let (_, closed) = http(topo, "GET", "/connections/closed");
            assert_eq!(closed["connections"].as_array().map(Vec::len), Some(2));
        },
    );
}

/// Frames of a WebSocket endpoint, with their arrival times, until `stop` frames or time.
fn websocket(
    topo: &Topology,
    path: &str,
    frames: usize,
    within: Duration,
) -> Vec<(Instant, Value)> {
    let url = format!("ws://{API}{path}");
    block_on_in(&topo.gateway, async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket");
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        while got.len() < frames {
            let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await else {
                break;
            };
            if let Ok(text) = msg.to_text()
                && let Ok(v) = serde_json::from_str::<Value>(text)
            {
                got.push((Instant::now(), v));
            }
        }
        got
    })
}

fn websocket_connections_honour_the_interval() {
    with_gateway(
        "api_ws",
        AccountingMode::Ebpf,
        |_| {},
        |topo, _gw| {
            let asked = Instant::now();
            let frames = websocket(topo, "/connections?interval=200", 8, Duration::from_secs(5));
            assert_eq!(frames.len(), 8);
            assert!(
                frames[0].0.duration_since(asked) < Duration::from_millis(150),
                "first frame at once"
            );
            let gaps: Vec<Duration> = frames
                .windows(2)
                .map(|w| w[1].0.duration_since(w[0].0))
                .collect();
            let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
            assert!(
                mean >= Duration::from_millis(180) && mean <= Duration::from_millis(260),
                "mean gap {mean:?} for interval=200 ({gaps:?})"
            );
            assert!(frames.iter().all(|(_, f)| f["connections"].is_array()));
        },
    );
}

/// Two clients at the default interval, the second 400 ms after the first: after its first
/// frame (sent at once), each gets the sampler's frames, the same bytes at the same moments.
fn websockets_at_the_default_interval_share_the_samplers_frames() {
    with_gateway(
        "api_ws_shared",
        AccountingMode::Ebpf,
        |_| {},
        |topo, _gw| {
            let url = format!("ws://{API}/connections");
            let (a, b) = block_on_in(&topo.gateway, async move {
                let collect = |url: String, delay: Duration| async move {
                    tokio::time::sleep(delay).await;
                    let (mut ws, _) = tokio_tungstenite::connect_async(url)
                        .await
                        .expect("websocket");
                    let mut got = Vec::new();
                    while got.len() < 4 {
                        let Ok(Some(Ok(msg))) =
                            tokio::time::timeout(Duration::from_secs(5), ws.next()).await
                        else {
                            break;
                        };
                        got.push((Instant::now(), msg.to_text().expect("text").to_owned()));
                    }
                    got
                };
                tokio::join!(
                    collect(url.clone(), Duration::ZERO),
                    collect(url, Duration::from_millis(400))
                )
            });
            assert_eq!((a.len(), b.len()), (4, 4), "frames");
            for (at, text) in &b[1..] {
                let (their_at, theirs) = a
                    .iter()
                    .min_by_key(|(t, _)| {
                        if t > at {
                            t.duration_since(*at)
                        } else {
                            at.duration_since(*t)
                        }
                    })
                    .expect("frames");
                let apart = if their_at > at {
                    their_at.duration_since(*at)
                } else {
                    at.duration_since(*their_at)
                };
                assert!(
                    apart < Duration::from_millis(100),
                    "the second client's frame came {apart:?} from the first's nearest"
                );
                assert_eq!(text, theirs, "the same tick's frame, byte for byte");
            }
        },
    );
}

fn traffic_deltas_add_up_to_the_bytes_moved() {
    with_gateway(
        "api_traffic",
        AccountingMode::Ebpf,
        |_| {},
        |topo, _gw| {
            let (up, down) = (3_000_000usize, 5_000_000usize);
            // Watch /traffic while a transfer runs, until the totals reach the bytes moved
            // and three quiet frames followed (a loaded machine may take long: the deadline
            // only bounds a failure).
            let (start_tx, start_rx) = mpsc::channel::<()>();
            let (want_up, want_down) = (up as u64, down as u64);
            let watcher = spawn_async_in(&topo.gateway, async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{API}/traffic"))
                    .await
                    .expect("websocket");
                start_tx.send(()).expect("started");
                let mut frames: Vec<Value> = Vec::new();
                let mut quiet_after_totals = 0;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(deadline, ws.next()).await {
                    let Ok(v) = serde_json::from_str::<Value>(msg.to_text().unwrap_or("")) else {
                        continue;
                    };
                    let totals = (v["upTotal"].as_u64(), v["downTotal"].as_u64());
                    frames.push(v);
                    if totals.0 >= Some(want_up) && totals.1 >= Some(want_down) {
                        quiet_after_totals += 1;
                        if quiet_after_totals > 3 {
                            break;
                        }
                    }
                }
                frames
            });
            start_rx.recv().expect("watching");
            let _server_ended = holding_server(topo, 5003, 1, up, down);
            let (open, _client_ended) = holding_client(topo, 5003, up, down);
            open.recv().expect("transfer done");
            let frames = watcher.join().expect("watcher");
            assert!(frames.len() >= 5, "{} frames", frames.len());
            let n = |v: &Value, k: &str| v[k].as_u64().expect(k);
            let (first, last) = (&frames[0], &frames[frames.len() - 1]);
            let up_sum: u64 = frames[1..].iter().map(|f| n(f, "up")).sum();
            let down_sum: u64 = frames[1..].iter().map(|f| n(f, "down")).sum();
            assert_eq!(up_sum, n(last, "upTotal") - n(first, "upTotal"));
            assert_eq!(down_sum, n(last, "downTotal") - n(first, "downTotal"));
            assert_eq!(n(last, "upTotal"), up as u64, "every uploaded byte, once");
            assert_eq!(
                n(last, "downTotal"),
                down as u64,
                "every downloaded byte, once"
            );
        },
    );
}

fn global_mode_follows_the_selector_in_the_data_path() {
    with_gateway(
        "api_mode",
        AccountingMode::Ebpf,
        |_| {},
        |topo, _gw| {
            assert_eq!(
                http_with(topo, "PATCH", "/configs", r#"{"mode":"global"}"#).0,
                204
            );
            assert_eq!(
                http_with(topo, "PUT", "/proxies/GLOBAL", r#"{"name":"REJECT"}"#).0,
                204
            );
            let (ready_tx, ready_rx) = mpsc::channel();
            let server = spawn_in(&topo.server, move || {
                let listener = TcpListener::bind(socket(SERVER4, 5004)).expect("bind");
                ready_tx.send(()).expect("ready");
                // Only the connection made after switching back to DIRECT arrives.
                let (mut conn, _) = listener.accept().expect("accept");
                let mut buf = [0u8; 4];
                conn.read_exact(&mut buf).expect("read");
                conn.write_all(&buf).expect("echo");
            });
            ready_rx.recv().expect("server ready");

            let rejected = Topology::run_in(&topo.client, || {
                let mut conn = TcpStream::connect(socket(SERVER4, 5004)).expect("tproxy accepts");
                let started = Instant::now();
                let r = conn.read(&mut [0u8; 4]);
                (
                    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                    started.elapsed(),
                )
            });
            assert!(rejected.0, "REJECT resets the client");
            assert!(
                rejected.1 < crate::common::AT_ONCE,
                "reset after {:?}",
                rejected.1
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            let closed = loop {
                let (_, closed) = http(topo, "GET", "/connections/closed?limit=1");
                if let Some(c) = closed["connections"].get(0) {
                    break c.clone();
                }
                assert!(Instant::now() < deadline, "the rejected flow is not listed");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert_eq!(closed["chains"], serde_json::json!(["REJECT", "GLOBAL"]));
            assert_eq!(
                (closed["upload"].as_u64(), closed["download"].as_u64()),
                (Some(0), Some(0))
            );

            assert_eq!(
                http_with(topo, "PUT", "/proxies/GLOBAL", r#"{"name":"DIRECT"}"#).0,
                204
            );
            Topology::run_in(&topo.client, || {
                let mut conn = TcpStream::connect(socket(SERVER4, 5004)).expect("connect");
                conn.write_all(b"ping").expect("write");
                let mut buf = [0u8; 4];
                conn.read_exact(&mut buf).expect("echo through DIRECT");
            });
            server.join().expect("server");
        },
    );
}

crate::tests![
    root a_live_flow_is_listed_with_metadata_and_counters_then_closed_by_id,
    root websocket_connections_honour_the_interval,
    root websockets_at_the_default_interval_share_the_samplers_frames,
    root traffic_deltas_add_up_to_the_bytes_moved,
    root global_mode_follows_the_selector_in_the_data_path,
];
