//! Routing changes without dropping anything: a group choice survives a restart; a reload
//! (`PUT /configs`) swaps the rules while a long transfer keeps going with exact totals; a bad
//! config is refused naming its key and the old one keeps running; SIGHUP reloads the file.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    time::Duration,
};

use tpacct::config::AccountingMode;

use crate::common::{
    daemon::Daemon,
    topo::{
        Gateway, SERVER4, Topology, gateway_config, http_with, read_all, routing_from_yaml, socket,
        spawn_in, with_gateway,
    },
    upstreams::{self, DANTE_OUT, MICROSOCKS_OUT, fetch, identify_server},
};

const YAML: &str = r#"
proxies:
  - {name: dante, type: socks5, server: 10.91.2.10, port: 1080}
  - {name: micro, type: socks5, server: 10.91.2.10, port: 1081, username: tp, password: s3cret}
proxy-groups:
  - {name: Inner, type: select, proxies: [dante, micro]}
rules:
  - DST-PORT,6100,Inner
  - MATCH,DIRECT
"#;

fn a_group_choice_survives_a_restart() {
    let _turn = crate::common::serial();
    let topo = Topology::new();
    let mut config = gateway_config(AccountingMode::Ebpf, crate::common::test_cgroup("keep"));
    routing_from_yaml(&mut config, YAML);
    let _procs = upstreams::start(&topo.server);
    identify_server(&topo.server, socket(SERVER4, 6100));
    let gw = Gateway::start(&topo, config.clone());
    assert_eq!(
        fetch(&topo.client, socket(SERVER4, 6100), "x", 1)
            .0
            .to_string(),
        DANTE_OUT
    );
    let (status, _) = http_with(&topo, "PUT", "/proxies/Inner", r#"{"name":"micro"}"#);
    assert_eq!(status, 204);
    gw.stop();
    let gw = Gateway::start(&topo, config);
    assert_eq!(
        fetch(&topo.client, socket(SERVER4, 6100), "x", 1)
            .0
            .to_string(),
        MICROSOCKS_OUT,
        "the choice was kept in the state directory"
    );
    gw.stop();
}

fn reload_swaps_rules_while_a_transfer_keeps_going() {
    with_gateway(
        "reload",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, YAML),
        |topo, gw| {
            let _procs = upstreams::start(&topo.server);
            identify_server(&topo.server, socket(SERVER4, 6200));
            // A transfer paced over two seconds through DIRECT.
            let total: u64 = 20 << 20;
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let server = spawn_in(&topo.server, move || {
                let listener = TcpListener::bind(socket(SERVER4, 6300)).expect("bind");
                ready_tx.send(()).expect("ready");
                let (mut conn, _) = listener.accept().expect("accept");
                read_all(&mut conn).0
            });
            ready_rx.recv().expect("server");
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let client = spawn_in(&topo.client, move || {
                let mut conn = TcpStream::connect(socket(SERVER4, 6300)).expect("connect");
                let chunk = vec![7u8; 1 << 20];
                for i in 0..20 {
                    conn.write_all(&chunk).expect("write");
                    if i == 2 {
                        started_tx.send(()).expect("started");
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                conn.shutdown(Shutdown::Write).expect("shutdown");
                let _ = conn.read(&mut [0u8; 1]);
            });
            started_rx.recv().expect("transfer under way");

            // A bad config is refused naming its key; the old rules stay.
            let bad = serde_json::json!({ "payload": "rules:\n  - BOGUS,x,DIRECT\n" }).to_string();
            let (status, body) = http_with(topo, "PUT", "/configs", &bad);
            assert_eq!(status, 400);
            assert!(
                body["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("rules[0]")),
                "{body}"
            );
            assert_eq!(
                fetch(&topo.client, socket(SERVER4, 6200), "x", 1)
                    .0
                    .to_string(),
                "10.91.2.1"
            );

            // A good one takes over at once for new flows.
            let next = YAML.replace("MATCH,DIRECT", "MATCH,dante");
            let good = serde_json::json!({ "payload": next }).to_string();
            let (status, body) = http_with(topo, "PUT", "/configs?force=true", &good);
            assert_eq!(status, 204, "{body}");
            assert_eq!(
                fetch(&topo.client, socket(SERVER4, 6200), "x", 1)
                    .0
                    .to_string(),
                DANTE_OUT
            );

            client.join().expect("client");
            assert_eq!(server.join().expect("server"), total, "every byte arrived");
            gw.wait_until(10, "the transfer to close", |r| r.live_count() == 0);
            let transfer = gw
                .registry
                .closed(usize::MAX)
                .into_iter()
                .find(|c| c.meta.destination_port == 6300)
                .expect("the transfer");
            assert_eq!(transfer.traffic.upload, total, "exact across the reload");
            assert_eq!(transfer.route.chains, ["DIRECT"], "it kept its route");
        },
    );
}

fn sighup_reloads_the_file_and_keeps_the_old_on_error() {
    let _turn = crate::common::serial();
    let path = crate::common::scratch::path("hup.yaml");
    let base = "accounting: userspace\ntproxy-port: 0\nexternal-controller: ''\n";
    std::fs::write(&path, format!("{base}rules:\n  - MATCH,DIRECT\n")).expect("write");
    let daemon = Daemon::start(None, &["run", "--config", path.to_str().expect("utf-8")]);
    daemon.wait_for("ready");
    std::fs::write(&path, format!("{base}rules:\n  - NOPE,x,DIRECT\n")).expect("write");
    daemon.hangup();
    let line = daemon.wait_for("reload refused");
    assert!(line.contains("rules[0]"), "{line}");
    std::fs::write(
        &path,
        format!("{base}rules:\n  - DST-PORT,1,REJECT\n  - MATCH,DIRECT\n"),
    )
    .expect("write");
    daemon.hangup();
    daemon.wait_for("reload: 2 rules");
    assert!(daemon.terminate().success());
    let _ = std::fs::remove_file(path);
}

crate::tests![
    root a_group_choice_survives_a_restart,
    root reload_swaps_rules_while_a_transfer_keeps_going,
    any sighup_reloads_the_file_and_keeps_the_old_on_error,
];
