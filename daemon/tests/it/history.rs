//! History in SQLite: known transfers through TPROXY land in the database with their exact
//! bytes and their rollups add up; flows closed a second before a SIGKILL are there after a
//! restart, none twice; a database on a full filesystem never stops the relaying, its
//! failures are counted, and the flows that waited are written once there is room.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use rusqlite::Connection;
use tpacct::config::AccountingMode;

use crate::{
    common::{
        daemon::Daemon,
        harness::Skip,
        topo::{SERVER4, SERVER6, Topology, socket, spawn_in, with_gateway},
        upstreams::{fetch, identify_server},
    },
    metrics::{metric, wait_for},
    tproxy_tcp::exchange,
};

fn db(path: &Path) -> Connection {
    Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Waits until the gateway's history has committed `n` flows.
pub(crate) fn wait_committed(gw: &crate::common::topo::Gateway, n: u64) {
    let store = gw.registry.store().expect("history is on by default");
    gw.wait_until(10, "the flows committed", |_| {
        store
            .counts
            .written
            .load(std::sync::atomic::Ordering::Relaxed)
            == n
    });
}

fn history_dir(name: &str) -> PathBuf {
    let dir = crate::common::api::state_dir(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}

fn known_transfers_are_kept_exactly() {
    let dir = history_dir("history_exact");
    let path = dir.join("flows.db");
    let sizes: [(u64, u64); 4] = [(0, 1), (1, 0), (300_000, 1_000_000), (65_536, 12_345)];
    // One gateway per transfer, all on the same database (each run reopens it).
    for (i, (up, down)) in sizes.iter().enumerate() {
        let config_path = path.clone();
        with_gateway(
            "history_exact",
            AccountingMode::Ebpf,
            move |c| c.storage.path = Some(config_path),
            |topo, gw| {
                let server = if i % 2 == 0 { SERVER4 } else { SERVER6 };
                exchange(topo, gw, server, *up, *down);
                wait_committed(gw, 1);
            },
        );
    }
    let conn = db(&path);
    let mut rows: Vec<(u64, u64, String, u16, String)> = conn
        .prepare("SELECT upload, download, destination_ip, destination_port, rule FROM flows")
        .expect("query")
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .expect("rows")
        .map(|r| r.expect("row"))
        .collect();
    rows.sort();
    let mut expected: Vec<(u64, u64, String, u16, String)> = sizes
        .iter()
        .enumerate()
        .map(|(i, (up, down))| {
            let ip = if i % 2 == 0 { SERVER4 } else { SERVER6 };
            (*up, *down, ip.to_owned(), 5001, "Match".to_owned())
        })
        .collect();
    expected.sort();
    assert_eq!(rows, expected, "every flow, its exact bytes");
    // The rollups the daemon kept add up to the same.
    let rolled: (u64, u64, u64) = conn
        .query_row(
            "SELECT SUM(connections), SUM(upload), SUM(download) FROM rollup_minute",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("rollups");
    let up: u64 = sizes.iter().map(|s| s.0).sum();
    let down: u64 = sizes.iter().map(|s| s.1).sum();
    assert_eq!(rolled, (4, up, down));
}

/// A server on SERVER4:`port` that answers every connection with one byte and closes.
fn short_server(topo: &Topology, port: u16) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, port)).expect("bind");
        ready_tx.send(()).expect("ready");
        for mut conn in listener.incoming().map_while(Result::ok) {
            let _ = conn.write_all(b"x");
        }
    });
    ready_rx.recv().expect("server");
}

fn config_file(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "tproxy-port: 7893\nrouting-mark: 6666\nsecret: ''\naccounting: ebpf\n\
             tproxy-firewall:\n  interfaces: [g1]\n{extra}"
        ),
    )
    .expect("config");
    path
}

fn start(topo: &Topology, config: &Path, dir: &Path) -> Daemon {
    let args = [
        "run",
        "--config",
        config.to_str().expect("utf-8"),
        "-d",
        dir.to_str().expect("utf-8"),
    ];
    let daemon = Daemon::start(Some(&topo.gateway.name), &args);
    daemon.wait_for("tproxy-firewall: table inet tpacct installed");
    daemon
}

