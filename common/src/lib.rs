//! Types shared by the eBPF programs and the daemon: map names, map records and close events.
//!
//! Every record is `#[repr(C)]`, made only of `u64`/`u32` fields laid out without implicit
//! padding, so both sides agree on the bytes. `aya::Pod` is implemented behind feature `user`.
#![cfg_attr(not(test), no_std)]

pub mod fastpath;

/// Map of live TCP sockets: socket cookie → [`TcpSock`].
pub const TCP_MAP: &str = "TPACCT_TCP";
/// Map of live UDP sockets: socket cookie → [`UdpSock`].
pub const UDP_MAP: &str = "TPACCT_UDP";
/// Ring buffer of [`CloseEvent`]s: final totals of sockets that ended.
pub const CLOSE_RING: &str = "TPACCT_CLOSED";
/// Per-CPU array of `u64` counters indexed by [`Stat`].
pub const STATS_MAP: &str = "TPACCT_STATS";

/// Capacity of each socket map. Entries are removed when their socket ends, so this bounds the
/// number of *concurrent* accounted sockets, not their total.
pub const MAX_SOCKETS: u32 = 262_144;
/// Size in bytes of the close-event ring buffer (a power of two, multiple of the page size).
pub const CLOSE_RING_BYTES: u32 = 1 << 20;

/// Indexes into [`STATS_MAP`]. Each counts events the kernel side could not record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A TCP socket could not be inserted because the map was full.
    TcpMapFull = 0,
    /// A UDP datagram's socket could not be inserted because the map was full (counted per
    /// datagram: such a socket tries again with each one).
    UdpMapFull = 1,
    /// A close event was lost because the ring buffer was full.
    CloseRingFull = 2,
}

impl Stat {
    /// Number of counters in [`STATS_MAP`].
    pub const COUNT: u32 = 3;
    /// Every counter, in index order.
    pub const ALL: [Stat; 3] = [Stat::TcpMapFull, Stat::UdpMapFull, Stat::CloseRingFull];
}

/// Flags kept in [`TcpSock::flags`].
pub mod tcp_flags {
    /// The peer's FIN was received in order (it consumed one sequence number of `bytes_received`).
    pub const FIN_RECEIVED: u32 = 1 << 0;
    /// The last segment parsed before the state change carried FIN.
    pub const LAST_SEGMENT_FIN: u32 = 1 << 1;
    /// The socket reached TCP_CLOSE and `rx`/`tx` are final. The entry stays in the map only
    /// when its close event could not be sent (ring full): user space reads and deletes it.
    pub const CLOSED: u32 = 1 << 2;
}

/// Flags kept in [`UdpSock::flags`].
pub mod udp_flags {
    /// The socket was released and `rx`/`tx` are final; kept only when the close event could
    /// not be sent (ring full), for user space to read and delete.
    pub const CLOSED: u32 = 1 << 0;
}

/// A live TCP socket as the sock_ops program keeps it.
///
/// `rx`/`tx` are payload bytes (SYN and FIN excluded): received in order, and sent and
/// acknowledged by the peer. They are refreshed on every segment the socket receives (data or
/// ACK), so they lag the truth by at most one segment while anything moves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSock {
    /// Payload bytes received.
    pub rx: u64,
    /// Payload bytes sent and acknowledged.
    pub tx: u64,
    /// `bytes_received` when the connection was established.
    pub rx_base: u64,
    /// `bytes_acked` when the connection was established (1 for an active opener: its SYN).
    pub tx_base: u64,
    /// [`tcp_flags`].
    pub flags: u32,
    /// Reserved; keeps the record free of implicit padding.
    pub _pad: u32,
}

/// A live UDP socket as the cgroup_skb programs keep it. Payload bytes only (IP and UDP headers
/// excluded), counted per datagram as it leaves or enters the socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpSock {
    /// Payload bytes received.
    pub rx: u64,
    /// Payload bytes sent.
    pub tx: u64,
    /// Datagrams received.
    pub rx_packets: u64,
    /// Datagrams sent.
    pub tx_packets: u64,
    /// [`udp_flags`].
    pub flags: u32,
    /// Reserved; keeps the record free of implicit padding.
    pub _pad: u32,
}

/// Transport protocol of a [`CloseEvent`].
pub mod proto {
    /// TCP.
    pub const TCP: u32 = 6;
    /// UDP.
    pub const UDP: u32 = 17;
}

