//! The managed firewall: one nftables table with the TPROXY rules (TCP and UDP, IPv4 and
//! IPv6) plus the policy routing that delivers marked packets locally. Installed at start
//! after cleaning what a killed predecessor left, removed on exit.

mod nft;

use std::process::Command;

use crate::config::{BindAddress, FastPathConfig, FirewallConfig};

pub use nft::ruleset;

/// Errors installing the rules.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("tproxy-firewall: `{command}` failed: {message}")]
    Command { command: String, message: String },
}

/// Installed rules; removed by [`Installed::remove`] or on drop.
#[derive(Debug)]
pub struct Installed {
    config: FirewallConfig,
    removed: bool,
}

/// Cleans leftovers, then installs the table and routing for the listener on `bind`:`port`,
/// letting traffic marked `routing_mark` through untouched, and connections the fast path
/// forwards (when `fast` is given).
pub fn install(
    config: &FirewallConfig,
    port: u16,
    routing_mark: u32,
    bind: BindAddress,
    fast: Option<&FastPathConfig>,
) -> Result<Installed, Error> {
    clean(config);
    let mut installed = Installed {
        config: config.clone(),
        removed: false,
    };
    let script = ruleset(config, port, routing_mark, bind, fast);
    match nft::targets(bind) {
        (Some(_), None) => tracing::warn!(
            "tproxy-firewall: bind-address {bind:?} is IPv4 only: IPv6 traffic is not captured"
        ),
        (None, Some(_)) => tracing::warn!(
            "tproxy-firewall: bind-address {bind:?} is IPv6 only: IPv4 traffic is not captured"
        ),
        _ => {}
    }
    run_with_input("nft", &["-f", "-"], &script)?;
    let (mark, table) = (config.fwmark.to_string(), config.table.to_string());
    for family in ["-4", "-6"] {
        run(
            "ip",
            &[family, "rule", "add", "fwmark", &mark, "lookup", &table],
        )?;
        let default = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
        run(
            "ip",
            &[
                family, "route", "replace", "local", default, "dev", "lo", "table", &table,
            ],
        )?;
    }
    tracing::info!(
        "tproxy-firewall: table inet {} installed for {:?}{}",
        config.nft_table,
        config.interfaces,
        if config.local { " and this host" } else { "" }
    );
    installed.removed = false;
    Ok(installed)
}

impl Installed {
    /// Removes everything [`install`] added.
    pub fn remove(mut self) {
        clean(&self.config);
        self.removed = true;
        tracing::info!("tproxy-firewall: removed");
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.removed {
            clean(&self.config);
        }
    }
}

/// Removes the table, the rules and the routes, whether or not they exist.
pub fn clean(config: &FirewallConfig) {
    let _ = run("nft", &["delete", "table", "inet", &config.nft_table]);
    let (mark, table) = (config.fwmark.to_string(), config.table.to_string());
    for family in ["-4", "-6"] {
        // A killed run may have been started more than once: remove every copy.
        for _ in 0..16 {
            if run(
                "ip",
                &[family, "rule", "del", "fwmark", &mark, "lookup", &table],
            )
            .is_err()
            {
                break;
            }
        }
        let _ = run("ip", &[family, "route", "flush", "table", &table]);
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), Error> {
    run_with_input(program, args, "")
}

fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<(), Error> {
    use std::io::Write;
    let command = format!("{program} {}", args.join(" "));
    let failed = |message: String| Error::Command {
        command: command.clone(),
        message,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}
