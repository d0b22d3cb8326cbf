//! The value types config keys use: ranged numbers, addresses, and mihomo's enums.

use std::{fmt, net::IpAddr, time::Duration};

use serde::Deserialize;

/// mihomo's routing modes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Rule,
    Global,
    Direct,
}

/// A number of things in `MIN ..= MAX`; anything else is a config error naming the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u64")]
pub struct Count<const MIN: u64, const MAX: u64>(pub u64);

impl<const MIN: u64, const MAX: u64> TryFrom<u64> for Count<MIN, MAX> {
    type Error = String;

    fn try_from(n: u64) -> Result<Self, String> {
        in_range::<MIN, MAX>(n, "").map(Count)
    }
}

impl<const MIN: u64, const MAX: u64> Count<MIN, MAX> {
    pub fn get(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

fn in_range<const MIN: u64, const MAX: u64>(n: u64, unit: &str) -> Result<u64, String> {
    if (MIN..=MAX).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n}{unit} is out of range: use {MIN}{unit} to {MAX}{unit}"
        ))
    }
}

/// A size in bytes: a number, or a number with a unit as systemd writes them (`K`, `M`, `G`,
/// `T`, optionally followed by `B` or `iB`; all powers of 1024): `512M`, `1.5GiB`, `65536`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "serde_yaml_ng::Value")]
pub struct Bytes(pub u64);

impl TryFrom<serde_yaml_ng::Value> for Bytes {
    type Error = String;

    fn try_from(v: serde_yaml_ng::Value) -> Result<Self, String> {
        match v {
            serde_yaml_ng::Value::Number(n) => n
                .as_u64()
                .map(Bytes)
                .ok_or_else(|| format!("{n} is not a size in bytes")),
            serde_yaml_ng::Value::String(s) => s.parse(),
            other => Err(format!("{other:?} is not a size (use e.g. 512M or 1GiB)")),
        }
    }
}

impl std::str::FromStr for Bytes {
    type Err = String;

    fn from_str(text: &str) -> Result<Bytes, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let unit = unit.trim();
        let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
            "" => 0,
            "K" | "k" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (use K, M, G or T)"
                ));
            }
        };
        let n: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size (use e.g. 512M or 1GiB)"))?;
        let bytes = n * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{text:?} is too large"));
        }
        Ok(Bytes(bytes as u64))
    }
}

/// Whole seconds in `MIN ..= MAX`, as config files give timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u64")]
pub struct Seconds<const MIN: u64, const MAX: u64>(pub u64);

impl<const MIN: u64, const MAX: u64> TryFrom<u64> for Seconds<MIN, MAX> {
    type Error = String;

    fn try_from(n: u64) -> Result<Self, String> {
        in_range::<MIN, MAX>(n, " s").map(Seconds)
    }
}

impl<const MIN: u64, const MAX: u64> Seconds<MIN, MAX> {
    /// As a duration; `None` for 0 where 0 means "never".
    pub fn or_never(self) -> Option<Duration> {
        (self.0 > 0).then(|| Duration::from_secs(self.0))
    }

    pub fn duration(self) -> Duration {
        Duration::from_secs(self.0)
    }
}

/// `*` or one IP address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BindAddress {
    #[default]
    Any,
    One(IpAddr),
}

impl<'de> Deserialize<'de> for BindAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "*" | "" => Ok(BindAddress::Any),
            ip => ip.parse().map(BindAddress::One).map_err(|_| {
                serde::de::Error::custom(format!("`{ip}` is neither `*` nor an IP address"))
            }),
        }
    }
}

/// A map capacity: 1 ..= 16,777,216.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u64")]
pub struct MaxSockets(pub u32);

impl TryFrom<u64> for MaxSockets {
    type Error = String;

    fn try_from(n: u64) -> Result<MaxSockets, String> {
        match u32::try_from(n) {
            Ok(n @ 1..=16_777_216) => Ok(MaxSockets(n)),
            _ => Err(format!("{n} is out of range: use 1 to 16777216")),
        }
    }
}

/// mihomo's log levels.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    Warning,
    Error,
    Silent,
}

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warning => "warn",
            LogLevel::Error => "error",
            LogLevel::Silent => "off",
        }
    }
}

/// mihomo's `find-process-mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FindProcessMode {
    /// Every flow from a local process.
    Always,
    /// Only when the rules have a process or UID rule (mihomo's default).
    #[default]
    Strict,
    /// Never.
    Off,
}

/// `accounting: auto | ebpf | userspace`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountingMode {
    /// eBPF when it can be used, else user space (saying why).
    #[default]
    Auto,
    /// eBPF or fail.
    Ebpf,
    /// Count in the relay.
    Userspace,
}

impl fmt::Display for AccountingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccountingMode::Auto => "auto",
            AccountingMode::Ebpf => "ebpf",
            AccountingMode::Userspace => "userspace",
        })
    }
}
