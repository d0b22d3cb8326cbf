//! UDP sessions are bounded and independent: a client that sprays 10,000 destinations never
//! holds more than `udp-max-sessions` sessions (the ones idle longest are closed to make room),
//! memory and descriptors stay bounded, and a busy conversation alongside is never disturbed.

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tpacct::config::{AccountingMode, Count, Seconds};

use crate::common::topo::{SERVER4, socket, spawn_in, with_gateway};

const MAX: usize = 256;
const DESTINATIONS: u16 = 10_000;
const ECHOES: usize = 400;

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

fn ten_thousand_destinations_stay_bounded() {
    with_gateway(
        "udp_scale",
        AccountingMode::Ebpf,
        |c| {
            c.udp_max_sessions = Count(MAX as u64);
            c.udp_idle_timeout = Seconds(60);
        },
        |topo, gw| {
            let (fds, rss_before) = (crate::common::open_fds(), rss());
            let echo = spawn_in(&topo.server, || {
                let sock = UdpSocket::bind(socket(SERVER4, 5353)).expect("bind");
                sock.set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                let mut buf = [0u8; 64];
                // Until the client has stopped talking.
                while let Ok((n, from)) = sock.recv_from(&mut buf) {
                    sock.send_to(&buf[..n], from).expect("echo");
                }
            });
            // The busy conversation starts first and keeps talking through the flood.
            let flooding = Arc::new(AtomicBool::new(true));
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let talking = flooding.clone();
            let busy = spawn_in(&topo.client, move || {
                let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
                sock.set_read_timeout(Some(Duration::from_millis(500)))
                    .expect("timeout");
                let mut buf = [0u8; 64];
                let mut answered = 0;
                for i in 0..ECHOES {
                    let msg = format!("ping {i}");
                    sock.send_to(msg.as_bytes(), socket(SERVER4, 5353))
                        .expect("send");
                    match sock.recv(&mut buf) {
                        Ok(n) if &buf[..n] == msg.as_bytes() => answered += 1,
                        other => eprintln!("ping {i}: {other:?}"),
                    }
                    if i == 0 {
                        started_tx.send(()).expect("started");
                    }
                    if !talking.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                    } else {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                answered
            });
            started_rx.recv().expect("busy session started");
            gw.wait_until(5, "the busy session", |r| r.live_count() == 1);
            let busy_id = gw.registry.live()[0].flow.id;

            // Watch the descriptors (two sockets per session) while the flood runs.
            let most = Arc::new(AtomicUsize::new(0));
            let (seen, watching) = (most.clone(), flooding.clone());
            let watcher = std::thread::spawn(move || {
                while watching.load(Ordering::Relaxed) {
                    seen.fetch_max(crate::common::open_fds(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            spawn_in(&topo.client, || {
                let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
                for port in 0..DESTINATIONS {
                    sock.send_to(b"x", socket(SERVER4, 20_000 + port))
                        .expect("spray");
                    if port % 8 == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
            .join()
            .expect("flood");
            let (opened, _) = gw.registry.opened();
            flooding.store(false, Ordering::Relaxed);
            watcher.join().expect("watcher");
            let answered = busy.join().expect("busy");
            echo.join().expect("echo");

            let most = most.load(Ordering::Relaxed);
            let rss_after = rss();
            // Sessions closed to make room finish as their final totals arrive.
            gw.wait_until(5, "evicted sessions to finish", |r| r.live_count() <= MAX);
            eprintln!(
                "{opened} sessions opened; descriptors {fds} before, at most {most} during; \
                 RSS {} → {} MB",
                rss_before >> 20,
                rss_after >> 20
            );
            assert!(opened > 4 * MAX as u64, "the cap was exercised: {opened}");
            assert!(
                most <= fds + 2 * (MAX + MAX / 8) + 16,
                "descriptors: {fds} before, {most} during the flood"
            );
            // UDP under a flood may lose a datagram in the kernel's queues; the conversation
            // itself must go on.
            assert!(
                answered >= ECHOES * 98 / 100,
                "the busy conversation got {answered} of {ECHOES} answers"
            );
            assert!(
                gw.registry.get(&busy_id).is_some(),
                "the busy session was never the one idle longest"
            );
            assert!(
                rss_after.saturating_sub(rss_before) < 64 << 20,
                "RSS grew {} MB",
                (rss_after - rss_before) >> 20
            );
        },
    );
}

crate::tests![root ten_thousand_destinations_stay_bounded];
