//! mihomo's `sniffer:` block, for what tpacct sniffs: the TLS ClientHello's SNI and the
//! HTTP/1 `Host` header (QUIC is accepted in the block and not sniffed; names of QUIC flows
//! come from the DNS answers tpacct relays).
//!
//! Keys take mihomo's defaults when the block is written (`enable: false`,
//! `override-destination: true`, `parse-pure-ip: true`, `force-dns-mapping: true`). Without a
//! `sniffer:` block tpacct sniffs by default: HTTP on 80 and 8080-8880, TLS on 443 and 8443,
//! without overriding the destination (a transparent gateway dials the address the client
//! asked for).

use std::{ops::RangeInclusive, time::Duration};

use indexmap::IndexMap;
use ipnet::IpNet;
use serde::Deserialize;

/// `sniffer:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SniffConfig {
    pub enable: bool,
    /// Sniffers by protocol: `HTTP`, `TLS`, `QUIC`.
    pub sniff: IndexMap<Protocol, Sniffer>,
    /// Dial the sniffed host instead of the original address (per-protocol override below).
    pub override_destination: bool,
    /// Hosts sniffed even when the flow already has one (mihomo's domain patterns).
    pub force_domain: Vec<String>,
    /// Sniffed hosts that are ignored.
    pub skip_domain: Vec<String>,
    pub skip_src_address: Vec<IpNet>,
    pub skip_dst_address: Vec<IpNet>,
    /// Sniff flows that have only an IP destination (all TPROXY flows).
    pub parse_pure_ip: bool,
    /// Sniff flows whose host came from DNS mapping too.
    pub force_dns_mapping: bool,
    /// How long a flow on a sniffed port waits for the client's first bytes before it is
    /// routed by IP (tpacct's key; mihomo waits one second).
    pub timeout: Millis,
}

/// Milliseconds, 1 ..= 60,000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u64")]
pub struct Millis(pub u64);

impl TryFrom<u64> for Millis {
    type Error = String;

    fn try_from(n: u64) -> Result<Millis, String> {
        if (1..=60_000).contains(&n) {
            Ok(Millis(n))
        } else {
            Err(format!("{n} ms is out of range: use 1 ms to 60000 ms"))
        }
    }
}

/// The protocols mihomo names in `sniff:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Http,
    Tls,
    Quic,
}

/// `sniff.<PROTOCOL>:`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Sniffer {
    /// Ports sniffed (absent: every port).
    pub ports: Option<Vec<PortRange>>,
    /// Overrides the block's `override-destination` for this protocol.
    pub override_destination: Option<bool>,
}

impl Default for SniffConfig {
    /// mihomo's defaults for a written `sniffer:` block.
    fn default() -> Self {
        SniffConfig {
            enable: false,
            sniff: IndexMap::new(),
            override_destination: true,
            force_domain: Vec::new(),
            skip_domain: Vec::new(),
            skip_src_address: Vec::new(),
            skip_dst_address: Vec::new(),
            parse_pure_ip: true,
            force_dns_mapping: true,
            timeout: Millis(1000),
        }
    }
}

impl SniffConfig {
    /// tpacct's behaviour without a `sniffer:` block.
    pub fn gateway() -> SniffConfig {
        let ports = |r: &[RangeInclusive<u16>]| Sniffer {
            ports: Some(r.iter().cloned().map(PortRange).collect()),
            override_destination: None,
        };
        SniffConfig {
            enable: true,
            sniff: IndexMap::from([
                (Protocol::Http, ports(&[80..=80, 8080..=8880])),
                (Protocol::Tls, ports(&[443..=443, 8443..=8443])),
            ]),
            override_destination: false,
            ..SniffConfig::default()
        }
    }

    /// Which sniffers look at TCP flows to `port`: (TLS, HTTP), and whether a name found
    /// overrides the destination.
    pub fn tcp_sniffers(&self, port: u16) -> Option<TcpSniff> {
        if !self.enable {
            return None;
        }
        let on = |p: Protocol| self.sniff.get(&p).filter(|s| s.covers(port));
        let (tls, http) = (on(Protocol::Tls), on(Protocol::Http));
        if tls.is_none() && http.is_none() {
            return None;
        }
        let override_destination = [tls, http]
            .into_iter()
            .flatten()
            .find_map(|s| s.override_destination)
            .unwrap_or(self.override_destination);
        Some(TcpSniff {
            tls: tls.is_some(),
            http: http.is_some(),
            override_destination,
            timeout: Duration::from_millis(self.timeout.0),
            forced: false,
        })
    }
}

/// What sniffing does for one TCP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSniff {
    pub tls: bool,
    pub http: bool,
    pub override_destination: bool,
    pub timeout: Duration,
    /// The flow's host is in `force-domain` (its failures are not counted).
    pub forced: bool,
}

impl Sniffer {
    fn covers(&self, port: u16) -> bool {
        match &self.ports {
            None => true,
            Some(ranges) => ranges.iter().any(|r| r.0.contains(&port)),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SniffConfig {
        serde_yaml_ng::from_str(text).expect("valid sniffer")
    }

    #[test]
    fn the_gateway_default_sniffs_web_ports_without_overriding() {
        let c = SniffConfig::gateway();
        let s = c.tcp_sniffers(443).expect("TLS on 443");
        assert!(s.tls && !s.http && !s.override_destination);
        assert!(c.tcp_sniffers(8080).expect("HTTP").http);
        assert_eq!(
            c.tcp_sniffers(25),
            None,
            "a server-first port is not waited on"
        );
    }

    #[test]
    fn a_written_block_takes_mihomos_defaults() {
        let c = parse(
            "enable: true\nsniff:\n  HTTP:\n    ports: [80, 8080-8880]\n  TLS:\n    ports: ['443']\n",
        );
        assert!(c.tcp_sniffers(8880).expect("http").override_destination);
        assert!(c.tcp_sniffers(443).expect("tls").tls);
        assert_eq!(c.tcp_sniffers(8881), None);
        assert!(c.parse_pure_ip && c.force_dns_mapping);
        assert_eq!(
            parse("sniff: {TLS: {}}\n").tcp_sniffers(443),
            None,
            "enable: false"
        );
        let c = parse("enable: true\nsniff: {TLS: {override-destination: false}}\n");
        assert!(!c.tcp_sniffers(1).expect("every port").override_destination);
    }

    #[test]
    fn bad_values_are_rejected() {
        for bad in [
            "sniff: {HTTP: {ports: [9-1]}}",
            "sniff: {TLS: {ports: [x]}}",
            "sniff: {SSH: {}}",
            "timeout: 0",
        ] {
            assert!(
                serde_yaml_ng::from_str::<SniffConfig>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
