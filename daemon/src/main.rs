//! `tpacctd`: the command line. `run` starts the daemon, `check` validates a config.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tpacct::{app, config::Config, logging};

/// Exit status for a config the daemon cannot use (sysexits' EX_USAGE, as `tpacctd check`
/// and `tpacctd run` report it).
const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "tpacctd",
    version,
    about = "Transparent proxy that accounts for every byte"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the daemon (the default).
    Run {
        /// YAML config; built-in defaults when omitted.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// State directory (default: $STATE_DIRECTORY, else ./tpacct-data).
        #[arg(long, short = 'd')]
        directory: Option<PathBuf>,
    },
    /// Validate a config and exit: 0 when usable, 64 naming the offending key.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, ExitCode> {
    let Some(path) = path else {
        return Ok(Config::default());
    };
    Config::load(path).map_err(|e| {
        eprintln!("tpacctd: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = Command::Run {
        config: None,
        directory: None,
    };
    match cli.command.unwrap_or(default) {
        Command::Check { config } => match load(Some(&config)) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config, directory } => {
            let mut config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            config.directory = directory;
            logging::init(config.log_level);
            let code = match serve(config) {
                Ok(app::Exit::Stop) => ExitCode::SUCCESS,
                Ok(app::Exit::Restart) => restart(),
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            };
            logging::flush();
            code
        }
    }
}

fn serve(config: Config) -> anyhow::Result<app::Exit> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        // Installed before anything starts: a SIGTERM right after "ready" must stop us
        // cleanly, not kill us with the default action.
        let stop = stop_signal()?;
        Ok(app::run(config, stop).await?)
    })
}

/// Replaces this process with a fresh start of the same executable and arguments (same pid,
/// as mihomo does). Returns only if that fails.
fn restart() -> ExitCode {
    use std::os::unix::process::CommandExt;
    tracing::info!("restarting");
    logging::flush();
    let error = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec(),
        Err(e) => e,
    };
    eprintln!("tpacctd: restarting: {error}");
    ExitCode::FAILURE
}

/// A future resolving on SIGTERM or SIGINT; the handlers are installed when this returns.
fn stop_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
