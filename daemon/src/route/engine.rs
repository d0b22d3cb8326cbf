//! A rule list compiled for first-match lookups: domain, CIDR and GEOIP conditions of
//! top-level rules go into size-independent sets ([`super::sets`]) ranked by rule position;
//! the rest (ports, logic, rule sets, sub-rules, process...) are checked in order, but only
//! those ranked before the best indexed hit. The answer is exactly mihomo's first match.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    geo::Geo,
    rules::{Cond, Net, PortOf, Rule},
    sets::{CidrSet, DomainPattern, DomainSet, DomainSetBuilder},
};

/// What rules look at, for one flow.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub network: Net,
    pub source: SocketAddr,
    /// The destination address, when known (a proxy client may give only a name).
    pub destination: Option<IpAddr>,
    pub destination_port: u16,
    /// The name the flow is going to (sniffed, mapped from DNS, or given), lower-case.
    pub host: Option<&'a str>,
    pub in_port: u16,
    /// The inbound type as mihomo's IN-TYPE names it (`TPROXY`, `HTTP`, `SOCKS5`...).
    pub in_type: &'a str,
    pub in_name: &'a str,
    pub in_user: Option<&'a str>,
    pub uid: Option<u32>,
    pub process: Option<&'a str>,
    pub process_path: Option<&'a str>,
}

/// A rule provider's compiled contents (always behind an `Arc`, so variant sizes don't matter).
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "held in an Arc, never moved around"
)]
pub enum SetData {
    Domain(DomainSet),
    Cidr(CidrSet),
    Classical(Compiled),
}

/// Rule providers by name; each swapped whole when it refreshes.
pub type RuleSets = HashMap<String, Arc<arc_swap::ArcSwap<SetData>>>;

/// What evaluation needs besides the query.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    pub geo: &'a Geo,
    pub rule_sets: &'a RuleSets,
    pub sub_rules: &'a HashMap<String, Compiled>,
}

/// A compiled rule list.
#[derive(Debug, Default)]
pub struct Compiled {
    pub rules: Vec<Rule>,
    domains: DomainSet,
    dst: CidrSet,
    src: CidrSet,
    dst_geo: HashMap<String, u32>,
    src_geo: HashMap<String, u32>,
    /// Rules checked one by one, in order.
    sequential: Vec<u32>,
}

/// Whether deciding `cond` can need the flow's process or uid (mihomo's `ShouldFindProcess`).
pub fn needs_process(cond: &Cond, env: Env<'_>) -> bool {
    match cond {
        Cond::Uid(_)
        | Cond::ProcessName(_)
        | Cond::ProcessPath(_)
        | Cond::ProcessNameRegex(_)
        | Cond::ProcessPathRegex(_) => true,
        Cond::And(all) | Cond::Or(all) => all.iter().any(|c| needs_process(c, env)),
        Cond::Not(c) => needs_process(c, env),
        Cond::RuleSet { name, .. } => env.rule_sets.get(name).is_some_and(
            |set| matches!(&**set.load(), SetData::Classical(c) if c.needs_process(env)),
        ),
        _ => false,
    }
}

/// The domain patterns a domain condition stands for (GEOSITE: its list).
fn domain_patterns(cond: &Cond, geo: &Geo) -> Option<Vec<DomainPattern>> {
    Some(match cond {
        Cond::Domain(d) => vec![DomainPattern::Exact(d.clone())],
        Cond::DomainSuffix(d) => vec![DomainPattern::Suffix(d.clone())],
        Cond::DomainKeyword(k) => vec![DomainPattern::Keyword(k.clone())],
        Cond::DomainRegex(r) => vec![DomainPattern::Regex(r.as_str().to_owned())],
        Cond::GeoSite(name) => geo.site(name)?.to_vec(),
        _ => return None,
    })
}

impl Compiled {
    /// Compiles `rules` (GEOSITE lists come from `geo`, which must hold them).
    pub fn new(rules: Vec<Rule>, geo: &Geo) -> Result<Compiled, String> {
        let mut domains = DomainSetBuilder::default();
        let mut c = Compiled::default();
        for (i, rule) in rules.iter().enumerate() {
            let rank = i as u32;
            if rule.sub_rule.is_some() {
                c.sequential.push(rank);
                continue;
            }
            if let Some(patterns) = domain_patterns(&rule.cond, geo) {
                for p in patterns {
                    domains.add(p, rank);
                }
                continue;
            }
            match &rule.cond {
                Cond::IpCidr { net, src: false } => c.dst.add(*net, rank),
                Cond::IpCidr { net, src: true } => c.src.add(*net, rank),
                Cond::GeoIp { code, src } if !is_lan(code) => {
                    let map = if *src { &mut c.src_geo } else { &mut c.dst_geo };
                    map.entry(code.clone()).or_insert(rank);
                }
                _ => c.sequential.push(rank),
            }
        }
        c.domains = domains.build()?;
        c.rules = rules;
        Ok(c)
    }

    /// Whether any rule can need the flow's process or uid.
    pub fn needs_process(&self, env: Env<'_>) -> bool {
        self.rules.iter().any(|r| {
            needs_process(&r.cond, env)
                || r.sub_rule
                    .as_ref()
                    .and_then(|name| env.sub_rules.get(name))
                    .is_some_and(|sub| sub.needs_process(env))
        })
    }

