//! What health-check tests steer and observe: a probe server (the check URL) that counts the
//! tests it answers per proxy address and how many are in flight, can hold them until released,
//! answers a status chosen by the path, and speaks HTTPS with a certificate the gateway is told
//! to trust, and delays its answer by the address a test comes from: each proxy leaves from
//! its own address, so that is a per-proxy delay (this kernel has no `sch_netem` to do it with
//! tc); and a microsocks that can be stopped.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::{Netns, topo::spawn_in, upstreams::wait_listening};

/// What the probe saw.
#[derive(Default)]
pub struct Probe {
    /// Arrival times of tests, by the address they came from.
    seen: Mutex<HashMap<IpAddr, Vec<Instant>>>,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Answers wait while this is false.
    open: Mutex<bool>,
    /// How long answers to each address wait.
    delays: Mutex<HashMap<IpAddr, Duration>>,
    opened: Condvar,
}

impl Probe {
    /// Tests that came from `ip`.
    pub fn count(&self, ip: &str) -> usize {
        let ip: IpAddr = ip.parse().expect("ip");
        self.seen.lock().expect("seen").get(&ip).map_or(0, Vec::len)
    }

    /// Tests from every address.
    pub fn total(&self) -> usize {
        self.seen.lock().expect("seen").values().map(Vec::len).sum()
    }

    /// When the last test from `ip` arrived.
    pub fn last(&self, ip: &str) -> Option<Instant> {
        let ip: IpAddr = ip.parse().expect("ip");
        self.seen.lock().expect("seen").get(&ip)?.last().copied()
    }

