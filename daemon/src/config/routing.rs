//! mihomo's routing keys: `proxies`, `proxy-groups`, `proxy-providers`, `rules`,
//! `rule-providers`, `sub-rules` and the geodata keys. Parsed here into typed values; rule
//! strings are parsed and checked by `route::rules` (so that errors name `rules[i]`).

use std::path::PathBuf;

use indexmap::IndexMap;
use serde::Deserialize;

/// One entry of `proxies:` (mihomo's keys for the types tpacct speaks).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProxyConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ProxyKind,
    pub server: String,
    pub port: u16,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// SOCKS5: UDP through UDP ASSOCIATE.
    #[serde(default)]
    pub udp: bool,
    /// Speak to the proxy over TLS (an HTTPS proxy; SOCKS5 over TLS).
    #[serde(default)]
    pub tls: bool,
    /// The TLS server name (default: `server`).
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub skip_cert_verify: bool,
    /// HTTP: extra request headers sent with CONNECT.
    #[serde(default)]
    pub headers: IndexMap<String, String>,
    /// Bind this proxy's sockets to a device (`SO_BINDTODEVICE`).
    #[serde(default)]
    pub interface_name: Option<String>,
    /// `SO_MARK` on this proxy's sockets (default: the global `routing-mark`).
    #[serde(default)]
    pub routing_mark: Option<u32>,
    /// Reach this proxy's server through another outbound (a proxy or group name).
    #[serde(default)]
    pub dialer_proxy: Option<String>,
    /// Which addresses of a server name are tried.
    #[serde(default)]
    pub ip_version: IpVersion,
    /// TCP Fast Open towards the proxy server.
    #[serde(default)]
    pub tfo: bool,
    /// Multipath TCP towards the proxy server.
    #[serde(default)]
    pub mptcp: bool,
}

/// `proxies[].type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyKind {
    Socks5,
    Http,
}

impl ProxyKind {
    /// The type Clash clients show.
    pub fn clash_name(self) -> &'static str {
        match self {
            ProxyKind::Socks5 => "Socks5",
            ProxyKind::Http => "Http",
        }
    }
}

/// Which addresses of a server name are used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IpVersion {
    #[default]
    Dual,
    Ipv4,
    Ipv6,
    Ipv4Prefer,
    Ipv6Prefer,
}

/// One entry of `proxy-groups:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: GroupKind,
    #[serde(default)]
    pub proxies: Vec<String>,
    /// Proxy providers whose proxies join the group.
    #[serde(default, rename = "use")]
    pub uses: Vec<String>,
    /// Every proxy of `proxies:` (and, for `include-all`, every provider's).
    #[serde(default)]
    pub include_all: bool,
    #[serde(default)]
    pub include_all_proxies: bool,
    #[serde(default)]
    pub include_all_providers: bool,
    /// Regex: only proxies whose name matches join (from providers and include-all).
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub exclude_filter: Option<String>,
    /// Health checks (url-test, fallback, load-balance).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub interval: Option<u64>,
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub lazy: Option<bool>,
    #[serde(default)]
    pub tolerance: Option<i64>,
    #[serde(default)]
    pub expected_status: Option<String>,
    #[serde(default)]
    pub max_failed_times: Option<u32>,
    #[serde(default)]
    pub strategy: Option<String>,
    #[serde(default)]
    pub interrupt_exist_connections: bool,
    #[serde(default)]
    pub disable_udp: bool,
    #[serde(default)]
    pub hidden: bool,
    #[serde(default)]
    pub icon: String,
    /// sing-box's `idle_timeout` (seconds): a lazy group stops checking after no flow used
    /// it this long (default 1800).
    #[serde(default)]
    pub idle_timeout: Option<super::Seconds<1, 604_800>>,
    /// tpacct: how long a sticky session keeps its member unused (seconds, default 1800).
    #[serde(default)]
    pub affinity_ttl: Option<super::Seconds<1, 604_800>>,
}

/// `proxy-groups[].type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupKind {
    Select,
    UrlTest,
    Fallback,
    LoadBalance,
}

