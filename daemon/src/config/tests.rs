//! Parsing tests: defaults, ranges, unknown keys, and every error naming its key and line.

use std::path::PathBuf;

use super::*;

fn invalid(text: &str) -> Error {
    Config::parse(text, "test.yaml").expect_err("config should be rejected")
}

#[test]
fn empty_is_defaults() {
    assert_eq!(Config::parse("", "x").ok(), Some(Config::default()));
    assert_eq!(
        Config::parse("# nothing\n\n", "x").ok(),
        Some(Config::default())
    );
}

#[test]
fn reads_known_keys() {
    let c = Config::parse(
        "log-level: debug\naccounting: userspace\naccounting-cgroup: /sys/fs/cgroup/x\n",
        "x",
    )
    .expect("valid config");
    assert_eq!(c.log_level, LogLevel::Debug);
    assert_eq!(c.accounting, AccountingMode::Userspace);
    assert_eq!(c.accounting_cgroup, Some(PathBuf::from("/sys/fs/cgroup/x")));
    assert_eq!(c.accounting_max_sockets, None);
    let c = Config::parse("accounting-max-sockets: 8\n", "x").expect("valid config");
    assert_eq!(c.accounting().max_sockets, 8);
}

#[test]
fn map_capacity_follows_the_open_files_limit_in_the_daemons_own_cgroup() {
    use super::auto_max_sockets as auto;
    // 20,000 descriptors: 40,000 sockets, the next power of two.
    assert_eq!(auto(false, Some(20_000)), 65_536);
    assert_eq!(auto(false, Some(1_024)), 16_384, "never below 16k");
    assert_eq!(auto(false, Some(1 << 20)), tpacct_common::MAX_SOCKETS);
    assert_eq!(auto(false, None), tpacct_common::MAX_SOCKETS, "no limit");
    assert_eq!(
        auto(true, Some(20_000)),
        tpacct_common::MAX_SOCKETS,
        "a configured cgroup may hold other processes"
    );
}

#[test]
fn map_capacity_must_be_in_range() {
    for bad in ["0", "99999999999", "-1", "many"] {
        let e = invalid(&format!("accounting-max-sockets: {bad}\n"));
        assert_eq!(e.key(), Some("accounting-max-sockets"), "{bad}: {e}");
    }
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let e = invalid("log-level: info\nbogus-key: 1\n");
    assert_eq!(e.key(), Some("bogus-key"));
    assert_eq!(e.line(), Some(2));
    assert!(e.to_string().contains("bogus-key"), "{e}");
}

#[test]
fn bad_value_is_named_with_its_line() {
    let e = invalid("log-level: info\naccounting: kernel\n");
    assert_eq!(e.key(), Some("accounting"));
    assert_eq!(e.line(), Some(2));
    let e = invalid("log-level: loud\n");
    assert_eq!(e.key(), Some("log-level"));
    assert_eq!(e.line(), Some(1));
}

#[test]
fn reads_data_path_keys() {
    let c = Config::parse(
        "tproxy-port: 7894\nbind-address: '::1'\nrouting-mark: 6666\n\
         interface-name: eth0\nudp-idle-timeout: 5\nclosed-connections: 10\n\
         tproxy-firewall:\n  interfaces: [lan0]\n  bypass: [192.168.0.0/16]\n",
        "x",
    )
    .expect("valid config");
    assert_eq!(c.tproxy_port, 7894);
    assert_eq!(c.bind_address, BindAddress::One("::1".parse().expect("ip")));
    assert_eq!(c.routing_mark, 6666);
    assert_eq!(c.interface_name.as_deref(), Some("eth0"));
    assert_eq!(c.udp_idle_timeout, Seconds(5));
    let fw = c.tproxy_firewall.expect("firewall");
    assert_eq!(fw.interfaces, ["lan0"]);
}

#[test]
fn cross_key_rules_name_the_key() {
    let e = invalid("routing-mark: 0\ntproxy-firewall:\n  local: true\n");
    assert_eq!(e.key(), Some("tproxy-firewall.local"));
    assert_eq!(e.line(), Some(3));
    let e = invalid("bind-address: nowhere\n");
    assert_eq!(e.key(), Some("bind-address"));
    let e = invalid("fast-path:\n  enable: true\n  interfaces: [lan0]\n");
    assert_eq!(e.key(), Some("fast-path.enable"), "{e}");
    assert_eq!(e.line(), Some(2));
    let firewall = "tproxy-port: 7893\ntproxy-firewall:\n  interfaces: [lan0]\n";
    let e = invalid(&format!(
        "{firewall}fast-path:\n  enable: true\n  interfaces: [lan0]\n  mark: 1\n"
    ));
    assert_eq!(e.key(), Some("fast-path.mark"), "{e}");
    assert_eq!(e.line(), Some(7));
    let ok = Config::parse(
        &format!("{firewall}fast-path:\n  enable: true\n  interfaces: [lan0]\n"),
        "x",
    )
    .expect("valid");
    assert_eq!(ok.fast_path.mark, 0x4000_0000);
}

