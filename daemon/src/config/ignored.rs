//! mihomo keys tpacct accepts and has no use for, so that a user's mihomo config runs
//! unchanged: each is removed before parsing and named, with why, in the start-up log. Keys
//! that are neither tpacct's nor mihomo's are still errors (a typo is never ignored).

use serde_yaml_ng::Value;

/// (key, why tpacct does without it).
const IGNORED: &[(&str, &str)] = &[
    (
        "dns",
        "tpacct runs no DNS server: names come from sniffing and from the DNS answers it relays",
    ),
    ("hosts", "tpacct runs no DNS server"),
    ("tun", "tpacct captures with TPROXY, not a TUN device"),
    ("auto-redir", "tpacct captures with TPROXY"),
    ("redir-port", "tpacct captures with TPROXY"),
    (
        "iptables",
        "tpacct installs nftables rules itself (tproxy-firewall)",
    ),
    (
        "ebpf",
        "tpacct's eBPF programs count bytes; they do not redirect",
    ),
    (
        "profile",
        "group choices are always kept in the state directory",
    ),
    ("ipv6", "IPv6 is always on"),
    (
        "unified-delay",
        "delays are always measured to the response headers",
    ),
    ("tcp-concurrent", "dials try addresses in order"),
    (
        "global-client-fingerprint",
        "no proxy type tpacct speaks uses TLS fingerprints",
    ),
    ("global-ua", "tpacct sends its own User-Agent"),
    (
        "keep-alive-interval",
        "the kernel's TCP keepalive defaults apply",
    ),
    (
        "keep-alive-idle",
        "the kernel's TCP keepalive defaults apply",
    ),
    (
        "disable-keep-alive",
        "the kernel's TCP keepalive defaults apply",
    ),
    ("etag-support", "downloads are always fetched whole"),
    (
        "geodata-loader",
        "a memory hint for geoip.dat, which tpacct does not read",
    ),
    (
        "geosite-matcher",
        "GEOSITE is always compiled into tpacct's own matcher",
    ),
    (
        "external-controller-tls",
        "the controller speaks plain HTTP (put TLS in front)",
    ),
    ("external-doh-server", "tpacct runs no DNS server"),
    (
        "external-ui-url",
        "dashboards are not downloaded by the daemon",
    ),
    ("external-controller-unix", "the controller listens on TCP"),
    ("external-controller-pipe", "the controller listens on TCP"),
    ("ntp", "the system clock is used"),
    ("experimental", "no experimental options"),
    ("clash-for-android", "not an Android client"),
    ("inbound-tfo", "listeners use the kernel defaults"),
    ("inbound-mptcp", "listeners use the kernel defaults"),
    (
        "listeners",
        "tpacct's inbounds are tproxy-port (and the mixed ports)",
    ),
    ("tuic-server", "tpacct is not a TUIC server"),
    ("ss-config", "tpacct is not a Shadowsocks server"),
    ("vmess-config", "tpacct is not a VMess server"),
];

/// Removes the ignored keys from the top of `doc`; returns them with why.
pub(super) fn remove(doc: &mut Value) -> Vec<(String, &'static str)> {
    let Value::Mapping(map) = doc else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (key, why) in IGNORED {
        if map.remove(*key).is_some() {
            found.push(((*key).to_owned(), *why));
        }
    }
    found
}
