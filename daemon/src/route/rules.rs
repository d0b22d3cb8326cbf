//! Rule text → [`Rule`]: mihomo's syntax `TYPE,PAYLOAD,TARGET[,OPTION…]`, logic rules with
//! parenthesised payloads (`AND,((DOMAIN,a.com),(NETWORK,UDP)),PROXY`), `MATCH,TARGET`, and
//! the target-less form rule providers and logic rules use. Pure parsing: no I/O.

use std::{net::IpAddr, ops::RangeInclusive};

use ipnet::IpNet;

/// A rule that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn bad(message: impl Into<String>) -> ParseError {
    ParseError(message.into())
}

/// Which port a port rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortOf {
    Dst,
    Src,
    In,
}

/// `tcp` or `udp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Tcp,
    Udp,
}

/// What a rule tests.
#[derive(Debug, Clone)]
pub enum Cond {
    Domain(String),
    DomainSuffix(String),
    DomainKeyword(String),
    /// `DOMAIN-REGEX` and `DOMAIN-WILDCARD` (compiled to a regex).
    DomainRegex(regex::Regex),
    GeoSite(String),
    GeoIp {
        code: String,
        src: bool,
    },
    IpCidr {
        net: IpNet,
        src: bool,
    },
    IpSuffix {
        net: IpNet,
        src: bool,
    },
    Port {
        of: PortOf,
        ranges: Vec<RangeInclusive<u16>>,
    },
    Network(Net),
    InType(Vec<String>),
    InName(Vec<String>),
    InUser(Vec<String>),
    Uid(Vec<RangeInclusive<u32>>),
    Dscp(Vec<RangeInclusive<u8>>),
    ProcessName(String),
    ProcessPath(String),
    ProcessNameRegex(regex::Regex),
    ProcessPathRegex(regex::Regex),
    RuleSet {
        name: String,
        src: bool,
    },
    And(Vec<Cond>),
    Or(Vec<Cond>),
    Not(Box<Cond>),
    Match,
}

/// One line of `rules:` (or of a sub-rule list).
#[derive(Debug, Clone)]
pub struct Rule {
    /// The type as Clash clients show it (`DomainSuffix`, `IPCIDR`, `Match`...).
    pub kind: &'static str,
    /// The payload as written (`example.com`, `10.0.0.0/8`, `((DOMAIN,a),(NETWORK,UDP))`).
    pub payload: String,
    pub cond: Cond,
    /// For `SUB-RULE`: the sub-rule list to evaluate when `cond` matches.
    pub sub_rule: Option<String>,
    /// The outbound (or group) the rule sends flows to; for `SUB-RULE`, the list's name.
    pub target: String,
}

