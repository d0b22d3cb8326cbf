//! The managed firewall with the real binary in the gateway namespace: rules present (and
//! traffic captured) while running, gone after SIGTERM; after SIGKILL they stay, and the next
//! start cleans them and installs exactly one set. The fast path's programs go with the
//! process, even on SIGKILL, and come back once with the next start.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::Command,
};

use crate::common::{
    daemon::Daemon,
    topo::{SERVER4, Topology, socket, spawn_in},
};

fn config_file(tag: &str) -> std::path::PathBuf {
    crate::common::scratch::file(
        &format!("fw-{tag}.yaml"),
        "tproxy-port: 7893\nrouting-mark: 6666\ntproxy-firewall:\n  interfaces: [g1]\n",
    )
}

/// (nft table present, IPv4 rules, IPv6 rules, local routes in table 100)
fn installed(ns: &str) -> (bool, usize, usize, usize) {
    let table = Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "list", "table", "inet", "tpacct",
        ])
        .output()
        .expect("nft")
        .status
        .success();
    let count = |args: &[&str], needle: &str| {
        let out = Command::new("ip").args(args).output().expect("ip");
        String::from_utf8_lossy(&out.stdout).matches(needle).count()
    };
    (
        table,
        count(&["-n", ns, "-4", "rule", "show"], "lookup 100"),
        count(&["-n", ns, "-6", "rule", "show"], "lookup 100"),
        count(
            &["-n", ns, "-4", "route", "show", "table", "100"],
            "local default",
        ),
    )
}

/// One echo through the gateway proves the rules capture traffic.
fn echo_through(topo: &Topology) {
    echo_from(topo, "10.91.2.1", "the connection was relayed by tpacct");
}

/// One echo through the gateway; the server saw it come from `peer_ip`.
fn echo_from(topo: &Topology, peer_ip: &str, why: &str) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, 7000)).expect("bind");
        ready_tx.send(()).expect("ready");
        let (mut conn, peer) = listener.accept().expect("accept");
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).expect("read");
        conn.write_all(&buf).expect("echo");
        peer
    });
    ready_rx.recv().expect("server ready");
    Topology::run_in(&topo.client, || {
        let mut conn = TcpStream::connect(socket(SERVER4, 7000)).expect("connect");
        conn.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).expect("echo");
        assert_eq!(&buf, b"ping");
    });
    let peer = server.join().expect("server");
    assert_eq!(peer.ip().to_string(), peer_ip, "{why}");
}

/// The fast path's tc programs attached to `dev` in `ns` (ingress, egress).
fn tc_programs(topo: &Topology, dev: &'static str) -> (usize, usize) {
    Topology::run_in(&topo.gateway, move || {
        let count = |t| {
            aya::programs::SchedClassifier::query_tcx(dev, t)
                .map(|(_, programs)| programs.len())
                .unwrap_or(0)
        };
        (
            count(aya::programs::TcAttachType::Ingress),
            count(aya::programs::TcAttachType::Egress),
        )
    })
}

fn the_fast_path_follows_the_daemon_through_sigkill() {
    let _turn = crate::common::serial();
    let topo = Topology::new();
    let gw = topo.gateway.name.clone();
    let config = crate::common::scratch::file(
        "fw-fast.yaml",
        "tproxy-port: 7893\nrouting-mark: 6666\ntproxy-firewall:\n  interfaces: [g1]\n\
         fast-path:\n  enable: true\n  interfaces: [g1]\n",
    );
    let args = ["run", "--config", config.to_str().expect("utf-8")];
    let forwarded = "forwarded by the kernel: the server sees the client";

    let daemon = Daemon::start(Some(&gw), &args);
    daemon.wait_for("ready");
    assert_eq!(tc_programs(&topo, "g1"), (1, 1));
    echo_from(&topo, "10.91.1.2", forwarded);
    daemon.kill();
    assert_eq!(
        tc_programs(&topo, "g1"),
        (0, 0),
        "TCX links die with the process"
    );
    assert!(
        installed(&gw).0,
        "the nftables table stays until the next start"
    );

    let daemon = Daemon::start(Some(&gw), &args);
    daemon.wait_for("ready");
    assert_eq!(tc_programs(&topo, "g1"), (1, 1), "attached once again");
    echo_from(&topo, "10.91.1.2", forwarded);
    assert!(daemon.terminate().success());
    assert_eq!(tc_programs(&topo, "g1"), (0, 0));
    assert_eq!(installed(&gw), (false, 0, 0, 0));
}

/// The daemon's accounting cgroup, seen from here: under `ip netns exec` it names it by its
/// own private cgroup2 mount, the same hierarchy as ours.
fn cgroup_of(line: &str) -> std::path::PathBuf {
    let path = line
        .split_once("(cgroup ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("expected eBPF accounting: {line}"));
    let name = path.rsplit('/').next().expect("cgroup name");
    tpacct::cgroup::v2_mount().expect("cgroup2").join(name)
}

fn rules_follow_the_daemon_through_sigterm_and_sigkill() {
    let _turn = crate::common::serial();
    let topo = Topology::new();
    let gw = topo.gateway.name.clone();
    let config = config_file("cycle");
    let args = ["run", "--config", config.to_str().expect("utf-8")];
    let none = (false, 0, 0, 0);
    let once = (true, 1, 1, 1);

    let daemon = Daemon::start(Some(&gw), &args);
    daemon.wait_for("ready");
    assert_eq!(installed(&gw), once);
    echo_through(&topo);
    assert!(daemon.terminate().success());
    assert_eq!(installed(&gw), none, "SIGTERM removes everything");

    let daemon = Daemon::start(Some(&gw), &args);
    let killed_cgroup = cgroup_of(&daemon.wait_for("accounting:"));
    daemon.wait_for("ready");
    daemon.kill();
    assert_eq!(installed(&gw), once, "SIGKILL leaves the rules behind");
    assert!(killed_cgroup.is_dir(), "and its cgroup");

    let daemon = Daemon::start(Some(&gw), &args);
    daemon.wait_for("ready");
    assert_eq!(
        installed(&gw),
        once,
        "a restart cleans and reinstalls exactly once"
    );
    assert!(
        !killed_cgroup.exists(),
        "the killed daemon's cgroup was removed"
    );
    echo_through(&topo);
    assert!(daemon.terminate().success());
    assert_eq!(installed(&gw), none);
}

crate::tests![
    root rules_follow_the_daemon_through_sigterm_and_sigkill,
    root the_fast_path_follows_the_daemon_through_sigkill,
];
