//! The service unit and the notify protocol: `systemd-analyze verify` accepts the unit (with
//! its exposure score reported), and the real binary speaks to a real `NOTIFY_SOCKET`
//! datagram socket: `READY=1` only once its listeners answer, `STATUS=` with the flow count,
//! `WATCHDOG=1` at half `WATCHDOG_USEC`, `RELOADING=1`/`READY=1` around SIGHUP, `STOPPING=1`.

use std::{
    os::unix::net::UnixDatagram,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use crate::common::{daemon::Daemon, harness::Skip};

fn unit() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../systemd/tpacctd.service")
}

fn the_unit_verifies() -> Result<(), Skip> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err(Skip("no systemd-analyze".into()));
    }
    let dir = crate::common::api::state_dir("unit");
    std::fs::create_dir_all(&dir).expect("dir");
    // Verified as installed, with the binary where this build put it.
    let text = std::fs::read_to_string(unit())
        .expect("unit")
        .replace("/usr/local/bin/tpacctd", crate::common::daemon::BIN);
    let path = dir.join("tpacctd.service");
    std::fs::write(&path, text).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    let score = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("no score");
    eprintln!("{score}");
    Ok(())
}

/// The next datagram on `sock`, within `secs`.
fn next(sock: &UnixDatagram, secs: u64) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(secs)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notify datagram");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn the_notify_protocol_against_a_real_socket() {
    let _turn = crate::common::serial();
    let dir = crate::common::api::state_dir("notify");
    std::fs::create_dir_all(&dir).expect("dir");
    let socket_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&socket_path);
    let sock = UnixDatagram::bind(&socket_path).expect("bind NOTIFY_SOCKET");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "external-controller: 127.0.0.1:19391\nsecret: ''\n",
    )
    .expect("config");
    let daemon = Daemon::start_with_env(
        None,
        &["run", "--config", config.to_str().expect("utf-8")],
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8")),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = next(&sock, 20);
    assert!(ready.contains("READY=1"), "{ready}");
    assert!(ready.contains("STATUS=0 live flows"), "{ready}");
    // Ready means ready: the controller answers at once.
    std::net::TcpStream::connect("127.0.0.1:19391").expect("the controller is up at READY=1");
    let started = Instant::now();
    let mut pings = 0;
    while pings < 4 {
        if next(&sock, 2).contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    let took = started.elapsed();
    // Four pings at 200 ms: not faster than the interval asks, not much slower.
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "4 pings in {took:?}"
    );
    daemon.hangup();
    let mut seen = Vec::new();
    while !seen.iter().any(|d: &String| d.contains("READY=1")) {
        let d = next(&sock, 10);
        if !d.contains("WATCHDOG=1") {
            seen.push(d);
        }
    }
    assert!(seen[0].contains("RELOADING=1"), "{seen:?}");
    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    let mut last = String::new();
    while !last.contains("STOPPING=1") {
        last = next(&sock, 5);
    }
}

crate::tests![
    any the_unit_verifies,
    root the_notify_protocol_against_a_real_socket,
];