/// Splits `text` at top-level commas (not inside parentheses), trimming each part.
fn split_top(text: &str) -> Vec<&str> {
    let (mut depth, mut start, mut parts) = (0i32, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(text[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(text[start..].trim());
    parts
}

/// Splits a rule at commas: only logic rules' payloads keep their parenthesised commas.
fn split_rule(text: &str) -> Vec<&str> {
    let kind = text
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_uppercase();
    if matches!(kind.as_str(), "AND" | "OR" | "NOT" | "SUB-RULE") {
        split_top(text)
    } else {
        text.split(',').map(str::trim).collect()
    }
}

/// Parses a full rule line: `TYPE,PAYLOAD,TARGET[,OPTION…]` or `MATCH,TARGET`.
pub fn parse(line: &str) -> Result<Rule, ParseError> {
    let parts = split_rule(line);
    let kind = parts[0].to_ascii_uppercase();
    if kind == "MATCH" || kind == "FINAL" {
        let target = parts
            .get(1)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("MATCH needs a target: `MATCH,PROXY`"))?;
        return Ok(Rule {
            kind: "Match",
            payload: String::new(),
            cond: Cond::Match,
            sub_rule: None,
            target: (*target).to_owned(),
        });
    }
    let (Some(payload), Some(target)) = (parts.get(1), parts.get(2)) else {
        return Err(bad(format!("`{line}` is not `TYPE,PAYLOAD,TARGET`")));
    };
    if target.is_empty() {
        return Err(bad(format!("`{line}` has no target")));
    }
    let options = &parts[3..];
    let (kind_name, cond) = condition(&kind, payload, options)?;
    let sub_rule = (kind == "SUB-RULE").then(|| (*target).to_owned());
    Ok(Rule {
        kind: kind_name,
        payload: shown_payload(kind_name, payload),
        cond,
        sub_rule,
        target: (*target).to_owned(),
    })
}

/// Parses a target-less rule: `TYPE,PAYLOAD[,OPTION…]` (rule providers, logic payloads).
pub fn parse_condition(text: &str) -> Result<(&'static str, String, Cond), ParseError> {
    let parts = split_rule(text);
    let kind = parts[0].to_ascii_uppercase();
    if kind == "MATCH" {
        return Ok(("Match", String::new(), Cond::Match));
    }
    let payload = parts
        .get(1)
        .ok_or_else(|| bad(format!("`{text}` is not `TYPE,PAYLOAD`")))?;
    let (name, cond) = condition(&kind, payload, &parts[2..])?;
    Ok((name, shown_payload(name, payload), cond))
}

/// The payload as mihomo shows it: as written, except logic rules, which show their parts
/// as `((Type,payload) && (Type,payload))`, `(… || …)` and `(!(Type,payload))`.
fn shown_payload(kind: &str, payload: &str) -> String {
    let join = match kind {
        "AND" => " && ",
        "OR" => " || ",
        "NOT" => "",
        // mihomo shows the network it parsed: `tcp`, `udp`.
        "Network" => return payload.trim().to_ascii_lowercase(),
        _ => return payload.to_owned(),
    };
    let parts: Vec<String> = payload
        .trim()
        .strip_prefix('(')
        .and_then(|p| p.strip_suffix(')'))
        .map(split_top)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|part| {
            let rule = part.strip_prefix('(')?.strip_suffix(')')?;
            let (name, shown, _) = parse_condition(rule).ok()?;
            Some(format!("({name},{shown})"))
        })
        .collect();
    if kind == "NOT" {
        format!("(!{})", parts.concat())
    } else {
        format!("({})", parts.join(join))
    }
}

/// `no-resolve` and `src` options; anything else is an error naming it.
fn options(options: &[&str]) -> Result<bool, ParseError> {
    let mut src = false;
    for o in options {
        match o.to_ascii_lowercase().as_str() {
            "no-resolve" | "" => {}
            "src" => src = true,
            other => {
                return Err(bad(format!(
                    "unknown rule option `{other}` (no-resolve, src)"
                )));
            }
        }
    }
    Ok(src)
}

fn net(payload: &str) -> Result<IpNet, ParseError> {
    payload
        .parse::<IpNet>()
        .or_else(|_| payload.parse::<IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| {
            bad(format!(
                "`{payload}` is not a CIDR like 10.0.0.0/8 or fd00::/8"
            ))
        })
}

/// `a/b/c-d` ranges of unsigned numbers.
fn ranges<T>(payload: &str, what: &str) -> Result<Vec<RangeInclusive<T>>, ParseError>
where
    T: std::str::FromStr + PartialOrd + Copy,
{
    let err = || {
        bad(format!(
            "`{payload}` is not a {what} list like 80/443/1000-2000"
        ))
    };
    payload
        .split(['/', ','])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            let (a, b): (T, T) = (
                a.trim().parse().map_err(|_| err())?,
                b.trim().parse().map_err(|_| err())?,
            );
            if a > b {
                return Err(err());
            }
            Ok(a..=b)
        })
        .collect::<Result<Vec<_>, _>>()
        .and_then(|r| if r.is_empty() { Err(err()) } else { Ok(r) })
}

fn regex(payload: &str) -> Result<regex::Regex, ParseError> {
    regex::RegexBuilder::new(payload)
        .case_insensitive(true)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| bad(format!("`{payload}` is not a regex: {e}")))
}

/// `*` (any characters, dots included) and `?` (one character) → an anchored regex.
pub fn wildcard_regex(pattern: &str) -> String {
    let mut out = String::from("^");
    for c in pattern.chars() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            c => out.push_str(&regex::escape(&c.to_string())),
        }
    }
    out.push('$');
    out
}

