//! Providers: rule providers (`rule-providers:`, `type: file | http | inline`, `behavior:
//! domain | ipcidr | classical`, `format: yaml | text`) and proxy providers (`proxy-providers:`,
//! a Clash `proxies:` list). An http provider's copy lives on disk; a refresh that fails keeps
//! the last good copy in use and on disk.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;

use super::{
    engine::{Compiled, SetData},
    geo::Geo,
    rules::{self, Rule},
    sets::{CidrSet, DomainPattern, DomainSetBuilder},
};
use crate::{
    config::{Behavior, ProxyConfig, RuleFormat, RuleProviderConfig, Vehicle},
    outbound::Outbounds,
};

/// Downloads larger than this are refused unless `size-limit` says otherwise.
pub const DEFAULT_SIZE_LIMIT: usize = 64 << 20;
/// How long a download may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a provider could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("provider `{name}`: {message}")]
    Provider { name: String, message: String },
}

fn error(name: &str, message: impl std::fmt::Display) -> Error {
    Error::Provider {
        name: name.to_owned(),
        message: message.to_string(),
    }
}

/// The entries of a provider document: YAML `payload:` (or `proxies:`) or one per line.
pub fn entries(text: &str, format: RuleFormat) -> Result<Vec<String>, String> {
    match format {
        RuleFormat::Text => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect()),
        RuleFormat::Yaml => {
            #[derive(serde::Deserialize)]
            struct Doc {
                #[serde(default)]
                payload: Vec<String>,
            }
            serde_yaml_ng::from_str::<Doc>(text)
                .map(|d| d.payload)
                .map_err(|e| format!("not a YAML `payload:` list: {e}"))
        }
        RuleFormat::Mrs => {
            Err("the binary `mrs` format is not read by tpacct; use yaml or text".into())
        }
    }
}

/// A classical entry as a rule (no target).
pub fn classical_rule(entry: &str) -> Result<Rule, String> {
    let (kind, payload, cond) = rules::parse_condition(entry).map_err(|e| e.0)?;
    Ok(Rule {
        kind,
        payload,
        cond,
        sub_rule: None,
        target: String::new(),
    })
}

/// Compiles `entries` for `behavior`; returns the data and how many entries it holds.
pub fn compile(
    entries: &[String],
    behavior: Behavior,
    geo: &Geo,
) -> Result<(SetData, usize), String> {
    match behavior {
        Behavior::Domain => {
            let mut b = DomainSetBuilder::default();
            for e in entries {
                if let Some(p) = DomainPattern::from_entry(e) {
                    b.add(p, 0);
                }
            }
            let set = b.build()?;
            let n = set.len();
            Ok((SetData::Domain(set), n))
        }
        Behavior::Ipcidr => {
            let mut set = CidrSet::default();
            for e in entries {
                let net = e
                    .trim()
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| e.trim().parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("`{e}` is not a CIDR"))?;
                set.add(net.trunc(), 0);
            }
            let n = set.len();
            Ok((SetData::Cidr(set), n))
        }
        Behavior::Classical => {
            let rules = entries
                .iter()
                .map(|e| classical_rule(e).map_err(|m| format!("`{e}`: {m}")))
                .collect::<Result<Vec<_>, _>>()?;
            let n = rules.len();
            Ok((SetData::Classical(Compiled::new(rules, geo)?), n))
        }
    }
}

/// Where a provider's copy lives: its `path` (relative to the state directory), else
/// `<kind>/<name>.<ext>` there.
pub fn copy_path(dir: &Path, kind: &str, name: &str, path: Option<&Path>, ext: &str) -> PathBuf {
    match path {
        Some(p) if p.is_absolute() => p.to_owned(),
        Some(p) => dir.join(p),
        None => dir.join(kind).join(format!("{name}.{ext}")),
    }
}

