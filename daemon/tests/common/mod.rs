//! Test harness: a fresh network namespace per test, the real accounting (eBPF programs
//! attached to a cgroup made for the test, or user space), and helpers that move real bytes.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod api;
pub mod daemon;
pub mod harness;
pub mod probe;
pub mod scratch;
pub mod topo;
pub mod upstreams;

use std::{
    future::Future,
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tpacct::{
    accounting::{Accounting, Counters, Mode, Tracked},
    cgroup,
    config::{AccountingMode, AccountingSettings},
};

/// Tests share one process, hence one cgroup membership: they take turns.
static SERIAL: Mutex<()> = Mutex::new(());

/// Takes this test's turn (tests in one binary share the process's cgroup membership).
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
static NEXT: AtomicU32 = AtomicU32::new(0);

/// What "at once" is checked against where no number is promised (a banner not held back, a
/// REJECT's reset, a refused upstream's reset): far above a scheduling hiccup on a busy
/// two-core machine, far below any timeout whose expiry would betray waiting.
pub const AT_ONCE: Duration = Duration::from_millis(250);

/// How long `finish` may wait for the kernel's close event in tests.
pub const GRACE: Duration = Duration::from_secs(5);

/// A network namespace made with `ip netns`, deleted on drop.
pub struct Netns {
    pub name: String,
}

/// Deletes test namespaces (`tpacct-<tag>-<pid>-<n>`) left by test processes that died.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for name in entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
    {
        let mut parts = name.split('-');
        let (Some("tpacct"), Some(_tag), Some(pid), Some(_n), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        static CLEANED: std::sync::Once = std::sync::Once::new();
        CLEANED.call_once(remove_stale_namespaces);
        let name = format!(
            "tpacct-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Moves the calling thread into the namespace; sockets it creates live there.
    pub fn enter(&self) {
        let file =
            std::fs::File::open(format!("/var/run/netns/{}", self.name)).expect("open netns file");
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("setns into test namespace");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn run(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(status.success(), "{args:?} failed: {status}");
}

/// Runs `body` in a fresh network namespace, on its own thread and runtime, with eBPF
/// accounting attached to a cgroup made for this test. (User-space counting is tested through
/// the real relay, where the relay's reports are what is under test.)
pub fn with_ebpf<F, Fut>(test: &str, body: F)
where
    F: FnOnce(Accounting) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    with_settings(
        test,
        AccountingSettings::with_mode(AccountingMode::Ebpf),
        body,
    );
}

/// [`with_ebpf`] with explicit settings (the cgroup is always the test's own).
pub fn with_settings<F, Fut>(test: &str, mut settings: AccountingSettings, body: F)
where
    F: FnOnce(Accounting) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let _turn = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let ns = Netns::new("t");
    settings.cgroup = Some(test_cgroup(test));
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let cancel = CancellationToken::new();
                    let tracker = TaskTracker::new();
                    let accounting =
                        Accounting::start(&settings, &cancel, &tracker).expect("start accounting");
                    let mode = match settings.mode {
                        AccountingMode::Userspace => Mode::Userspace,
                        _ => Mode::Ebpf,
                    };
                    assert_eq!(accounting.mode(), mode);
                    body(accounting).await;
                    cancel.cancel();
                    tracker.close();
                    tracker.wait().await;
                });
            })
            .join()
    });
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

pub fn test_cgroup(test: &str) -> PathBuf {
    cgroup::own()
        .expect("own cgroup")
        .join(format!("tpacct-test-{}-{test}", std::process::id()))
}

/// A connected TCP pair over `addr` ("127.0.0.1" or "::1"), both ends tracked.
pub struct Pair {
    pub client: TcpStream,
    pub server: TcpStream,
    pub client_t: Tracked,
    pub server_t: Tracked,
}

pub async fn tcp_pair(acc: &Accounting, addr: &str) -> Pair {
    let listener = TcpListener::bind((addr, 0)).await.expect("bind");
    let target = listener.local_addr().expect("local addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(target), listener.accept());
    let client = client.expect("connect");
    let (server, _) = accepted.expect("accept");
    let client_t = acc.track(&client).expect("track client");
    let server_t = acc.track(&server).expect("track server");
    Pair {
        client,
        server,
        client_t,
        server_t,
    }
}

/// Deterministic payload so receivers can check what they got.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((offset + i as u64) % 251) as u8;
    }
}

/// Writes `n` pattern bytes.
pub async fn send(stream: &mut TcpStream, n: u64) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < n {
        let len = (n - sent).min(buf.len() as u64) as usize;
        pattern(sent, &mut buf[..len]);
        stream.write_all(&buf[..len]).await.expect("write");
        sent += len as u64;
    }
}

/// Reads until EOF, checking the pattern; returns the byte count.
pub async fn recv_to_eof(stream: &mut TcpStream) -> u64 {
    recv_up_to(stream, u64::MAX).await
}

/// Reads exactly `n` bytes (or until EOF), checking the pattern.
pub async fn recv_up_to(stream: &mut TcpStream, n: u64) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut expect = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < n {
        let want = (n - got).min(buf.len() as u64) as usize;
        let len = stream.read(&mut buf[..want]).await.expect("read");
        if len == 0 {
            break;
        }
        pattern(got, &mut expect[..len]);
        assert!(buf[..len] == expect[..len], "payload corrupted at {got}");
        got += len as u64;
    }
    got
}

fn set_option<T>(stream: &TcpStream, level: libc::c_int, name: libc::c_int, value: &T) {
    // SAFETY: valid fd; `value` is the option's C type and outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt({level}, {name})");
}

/// Turns on TCP_QUICKACK so the next segments are acknowledged at once.
pub fn quickack(stream: &TcpStream) {
    set_option(
        stream,
        libc::IPPROTO_TCP,
        libc::TCP_QUICKACK,
        &1 as &libc::c_int,
    );
}

/// Closes `stream` with a reset (SO_LINGER 0).
pub fn abort(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(&stream, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
    drop(stream);
}

/// Moves `n` bytes one way over `pair` (client to server when `upload`), closes in order from
/// both ends, and checks both ends' final totals. Returns the two cookies.
pub async fn one_way(acc: &Accounting, pair: Pair, n: u64, upload: bool) -> [u64; 2] {
    let Pair {
        client,
        server,
        client_t,
        server_t,
    } = pair;
    let (mut tx_s, tx_t, mut rx_s, rx_t) = if upload {
        (client, client_t, server, server_t)
    } else {
        (server, server_t, client, client_t)
    };
    tokio::join!(
        async move {
            send(&mut tx_s, n).await;
            tx_s.shutdown().await.expect("shutdown");
            assert_eq!(recv_to_eof(&mut tx_s).await, 0);
        },
        async move {
            assert_eq!(recv_to_eof(&mut rx_s).await, n);
        }
    );
    let cookies = [tx_t.cookie(), rx_t.cookie()];
    let (tx_final, rx_final) = tokio::join!(acc.finish(&tx_t, GRACE), acc.finish(&rx_t, GRACE));
    let dir = if upload { "upload" } else { "download" };
    assert_eq!(tx_final, counters(0, n), "sender of {n} B {dir}");
    assert_eq!(rx_final, counters(n, 0), "receiver of {n} B {dir}");
    cookies
}

/// Descriptors this test process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

pub fn counters(rx: u64, tx: u64) -> Counters {
    Counters { rx, tx }
}
