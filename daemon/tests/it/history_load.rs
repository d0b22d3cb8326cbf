//! 10,000 concurrent history queries against a gateway that is relaying: every one is
//! answered, the relayed flow never stalls and keeps its exact bytes; the round-trip times
//! through the gateway before and during the storm are printed (the bench compares them).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpacct::config::AccountingMode;

use crate::common::topo::{API, SERVER4, Topology, block_on_in, socket, spawn_in, with_gateway};

const REQUESTS: usize = 10_000;
const MESSAGE: usize = 1_024;
const QUERIES: [&str; 5] = [
    "/api/v1/stats?type=summary",
    "/api/v1/stats?type=group&group_by=device",
    "/api/v1/stats?type=timeseries&interval=hour",
    "/api/v1/stats?type=group&group_by=host&limit=5",
    "/api/v1/devices",
];

crate::tests![root ten_thousand_queries_at_once_leave_relaying_alone];

/// GETs `path` on the controller: whether the answer was 200 with `"status":"success"`.
async fn query(path: &str) -> Result<(), String> {
    let mut c = tokio::net::TcpStream::connect(API)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n");
    c.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&reply);
    if text.starts_with("HTTP/1.1 200") && text.contains("\"status\":\"success\"") {
        Ok(())
    } else {
        Err(text.lines().next().unwrap_or("nothing").to_owned())
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted
        .get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn ten_thousand_queries_at_once_leave_relaying_alone() {
    with_gateway(
        "history_load",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            let addr = socket(SERVER4, 7100);
            let listener = Topology::run_in(&topo.server, move || {
                TcpListener::bind(addr).expect("echo listener")
            });
            let _server = std::thread::spawn(move || {
                let (mut c, _) = listener.accept().expect("accept");
                let mut buf = [0u8; MESSAGE];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            // The echo client: round trips until told to stop, each timed and tagged with
            // whether the storm was on.
            let storm = Arc::new(AtomicBool::new(false));
            let stop = Arc::new(AtomicBool::new(false));
            let rounds = Arc::new(AtomicU64::new(0));
            let echo = {
                let (storm, stop, rounds) = (storm.clone(), stop.clone(), rounds.clone());
                spawn_in(&topo.client, move || {
                    let mut c = TcpStream::connect(addr).expect("connect through the gateway");
                    c.set_nodelay(true).expect("nodelay");
                    let (mut calm, mut stormy) = (Vec::new(), Vec::new());
                    let mut buf = [0u8; MESSAGE];
                    while !stop.load(Ordering::Acquire) {
                        let during = storm.load(Ordering::Acquire);
                        let t = Instant::now();
                        c.write_all(&[7u8; MESSAGE]).expect("send");
                        c.read_exact(&mut buf).expect("echo");
                        assert_eq!(buf, [7u8; MESSAGE]);
                        if during && storm.load(Ordering::Acquire) {
                            stormy.push(t.elapsed());
                        } else if !during {
                            calm.push(t.elapsed());
                        }
                        rounds.fetch_add(1, Ordering::Release);
                    }
                    (calm, stormy)
                })
            };
            let wait_rounds = |n: u64| {
                let deadline = Instant::now() + Duration::from_secs(30);
                while rounds.load(Ordering::Acquire) < n {
                    assert!(Instant::now() < deadline, "the echo stalled");
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            wait_rounds(300);

            storm.store(true, Ordering::Release);
            let before = rounds.load(Ordering::Acquire);
            let started = Instant::now();
            let failures: Vec<String> = block_on_in(&topo.gateway, async {
                let tasks: Vec<_> = (0..REQUESTS)
                    .map(|i| tokio::spawn(query(QUERIES[i % QUERIES.len()])))
                    .collect();
                let mut failures = Vec::new();
                for t in tasks {
                    if let Err(e) = t.await.expect("joined") {
                        failures.push(e);
                    }
                }
                failures
            });
            let took = started.elapsed();
            let during = rounds.load(Ordering::Acquire) - before;
            storm.store(false, Ordering::Release);
            wait_rounds(rounds.load(Ordering::Acquire) + 100);
            stop.store(true, Ordering::Release);
            let (mut calm, mut stormy) = echo.join().expect("echo client");
            calm.sort();
            stormy.sort();

            assert!(
                failures.is_empty(),
                "{} of {REQUESTS} queries failed, e.g. {:?}",
                failures.len(),
                &failures[..failures.len().min(3)]
            );
            assert!(during > 0, "no round trip completed during the storm");
            eprintln!(
                "{REQUESTS} queries answered in {took:.1?} ({:.0}/s); echo round trips \
                 calm p50 {:?} p99 {:?} ({}), during the storm p50 {:?} p99 {:?} ({})",
                REQUESTS as f64 / took.as_secs_f64(),
                percentile(&calm, 50),
                percentile(&calm, 99),
                calm.len(),
                percentile(&stormy, 50),
                percentile(&stormy, 99),
                stormy.len(),
            );
            // The echo flow, closed, has its exact bytes.
            let total = rounds.load(Ordering::Acquire) * MESSAGE as u64;
            gw.wait_until(10, "the echo flow closed with its exact bytes", |r| {
                r.closed(10)
                    .iter()
                    .any(|c| c.traffic.upload == total && c.traffic.download == total)
            });
        },
    );
}
