//! A controller under a slow-request flood does not starve the gateway: more connections than
//! its slots, each sending half a request head, hold them, yet a transfer through the relay
//! completes with exact totals meanwhile, the flood is dropped after the header deadline, and
//! the controller answers again afterwards.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use tpacct::{api, config::AccountingMode};

use crate::common::topo::{SERVER4, Topology, spawn_in, with_gateway};

const FLOOD: usize = api::MAX_CONNECTIONS + 200;
const API: &str = "127.0.0.1:9090";

fn relay_keeps_working_while_the_controller_is_flooded() {
    with_gateway(
        "api_flood",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            let (held_tx, held_rx) = std::sync::mpsc::channel();
            let flood = spawn_in(&topo.gateway, move || {
                let started = Instant::now();
                let mut conns = Vec::new();
                for _ in 0..FLOOD {
                    let Ok(mut c) = TcpStream::connect_timeout(
                        &API.parse().expect("addr"),
                        Duration::from_secs(1),
                    ) else {
                        continue;
                    };
                    let _ = c.write_all(b"GET /connections HTTP/1.1\r\nHost: a");
                    conns.push(c);
                }
                held_tx.send(conns.len()).expect("held");
                // Every connection the controller took is dropped by the header deadline.
                let mut dropped = 0;
                for mut c in conns {
                    let _ = c.set_read_timeout(Some(api::HEADER_TIMEOUT * 4));
                    if !matches!(c.read(&mut [0u8; 64]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    {
                        dropped += 1;
                    }
                }
                (dropped, started.elapsed())
            });
            let held = held_rx.recv().expect("flood started");
            assert!(
                held >= api::MAX_CONNECTIONS,
                "only {held} flood connections"
            );

            let started = Instant::now();
            crate::tproxy_tcp::exchange(topo, gw, SERVER4, 10 << 20, 10 << 20);
            let took = started.elapsed();
            assert!(
                took < api::HEADER_TIMEOUT,
                "the transfer waited for the flood: {took:?}"
            );

            let (dropped, after) = flood.join().expect("flood");
            assert_eq!(
                dropped, held,
                "every slow connection was dropped ({after:?})"
            );
            let reply = Topology::run_in(&topo.gateway, || {
                let mut c = TcpStream::connect(API).expect("connect");
                c.write_all(b"GET /version HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                    .expect("request");
                let mut reply = String::new();
                let _ = c.read_to_string(&mut reply);
                reply
            });
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
            eprintln!(
                "transfer during the flood took {took:?}; flood of {held} dropped after {after:?}"
            );
        },
    );
}

crate::tests![root relay_keeps_working_while_the_controller_is_flooded];
