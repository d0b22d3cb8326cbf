//! Compiles the rules that a flow's first packet can decide into the fast path's kernel table,
//! in rule order, stopping at the first rule that needs more (a name, a process, a set).

use std::net::IpAddr;

use ipnet::IpNet;
use tpacct_common::{
    AF_INET, AF_INET6,
    fastpath::{FastRule, MAX_FAST_RULES, RULE_PORT_RANGES, rule_kind},
};

use crate::{
    config::Mode,
    route::rules::{Cond, Net, PortOf, Rule},
};

/// The rule index a flow gets when no rule matched (mihomo then goes DIRECT with no rule).
pub const NO_RULE: u32 = u32::MAX;

/// The kernel table, and how many of the configuration's rules it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub rules: Vec<FastRule>,
    /// Rules decided in the kernel before the first that needs more (all of them: none).
    pub stopped_at: Option<usize>,
}

/// Addresses no flow to which is forwarded: this host's own, broadcast, multicast, and the
/// firewall's bypass list (those are not captured at all, so not counted either).
pub fn never(local: &[IpAddr], bypass: &[IpNet]) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = local.iter().map(|&ip| IpNet::from(ip)).collect();
    nets.extend(bypass.iter().copied());
    for fixed in ["224.0.0.0/4", "255.255.255.255/32", "ff00::/8"] {
        nets.push(fixed.parse().expect("a valid network"));
    }
    nets
}

/// The table for `rules` in `mode`, after entries that keep `never` off the fast path.
pub fn compile(mode: Mode, rules: &[Rule], never: &[IpNet]) -> Table {
    let mut out: Vec<FastRule> = never
        .iter()
        .map(|net| cidr(net, false, false, NO_RULE))
        .collect();
    let mut stopped_at = None;
    match mode {
        Mode::Global => stopped_at = Some(0),
        Mode::Direct => out.push(matching(true, NO_RULE)),
        Mode::Rule => {
            for (i, rule) in rules.iter().enumerate() {
                match one(rule, i as u32) {
                    Step::Skip => {}
                    Step::Rule(r) => out.push(r),
                    Step::Stop => {
                        stopped_at = Some(i);
                        break;
                    }
                }
            }
            if stopped_at.is_none() {
                out.push(matching(true, NO_RULE));
            }
        }
    }
    let max = MAX_FAST_RULES as usize;
    if never.len() >= max {
        // Not even this host's own addresses fit: nothing can go the fast path safely.
        out.clear();
        stopped_at = Some(0);
    } else if out.len() > max {
        // Keep what fits; the table's end proxies the rest.
        let first_dropped = out[max..].iter().find(|r| r.index != NO_RULE);
        stopped_at = Some(first_dropped.map_or(rules.len(), |r| r.index as usize));
        out.truncate(max);
    }
    Table {
        rules: out,
        stopped_at,
    }
}

enum Step {
    /// The rule can never match a captured flow (or is PASS): go on.
    Skip,
    Rule(FastRule),
    /// Needs more than the first packet.
    Stop,
}

fn one(rule: &Rule, index: u32) -> Step {
    if rule.sub_rule.is_some() {
        return Step::Stop;
    }
    if rule.target == "PASS" {
        return Step::Skip;
    }
    let fast = rule.target == "DIRECT";
    match &rule.cond {
        Cond::Match => Step::Rule(matching(fast, index)),
        Cond::IpCidr { net, src } => Step::Rule(cidr(net, *src, fast, index)),
        Cond::Port { of, ranges } => {
            let kind = match of {
                PortOf::Dst => rule_kind::DST_PORT,
                PortOf::Src => rule_kind::SRC_PORT,
                PortOf::In => return Step::Stop,
            };
            if ranges.len() > RULE_PORT_RANGES {
                return Step::Stop;
            }
            let mut r = FastRule {
                kind,
                fast: u32::from(fast),
                index,
                nranges: ranges.len() as u32,
                ..FastRule::default()
            };
            for (j, range) in ranges.iter().enumerate() {
                r.port_lo[j] = u32::from(*range.start());
                r.port_hi[j] = u32::from(*range.end());
            }
            Step::Rule(r)
        }
        Cond::Network(net) => {
            let mut r = FastRule {
                kind: rule_kind::NETWORK,
                fast: u32::from(fast),
                index,
                ..FastRule::default()
            };
            r.port_lo[0] = match net {
                Net::Tcp => 6,
                Net::Udp => 17,
            };
            Step::Rule(r)
        }
        // Flows on the fast path came through the TPROXY inbound.
        Cond::InType(types) if types.iter().any(|t| t.eq_ignore_ascii_case("TPROXY")) => {
            Step::Rule(matching(fast, index))
        }
        Cond::InType(_) => Step::Skip,
        Cond::InName(names) if names.iter().any(|n| n == "DEFAULT-TPROXY") => {
            Step::Rule(matching(fast, index))
        }
        Cond::InName(_) => Step::Skip,
        _ => Step::Stop,
    }
}

