//! YAML → typed [`Config`]. Keys shared with mihomo keep mihomo's names and meanings; unknown
//! keys and bad values are an [`Error`] naming the key and its line (the binary exits 64).

mod firewall;
mod ignored;
mod lines;
mod routing;
mod sniffer;
#[cfg(test)]
mod tests;
mod types;

use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use serde::Deserialize;

pub use firewall::{FastPathConfig, FirewallConfig};
pub use routing::{
    Behavior, CircuitBreakerConfig, GeoxUrl, GroupConfig, GroupKind, HealthCheckConfig, IpVersion,
    ProxyConfig, ProxyKind, ProxyProviderConfig, RuleFormat, RuleProviderConfig, SubRules, Vehicle,
};
pub use sniffer::{Millis, PortRange, Protocol, SniffConfig, Sniffer, TcpSniff};
pub use types::{
    AccountingMode, BindAddress, Bytes, Count, FindProcessMode, LogLevel, MaxSockets, Mode, Seconds,
};

use lines::line_of;

/// Everything the daemon reads from its config file. Every key has a default, so an empty
/// file (or no file) is a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Config {
    /// mihomo's `log-level`.
    pub log_level: LogLevel,
    /// Where byte counts come from.
    pub accounting: AccountingMode,
    /// The cgroup v2 directory whose sockets are accounted. Default: the daemon's own cgroup,
    /// or a child of it made for the daemon when its own cgroup is the root.
    pub accounting_cgroup: Option<PathBuf>,
    /// Capacity of each kernel socket map (TCP and UDP): how many sockets can be counted in
    /// the kernel at once. Sockets beyond it are counted in user space. Absent: sized to what
    /// the daemon can hold open (see [`auto_max_sockets`]).
    pub accounting_max_sockets: Option<MaxSockets>,
    /// mihomo's `find-process-mode`: `always`, `strict` (only when a rule needs the process)
    /// or `off`.
    pub find_process_mode: FindProcessMode,
    /// tpacct's: the cgroup v2 directory whose processes' sockets are attributed (the process
    /// hooks attach there). Default: the root, every process on the machine.
    pub process_cgroup: Option<PathBuf>,
    /// tpacct's OOM kill switch: above this much memory, flows are closed (newest first) and
    /// new ones refused for `memory-cooldown`. Absent: 80% of the cgroup's memory limit when
    /// there is one, else off; 0: off.
    pub memory_limit: Option<Bytes>,
    /// Close every flow on a trip instead of the newest until under 90% of the limit.
    pub memory_kill_all: bool,
    /// Seconds new flows are refused after a trip.
    pub memory_cooldown: Seconds<0, 3600>,
    /// tpacct's history of closed flows (SQLite).
    pub storage: StorageConfig,
    /// tpacct's device names: a MAC or an address → a name (nlbwmon's hosts).
    pub devices: IndexMap<String, String>,
    /// tpacct's: a DHCP lease file naming devices (dnsmasq, ISC dhcpd or Kea CSV).
    pub dhcp_leases: Option<PathBuf>,
    /// mihomo's `tproxy-port`: TCP and UDP TPROXY listener port; 0 turns it off.
    pub tproxy_port: u16,
    /// mihomo's `bind-address`: `*` (all addresses, IPv4 and IPv6) or one address.
    pub bind_address: BindAddress,
    /// mihomo's `mixed-port`: an HTTP and SOCKS5 proxy on one port (0: off).
    pub mixed_port: u16,
    /// mihomo's `port`: an HTTP proxy (0: off).
    pub port: u16,
    /// mihomo's `socks-port`: a SOCKS5 (and SOCKS4) proxy (0: off).
    pub socks_port: u16,
    /// mihomo's `allow-lan`: the proxy ports accept clients other than this host.
    pub allow_lan: bool,
    /// mihomo's `lan-allowed-ips`: with `allow-lan`, the clients accepted.
    pub lan_allowed_ips: Vec<ipnet::IpNet>,
    /// mihomo's `lan-disallowed-ips`: clients refused even when allowed above.
    pub lan_disallowed_ips: Vec<ipnet::IpNet>,
    /// mihomo's `authentication`: `user:pass` entries the proxy ports require.
    pub authentication: Vec<String>,
    /// mihomo's `skip-auth-prefixes`: clients that need no credentials.
    pub skip_auth_prefixes: Vec<ipnet::IpNet>,
    /// mihomo's `routing-mark`: SO_MARK on every outbound socket (0: none), so captured
    /// traffic never loops back into the proxy.
    pub routing_mark: u32,
    /// mihomo's `interface-name`: bind outbound sockets to this device (SO_BINDTODEVICE).
    pub interface_name: Option<String>,
    /// Concurrent TCP connections accepted by the TPROXY inbound; more wait in the backlog.
    pub max_connections: Count<1, 1_000_000>,
    /// Seconds an outbound TCP connect may take.
    pub connect_timeout: Seconds<1, 300>,
    /// Seconds a relayed TCP connection may stay idle in both directions (0: forever).
    pub tcp_idle_timeout: Seconds<0, 604_800>,
    /// Seconds a UDP session may stay idle before it is closed.
    pub udp_idle_timeout: Seconds<1, 86_400>,
    /// Concurrent UDP sessions; when full, the one idle longest is closed.
    pub udp_max_sessions: Count<1, 1_000_000>,
    /// How many closed flows are kept for the API.
    pub closed_connections: Count<1, 1_000_000>,
    /// mihomo's `sniffer`.
    pub sniffer: SniffConfig,
    /// Firewall rules tpacct installs and removes itself (off unless given).
    pub tproxy_firewall: Option<FirewallConfig>,
    /// tpacct's `fast-path`: DIRECT flows forwarded by the kernel, counted in tc eBPF.
    pub fast_path: FastPathConfig,
    /// mihomo's `external-controller`: where the Clash API listens (empty: off).
    pub external_controller: String,
    /// mihomo's `secret`: the API's bearer token. Absent: one generated at first start and
    /// kept in the state directory; an explicit empty string: no auth.
    pub secret: Option<String>,
    /// mihomo's `external-controller-cors`.
    pub external_controller_cors: Cors,
    /// mihomo's `external-ui`: a dashboard's static build (relative to the state directory),
    /// served at `/ui/<external-ui-name>/`.
    pub external_ui: Option<PathBuf>,
    /// mihomo's `external-ui-name`: the dashboard's folder inside `external-ui`, and its name
    /// in the URL (`dashboard` when unset; the folder is then `external-ui` itself).
    pub external_ui_name: Option<String>,
    /// tpacct's: `/metrics` alone on its own address, without the secret (for a Prometheus
    /// that scrapes locally); off unless given. `/metrics` on the controller is always there.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// mihomo's `mode`: `rule`, `global` or `direct`.
    pub mode: Mode,
    /// mihomo's `proxies`.
    pub proxies: Vec<ProxyConfig>,
    /// mihomo's `proxy-groups`.
    pub proxy_groups: Vec<GroupConfig>,
    /// tpacct's `circuit-breaker`: when dial and check failures mark an outbound dead.
    pub circuit_breaker: CircuitBreakerConfig,
    /// mihomo's `tls`: tpacct uses `custom-certifactes` (roots to trust for https health
    /// checks, providers and TLS proxies); the controller speaks plain HTTP.
    pub tls: TlsConfig,
    /// mihomo's `proxy-providers`.
    pub proxy_providers: IndexMap<String, ProxyProviderConfig>,
    /// mihomo's `rules`: `TYPE,PAYLOAD,TARGET[,OPTION…]`, first match wins.
    pub rules: Vec<String>,
    /// mihomo's `rule-providers`.
    pub rule_providers: IndexMap<String, RuleProviderConfig>,
    /// mihomo's `sub-rules`.
    pub sub_rules: SubRules,
    /// mihomo's `geox-url`.
    pub geox_url: GeoxUrl,
    /// mihomo's `geo-auto-update`.
    pub geo_auto_update: bool,
    /// mihomo's `geo-update-interval`, in hours.
    pub geo_update_interval: Count<1, 8760>,
    /// mihomo's `geodata-mode`: `true` reads GEOIP from `geoip.dat`, which tpacct does not.
    pub geodata_mode: bool,
    /// The state directory (`tpacctd run -d DIR`; not a config key).
    #[serde(skip)]
    pub directory: Option<PathBuf>,
    /// mihomo keys in the file that tpacct accepts and has no use for, with why.
    #[serde(skip)]
    pub ignored: Vec<(String, &'static str)>,
    /// The file this config was read from (reloads read it again).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `storage:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Keep every closed flow.
    pub enable: bool,
    /// The database file; default `history.db` in the state directory.
    pub path: Option<PathBuf>,
    /// Days closed flows are kept (per-minute rollups: 400 days).
    pub retention_days: Count<1, 36_500>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            enable: true,
            path: None,
            retention_days: Count(90),
        }
    }
}

