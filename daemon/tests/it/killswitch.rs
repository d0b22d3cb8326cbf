//! The OOM kill switch for real: `tpacctd` runs in a memory cgroup whose limit is set just
//! above what it uses, connections that hold data are opened through TPROXY one by one until
//! the daemon's charged memory crosses 80% of that limit. The daemon must survive, close the
//! newest flows first, refuse new ones during the cool-down, accept them again after it, and
//! keep every flow's totals: the survivors' exact, the closed ones' at least what their clients
//! saw acknowledged.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use tpacct::memory::Memory;

use crate::{
    common::{
        daemon::Daemon,
        harness::Skip,
        topo::{SERVER4, Topology, socket, spawn_in},
        upstreams::identify_server,
    },
    metrics::{metric, parsed, scrape, sum, wait_for},
};

const HOLD_PORT: u16 = 9000;
/// The most connections opened before giving up on a trip.
const MAX_CONNECTIONS: usize = 3000;
/// Charged memory the daemon may add before the switch trips.
const HEADROOM: u64 = 12 << 20;

/// A memory cgroup of our own under the test process's (v1 or v2).
struct MemCgroup {
    dir: PathBuf,
    v1: bool,
}

impl MemCgroup {
    fn new(name: &str) -> Result<MemCgroup, Skip> {
        let (parent, v1) = match Memory::locate() {
            Memory::V1(dir) => (dir, true),
            Memory::V2 { own, .. } => {
                let control =
                    std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap_or_default();
                if !control.split_whitespace().any(|c| c == "memory") {
                    return Err(Skip(format!(
                        "the memory controller is not enabled below {}",
                        own.display()
                    )));
                }
                (own, false)
            }
            Memory::Rss => return Err(Skip("no memory cgroup on this machine".into())),
        };
        let dir = parent.join(format!("tpacct-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Skip(format!("{}: {e}", dir.display())))?;
        Ok(MemCgroup { dir, v1 })
    }

    fn file(&self, v1: &str, v2: &str) -> PathBuf {
        self.dir.join(if self.v1 { v1 } else { v2 })
    }

    fn usage(&self) -> u64 {
        let path = self.file("memory.usage_in_bytes", "memory.current");
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}", path.display()))
    }

    /// Sets the limit; the kernel's (page-rounded) value.
    fn set_limit(&self, bytes: u64) -> u64 {
        let path = self.file("memory.limit_in_bytes", "memory.max");
        std::fs::write(&path, bytes.to_string()).expect("set the memory limit");
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .expect("read the limit back")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A server that accepts connections, reports each accept in order, and holds them unread
/// until told; then reads each to its end and reports what it read, in accept order.
fn holding_server(
    topo: &Topology,
) -> (
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
    mpsc::Receiver<Vec<u64>>,
) {
    let (accepted_tx, accepted) = mpsc::channel();
    let (release, release_rx) = mpsc::channel::<()>();
    let (read_tx, read) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, HOLD_PORT)).expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        let mut held = Vec::new();
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    held.push(conn);
                    let _ = accepted_tx.send(());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if release_rx.try_recv().is_ok() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
        let readers: Vec<_> = held
            .into_iter()
            .map(|mut conn| {
                std::thread::spawn(move || {
                    conn.set_nonblocking(false).expect("blocking");
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut got = 0u64;
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got += n as u64;
                    }
                    got
                })
            })
            .collect();
        let _ = read_tx.send(readers.into_iter().map(|r| r.join().unwrap_or(0)).collect());
    });
    ready_rx.recv().expect("server ready");
    (accepted, release, read)
}

/// Waits until the server accepted `conn`'s upstream (true), or the gateway reset `conn`
/// (false: refused).
fn accepted_upstream(accepted: &mpsc::Receiver<()>, conn: &mut TcpStream) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if accepted.recv_timeout(Duration::from_millis(5)).is_ok() {
            return true;
        }
        let mut byte = [0u8; 1];
        match conn.read(&mut byte) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return false,
            other => panic!("unexpected read before the upstream accepted: {other:?}"),
        }
    }
    panic!("neither accepted upstream nor refused within 10 s");
}

/// Connects from the client namespace.
fn connect(topo: &Topology, port: u16) -> std::io::Result<TcpStream> {
    let to = socket(SERVER4, port);
    Topology::run_in(&topo.client, move || TcpStream::connect(to))
}

