//! What `tpacctd check` (and every load) verifies about routing without touching the network:
//! every rule parses, every target, group member, provider and sub-rule exists, names are
//! unique, groups do not contain themselves, and values are in range. Each problem names its
//! key (`rules[3]`, `proxy-groups[1].proxies`) for the config error.

use std::collections::{HashMap, HashSet};

use super::rules::{self, Cond};
use crate::{
    config::{Config, GroupKind, RuleFormat, Vehicle},
    outbound::registry_names,
};

/// One problem: the key it is about and what is wrong.
pub type Problem = (String, String);

/// Checks the routing keys of `config`; the first problem found.
pub fn check(config: &Config) -> Result<(), Problem> {
    let mut names: HashSet<&str> = registry_names().iter().copied().collect();
    for (i, p) in config.proxies.iter().enumerate() {
        if !names.insert(&p.name) {
            return Err((
                format!("proxies[{i}].name"),
                format!("`{}` is used twice", p.name),
            ));
        }
        if p.server.is_empty() {
            return Err((format!("proxies[{i}].server"), "must not be empty".into()));
        }
        if p.port == 0 {
            return Err((format!("proxies[{i}].port"), "must not be 0".into()));
        }
    }
    for (i, g) in config.proxy_groups.iter().enumerate() {
        if g.name != "GLOBAL" && !names.insert(&g.name) {
            return Err((
                format!("proxy-groups[{i}].name"),
                format!("`{}` is used twice", g.name),
            ));
        }
    }
    for (i, p) in config.proxies.iter().enumerate() {
        if let Some(via) = &p.dialer_proxy
            && !names.contains(via.as_str())
        {
            return Err((
                format!("proxies[{i}].dialer-proxy"),
                format!("no proxy or group named `{via}`"),
            ));
        }
    }
    for (i, g) in config.proxy_groups.iter().enumerate() {
        let key = |k: &str| format!("proxy-groups[{i}].{k}");
        for m in &g.proxies {
            if !names.contains(m.as_str()) {
                return Err((key("proxies"), format!("no proxy or group named `{m}`")));
            }
        }
        for u in &g.uses {
            if !config.proxy_providers.contains_key(u) {
                return Err((key("use"), format!("no proxy provider named `{u}`")));
            }
        }
        for (k, f) in [("filter", &g.filter), ("exclude-filter", &g.exclude_filter)] {
            if let Some(f) = f {
                for part in f.split('`').filter(|p| !p.is_empty()) {
                    regex::Regex::new(part).map_err(|e| (key(k), format!("`{part}`: {e}")))?;
                }
            }
        }
        if g.proxies.is_empty()
            && g.uses.is_empty()
            && !g.include_all
            && !g.include_all_proxies
            && !g.include_all_providers
        {
            return Err((
                key("proxies"),
                "a group needs `proxies`, `use` or `include-all`".into(),
            ));
        }
        if let Some(t) = g.tolerance
            && t < 0
        {
            return Err((key("tolerance"), format!("{t} is negative")));
        }
        if let Some(s) = &g.strategy {
            if g.kind != GroupKind::LoadBalance {
                return Err((
                    key("strategy"),
                    "only load-balance groups have a strategy".into(),
                ));
            }
            if !matches!(
                s.as_str(),
                "consistent-hashing" | "round-robin" | "sticky-sessions"
            ) {
                return Err((
                    key("strategy"),
                    format!("`{s}` is not consistent-hashing, round-robin or sticky-sessions"),
                ));
            }
        }
        if let Some(u) = &g.url {
            test_url(u).map_err(|e| (key("url"), e))?;
        }
        if let Some(e) = &g.expected_status
            && crate::outbound::health::parse_expected(e).is_none()
        {
            return Err((
                key("expected-status"),
                format!("`{e}` is not `*` or statuses like 204, 200/204, 200-299"),
            ));
        }
        if g.interval == Some(0) && g.kind != GroupKind::Select {
            return Err((key("interval"), "must be at least 1 second".into()));
        }
    }
    cycles(config)?;
    for (name, p) in &config.rule_providers {
        let key = |k: &str| format!("rule-providers.{name}.{k}");
        match p.vehicle {
            Vehicle::File if p.path.is_none() => {
                return Err((key("path"), "type: file needs a path".into()));
            }
            Vehicle::Http if p.url.is_none() => {
                return Err((key("url"), "type: http needs a url".into()));
            }
            Vehicle::Http => {
                let u = p.url.as_deref().unwrap_or_default();
                url::Url::parse(u).map_err(|e| (key("url"), format!("`{u}`: {e}")))?;
            }
            Vehicle::Inline => {
                let compiled =
                    super::providers::compile(&p.payload, p.behavior, &Default::default());
                if let Err(e) = compiled
                    && !e.contains("GEOSITE")
                {
                    return Err((key("payload"), e));
                }
            }
            Vehicle::File => {}
        }
        if p.format == RuleFormat::Mrs {
            return Err((
                key("format"),
                "the binary `mrs` format is not read by tpacct; use yaml or text".into(),
            ));
        }
        if let Some(via) = &p.proxy
            && !names.contains(via.as_str())
        {
            return Err((key("proxy"), format!("no proxy or group named `{via}`")));
        }
    }
    for (name, p) in &config.proxy_providers {
        let key = |k: &str| format!("proxy-providers.{name}.{k}");
        match p.vehicle {
            Vehicle::File if p.path.is_none() => {
                return Err((key("path"), "type: file needs a path".into()));
            }
            Vehicle::Http if p.url.is_none() => {
                return Err((key("url"), "type: http needs a url".into()));
            }
            _ => {}
        }
        let hc = &p.health_check;
        if let Some(u) = &hc.url {
            test_url(u).map_err(|e| (key("health-check.url"), e))?;
        }
        if let Some(e) = &hc.expected_status
            && crate::outbound::health::parse_expected(e).is_none()
        {
            return Err((
                key("health-check.expected-status"),
                format!("`{e}` is not `*` or statuses like 204, 200/204, 200-299"),
            ));
        }
    }
    let mut sub_names: HashMap<&str, ()> = HashMap::new();
    for (name, list) in &config.sub_rules {
        sub_names.insert(name, ());
        for (i, line) in list.iter().enumerate() {
            check_rule(config, &names, &format!("sub-rules.{name}[{i}]"), line)?;
        }
    }
    for (i, line) in config.rules.iter().enumerate() {
        check_rule(config, &names, &format!("rules[{i}]"), line)?;
    }
    super::sniffing::Sniffing::new(&config.sniffer, &|n| config.rule_providers.contains_key(n))?;
    if config.geodata_mode {
        return Err((
            "geodata-mode".into(),
            "`true` reads GEOIP from geoip.dat, which tpacct does not; it reads geoip.metadb or \
             Country.mmdb (set geodata-mode: false)"
                .into(),
        ));
    }
    Ok(())
}