#[test]
fn every_number_has_a_range() {
    for (text, key, line) in [
        ("connect-timeout: 0\n", "connect-timeout", 1),
        (
            "log-level: info\nudp-idle-timeout: 0\n",
            "udp-idle-timeout",
            2,
        ),
        ("tcp-idle-timeout: 9999999\n", "tcp-idle-timeout", 1),
        ("max-connections: 0\n", "max-connections", 1),
        ("udp-max-sessions: 0\n", "udp-max-sessions", 1),
        ("closed-connections: 0\n", "closed-connections", 1),
        ("tproxy-port: 70000\n", "tproxy-port", 1),
        ("routing-mark: -1\n", "routing-mark", 1),
    ] {
        let e = invalid(text);
        assert_eq!(e.key(), Some(key), "{text}: {e}");
        assert_eq!(e.line(), Some(line), "{text}: {e}");
    }
    assert!(
        invalid("connect-timeout: 0\n")
            .to_string()
            .contains("1 s to 300 s")
    );
}

#[test]
fn nested_keys_are_found_on_their_line() {
    let text = "tproxy-firewall:\n  interfaces: [lan0]\n  # the mark\n  fwmark: 0\n";
    let e = invalid(text);
    assert_eq!(e.key(), Some("tproxy-firewall.fwmark"));
    assert_eq!(e.line(), Some(4));
    let e = invalid("routing-mark: 1\ntproxy-firewall:\n  table: 254\n");
    assert_eq!(
        (e.key(), e.line()),
        (Some("tproxy-firewall.table"), Some(3))
    );
}

#[test]
fn syntax_error_has_a_line() {
    let e = invalid("log-level: info\n  accounting: [\n");
    assert!(e.line().is_some(), "{e}");
}

#[test]
fn a_typical_mihomo_config_loads() {
    let text = r#"
mode: rule
log-level: info
dns:
  enable: true
  nameserver: [223.5.5.5]
proxies:
  - name: hk
    type: socks5
    server: proxy.example.com
    port: 1080
    udp: true
  - {name: us, type: http, server: 203.0.113.9, port: 443, tls: true, sni: us.example.com, username: a, password: b}
proxy-groups:
  - name: Proxy
    type: select
    proxies: [Auto, hk, us, DIRECT]
  - &auto
    name: Auto
    type: url-test
    proxies: [hk, us]
    url: https://www.gstatic.com/generate_204
    interval: 300
rule-providers:
  reject:
    type: http
    behavior: domain
    url: https://example.com/reject.txt
    format: text
    interval: 86400
rules:
  - RULE-SET,reject,REJECT
  - DOMAIN-SUFFIX,google.com,Proxy
  - GEOSITE,cn,DIRECT
  - GEOIP,CN,DIRECT,no-resolve
  - IP-CIDR,192.168.0.0/16,DIRECT,no-resolve
  - MATCH,Proxy
"#;
    let c = Config::parse(text, "x").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.proxies.len(), 2);
    assert_eq!(c.proxy_groups.len(), 2);
    assert_eq!(c.rules.len(), 6);
    assert!(
        c.ignored.iter().any(|(k, _)| k == "dns"),
        "mihomo keys tpacct does without are named, not errors"
    );
}