fn matching(fast: bool, index: u32) -> FastRule {
    FastRule {
        kind: rule_kind::MATCH,
        fast: u32::from(fast),
        index,
        ..FastRule::default()
    }
}

fn cidr(net: &IpNet, src: bool, fast: bool, index: u32) -> FastRule {
    let mut r = FastRule {
        kind: if src {
            rule_kind::SRC_CIDR
        } else {
            rule_kind::DST_CIDR
        },
        fast: u32::from(fast),
        index,
        prefix: u32::from(net.prefix_len()),
        ..FastRule::default()
    };
    match net.network() {
        IpAddr::V4(a) => {
            r.family = AF_INET;
            r.addr[0] = u32::from(a);
        }
        IpAddr::V6(a) => {
            r.family = AF_INET6;
            let o = a.octets();
            for (w, chunk) in r.addr.iter_mut().zip(o.chunks_exact(4)) {
                *w = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(lines: &[&str]) -> Vec<Rule> {
        lines
            .iter()
            .map(|l| crate::route::rules::parse(l).expect("rule"))
            .collect()
    }

    #[test]
    fn rules_up_to_the_first_that_needs_a_name_are_compiled_in_order() {
        let list = rules(&[
            "IP-CIDR,10.0.0.0/8,REJECT",
            "DST-PORT,443/8000-8080,DIRECT",
            "IN-TYPE,HTTP,PROXY",
            "NETWORK,UDP,DIRECT",
            "DOMAIN,example.com,DIRECT",
            "MATCH,DIRECT",
        ]);
        let never = never(&["192.168.1.1".parse().expect("ip")], &[]);
        let t = compile(Mode::Rule, &list, &never);
        assert_eq!(t.stopped_at, Some(4), "DOMAIN needs the name");
        let own: Vec<_> = t.rules[never.len()..].to_vec();
        assert_eq!(own.len(), 3, "IN-TYPE HTTP never matches a forwarded flow");
        assert_eq!(
            (own[0].kind, own[0].fast, own[0].index),
            (rule_kind::DST_CIDR, 0, 0)
        );
        assert_eq!(own[0].addr[0], 0x0a00_0000);
        assert_eq!(own[0].prefix, 8);
        assert_eq!(
            (own[1].kind, own[1].fast, own[1].nranges),
            (rule_kind::DST_PORT, 1, 2)
        );
        assert_eq!((own[1].port_lo[1], own[1].port_hi[1]), (8000, 8080));
        assert_eq!((own[2].kind, own[2].port_lo[0]), (rule_kind::NETWORK, 17));
        assert!(t.rules[..never.len()].iter().all(|r| r.fast == 0));
    }

    #[test]
    fn a_list_decided_whole_ends_direct_with_no_rule_and_modes_are_followed() {
        let list = rules(&["SRC-IP-CIDR,fd00::/8,DIRECT"]);
        let t = compile(Mode::Rule, &list, &[]);
        assert_eq!(t.stopped_at, None);
        assert_eq!(t.rules[0].kind, rule_kind::SRC_CIDR);
        assert_eq!(t.rules[0].family, AF_INET6);
        assert_eq!(t.rules[0].addr, [0xfd00_0000, 0, 0, 0]);
        assert_eq!(
            (t.rules[1].kind, t.rules[1].fast, t.rules[1].index),
            (rule_kind::MATCH, 1, NO_RULE)
        );
        assert!(compile(Mode::Global, &list, &[]).rules.is_empty());
        let direct = compile(Mode::Direct, &list, &[]);
        assert_eq!(
            (direct.rules[0].kind, direct.rules[0].fast),
            (rule_kind::MATCH, 1)
        );
    }

    #[test]
    fn a_table_too_long_proxies_what_does_not_fit() {
        let lines: Vec<String> = (0..100)
            .map(|i| format!("DST-PORT,{},DIRECT", 1000 + i))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let t = compile(Mode::Rule, &rules(&refs), &[]);
        assert_eq!(t.rules.len(), MAX_FAST_RULES as usize);
        assert_eq!(t.stopped_at, Some(MAX_FAST_RULES as usize));
    }
}
