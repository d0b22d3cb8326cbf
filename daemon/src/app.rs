//! Wiring and lifetime: builds every part from the [`Config`], runs until told to stop, then
//! cancels every task and waits (bounded) for them to drain.

use std::{future::Future, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{accounting::Accounting, config::Config};

/// How long shutdown waits for tasks to finish.
const DRAIN: Duration = Duration::from_secs(5);

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("accounting: {0}")]
    Accounting(#[from] crate::accounting::Error),
}

/// The running daemon's parts.
#[derive(Debug)]
pub struct App {
    cancel: CancellationToken,
    tracker: TaskTracker,
    accounting: Accounting,
}

impl App {
    /// Builds and starts every part.
    pub fn start(config: &Config) -> Result<App, Error> {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let accounting = Accounting::start(&config.accounting(), &cancel, &tracker)?;
        Ok(App {
            cancel,
            tracker,
            accounting,
        })
    }

    /// The accounting front.
    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    /// Stops every task and waits up to [`DRAIN`] for them; kernel programs are detached and
    /// the accounting cgroup removed when `self` drops here.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(DRAIN, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("tasks still running after {DRAIN:?}; exiting anyway");
        }
    }
}

/// Runs the daemon until `stop` resolves.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Result<(), Error> {
    tracing::info!("tpacctd {} starting", env!("CARGO_PKG_VERSION"));
    let app = App::start(&config)?;
    tracing::info!("ready");
    stop.await;
    tracing::info!("stopping");
    app.shutdown().await;
    Ok(())
}