#[test]
fn routing_mistakes_name_their_key_and_line() {
    for (text, key, line) in [
        (
            "rules:\n  - MATCH,DIRECT\n  - BOGUS,x,DIRECT\n",
            "rules[1]",
            3,
        ),
        ("rules:\n  - DOMAIN,a.com,NOWHERE\n", "rules[0]", 2),
        ("rules:\n  - IP-CIDR,10.0.0.0/33,DIRECT\n", "rules[0]", 2),
        ("rules:\n  - RULE-SET,missing,DIRECT\n", "rules[0]", 2),
        (
            "proxies:\n  - {name: a, type: ss, server: x, port: 1}\n",
            "proxies[0].type",
            2,
        ),
        (
            "proxy-groups:\n  - {name: A, type: select, proxies: [B]}\n  - {name: B, type: select, proxies: [A]}\n",
            "proxy-groups[0].proxies",
            2,
        ),
        (
            "proxy-groups:\n  - {name: A, type: select, proxies: [nobody]}\n",
            "proxy-groups[0].proxies",
            2,
        ),
        (
            "proxy-groups:\n  - {name: A, type: url-test, proxies: [DIRECT], tolerance: -5}\n",
            "proxy-groups[0].tolerance",
            2,
        ),
        (
            "proxy-groups:\n  - {name: A, type: load-balance, proxies: [DIRECT], strategy: random}\n",
            "proxy-groups[0].strategy",
            2,
        ),
        (
            "rule-providers:\n  r:\n    type: http\n    behavior: domain\n",
            "rule-providers.r.url",
            2,
        ),
        ("geodata-mode: true\n", "geodata-mode", 1),
        (
            "proxy-groups:\n  - name: A\n    type: url-test\n    proxies: [DIRECT]\n    url: ftp://x/\n",
            "proxy-groups[0].url",
            5,
        ),
        (
            "proxy-groups:\n  - name: A\n    type: fallback\n    proxies: [DIRECT]\n    expected-status: 2xx\n",
            "proxy-groups[0].expected-status",
            5,
        ),
        (
            "proxy-groups:\n  - {name: A, type: url-test, proxies: [B]}\n  - {name: B, type: fallback, proxies: [C]}\n  - {name: C, type: load-balance, proxies: [A]}\n",
            "proxy-groups[0].proxies",
            2,
        ),
        (
            "tls:\n  custom-certifactes:\n    - not a certificate\n",
            "tls.custom-certifactes[0]",
            3,
        ),
        (
            "sub-rules:\n  s:\n    - DOMAIN,a,nowhere\nrules:\n  - SUB-RULE,(NETWORK,tcp),s\n",
            "sub-rules.s[0]",
            3,
        ),
    ] {
        let e = invalid(text);
        assert_eq!(e.key(), Some(key), "{text}: {e}");
        assert_eq!(e.line(), Some(line), "{text}: {e}");
    }
}

#[test]
fn health_keys_parse_with_mihomos_names() {
    let c = Config::parse(
        "lan-allowed-ips: [192.168.0.0/16]\n\
         circuit-breaker: {max-failures: 2, recovery-time: 5}\n\
         proxy-groups:\n  - {name: A, type: url-test, proxies: [DIRECT], tolerance: 50, \
         interval: 60, lazy: false, idle-timeout: 90, expected-status: 200/204}\n",
        "test",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.lan_allowed_ips,
        vec!["192.168.0.0/16".parse().expect("net")]
    );
    assert_eq!(
        (
            c.circuit_breaker.max_failures.0,
            c.circuit_breaker.recovery_time.0
        ),
        (2, 5)
    );
    assert_eq!(c.circuit_breaker.failure_window.0, 300, "default");
    let g = &c.proxy_groups[0];
    assert_eq!(
        (g.tolerance, g.lazy, g.idle_timeout.map(|t| t.0)),
        (Some(50), Some(false), Some(90))
    );
}

#[test]
fn sizes_take_units_and_bad_ones_name_the_key() {
    let c = Config::parse("memory-limit: 512M\nmemory-kill-all: true\n", "t").expect("parse");
    assert_eq!(c.memory_limit, Some(Bytes(512 << 20)));
    assert!(c.memory_kill_all);
    for (text, bytes) in [
        ("65536", 65536),
        ("1.5GiB", 3 << 29),
        ("2KB", 2048),
        ("0", 0),
    ] {
        let c = Config::parse(&format!("memory-limit: {text}\n"), "t").expect("parse");
        assert_eq!(c.memory_limit, Some(Bytes(bytes)), "{text}");
    }
    for bad in ["12 parsecs", "lots", "-5M", "[1]"] {
        let e = Config::parse(&format!("\nmemory-limit: {bad}\n"), "t")
            .expect_err(bad)
            .to_string();
        assert!(
            e.contains("memory-limit") && e.contains("line 2"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn external_ui_follows_mihomo() {
    let c = Config::parse("external-ui: ui\nexternal-ui-name: xd\n", "test.yaml").expect("parse");
    let state = PathBuf::from("/var/lib/tpacct");
    assert_eq!(
        c.external_ui(&state),
        Some((PathBuf::from("/var/lib/tpacct/ui/xd"), "xd"))
    );
    let c = Config::parse("external-ui: /opt/yacd\n", "test.yaml").expect("parse");
    assert_eq!(
        c.external_ui(&state),
        Some((PathBuf::from("/opt/yacd"), "dashboard"))
    );
    assert_eq!(Config::default().external_ui(&state), None);
    for bad in ["..", "a/b", "", "usage.js", "x y"] {
        let e = invalid(&format!("external-ui: ui\nexternal-ui-name: '{bad}'\n"));
        assert_eq!(e.key(), Some("external-ui-name"), "{bad}: {e}");
        assert_eq!(e.line(), Some(2), "{bad}: {e}");
    }
}
