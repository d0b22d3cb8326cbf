//! The `tpacctd` binary: `--version`, `check` (exit 64 naming the key and line), and `run`
//! reporting its accounting mode and cleaning up its cgroup on SIGTERM.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use crate::common::daemon::Daemon;

use crate::common::daemon::BIN;

fn config_file(name: &str, text: &str) -> PathBuf {
    crate::common::scratch::file(&format!("cli-{name}.yaml"), text)
}

fn tpacctd(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run tpacctd")
}

fn version() {
    let out = tpacctd(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tpacctd {}", env!("CARGO_PKG_VERSION"))
    );
}

fn check_accepts_a_valid_config() {
    let path = config_file("ok", "log-level: warning\naccounting: auto\n");
    let out = tpacctd(&["check", "--config", path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{out:?}");
}

fn check_rejects_broken_configs_with_64_naming_the_key() {
    for (name, text, key, line) in [
        (
            "unknown",
            "log-level: info\nlog-levle: debug\n",
            "log-levle",
            2,
        ),
        (
            "value",
            "log-level: info\n\naccounting: kernel\n",
            "accounting",
            3,
        ),
        ("level", "log-level: loud\n", "log-level", 1),
    ] {
        let path = config_file(name, text);
        let out = tpacctd(&["check", "--config", path.to_str().expect("utf-8")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(&format!("key `{key}`")), "{name}: {stderr}");
        assert!(stderr.contains(&format!("line {line}")), "{name}: {stderr}");
    }
}

fn run_with_a_missing_config_exits_64() {
    let out = tpacctd(&["run", "--config", "/nonexistent/tpacct.yaml"]);
    assert_eq!(out.status.code(), Some(64));
}

fn run_uses_ebpf_and_removes_its_cgroup_on_sigterm() {
    // Both `run` tests use this namespace's default ports: one at a time.
    let _turn = crate::common::serial();
    let daemon = Daemon::start(None, &["run"]);
    let line = daemon.wait_for("accounting:");
    let cgroup = line
        .split_once("accounting: ebpf (cgroup ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("expected eBPF accounting, got: {line}"));
    let cgroup = PathBuf::from(cgroup);
    assert!(
        cgroup.is_dir(),
        "{} should exist while running",
        cgroup.display()
    );
    daemon.wait_for("ready");
    let status = daemon.terminate();
    assert!(status.success(), "{status}");
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
}

fn run_counts_in_userspace_when_configured() {
    let _turn = crate::common::serial();
    let path = config_file("user", "accounting: userspace\n");
    let daemon = Daemon::start(None, &["run", "--config", path.to_str().expect("utf-8")]);
    let line = daemon.wait_for("accounting:");
    assert!(
        line.contains("accounting: userspace (configured)"),
        "{line}"
    );
    daemon.wait_for("ready");
    assert!(daemon.terminate().success());
}

crate::tests![
    any version,
    any check_accepts_a_valid_config,
    any check_rejects_broken_configs_with_64_naming_the_key,
    any run_with_a_missing_config_exits_64,
    root run_uses_ebpf_and_removes_its_cgroup_on_sigterm,
    root run_counts_in_userspace_when_configured,
];
