//! `tproxy-firewall:`: the nftables table and policy routing tpacct installs (and removes) so
//! that traffic arriving on the listed LAN interfaces reaches the TPROXY listener.

use ipnet::IpNet;
use serde::Deserialize;

/// `tproxy-firewall:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct FirewallConfig {
    /// LAN interfaces whose forwarded TCP and UDP is captured.
    pub interfaces: Vec<String>,
    /// Also capture this host's own outgoing traffic (needs `routing-mark`).
    pub local: bool,
    /// Destinations never captured, besides this host's own addresses, broadcast and multicast.
    pub bypass: Vec<IpNet>,
    /// Packet mark that routes captured packets to the local table.
    pub fwmark: u32,
    /// Routing table holding `local default dev lo`.
    pub table: u32,
    /// nftables table name (family inet).
    pub nft_table: String,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        FirewallConfig {
            interfaces: Vec::new(),
            local: false,
            bypass: Vec::new(),
            fwmark: 0x1,
            table: 100,
            nft_table: "tpacct".to_owned(),
        }
    }
}

/// tpacct's `fast-path:`: flows whose first packet already decides them DIRECT are forwarded
/// by the kernel (not proxied) and counted in tc eBPF on the listed LAN interfaces.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct FastPathConfig {
    pub enable: bool,
    /// LAN interfaces the tc programs attach to (clients' side).
    pub interfaces: Vec<String>,
    /// Packet and conntrack mark bit of a forwarded flow (nftables skips TPROXY for it).
    pub mark: u32,
    /// Packet mark bit of a packet the program counted.
    pub counted_mark: u32,
    /// Concurrent forwarded flows; more are proxied.
    pub max_flows: u32,
    /// Seconds a forwarded TCP flow may stay silent before it is dropped from the count.
    pub tcp_idle_timeout: u64,
}

impl Default for FastPathConfig {
    fn default() -> Self {
        FastPathConfig {
            enable: false,
            interfaces: Vec::new(),
            mark: 0x4000_0000,
            counted_mark: 0x2000_0000,
            max_flows: 65_536,
            tcp_idle_timeout: 7_440,
        }
    }
}

impl FastPathConfig {
    /// What is wrong with it next to the firewall and `routing-mark`: (key, message).
    pub fn check(
        &self,
        firewall: Option<&FirewallConfig>,
        routing_mark: u32,
    ) -> Result<(), (String, String)> {
        if !self.enable {
            return Ok(());
        }
        let bad = |key: &str, message: &str| Err((format!("fast-path.{key}"), message.to_owned()));
        let Some(fw) = firewall else {
            return bad(
                "enable",
                "needs `tproxy-firewall`: its nftables rules are what let a forwarded flow skip the proxy",
            );
        };
        if self.interfaces.is_empty() {
            return bad("interfaces", "name at least one LAN interface");
        }
        if self.mark == 0 || self.counted_mark == 0 || self.mark & self.counted_mark != 0 {
            return bad(
                "mark",
                "`mark` and `counted-mark` must be non-zero and share no bit",
            );
        }
        let both = self.mark | self.counted_mark;
        if both & fw.fwmark != 0 || both & routing_mark != 0 {
            return bad(
                "mark",
                "must share no bit with `tproxy-firewall.fwmark` or `routing-mark`",
            );
        }
        if self.max_flows == 0 {
            return bad("max-flows", "must be at least 1");
        }
        if self.tcp_idle_timeout == 0 {
            return bad("tcp-idle-timeout", "must be at least 1 second");
        }
        Ok(())
    }
}