fn a_sigkill_loses_no_flow_closed_a_second_before() {
    let _turn = crate::common::serial();
    let topo = Topology::new();
    short_server(&topo, 7000);
    let dir = history_dir("history_kill");
    let config = config_file(&dir, "");
    let daemon = start(&topo, &config, &dir);
    // About a thousand short flows a second, each remembered with when its client saw it end.
    let target = socket(SERVER4, 7000);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let client = spawn_in(&topo.client, move || {
        let mut ended: Vec<(u16, Instant)> = Vec::new();
        while done_rx.try_recv().is_err() {
            let Ok(mut c) = TcpStream::connect(target) else {
                continue;
            };
            let port = c.local_addr().map_or(0, |a| a.port());
            let mut buf = [0u8; 8];
            // The server's byte and its close: the flow has ended for the client.
            if c.read(&mut buf).is_ok_and(|n| n == 1) && c.read(&mut buf).is_ok_and(|n| n == 0) {
                drop(c);
                ended.push((port, Instant::now()));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        ended
    });
    std::thread::sleep(Duration::from_secs(3));
    let killed_at = Instant::now();
    daemon.kill();
    let _ = done_tx.send(());
    let ended = client.join().expect("client");
    let due: Vec<u16> = ended
        .iter()
        .filter(|(_, at)| *at + Duration::from_secs(1) <= killed_at)
        .map(|(p, _)| *p)
        .collect();
    assert!(due.len() > 500, "only {} flows ended in time", due.len());
    // Restart on the same state directory, then read what it kept.
    let again = start(&topo, &config, &dir);
    assert!(again.terminate().success());
    let conn = db(&dir.join(tpacct::store::FILE));
    let (rows, ids): (u64, u64) = conn
        .query_row("SELECT COUNT(*), COUNT(DISTINCT id) FROM flows", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("count");
    assert_eq!(rows, ids, "no flow twice");
    let mut stored: HashMap<u16, usize> = HashMap::new();
    for port in conn
        .prepare("SELECT source_port FROM flows WHERE destination_port = 7000")
        .expect("query")
        .query_map([], |r| r.get::<_, u16>(0))
        .expect("rows")
    {
        *stored.entry(port.expect("port")).or_default() += 1;
    }
    let mut clients: HashMap<u16, usize> = HashMap::new();
    for (port, _) in &ended {
        *clients.entry(*port).or_default() += 1;
    }
    let missing: Vec<u16> = due
        .iter()
        .copied()
        .filter(|p| stored.get(p).copied().unwrap_or(0) < 1)
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} flows closed ≥ 1 s before the kill are missing (e.g. port {:?})",
        missing.len(),
        due.len(),
        missing.first()
    );
    for (port, n) in &stored {
        assert!(
            *n <= clients.get(port).copied().unwrap_or(0) + 1,
            "port {port} stored {n} times"
        );
    }
}

fn a_full_disk_never_stops_the_relaying() -> Result<(), Skip> {
    let _turn = crate::common::serial();
    let topo = Topology::new();
    short_server(&topo, 7000);
    let dir = history_dir("history_full");
    let full = dir.join("tiny");
    std::fs::create_dir_all(&full).expect("dir");
    // A filesystem with room for the empty database and little else.
    let mounted = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=96k",
            "tpacct-test",
            full.to_str().expect("utf-8"),
        ])
        .status()
        .expect("mount");
    if !mounted.success() {
        return Err(Skip("cannot mount a tmpfs".into()));
    }
    let unmount = scopeguard(&full);
    let config = config_file(
        &dir,
        &format!("storage:\n  path: {}\n", full.join("flows.db").display()),
    );
    let daemon = start(&topo, &config, &dir);
    let target = socket(SERVER4, 7000);
    let served = spawn_in(&topo.client, move || {
        let mut served = 0;
        for _ in 0..2000 {
            let mut c = TcpStream::connect(target).expect("connect through the gateway");
            let mut buf = [0u8; 1];
            c.read_exact(&mut buf).expect("the server's byte");
            served += 1;
        }
        served
    })
    .join()
    .expect("client");
    assert_eq!(served, 2000, "every flow relayed");
    wait_for("a store error counted on the full disk", 20, || {
        metric(&topo, "tpacct_store_errors_total") >= 1.0
    });
    // Room again: every flow that waited is written, none lost.
    let grown = Command::new("mount")
        .args(["-o", "remount,size=16m", full.to_str().expect("utf-8")])
        .status()
        .expect("remount");
    assert!(grown.success(), "grow the tmpfs");
    wait_for("the waiting flows written", 20, || {
        metric(&topo, "tpacct_store_flows_written_total") >= 2000.0
    });
    assert!(daemon.terminate().success(), "a clean exit");
    let stored: u64 = db(&full.join("flows.db"))
        .query_row("SELECT COUNT(*) FROM flows", [], |r| r.get(0))
        .expect("count");
    assert_eq!(stored, 2000, "every flow kept once");
    drop(unmount);
    Ok(())
}

/// Unmounts `dir` when dropped.
fn scopeguard(dir: &Path) -> impl Drop + '_ {
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    Unmount(dir)
}

crate::tests![
    root known_transfers_are_kept_exactly,
    root a_sigkill_loses_no_flow_closed_a_second_before,
    root a_full_disk_never_stops_the_relaying,
    root stats_are_exact_up_to_now_and_refuse_bad_queries,
];

/// GET `path` on the gateway's controller: status and JSON body.
fn api(topo: &Topology, path: &str) -> (u16, serde_json::Value) {
    crate::common::topo::http(topo, "GET", path)
}

