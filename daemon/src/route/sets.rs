//! Compiled sets that answer "which is the first entry matching this?" in time independent of
//! their size: domains (hash maps per kind, one Aho-Corasick automaton for keywords, one
//! `RegexSet`) and CIDRs (a hash map per prefix length). Each entry carries a rank (a rule's
//! position); a lookup returns the smallest rank that matches, so first-match order survives
//! compilation.

use std::net::IpAddr;

/// Hash maps keyed by names and addresses from the config, looked up per flow: foldhash (the
/// hasher hashbrown picked for speed, seeded per process) instead of SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

use aho_corasick::AhoCorasick;
use ipnet::IpNet;
use regex::RegexSet;

/// A domain pattern in mihomo's notations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    /// `example.com`
    Exact(String),
    /// `DOMAIN-SUFFIX,example.com` / `+.example.com`: the name and every subdomain.
    Suffix(String),
    /// `.example.com`: subdomains only.
    Subdomains(String),
    /// `*.example.com`: exactly one label more.
    OneLevel(String),
    Keyword(String),
    /// An anchored regex (DOMAIN-REGEX, DOMAIN-WILDCARD, other `*` patterns).
    Regex(String),
}

impl DomainPattern {
    /// A rule-set / sniffer domain entry: `+.a.com`, `.a.com`, `*.a.com`, `a.*.com`, `a.com`.
    pub fn from_entry(entry: &str) -> Option<DomainPattern> {
        let e = entry.trim().trim_end_matches('.').to_ascii_lowercase();
        if e.is_empty() || e.starts_with('#') {
            return None;
        }
        Some(if let Some(rest) = e.strip_prefix("+.") {
            DomainPattern::Suffix(rest.to_owned())
        } else if let Some(rest) = e.strip_prefix("*.").filter(|r| !r.contains('*')) {
            DomainPattern::OneLevel(rest.to_owned())
        } else if let Some(rest) = e.strip_prefix('.') {
            DomainPattern::Subdomains(rest.to_owned())
        } else if e.contains('*') {
            // `*` inside: one label.
            let mut re = String::from("^");
            for c in e.chars() {
                match c {
                    '*' => re.push_str("[^.]+"),
                    c => re.push_str(&regex::escape(&c.to_string())),
                }
            }
            re.push('$');
            DomainPattern::Regex(re)
        } else {
            DomainPattern::Exact(e)
        })
    }
}

/// The ranks one name carries, per kind of pattern (`NONE` where it has none): one lookup per
/// label boundary answers every kind at once.
#[derive(Debug, Clone, Copy)]
struct Ranks([u32; 4]);

const NONE: u32 = u32::MAX;
const EXACT: usize = 0;
const SUFFIX: usize = 1;
const SUBDOMAINS: usize = 2;
const ONE_LEVEL: usize = 3;

/// Domains with ranks; built once, queried per flow.
#[derive(Debug, Default)]
pub struct DomainSet {
    names: HashMap<compact_str::CompactString, Ranks>,
    keywords: Option<(AhoCorasick, Vec<u32>)>,
    regexes: Option<(RegexSet, Vec<u32>)>,
    len: usize,
}

/// Collects patterns for a [`DomainSet`].
#[derive(Debug, Default)]
pub struct DomainSetBuilder {
    set: DomainSet,
    keywords: Vec<(String, u32)>,
    regexes: Vec<(String, u32)>,
}

impl DomainSetBuilder {
    pub fn add(&mut self, pattern: DomainPattern, rank: u32) {
        let s = &mut self.set;
        s.len += 1;
        let (name, kind) = match pattern {
            DomainPattern::Exact(d) => (d, EXACT),
            DomainPattern::Suffix(d) => (d, SUFFIX),
            DomainPattern::Subdomains(d) => (d, SUBDOMAINS),
            DomainPattern::OneLevel(d) => (d, ONE_LEVEL),
            DomainPattern::Keyword(k) => return self.keywords.push((k, rank)),
            DomainPattern::Regex(r) => return self.regexes.push((r, rank)),
        };
        let ranks = s
            .names
            .entry(compact_str::CompactString::from(name))
            .or_insert(Ranks([NONE; 4]));
        ranks.0[kind] = ranks.0[kind].min(rank);
    }

    /// Builds the set; a regex that does not compile is an error naming it.
    pub fn build(mut self) -> Result<DomainSet, String> {
        if !self.keywords.is_empty() {
            let ac = AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(self.keywords.iter().map(|(k, _)| k))
                .map_err(|e| format!("keywords: {e}"))?;
            self.set.keywords = Some((ac, self.keywords.into_iter().map(|(_, r)| r).collect()));
        }
        if !self.regexes.is_empty() {
            let set = regex::RegexSetBuilder::new(self.regexes.iter().map(|(r, _)| r))
                .case_insensitive(true)
                .size_limit(64 << 20)
                .build()
                .map_err(|e| format!("domain regexes: {e}"))?;
            self.set.regexes = Some((set, self.regexes.into_iter().map(|(_, r)| r).collect()));
        }
        Ok(self.set)
    }
}

