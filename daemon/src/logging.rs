//! Log output: `tracing` to stderr at mihomo's `log-level`, `RUST_LOG` overriding it. Records
//! from the kernel programs (aya-log, through the `log` crate) arrive here too.

use tracing_subscriber::EnvFilter;

use crate::config::LogLevel;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(level: LogLevel) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.directive()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