/// A provider's document: inline entries, the file, or (http) the copy on disk — fetched
/// first when there is none.
async fn document(
    name: &str,
    vehicle: Vehicle,
    url: Option<&str>,
    path: &Path,
    via: &str,
    limit: usize,
    outbounds: &Outbounds,
) -> Result<String, Error> {
    match vehicle {
        Vehicle::Inline => Ok(String::new()),
        Vehicle::File => std::fs::read_to_string(path)
            .map_err(|e| error(name, format!("{}: {e}", path.display()))),
        Vehicle::Http => match std::fs::read_to_string(path) {
            Ok(text) => Ok(text),
            Err(_) => download(name, url, path, via, limit, outbounds).await,
        },
    }
}

/// Fetches `url` through `via` and keeps it at `path` (replaced atomically).
pub async fn download(
    name: &str,
    url: Option<&str>,
    path: &Path,
    via: &str,
    limit: usize,
    outbounds: &Outbounds,
) -> Result<String, Error> {
    let url = url.ok_or_else(|| error(name, "type: http needs a `url`"))?;
    let parsed = url::Url::parse(url).map_err(|e| error(name, format!("url `{url}`: {e}")))?;
    let body = crate::fetch::get(
        outbounds,
        &crate::fetch::Request_ {
            url: &parsed,
            method: hyper::Method::GET,
            via,
            timeout: FETCH_TIMEOUT,
            max_body: limit,
            verify: true,
        },
    )
    .await
    .map_err(|e| error(name, e))?;
    let text =
        String::from_utf8(body.to_vec()).map_err(|_| error(name, "the download is not text"))?;
    save(path, &text).map_err(|e| error(name, format!("keeping {}: {e}", path.display())))?;
    Ok(text)
}

