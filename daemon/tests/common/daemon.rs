//! The real `tpacctd` binary as a child process, optionally inside a network namespace, with
//! its log lines on a channel.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    time::Duration,
};

use nix::{sys::signal, unistd::Pid};

pub const BIN: &str = env!("CARGO_BIN_EXE_tpacctd");

/// The state directory the daemons of this test process use.
pub fn state_dir() -> std::path::PathBuf {
    super::scratch::path("state")
}

/// A running daemon.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `tpacctd args…`, inside network namespace `netns` if given. `run` gets the test
    /// process's own state directory ([`state_dir`]) unless `-d` is given.
    pub fn start(netns: Option<&str>, args: &[&str]) -> Daemon {
        Daemon::start_with_env(netns, args, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(netns: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(None, netns, args, env)
    }

    /// [`Daemon::start`] with the process placed in a cgroup (its `cgroup.procs` file) before
    /// it runs a single instruction of ours.
    pub fn start_in_cgroup(procs: &std::path::Path, netns: Option<&str>, args: &[&str]) -> Daemon {
        Daemon::spawn(Some(procs), netns, args, &[])
    }

    fn spawn(
        procs: Option<&std::path::Path>,
        netns: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let state = state_dir();
        let mut args: Vec<&str> = args.to_vec();
        if args.first() == Some(&"run") && !args.contains(&"-d") {
            args.splice(1..1, ["-d", state.to_str().expect("utf-8 temp dir")]);
        }
        let mut cmd = match procs {
            // The shell moves itself, then becomes the daemon (`exec` keeps the pid).
            Some(procs) => {
                let mut c = Command::new("sh");
                c.args(["-c", "echo $$ > \"$0\" && exec \"$@\""]).arg(procs);
                c
            }
            None => Command::new("env"),
        };
        if let Some(ns) = netns {
            cmd.args(["ip", "netns", "exec", ns]);
        }
        cmd.arg(BIN).args(&args).envs(env.iter().copied());
        Daemon::from_command(cmd)
    }

    /// Runs `cmd` (which ends with the daemon's own command line) as the daemon.
    pub fn from_command(mut cmd: Command) -> Daemon {
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("DAEMON_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tpacctd");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon { child, lines }
    }

    /// The first line containing `needle`, within 20 s.
    pub fn wait_for(&self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(20)) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line with {needle:?}: {e}"),
            }
        }
    }

    fn signal(&self, sig: signal::Signal) {
        signal::kill(Pid::from_raw(self.child.id() as i32), sig).expect("signal tpacctd");
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGHUP: reload the config file.
    pub fn hangup(&self) {
        self.signal(signal::Signal::SIGHUP);
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal(signal::Signal::SIGTERM);
        self.child.wait().expect("wait")
    }

    /// SIGKILL: nothing is cleaned up.
    pub fn kill(mut self) {
        self.signal(signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    /// A test that fails midway must not leave its daemon running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
