//! systemd's notify protocol (the `sd-notify` crate): `READY=1` once listeners, eBPF programs
//! and firewall are up, `STATUS=` lines with the flow counts, `WATCHDOG=1` from a task on the
//! runtime at half of `WatchdogSec` (a stuck runtime stops pinging and systemd restarts us),
//! `RELOADING=1`/`READY=1` around a SIGHUP reload, `STOPPING=1`. Without `NOTIFY_SOCKET` it
//! does nothing.

use std::{sync::Arc, time::Duration};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

fn send(states: &[NotifyState<'_>]) {
    // The environment stays set: a restart in place (exec) notifies again.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!("sd_notify: {e}");
    }
}

fn status(registry: &Registry) -> String {
    format!(
        "{} live flows, {} opened",
        registry.live_count(),
        registry.opened().0
    )
}

/// Startup is complete.
pub fn ready(registry: &Registry) {
    let status = status(registry);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A reload begins (`done`: it has ended, either way).
pub fn reloading(done: bool) {
    if done {
        send(&[NotifyState::Ready]);
    } else {
        send(&[NotifyState::Reloading]);
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for, if any: `WATCHDOG_USEC`, for this process unless
/// `WATCHDOG_PID` names another (sd_watchdog_enabled(3); the crate's own check also refuses
/// an unset `WATCHDOG_PID`).
fn watchdog() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    let ours = std::env::var("WATCHDOG_PID")
        .ok()
        .is_none_or(|pid| pid.parse() == Ok(std::process::id()));
    (ours && usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval and refreshes `STATUS=` until `cancel`; without a
/// watchdog, only the status, every 10 s.
pub fn spawn(registry: Arc<Registry>, cancel: CancellationToken) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    let (period, ping) = match watchdog() {
        Some(w) => ((w / 2).max(Duration::from_millis(10)), true),
        None => (Duration::from_secs(10), false),
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let status = status(&registry);
            if ping {
                send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
            } else {
                send(&[NotifyState::Status(&status)]);
            }
        }
    });
}
