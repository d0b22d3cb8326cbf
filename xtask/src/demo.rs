//! The demo topology: client and server namespaces on either side of a gateway namespace where
//! tpacctd runs with its managed firewall, plus servers (HTTP, TLS, UDP echo) and client
//! traffic, so a newcomer sees flows with exact counters on day one.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns::Topology;

const PREFIX: &str = "tpacct-demo";
const NET: u8 = 92;
const SERVER_IP: &str = "10.92.2.2";
const TLS_NAME: &str = "demo.tpacct.test";
const HTTP_BODY: usize = 100_000;

const CONFIG: &str = "\
# tpacct demo gateway: capture everything arriving from the client namespace. No `secret`:
# tpacctd generates one at first start and keeps it in its state directory.
log-level: info
tproxy-port: 7893
routing-mark: 6666
external-controller: 127.0.0.1:9090
tproxy-firewall:
  interfaces: [gw-lan]
# Names for the usage page and `tpacctd top` (by MAC or address).
devices:
  10.92.1.2: demo-client
";
/// Where the host reaches the controller (forwarded into the gateway namespace).
const HOST_API: &str = "127.0.0.1:9090";

/// Child processes killed on drop.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn in_ns(ns: &str, program: &Path, args: &[&str]) -> Command {
    let mut cmd = Topology::exec(ns, program);
    cmd.args(args);
    cmd
}

