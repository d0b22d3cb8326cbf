//! The nftables ruleset, as text for `nft -f -` (applied atomically).

use std::fmt::Write;

use ipnet::IpNet;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::config::{BindAddress, FastPathConfig, FirewallConfig};

/// Where TPROXY sends each family, following the listener: the wildcard listeners are reached
/// through loopback; a listener bound to one address is reached at that address, and the other
/// family is not captured at all (nothing would accept it).
pub fn targets(bind: BindAddress) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    match bind {
        BindAddress::Any => (Some(Ipv4Addr::LOCALHOST), Some(Ipv6Addr::LOCALHOST)),
        BindAddress::One(IpAddr::V4(ip)) if ip.is_unspecified() => {
            (Some(Ipv4Addr::LOCALHOST), None)
        }
        BindAddress::One(IpAddr::V4(ip)) => (Some(ip), None),
        BindAddress::One(IpAddr::V6(ip)) if ip.is_unspecified() => {
            (None, Some(Ipv6Addr::LOCALHOST))
        }
        BindAddress::One(IpAddr::V6(ip)) => (None, Some(ip)),
    }
}

/// The table for `config`: LAN traffic (and, with `local`, this host's own) to TCP or UDP
/// destinations that are not this host, not broadcast/multicast and not bypassed goes to the
/// TPROXY listener on `port` (at the address `bind` gives it), marked `fwmark` for the local
/// routing table. Packets carrying `routing_mark` (the proxy's own) are left alone. With the
/// fast path on, connections its program marked are left to the kernel (see [`fast_chain`]).
pub fn ruleset(
    config: &FirewallConfig,
    port: u16,
    routing_mark: u32,
    bind: BindAddress,
    fast: Option<&FastPathConfig>,
) -> String {
    let mut out = String::new();
    let table = &config.nft_table;
    let fwmark = config.fwmark;
    let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) = config
        .bypass
        .iter()
        .partition(|n| matches!(n, IpNet::V4(_)));
    let mut interfaces: Vec<String> = config.interfaces.iter().map(|i| format!("{i:?}")).collect();
    if config.local {
        interfaces.push("\"lo\"".to_owned());
    }
    let _ = writeln!(out, "table inet {table} {{");
    for (name, kind, nets) in [("bypass4", "ipv4_addr", &v4), ("bypass6", "ipv6_addr", &v6)] {
        let _ = writeln!(out, "  set {name} {{\n    type {kind}; flags interval;");
        if !nets.is_empty() {
            let list: Vec<String> = nets.iter().map(|n| n.to_string()).collect();
            let _ = writeln!(out, "    elements = {{ {} }}", list.join(", "));
        }
        let _ = writeln!(out, "  }}");
    }
    let skip = |out: &mut String| {
        let _ = writeln!(out, "    meta l4proto != {{ tcp, udp }} return");
        if routing_mark != 0 {
            let _ = writeln!(out, "    meta mark {routing_mark} return");
        }
        let _ = writeln!(
            out,
            "    fib daddr type {{ local, broadcast, multicast }} return"
        );
        let _ = writeln!(out, "    ip daddr @bypass4 return");
        let _ = writeln!(out, "    ip6 daddr @bypass6 return");
    };
    let _ = writeln!(
        out,
        "  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;"
    );
    if interfaces.is_empty() {
        let _ = writeln!(out, "    return");
    } else {
        let _ = writeln!(out, "    iifname != {{ {} }} return", interfaces.join(", "));
    }
    if let Some(fast) = fast {
        let m = fast.mark;
        let _ = writeln!(out, "    ct mark & {m:#x} == {m:#x} return");
    }
    skip(&mut out);
    let (v4_to, v6_to) = targets(bind);
    if let Some(ip) = v4_to {
        let _ = writeln!(
            out,
            "    meta nfproto ipv4 meta l4proto {{ tcp, udp }} tproxy ip to {ip}:{port} meta mark set {fwmark} accept"
        );
    }
    if let Some(ip) = v6_to {
        let _ = writeln!(
            out,
            "    meta nfproto ipv6 meta l4proto {{ tcp, udp }} tproxy ip6 to [{ip}]:{port} meta mark set {fwmark} accept"
        );
    }
    let _ = writeln!(out, "  }}");
    if config.local {
        let _ = writeln!(
            out,
            "  chain output {{\n    type route hook output priority mangle; policy accept;"
        );
        skip(&mut out);
        let _ = writeln!(out, "    meta mark set {fwmark}");
        let _ = writeln!(out, "  }}");
    }
    if let Some(fast) = fast {
        fast_chain(&mut out, fast);
    }
    let _ = writeln!(out, "}}");
    out
}