impl DomainSet {
    /// Entries in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The smallest rank among entries matching `host` (lower-case, no trailing dot).
    pub fn first(&self, host: &str) -> Option<u32> {
        let mut best = NONE;
        let mut take = |r: u32| best = best.min(r);
        if let Some(r) = self.names.get(host) {
            take(r.0[EXACT]);
            take(r.0[SUFFIX]);
        }
        // Each proper parent: `a.b.c` → `b.c`, `c`.
        let mut first_parent = true;
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(r) = self.names.get(parent) {
                take(r.0[SUFFIX]);
                take(r.0[SUBDOMAINS]);
                if first_parent {
                    take(r.0[ONE_LEVEL]);
                }
            }
            first_parent = false;
            rest = parent;
        }
        if let Some((ac, ranks)) = &self.keywords {
            for m in ac.find_overlapping_iter(host) {
                take(ranks[m.pattern().as_usize()]);
            }
        }
        if let Some((set, ranks)) = &self.regexes {
            for i in set.matches(host).iter() {
                take(ranks[i]);
            }
        }
        (best != NONE).then_some(best)
    }
}

/// CIDRs with ranks: one hash map per prefix length in use.
#[derive(Debug, Default)]
pub struct CidrSet {
    v4: Vec<(u8, HashMap<u32, u32>)>,
    v6: Vec<(u8, HashMap<u128, u32>)>,
    len: usize,
}

fn mask4(ip: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        ip & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(ip: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        ip & (u128::MAX << (128 - u32::from(len)))
    }
}

impl CidrSet {
    pub fn add(&mut self, net: IpNet, rank: u32) {
        self.len += 1;
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = mask4(u32::from(n.network()), len);
                let slot = match self.v4.iter().position(|(l, _)| *l == len) {
                    Some(i) => &mut self.v4[i].1,
                    None => {
                        self.v4.push((len, HashMap::default()));
                        let last = self.v4.len() - 1;
                        &mut self.v4[last].1
                    }
                };
                slot.entry(key)
                    .and_modify(|r| *r = (*r).min(rank))
                    .or_insert(rank);
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                let key = mask6(u128::from(n.network()), len);
                let slot = match self.v6.iter().position(|(l, _)| *l == len) {
                    Some(i) => &mut self.v6[i].1,
                    None => {
                        self.v6.push((len, HashMap::default()));
                        let last = self.v6.len() - 1;
                        &mut self.v6[last].1
                    }
                };
                slot.entry(key)
                    .and_modify(|r| *r = (*r).min(rank))
                    .or_insert(rank);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The smallest rank among prefixes containing `ip` (an IPv4-mapped IPv6 address counts as
    /// IPv4).
    pub fn first(&self, ip: IpAddr) -> Option<u32> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match ip {
            IpAddr::V4(v4) => {
                let ip = u32::from(v4);
                self.v4
                    .iter()
                    .filter_map(|(len, map)| map.get(&mask4(ip, *len)).copied())
                    .min()
            }
            IpAddr::V6(v6) => {
                let ip = u128::from(v6);
                self.v6
                    .iter()
                    .filter_map(|(len, map)| map.get(&mask6(ip, *len)).copied())
                    .min()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(entries: &[(&str, u32)]) -> DomainSet {
        let mut b = DomainSetBuilder::default();
        for (e, r) in entries {
            b.add(DomainPattern::from_entry(e).expect("pattern"), *r);
        }
        b.build().expect("set")
    }

    #[test]
    fn mihomo_domain_notations() {
        let s = set(&[
            ("+.a.com", 5),
            (".b.com", 6),
            ("*.c.com", 7),
            ("d.com", 8),
            ("x.*.e.com", 9),
        ]);
        assert_eq!(s.first("a.com"), Some(5));
        assert_eq!(s.first("x.y.a.com"), Some(5));
        assert_eq!(s.first("b.com"), None, "subdomains only");
        assert_eq!(s.first("x.b.com"), Some(6));
        assert_eq!(s.first("x.c.com"), Some(7));
        assert_eq!(s.first("x.y.c.com"), None, "one level");
        assert_eq!(s.first("d.com"), Some(8));
        assert_eq!(s.first("x.d.com"), None);
        assert_eq!(s.first("x.q.e.com"), Some(9));
        assert_eq!(s.first("notad.com"), None);
    }

    #[test]
    fn the_smallest_rank_wins_across_kinds() {
        let mut b = DomainSetBuilder::default();
        b.add(DomainPattern::Suffix("example.com".into()), 9);
        b.add(DomainPattern::Keyword("ampl".into()), 4);
        b.add(DomainPattern::Regex("^www\\.".into()), 7);
        b.add(DomainPattern::Exact("www.example.com".into()), 12);
        let s = b.build().expect("set");
        assert_eq!(s.first("www.example.com"), Some(4));
        assert_eq!(s.first("mail.example.com"), Some(4));
        assert_eq!(s.first("www.other.org"), Some(7));
        assert_eq!(s.first("other.org"), None);
    }

    #[test]
    fn cidrs_by_prefix_length() {
        let mut s = CidrSet::default();
        s.add("10.0.0.0/8".parse().expect("net"), 3);
        s.add("10.1.0.0/16".parse().expect("net"), 1);
        s.add("0.0.0.0/0".parse().expect("net"), 9);
        s.add("fd00::/8".parse().expect("net"), 2);
        assert_eq!(s.first("10.1.2.3".parse().expect("ip")), Some(1));
        assert_eq!(s.first("10.2.0.1".parse().expect("ip")), Some(3));
        assert_eq!(s.first("8.8.8.8".parse().expect("ip")), Some(9));
        assert_eq!(s.first("::ffff:10.2.0.1".parse().expect("ip")), Some(3));
        assert_eq!(s.first("fd12::1".parse().expect("ip")), Some(2));
        assert_eq!(s.first("2001:db8::1".parse().expect("ip")), None);
    }
}
