//! Reloading the config without dropping flows (`PUT /configs`, SIGHUP): the new file is
//! parsed and its routing built completely before anything changes; then rules, proxies,
//! groups, providers, the mode and the log level are swapped in at once. Flows in progress
//! keep their route. A config that does not load leaves the old one running. Keys of
//! listeners, the firewall and accounting take effect at the next start (the log says which).

use std::path::{Path, PathBuf};

use crate::config::FindProcessMode;
use crate::{
    config::{self, Config},
    flow::pipeline::Pipeline,
    route::{self, BuildError},
};

/// Why a reload was refused (the old config keeps running).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("routing: {0}")]
    Routing(#[from] BuildError),
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error("no config file to reload: tpacctd was started without --config")]
    NoFile,
}

impl Error {
    /// The key the error is about, if any.
    pub fn key(&self) -> Option<String> {
        match self {
            Error::Config(e) => e.key().map(str::to_owned),
            Error::Routing(BuildError::Config { key, .. }) => Some(key.clone()),
            _ => None,
        }
    }
}

/// Where the new config comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file; None: the one tpacctd was started with.
    File(Option<PathBuf>),
    /// YAML text.
    Text(String),
}

/// Swaps configs.
#[derive(Debug)]
pub struct Reloader {
    pipeline: std::sync::Arc<Pipeline>,
    dir: PathBuf,
    started_from: Option<PathBuf>,
    current: std::sync::Mutex<Config>,
    /// One reload at a time.
    turn: tokio::sync::Mutex<()>,
}

/// Keys whose change needs a restart.
fn restart_keys(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            keys.push(key);
        }
    };
    check(old.tproxy_port != new.tproxy_port, "tproxy-port");
    check(old.bind_address != new.bind_address, "bind-address");
    check(
        old.tproxy_firewall != new.tproxy_firewall,
        "tproxy-firewall",
    );
    check(old.fast_path != new.fast_path, "fast-path");
    check(old.accounting != new.accounting, "accounting");
    check(
        old.accounting_cgroup != new.accounting_cgroup,
        "accounting-cgroup",
    );
    check(
        old.external_controller != new.external_controller,
        "external-controller",
    );
    check(old.secret != new.secret, "secret");
    check(old.process_cgroup != new.process_cgroup, "process-cgroup");
    // Turning the hooks on or off (to or from `off`) attaches or detaches programs.
    check(
        (old.find_process_mode == FindProcessMode::Off)
            != (new.find_process_mode == FindProcessMode::Off),
        "find-process-mode",
    );
    check(
        old.external_controller_cors != new.external_controller_cors,
        "external-controller-cors",
    );
    check(
        old.max_connections != new.max_connections,
        "max-connections",
    );
    check(
        old.udp_max_sessions != new.udp_max_sessions,
        "udp-max-sessions",
    );
    keys
}

impl Reloader {
    pub fn new(
        pipeline: std::sync::Arc<Pipeline>,
        dir: &Path,
        started_from: Option<PathBuf>,
        config: Config,
    ) -> Reloader {
        Reloader {
            pipeline,
            dir: dir.to_owned(),
            started_from,
            current: std::sync::Mutex::new(config),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// The config in force.
    pub fn current(&self) -> Config {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads `source` and swaps it in, or leaves everything as it was.
    pub async fn reload(&self, source: Source) -> Result<(), Error> {
        let _turn = self.turn.lock().await;
        let mut new = match &source {
            Source::Text(text) => Config::parse(text, "the uploaded config")?,
            Source::File(path) => {
                let path = path
                    .as_ref()
                    .or(self.started_from.as_ref())
                    .ok_or(Error::NoFile)?;
                Config::load(path)?
            }
        };
        let old = self.current();
        // What was resolved at start stays (the controller's secret, the state directory).
        new.directory = old.directory.clone();
        if new.secret.is_none() {
            new.secret = old.secret.clone();
        }
        crate::tls::trust(&new.tls.custom_certifactes)?;
        let health = self.pipeline.router.routing().outbounds.health().clone();
        let routing = route::build(&new, &self.dir, health).await?;
        self.pipeline.router.replace(routing);
        self.pipeline.router.set_mode(new.mode);
        self.pipeline.processes.set_mode(new.find_process_mode);
        if let Some(logging) = crate::logging::get() {
            logging.set_level(new.log_level);
        }
        let later = restart_keys(&old, &new);
        if !later.is_empty() {
            tracing::warn!("reload: {} take effect at the next start", later.join(", "));
        }
        tracing::info!(
            "reload: {} rules, {} proxies, {} groups now in force",
            new.rules.len(),
            new.proxies.len(),
            new.proxy_groups.len()
        );
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }
}