impl GroupKind {
    /// The type Clash clients show (`Selector`, `URLTest`, ...).
    pub fn clash_name(self) -> &'static str {
        match self {
            GroupKind::Select => "Selector",
            GroupKind::UrlTest => "URLTest",
            GroupKind::Fallback => "Fallback",
            GroupKind::LoadBalance => "LoadBalance",
        }
    }
}

/// `type:` of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vehicle {
    File,
    Http,
    Inline,
}

impl Vehicle {
    /// As Clash clients show it.
    pub fn clash_name(self) -> &'static str {
        match self {
            Vehicle::File => "File",
            Vehicle::Http => "HTTP",
            Vehicle::Inline => "Inline",
        }
    }
}

/// One entry of `rule-providers:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RuleProviderConfig {
    #[serde(rename = "type")]
    pub vehicle: Vehicle,
    pub behavior: Behavior,
    #[serde(default)]
    pub format: RuleFormat,
    /// Where the copy lives (file: required; http: default `rules/<name>.yaml|txt` in the
    /// state directory).
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub url: Option<String>,
    /// Seconds between refreshes of an http provider (0: only at start).
    #[serde(default)]
    pub interval: u64,
    /// The outbound an http provider is fetched through (default DIRECT).
    #[serde(default)]
    pub proxy: Option<String>,
    /// Largest download accepted, in bytes (0: tpacct's default of 64 MiB).
    #[serde(default)]
    pub size_limit: u64,
    /// `type: inline`: the entries themselves.
    #[serde(default)]
    pub payload: Vec<String>,
}

/// `behavior:` of a rule provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Behavior {
    Domain,
    Ipcidr,
    Classical,
}

impl Behavior {
    pub fn clash_name(self) -> &'static str {
        match self {
            Behavior::Domain => "Domain",
            Behavior::Ipcidr => "IPCIDR",
            Behavior::Classical => "Classical",
        }
    }
}

/// `format:` of a rule provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleFormat {
    #[default]
    Yaml,
    Text,
    /// mihomo's binary format: not read by tpacct (a config error says so).
    Mrs,
}

/// One entry of `proxy-providers:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ProxyProviderConfig {
    #[serde(rename = "type")]
    pub vehicle: Vehicle,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub interval: u64,
    #[serde(default)]
    pub proxy: Option<String>,
    #[serde(default)]
    pub size_limit: u64,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub exclude_filter: Option<String>,
    #[serde(default)]
    pub health_check: HealthCheckConfig,
    /// `type: inline`: the proxies themselves.
    #[serde(default)]
    pub payload: Vec<ProxyConfig>,
}

/// `circuit-breaker:` (tpacct): when real dials and checks mark an outbound dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Failures within `failure-window` that open the breaker.
    pub max_failures: super::Count<1, 1000>,
    pub failure_window: super::Seconds<1, 86_400>,
    /// How long an opened breaker keeps the outbound dead; doubled on each failed retry.
    pub recovery_time: super::Seconds<1, 86_400>,
    /// The cap of that doubling.
    pub max_recovery_time: super::Seconds<1, 604_800>,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            max_failures: super::Count(3),
            failure_window: super::Seconds(300),
            recovery_time: super::Seconds(60),
            max_recovery_time: super::Seconds(1800),
        }
    }
}

/// `proxy-providers[].health-check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HealthCheckConfig {
    #[serde(default)]
    pub enable: bool,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub interval: Option<u64>,
    #[serde(default)]
    pub timeout: Option<u64>,
    #[serde(default)]
    pub lazy: Option<bool>,
    #[serde(default)]
    pub expected_status: Option<String>,
}

/// `geox-url:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct GeoxUrl {
    pub geoip: String,
    pub mmdb: String,
    pub geosite: String,
    pub asn: String,
}

impl Default for GeoxUrl {
    fn default() -> Self {
        let base = "https://github.com/MetaCubeX/meta-rules-dat/releases/download/latest";
        GeoxUrl {
            geoip: format!("{base}/geoip.dat"),
            mmdb: format!("{base}/geoip.metadb"),
            geosite: format!("{base}/geosite.dat"),
            asn: format!("{base}/GeoLite2-ASN.mmdb"),
        }
    }
}

/// Named rule lists for `SUB-RULE`.
pub type SubRules = IndexMap<String, Vec<String>>;