    /// Answers tests from `ip` `ms` milliseconds late from now on.
    pub fn set_delay(&self, ip: &str, ms: u64) {
        let ip: IpAddr = ip.parse().expect("ip");
        let mut delays = self.delays.lock().expect("delays");
        delays.insert(ip, Duration::from_millis(ms));
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Holds answers again until the next [`Probe::release`].
    pub fn hold(&self) {
        *self.open.lock().expect("open") = false;
    }

    /// Lets held answers (and all later ones) go.
    pub fn release(&self) {
        *self.open.lock().expect("open") = true;
        self.opened.notify_all();
    }

    /// Polls `cond` every 10 ms for up to `secs`.
    pub fn wait(&self, secs: u64, what: &str, cond: impl Fn(&Probe) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn answer(&self, conn: &mut (impl Read + Write), peer: IpAddr, hold: Duration) {
        let mut reader = BufReader::new(&mut *conn);
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                break;
            }
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.strip_prefix("/status/"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(204);
        self.seen
            .lock()
            .expect("seen")
            .entry(peer)
            .or_default()
            .push(Instant::now());
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        {
            let open = self.open.lock().expect("open");
            drop(self.opened.wait_while(open, |o| !*o).expect("wait"));
        }
        let late = self.delays.lock().expect("delays").get(&peer).copied();
        std::thread::sleep(hold + late.unwrap_or_default());
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let head =
            format!("HTTP/1.1 {status} Status\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.flush();
    }
}

/// A certificate for `ip` and its key, and the CA that signed it (to trust), as PEM text.
fn certificate(ip: IpAddr) -> (String, String, String) {
    let dir = super::scratch::path("probe");
    std::fs::create_dir_all(&dir).expect("probe dir");
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let openssl = |args: &[&str]| {
        let made = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(made.status.success(), "openssl {args:?}: {made:?}");
    };
    let rsa = ["-newkey", "rsa:2048", "-nodes"];
    openssl(
        &[
            &["req", "-x509", "-days", "1", "-subj", "/CN=probe CA"][..],
            &rsa,
            &["-keyout", &path("ca.key"), "-out", &path("ca.pem")],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-subj", "/CN=probe.test"][..],
            &rsa,
            &["-keyout", &path("key.pem"), "-out", &path("leaf.csr")],
        ]
        .concat(),
    );
    std::fs::write(
        path("ext.cnf"),
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n"),
    )
    .expect("ext");
    openssl(&[
        "x509",
        "-req",
        "-days",
        "1",
        "-in",
        &path("leaf.csr"),
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-extfile",
        &path("ext.cnf"),
        "-out",
        &path("cert.pem"),
    ]);
    let read = |f: &str| std::fs::read_to_string(path(f)).expect(f);
    let pems = (read("cert.pem"), read("key.pem"), read("ca.pem"));
    let _ = std::fs::remove_dir_all(&dir);
    pems
}

fn tls_config(cert: &str, key: &str) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.expect("cert"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    Arc::new(config)
}

/// Starts the probe in `ns`: plain HTTP on `http`, HTTPS on each of `https` (with a
/// certificate for the first's address only); answers are held until [`Probe::release`]
/// unless `open`, then each takes `hold`. Returns it and the PEM of the CA to trust
/// (`tls.custom-certifactes`).
pub fn start(
    ns: &Netns,
    http: SocketAddr,
    https: &[SocketAddr],
    open: bool,
    hold: Duration,
) -> (Arc<Probe>, String) {
    let probe = Arc::new(Probe::default());
    *probe.open.lock().expect("open") = open;
    let (pem, key, ca) = certificate(https[0].ip());
    let tls = tls_config(&pem, &key);
    let listeners =
        std::iter::once((http, None)).chain(https.iter().map(|a| (*a, Some(tls.clone()))));
    for (addr, tls) in listeners {
        let probe = probe.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        spawn_in(ns, move || {
            let listener = TcpListener::bind(addr).expect("bind probe");
            ready_tx.send(()).expect("ready");
            for conn in listener.incoming().map_while(Result::ok) {
                let (probe, tls) = (probe.clone(), tls.clone());
                std::thread::spawn(move || serve(&probe, conn, tls, hold));
            }
        });
        ready_rx.recv().expect("probe ready");
    }
    (probe, ca)
}

fn serve(
    probe: &Probe,
    mut conn: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    hold: Duration,
) {
    let Ok(peer) = conn.peer_addr().map(|a| a.ip()) else {
        return;
    };
    match tls {
        None => probe.answer(&mut conn, peer, hold),
        Some(config) => {
            let Ok(session) = rustls::ServerConnection::new(config) else {
                return;
            };
            let mut stream = rustls::StreamOwned::new(session, conn);
            probe.answer(&mut stream, peer, hold);
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
    }
}

/// A proxy process, stopped on drop.
pub struct Spare(Child);

impl Spare {
    /// Stops it now.
    pub fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A microsocks on `listen` in `ns` whose connections leave from `out` (added to `s0` if
/// missing); it stops when dropped.
pub fn microsocks(ns: &Netns, listen: SocketAddr, out: &str) -> Spare {
    let _ = Command::new("ip")
        .args([
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{out}/24"),
            "dev",
            "s0",
        ])
        .stderr(Stdio::null())
        .status();
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "microsocks", "-i"])
        .arg(listen.ip().to_string())
        .args(["-p", &listen.port().to_string(), "-b", out])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("microsocks");
    let spare = Spare(child);
    wait_listening(ns, listen);
    spare
}

/// Polls the gateway's `GET path` every 50 ms until `cond` holds of the JSON, for up to `secs`;
/// returns that JSON.
pub fn api_until(
    topo: &super::topo::Topology,
    secs: u64,
    path: &str,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, v) = super::topo::http(topo, "GET", path);
        if status == 200 && cond(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A connection through the gateway to a server in `server` that holds it open; the receiver
/// gets the client's read result once the connection ends (closed or reset).
pub fn held(
    client: &Netns,
    server: &Netns,
    addr: SocketAddr,
) -> std::sync::mpsc::Receiver<std::io::Result<usize>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in(server, move || {
        let listener = TcpListener::bind(addr).expect("bind hold server");
        ready_tx.send(()).expect("ready");
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 64];
        while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
    });
    ready_rx.recv().expect("hold server");
    let (open_tx, open_rx) = std::sync::mpsc::channel();
    let (end_tx, end_rx) = std::sync::mpsc::channel();
    spawn_in(client, move || {
        let mut conn = TcpStream::connect(addr).expect("connect through the gateway");
        conn.write_all(b"x").expect("write");
        open_tx.send(()).expect("open");
        let mut buf = [0u8; 64];
        let _ = end_tx.send(conn.read(&mut buf));
    });
    open_rx.recv().expect("held connection open");
    end_rx
}