/// `tls:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The controller's certificate: accepted, unused (it speaks plain HTTP).
    pub certificate: Option<String>,
    pub private_key: Option<String>,
    /// Extra roots (PEM text or a file), spelled as mihomo spells it.
    pub custom_certifactes: Vec<String>,
}

/// `external-controller-cors:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Cors {
    /// Origins allowed to call the API; `*` allows any.
    pub allow_origins: Vec<String>,
    /// Answer Chrome's private-network preflight.
    pub allow_private_network: bool,
}

impl Default for Cors {
    fn default() -> Self {
        Cors {
            allow_origins: vec!["*".to_owned()],
            allow_private_network: true,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            log_level: LogLevel::default(),
            accounting: AccountingMode::default(),
            accounting_cgroup: None,
            accounting_max_sockets: None,
            find_process_mode: FindProcessMode::default(),
            process_cgroup: None,
            memory_limit: None,
            memory_kill_all: false,
            memory_cooldown: Seconds(10),
            storage: StorageConfig::default(),
            devices: IndexMap::new(),
            dhcp_leases: None,
            tproxy_port: 7893,
            bind_address: BindAddress::Any,
            mixed_port: 0,
            port: 0,
            socks_port: 0,
            allow_lan: false,
            lan_allowed_ips: vec![
                "0.0.0.0/0".parse().unwrap_or_else(|_| unreachable!()),
                "::/0".parse().unwrap_or_else(|_| unreachable!()),
            ],
            lan_disallowed_ips: Vec::new(),
            authentication: Vec::new(),
            skip_auth_prefixes: Vec::new(),
            routing_mark: 0,
            interface_name: None,
            max_connections: Count(16_384),
            connect_timeout: Seconds(5),
            tcp_idle_timeout: Seconds(3600),
            udp_idle_timeout: Seconds(60),
            udp_max_sessions: Count(4096),
            closed_connections: Count(1000),
            sniffer: SniffConfig::gateway(),
            tproxy_firewall: None,
            fast_path: FastPathConfig::default(),
            external_controller: "127.0.0.1:9090".to_owned(),
            secret: None,
            external_controller_cors: Cors::default(),
            external_ui: None,
            external_ui_name: None,
            metrics_address: None,
            mode: Mode::default(),
            proxies: Vec::new(),
            proxy_groups: Vec::new(),
            circuit_breaker: CircuitBreakerConfig::default(),
            tls: TlsConfig::default(),
            proxy_providers: IndexMap::new(),
            // Without `rules:`, everything goes DIRECT by the `Match` rule.
            rules: vec!["MATCH,DIRECT".to_owned()],
            rule_providers: IndexMap::new(),
            sub_rules: SubRules::new(),
            geox_url: GeoxUrl::default(),
            geo_auto_update: false,
            geo_update_interval: Count(24),
            geodata_mode: false,
            directory: None,
            ignored: Vec::new(),
            source: None,
        }
    }
}

