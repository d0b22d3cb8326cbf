//! A client → gateway → server topology in three network namespaces joined by veth pairs,
//! IPv4 and IPv6, with tpacct's real `App` running in the gateway (managed firewall on).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    thread::JoinHandle,
};

use tokio::sync::oneshot;
use tpacct::{
    app::App,
    config::{AccountingMode, Config, FirewallConfig, Seconds},
    registry::Registry,
};

use super::{Netns, run};

pub const CLIENT4: &str = "10.91.1.2";
pub const SERVER4: &str = "10.91.2.2";
pub const CLIENT6: &str = "fd91:1::2";
pub const SERVER6: &str = "fd91:2::2";
pub const TPROXY_PORT: u16 = 7893;

/// The three namespaces.
pub struct Topology {
    pub client: Netns,
    pub gateway: Netns,
    pub server: Netns,
}

fn addr(ns: &Netns, dev: &str, cidr: &str) {
    let family = if cidr.contains(':') { "-6" } else { "-4" };
    let mut args = vec![
        "ip", family, "-n", &ns.name, "addr", "add", cidr, "dev", dev,
    ];
    if family == "-6" {
        args.push("nodad");
    }
    run(&args);
}

fn route(ns: &Netns, via: &str) {
    let family = if via.contains(':') { "-6" } else { "-4" };
    run(&[
        "ip", family, "-n", &ns.name, "route", "add", "default", "via", via,
    ]);
}

impl Topology {
    pub fn new() -> Topology {
        let t = Topology {
            client: Netns::new("c"),
            gateway: Netns::new("g"),
            server: Netns::new("s"),
        };
        let (c, g, s) = (&t.client.name, &t.gateway.name, &t.server.name);
        run(&[
            "ip", "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "g1", "netns", g,
        ]);
        run(&[
            "ip", "link", "add", "s0", "netns", s, "type", "veth", "peer", "name", "g2", "netns", g,
        ]);
        for (ns, dev) in [(c, "c0"), (g, "g1"), (g, "g2"), (s, "s0")] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        addr(&t.client, "c0", "10.91.1.2/24");
        addr(&t.client, "c0", "fd91:1::2/64");
        addr(&t.gateway, "g1", "10.91.1.1/24");
        addr(&t.gateway, "g1", "fd91:1::1/64");
        addr(&t.gateway, "g2", "10.91.2.1/24");
        addr(&t.gateway, "g2", "fd91:2::1/64");
        addr(&t.server, "s0", "10.91.2.2/24");
        addr(&t.server, "s0", "fd91:2::2/64");
        route(&t.client, "10.91.1.1");
        route(&t.client, "fd91:1::1");
        route(&t.server, "10.91.2.1");
        route(&t.server, "fd91:2::1");
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            run(&["ip", "netns", "exec", g, "sysctl", "-qw", key]);
        }
        t
    }

    /// Runs `f` on a new thread inside `ns`, returning its result.
    pub fn run_in<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
        spawn_in(ns, f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

/// Runs `fut` on a new thread inside `ns`, on a runtime of its own (its sockets are made in
/// `ns`).
pub fn spawn_async_in<T: Send + 'static>(
    ns: &Netns,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> JoinHandle<T> {
    spawn_in(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(fut)
    })
}

/// [`spawn_async_in`], waited for.
pub fn block_on_in<T: Send + 'static>(
    ns: &Netns,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    spawn_async_in(ns, fut)
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Starts `f` on a new thread inside `ns`.
pub fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(path).expect("netns file");
        nix::sched::setns(
            std::os::fd::AsFd::as_fd(&file),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .expect("setns");
        f()
    })
}

/// The gateway config tests start from: TPROXY on, firewall capturing the client side.
pub fn gateway_config(mode: AccountingMode, cgroup: std::path::PathBuf) -> Config {
    Config {
        accounting: mode,
        accounting_cgroup: Some(cgroup),
        tproxy_port: TPROXY_PORT,
        routing_mark: 6666,
        connect_timeout: Seconds(2),
        udp_idle_timeout: Seconds(2),
        // The API tests speak without auth; the generated secret is tested with the binary.
        secret: Some(String::new()),
        directory: Some(super::api::state_dir("gw")),
        tproxy_firewall: Some(FirewallConfig {
            interfaces: vec!["g1".into()],
            ..FirewallConfig::default()
        }),
        ..Config::default()
    }
}

