//! `cargo xtask bench --profile`: `perf record` on the gateway's tpacctd during a workload,
//! and the top symbols (where its CPU went, kernel and user) for the report; `strace -c`
//! during a short churn for the system calls each accepted connection costs.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The workloads profiled: one stream, churn, and `GET /connections` at the large scale; then
/// the system calls of a churn.
pub(super) const WORKLOADS: [&str; 4] = ["single-stream", "churn", "connections", "syscalls"];

/// Symbols listed per workload.
const TOP: usize = 15;

/// A `perf record` attached to a process.
pub(super) struct Recording {
    child: Child,
    data: PathBuf,
    workload: &'static str,
}

/// Starts sampling `pid` (all its threads, kernel and user) into `dir/profile-WORKLOAD.data`.
pub(super) fn start(pid: u32, dir: &Path, workload: &'static str) -> Result<Recording> {
    let data = dir.join(format!("profile-{workload}.data"));
    let pid = pid.to_string();
    let child = attach(
        "perf",
        &["record", "-q", "-F", "999", "-p", &pid],
        &data,
        "linux-perf",
    )?;
    Ok(Recording {
        child,
        data,
        workload,
    })
}

impl Recording {
    /// Stops sampling and writes the top symbols to `profile-WORKLOAD.md` beside the data.
    pub(super) fn stop(mut self) -> Result<()> {
        interrupt(&mut self.child).context("stopping perf")?;
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "dso,sym",
                "-i",
            ])
            .arg(&self.data)
            .output()
            .context("perf report")?;
        if !out.status.success() {
            bail!("perf report: {}", String::from_utf8_lossy(&out.stderr));
        }
        let rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(TOP)
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let share = words.first().copied().unwrap_or("");
                let dso = words.get(1).copied().unwrap_or("");
                // After the `[k]`/`[.]` marker: the symbol, which may contain spaces.
                let symbol = l
                    .split_once(" [k] ")
                    .or_else(|| l.split_once(" [.] "))
                    .map_or("", |(_, s)| s.trim())
                    .replace('|', "\\|");
                format!("| {share} | {dso} | `{symbol}` |")
            })
            .collect();
        let md = format!(
            "\n**{}**, tpacctd's own threads (kernel and user), top {TOP}:\n\n\
             | share | object | symbol |\n|---|---|---|\n{}\n",
            self.workload,
            rows.join("\n")
        );
        std::fs::write(self.data.with_extension("md"), md)?;
        Ok(())
    }
}

/// Starts `program args -o out` attached to a process, and gives it a moment to attach to
/// every thread before the workload starts.
fn attach(program: &str, args: &[&str], out: &Path, package: &str) -> Result<Child> {
    let child = Command::new(program)
        .args(args)
        .arg("-o")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{program} (Debian: {package})"))?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(child)
}

/// Stops a recorder the way its user would (Ctrl-C), so it writes what it has.
fn interrupt(child: &mut Child) -> Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    child.wait()?;
    Ok(())
}

/// Counts the system calls of every thread of `pid` while `work` runs (`strace -c -f`), and
/// writes them per accepted connection (`accept4` calls that succeeded) to
/// `profile-syscalls.md`.
pub(super) fn syscalls(pid: u32, dir: &Path, work: impl FnOnce() -> Result<()>) -> Result<()> {
    let data = dir.join("syscalls-churn.txt");
    let pid = pid.to_string();
    let mut child = attach("strace", &["-c", "-f", "-p", &pid], &data, "strace")?;
    let worked = work();
    interrupt(&mut child).context("stopping strace")?;
    worked?;
    let text = std::fs::read_to_string(&data).context("strace's summary")?;
    // `% time  seconds  usecs/call  calls  [errors]  syscall`, one row per system call.
    let rows: Vec<(String, f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let name = *w.last()?;
            let calls: f64 = w.get(3)?.parse().ok()?;
            let errors: f64 = if w.len() == 6 {
                w[4].parse().ok()?
            } else {
                0.0
            };
            (name != "total").then(|| (name.to_owned(), calls, errors))
        })
        .collect();
    // Accepted: the calls that did not fail (with nothing to accept: EAGAIN).
    let accepted = rows
        .iter()
        .find(|r| r.0 == "accept4")
        .map_or(0.0, |r| r.1 - r.2);
    if accepted == 0.0 {
        bail!("no accept4 in strace's summary of the churn");
    }
    let mut rows = rows;
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let table: Vec<String> = rows
        .iter()
        .take(TOP)
        .map(|(name, calls, errors)| {
            format!(
                "| `{name}` | {:.2} | {:.2} |",
                calls / accepted,
                errors / accepted
            )
        })
        .collect();
    let total: f64 = rows.iter().map(|r| r.1).sum();
    let md = format!(
        "\n**System calls per accepted connection** during a short churn (`strace -c -f` on \
         every thread of tpacctd, {accepted:.0} connections; tracing slows the churn, the counts \
         are what matter): {:.1} in all, top {TOP}:\n\n| call | per connection | failed \
         per connection |\n|---|---|---|\n{}\n",
        total / accepted,
        table.join("\n")
    );
    std::fs::write(dir.join("profile-syscalls.md"), md)?;
    Ok(())
}

/// The profiles written in this run, for the report.
pub(super) fn markdown(dir: &Path, workloads: &[&str]) -> String {
    let mut md = String::from(
        "\n### Where tpacctd's time goes (`--profile`, tpacctd with eBPF, last round)\n",
    );
    for w in workloads {
        if let Ok(text) = std::fs::read_to_string(dir.join(format!("profile-{w}.md"))) {
            md.push_str(&text);
        }
    }
    md
}
