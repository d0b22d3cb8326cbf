//! `cargo xtask`: the project's own commands — setup, build, run, test — so that a newcomer
//! needs nothing but the README's two commands.

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
    /// Setup, build, and start tpacctd; arguments after `--` go to `tpacctd run`.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, then format check, clippy with -D warnings, and every test.
    Test,
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
        Command::Run { args } => {
            setup::ensure()?;
            build()?;
            let mut cmd = std::process::Command::new(root.join("target/release/tpacctd"));
            cmd.arg("run").args(args);
            process::exec(cmd)
        }
        Command::Test => {
            setup::ensure()?;
            test()
        }
    }
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

fn test() -> Result<()> {
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
    process::run("cargo", &["test", "--workspace"])
}