impl Config {
    /// What [`crate::accounting::Accounting::start`] needs.
    pub fn accounting(&self) -> AccountingSettings {
        AccountingSettings {
            mode: self.accounting,
            cgroup: self.accounting_cgroup.clone(),
            max_sockets: self.accounting_max_sockets.map_or_else(
                || auto_max_sockets(self.accounting_cgroup.is_some(), hard_open_files()),
                |m| m.0,
            ),
            close_ring_bytes: tpacct_common::CLOSE_RING_BYTES,
            processes: (self.find_process_mode != FindProcessMode::Off).then(|| ProcessHooks {
                cgroup: self.process_cgroup.clone(),
            }),
        }
    }
}

/// The socket maps' capacity when the config leaves it out. In the daemon's own cgroup only
/// its sockets are counted: at most its open-files limit, twice over for sockets still
/// closing after their descriptor went (FIN_WAIT, LAST_ACK), rounded up to the power of two
/// the kernel sizes a hash map's buckets to. A batch read walks every bucket, so a map no
/// larger than needed keeps `/connections` and the sampler cheap. A cgroup given in the
/// config may hold other processes: the full [`tpacct_common::MAX_SOCKETS`] then.
pub fn auto_max_sockets(shared_cgroup: bool, open_files: Option<u64>) -> u32 {
    const MIN: u32 = 16_384;
    match open_files {
        Some(n) if !shared_cgroup => u32::try_from(n.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .checked_next_power_of_two()
            .unwrap_or(u32::MAX)
            .clamp(MIN, tpacct_common::MAX_SOCKETS),
        _ => tpacct_common::MAX_SOCKETS,
    }
}

/// This process's hard open-files limit (what the inbounds raise the soft one to).
fn hard_open_files() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(_, hard)| hard)
        .filter(|&hard| hard != nix::sys::resource::RLIM_INFINITY)
}

