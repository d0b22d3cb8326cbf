//! Running commands: echoed before they run, failures turned into errors naming the command.

use std::{os::unix::process::CommandExt, process::Command};

use anyhow::{Context, Result, bail};

/// Runs `program args…`, inheriting stdio; fails if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    status(cmd)
}

/// Runs `program args…` without echoing it; fails (with its stderr) if it exits non-zero.
pub fn run_quiet(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot start {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
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

/// Test counts summed over every `test result:` line cargo prints.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Tally {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs `program args…` like [`run`], passing its stdout through while tallying test results.
pub fn run_tallied(program: &str, args: &[&str]) -> Result<Tally> {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(program);
    cmd.args(args).stdout(std::process::Stdio::piped());
    let shown = show(&cmd);
    eprintln!("xtask: {shown}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {shown}"))?;
    let mut tally = Tally::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            println!("{line}");
            tally.add_line(&line);
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "{shown} failed: {status} ({} passed, {} failed)",
            tally.passed,
            tally.failed
        );
    }
    Ok(tally)
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

#[cfg(test)]
mod tests {
    use super::Tally;

    #[test]
    fn sums_cargo_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 21 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out");
        t.add_line("test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured");
        t.add_line("running 4 tests");
        assert_eq!((t.passed, t.failed, t.ignored), (24, 1, 2));
    }
}
