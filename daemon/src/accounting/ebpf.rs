//! The eBPF backend: loads and attaches the kernel programs to the accounting cgroup, reads
//! live counters from the maps by cookie, and delivers final totals from the close-event ring.

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, SockOps},
};
use dashmap::{DashMap, mapref::entry::Entry};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::oneshot,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tpacct_common::{CLOSE_RING, CloseEvent, STATS_MAP, Stat, TCP_MAP, TcpSock, UDP_MAP, UdpSock};

use super::{Counters, Error, Proto};
use crate::{cgroup::Placement, config::AccountingSettings};

/// The object built from `ebpf/` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tpacct"));

/// How long a closed UDP socket's release event may take to reach us.
const UDP_CLOSE_WAIT: Duration = Duration::from_millis(500);

/// Kernel-side occupancy and losses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Live TCP entries in the kernel map.
    pub tcp_entries: usize,
    /// Live UDP entries in the kernel map.
    pub udp_entries: usize,
    /// TCP sockets not accounted because the map was full.
    pub tcp_map_full: u64,
    /// UDP sockets not accounted because the map was full.
    pub udp_map_full: u64,
    /// Close events lost because the ring was full.
    pub close_ring_full: u64,
    /// Close events of sockets nobody tracked (other sockets in the cgroup).
    pub untracked_closes: u64,
}

/// What is known of a tracked socket's end.
#[derive(Debug)]
enum Slot {
    Open,
    Closed(Counters),
    Waiting(oneshot::Sender<Counters>),
}

#[derive(Debug, Default)]
struct Slots {
    map: DashMap<u64, Slot>,
    untracked: AtomicU64,
}

impl Slots {
    fn deliver(&self, cookie: u64, totals: Counters) {
        match self.map.entry(cookie) {
            Entry::Occupied(mut slot) => {
                if matches!(slot.get(), Slot::Waiting(_)) {
                    if let Slot::Waiting(tx) = slot.remove() {
                        let _ = tx.send(totals);
                    }
                } else {
                    slot.insert(Slot::Closed(totals));
                }
            }
            Entry::Vacant(_) => {
                self.untracked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn closed(&self, cookie: u64) -> Option<Counters> {
        match self.map.get(&cookie).as_deref() {
            Some(Slot::Closed(c)) => Some(*c),
            _ => None,
        }
    }
}

/// The loaded, attached programs and their maps.
pub(super) struct Kernel {
    tcp: HashMap<MapData, u64, TcpSock>,
    udp: HashMap<MapData, u64, UdpSock>,
    stats: PerCpuArray<MapData, u64>,
    slots: Arc<Slots>,
    // Field order is drop order: detach the programs, then leave and remove the cgroup.
    _ebpf: Ebpf,
    placement: Placement,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("cgroup", &self.placement.path())
            .finish_non_exhaustive()
    }
}

fn privileged() -> bool {
    // CAP_NET_ADMIN is bit 12, CAP_BPF bit 39 of the effective set.
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let needed = (1u64 << 12) | (1u64 << 39);
    caps & needed == needed
}

fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct. Kernels ≥ 5.11 charge BPF memory to the
    // cgroup instead, where this is a harmless no-op.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "raising RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(Error::Missing(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

fn map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Missing(name))?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

impl Kernel {
    pub(super) fn start(
        settings: &AccountingSettings,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Kernel, Error> {
        if !privileged() {
            return Err(Error::NotPrivileged);
        }
        // Move in before anything opens a socket: a socket belongs to the cgroup it was
        // created in.
        let placement = Placement::establish(settings.cgroup.as_deref())?;
        raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(TCP_MAP, settings.max_sockets)
            .map_max_entries(UDP_MAP, settings.max_sockets)
            .load(OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger, cancel, tracker),
            Err(e) => tracing::warn!("kernel log records unavailable: {e}"),
        }
        attach(&mut ebpf, &placement)?;
        let ring: RingBuf<MapData> = map(&mut ebpf, CLOSE_RING)?;
        let slots = Arc::new(Slots::default());
        spawn_ring_reader(ring, slots.clone(), cancel, tracker)?;
        Ok(Kernel {
            tcp: map(&mut ebpf, TCP_MAP)?,
            udp: map(&mut ebpf, UDP_MAP)?,
            stats: map(&mut ebpf, STATS_MAP)?,
            slots,
            _ebpf: ebpf,
            placement,
        })
    }

    pub(super) fn cgroup(&self) -> &Path {
        self.placement.path()
    }

    pub(super) fn watch(&self, cookie: u64) {
        self.slots.map.insert(cookie, Slot::Open);
    }

    fn map_counters(&self, cookie: u64, proto: Proto) -> Option<Counters> {
        match proto {
            Proto::Tcp => self
                .tcp
                .get(&cookie, 0)
                .ok()
                .map(|e| Counters { rx: e.rx, tx: e.tx }),
            Proto::Udp => self
                .udp
                .get(&cookie, 0)
                .ok()
                .map(|e| Counters { rx: e.rx, tx: e.tx }),
        }
    }