/// Writes until the socket would block; how much was written, or None if it was reset.
fn fill(conn: &mut TcpStream) -> Option<u64> {
    conn.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![0x5au8; 64 * 1024];
    let mut written = 0;
    loop {
        match conn.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Some(written),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// Payload bytes the peer acknowledged (`tcpi_bytes_acked`, less the SYN).
fn acked(conn: &TcpStream) -> u64 {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer with its length; the kernel writes at most `len`.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    assert!(rc == 0 && len >= 128, "TCP_INFO");
    // struct tcp_info: tcpi_bytes_acked is the u64 at offset 120.
    let mut word = [0u8; 8];
    word.copy_from_slice(&info[120..128]);
    u64::from_ne_bytes(word).saturating_sub(1)
}

/// GET /10 through the gateway: the body's length, or None when the connection is refused.
fn probe(topo: &Topology) -> Option<usize> {
    let mut conn = connect(topo, 80).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    conn.write_all(PROBE).ok()?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).ok()?;
    let text = String::from_utf8_lossy(&answer);
    text.split_once("\r\n\r\n").map(|(_, body)| body.len())
}

const PROBE: &[u8] = b"GET /10 HTTP/1.1\r\nHost: probe\r\n\r\n";

fn the_daemon_sheds_the_newest_flows_and_keeps_every_total() -> Result<(), Skip> {
    let _turn = crate::common::serial();
    let cgroup = MemCgroup::new("oom")?;
    let topo = Topology::new();
    identify_server(&topo.server, socket(SERVER4, 80));
    let (accepted, release, server_read) = holding_server(&topo);
    let dir = crate::common::api::state_dir("killswitch");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        "tproxy-port: 7893\nrouting-mark: 6666\nsecret: ''\nmemory-cooldown: 8\n\
         accounting: ebpf\ntproxy-firewall:\n  interfaces: [g1]\n",
    )
    .expect("config");
    let mut daemon = Daemon::start_in_cgroup(
        &cgroup.dir.join("cgroup.procs"),
        Some(&topo.gateway.name),
        &["run", "--config", config.to_str().expect("utf-8")],
    );
    daemon.wait_for("Clash API on");
    // The limit: the switch (at 80% of it) trips after HEADROOM more bytes are charged.
    let limit = cgroup.set_limit(((cgroup.usage() + HEADROOM) as f64 / 0.8) as u64);
    let switch_at = (limit as f64 * 0.8) as u64;
    wait_for("the switch to read the new limit", 10, || {
        metric(&topo, "tpacct_memory_limit_bytes") as u64 == switch_at
    });

    let mut conns: Vec<(TcpStream, u64)> = Vec::new();
    let mut last = None;
    while metric(&topo, "tpacct_killswitch_trips_total") < 1.0 {
        assert!(
            conns.len() < MAX_CONNECTIONS,
            "no trip after {} connections: {} charged, switch at {switch_at}",
            conns.len(),
            cgroup.usage()
        );
        for _ in 0..20 {
            let mut conn = connect(&topo, HOLD_PORT).expect("connect");
            let Some(written) = fill(&mut conn) else {
                // Refused: a trip began after the last check.
                last = Some((conn, 0));
                break;
            };
            // Accepted upstream means registered: the next flow starts strictly later.
            if !accepted_upstream(&accepted, &mut conn) {
                // Reset by a trip that began after the last check: refused, or opened and
                // closed at once as the newest flow.
                last = Some((conn, written));
                break;
            }
            conns.push((conn, written));
        }
    }
    // The connection the trip reset is a flow if the gateway opened one for it.
    if let Some(last) = last
        && metric(&topo, "tpacct_flows_opened_total") as usize > conns.len()
    {
        conns.push(last);
    }
    eprintln!(
        "killswitch: tripped after {} connections ({} charged, switch at {switch_at})",
        conns.len(),
        cgroup.usage()
    );
    // Cooling down: a new flow is refused (reset) and counted.
    assert_eq!(probe(&topo), None, "a flow during the cool-down is refused");
    assert!(metric(&topo, "tpacct_killswitch_refused_flows_total") >= 1.0);
    // Recovered: new flows are accepted again.
    wait_for("the cool-down to end", 20, || {
        metric(&topo, "tpacct_killswitch_tripped") == 0.0
    });
    assert_eq!(probe(&topo), Some(10), "accepted again after the cool-down");
    assert!(daemon.running(), "the daemon survived");

    // Which flows were closed: their clients were reset.
    let killed: Vec<bool> = conns
        .iter_mut()
        .map(|(c, _)| {
            let mut byte = [0u8; 1];
            match c.read(&mut byte) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                // Reset: every stage of a flow resets its client when the flow is closed.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
                other => panic!("unexpected read on a held connection: {other:?}"),
            }
        })
        .collect();
    let first_killed = killed.iter().position(|&k| k).expect("some flows closed");
    assert!(
        killed[first_killed..].iter().all(|&k| k),
        "the newest flows are closed first: {first_killed} of {} survived, then {:?}",
        conns.len(),
        killed[first_killed..].iter().filter(|&&k| !k).count()
    );
    assert!(
        first_killed > 0,
        "not every flow was closed: {} of {} reset, the kill switch closed {}",
        killed.iter().filter(|&&k| k).count(),
        killed.len(),
        metric(&topo, "tpacct_killswitch_closed_flows_total")
    );
    let closed = metric(&topo, "tpacct_killswitch_closed_flows_total") as usize;
    assert_eq!(closed, conns.len() - first_killed);

    // Every total kept: survivors move all they wrote; the closed ones at least what their
    // clients saw acknowledged, at most what they wrote.
    let killed_low: u64 = conns[first_killed..].iter().map(|(c, _)| acked(c)).sum();
    let killed_high: u64 = conns[first_killed..].iter().map(|(_, w)| w).sum();
    for (c, _) in &conns[..first_killed] {
        c.shutdown(Shutdown::Write).expect("shutdown");
    }
    release.send(()).expect("release");
    let read = server_read
        .recv_timeout(Duration::from_secs(60))
        .expect("the server read everything");
    for (i, (_, written)) in conns[..first_killed].iter().enumerate() {
        assert_eq!(read[i], *written, "connection {i} moved all it wrote");
    }
    drop(conns);
    wait_for("every flow to close", 30, || {
        metric(&topo, "tpacct_flows_active") == 0.0
    });
    let survivors: u64 = read[..first_killed].iter().sum();
    let samples = parsed(&scrape(&topo, "http://127.0.0.1:9090/metrics"));
    let upload = sum(&samples, "tpacct_bytes_total", &[("direction", "upload")]) as u64;
    let probe_up = PROBE.len() as u64;
    assert!(
        (survivors + killed_low + probe_up..=survivors + killed_high + probe_up).contains(&upload),
        "upload {upload}: survivors {survivors}, closed flows {killed_low}..={killed_high}"
    );
    assert!(daemon.running(), "the daemon survived");
    Ok(())
}

crate::tests![root the_daemon_sheds_the_newest_flows_and_keeps_every_total];
