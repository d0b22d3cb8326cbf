//! Running commands: echoed before they run, failures turned into errors naming the command.

use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result, bail};

/// Runs `program args…`, inheriting stdio; fails if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    status(cmd)
}

/// Runs a prepared command, inheriting stdio; fails if it exits non-zero.
pub fn status(mut cmd: Command) -> Result<()> {
    let shown = show(&cmd);
    eprintln!("xtask: {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Runs `program args…` quietly and returns its stdout, or None if it cannot run or fails.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replaces this process with `cmd` (so signals reach it directly).
pub fn exec(mut cmd: Command) -> Result<()> {
    let shown = show(&cmd);
    eprintln!("xtask: {shown}");
    Err(cmd.exec()).with_context(|| format!("cannot start {shown}"))
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}