/// The accounting part of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountingSettings {
    pub mode: AccountingMode,
    pub cgroup: Option<PathBuf>,
    pub max_sockets: u32,
    /// Size of the close-event ring in bytes (a power of two, at least one page).
    pub close_ring_bytes: u32,
    /// Where the process hooks attach; None: not attached.
    pub processes: Option<ProcessHooks>,
}

/// The process-attribution hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessHooks {
    /// The cgroup watched; None: the root.
    pub cgroup: Option<PathBuf>,
}

impl AccountingSettings {
    /// Defaults with `mode`.
    pub fn with_mode(mode: AccountingMode) -> AccountingSettings {
        AccountingSettings {
            mode,
            ..Config::default().accounting()
        }
    }
}

/// A config that could not be read or understood.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", describe(.file, .key, .line, .message))]
    Invalid {
        file: String,
        /// The offending key as a dotted path (`accounting`, `proxies[0].port`), when known.
        key: Option<String>,
        line: Option<usize>,
        message: String,
    },
}

fn describe(file: &str, key: &Option<String>, line: &Option<usize>, message: &str) -> String {
    let mut out = format!("config error in {file}");
    if let Some(line) = line {
        out.push_str(&format!(" line {line}"));
    }
    if let Some(key) = key {
        out.push_str(&format!(", key `{key}`"));
    }
    out.push_str(": ");
    out.push_str(message);
    out
}

