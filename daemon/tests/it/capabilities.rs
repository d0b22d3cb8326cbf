//! The least privilege the systemd unit grants is enough: `tpacctd` run as `nobody` with only
//! CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF and CAP_PERFMON (ambient, bounding set the same) — in a
//! cgroup delegated to it, as `Delegate=yes` does — loads and attaches its eBPF programs,
//! installs its firewall, accepts through TPROXY and counts a transfer exactly; and it holds
//! exactly those capabilities while it runs.

use std::{os::unix::fs::PermissionsExt, process::Command};

use crate::{
    common::{
        daemon::{BIN, Daemon},
        harness::Skip,
        topo::{SERVER4, Topology, socket},
        upstreams::{fetch, identify_server},
    },
    metrics::{parsed, scrape, sum},
};

const NOBODY: u32 = 65534;
const CAPS: &str = "-all,+net_admin,+net_raw,+bpf,+perfmon";
/// CAP_NET_RAW (13), CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
const CAP_BITS: u64 = (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39);

fn chown_nobody(path: &std::path::Path) {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(NOBODY)),
        Some(nix::unistd::Gid::from_raw(NOBODY)),
    )
    .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

/// A status field of process `pid`.
fn status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

fn only_the_units_capabilities_suffice() -> Result<(), Skip> {
    let _turn = crate::common::serial();
    let topo = Topology::new();
    identify_server(&topo.server, socket(SERVER4, 80));
    // What systemd does for the unit: a cgroup of its own, delegated to the service's user
    // (the directory and the files a delegate writes), and state only it can read.
    let cgroup = crate::common::test_cgroup("caps");
    std::fs::create_dir_all(&cgroup).expect("cgroup");
    for file in [
        "",
        "cgroup.procs",
        "cgroup.threads",
        "cgroup.subtree_control",
    ] {
        chown_nobody(&cgroup.join(file));
    }
    let dir = crate::common::api::state_dir("caps");
    std::fs::create_dir_all(&dir).expect("state dir");
    chown_nobody(&dir);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("mode");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "tproxy-port: 7893\nrouting-mark: 6666\nsecret: ''\naccounting: ebpf\n\
         find-process-mode: always\ntproxy-firewall:\n  interfaces: [g1]\n",
    )
    .expect("config");
    chown_nobody(&config);
    // Started in its cgroup (as systemd starts a unit's process), in the gateway's network
    // namespace (nsenter leaves /sys alone, as a unit's process sees it), then as nobody with
    // exactly the unit's capabilities.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo $$ > \"$0\" && exec \"$@\""])
        .arg(cgroup.join("cgroup.procs"))
        .args([
            "nsenter",
            &format!("--net=/run/netns/{}", topo.gateway.name),
        ])
        .args([
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
        ])
        .args([
            &format!("--inh-caps={CAPS}"),
            &format!("--ambient-caps={CAPS}"),
            &format!("--bounding-set={CAPS}"),
            "--no-new-privs",
        ])
        .args([BIN, "run", "--config"])
        .arg(&config)
        .arg("-d")
        .arg(&dir);
    let daemon = Daemon::from_command(cmd);
    let accounting = daemon.wait_for("accounting:");
    assert!(
        accounting.contains("accounting: ebpf"),
        "eBPF with the unit's capabilities: {accounting}"
    );
    daemon.wait_for("Clash API on");
    // The firewall comes last: then everything is in place.
    daemon.wait_for("tproxy-firewall: table inet tpacct installed");
    let pid = daemon.pid();
    assert_eq!(status(pid, "Uid:").split_whitespace().next(), Some("65534"));
    let effective = u64::from_str_radix(&status(pid, "CapEff:"), 16).expect("CapEff");
    assert_eq!(effective, CAP_BITS, "exactly the unit's capabilities");

    // The firewall is in place and TPROXY with eBPF accounting counts exactly.

    let (_, up, down) = fetch(&topo.client, socket(SERVER4, 80), "caps", 200_000);
    let samples = parsed(&scrape(&topo, "http://127.0.0.1:9090/metrics"));
    let total = |direction| sum(&samples, "tpacct_bytes_total", &[("direction", direction)]);
    assert_eq!(
        (total("upload") as u64, total("download") as u64),
        (up, down)
    );
    assert_eq!(
        sum(&samples, "tpacct_accounting_info", &[("mode", "ebpf")]),
        1.0
    );
    assert_eq!(
        sum(&samples, "tpacct_kernel_tcp_map_full_total", &[]),
        0.0,
        "counted in the kernel"
    );
    // And it removes its firewall on the way out, with the same capabilities.
    assert!(daemon.terminate().success(), "a clean exit");
    let left = Command::new("ip")
        .args(["netns", "exec", &topo.gateway.name, "nft", "list", "tables"])
        .output()
        .expect("nft");
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains("tpacct"),
        "the firewall is gone"
    );
    let _ = std::fs::remove_dir(&cgroup);
    Ok(())
}

crate::tests![root only_the_units_capabilities_suffice];