fn check_rule(
    config: &Config,
    names: &HashSet<&str>,
    key: &str,
    line: &str,
) -> Result<(), Problem> {
    let rule = rules::parse(line).map_err(|e| (key.to_owned(), format!("`{line}`: {e}")))?;
    match &rule.sub_rule {
        Some(sub) if !config.sub_rules.contains_key(sub) => {
            return Err((key.to_owned(), format!("no sub-rules list named `{sub}`")));
        }
        Some(_) => {}
        None if !names.contains(rule.target.as_str()) => {
            return Err((
                key.to_owned(),
                format!("`{line}`: no proxy or group named `{}`", rule.target),
            ));
        }
        None => {}
    }
    let mut missing = None;
    rule.cond.walk(&mut |c| {
        if let Cond::RuleSet { name, .. } = c
            && !config.rule_providers.contains_key(name)
        {
            missing = Some(name.clone());
        }
    });
    match missing {
        Some(m) => Err((
            key.to_owned(),
            format!("`{line}`: no rule provider named `{m}`"),
        )),
        None => Ok(()),
    }
}

/// A health-check URL: http or https, with a host.
fn test_url(u: &str) -> Result<(), String> {
    let url = url::Url::parse(u).map_err(|e| format!("`{u}`: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "`{u}`: test URLs are http:// or https:// with a host"
        ));
    }
    Ok(())
}

/// A group that contains itself, directly or through other groups.
fn cycles(config: &Config) -> Result<(), Problem> {
    let groups: HashMap<&str, (usize, &Vec<String>)> = config
        .proxy_groups
        .iter()
        .enumerate()
        .map(|(i, g)| (g.name.as_str(), (i, &g.proxies)))
        .collect();
    fn visit<'a>(
        name: &'a str,
        groups: &HashMap<&'a str, (usize, &'a Vec<String>)>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        if let Some(at) = path.iter().position(|n| *n == name) {
            let mut cycle = path[at..].to_vec();
            cycle.push(name);
            return Some(cycle);
        }
        let (_, members) = groups.get(name)?;
        path.push(name);
        for m in members.iter() {
            if let Some(c) = visit(m, groups, path) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    for g in &config.proxy_groups {
        if let Some(cycle) = visit(&g.name, &groups, &mut Vec::new()) {
            let (i, _) = groups[cycle[0]];
            return Err((
                format!("proxy-groups[{i}].proxies"),
                format!("groups contain themselves: {}", cycle.join(" → ")),
            ));
        }
    }
    Ok(())
}