impl Error {
    /// The offending key, when the error is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Error::Invalid { key, .. } => key.as_deref(),
            Error::Read { .. } => None,
        }
    }

    /// The 1-based line of the error, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Error::Invalid { line, .. } => *line,
            Error::Read { .. } => None,
        }
    }
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, &path.display().to_string())?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses YAML `text`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, Error> {
        // An empty document (or only comments) is the all-defaults config.
        if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            return Ok(Config::default());
        }
        let invalid = |key: Option<String>, line: Option<usize>, message: String| Error::Invalid {
            file: file.to_owned(),
            key,
            line,
            message,
        };
        let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(|e| {
            invalid(
                None,
                e.location().map(|l| l.line()),
                strip_location(&e.to_string()),
            )
        })?;
        // YAML merge keys (`<<: *anchor`), common in mihomo configs.
        value
            .apply_merge()
            .map_err(|e| invalid(None, None, e.to_string()))?;
        let ignored = ignored::remove(&mut value);
        let mut config: Config = serde_path_to_error::deserialize(value).map_err(|err| {
            let path = err.path().to_string();
            let message = strip_location(&err.into_inner().to_string());
            // The path names the offending key, unknown ones included; at the top level of a
            // malformed document it is "." and the message may still name a field.
            let key = (path != ".")
                .then_some(path)
                .or_else(|| unknown_field(&message).map(str::to_owned));
            let line = key.as_deref().and_then(|k| line_of(text, k));
            invalid(key, line, message)
        })?;
        config.ignored = ignored;
        config.validate(text, file)?;
        Ok(config)
    }

    /// Rules that span keys.
    fn validate(&self, text: &str, file: &str) -> Result<(), Error> {
        let invalid = |key: &str, message: String| Error::Invalid {
            file: file.to_owned(),
            key: Some(key.to_owned()),
            line: line_of(text, key),
            message,
        };
        if let Some(fw) = &self.tproxy_firewall {
            if self.tproxy_port == 0 {
                return Err(invalid(
                    "tproxy-firewall",
                    "needs `tproxy-port` set: the rules send traffic to it".into(),
                ));
            }
            if fw.local && self.routing_mark == 0 {
                return Err(invalid(
                    "tproxy-firewall.local",
                    "capturing this host's own traffic needs a `routing-mark` so the proxy's \
                     own connections are not captured again"
                        .into(),
                ));
            }
            if fw.fwmark == 0 {
                return Err(invalid(
                    "tproxy-firewall.fwmark",
                    "must not be 0: unmarked packets would all go to the proxy table".into(),
                ));
            }
            if matches!(fw.table, 0 | 253..=255) {
                return Err(invalid(
                    "tproxy-firewall.table",
                    format!(
                        "{} is reserved (0 unspecified, 253 default, 254 main, 255 local): \
                         use 1 to 252 or above 255",
                        fw.table
                    ),
                ));
            }
            if fw.fwmark == self.routing_mark {
                return Err(invalid(
                    "tproxy-firewall.fwmark",
                    "must differ from `routing-mark`".into(),
                ));
            }
        }
        self.fast_path
            .check(self.tproxy_firewall.as_ref(), self.routing_mark)
            .map_err(|(key, message)| invalid(&key, message))?;
        crate::route::check::check(self).map_err(|(key, message)| invalid(&key, message))?;
        if let Err(e) = crate::tls::parse(&self.tls.custom_certifactes) {
            let i = match e {
                crate::tls::Error::NoCertificate(i) | crate::tls::Error::Rejected(i, _) => i,
            };
            return Err(invalid(
                &format!("tls.custom-certifactes[{i}]"),
                e.to_string(),
            ));
        }
        for (i, entry) in self.authentication.iter().enumerate() {
            if !entry.contains(':') {
                return Err(invalid(
                    &format!("authentication[{i}]"),
                    format!("`{entry}` is not `user:pass`"),
                ));
            }
        }
        let ports = [
            ("tproxy-port", self.tproxy_port),
            ("mixed-port", self.mixed_port),
            ("port", self.port),
            ("socks-port", self.socks_port),
        ];
        for (i, (a, pa)) in ports.iter().enumerate() {
            for (b, pb) in &ports[i + 1..] {
                if *pa != 0 && pa == pb {
                    return Err(invalid(b, format!("{pb} is already `{a}`")));
                }
            }
        }
        if !self.external_controller.is_empty()
            && self
                .external_controller
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(invalid(
                "external-controller",
                format!(
                    "`{}` is not an address:port (e.g. 127.0.0.1:9090; empty turns the API off)",
                    self.external_controller
                ),
            ));
        }
        if let Some(name) = &self.external_ui_name
            && (name.is_empty()
                || name == "."
                || name == ".."
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                || ["usage.js", "usage.css"].contains(&name.as_str()))
        {
            return Err(invalid(
                "external-ui-name",
                format!("`{name}` is not a folder name of letters, digits, `.`, `_` and `-`"),
            ));
        }
        Ok(())
    }

    /// The dashboard's folder (`external-ui`, then `external-ui-name` inside it) and the name
    /// it is served under, when one is configured.
    pub fn external_ui(&self, state_dir: &Path) -> Option<(PathBuf, &str)> {
        let base = self.external_ui.as_ref()?;
        let base = if base.is_absolute() {
            base.clone()
        } else {
            state_dir.join(base)
        };
        Some(match &self.external_ui_name {
            Some(name) => (base.join(name), name.as_str()),
            None => (base, "dashboard"),
        })
    }
}

/// serde_yaml appends " at line L column C"; the line is reported separately.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The field named by serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.split_once("unknown field `")?.1;
    Some(&rest[..rest.find('`')?])
}