fn stats_are_exact_up_to_now_and_refuse_bad_queries() {
    with_gateway(
        "history_stats",
        AccountingMode::Ebpf,
        |_| {},
        |topo, gw| {
            identify_server(&topo.server, socket(SERVER4, 80));
            identify_server(&topo.server, socket(SERVER6, 80));
            // Two closed flows, to each address family, of known sizes.
            let (_, up4, down4) = fetch(&topo.client, socket(SERVER4, 80), "four", 7_000);
            let (_, up6, down6) = fetch(&topo.client, socket(SERVER6, 80), "six", 70_000);
            // A live one: half a request, which the server waits on.
            const HALF: &[u8] = b"GET /1 HTTP/1.1\r\nHost: held\r\n";
            let held = Topology::run_in(&topo.client, || {
                let mut c = TcpStream::connect(socket(SERVER4, 80)).expect("connect");
                c.write_all(HALF).expect("write");
                c
            });
            let live_up = HALF.len() as u64;
            // One reading of the live flows: the last fetch's flow may still be closing while the
            // held one registers, so a count and a list read apart can disagree.
            gw.wait_until(10, "two closed, one live at its bytes", |r| {
                matches!(&r.live()[..], [only] if only.traffic.upload == live_up)
                    && r.closed(10).len() == 2
            });
            let (status, body) = api(topo, "/api/v1/stats?type=summary");
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["status"], "success");
            let total_up = up4 + up6 + live_up;
            let total_down = down4 + down6;
            assert_eq!(
                body["data"],
                serde_json::json!({
                    "count": 3, "upload": total_up, "download": total_down,
                    "total": total_up + total_down
                })
            );
            let (_, body) = api(
                topo,
                "/api/v1/stats?type=group&group_by=destination&sort_by=count",
            );
            assert_eq!(
                body["data"],
                serde_json::json!([
                    { "destination": SERVER4, "count": 2, "upload": up4 + live_up,
                      "download": down4, "total": up4 + live_up + down4 },
                    { "destination": SERVER6, "count": 1, "upload": up6,
                      "download": down6, "total": up6 + down6 },
                ])
            );
            let (_, body) = api(topo, "/api/v1/stats?type=group&group_by=host&limit=1");
            assert_eq!(body["data"][0]["host"], "six", "the biggest host first");
            let (_, body) = api(
                topo,
                "/api/v1/stats?type=timeseries&interval=minute&metric=download",
            );
            let series: u64 = body["data"]
                .as_array()
                .expect("points")
                .iter()
                .map(|p| p["value"].as_u64().expect("value"))
                .sum();
            assert_eq!(series, total_down);
            let (_, body) = api(
                topo,
                &format!(
                    "/api/v1/stats?type=summary&source={}&network=TCP",
                    crate::common::topo::CLIENT4
                ),
            );
            assert_eq!(body["data"]["count"], 2);
            let (_, body) = api(topo, "/api/v1/stats?type=summary&to=2000-01-01T00:00:00Z");
            assert_eq!(body["data"]["count"], 0, "nothing ended before 2000");
            // Closed flows page by page, the newest first; the live one is not closed.
            let (status, page) = api(topo, "/api/v1/connections?limit=1");
            assert_eq!(status, 200, "{page}");
            let first = &page["data"]["connections"][0];
            assert_eq!(first["destination_ip"], SERVER6);
            assert_eq!(
                (first["upload"].as_u64(), first["download"].as_u64()),
                (Some(up6), Some(down6))
            );
            assert_eq!(first["chains"], serde_json::json!(["DIRECT"]));
            let cursor = page["data"]["next_cursor"].as_str().expect("more");
            let (_, page) = api(
                topo,
                &format!("/api/v1/connections?limit=1&cursor={cursor}"),
            );
            assert_eq!(page["data"]["connections"][0]["destination_ip"], SERVER4);
            assert_eq!(page["data"]["connections"][0]["sniff_host"], "four");
            assert!(
                page["data"]["next_cursor"].is_null(),
                "two closed flows in all"
            );
            let (_, page) = api(topo, &format!("/api/v1/connections?destination={SERVER4}"));
            assert_eq!(
                page["data"]["connections"].as_array().map(Vec::len),
                Some(1)
            );
            for bad in ["cursor=nonsense", "limit=0", "limit=1001", "type=summary"] {
                let (status, body) = api(topo, &format!("/api/v1/connections?{bad}"));
                assert_eq!(status, 400, "{bad}: {body}");
                assert_eq!(body["status"], "error", "{bad}");
            }
            for bad in [
                "type=bogus",
                "type=group",
                "type=group&group_by=colour",
                "type=timeseries&interval=fortnight",
                "type=summary&from=yesterday",
                "type=summary&from=2030-01-01T00:00:00Z&to=2020-01-01T00:00:00Z",
                "type=group&group_by=rule&limit=0",
                "type=group&group_by=rule&sort_order=sideways",
                "type=summary&colour=red",
            ] {
                let (status, body) = api(topo, &format!("/api/v1/stats?{bad}"));
                assert_eq!(status, 400, "{bad}: {body}");
                assert_eq!(body["status"], "error", "{bad}");
                assert!(
                    body["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "{bad}"
                );
                assert!(body["data"].is_null(), "{bad}");
            }
            drop(held);
        },
    );
}
