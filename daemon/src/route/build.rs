//! Config → [`Routing`]: providers loaded (http ones from their copy on disk, or fetched),
//! geodata read (downloaded first when `geo-auto-update` is on and a file is missing), rules
//! compiled, outbounds registered. Used at start and by every reload.

use std::{collections::HashMap, path::Path, sync::Arc};

use indexmap::IndexMap;

use super::{
    Hits, Routing,
    engine::Compiled,
    geo::{self, Geo},
    providers::{self, RuleProvider},
    rules::{self, Cond, Rule},
};
use crate::{
    config::{Behavior, Config, Vehicle},
    outbound::{Health, Outbounds},
};

/// Why a routing could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    #[error(transparent)]
    Provider(#[from] providers::Error),
    #[error(transparent)]
    Geo(#[from] geo::Error),
}

/// GEOSITE names and whether GEOIP is needed, over `rules`.
fn geo_needs<'a>(rules: impl Iterator<Item = &'a Cond>, sites: &mut Vec<String>, ip: &mut bool) {
    for cond in rules {
        cond.walk(&mut |c| match c {
            Cond::GeoSite(name) if !sites.contains(name) => sites.push(name.clone()),
            Cond::GeoIp { code, .. } if code != "lan" && code != "private" => *ip = true,
            _ => {}
        });
    }
}

fn parse_all(lines: &[String], key: &str) -> Result<Vec<Rule>, BuildError> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            rules::parse(l).map_err(|e| BuildError::Config {
                key: format!("{key}[{i}]"),
                message: format!("`{l}`: {e}"),
            })
        })
        .collect()
}

/// Builds the routing for `config`; files live in (and downloads go to) `dir`.
pub async fn build(
    config: &Config,
    dir: &Path,
    health: Arc<Health>,
) -> Result<Routing, BuildError> {
    // Downloads before the registry is complete go through the configured proxies.
    let bootstrap = Outbounds::build(config, &IndexMap::new(), None, health.clone());

    let mut provided = IndexMap::new();
    for (name, p) in &config.proxy_providers {
        provided.insert(
            name.clone(),
            providers::load_proxies(name, p, dir, &bootstrap).await?,
        );
    }

    let main = parse_all(&config.rules, "rules")?;
    let mut subs = HashMap::new();
    for (name, lines) in &config.sub_rules {
        subs.insert(
            name.clone(),
            parse_all(lines, &format!("sub-rules.{name}"))?,
        );
    }
    // Classical providers' own rules may need geodata too: read their entries first.
    let mut provider_rules: Vec<Rule> = Vec::new();
    for (name, p) in &config.rule_providers {
        if p.behavior != Behavior::Classical {
            continue;
        }
        let text = match p.vehicle {
            Vehicle::Inline => None,
            _ => {
                let ext = if p.format == crate::config::RuleFormat::Text {
                    "txt"
                } else {
                    "yaml"
                };
                let path = providers::copy_path(dir, "rules", name, p.path.as_deref(), ext);
                std::fs::read_to_string(path).ok()
            }
        };
        let entries = match text {
            Some(t) => providers::entries(&t, p.format).unwrap_or_default(),
            None => p.payload.clone(),
        };
        provider_rules.extend(
            entries
                .iter()
                .filter_map(|e| providers::classical_rule(e).ok()),
        );
    }
    let (mut sites, mut needs_ip) = (Vec::new(), false);
    geo_needs(
        main.iter()
            .chain(subs.values().flatten())
            .chain(&provider_rules)
            .map(|r| &r.cond),
        &mut sites,
        &mut needs_ip,
    );
    for name in super::sniffing::Sniffing::geosites(&config.sniffer) {
        if !sites.contains(&name) {
            sites.push(name);
        }
    }
    if config.geo_auto_update {
        super::geo_update::ensure(config, dir, needs_ip, !sites.is_empty(), &bootstrap).await;
    }
    let geo = Geo::load(dir, needs_ip, &sites)?;

    let mut rule_sets = HashMap::new();
    let mut rule_providers = Vec::new();
    for (name, p) in &config.rule_providers {
        let provider = Arc::new(RuleProvider::load(name, p, dir, &bootstrap, &geo).await?);
        rule_sets.insert(name.clone(), provider.data.clone());
        rule_providers.push(provider);
    }
    let compile = |rules: Vec<Rule>, key: &str| {
        Compiled::new(rules, &geo).map_err(|message| BuildError::Config {
            key: key.to_owned(),
            message,
        })
    };
    let mut sub_rules = HashMap::new();
    for (name, list) in subs {
        let compiled = compile(list, &format!("sub-rules.{name}"))?;
        sub_rules.insert(name, compiled);
    }
    let hits = main.iter().map(|_| Hits::default()).collect();
    let rules = compile(main, "rules")?;
    let outbounds = Outbounds::build(config, &provided, Some(dir.to_owned()), health);
    let proxy_providers = provided
        .into_iter()
        .map(|(name, list)| (name, list.into_iter().map(|p| p.name).collect()))
        .collect();
    let sniffer =
        super::sniffing::Sniffing::new(&config.sniffer, &|n| config.rule_providers.contains_key(n))
            .map_err(|(key, message)| BuildError::Config { key, message })?;
    Ok(Routing {
        outbounds,
        rules,
        hits,
        sub_rules,
        rule_sets,
        rule_providers,
        proxy_providers,
        geo,
        sniffer,
        process_needed: std::sync::OnceLock::new(),
    })
}