/// Runs the demo. `rounds`: how many traffic rounds (None: until Ctrl-C).
pub fn run(daemon: &Path, rounds: Option<u32>) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;

    let dir = PathBuf::from("target/demo");
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.yaml");
    std::fs::write(&config, CONFIG)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !cert.exists() || !key.exists() {
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
            ])
            .args(["-subj", &format!("/CN={TLS_NAME}")])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .context("openssl req")?;
        if !out.status.success() {
            bail!("openssl req: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    let topo = Topology::up(PREFIX, NET)?;
    let me = std::env::current_exe()?;
    let mut children = Children(Vec::new());
    children.0.push(
        in_ns(
            &topo.server,
            &me,
            &["demo-serve", "http", &format!("{SERVER_IP}:80")],
        )
        .spawn()?,
    );
    children.0.push(
        in_ns(
            &topo.server,
            &me,
            &["demo-serve", "udp", &format!("{SERVER_IP}:5353")],
        )
        .spawn()?,
    );
    children.0.push(
        in_ns(
            &topo.server,
            Path::new("openssl"),
            &["s_server", "-quiet", "-www", "-accept", "443"],
        )
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?,
    );

    let state = dir.join("state");
    // A fresh history, so the usage page adds up to this run's clients (the secret stays).
    for file in ["history.db", "history.db-wal", "history.db-shm"] {
        let _ = std::fs::remove_file(state.join(file));
    }
    let mut gateway = in_ns(&topo.gateway, daemon, &["run", "--config"])
        .arg(&config)
        .arg("-d")
        .arg(&state)
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tpacctd")?;
    let lines = forward_log(gateway.stderr.take().context("tpacctd stderr")?);
    children.0.push(gateway);
    wait_for(&lines, "ready", Duration::from_secs(20))?;
    let api = crate::forward::start(HOST_API.parse()?, &topo.gateway, "127.0.0.1:9090".parse()?)?;
    let secret = std::fs::read_to_string(state.join("secret")).unwrap_or_default();
    let secret = secret.trim();

    eprintln!(
        "\ndemo: client {} → gateway {} (tpacctd) → server {}",
        topo.client, topo.gateway, topo.server
    );
    eprintln!(
        "demo: usage page on http://{api}/ui/ (from this host's browser), secret {secret}\n\
         demo: Clash API on http://{api}, the same secret\n\
         demo:   try: curl -H 'Authorization: Bearer {secret}' http://{api}/connections\n\
         demo:   or point a dashboard (metacubexd, zashboard, yacd) at http://{api} with that secret\n"
    );
    let mut round = 0;
    let mut total = Moved::default();
    while rounds.is_none_or(|n| round < n) && !stop.load(Ordering::SeqCst) {
        round += 1;
        total += traffic(&me, &topo.client)?;
        eprintln!(
            "demo: so far {} flows, up {} B, down {} B: the usage page (http://{api}/ui/, range \
             \"Today\") says the same once the round's flows are in",
            total.0, total.1, total.2
        );
        // Let the closes reach the log before the next round or the end.
        std::thread::sleep(Duration::from_millis(500));
        if rounds.is_none() {
            for _ in 0..50 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    // UDP sessions close after their idle timeout (60 s); stopping the daemon closes them now.
    if let Some(daemon) = children.0.last() {
        let _ = Command::new("kill")
            .args(["-TERM", &daemon.id().to_string()])
            .status();
    }
    if let Some(mut daemon) = children.0.pop() {
        let _ = daemon.wait();
    }
    std::thread::sleep(Duration::from_millis(200));
    eprintln!("demo: done; namespaces removed");
    Ok(())
}

/// Copies tpacctd's log to our stderr and hands each line to the returned channel.
fn forward_log(stderr: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  tpacctd | {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

fn wait_for(lines: &mpsc::Receiver<String>, needle: &str, within: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return Ok(()),
            Ok(_) => {}
            Err(_) => bail!("tpacctd did not log {needle:?} within {within:?}"),
        }
    }
}

/// What the demo's clients moved: flows, bytes sent, bytes received (payload, as each client
/// counted it at its own socket).
#[derive(Debug, Default, Clone, Copy)]
struct Moved(u64, u64, u64);

impl std::ops::AddAssign for Moved {
    fn add_assign(&mut self, o: Moved) {
        *self = Moved(self.0 + o.0, self.1 + o.1, self.2 + o.2);
    }
}

/// One round of client traffic: HTTP with curl, HTTPS with curl through a byte meter, UDP
/// with our own client.
fn traffic(me: &Path, client: &str) -> Result<Moved> {
    let curl = |args: &[&str]| -> Result<String> {
        let out = in_ns(client, Path::new("curl"), args)
            .output()
            .context("running curl in the client namespace")?;
        if !out.status.success() {
            bail!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let counts = "%{size_request} %{size_header} %{size_download}";
    let http = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        counts,
        "-H",
        &format!("Host: {TLS_NAME}"),
        &format!("http://{SERVER_IP}/"),
    ])?;
    let [sent, header, body] = parse3(&http);
    eprintln!(
        "demo client | HTTP  {SERVER_IP}:80: sent {sent} B, received {} B (the gateway's log \
         line for this flow should say up {sent} B, down {} B)",
        header + body,
        header + body
    );
    let mut moved = Moved(1, sent, header + body);
    for args in [
        vec![
            "demo-https".to_owned(),
            format!("{SERVER_IP}:443"),
            TLS_NAME.to_owned(),
        ],
        vec!["demo-udp".to_owned(), format!("{SERVER_IP}:5353")],
    ] {
        let kind = &args[0];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = in_ns(client, me, &args)
            .output()
            .with_context(|| format!("{kind} client"))?;
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!("the {kind} client failed");
        }
        let [flows, up, down] = parse3(&String::from_utf8_lossy(&out.stdout));
        moved += Moved(flows, up, down);
    }
    Ok(moved)
}

fn parse3(text: &str) -> [u64; 3] {
    let mut it = text.split_whitespace().map(|n| n.parse().unwrap_or(0));
    [(); 3].map(|()| it.next().unwrap_or(0))
}

/// `demo-serve http|udp ADDR`, run inside the server namespace.
pub fn serve(kind: &str, addr: &str) -> Result<()> {
    match kind {
        "http" => {
            let listener = TcpListener::bind(addr)?;
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match conn.read(&mut byte) {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let header = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {HTTP_BODY}\r\nConnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(header.as_bytes());
                    let _ = conn.write_all(&vec![b'x'; HTTP_BODY]);
                });
            }
            Ok(())
        }
        "udp" => {
            let socket = UdpSocket::bind(addr)?;
            let mut buf = vec![0u8; 65_536];
            loop {
                let (n, from) = socket.recv_from(&mut buf)?;
                socket.send_to(&buf[..n], from)?;
            }
        }
        other => bail!("unknown demo server {other}"),
    }
}