/// Writes `text` to `path` atomically (a temporary file renamed over it).
pub fn save(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("download");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// A loaded rule provider.
#[derive(Debug)]
pub struct RuleProvider {
    pub name: String,
    pub config: RuleProviderConfig,
    pub data: Arc<ArcSwap<SetData>>,
    pub count: AtomicUsize,
    pub updated: Mutex<SystemTime>,
    pub path: PathBuf,
    /// The raw entries (for `GET /providers/rules` payloads of inline providers).
    pub entries: Mutex<Vec<String>>,
}

impl RuleProvider {
    /// Loads provider `name` (an unreachable http provider without a copy starts empty and
    /// says so; a file or content that does not parse is an error).
    pub async fn load(
        name: &str,
        config: &RuleProviderConfig,
        dir: &Path,
        outbounds: &Outbounds,
        geo: &Geo,
    ) -> Result<RuleProvider, Error> {
        let ext = if config.format == RuleFormat::Text {
            "txt"
        } else {
            "yaml"
        };
        let path = copy_path(dir, "rules", name, config.path.as_deref(), ext);
        let limit = match config.size_limit {
            0 => DEFAULT_SIZE_LIMIT,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let via = config.proxy.as_deref().unwrap_or("DIRECT");
        let list = if config.vehicle == Vehicle::Inline {
            config.payload.clone()
        } else {
            match document(
                name,
                config.vehicle,
                config.url.as_deref(),
                &path,
                via,
                limit,
                outbounds,
            )
            .await
            {
                Ok(text) => entries(&text, config.format).map_err(|e| error(name, e))?,
                Err(e) if config.vehicle == Vehicle::Http => {
                    tracing::error!("{e}; it matches nothing until a download succeeds");
                    Vec::new()
                }
                Err(e) => return Err(e),
            }
        };
        let (data, count) = compile(&list, config.behavior, geo).map_err(|e| error(name, e))?;
        Ok(RuleProvider {
            name: name.to_owned(),
            config: config.clone(),
            data: Arc::new(ArcSwap::from_pointee(data)),
            count: AtomicUsize::new(count),
            updated: Mutex::new(SystemTime::now()),
            path,
            entries: Mutex::new(if config.vehicle == Vehicle::Inline {
                list
            } else {
                Vec::new()
            }),
        })
    }

    /// Fetches (http) or re-reads (file) the provider and swaps its contents in; on failure
    /// the last good copy stays in use and on disk.
    pub async fn refresh(&self, outbounds: &Outbounds, geo: &Geo) -> Result<(), Error> {
        let via = self.config.proxy.as_deref().unwrap_or("DIRECT");
        let limit = match self.config.size_limit {
            0 => DEFAULT_SIZE_LIMIT,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let text = match self.config.vehicle {
            Vehicle::Inline => return Ok(()),
            Vehicle::File => std::fs::read_to_string(&self.path)
                .map_err(|e| error(&self.name, format!("{}: {e}", self.path.display())))?,
            Vehicle::Http => {
                // Parse before keeping: a bad download must not replace the good copy.
                let url = self
                    .config
                    .url
                    .as_deref()
                    .ok_or_else(|| error(&self.name, "no url"))?;
                let parsed = url::Url::parse(url).map_err(|e| error(&self.name, e))?;
                let body = crate::fetch::get(
                    outbounds,
                    &crate::fetch::Request_ {
                        url: &parsed,
                        method: hyper::Method::GET,
                        via,
                        timeout: FETCH_TIMEOUT,
                        max_body: limit,
                        verify: true,
                    },
                )
                .await
                .map_err(|e| error(&self.name, e))?;
                String::from_utf8(body.to_vec())
                    .map_err(|_| error(&self.name, "the download is not text"))?
            }
        };
        let list = entries(&text, self.config.format).map_err(|e| error(&self.name, e))?;
        let (data, count) =
            compile(&list, self.config.behavior, geo).map_err(|e| error(&self.name, e))?;
        if self.config.vehicle == Vehicle::Http {
            save(&self.path, &text)
                .map_err(|e| error(&self.name, format!("keeping {}: {e}", self.path.display())))?;
        }
        self.data.store(Arc::new(data));
        self.count.store(count, Ordering::Relaxed);
        *self.updated.lock().unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
        Ok(())
    }
}

/// The proxies of a proxy-provider document (`proxies:`); entries of types tpacct does not
/// speak are skipped, and said so.
pub fn proxies(name: &str, text: &str) -> Result<Vec<ProxyConfig>, Error> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        proxies: Vec<serde_yaml_ng::Value>,
    }
    let doc: Doc = serde_yaml_ng::from_str(text)
        .map_err(|e| error(name, format!("not a YAML `proxies:` list: {e}")))?;
    let mut out = Vec::new();
    for (i, value) in doc.proxies.into_iter().enumerate() {
        match serde_yaml_ng::from_value::<ProxyConfig>(value) {
            Ok(p) => out.push(p),
            Err(e) => tracing::warn!("proxy provider {name}: proxies[{i}] skipped: {e}"),
        }
    }
    Ok(out)
}

/// Loads proxy provider `name`.
pub async fn load_proxies(
    name: &str,
    config: &crate::config::ProxyProviderConfig,
    dir: &Path,
    outbounds: &Outbounds,
) -> Result<Vec<ProxyConfig>, Error> {
    if config.vehicle == Vehicle::Inline {
        return Ok(config.payload.clone());
    }
    let path = copy_path(dir, "proxies", name, config.path.as_deref(), "yaml");
    let limit = match config.size_limit {
        0 => DEFAULT_SIZE_LIMIT,
        n => usize::try_from(n).unwrap_or(usize::MAX),
    };
    let via = config.proxy.as_deref().unwrap_or("DIRECT");
    match document(
        name,
        config.vehicle,
        config.url.as_deref(),
        &path,
        via,
        limit,
        outbounds,
    )
    .await
    {
        Ok(text) => proxies(name, &text),
        Err(e) if config.vehicle == Vehicle::Http => {
            tracing::error!("{e}; it provides no proxies until a download succeeds");
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}
