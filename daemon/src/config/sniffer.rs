//! mihomo's `sniffer:` block, for what tpacct sniffs: the TLS ClientHello SNI and the HTTP/1
//! `Host` header. On by default, on every port.

use std::ops::RangeInclusive;

use serde::Deserialize;

/// `sniffer:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SniffConfig {
    pub enable: bool,
    pub sniff: Protocols,
}

impl Default for SniffConfig {
    fn default() -> Self {
        SniffConfig {
            enable: true,
            sniff: Protocols::default(),
        }
    }
}

/// `sniffer.sniff:`. Keys are upper-case as in mihomo.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Protocols {
    #[serde(rename = "HTTP")]
    pub http: Option<Ports>,
    #[serde(rename = "TLS")]
    pub tls: Option<Ports>,
}

/// `ports: [80, 8080-8880]`; absent means every port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Ports {
    pub ports: Option<Vec<PortRange>>,
}

/// One port or an inclusive range `a-b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Port(u16),
            Text(String),
        }
        let bad = |t: &str| serde::de::Error::custom(format!("`{t}` is not a port or a-b range"));
        match Raw::deserialize(d)? {
            Raw::Port(p) => Ok(PortRange(p..=p)),
            Raw::Text(t) => {
                let (a, b) = t.split_once('-').unwrap_or((&t, &t));
                let (a, b) = (
                    a.trim().parse::<u16>().map_err(|_| bad(&t))?,
                    b.trim().parse::<u16>().map_err(|_| bad(&t))?,
                );
                if a > b {
                    return Err(bad(&t));
                }
                Ok(PortRange(a..=b))
            }
        }
    }
}

impl SniffConfig {
    /// Whether the HTTP sniffer looks at flows to `port`.
    pub fn http_on(&self, port: u16) -> bool {
        self.enable && covers(&self.sniff.http, port)
    }

    /// Whether the TLS sniffer looks at flows to `port`.
    pub fn tls_on(&self, port: u16) -> bool {
        self.enable && covers(&self.sniff.tls, port)
    }
}

fn covers(ports: &Option<Ports>, port: u16) -> bool {
    match ports.as_ref().and_then(|p| p.ports.as_ref()) {
        None => true,
        Some(ranges) => ranges.iter().any(|r| r.0.contains(&port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SniffConfig {
        serde_yaml_ng::from_str(text).expect("valid sniffer")
    }

    #[test]
    fn defaults_sniff_everything() {
        let c = SniffConfig::default();
        assert!(c.http_on(1) && c.tls_on(65535));
    }

    #[test]
    fn ports_and_ranges_limit_sniffing() {
        let c = parse("sniff:\n  HTTP:\n    ports: [80, 8080-8880]\n  TLS:\n    ports: ['443']\n");
        assert!(c.http_on(80) && c.http_on(8080) && c.http_on(8880) && !c.http_on(8881));
        assert!(c.tls_on(443) && !c.tls_on(8443));
        assert!(!parse("enable: false\n").tls_on(443));
    }

    #[test]
    fn bad_ranges_are_rejected() {
        for bad in [
            "sniff: {HTTP: {ports: [9-1]}}",
            "sniff: {TLS: {ports: [x]}}",
        ] {
            assert!(
                serde_yaml_ng::from_str::<SniffConfig>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
