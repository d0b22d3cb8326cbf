//! `/connections/events` against real flows: a flow that lives across ticks is `opened`, then
//! `updated`, then `closed`, and its deltas add up to its exact totals; a flow that opens and
//! closes between two ticks arrives as `closed` with its exact totals.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

use futures_util::StreamExt;
use tpacct::config::AccountingMode;

use crate::common::{
    topo::{SERVER4, socket, spawn_async_in, spawn_in, with_gateway},
    upstreams::{fetch, identify_server},
};

/// Written in steps a quarter of a second apart: the events see them between ticks.
const STEP: usize = 24_000;
const STEPS: usize = 5;
const DOWN: usize = 1_000;

fn a_flow_is_opened_updated_and_closed_with_exact_deltas() {
    with_gateway(
        "events",
        AccountingMode::Ebpf,
        |_| {},
        |topo, _gw| {
            identify_server(&topo.server, socket(SERVER4, 80));
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let server = spawn_in(&topo.server, move || {
                let listener = TcpListener::bind(socket(SERVER4, 6100)).expect("bind");
                ready_tx.send(()).expect("ready");
                let (mut conn, _) = listener.accept().expect("accept");
                let mut got = Vec::new();
                conn.read_to_end(&mut got).expect("read");
                conn.write_all(&[7u8; DOWN]).expect("write");
                got.len()
            });
            ready_rx.recv().expect("server");
            // The client of the events, in the gateway: every frame until two flows closed.
            let (subscribed_tx, subscribed_rx) = std::sync::mpsc::channel();
            let events = spawn_async_in(&topo.gateway, async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(
                    "ws://127.0.0.1:9090/connections/events?interval=100",
                )
                .await
                .expect("events");
                subscribed_tx.send(()).expect("subscribed");
                let mut frames = Vec::new();
                let mut closed = 0;
                while closed < 2 {
                    let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
                        .await
                        .expect("an event within 20 s")
                        .expect("open")
                        .expect("frame");
                    let frame: serde_json::Value =
                        serde_json::from_str(msg.to_text().expect("text")).expect("json");
                    closed += usize::from(frame["type"] == "closed");
                    frames.push(frame);
                }
                frames
            });
            subscribed_rx.recv().expect("subscribed");
            // A flow across several ticks.
            let long = spawn_in(&topo.client, || {
                let mut c = TcpStream::connect(socket(SERVER4, 6100)).expect("connect");
                for i in 0..STEPS {
                    if i > 0 {
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    c.write_all(&[1u8; STEP]).expect("a step");
                }
                c.shutdown(Shutdown::Write).expect("shutdown");
                let mut back = Vec::new();
                c.read_to_end(&mut back).expect("answer");
                back.len()
            });
            assert_eq!(long.join().expect("client"), DOWN);
            assert_eq!(server.join().expect("server"), STEP * STEPS);
            // A flow within one tick.
            let (_, up, down) = fetch(&topo.client, socket(SERVER4, 80), "quick", 10);
            let frames = events.join().expect("events");

            let id_of = |f: &serde_json::Value| {
                f["id"]
                    .as_str()
                    .or_else(|| f["connection"]["id"].as_str())
                    .unwrap_or_default()
                    .to_owned()
            };
            let long_id = frames
                .iter()
                .find(|f| {
                    f["type"] == "opened"
                        && f["connection"]["metadata"]["destinationPort"] == "6100"
                })
                .map(id_of)
                .expect("the long flow was opened");
            let mine: Vec<&serde_json::Value> =
                frames.iter().filter(|f| id_of(f) == long_id).collect();
            assert_eq!(mine.first().map(|f| &f["type"]), Some(&"opened".into()));
            assert_eq!(mine.last().map(|f| &f["type"]), Some(&"closed".into()));
            assert!(
                mine.iter().any(|f| f["type"] == "updated"),
                "updated between the steps"
            );
            let added = |key: &str| -> u64 {
                mine.iter()
                    .map(|f| match f["type"].as_str() {
                        Some("opened") => f["connection"][key].as_u64().unwrap_or(0),
                        _ => f[key].as_u64().unwrap_or(0),
                    })
                    .sum()
            };
            assert_eq!(
                added("upload"),
                (STEP * STEPS) as u64,
                "upload deltas add up"
            );
            assert_eq!(added("download"), DOWN as u64, "download deltas add up");
            let last = mine.last().expect("closed");
            assert_eq!(last["connection"]["upload"], (STEP * STEPS) as u64);
            assert!(last["connection"]["closedAt"].is_string());
            // The quick flow: its close carries its exact totals.
            let quick = frames
                .iter()
                .find(|f| f["type"] == "closed" && id_of(f) != long_id)
                .expect("the quick flow closed");
            assert_eq!(quick["connection"]["upload"], up);
            assert_eq!(quick["connection"]["download"], down);
        },
    );
}

crate::tests![root a_flow_is_opened_updated_and_closed_with_exact_deltas];
