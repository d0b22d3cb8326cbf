//! The eBPF backend: loads and attaches the kernel programs to the accounting cgroup, reads
//! live counters from the maps by cookie, and delivers final totals from the close-event ring.

use std::{
    os::fd::AsFd,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, SockOps},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tpacct_common::{CLOSE_RING, SELF_TGID, STATS_MAP, Stat, TCP_MAP, TcpSock, UDP_MAP, UdpSock};

use super::{
    Counters, Error, Observed, Proto,
    closes::{self, Slots, Wait},
    procs::ProcMaps,
};
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
    /// Final totals collected from the maps because their close event was lost.
    pub closes_recovered: u64,
}

/// How old the entry counts of the last whole-map read may be for `/metrics`.
const COUNTS_FRESH: Duration = Duration::from_secs(2);

/// The loaded, attached programs and their maps.
pub(super) struct Kernel {
    /// When each map (TCP, UDP) was last read whole, and its entries then.
    counted: std::sync::Mutex<[Option<(std::time::Instant, usize)>; 2]>,
    tcp: HashMap<MapData, u64, TcpSock>,
    udp: HashMap<MapData, u64, UdpSock>,
    stats: PerCpuArray<MapData, u64>,
    slots: Arc<Slots>,
    procs: Option<Arc<ProcMaps>>,
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

pub(super) fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(Error::Missing(name))?;
    program
        .try_into()
        .map_err(|source| Error::Program { name, source })
}

pub(super) fn map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
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
        let tgid = std::process::id();
        let mut ebpf = EbpfLoader::new()
            .override_global(SELF_TGID, &tgid, true)
            .map_max_entries(TCP_MAP, settings.max_sockets)
            .map_max_entries(UDP_MAP, settings.max_sockets)
            .map_max_entries(CLOSE_RING, settings.close_ring_bytes)
            .load(OBJECT)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_logger(logger, cancel, tracker),
            Err(e) => tracing::warn!("kernel log records unavailable: {e}"),
        }
        attach(&mut ebpf, &placement)?;
        // Without the hooks, processes are found through sock_diag and /proc instead.
        let procs = settings.processes.as_ref().and_then(|hooks| {
            ProcMaps::attach(&mut ebpf, hooks.cgroup.as_deref())
                .inspect_err(|e| tracing::warn!("process hooks unavailable: {e}"))
                .ok()
                .map(Arc::new)
        });
        let ring: RingBuf<MapData> = map(&mut ebpf, CLOSE_RING)?;
        let tcp: HashMap<MapData, u64, TcpSock> = map(&mut ebpf, TCP_MAP)?;
        let udp: HashMap<MapData, u64, UdpSock> = map(&mut ebpf, UDP_MAP)?;
        let stats: PerCpuArray<MapData, u64> = map(&mut ebpf, STATS_MAP)?;
        let slots = Arc::new(Slots::default());
        closes::spawn_reader(
            ring,
            [tcp.map(), udp.map(), stats.map()],
            slots.clone(),
            cancel,
            tracker,
        )?;
        Ok(Kernel {
            counted: std::sync::Mutex::new([None; 2]),
            tcp,
            udp,
            stats,
            slots,
            procs,
            _ebpf: ebpf,
            placement,
        })
    }

    pub(super) fn cgroup(&self) -> &Path {
        self.placement.path()
    }

    /// The process hooks' records, when they are attached.
    pub(super) fn procs(&self) -> Option<Arc<ProcMaps>> {
        self.procs.clone()
    }

    pub(super) fn watch(&self, cookie: u64) {
        self.slots.watch(cookie);
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

    /// The counters of every socket in the maps of the protocols `batch` names ([TCP, UDP]),
    /// a few system calls each; None when neither is named or the kernel refuses batch
    /// reads (each flow is then read on its own, as are those of a map not read).
    pub(super) fn observe(&self, batch: [bool; 2]) -> Option<Observed> {
        fn counters<V: aya::Pod>(
            map: &HashMap<MapData, u64, V>,
            read: bool,
            of: fn(&V) -> Counters,
        ) -> std::io::Result<Option<Vec<(u64, Counters)>>> {
            if !read {
                return Ok(None);
            }
            let all = super::batch::read_all::<u64, V>(map.map().fd().as_fd())?;
            Ok(Some(all.iter().map(|(k, v)| (*k, of(v))).collect()))
        }
        if batch == [false, false] {
            return None;
        }
        let tcp = counters(&self.tcp, batch[0], |e| Counters { rx: e.rx, tx: e.tx });
        let udp = counters(&self.udp, batch[1], |e| Counters { rx: e.rx, tx: e.tx });
        match (tcp, udp) {
            (Ok(tcp), Ok(udp)) => {
                let now = std::time::Instant::now();
                let mut counted = self.counted.lock().unwrap_or_else(|p| p.into_inner());
                for (slot, read) in counted.iter_mut().zip([&tcp, &udp]) {
                    if let Some(read) = read {
                        *slot = Some((now, read.len()));
                    }
                }
                Some(Observed(tcp.into_iter().chain(udp).flatten().collect()))
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!("accounting: batch map read: {e}");
                None
            }
        }
    }

    /// The counters of `cookie` in `seen`, else as [`Kernel::live`] reads them.
    pub(super) fn live_in(&self, seen: &Observed, cookie: u64, proto: Proto) -> Option<Counters> {
        seen.0
            .get(&cookie)
            .copied()
            .or_else(|| self.live(cookie, proto))
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
        let rx = match self.slots.wait(cookie) {
            Wait::Now(totals) => return Some(totals),
            Wait::Later(rx) => rx,
        };
        let wait = match proto {
            Proto::Tcp => grace,
            Proto::Udp => grace.min(UDP_CLOSE_WAIT),
        };
        if let Ok(Ok(totals)) = tokio::time::timeout(wait, rx).await {
            return Some(totals);
        }
        let last = self.map_counters(cookie, proto);
        self.slots.forget(cookie).or(last)
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
        // The last whole-map read's counts when it is recent (the sampler makes one every
        // second), else walk the keys (one system call per entry).
        let [tcp, udp] = *self.counted.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = |c: Option<(std::time::Instant, usize)>| {
            c.filter(|(at, _)| at.elapsed() < COUNTS_FRESH).map(|c| c.1)
        };
        let tcp_entries = fresh(tcp).unwrap_or_else(|| self.tcp.keys().count());
        let udp_entries = fresh(udp).unwrap_or_else(|| self.udp.keys().count());
        KernelStats {
            tcp_entries,
            udp_entries,
            tcp_map_full: stat(Stat::TcpMapFull),
            udp_map_full: stat(Stat::UdpMapFull),
            close_ring_full: stat(Stat::CloseRingFull),
            untracked_closes: self.slots.untracked(),
            closes_recovered: self.slots.recovered.load(Ordering::Relaxed),
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

fn spawn_logger(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    let mut logger = match closes::readable(logger) {
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