/// The fast path's chain, after conntrack and before the TPROXY chain: the mark the tc program
/// sets on a new flow's first packet becomes the connection's (sticky: a lost map entry never
/// sends a flow to the proxy mid-way); a forwarded connection's packet from a LAN interface that
/// the program did not count is dropped (never forwarded uncounted); every packet of a forwarded
/// connection carries the mark, so the egress program can tell one whose entry is gone.
fn fast_chain(out: &mut String, fast: &FastPathConfig) {
    let (m, c) = (fast.mark, fast.counted_mark);
    let lan: Vec<String> = fast.interfaces.iter().map(|i| format!("{i:?}")).collect();
    let lan = lan.join(", ");
    let _ = writeln!(
        out,
        "  chain fastpath {{\n    type filter hook prerouting priority mangle - 5; policy accept;"
    );
    let _ = writeln!(
        out,
        "    iifname {{ {lan} }} meta mark & {m:#x} == {m:#x} ct state new ct mark set ct mark | {m:#x}"
    );
    let _ = writeln!(
        out,
        "    iifname {{ {lan} }} ct mark & {m:#x} == {m:#x} meta mark & {c:#x} == 0 counter drop"
    );
    let _ = writeln!(
        out,
        "    ct mark & {m:#x} == {m:#x} meta mark set meta mark | {m:#x}"
    );
    let _ = writeln!(out, "  }}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_only_ruleset() {
        let config = FirewallConfig {
            interfaces: vec!["lan0".into(), "wlan0".into()],
            bypass: vec![
                "192.168.0.0/16".parse().expect("net"),
                "fd00::/8".parse().expect("net"),
            ],
            ..FirewallConfig::default()
        };
        let r = ruleset(&config, 7893, 0, BindAddress::Any, None);
        assert!(
            r.contains("iifname != { \"lan0\", \"wlan0\" } return"),
            "{r}"
        );
        assert!(r.contains("elements = { 192.168.0.0/16 }"), "{r}");
        assert!(r.contains("elements = { fd00::/8 }"), "{r}");
        assert!(
            r.contains("tproxy ip to 127.0.0.1:7893 meta mark set 1 accept"),
            "{r}"
        );
        assert!(
            r.contains("tproxy ip6 to [::1]:7893 meta mark set 1 accept"),
            "{r}"
        );
        assert!(!r.contains("meta mark 0 return"), "{r}");
        assert!(!r.contains("chain output"), "{r}");
    }

    #[test]
    fn local_capture_skips_the_proxys_own_mark() {
        let config = FirewallConfig {
            interfaces: vec!["lan0".into()],
            local: true,
            ..FirewallConfig::default()
        };
        let r = ruleset(&config, 7893, 6666, BindAddress::Any, None);
        assert!(r.contains("iifname != { \"lan0\", \"lo\" } return"), "{r}");
        assert!(r.contains("chain output"), "{r}");
        assert_eq!(r.matches("meta mark 6666 return").count(), 2, "{r}");
    }

    #[test]
    fn fast_path_connections_skip_tproxy_and_are_never_forwarded_uncounted() {
        let config = FirewallConfig {
            interfaces: vec!["lan0".into()],
            ..FirewallConfig::default()
        };
        let fast = FastPathConfig {
            enable: true,
            interfaces: vec!["lan0".into()],
            ..FastPathConfig::default()
        };
        let r = ruleset(&config, 7893, 0, BindAddress::Any, Some(&fast));
        let skip = r
            .find("ct mark & 0x40000000 == 0x40000000 return")
            .expect(&r);
        assert!(skip < r.find("tproxy ip to").expect(&r), "{r}");
        assert!(r.contains("priority mangle - 5"), "{r}");
        assert!(
            r.contains("ct state new ct mark set ct mark | 0x40000000"),
            "{r}"
        );
        assert!(
            r.contains("meta mark & 0x20000000 == 0 counter drop"),
            "{r}"
        );
    }

    #[test]
    fn rules_follow_a_specific_bind_address() {
        let config = FirewallConfig {
            interfaces: vec!["lan0".into()],
            ..FirewallConfig::default()
        };
        let v4 = ruleset(
            &config,
            7893,
            0,
            BindAddress::One("10.0.0.1".parse().expect("ip")),
            None,
        );
        assert!(v4.contains("tproxy ip to 10.0.0.1:7893"), "{v4}");
        assert!(
            !v4.contains("tproxy ip6"),
            "nothing would accept IPv6: {v4}"
        );
        let v6 = ruleset(
            &config,
            7893,
            0,
            BindAddress::One("fd00::1".parse().expect("ip")),
            None,
        );
        assert!(v6.contains("tproxy ip6 to [fd00::1]:7893"), "{v6}");
        assert!(!v6.contains("tproxy ip to"), "{v6}");
    }
}