    /// The position of the first rule `q` matches.
    pub fn first(&self, q: &Query<'_>, env: Env<'_>) -> Option<usize> {
        let mut best: Option<u32> = None;
        let mut take = |r: Option<u32>| {
            if let Some(r) = r {
                best = Some(best.map_or(r, |b| b.min(r)));
            }
        };
        if let Some(host) = q.host {
            take(self.domains.first(host));
        }
        if let Some(dst) = q.destination {
            take(self.dst.first(dst));
            if !self.dst_geo.is_empty() {
                for code in env.geo.countries(dst) {
                    take(self.dst_geo.get(&code).copied());
                }
            }
        }
        take(self.src.first(q.source.ip()));
        if !self.src_geo.is_empty() {
            for code in env.geo.countries(q.source.ip()) {
                take(self.src_geo.get(&code).copied());
            }
        }
        for &i in &self.sequential {
            if best.is_some_and(|b| i >= b) {
                break;
            }
            if eval(&self.rules[i as usize].cond, q, env) {
                let rule = &self.rules[i as usize];
                match &rule.sub_rule {
                    None => return Some(i as usize),
                    // A sub-rule list decides; if none of it matches, go on.
                    Some(name)
                        if env
                            .sub_rules
                            .get(name)
                            .and_then(|s| s.first(q, env))
                            .is_some() =>
                    {
                        return Some(i as usize);
                    }
                    Some(_) => {}
                }
            }
        }
        best.map(|b| b as usize)
    }

    /// Whether any rule matches (a classical rule set).
    pub fn any(&self, q: &Query<'_>, env: Env<'_>) -> bool {
        self.first(q, env).is_some()
    }
}

/// `GEOIP,LAN` (and `PRIVATE`): private, loopback, link-local and unique-local addresses.
fn is_lan(code: &str) -> bool {
    matches!(code, "lan" | "private")
}

fn private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => private(IpAddr::V4(v4)),
            None => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || (v6.segments()[0] & 0xfe00) == 0xfc00
                    || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        },
    }
}

/// The last `bits` bits of `a` and `b` are equal (IP-SUFFIX).
fn suffix_equal(a: IpAddr, net: ipnet::IpNet) -> bool {
    let bits = u32::from(net.prefix_len());
    match (a, net.addr()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX >> (32 - bits)
            };
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX >> (128 - bits)
            };
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

/// One condition, on its own.
pub fn eval(cond: &Cond, q: &Query<'_>, env: Env<'_>) -> bool {
    let host = q.host;
    let ip = |src: bool| {
        if src {
            Some(q.source.ip())
        } else {
            q.destination
        }
    };
    match cond {
        Cond::Domain(d) => host == Some(d.as_str()),
        Cond::DomainSuffix(d) => host.is_some_and(|h| {
            h == d
                || (h.len() > d.len()
                    && h.ends_with(d.as_str())
                    && h.as_bytes()[h.len() - d.len() - 1] == b'.')
        }),
        Cond::DomainKeyword(k) => host.is_some_and(|h| h.contains(k.as_str())),
        Cond::DomainRegex(r) => host.is_some_and(|h| r.is_match(h)),
        Cond::GeoSite(name) => {
            host.is_some_and(|h| env.geo.site_set(name).is_some_and(|s| s.first(h).is_some()))
        }
        Cond::GeoIp { code, src } => ip(*src).is_some_and(|ip| {
            if is_lan(code) {
                private(ip)
            } else {
                env.geo.countries(ip).iter().any(|c| c == code)
            }
        }),
        Cond::IpCidr { net, src } => ip(*src).is_some_and(|ip| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            net.contains(&ip)
        }),
        Cond::IpSuffix { net, src } => ip(*src).is_some_and(|ip| suffix_equal(ip, *net)),
        Cond::Port { of, ranges } => {
            let port = match of {
                PortOf::Dst => q.destination_port,
                PortOf::Src => q.source.port(),
                PortOf::In => q.in_port,
            };
            ranges.iter().any(|r| r.contains(&port))
        }
        Cond::Network(n) => *n == q.network,
        Cond::InType(types) => types.iter().any(|t| t.eq_ignore_ascii_case(q.in_type)),
        Cond::InName(names) => names.iter().any(|n| n == q.in_name),
        Cond::InUser(users) => q.in_user.is_some_and(|u| users.iter().any(|n| n == u)),
        Cond::Uid(ranges) => q.uid.is_some_and(|u| ranges.iter().any(|r| r.contains(&u))),
        // DSCP of the client's packets is not read: such rules never match.
        Cond::Dscp(_) => false,
        Cond::ProcessName(n) => q.process.is_some_and(|p| p == n),
        Cond::ProcessPath(n) => q.process_path.is_some_and(|p| p == n),
        Cond::ProcessNameRegex(r) => q.process.is_some_and(|p| r.is_match(p)),
        Cond::ProcessPathRegex(r) => q.process_path.is_some_and(|p| r.is_match(p)),
        Cond::RuleSet { name, src } => env.rule_sets.get(name).is_some_and(|set| {
            let data = set.load();
            match &**data {
                SetData::Domain(d) => host.is_some_and(|h| d.first(h).is_some()),
                SetData::Cidr(c) => ip(*src).is_some_and(|ip| c.first(ip).is_some()),
                SetData::Classical(c) => {
                    if *src {
                        // `src`: the set's IP rules look at the source address.
                        let swapped = Query {
                            destination: Some(q.source.ip()),
                            ..*q
                        };
                        c.any(&swapped, env)
                    } else {
                        c.any(q, env)
                    }
                }
            }
        }),
        Cond::And(all) => all.iter().all(|c| eval(c, q, env)),
        Cond::Or(any) => any.iter().any(|c| eval(c, q, env)),
        Cond::Not(c) => !eval(c, q, env),
        Cond::Match => true,
    }
}