/// tpacct's App running in the gateway namespace on its own runtime.
pub struct Gateway {
    pub registry: Arc<Registry>,
    pub listening: Vec<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Gateway {
    pub fn start(topo: &Topology, config: Config) -> Gateway {
        // Daemon logs on request only (they bypass the test harness's output capture).
        if std::env::var_os("RUST_LOG").is_some() {
            tpacct::logging::init(tpacct::config::LogLevel::Debug);
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = spawn_in(&topo.gateway, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let app = App::start(&config).await.expect("start tpacct");
                ready_tx
                    .send((app.registry().clone(), app.listening().to_vec()))
                    .expect("report ready");
                let _ = stop_rx.await;
                app.shutdown().await;
            });
        });
        let (registry, listening) = ready_rx.recv().expect("gateway started");
        Gateway {
            registry,
            listening,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Polls `cond` every 10 ms for up to `secs` seconds.
    pub fn wait_until(&self, secs: u64, what: &str, mut cond: impl FnMut(&Registry) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !cond(&self.registry) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take()
            && let Err(p) = t.join()
            && !std::thread::panicking()
        {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub fn socket(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("ip"), port)
}

/// Runs `body` against a fresh topology with the gateway started from [`gateway_config`]
/// (adjusted by `tweak`), then stops the gateway.
pub fn with_gateway(
    test: &str,
    mode: AccountingMode,
    tweak: impl FnOnce(&mut Config),
    body: impl FnOnce(&Topology, &Gateway),
) {
    with_prepared_gateway(test, mode, tweak, |_| (), |topo, gw, ()| body(topo, gw));
}

/// [`with_gateway`], with `prepare` run in the fresh topology before the gateway starts (its
/// result, servers the gateway needs at start, say, is handed to `body`).
pub fn with_prepared_gateway<T>(
    test: &str,
    mode: AccountingMode,
    tweak: impl FnOnce(&mut Config),
    prepare: impl FnOnce(&Topology) -> T,
    body: impl FnOnce(&Topology, &Gateway, T),
) {
    let _turn = super::serial();
    let topo = Topology::new();
    let mut config = gateway_config(mode, super::test_cgroup(test));
    tweak(&mut config);
    let prepared = prepare(&topo);
    let directory = config.directory.clone();
    let gateway = Gateway::start(&topo, config);
    body(&topo, &gateway, prepared);
    gateway.stop();
    // Its geodata copies are megabytes; the scratch root would only go at exit.
    if let Some(dir) = directory {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Copies the routing keys of the YAML `text` (proxies, groups, providers, rules, sub-rules,
/// sniffer, geodata keys) into `config`.
pub fn routing_from_yaml(config: &mut Config, text: &str) {
    let parsed = Config::parse(text, "test routing").unwrap_or_else(|e| panic!("{e}"));
    config.proxies = parsed.proxies;
    config.proxy_groups = parsed.proxy_groups;
    config.proxy_providers = parsed.proxy_providers;
    config.rules = parsed.rules;
    config.rule_providers = parsed.rule_providers;
    config.sub_rules = parsed.sub_rules;
    config.geox_url = parsed.geox_url;
    config.geo_auto_update = parsed.geo_auto_update;
    config.circuit_breaker = parsed.circuit_breaker;
    config.tls = parsed.tls;
    if text.contains("sniffer:") {
        config.sniffer = parsed.sniffer;
    }
}

/// One TCP connection to `target` (a server started in the server namespace): the client
/// sends `up` bytes and half-closes, the server reads them all, answers `down` bytes and
/// closes. Both ends check what arrived.
pub fn transfer(topo: &Topology, target: SocketAddr, up: u64, down: u64) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in(&topo.server, move || {
        let listener = std::net::TcpListener::bind(target).expect("server bind");
        ready_tx.send(()).expect("ready");
        let (mut conn, _) = listener.accept().expect("accept");
        let got = read_all(&mut conn);
        let sent = write_pattern(&mut conn, down);
        (got, sent)
    });
    ready_rx.recv().expect("server ready");
    let client = spawn_in(&topo.client, move || {
        let mut conn = std::net::TcpStream::connect(target).expect("client connect");
        let sent = write_pattern(&mut conn, up);
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        (sent, read_all(&mut conn))
    });
    let (client_sent, client_got) = client.join().expect("client");
    let (server_got, server_sent) = server.join().expect("server");
    assert_eq!(server_got, (up, client_sent), "upload arrived intact");
    assert_eq!(client_got, (down, server_sent), "download arrived intact");
}

/// Writes `n` pattern bytes; returns their FNV-1a checksum.
pub fn write_pattern(stream: &mut impl std::io::Write, n: u64) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut sent, mut sum) = (0u64, Fnv::new());
    while sent < n {
        let len = (n - sent).min(buf.len() as u64) as usize;
        super::pattern(sent, &mut buf[..len]);
        stream.write_all(&buf[..len]).expect("write");
        sum.feed(&buf[..len]);
        sent += len as u64;
    }
    sum.0
}

/// Reads to EOF; returns (bytes, FNV-1a checksum).
pub fn read_all(stream: &mut impl std::io::Read) -> (u64, u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut got, mut sum) = (0u64, Fnv::new());
    loop {
        let n = stream.read(&mut buf).expect("read");
        if n == 0 {
            return (got, sum.0);
        }
        sum.feed(&buf[..n]);
        got += n as u64;
    }
}

/// FNV-1a, 64 bit.
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The gateway's controller, from inside its namespace.
pub const API: &str = "127.0.0.1:9090";

/// A plain HTTP/1.1 request to the controller from inside the gateway namespace.
pub fn http(topo: &Topology, method: &str, path: &str) -> (u16, serde_json::Value) {
    http_with(topo, method, path, "")
}

/// [`http`] with a JSON body.
pub fn http_with(
    topo: &Topology,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    Topology::run_in(&topo.gateway, move || {
        let mut conn = std::net::TcpStream::connect(API).expect("connect to the API");
        conn.write_all(request.as_bytes()).expect("request");
        let mut reply = String::new();
        conn.read_to_string(&mut reply).expect("reply");
        let status = reply[9..12].parse().expect("status code");
        let body = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        )
    })
}