    /// Counters from the map, or the final totals if the socket has closed; None if the
    /// kernel has nothing for it (a UDP socket before its first datagram, or a full map).
    pub(super) fn live(&self, cookie: u64, proto: Proto) -> Option<Counters> {
        self.map_counters(cookie, proto)
            .or_else(|| self.slots.closed(cookie))
    }

    /// Waits for the close event. A UDP socket's comes from its release, inside `close()`
    /// itself, so it only waits for this task to be scheduled; a TCP socket's comes when the
    /// connection ends, which may take up to `grace`. Past that, the map's last values.
    pub(super) async fn finish(
        &self,
        cookie: u64,
        proto: Proto,
        grace: Duration,
    ) -> Option<Counters> {
        let (tx, rx) = oneshot::channel();
        match self.slots.map.entry(cookie) {
            Entry::Occupied(slot) if matches!(slot.get(), Slot::Closed(_)) => {
                if let Slot::Closed(totals) = slot.remove() {
                    return Some(totals);
                }
            }
            Entry::Occupied(mut slot) => {
                slot.insert(Slot::Waiting(tx));
            }
            Entry::Vacant(slot) => {
                slot.insert(Slot::Waiting(tx));
            }
        }
        let wait = match proto {
            Proto::Tcp => grace,
            Proto::Udp => grace.min(UDP_CLOSE_WAIT),
        };
        if let Ok(Ok(totals)) = tokio::time::timeout(wait, rx).await {
            return Some(totals);
        }
        let last = self.map_counters(cookie, proto);
        match self.slots.map.remove(&cookie) {
            Some((_, Slot::Closed(totals))) => Some(totals),
            _ => last,
        }
    }

    pub(super) fn holds(&self, cookie: u64) -> bool {
        self.tcp.get(&cookie, 0).is_ok() || self.udp.get(&cookie, 0).is_ok()
    }

    pub(super) fn stats(&self) -> KernelStats {
        let stat = |s: Stat| {
            self.stats
                .get(&(s as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .unwrap_or(0)
        };
        KernelStats {
            tcp_entries: self.tcp.keys().count(),
            udp_entries: self.udp.keys().count(),
            tcp_map_full: stat(Stat::TcpMapFull),
            udp_map_full: stat(Stat::UdpMapFull),
            close_ring_full: stat(Stat::CloseRingFull),
            untracked_closes: self.slots.untracked.load(Ordering::Relaxed),
        }
    }
}

fn attach(ebpf: &mut Ebpf, placement: &Placement) -> Result<(), Error> {
    let cgroup = placement.file().as_fd();
    // With bpf_link (kernel ≥ 5.7) links always coexist; the ALLOW_MULTI flag is rejected there.
    let mode = CgroupAttachMode::Single;

    let name = "tpacct_sock_ops";
    let sock_ops: &mut SockOps = program(ebpf, name)?;
    sock_ops
        .load()
        .and_then(|()| sock_ops.attach(cgroup, mode).map(drop))
        .map_err(|source| Error::Program { name, source })?;

    for (name, direction) in [
        ("tpacct_skb_ingress", CgroupSkbAttachType::Ingress),
        ("tpacct_skb_egress", CgroupSkbAttachType::Egress),
    ] {
        let skb: &mut CgroupSkb = program(ebpf, name)?;
        skb.load()
            .and_then(|()| skb.attach(cgroup, direction, mode).map(drop))
            .map_err(|source| Error::Program { name, source })?;
    }

    let name = "tpacct_sock_release";
    let release: &mut CgroupSock = program(ebpf, name)?;
    release
        .load()
        .and_then(|()| release.attach(cgroup, mode).map(drop))
        .map_err(|source| Error::Program { name, source })
}

fn spawn_ring_reader(
    ring: RingBuf<MapData>,
    slots: Arc<Slots>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<(), Error> {
    let mut ring = readable(ring).map_err(Error::Ring)?;
    let cancel = cancel.clone();
    tracker.spawn(async move {
        loop {
            let mut guard = tokio::select! {
                () = cancel.cancelled() => return,
                guard = ring.readable_mut() => match guard {
                    Ok(guard) => guard,
                    Err(e) => {
                        tracing::error!("close-event ring: {e}");
                        return;
                    }
                },
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(event) = parse_close_event(&item) {
                    slots.deliver(
                        event.cookie,
                        Counters {
                            rx: event.rx,
                            tx: event.tx,
                        },
                    );
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Registers a map-backed reader with the reactor for readability.
fn readable<T: AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: ring buffers own their map fd and return that same fd until dropped, which is
    // when the AsyncFd drops.
    Ok(unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }?)
}

fn parse_close_event(bytes: &[u8]) -> Option<CloseEvent> {
    if bytes.len() < size_of::<CloseEvent>() {
        return None;
    }
    // SAFETY: length checked; CloseEvent is plain integers, valid for any bit pattern.
    Some(unsafe { bytes.as_ptr().cast::<CloseEvent>().read_unaligned() })
}

fn spawn_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    let mut logger = match readable(logger) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("kernel log records unavailable: {e}");
            return;
        }
    };
    let cancel = cancel.clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                guard = logger.readable_mut() => match guard {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(e) => {
                        tracing::warn!("kernel log records: {e}");
                        return;
                    }
                },
            }
        }
    });
}