fn list(payload: &str) -> Vec<String> {
    payload
        .split('/')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Inner rules of a logic payload: `((A,x),(B,y))` → [`A,x`, `B,y`].
fn logic_parts(payload: &str) -> Result<Vec<Cond>, ParseError> {
    let p = payload.trim();
    let inner = p
        .strip_prefix('(')
        .and_then(|p| p.strip_suffix(')'))
        .ok_or_else(|| {
            bad(format!(
                "`{payload}` is not a list like ((DOMAIN,a.com),(NETWORK,UDP))"
            ))
        })?;
    split_top(inner)
        .into_iter()
        .map(|part| {
            let rule = part
                .strip_prefix('(')
                .and_then(|p| p.strip_suffix(')'))
                .ok_or_else(|| bad(format!("`{part}` should be in parentheses")))?;
            parse_condition(rule).map(|(_, _, c)| c)
        })
        .collect()
}

fn condition(kind: &str, payload: &str, opts: &[&str]) -> Result<(&'static str, Cond), ParseError> {
    let name = || -> Result<String, ParseError> {
        let p = payload.trim().trim_end_matches('.').to_ascii_lowercase();
        if p.is_empty() {
            Err(bad(format!("{kind} needs a payload")))
        } else {
            Ok(p)
        }
    };
    let src = options(opts)?;
    Ok(match kind {
        "DOMAIN" => ("Domain", Cond::Domain(name()?)),
        "DOMAIN-SUFFIX" => (
            "DomainSuffix",
            Cond::DomainSuffix(name()?.trim_start_matches('.').to_owned()),
        ),
        "DOMAIN-KEYWORD" => ("DomainKeyword", Cond::DomainKeyword(name()?)),
        "DOMAIN-REGEX" => ("DomainRegex", Cond::DomainRegex(regex(payload.trim())?)),
        "DOMAIN-WILDCARD" => (
            "DomainWildcard",
            Cond::DomainRegex(regex(&wildcard_regex(&name()?))?),
        ),
        "GEOSITE" => ("GeoSite", Cond::GeoSite(name()?)),
        "GEOIP" => ("GeoIP", Cond::GeoIp { code: name()?, src }),
        "SRC-GEOIP" => (
            "SrcGeoIP",
            Cond::GeoIp {
                code: name()?,
                src: true,
            },
        ),
        "IP-CIDR" | "IP-CIDR6" => {
            let kind = if src { "SrcIPCIDR" } else { "IPCIDR" };
            (
                kind,
                Cond::IpCidr {
                    net: net(payload.trim())?,
                    src,
                },
            )
        }
        "SRC-IP-CIDR" => (
            "SrcIPCIDR",
            Cond::IpCidr {
                net: net(payload.trim())?,
                src: true,
            },
        ),
        "IP-SUFFIX" => {
            let kind = if src { "SrcIPSuffix" } else { "IPSuffix" };
            (
                kind,
                Cond::IpSuffix {
                    net: net(payload.trim())?,
                    src,
                },
            )
        }
        "SRC-IP-SUFFIX" => (
            "SrcIPSuffix",
            Cond::IpSuffix {
                net: net(payload.trim())?,
                src: true,
            },
        ),
        "DST-PORT" => (
            "DstPort",
            Cond::Port {
                of: PortOf::Dst,
                ranges: ranges(payload, "port")?,
            },
        ),
        "SRC-PORT" => (
            "SrcPort",
            Cond::Port {
                of: PortOf::Src,
                ranges: ranges(payload, "port")?,
            },
        ),
        "IN-PORT" => (
            "InPort",
            Cond::Port {
                of: PortOf::In,
                ranges: ranges(payload, "port")?,
            },
        ),
        "NETWORK" => match payload.trim().to_ascii_lowercase().as_str() {
            "tcp" => ("Network", Cond::Network(Net::Tcp)),
            "udp" => ("Network", Cond::Network(Net::Udp)),
            other => return Err(bad(format!("NETWORK is tcp or udp, not `{other}`"))),
        },
        "IN-TYPE" => ("InType", Cond::InType(list(&payload.to_ascii_uppercase()))),
        "IN-NAME" => ("InName", Cond::InName(list(payload))),
        "IN-USER" => ("InUser", Cond::InUser(list(payload))),
        "UID" => ("Uid", Cond::Uid(ranges(payload, "uid")?)),
        "DSCP" => ("DSCP", Cond::Dscp(ranges(payload, "DSCP")?)),
        "PROCESS-NAME" => ("ProcessName", Cond::ProcessName(payload.trim().to_owned())),
        "PROCESS-PATH" => ("ProcessPath", Cond::ProcessPath(payload.trim().to_owned())),
        "PROCESS-NAME-REGEX" => (
            "ProcessNameRegex",
            Cond::ProcessNameRegex(regex(payload.trim())?),
        ),
        "PROCESS-PATH-REGEX" => (
            "ProcessPathRegex",
            Cond::ProcessPathRegex(regex(payload.trim())?),
        ),
        "RULE-SET" => (
            "RuleSet",
            Cond::RuleSet {
                name: payload.trim().to_owned(),
                src,
            },
        ),
        "AND" => ("AND", Cond::And(logic_parts(payload)?)),
        "OR" => ("OR", Cond::Or(logic_parts(payload)?)),
        "NOT" => {
            let mut inner = logic_parts(payload)?;
            if inner.len() != 1 {
                return Err(bad(
                    "NOT takes exactly one rule: NOT,((DOMAIN,a.com)),PROXY",
                ));
            }
            ("NOT", Cond::Not(Box::new(inner.remove(0))))
        }
        "SUB-RULE" => {
            let wrapped = format!("({payload})");
            let mut inner = logic_parts(&wrapped)?;
            if inner.len() != 1 {
                return Err(bad("SUB-RULE takes one rule: SUB-RULE,(NETWORK,tcp),name"));
            }
            ("SubRules", inner.remove(0))
        }
        other => {
            return Err(bad(format!(
                "unknown rule type `{other}` (tpacct knows DOMAIN, DOMAIN-SUFFIX, DOMAIN-KEYWORD, \
                 DOMAIN-REGEX, DOMAIN-WILDCARD, GEOSITE, GEOIP, SRC-GEOIP, IP-CIDR, IP-CIDR6, \
                 SRC-IP-CIDR, IP-SUFFIX, SRC-IP-SUFFIX, DST-PORT, SRC-PORT, IN-PORT, NETWORK, \
                 IN-TYPE, IN-NAME, IN-USER, UID, DSCP, PROCESS-NAME, PROCESS-PATH and their \
                 -REGEX forms, RULE-SET, SUB-RULE, AND, OR, NOT, MATCH)"
            )));
        }
    })
}

impl Cond {
    /// Every condition inside this one (itself included), depth first.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Cond)) {
        f(self);
        match self {
            Cond::And(v) | Cond::Or(v) => v.iter().for_each(|c| c.walk(f)),
            Cond::Not(c) => c.walk(f),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mihomo_rule_lines() {
        let r = parse("DOMAIN-SUFFIX,Example.COM,PROXY").expect("rule");
        assert_eq!(
            (r.kind, r.payload.as_str(), r.target.as_str()),
            ("DomainSuffix", "Example.COM", "PROXY")
        );
        assert!(matches!(r.cond, Cond::DomainSuffix(ref s) if s == "example.com"));
        let r = parse("IP-CIDR,10.1.2.3/8,DIRECT,no-resolve").expect("rule");
        assert!(
            matches!(r.cond, Cond::IpCidr { net, src: false } if net.to_string() == "10.0.0.0/8")
        );
        let r = parse("IP-CIDR,10.0.0.0/8,DIRECT,src").expect("rule");
        assert_eq!(r.kind, "SrcIPCIDR");
        let r = parse("MATCH,DIRECT").expect("match");
        assert_eq!((r.kind, r.target.as_str()), ("Match", "DIRECT"));
        let r = parse("DST-PORT,80/443/8000-8100,PROXY").expect("ports");
        assert!(matches!(r.cond, Cond::Port { of: PortOf::Dst, ref ranges } if ranges.len() == 3));
    }

    #[test]
    fn logic_rules_nest() {
        let r = parse("AND,((DOMAIN,baidu.com),(NETWORK,UDP)),DIRECT").expect("and");
        // Shown as mihomo shows it (its `Logic.Payload()`).
        assert_eq!(
            (r.kind, r.payload.as_str()),
            ("AND", "((Domain,baidu.com) && (Network,udp))")
        );
        assert!(matches!(r.cond, Cond::And(ref v) if v.len() == 2));
        let r = parse("OR,((NOT,((DST-PORT,53))),(AND,((NETWORK,tcp),(DOMAIN-KEYWORD,x)))),REJECT")
            .expect("nested");
        assert!(matches!(r.cond, Cond::Or(ref v) if matches!(v[0], Cond::Not(_))));
        assert_eq!(
            r.payload,
            "((NOT,(!(DstPort,53))) || (AND,((Network,tcp) && (DomainKeyword,x))))"
        );
        let r = parse("SUB-RULE,(NETWORK,tcp),tcp-rules").expect("sub-rule");
        assert_eq!(
            (r.kind, r.sub_rule.as_deref()),
            ("SubRules", Some("tcp-rules"))
        );
    }

    #[test]
    fn bad_rules_say_why() {
        for (line, wanted) in [
            ("BOGUS,x,DIRECT", "unknown rule type `BOGUS`"),
            ("IP-CIDR,10.0.0.0/33,DIRECT", "is not a CIDR"),
            ("DOMAIN,a.com", "is not `TYPE,PAYLOAD,TARGET`"),
            ("DST-PORT,99999,DIRECT", "port list"),
            ("NETWORK,icmp,DIRECT", "tcp or udp"),
            ("DOMAIN-REGEX,(,DIRECT", "not a regex"),
            ("NOT,((DOMAIN,a),(DOMAIN,b)),DIRECT", "exactly one"),
            ("IP-CIDR,10.0.0.0/8,DIRECT,bogus", "unknown rule option"),
            ("MATCH", "needs a target"),
        ] {
            let e = parse(line).expect_err(line);
            assert!(e.0.contains(wanted), "{line}: {e}");
        }
    }

    #[test]
    fn wildcards_become_anchored_regexes() {
        let re = regex(&wildcard_regex("*.a?.example.com")).expect("regex");
        assert!(re.is_match("x.y.ab.example.com"));
        assert!(!re.is_match("ab.example.com"));
        assert!(!re.is_match("x.abc.example.com"));
    }
}
