//! Byte accounting per socket: one front ([`Accounting`]) over two backends, the eBPF programs
//! (counters in kernel maps by socket cookie, final totals at close) and user space (the relay
//! reports what it moved through a [`Meter`]). The backend is picked at start and reported.

mod batch;
pub(crate) use batch::read_all as read_map_batched;
mod closes;
pub(crate) use closes::{readable, record};
mod ebpf;
mod procs;
mod sys;

use std::{
    os::fd::AsFd,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    cgroup,
    config::{AccountingMode, AccountingSettings},
};

pub use ebpf::KernelStats;
pub use procs::ProcMaps;

/// Errors starting or using accounting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("eBPF accounting needs root (or CAP_BPF and CAP_NET_ADMIN)")]
    NotPrivileged,
    #[error(transparent)]
    Cgroup(#[from] cgroup::Error),
    #[error("loading the eBPF object: {}", chain(.0))]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {}", chain(.source))]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {}", chain(.source))]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("reading socket {what}: {source}")]
    Socket {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("watching the close-event ring: {0}")]
    Ring(std::io::Error),
}

/// `err: cause: cause` — aya's errors keep the OS error in their source.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

/// Which backend counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ebpf,
    Userspace,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Ebpf => "ebpf",
            Mode::Userspace => "userspace",
        })
    }
}

/// Payload bytes of one socket, from the socket's point of view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Received.
    pub rx: u64,
    /// Sent (for TCP under eBPF: sent and acknowledged by the peer).
    pub tx: u64,
}

/// From how many flows a reader takes the kernel's counters in one batch read rather than one
/// lookup per socket (about 2 µs each).
pub const BATCH_FROM: usize = 1024;

/// Every kernel-counted socket's counters, read at one moment in a few system calls.
#[derive(Debug, Default)]
pub struct Observed(std::collections::HashMap<u64, Counters, foldhash::fast::RandomState>);

/// Transport of a tracked socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Where the relay reports bytes it moved. Under eBPF it holds nothing and costs a branch.
#[derive(Debug, Clone, Default)]
pub struct Meter(Option<Arc<Cells>>);

#[derive(Debug, Default)]
struct Cells {
    rx: AtomicU64,
    tx: AtomicU64,
}

