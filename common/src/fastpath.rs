//! The fast path's shared records: forwarded flows the tc programs count from TCP sequence
//! numbers (or UDP payload), the compiled first-packet rules, and the events they send.

/// Hash map of forwarded flows: [`FlowKey`] → [`FastFlow`].
pub const FAST_FLOWS: &str = "TPACCT_FAST_FLOWS";
/// Array of [`FastRule`]s: two tables of [`MAX_FAST_RULES`], the active one named by
/// [`FAST_CTRL`] (user space fills the other, then flips).
pub const FAST_RULES: &str = "TPACCT_FAST_RULES";
/// Array of one [`FastCtrl`].
pub const FAST_CTRL: &str = "TPACCT_FAST_CTRL";
/// Ring buffer of [`FastEvent`]s.
pub const FAST_EVENTS: &str = "TPACCT_FAST_EVENTS";
/// Per-CPU array of `u64` counters indexed by [`FastStat`].
pub const FAST_STATS: &str = "TPACCT_FAST_STATS";
/// Global: the skb mark bit the ingress program sets on a flow it forwards (user space turns it
/// into a sticky conntrack mark so nftables skips TPROXY for the whole connection).
pub const FAST_MARK: &str = "TPACCT_FAST_MARK";
/// Global: the skb mark bit set on every upload packet the ingress program counted; nftables
/// drops a fast flow's packet without it (never forwarded uncounted).
pub const COUNTED_MARK: &str = "TPACCT_COUNTED_MARK";

/// Capacity of the flow map unless configured.
pub const MAX_FAST_FLOWS: u32 = 65_536;
/// Rules per table; a longer rule list ends the table (flows it did not decide are proxied).
pub const MAX_FAST_RULES: u32 = 64;
/// Size in bytes of the event ring.
pub const FAST_RING_BYTES: u32 = 1 << 20;

/// A flow as its client opened it. Addresses in network byte order (IPv4 in word 0, the other
/// words zero); ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: [u32; 4],
    pub server: [u32; 4],
    pub client_port: u16,
    pub server_port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// Flags of a [`FastFlow`], set with atomic OR.
pub mod fast_flags {
    /// The client's FIN was seen (`up_fin` holds its sequence number, extended).
    pub const FIN_UP: u64 = 1 << 0;
    /// The server's FIN was seen.
    pub const FIN_DOWN: u64 = 1 << 1;
    /// A RST was seen either way.
    pub const RST: u64 = 1 << 2;
    /// The server's SYN-ACK was seen: `down_start` is set.
    pub const SYN_ACK: u64 = 1 << 3;
    /// The close event was sent (or, when the ring was full, is owed: user space collects it).
    pub const CLOSED: u64 = 1 << 4;
    /// The close event could not be sent.
    pub const EVENT_LOST: u64 = 1 << 5;
}

/// One forwarded flow. For TCP each direction keeps sequence numbers extended to 64 bits
/// (`start` = ISN + 1, `end` = the highest `seq + len` of a payload-carrying segment, `fin` =
/// the FIN's sequence number): payload = `end - start`, or `fin - start` once the FIN is seen.
/// For UDP `start` is 0 and `end` counts payload bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastFlow {
    pub up_start: u64,
    pub up_end: u64,
    pub up_fin: u64,
    pub down_start: u64,
    pub down_end: u64,
    pub down_fin: u64,
    /// `bpf_ktime_get_ns()` of the first packet.
    pub first_ns: u64,
    /// `bpf_ktime_get_ns()` of the latest packet either way.
    pub last_ns: u64,
    /// [`fast_flags`].
    pub flags: u64,
    /// The rule that sent the flow DIRECT: its index in the configuration's rule list.
    pub rule: u32,
    /// The rule table's generation when the flow was decided.
    pub generation: u32,
}

impl FastFlow {
    /// Payload bytes client → server and server → client so far (final once closed).
    pub fn traffic(&self) -> (u64, u64) {
        fn one(start: u64, end: u64, fin: u64, fin_seen: bool) -> u64 {
            let end = if fin_seen { fin.max(end) } else { end };
            end.saturating_sub(start)
        }
        let up = one(
            self.up_start,
            self.up_end,
            self.up_fin,
            self.flags & fast_flags::FIN_UP != 0,
        );
        let down = if self.down_start == 0 && self.up_start != 0 {
            0
        } else {
            one(
                self.down_start,
                self.down_end,
                self.down_fin,
                self.flags & fast_flags::FIN_DOWN != 0,
            )
        };
        (up, down)
    }
}

/// Why a [`FastEvent`] was sent.
pub mod fast_reason {
    /// FIN both ways.
    pub const FIN: u32 = 1;
    /// RST.
    pub const RST: u32 = 2;
    /// A new SYN with another ISN reused the 5-tuple.
    pub const NEW_SYN: u32 = 3;
}

/// A flow's final totals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastEvent {
    pub key: FlowKey,
    pub flow: FastFlow,
    /// [`fast_reason`].
    pub reason: u32,
    pub _pad: u32,
}

/// What a [`FastRule`] tests.
pub mod rule_kind {
    /// End of the table: what no rule above decided is proxied.
    pub const END: u32 = 0;
    pub const MATCH: u32 = 1;
    pub const DST_CIDR: u32 = 2;
    pub const SRC_CIDR: u32 = 3;
    pub const DST_PORT: u32 = 4;
    pub const SRC_PORT: u32 = 5;
    /// `port_lo[0]` holds the protocol number.
    pub const NETWORK: u32 = 6;
}

/// Ranges a port rule holds at most; a rule with more ends the table.
pub const RULE_PORT_RANGES: usize = 4;

/// One rule decidable from a flow's first packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastRule {
    /// [`rule_kind`].
    pub kind: u32,
    /// 1: forward in the kernel (the rule's target is DIRECT); 0: proxy.
    pub fast: u32,
    /// The rule's index in the configuration.
    pub index: u32,
    /// CIDR rules: `AF_INET` or `AF_INET6`, and the prefix length.
    pub family: u32,
    pub prefix: u32,
    /// CIDR rules: the network, as 32-bit words in host byte order (IPv4 in word 0).
    pub addr: [u32; 4],
    /// Port rules: inclusive ranges, `nranges` of them.
    pub port_lo: [u32; RULE_PORT_RANGES],
    pub port_hi: [u32; RULE_PORT_RANGES],
    pub nranges: u32,
}

/// Which rule table is active.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastCtrl {
    /// 0 or 1.
    pub table: u32,
    pub generation: u32,
}

/// Indexes into [`FAST_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastStat {
    /// A flow the rules sent DIRECT was proxied because the flow map was full.
    MapFull = 0,
    /// A close event was lost because the ring was full.
    RingFull = 1,
    /// A fast flow's download packet was dropped because its entry was gone.
    Dropped = 2,
    /// Flows decided for the fast path.
    Decided = 3,
}

impl FastStat {
    pub const COUNT: u32 = 4;
    pub const ALL: [FastStat; 4] = [
        FastStat::MapFull,
        FastStat::RingFull,
        FastStat::Dropped,
        FastStat::Decided,
    ];
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each is `#[repr(C)]`, made only of integers and integer arrays, without padding
    // (size assertions below), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FastFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FastEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FastRule {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FastCtrl {}
}

const _: () = {
    assert!(core::mem::size_of::<FlowKey>() == 40);
    assert!(core::mem::size_of::<FastFlow>() == 80);
    assert!(core::mem::size_of::<FastEvent>() == 128);
    assert!(core::mem::size_of::<FastRule>() == 72);
    assert!(core::mem::size_of::<FastCtrl>() == 8);
};
