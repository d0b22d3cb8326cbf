//! 1,000 concurrent connections through TPROXY, then all closed: the registry and the
//! process's open descriptors return to where they were (but for the relay's bounded pools of
//! empty pipes). 3,000 idle connections hold two sockets each and no pipe, also after bytes
//! moved.

use std::time::{Duration, Instant};

use crate::common::topo::{SERVER4, socket, spawn_in, with_gateway};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tpacct::config::AccountingMode;

const CONNECTIONS: usize = 1000;
/// Pipe descriptors the relay may keep pooled: 32 empty pipes (two descriptors each) per
/// worker thread of the test gateway's two.
const POOLED: usize = 2 * 32 * 2;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn thousand_concurrent_connections_then_baseline() {
    with_gateway(
        "scale",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            let before = crate::common::open_fds();
            let pipes_before = pipes();
            let target = socket(SERVER4, 6000);
            // Server: echoes each connection's bytes until EOF.
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let server = spawn_in(&topo.server, move || {
                runtime().block_on(async move {
                    let listener = TcpListener::bind(target).await.expect("bind");
                    ready_tx.send(()).expect("ready");
                    let mut tasks = Vec::new();
                    for _ in 0..CONNECTIONS {
                        let (mut conn, _) = listener.accept().await.expect("accept");
                        tasks.push(tokio::spawn(async move {
                            let mut buf = [0u8; 64];
                            while let Ok(n @ 1..) = conn.read(&mut buf).await {
                                conn.write_all(&buf[..n]).await.expect("echo");
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.expect("echo task");
                    }
                });
            });
            ready_rx.recv().expect("server ready");

            // Client: opens every connection, checks one echo on each, holds them until told.
            let (opened_tx, opened_rx) = std::sync::mpsc::channel();
            let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
            let client = spawn_in(&topo.client, move || {
                runtime().block_on(async move {
                    let mut conns = Vec::with_capacity(CONNECTIONS);
                    for i in 0..CONNECTIONS {
                        let mut conn = TcpStream::connect(target).await.expect("connect");
                        let msg = format!("hello {i:04}");
                        conn.write_all(msg.as_bytes()).await.expect("write");
                        let mut echo = vec![0u8; msg.len()];
                        conn.read_exact(&mut echo).await.expect("echo");
                        assert_eq!(echo, msg.as_bytes());
                        conns.push(conn);
                    }
                    opened_tx.send(()).expect("opened");
                    let _ = close_rx.await;
                    drop(conns);
                });
            });
            opened_rx.recv().expect("all connected");
            gw.wait_until(10, "1000 live flows", |r| r.live_count() == CONNECTIONS);
            let totals = gw.registry.totals();
            assert_eq!(totals.upload, totals.download, "every byte echoed");
            assert_eq!(totals.upload, (CONNECTIONS * "hello 0000".len()) as u64);
            // Every connection moved bytes both ways and is idle now: its pipes went back.
            let during = pipes();
            eprintln!(
                "pipes: {pipes_before} before, {during} with {CONNECTIONS} idle after an echo"
            );
            assert!(
                during <= pipes_before + POOLED,
                "{during} pipe descriptors for {CONNECTIONS} idle connections"
            );

            let _ = close_tx.send(());
            client.join().expect("client");
            server.join().expect("server");
            gw.wait_until(20, "every flow to finish", |r| r.live_count() == 0);
            assert_eq!(gw.registry.closed(usize::MAX).len(), CONNECTIONS);

            let others = || crate::common::open_fds() - pipes();
            let others_before = before - pipes_before;
            let deadline = Instant::now() + Duration::from_secs(5);
            while others() > others_before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            assert!(
                others() <= others_before,
                "descriptors other than pipes: {others_before} before, {} after",
                others()
            );
            assert!(pipes() <= pipes_before + POOLED, "{} pipes after", pipes());
        },
    );
}

/// Pipes this process holds.
fn pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("pipe:"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn idle_connections_hold_no_pipes() {
    const IDLE: usize = 3000;
    with_gateway(
        "idle-pipes",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            let before = pipes();
            let target = socket(SERVER4, 6001);
            let (accepted_tx, accepted_rx) = std::sync::mpsc::channel();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let server = spawn_in(&topo.server, move || {
                let listener = std::net::TcpListener::bind(target).expect("bind");
                ready_tx.send(()).expect("ready");
                let held: Vec<_> = (0..IDLE)
                    .map(|_| listener.accept().expect("accept").0)
                    .collect();
                accepted_tx.send(held).expect("accepted");
            });
            ready_rx.recv().expect("server ready");
            let client = crate::common::topo::Topology::run_in(&topo.client, move || {
                (0..IDLE)
                    .map(|_| std::net::TcpStream::connect(target).expect("connect"))
                    .collect::<Vec<_>>()
            });
            let held = accepted_rx.recv().expect("all accepted upstream");
            server.join().expect("server");
            gw.wait_until(10, "the idle flows", |r| r.live_count() == IDLE);
            let during = pipes();
            eprintln!("pipes: {before} before, {during} with {IDLE} idle connections");
            assert!(during <= before + 4, "{during} pipes for idle connections");
            drop((client, held));
            gw.wait_until(20, "every flow to finish", |r| r.live_count() == 0);
        },
    );
}

crate::tests![
    root thousand_concurrent_connections_then_baseline,
    root idle_connections_hold_no_pipes,
];
