//! `tpacctd`: the command line. `run` starts the daemon, `check` validates a config, `top`
//! watches a running one.

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
    /// Watch a running daemon: live flows and per-device rates and usage, refreshed in place.
    Top {
        /// The daemon's config, for its `external-controller` and `secret`.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The controller (overrides the config's; default 127.0.0.1:9090).
        #[arg(long)]
        controller: Option<String>,
        /// The controller's secret (overrides the config's).
        #[arg(long, env = "TPACCT_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Milliseconds between refreshes.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        interval: u64,
        /// Print one frame as text (WIDTHxHEIGHT, two samples an interval apart) and exit.
        #[arg(long, value_name = "WIDTHxHEIGHT", num_args = 0..=1, default_missing_value = "120x40")]
        once: Option<String>,
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
        Command::Top {
            config,
            controller,
            secret,
            interval,
            once,
        } => {
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let controller =
                controller.unwrap_or_else(|| match config.external_controller.as_str() {
                    "" => "127.0.0.1:9090".to_owned(),
                    c => c.to_owned(),
                });
            top(
                &controller,
                secret.or(config.secret),
                interval,
                once.as_deref(),
            )
        }
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

fn top(controller: &str, secret: Option<String>, interval: u64, once: Option<&str>) -> ExitCode {
    let interval = std::time::Duration::from_millis(interval);
    let result = tpacct::top::Target::new(controller, secret).and_then(|target| match once {
        None => tpacct::top::run(&target, interval),
        Some(size) => {
            let (w, h) = size
                .split_once('x')
                .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
                .unwrap_or((120, 40));
            tpacct::top::once(&target, interval, w, h).map(|frame| print!("{frame}"))
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tpacctd top: {e}");
            ExitCode::FAILURE
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
