//! Local processes named and routed. Clients on the gateway itself — curl as root and as
//! `nobody`, Python, over IPv4 and IPv6 — go through the mixed port; their flows carry
//! `process`, `processPath` and `uid` from the eBPF connect-time records, or, under user-space
//! accounting, from sock_diag and `/proc`; PROCESS-NAME, PROCESS-PATH and UID rules decide their
//! routes. `find-process-mode: off` finds nothing; `always` finds without process rules.

use std::process::Command;

use tpacct::config::{AccountingMode, Config, FindProcessMode};

use crate::{
    common::{
        topo::{Gateway, SERVER4, Topology, socket, with_gateway},
        upstreams::identify_server,
    },
    metrics::{parsed, scrape, sum},
};

const NOBODY: u32 = 65534;

fn python() -> String {
    std::fs::canonicalize("/usr/bin/python3")
        .expect("Debian's python3")
        .to_string_lossy()
        .into_owned()
}

fn setup(c: &mut Config, mode: FindProcessMode, rules: &[String]) {
    c.mixed_port = 7890;
    c.find_process_mode = mode;
    c.rules = rules.to_vec();
}

fn routed_rules() -> Vec<String> {
    vec![
        format!("UID,{NOBODY},REJECT"),
        "PROCESS-NAME,curl,DIRECT".into(),
        format!("PROCESS-PATH,{},DIRECT", python()),
        "MATCH,REJECT".into(),
    ]
}

/// Runs `args` in the gateway namespace, optionally as `uid`; success and stdout.
fn on_gateway(topo: &Topology, uid: Option<u32>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.gateway.name]);
    if let Some(uid) = uid {
        let id = uid.to_string();
        cmd.args(["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"]);
    }
    let out = cmd.args(args).output().expect("run on the gateway");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn curl(topo: &Topology, uid: Option<u32>, proxy: &str) -> (bool, String) {
    let url = format!("http://{SERVER4}/100");
    on_gateway(
        topo,
        uid,
        &["curl", "-sf", "-m", "10", "--proxy", proxy, &url],
    )
}

fn python_get(topo: &Topology) -> (bool, String) {
    let script = format!(
        "import urllib.request as u\n\
         o = u.build_opener(u.ProxyHandler({{'http': 'http://127.0.0.1:7890'}}))\n\
         print(len(o.open('http://{SERVER4}/100', timeout=10).read()))"
    );
    on_gateway(topo, None, &[&python(), "-c", &script])
}

/// The newest closed flow, once `n` flows have closed since `before`.
fn last_flow(gw: &Gateway, before: u64, n: u64) -> tpacct::flow::ClosedFlow {
    gw.wait_until(10, "the flow to close", |r| {
        r.opened().0 >= before + n && r.live_count() == 0
    });
    gw.registry.closed(1).remove(0)
}

fn owner(flow: &tpacct::flow::ClosedFlow) -> (u32, String, String) {
    let o = flow
        .owner
        .as_ref()
        .unwrap_or_else(|| panic!("no process for {:?}", flow.meta.source));
    (o.uid, o.name.to_string(), o.path.to_string())
}

/// `tpacct_process_lookups_total` by `how`.
fn lookups(topo: &Topology) -> [u64; 4] {
    let samples = parsed(&scrape(topo, "http://127.0.0.1:9090/metrics"));
    ["kernel", "sock_diag", "proc_scan", "missed"]
        .map(|how| sum(&samples, "tpacct_process_lookups_total", &[("how", how)]) as u64)
}

fn named_and_routed(mode: AccountingMode, test: &str) {
    with_gateway(
        test,
        mode,
        |c| setup(c, FindProcessMode::Strict, &routed_rules()),
        |topo, gw| {
            identify_server(&topo.server, socket(SERVER4, 80));
            for proxy in ["http://127.0.0.1:7890", "http://[::1]:7890"] {
                let before = gw.registry.opened().0;
                let (ok, body) = curl(topo, None, proxy);
                assert!(ok && body.len() == 100, "curl as root via {proxy}: {body}");
                let flow = last_flow(gw, before, 1);
                assert_eq!(owner(&flow), (0, "curl".into(), "/usr/bin/curl".into()));
                assert_eq!(flow.route.rule, "ProcessName");
            }

            let before = gw.registry.opened().0;
            let (ok, _) = curl(topo, Some(NOBODY), "http://127.0.0.1:7890");
            assert!(!ok, "nobody's curl is rejected by the UID rule");
            let flow = last_flow(gw, before, 1);
            assert_eq!(flow.route.rule, "Uid");
            assert_eq!(
                owner(&flow),
                (NOBODY, "curl".into(), "/usr/bin/curl".into())
            );

            let before = gw.registry.opened().0;
            let (ok, body) = python_get(topo);
            assert!(ok && body.trim() == "100", "python: {body}");
            let flow = last_flow(gw, before, 1);
            assert_eq!(flow.route.rule, "ProcessPath");
            let path = python();
            let name = path.rsplit('/').next().unwrap_or_default().to_owned();
            assert_eq!(owner(&flow), (0, name, path));
            // Four flows, each found the one way this mode has: the connect-time record by
            // 4-tuple in the kernel, else a walk of /proc for the socket sock_diag named.
            let [kernel, diag, scan, missed] = lookups(topo);
            match mode {
                AccountingMode::Userspace => assert_eq!((kernel, diag, scan, missed), (0, 0, 4, 0)),
                _ => assert_eq!((kernel, diag, scan, missed), (4, 0, 0, 0)),
            }
        },
    );
}

fn local_processes_are_named_and_routed_by_ebpf() {
    named_and_routed(AccountingMode::Ebpf, "process_ebpf");
}

fn local_processes_are_named_and_routed_without_ebpf() {
    named_and_routed(AccountingMode::Userspace, "process_userspace");
}

fn off_finds_nothing_and_always_finds_without_process_rules() {
    for (mode, found) in [
        (FindProcessMode::Off, false),
        (FindProcessMode::Always, true),
    ] {
        with_gateway(
            "process_modes",
            AccountingMode::Ebpf,
            |c| setup(c, mode, &["MATCH,DIRECT".into()]),
            |topo, gw| {
                identify_server(&topo.server, socket(SERVER4, 80));
                let before = gw.registry.opened().0;
                let (ok, _) = curl(topo, None, "http://127.0.0.1:7890");
                assert!(ok);
                let flow = last_flow(gw, before, 1);
                assert_eq!(flow.owner.is_some(), found, "{mode:?}");
            },
        );
    }
}

crate::tests![
    root local_processes_are_named_and_routed_by_ebpf,
    root local_processes_are_named_and_routed_without_ebpf,
    root off_finds_nothing_and_always_finds_without_process_rules,
];
