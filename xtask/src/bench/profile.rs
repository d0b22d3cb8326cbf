//! `cargo xtask bench --profile`: `perf record` on the gateway's tpacctd during a workload,
//! and the top symbols (where its CPU went, kernel and user) for the report.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result, bail};

/// The workloads profiled: one stream, churn, and `GET /connections` at the large scale.
pub(super) const WORKLOADS: [&str; 3] = ["single-stream", "churn", "connections"];

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
    let child = Command::new("perf")
        .args(["record", "-q", "-F", "999", "-p", &pid.to_string(), "-o"])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("perf record (Debian: linux-perf)")?;
    // perf attaches within a few milliseconds; give it a moment before the workload starts.
    std::thread::sleep(std::time::Duration::from_millis(300));
    Ok(Recording {
        child,
        data,
        workload,
    })
}

impl Recording {
    /// Stops sampling and writes the top symbols to `profile-WORKLOAD.md` beside the data.
    pub(super) fn stop(mut self) -> Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .context("stopping perf")?;
        self.child.wait()?;
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
