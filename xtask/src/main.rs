//! `cargo xtask`: the project's own commands — setup, build, run, test — so that a newcomer
//! needs nothing but the README's two commands.

mod bench;
mod demo;
mod demo_client;
mod forward;
mod install;
mod netns;
mod process;
mod setup;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need (Debian packages, rust-src, bpf-linker).
    /// Idempotent: quick when everything is there.
    Setup,
    /// Setup, then build tpacctd (with its eBPF programs) in release mode.
    Build,
    /// Setup, build, and start tpacctd. Without arguments (no gateway configured) it runs in
    /// the demo topology with traffic every few seconds until Ctrl-C; arguments after `--`
    /// go to `tpacctd run` on this host (e.g. `-- --config /etc/tpacct/config.yaml`).
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, then one round of the demo: client and server namespaces routed through
    /// tpacctd with its managed firewall, HTTP, TLS and UDP traffic, flows logged with counts.
    Demo,
    /// Setup, build, then kernel forwarding vs tpacctd (eBPF and user-space accounting),
    /// interleaved rounds; report to target/bench/. `--quick`: one short round.
    Bench {
        #[arg(long)]
        quick: bool,
        /// Only these contenders, and no routing or history benches (e.g. `--only
        /// ebpf,ebpf-no-history --rounds 8 --churn-only` for an A/B of one change); the figures
        /// go to the terminal, not the report.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Rounds instead of the default (3, or 1 with `--quick`).
        #[arg(long)]
        rounds: Option<usize>,
        /// Connection churn alone.
        #[arg(long)]
        churn_only: bool,
        /// Record `perf` on tpacctd (eBPF) during the single stream and the churn, and put
        /// its top symbols in the report.
        #[arg(long)]
        profile: bool,
    },
    /// Setup, build, then put the binary, the systemd unit, the default config (unless one is
    /// there) and the README in place under ROOT (default /).
    Install {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
    /// Remove what `install` put under ROOT; the config and the state directory stay unless
    /// `--purge`.
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
        #[arg(long)]
        purge: bool,
    },
    /// Setup, then format check, clippy with -D warnings, every test, one demo round and a
    /// quick benchmark round.
    Test,
    /// Benchmark echo server inside the server namespace.
    #[command(hide = true)]
    BenchServe { addr: String },
    /// Benchmark sink holding idle connections inside the server namespace.
    #[command(hide = true)]
    BenchSink { addr: String },
    /// Benchmark clients inside the client namespace.
    #[command(hide = true)]
    BenchClient {
        kind: String,
        addr: String,
        arg: String,
    },
    /// Demo server inside the server namespace.
    #[command(hide = true)]
    DemoServe { kind: String, addr: String },
    /// Demo UDP client inside the client namespace.
    #[command(hide = true)]
    DemoUdp { addr: String },
    /// Demo HTTPS client (curl through a byte meter) inside the client namespace.
    #[command(hide = true)]
    DemoHttps { addr: String, name: String },
}

fn main() -> Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Command::Setup => setup::ensure(),
        Command::Build => {
            setup::ensure()?;
            build()
        }
        Command::Run { args } if args.is_empty() => {
            setup::ensure()?;
            build()?;
            demo::run(&daemon(&root), None)
        }
        Command::Run { args } => {
            setup::ensure()?;
            build()?;
            let mut cmd = std::process::Command::new(daemon(&root));
            cmd.arg("run").args(args);
            process::exec(cmd)
        }
        Command::Demo => {
            setup::ensure()?;
            build()?;
            demo::run(&daemon(&root), Some(1))
        }
        Command::Test => {
            setup::ensure()?;
            let tally = test()?;
            build()?;
            demo::run(&daemon(&root), Some(1))?;
            bench::run(&daemon(&root), &bench::Options::quick())?;
            // The closing line CI reads: every cargo test result, summed.
            println!(
                "tests: {} passed, {} failed, {} skipped",
                tally.passed, tally.failed, tally.ignored
            );
            Ok(())
        }
        Command::Bench {
            quick,
            only,
            rounds,
            churn_only,
            profile,
        } => {
            setup::ensure()?;
            build()?;
            let only = only
                .iter()
                .map(|k| bench::Contender::by_key(k))
                .collect::<Result<Vec<_>>>()?;
            bench::run(
                &daemon(&root),
                &bench::Options {
                    quick,
                    only,
                    rounds,
                    churn_only,
                    profile,
                },
            )
        }
        Command::Install { root: dest } => {
            setup::ensure()?;
            build()?;
            install::install(&root, &dest).map(drop)
        }
        Command::Uninstall { root: dest, purge } => install::uninstall(&dest, purge),
        Command::BenchServe { addr } => bench::serve(&addr),
        Command::BenchSink { addr } => bench::sink(&addr),
        Command::BenchClient { kind, addr, arg } => bench::client_main(&kind, &addr, &arg),
        Command::DemoServe { kind, addr } => demo::serve(&kind, &addr),
        Command::DemoUdp { addr } => demo_client::udp(&addr),
        Command::DemoHttps { addr, name } => demo_client::https(&addr, &name),
    }
}

fn daemon(root: &std::path::Path) -> PathBuf {
    root.join("target/release/tpacctd")
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn build() -> Result<()> {
    process::run("cargo", &["build", "--release", "--package", "tpacct"])
}

fn test() -> Result<process::Tally> {
    process::run("cargo", &["fmt", "--all", "--check"])?;
    process::run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    process::run_tallied("cargo", &["test", "--workspace"])
}