impl Meter {
    /// `n` payload bytes were received on the socket.
    #[inline]
    pub fn add_rx(&self, n: u64) {
        if let Some(c) = &self.0 {
            c.rx.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// `n` payload bytes were sent on the socket.
    #[inline]
    pub fn add_tx(&self, n: u64) {
        if let Some(c) = &self.0 {
            c.tx.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// `n` bytes reported by `add_tx` were not sent after all.
    #[inline]
    pub fn take_back_tx(&self, n: u64) {
        if let Some(c) = &self.0 {
            c.tx.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// Whether reports are counted (user-space accounting).
    pub fn is_counting(&self) -> bool {
        self.0.is_some()
    }

    fn read(&self) -> Counters {
        self.0
            .as_ref()
            .map_or_else(Counters::default, |c| Counters {
                rx: c.rx.load(Ordering::Relaxed),
                tx: c.tx.load(Ordering::Relaxed),
            })
    }
}

/// A socket under accounting.
#[derive(Debug)]
pub struct Tracked {
    cookie: u64,
    proto: Proto,
    /// Counts what the relay reports: always under user-space accounting; under eBPF for UDP
    /// (a fallback should the kernel map be full) and for a TCP socket the kernel map had no
    /// room for.
    meter: Meter,
    /// Whether the kernel counts this socket.
    in_kernel: bool,
    /// The highest counters read so far: between the kernel dropping a closed socket's entry
    /// and its close event arriving, a reading falls back to them rather than to zero.
    seen: Cells,
}

impl Tracked {
    /// The socket's cookie (`SO_COOKIE`): its key in the kernel maps.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The transport.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// Where to report moved bytes (a no-op when the kernel counts a TCP socket).
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Whether the kernel programs count this socket.
    pub fn in_kernel(&self) -> bool {
        self.in_kernel
    }
}

/// The accounting front: tracks sockets, reads live counters, hands out final totals.
#[derive(Debug, Clone)]
pub struct Accounting {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Ebpf(Arc<ebpf::Kernel>),
    Userspace,
}

impl Accounting {
    /// Starts accounting as `settings.mode` asks. `auto` falls back to user space with one log
    /// line saying why; `ebpf` returns the error instead. Background tasks (close events,
    /// kernel log records) run on `tracker` until `cancel`.
    pub fn start(
        settings: &AccountingSettings,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Accounting, Error> {
        let userspace = Accounting {
            backend: Backend::Userspace,
        };
        if settings.mode == AccountingMode::Userspace {
            tracing::info!("accounting: userspace (configured)");
            return Ok(userspace);
        }
        match ebpf::Kernel::start(settings, cancel, tracker) {
            Ok(kernel) => {
                tracing::info!("accounting: ebpf (cgroup {})", kernel.cgroup().display());
                Ok(Accounting {
                    backend: Backend::Ebpf(Arc::new(kernel)),
                })
            }
            Err(e) if settings.mode == AccountingMode::Auto => {
                tracing::warn!("accounting: userspace (eBPF unavailable: {e})");
                Ok(userspace)
            }
            Err(e) => Err(e),
        }
    }

    /// The backend in use.
    pub fn mode(&self) -> Mode {
        match self.backend {
            Backend::Ebpf(_) => Mode::Ebpf,
            Backend::Userspace => Mode::Userspace,
        }
    }

    /// The process hooks' records (eBPF with process finding on).
    pub fn procs(&self) -> Option<Arc<ProcMaps>> {
        match &self.backend {
            Backend::Ebpf(k) => k.procs(),
            Backend::Userspace => None,
        }
    }

    /// The cgroup whose sockets the kernel programs count (eBPF only).
    pub fn cgroup(&self) -> Option<PathBuf> {
        match &self.backend {
            Backend::Ebpf(k) => Some(k.cgroup().to_owned()),
            Backend::Userspace => None,
        }
    }

    /// Starts tracking a connected TCP or UDP socket. Call it before the socket can close.
    pub fn track(&self, socket: impl AsFd) -> Result<Tracked, Error> {
        let proto = sys::proto(socket.as_fd())?;
        self.track_as(socket, proto)
    }

    /// [`Accounting::track`] for a socket whose transport the caller knows (one system call
    /// fewer per flow).
    pub fn track_as(&self, socket: impl AsFd, proto: Proto) -> Result<Tracked, Error> {
        let cookie = sys::cookie(socket.as_fd())?;
        let counting = || Meter(Some(Arc::default()));
        let (meter, in_kernel) = match &self.backend {
            // A connected TCP socket has its kernel entry from the moment it was established;
            // without one (the map was full) it is counted here instead.
            Backend::Ebpf(k) if proto == Proto::Tcp && !k.holds(cookie) => (counting(), false),
            Backend::Ebpf(k) => {
                k.watch(cookie);
                let meter = match proto {
                    Proto::Tcp => Meter(None),
                    Proto::Udp => counting(),
                };
                (meter, true)
            }
            Backend::Userspace => (counting(), false),
        };
        Ok(Tracked {
            cookie,
            proto,
            meter,
            in_kernel,
            seen: Cells::default(),
        })
    }

    /// A flow that shares its socket with others (the requests of one keep-alive HTTP proxy
    /// connection, the destinations of one SOCKS5 UDP association): counted in user space by
    /// what the relay moves for it.
    pub fn untracked(&self, proto: Proto) -> Tracked {
        Tracked {
            cookie: 0,
            proto,
            meter: Meter(Some(Arc::default())),
            in_kernel: false,
            seen: Cells::default(),
        }
    }

    /// Every kernel-counted socket's counters now, for reading `tcp` TCP and `udp` UDP
    /// flows at once. A protocol's map is read whole from [`BATCH_FROM`] of its flows (a
    /// batch read walks every bucket of the map, a few milliseconds whatever it holds); the
    /// other's flows are then read one by one. eBPF only; None also when no map is worth a
    /// batch or the kernel cannot read its maps in batches.
    pub fn observe(&self, tcp: usize, udp: usize) -> Option<Observed> {
        match &self.backend {
            Backend::Ebpf(k) => k.observe([tcp >= BATCH_FROM, udp >= BATCH_FROM]),
            Backend::Userspace => None,
        }
    }

    /// The socket's counters now.
    pub fn live(&self, t: &Tracked) -> Counters {
        self.live_in(None, t)
    }

    /// The socket's counters as `seen` has them (read at once for many flows), else now.
    pub fn live_in(&self, seen: Option<&Observed>, t: &Tracked) -> Counters {
        let now = match (&self.backend, seen) {
            (Backend::Ebpf(k), Some(seen)) if t.in_kernel => k
                .live_in(seen, t.cookie, t.proto)
                .unwrap_or_else(|| t.meter.read()),
            (Backend::Ebpf(k), None) if t.in_kernel => {
                k.live(t.cookie, t.proto).unwrap_or_else(|| t.meter.read())
            }
            _ => t.meter.read(),
        };
        // Counters only grow: never report less than was reported before.
        Counters {
            rx: t.seen.rx.fetch_max(now.rx, Ordering::Relaxed).max(now.rx),
            tx: t.seen.tx.fetch_max(now.tx, Ordering::Relaxed).max(now.tx),
        }
    }

    /// The socket's final totals; call it once the socket is closed. Under eBPF they arrive
    /// when the kernel finishes the socket (after `close()` it still delivers what was
    /// buffered); past `grace` the last values counted are returned instead.
    pub async fn finish(&self, t: &Tracked, grace: Duration) -> Counters {
        match &self.backend {
            Backend::Ebpf(k) if t.in_kernel => k
                .finish(t.cookie, t.proto, grace)
                .await
                .unwrap_or_else(|| t.meter.read()),
            _ => t.meter.read(),
        }
    }

    /// Kernel map occupancy and loss counters (eBPF only).
    pub fn kernel_stats(&self) -> Option<KernelStats> {
        match &self.backend {
            Backend::Ebpf(k) => Some(k.stats()),
            Backend::Userspace => None,
        }
    }

    /// Whether the kernel still holds an entry for `cookie` (eBPF only; false otherwise).
    pub fn kernel_holds(&self, cookie: u64) -> bool {
        match &self.backend {
            Backend::Ebpf(k) => k.holds(cookie),
            Backend::Userspace => false,
        }
    }
}
