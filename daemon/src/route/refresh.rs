//! Background refreshes: http rule providers every `interval` (their contents swapped in
//! place), http proxy providers every `interval` and geodata every `geo-update-interval`
//! hours (both rebuild the routing from the same config when something changed). A failed
//! refresh keeps the last good copy and retries at the next interval.

use std::{path::Path, sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Router, build, geo_update, providers};
use crate::config::{Config, Vehicle};

/// Starts the refresh tasks for the routing now in `router`, built from `config`.
pub fn spawn(
    router: Arc<Router>,
    config: &Config,
    dir: &Path,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    let routing = router.routing();
    for provider in &routing.rule_providers {
        let interval = provider.config.interval;
        if provider.config.vehicle != Vehicle::Http || interval == 0 {
            continue;
        }
        let (provider, router, cancel) = (provider.clone(), router.clone(), cancel.clone());
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(interval));
            tick.tick().await;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let routing = router.routing();
                match provider.refresh(&routing.outbounds, &routing.geo).await {
                    Ok(()) => tracing::info!("rule provider {}: updated", provider.name),
                    Err(e) => tracing::warn!("{e}; the last good copy stays in use"),
                }
            }
        });
    }
    for (name, p) in &config.proxy_providers {
        if p.vehicle != Vehicle::Http || p.interval == 0 {
            continue;
        }
        let (name, p, interval) = (name.clone(), p.clone(), p.interval);
        let (router, cancel, config, dir) = (
            router.clone(),
            cancel.clone(),
            config.clone(),
            dir.to_owned(),
        );
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(interval));
            tick.tick().await;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let path = providers::copy_path(&dir, "proxies", &name, p.path.as_deref(), "yaml");
                let before = std::fs::read_to_string(&path).ok();
                let routing = router.routing();
                let via = p.proxy.as_deref().unwrap_or("DIRECT");
                let fetched = providers::download(
                    &name,
                    p.url.as_deref(),
                    &path,
                    via,
                    providers::DEFAULT_SIZE_LIMIT,
                    &routing.outbounds,
                )
                .await;
                match fetched {
                    Ok(text) if Some(&text) != before.as_ref() => {
                        rebuild(&router, &config, &dir, &name).await
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("{e}; the last good copy stays in use"),
                }
            }
        });
    }
    if config.geo_auto_update {
        let (router, cancel, config, dir) = (
            router.clone(),
            cancel.clone(),
            config.clone(),
            dir.to_owned(),
        );
        let every = Duration::from_secs(3600 * config.geo_update_interval.0);
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let routing = router.routing();
                let (ip, site) = routing.geo.in_use();
                if geo_update::update(&config, &dir, ip, site, &routing.outbounds).await {
                    rebuild(&router, &config, &dir, "geodata").await;
                }
            }
        });
    }
}

/// Downloads the geodata the routing uses from `geox-url` now (`POST /configs/geo`) and
/// rebuilds the routing if a file changed; false if nothing was downloaded.
pub async fn geo_now(router: &Router, config: &Config, dir: &Path) -> bool {
    let routing = router.routing();
    let (ip, site) = routing.geo.in_use();
    let changed = geo_update::update(config, dir, ip, site, &routing.outbounds).await;
    if changed {
        rebuild(router, config, dir, "geodata").await;
    }
    changed
}

async fn rebuild(router: &Router, config: &Config, dir: &Path, why: &str) {
    let health = router.routing().outbounds.health().clone();
    match build(config, dir, health).await {
        Ok(routing) => {
            router.replace(routing);
            tracing::info!("routing rebuilt: {why} changed");
        }
        Err(e) => tracing::warn!("{why} changed, but the routing could not be rebuilt: {e}"),
    }
}
