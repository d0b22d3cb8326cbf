//! Routing decisions at 10, 10,000 and 200,000 rules: the real config parser, the real build
//! (compiled domain and CIDR sets) and the real `Router::route` a flow calls, timed one
//! decision at a time over a mix of names and addresses that match early, late and not at
//! all. Prints one line per size: `rules decisions_per_s p50_ns p99_ns build_ms rss_bytes`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use tpacct::{
    config::{Config, Mode},
    route::{self, Net, Query, Router},
};

/// A mihomo rule list of `n` rules (the last one MATCH): half domain rules (DOMAIN-SUFFIX,
/// one in five DOMAIN, one in a thousand DOMAIN-REGEX), half IP-CIDR, then MATCH. `cargo
/// xtask bench` gives both cores the same mix for its 10k-rules churn.
fn rules(n: usize) -> String {
    let mut text = String::from("rules:\n");
    for i in 0..n.saturating_sub(1) {
        let line = if i % 2 == 1 {
            let (a, b, c) = cidr(i);
            format!("IP-CIDR,{a}.{b}.{c}.0/24,REJECT,no-resolve")
        } else if i % 1000 == 2 {
            format!("DOMAIN-REGEX,^re{i}\\.[a-z]+\\.example$,REJECT")
        } else if i % 10 == 0 {
            format!("DOMAIN,host{i}.example.net,DIRECT")
        } else {
            format!("DOMAIN-SUFFIX,site{i}.example,REJECT")
        };
        text += &format!("  - '{line}'\n");
    }
    text + "  - 'MATCH,DIRECT'\n"
}

/// The first three octets of rule `i`'s /24.
fn cidr(i: usize) -> (usize, usize, usize) {
    (11 + (i >> 16) % 200, (i >> 8) % 256, i % 256)
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The flows to route: (host, destination), a quarter each matching a DOMAIN-SUFFIX, a
/// DOMAIN, a CIDR (no name) and nothing (then MATCH), spread over the whole list.
fn flows(n: usize) -> Vec<(Option<String>, IpAddr)> {
    let nowhere = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    (0..20_000)
        .map(|k: usize| {
            let i = (k.wrapping_mul(7919)) % n.saturating_sub(1).max(1);
            let tens = i - i % 10;
            match k % 4 {
                0 => (Some(format!("www.site{}.example", tens + 4)), nowhere),
                1 => (Some(format!("cdn{k}.nowhere.test")), nowhere),
                2 => {
                    let (a, b, c) = cidr(i | 1);
                    (
                        None,
                        IpAddr::V4(Ipv4Addr::new(a as u8, b as u8, c as u8, 9)),
                    )
                }
                _ => (Some(format!("host{tens}.example.net")), nowhere),
            }
        })
        .collect()
}

/// One size under test: its router, its flows, and what was measured.
struct Size {
    n: usize,
    router: std::sync::Arc<Router>,
    flows: Vec<(Option<String>, IpAddr)>,
    build_ms: f64,
    grown: u64,
    times: Vec<u64>,
    busy: Duration,
}

fn build(runtime: &tokio::runtime::Runtime, dir: &std::path::Path, n: usize) -> Size {
    let before = rss();
    let started = Instant::now();
    let config = Config::parse(&rules(n), "bench").expect("rules parse");
    let routing = runtime
        .block_on(route::build(&config, dir, Default::default()))
        .expect("routing builds");
    let router = Router::new(Mode::Rule, routing);
    Size {
        n,
        build_ms: started.elapsed().as_secs_f64() * 1e3,
        grown: rss().saturating_sub(before),
        router,
        flows: flows(n),
        times: Vec::new(),
        busy: Duration::ZERO,
    }
}

/// Routes every flow of `size` once, timing each decision.
fn pass(size: &mut Size) {
    let source = SocketAddr::from(([10, 0, 0, 2], 40000));
    let all = Instant::now();
    for (host, ip) in &size.flows {
        let q = Query {
            network: Net::Tcp,
            source,
            destination: Some(*ip),
            destination_port: 443,
            host: host.as_deref(),
            in_port: 7893,
            in_type: "TPROXY",
            in_name: "DEFAULT-TPROXY",
            in_user: None,
            uid: None,
            process: None,
            process_path: None,
        };
        let t = Instant::now();
        let (route, _) = size.router.route(&q);
        size.times.push(t.elapsed().as_nanos() as u64);
        std::hint::black_box(route);
    }
    size.busy += all.elapsed();
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _entered = runtime.enter();
    let dir = std::env::temp_dir().join(format!("tpacct-routing-bench-{}", std::process::id()));
    let quick = std::env::args().any(|a| a == "--quick");
    let mut sizes: Vec<Size> = [10, 10_000, 200_000]
        .into_iter()
        .map(|n| build(&runtime, &dir, n))
        .collect();
    // Passes interleaved across sizes, so a noisy moment on a shared machine falls on all of
    // them alike and their ratios hold.
    for _ in 0..if quick { 4 } else { 20 } {
        sizes.iter_mut().for_each(pass);
    }
    for size in &mut sizes {
        let per_s = size.times.len() as f64 / size.busy.as_secs_f64();
        size.times.sort_unstable();
        let at = |q: f64| size.times[((size.times.len() - 1) as f64 * q) as usize];
        println!(
            "{} {per_s:.0} {} {} {:.0} {}",
            size.n,
            at(0.5),
            at(0.99),
            size.build_ms,
            size.grown
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