/// Final totals of a socket, sent through [`CLOSE_RING`] as its map entry is removed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseEvent {
    /// The socket's cookie (`SO_COOKIE`).
    pub cookie: u64,
    /// Payload bytes received.
    pub rx: u64,
    /// Payload bytes sent (acknowledged, for TCP).
    pub tx: u64,
    /// [`proto`].
    pub proto: u32,
    /// For TCP, the state the socket left for TCP_CLOSE; 0 for UDP.
    pub old_state: u32,
}

/// Who opened a socket, recorded by the cgroup connect/sendmsg hooks in the process's own
/// context. Keyed by socket cookie in [`PROC_SOCK_MAP`] and, for TCP once the source port is
/// bound, by [`ProcKey`] in [`PROC_TUPLE_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcRecord {
    /// `bpf_ktime_get_boot_ns()` when recorded: a process that started later is not the one
    /// that connected (its pid was reused).
    pub at_ns: u64,
    /// Process id (the thread group).
    pub tgid: u32,
    /// Thread id.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The task's `comm`, NUL-padded.
    pub comm: [u8; 16],
}

/// A TCP connection as its client sees it, in one network namespace. Addresses are in network
/// byte order as the kernel keeps them; IPv4 (and IPv4-mapped IPv6) in `local[0]`/`remote[0]`
/// with `family` [`AF_INET`] and the other words zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcKey {
    /// The network namespace's cookie (`SO_NETNS_COOKIE`).
    pub netns: u64,
    pub local: [u32; 4],
    pub remote: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    /// Host byte order.
    pub remote_port: u32,
    pub family: u32,
    /// [`proto`].
    pub proto: u32,
}

/// `AF_INET`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;

/// LRU map: socket cookie → [`ProcRecord`].
pub const PROC_SOCK_MAP: &str = "TPACCT_PROC_SOCK";
/// LRU map: [`ProcKey`] → [`ProcRecord`] (TCP clients).
pub const PROC_TUPLE_MAP: &str = "TPACCT_PROC_TUPLE";
/// Capacity of each process map; the least recently used record goes first.
pub const MAX_PROC_RECORDS: u32 = 65_536;
/// Global in the eBPF object: the daemon's own tgid, whose sockets are not recorded.
pub const SELF_TGID: &str = "TPACCT_SELF_TGID";

#[cfg(feature = "user")]
mod user {
    // SAFETY: as below; `ProcRecord` and `ProcKey` are integers and integer arrays without
    // padding (size assertions below).
    unsafe impl aya::Pod for super::ProcRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcKey {}
    // SAFETY: all three are `#[repr(C)]`, contain only integers, and have no padding (checked
    // by the size assertions below), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::TcpSock {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UdpSock {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CloseEvent {}
}

const _: () = {
    assert!(core::mem::size_of::<TcpSock>() == 40);
    assert!(core::mem::size_of::<UdpSock>() == 40);
    assert!(core::mem::size_of::<CloseEvent>() == 32);
    assert!(core::mem::size_of::<ProcRecord>() == 40);
    assert!(core::mem::size_of::<ProcKey>() == 56);
};

/// TCP states (include/net/tcp_states.h) the accounting cares about.
pub mod tcp_state {
    pub const ESTABLISHED: u32 = 1;
    pub const FIN_WAIT1: u32 = 4;
    pub const FIN_WAIT2: u32 = 5;
    pub const CLOSE: u32 = 7;
    pub const CLOSE_WAIT: u32 = 8;
    pub const LAST_ACK: u32 = 9;
    pub const CLOSING: u32 = 11;
}

/// The kernel's counters of a TCP socket at one instant (from sock_ops or `bpf_tcp_sock`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpNow {
    /// `bytes_received`: in-order bytes received, the peer's FIN included once it arrived.
    pub bytes_received: u64,
    /// `bytes_acked`: bytes the peer acknowledged, our SYN (when we opened) and FIN included.
    pub bytes_acked: u64,
    pub snd_una: u32,
    pub snd_nxt: u32,
}

/// Whether our FIN has been acknowledged, judged in TCP state `state`: in FIN_WAIT2 it has; in
/// FIN_WAIT1, CLOSING and LAST_ACK once nothing is outstanding; in other states we sent none.
pub fn fin_acked(now: &TcpNow, state: u32) -> bool {
    match state {
        tcp_state::FIN_WAIT2 => true,
        tcp_state::FIN_WAIT1 | tcp_state::CLOSING | tcp_state::LAST_ACK => {
            now.snd_una == now.snd_nxt
        }
        _ => false,
    }
}

