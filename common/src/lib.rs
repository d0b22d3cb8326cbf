//! Types shared by the eBPF programs and the daemon: map names, map records and close events.
//!
//! Every record is `#[repr(C)]`, made only of `u64`/`u32` fields laid out without implicit
//! padding, so both sides agree on the bytes. `aya::Pod` is implemented behind feature `user`.
#![no_std]

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

#[cfg(feature = "user")]
mod user {
    // SAFETY: all three are `#[repr(C)]`, contain only integers, and have no padding (checked
    // by the size assertions below), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::TcpSock {}
    unsafe impl aya::Pod for super::UdpSock {}
    unsafe impl aya::Pod for super::CloseEvent {}
}

const _: () = {
    assert!(core::mem::size_of::<TcpSock>() == 40);
    assert!(core::mem::size_of::<UdpSock>() == 32);
    assert!(core::mem::size_of::<CloseEvent>() == 32);
};
