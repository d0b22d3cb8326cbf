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
