//! Wiring and lifetime: builds every part from the [`Config`], runs until told to stop, then
//! stops in order — inbound and flows first (final totals still arriving), then accounting —
//! each bounded in time, and removes what it installed in the kernel.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    accounting::Accounting,
    api,
    config::Config,
    firewall,
    flow::pipeline::Pipeline,
    inbound,
    registry::Registry,
    route::{Router, dnsmap::DnsMap},
    speed,
};

/// How long each shutdown stage waits for its tasks.
const DRAIN: Duration = Duration::from_secs(5);

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("accounting: {0}")]
    Accounting(#[from] crate::accounting::Error),
    #[error(transparent)]
    Inbound(#[from] inbound::Error),
    #[error(transparent)]
    Firewall(#[from] firewall::Error),
    #[error(transparent)]
    FastPath(#[from] crate::fastpath::Error),
    #[error(transparent)]
    Api(#[from] api::Error),
    #[error(transparent)]
    State(#[from] crate::state::Error),
    #[error("routing: {0}")]
    Routing(#[from] crate::route::BuildError),
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
}

/// A group of tasks stopped together.
#[derive(Debug, Default)]
struct Stage {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Stage {
    async fn stop(&self, name: &str) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(DRAIN, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("{name}: tasks still running after {DRAIN:?}; going on");
        }
    }
}

/// The running daemon's parts.
#[derive(Debug)]
pub struct App {
    core: Stage,
    flows: Stage,
    registry: Arc<Registry>,
    health: Arc<crate::outbound::Health>,
    listening: Vec<SocketAddr>,
    proxies: Vec<(inbound::mixed::Kind, SocketAddr)>,
    api: Option<SocketAddr>,
    firewall: Option<firewall::Installed>,
    /// Dropped (programs detached) before the firewall goes.
    fast_path: Option<crate::fastpath::FastPath>,
    restart: CancellationToken,
    reloader: Arc<crate::reload::Reloader>,
}

/// Why the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT.
    Stop,
    /// `POST /restart`: the caller starts the executable again.
    Restart,
}

impl App {
    /// Builds and starts every part. Blocking steps (cgroup and program set-up, `nft` and
    /// `ip`) run off the runtime's workers.
    pub async fn start(config: &Config) -> Result<App, Error> {
        let mut config = config.clone();
        let dir = crate::state::dir(config.directory.as_deref());
        for (key, why) in &config.ignored {
            tracing::info!("config: `{key}` is a mihomo key tpacct does without ({why}); ignored");
        }
        if !config.external_controller.is_empty() {
            let secret = crate::state::secret(config.secret.as_deref(), &dir)?;
            match (&secret.generated_in, secret.value.is_empty()) {
                (Some(file), _) => tracing::info!(
                    "external-controller: secret {} (generated, kept in {})",
                    secret.value,
                    file.display()
                ),
                (None, true) => tracing::warn!(
                    "external-controller: `secret: \"\"` turns authentication off: any local \
                     process, and any web page a local browser opens, can use the API"
                ),
                (None, false) => {}
            }
            config.secret = Some(secret.value);
        }
        let config = &config;
        crate::tls::trust(&config.tls.custom_certifactes)?;
        let core = Stage::default();
        let flows = Stage::default();
        // First: accounting moves the process into its cgroup before any socket exists.
        let accounting = Accounting::start(&config.accounting(), &core.cancel, &core.tracker)?;
        let registry = Arc::new(Registry::new(accounting, config.closed_connections.get()));
        if config.storage.enable {
            let path = config
                .storage
                .path
                .clone()
                .unwrap_or_else(|| dir.join(crate::store::FILE));
            let devices = Arc::new(crate::devices::Devices::new(
                config.dhcp_leases.clone(),
                &config.devices,
            ));
            registry.set_store(crate::store::Store::start(
                &path,
                config.storage.retention_days.0 as u32,
                devices,
            ));
        }
        let (rates, sampler) = speed::start(registry.clone(), flows.cancel.clone());
        flows.tracker.spawn(sampler);
        let health = Arc::new(crate::outbound::Health::new(Some(dir.clone())));
        let flows_of = registry.clone();
        let interrupt = move |group: &str, member: &str| {
            let n = flows_of.close_through(group, member);
            if n > 0 {
                tracing::info!("group {group} left {member}: {n} flows through it closed");
            }
        };
        let _ = health.on_switch.set(Box::new(interrupt));
        let routing = match crate::route::build(config, &dir, health.clone()).await {
            Ok(r) => r,
            Err(e) => {
                core.cancel.cancel();
                return Err(e.into());
            }
        };
        let router = Router::new(config.mode, routing);
        flows.tracker.spawn(crate::outbound::health::keep_affinity(
            health.clone(),
            flows.cancel.clone(),
        ));
        crate::route::refresh::spawn(router.clone(), config, &dir, &flows.cancel, &flows.tracker);
        let killswitch = Arc::new(crate::killswitch::KillSwitch::new(
            config,
            crate::memory::Memory::locate(),
        ));
        flows.tracker.spawn(
            killswitch
                .clone()
                .run(registry.clone(), flows.cancel.clone()),
        );
        let pipeline = Arc::new(Pipeline {
            registry: registry.clone(),
            router: router.clone(),
            dns: Arc::new(DnsMap::default()),
            tcp_idle: config.tcp_idle_timeout.or_never(),
            hooks: Default::default(),
            killswitch: killswitch.clone(),
            processes: Arc::new(crate::process::Finder::new(
                config.find_process_mode,
                registry.accounting().procs(),
            )),
        });
        let state = api::ApiState::new(registry.clone(), rates, config, pipeline.clone(), dir);
        let restart = state.restart.clone();
        let reloader = state.reloader.clone();
        let api = api::start(config, state, &flows.cancel, &flows.tracker)?;
        let proxies =
            inbound::mixed::start(config, pipeline.clone(), &flows.cancel, &flows.tracker)?;
        let hooks_of = pipeline.clone();
        let listening = inbound::start(config, pipeline, &flows.cancel, &flows.tracker)?;
        let fast = config.fast_path.enable.then(|| config.fast_path.clone());
        let firewall = match config.tproxy_firewall.clone() {
            Some(fw) => {
                let (port, mark, bind) =
                    (config.tproxy_port, config.routing_mark, config.bind_address);
                let fast = fast.clone();
                let installed = tokio::task::spawn_blocking(move || {
                    firewall::install(&fw, port, mark, bind, fast.as_ref())
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                match installed {
                    Ok(installed) => Some(installed),
                    Err(e) => {
                        flows.cancel.cancel();
                        core.cancel.cancel();
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        // After the firewall: a flow the programs mark must meet the rules that skip TPROXY.
        let fast_path = match fast {
            Some(fast) => {
                let bypass = config
                    .tproxy_firewall
                    .as_ref()
                    .map(|fw| fw.bypass.clone())
                    .unwrap_or_default();
                let (router, registry, udp_idle) = (
                    router.clone(),
                    registry.clone(),
                    config.udp_idle_timeout.duration(),
                );
                let (cancel, tracker) = (flows.cancel.clone(), flows.tracker.clone());
                // Off the workers: the verifier takes a second or more over the programs.
                let started = tokio::task::spawn_blocking(move || {
                    crate::fastpath::FastPath::start(
                        &fast, &bypass, router, registry, udp_idle, &cancel, &tracker,
                    )
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                match started {
                    Ok(f) => {
                        let _ = hooks_of.hooks.fast_path.set(f.stats());
                        Some(f)
                    }
                    Err(e) => {
                        if let Some(fw) = firewall {
                            let _ = tokio::task::spawn_blocking(move || fw.remove()).await;
                        }
                        flows.cancel.cancel();
                        core.cancel.cancel();
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        Ok(App {
            core,
            flows,
            registry,
            health,
            listening,
            proxies,
            api,
            firewall,
            fast_path,
            restart,
            reloader,
        })
    }

    /// The flow registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The accounting front.
    pub fn accounting(&self) -> &Accounting {
        self.registry.accounting()
    }

    /// Where the Clash API listens, if on.
    pub fn api(&self) -> Option<SocketAddr> {
        self.api
    }

    /// The proxy inbounds (mixed, HTTP, SOCKS) and their addresses.
    pub fn proxies(&self) -> &[(inbound::mixed::Kind, SocketAddr)] {
        &self.proxies
    }

    /// Addresses the TPROXY inbound listens on.
    pub fn listening(&self) -> &[SocketAddr] {
        &self.listening
    }

    /// Stops taking traffic, closes every flow and waits for their final totals, stops the
    /// accounting, and removes the firewall rules; programs are detached and the accounting
    /// cgroup removed when `self` drops here.
    pub async fn shutdown(self) {
        drop(self.fast_path);
        if let Some(fw) = self.firewall {
            let _ = tokio::task::spawn_blocking(move || fw.remove()).await;
        }
        self.flows.cancel.cancel();
        self.registry.close_all();
        self.flows.stop("flows").await;
        // Every flow has its final totals now: commit them.
        if let Some(store) = self.registry.store().cloned() {
            let _ = tokio::task::spawn_blocking(move || store.close()).await;
        }
        self.health.affinity.save();
        self.core.stop("accounting").await;
    }
}

/// Runs the daemon until `stop` resolves or a restart is asked for.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> Result<Exit, Error> {
    tracing::info!("tpacctd {} starting", env!("CARGO_PKG_VERSION"));
    let app = App::start(&config).await?;
    tracing::info!("ready");
    crate::notify::ready(&app.registry);
    let watchdog = CancellationToken::new();
    crate::notify::spawn(app.registry.clone(), watchdog.clone());
    let restart = app.restart.clone();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    tokio::pin!(stop);
    let exit = loop {
        tokio::select! {
            () = &mut stop => break Exit::Stop,
            () = restart.cancelled() => break Exit::Restart,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                tracing::info!("SIGHUP: reloading the config");
                crate::notify::reloading(false);
                if let Err(e) = app.reloader.reload(crate::reload::Source::File(None)).await {
                    tracing::error!("reload refused, the old config keeps running: {e}");
                }
                crate::notify::reloading(true);
            }
        }
    };
    tracing::info!("stopping");
    crate::notify::stopping();
    watchdog.cancel();
    app.shutdown().await;
    Ok(exit)
}
