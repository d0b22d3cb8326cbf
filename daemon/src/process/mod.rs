//! Which local process owns a flow's client socket (`process`, `processPath`, `uid`, and the
//! PROCESS-NAME/PROCESS-PATH/UID rules): the eBPF connect-time records when the hooks are
//! attached, else netlink `sock_diag` for the socket and a cached `/proc` index for its owner.
//! Never a walk of `/proc` per flow: one walk serves every lookup waiting at that moment.

mod diag;
mod exe;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
};

use tpacct_common::{AF_INET, AF_INET6, ProcKey, ProcRecord, proto};

use crate::{accounting::ProcMaps, config::FindProcessMode, flow::Network};

/// A flow's local owner, as mihomo's metadata shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub pid: u32,
    /// The executable's file name (mihomo's `process`), or the task's `comm` when the path
    /// could not be read.
    pub name: Arc<str>,
    /// The executable's path; empty when the process exited first.
    pub path: Arc<str>,
}

/// Lookups and their outcome, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counts {
    pub kernel: AtomicU64,
    pub diag: AtomicU64,
    pub scanned: AtomicU64,
    /// A local client socket whose owner was not found (exited, or its record was evicted).
    pub missed: AtomicU64,
    /// `/proc` walks.
    pub scans: AtomicU64,
}

/// Finds owners.
#[derive(Debug)]
pub struct Finder {
    mode: AtomicU8,
    kernel: Option<Arc<ProcMaps>>,
    netns: u64,
    diag: diag::SockDiag,
    exes: exe::Exes,
    /// inode → tgid from the last walk of `/proc`.
    inodes: Mutex<Arc<HashMap<u64, u32>>>,
    walk: tokio::sync::Mutex<()>,
    pub counts: Counts,
}

fn mode_code(m: FindProcessMode) -> u8 {
    match m {
        FindProcessMode::Always => 0,
        FindProcessMode::Strict => 1,
        FindProcessMode::Off => 2,
    }
}

impl Finder {
    pub fn new(mode: FindProcessMode, kernel: Option<Arc<ProcMaps>>) -> Finder {
        if let Some(k) = &kernel {
            tracing::info!("processes: eBPF hooks on cgroup {}", k.cgroup().display());
        }
        Finder {
            mode: AtomicU8::new(mode_code(mode)),
            kernel,
            netns: own_netns_cookie(),
            diag: diag::SockDiag::default(),
            exes: exe::Exes::default(),
            inodes: Mutex::default(),
            walk: tokio::sync::Mutex::new(()),
            counts: Counts::default(),
        }
    }

    /// `find-process-mode` after a reload.
    pub fn set_mode(&self, mode: FindProcessMode) {
        self.mode.store(mode_code(mode), Ordering::Relaxed);
    }

    /// Whether a flow is looked up, given whether the rules need its process.
    pub fn wanted(&self, rules_need_it: bool) -> bool {
        match self.mode.load(Ordering::Relaxed) {
            0 => true,
            1 => rules_need_it,
            _ => false,
        }
    }

    /// Whether the eBPF hooks answer.
    pub fn in_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// The owner of the client socket `client` → `server` on this host, if it is local.
    pub async fn find(
        &self,
        network: Network,
        client: SocketAddr,
        server: SocketAddr,
    ) -> Option<Owner> {
        if let (Some(k), Network::Tcp) = (&self.kernel, network)
            && let Some(record) = k.tcp_client(&self.key(client, server))
        {
            self.counts.kernel.fetch_add(1, Ordering::Relaxed);
            return Some(self.of_record(&record));
        }
        let diag = self.diag.find(network, client, server)?;
        if let Some(record) = self.kernel.as_ref().and_then(|k| k.socket(diag.cookie)) {
            self.counts.diag.fetch_add(1, Ordering::Relaxed);
            return Some(self.of_record(&record));
        }
        let Some(tgid) = self.inode_owner(u64::from(diag.inode)).await else {
            self.counts.missed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.counts.scanned.fetch_add(1, Ordering::Relaxed);
        let seen = self.exes.seen(tgid);
        let path = seen.as_ref().and_then(|s| s.path.clone());
        let comm = seen.map(|s| s.comm).unwrap_or_default();
        Some(owner(diag.uid, tgid, path, &comm))
    }

    fn of_record(&self, r: &ProcRecord) -> Owner {
        let comm = comm(&r.comm);
        let path = self.exes.of(r.tgid, r.at_ns, &comm);
        owner(r.uid, r.tgid, path, &comm)
    }

    fn key(&self, client: SocketAddr, server: SocketAddr) -> ProcKey {
        let (local, family) = words(client.ip());
        let (remote, _) = words(server.ip());
        ProcKey {
            netns: self.netns,
            local,
            remote,
            local_port: u32::from(client.port()),
            remote_port: u32::from(server.port()),
            family,
            proto: proto::TCP,
        }
    }

    /// The process holding socket `inode`: from the last walk of `/proc`, else from a new one
    /// (shared by every lookup that waits while it runs).
    async fn inode_owner(&self, inode: u64) -> Option<u32> {
        let last = || {
            self.inodes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        };
        if let Some(&tgid) = last().get(&inode) {
            return Some(tgid);
        }
        let before = last();
        let _walking = self.walk.lock().await;
        let current = last();
        if !Arc::ptr_eq(&before, &current) {
            // A walk finished while we waited; it began after our socket existed.
            return current.get(&inode).copied();
        }
        self.counts.scans.fetch_add(1, Ordering::Relaxed);
        let walked = Arc::new(
            tokio::task::spawn_blocking(exe::socket_owners)
                .await
                .unwrap_or_default(),
        );
        *self.inodes.lock().unwrap_or_else(PoisonError::into_inner) = walked.clone();
        walked.get(&inode).copied()
    }
}

fn owner(uid: u32, pid: u32, path: Option<Arc<str>>, comm: &str) -> Owner {
    let name = path
        .as_deref()
        .and_then(|p| p.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map_or_else(|| Arc::from(comm), Arc::from);
    Owner {
        uid,
        pid,
        name,
        path: path.unwrap_or_else(|| Arc::from("")),
    }
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// An address as the kernel's `u32` words in network order, and its family (IPv4-mapped IPv6
/// is IPv4).
fn words(ip: IpAddr) -> ([u32; 4], u32) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], AF_INET6)
        }
    }
}

/// This network namespace's cookie (`SO_NETNS_COOKIE`, Linux ≥ 5.14); 0 if unknown.
fn own_netns_cookie() -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let Ok(socket) = std::net::UdpSocket::bind("127.0.0.1:0") else {
        return 0;
    };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer and length that describe `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 { cookie } else { 0 }
}