/// Whether the state change `old` → `new` means the peer's FIN was received in order (it
/// consumed a sequence number of `bytes_received`). The peer's FIN moves us to CLOSE_WAIT or
/// CLOSING; from FIN_WAIT2 it ends the socket directly (TIME_WAIT is kept by a separate mini
/// socket) while the segment being handled is the FIN itself; a reset or a timeout from
/// FIN_WAIT2 comes without one.
pub fn fin_received(old: u32, new: u32, flags: u32) -> bool {
    new == tcp_state::CLOSE_WAIT
        || new == tcp_state::CLOSING
        || (old == tcp_state::FIN_WAIT2
            && new == tcp_state::CLOSE
            && flags & tcp_flags::LAST_SEGMENT_FIN != 0)
}

/// Payload totals `(rx, tx)` of `entry` given the kernel's counters `now` in state `state`: the
/// baselines taken at establishment (the opener's SYN) and the FINs taken out.
pub fn tcp_payload(entry: &TcpSock, now: &TcpNow, state: u32) -> (u64, u64) {
    let fin_in = u64::from(entry.flags & tcp_flags::FIN_RECEIVED != 0);
    let rx = now
        .bytes_received
        .saturating_sub(entry.rx_base)
        .saturating_sub(fin_in);
    let tx = now
        .bytes_acked
        .saturating_sub(entry.tx_base)
        .saturating_sub(u64::from(fin_acked(now, state)));
    (rx, tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now(received: u64, acked: u64, una: u32, nxt: u32) -> TcpNow {
        TcpNow {
            bytes_received: received,
            bytes_acked: acked,
            snd_una: una,
            snd_nxt: nxt,
        }
    }

    /// An active opener: its SYN is in `bytes_acked` from the start (baseline 1).
    fn opener() -> TcpSock {
        TcpSock {
            tx_base: 1,
            ..TcpSock::default()
        }
    }

    #[test]
    fn established_counts_payload_only() {
        let e = opener();
        assert_eq!(
            tcp_payload(&e, &now(500, 1001, 9, 9), tcp_state::ESTABLISHED),
            (500, 1000)
        );
    }

    #[test]
    fn our_fin_comes_out_once_acknowledged() {
        let e = opener();
        // FIN sent, not yet acknowledged: bytes_acked has not moved past the data.
        assert_eq!(
            tcp_payload(&e, &now(0, 1001, 10, 11), tcp_state::FIN_WAIT1),
            (0, 1000)
        );
        // FIN acknowledged: bytes_acked grew by one, which is not payload.
        assert_eq!(
            tcp_payload(&e, &now(0, 1002, 11, 11), tcp_state::FIN_WAIT1),
            (0, 1000)
        );
        assert_eq!(
            tcp_payload(&e, &now(0, 1002, 11, 11), tcp_state::FIN_WAIT2),
            (0, 1000)
        );
        assert_eq!(
            tcp_payload(&e, &now(0, 1002, 11, 11), tcp_state::LAST_ACK),
            (0, 1000)
        );
    }

    #[test]
    fn the_peers_fin_comes_out_once_received() {
        let mut e = opener();
        assert!(fin_received(
            tcp_state::ESTABLISHED,
            tcp_state::CLOSE_WAIT,
            0
        ));
        e.flags |= tcp_flags::FIN_RECEIVED;
        assert_eq!(
            tcp_payload(&e, &now(701, 1, 0, 0), tcp_state::CLOSE_WAIT),
            (700, 0)
        );
    }

    #[test]
    fn fin_wait2_to_close_needs_the_fin_segment() {
        let (old, new) = (tcp_state::FIN_WAIT2, tcp_state::CLOSE);
        assert!(fin_received(old, new, tcp_flags::LAST_SEGMENT_FIN));
        assert!(
            !fin_received(old, new, 0),
            "a reset or timeout carries no FIN"
        );
        assert!(!fin_received(tcp_state::ESTABLISHED, tcp_state::CLOSE, 0));
    }

    #[test]
    fn a_passive_opener_has_its_own_baseline() {
        // Passive side: the peer's SYN is in bytes_received at establishment.
        let e = TcpSock {
            rx_base: 1,
            ..TcpSock::default()
        };
        assert_eq!(
            tcp_payload(&e, &now(1, 0, 5, 5), tcp_state::ESTABLISHED),
            (0, 0)
        );
        assert_eq!(
            tcp_payload(&e, &now(65, 40, 5, 5), tcp_state::ESTABLISHED),
            (64, 40)
        );
    }

    #[test]
    fn counters_never_go_below_zero() {
        let e = TcpSock {
            rx_base: 100,
            tx_base: 100,
            flags: tcp_flags::FIN_RECEIVED,
            ..TcpSock::default()
        };
        assert_eq!(
            tcp_payload(&e, &now(50, 50, 1, 1), tcp_state::LAST_ACK),
            (0, 0)
        );
    }
}
