//! The programs and maps themselves (BPF target only).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock,
        bpf_sock_ops,
    },
    btf_maps::{HashMap, PerCpuArray, RingBuf},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_fullsock, bpf_tcp_sock},
    macros::{btf_map, cgroup_skb, cgroup_sock, sock_ops},
    programs::{SkBuffContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use tpacct_common::{
    CLOSE_RING_BYTES, CloseEvent, MAX_SOCKETS, Stat, TcpNow, TcpSock, UdpSock, fin_received, proto,
    tcp_flags, tcp_payload, tcp_state, udp_flags,
};

#[btf_map]
static TPACCT_TCP: HashMap<u64, TcpSock, { MAX_SOCKETS as usize }> = HashMap::new();

#[btf_map]
static TPACCT_UDP: HashMap<u64, UdpSock, { MAX_SOCKETS as usize }> = HashMap::new();

#[btf_map]
static TPACCT_CLOSED: RingBuf<CloseEvent, { CLOSE_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
static TPACCT_STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

const TCPHDR_FIN: u32 = 0x01;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const UDP_HEADER: u32 = 8;

/// Per-CPU time of the last log record of each kind, so a flood of failures logs once a second
/// per CPU and kind.
#[btf_map]
static TPACCT_LAST_LOG: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

const LOG_INTERVAL_NS: u64 = 1_000_000_000;

fn log_allowed(kind: Stat) -> bool {
    let Some(last) = TPACCT_LAST_LOG.get_ptr_mut(kind as u32) else {
        return false;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the pointer came from a successful lookup of a per-CPU slot, which stays valid
    // while the program runs and has no other writer on this CPU.
    let last = unsafe { &mut *last };
    if *last != 0 && now.wrapping_sub(*last) < LOG_INTERVAL_NS {
        return false;
    }
    *last = now;
    true
}

fn bump(stat: Stat) {
    if let Some(slot) = TPACCT_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a valid per-CPU slot from a successful lookup; no other writer on this CPU
        // while we run.
        unsafe { *slot += 1 };
    }
}

/// `*p += v` as one BPF atomic instruction (two CPUs may count the same UDP socket at once).
#[inline(always)]
fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: callers pass a pointer to a u64 field of a live map value; the instruction is a
    // single atomic add to it.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {v}",
            p = in(reg) p,
            v = in(reg) v,
        );
    }
}

/// Sends final totals to user space; false (and counted) when the ring is full, in which case
/// the caller keeps the map entry, marked closed, for user space to collect.
fn close_event(event: CloseEvent) -> bool {
    if TPACCT_CLOSED.output(event, 0).is_err() {
        bump(Stat::CloseRingFull);
        return false;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// TCP: sock_ops
// ---------------------------------------------------------------------------------------------

#[sock_ops]
pub fn tpacct_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            tcp_established(&ctx)
        }
        BPF_SOCK_OPS_RTT_CB => tcp_refresh(&ctx, false),
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => tcp_refresh(&ctx, true),
        BPF_SOCK_OPS_STATE_CB => tcp_state(&ctx),
        _ => {}
    }
    1
}

fn ops(ctx: &SockOpsContext) -> &bpf_sock_ops {
    // SAFETY: the kernel passes a valid bpf_sock_ops for the program's whole run.
    unsafe { &*ctx.ops }
}

fn cookie_of<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the context pointer is the program's own context, of a type the helper accepts
    // (sock_ops, skb, sock).
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Whether `sk` (a non-null full socket) carries an `SO_MARK`. The daemon marks its own upstream
/// dials (`routing-mark`) and reports each flow from its client-facing socket, so marked
/// sockets are left out: no map entry, no per-packet work, no close event to wake it for.
fn marked(sk: *mut bpf_sock) -> bool {
    // SAFETY: callers pass a non-null full socket (bpf_sk_fullsock's, or sock_ops' own).
    unsafe { (*sk).mark != 0 }
}

/// The full socket behind `sk`, when there is one.
fn full(sk: *mut bpf_sock) -> Option<*mut bpf_sock> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: `sk` is a non-null socket pointer from the context, as the helper expects.
    let full = unsafe { bpf_sk_fullsock(sk) };
    (!full.is_null()).then_some(full)
}

fn tcp_established(ctx: &SockOpsContext) {
    let o = ops(ctx);
    // SAFETY: reading the context's socket pointer (the verifier checks the access); in
    // sock_ops it is already a full socket.
    let sk = unsafe { o.__bindgen_anon_2.sk };
    if !sk.is_null() && marked(sk) {
        return;
    }
    let cookie = cookie_of(ctx);
    let entry = TcpSock {
        rx_base: o.bytes_received,
        tx_base: o.bytes_acked,
        ..TcpSock::default()
    };
    if TPACCT_TCP
        .insert(cookie, entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        bump(Stat::TcpMapFull);
        if log_allowed(Stat::TcpMapFull) {
            warn!(ctx, "tcp socket map full: socket counted in user space");
        }
        return;
    }
    let flags = BPF_SOCK_OPS_STATE_CB_FLAG
        | BPF_SOCK_OPS_RTT_CB_FLAG
        | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

fn now_from_ops(o: &bpf_sock_ops) -> TcpNow {
    TcpNow {
        bytes_received: o.bytes_received,
        bytes_acked: o.bytes_acked,
        snd_una: o.snd_una,
        snd_nxt: o.snd_nxt,
    }
}

/// Stores the payload totals (SYN and FIN taken out) in `e` and returns them.
fn refresh(e: &mut TcpSock, now: &TcpNow, state: u32) -> (u64, u64) {
    let (rx, tx) = tcp_payload(e, now, state);
    e.rx = rx;
    e.tx = tx;
    (rx, tx)
}

fn tcp_refresh(ctx: &SockOpsContext, parsed_segment: bool) {
    let o = ops(ctx);
    let Some(e) = TPACCT_TCP.get_ptr_mut(cookie_of(ctx)) else {
        return;
    };
    // SAFETY: a live map value from a successful lookup; sock_ops callbacks run under the
    // socket lock, so no other sock_ops run writes it concurrently.
    let e = unsafe { &mut *e };
    if e.flags & tcp_flags::CLOSED != 0 {
        return;
    }
    refresh(e, &now_from_ops(o), o.state);
    if parsed_segment {
        // Only slow-path segments are parsed; FIN always takes the slow path.
        if o.skb_tcp_flags & TCPHDR_FIN != 0 {
            e.flags |= tcp_flags::LAST_SEGMENT_FIN;
        } else {
            e.flags &= !tcp_flags::LAST_SEGMENT_FIN;
        }
    }
}

fn tcp_state(ctx: &SockOpsContext) {
    let o = ops(ctx);
    let (old, new) = (ctx.arg(0), ctx.arg(1));
    let cookie = cookie_of(ctx);
    let Some(e) = TPACCT_TCP.get_ptr_mut(cookie) else {
        return;
    };
    // SAFETY: a live map value from a successful lookup, written under the socket lock.
    let e = unsafe { &mut *e };
    if e.flags & tcp_flags::CLOSED != 0 {
        return;
    }
    if fin_received(old, new, e.flags) {
        e.flags |= tcp_flags::FIN_RECEIVED;
    }
    let (rx, tx) = refresh(e, &now_from_ops(o), old);
    if new != tcp_state::CLOSE {
        return;
    }
    // Final from here on: if the event cannot be sent, the entry stays for user space.
    e.flags |= tcp_flags::CLOSED;
    let sent = close_event(CloseEvent {
        cookie,
        rx,
        tx,
        proto: proto::TCP,
        old_state: old,
    });
    if sent {
        let _ = TPACCT_TCP.remove(cookie);
    }
}

// ---------------------------------------------------------------------------------------------
// UDP: cgroup_skb + sock_release
// ---------------------------------------------------------------------------------------------

#[cgroup_skb(ingress)]
pub fn tpacct_skb_ingress(ctx: SkBuffContext) -> i32 {
    skb_seen(&ctx, true);
    1
}

#[cgroup_skb(egress)]
pub fn tpacct_skb_egress(ctx: SkBuffContext) -> i32 {
    skb_seen(&ctx, false);
    1
}

/// IP header length and transport protocol of the packet (cgroup_skb data starts at the IP
/// header).
fn ip_header(ctx: &SkBuffContext) -> Option<(u32, u8)> {
    let first: u8 = ctx.load(0).ok()?;
    match first >> 4 {
        4 => Some((u32::from(first & 0x0f) * 4, ctx.load::<u8>(9).ok()?)),
        6 => Some((40, ctx.load::<u8>(6).ok()?)),
        _ => None,
    }
}

fn skb_seen(ctx: &SkBuffContext, ingress: bool) {
    match ip_header(ctx) {
        Some((header, IPPROTO_UDP)) => udp_count(ctx, header, ingress),
        Some((_, IPPROTO_TCP)) => tcp_refresh_skb(ctx),
        _ => {}
    }
}

/// Keeps live TCP counters fresh from the packet path. sock_ops gets no callback for segments
/// on the receive fast path, so a receive-only socket would otherwise stay at its last slow-path
/// value: ingress packets refresh it (counters as of the previous segment) and so do the ACKs
/// it sends (counters including the data they acknowledge). Final totals still come only from
/// sock_ops at TCP_CLOSE.
fn tcp_refresh_skb(ctx: &SkBuffContext) {
    // SAFETY: the kernel passes a valid __sk_buff; reading its socket pointer field is allowed
    // for cgroup_skb programs (the verifier checks the access).
    let Some(sk) = full(unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }) else {
        return;
    };
    if marked(sk) {
        return;
    }
    // SAFETY: `sk` is a non-null full socket returned by bpf_sk_fullsock.
    let tp = unsafe { bpf_tcp_sock(sk) };
    if tp.is_null() {
        return;
    }
    let Some(e) = TPACCT_TCP.get_ptr_mut(cookie_of(ctx)) else {
        return;
    };
    // SAFETY: both pointers were checked non-null and come from the helpers above, valid for
    // the program's run.
    let (tp, state) = unsafe { (&*tp, (*sk).state) };
    let now = TcpNow {
        bytes_received: tp.bytes_received,
        bytes_acked: tp.bytes_acked,
        snd_una: tp.snd_una,
        snd_nxt: tp.snd_nxt,
    };
    // SAFETY: a live map value from a successful lookup. Ingress runs without the socket
    // lock: a racing update may briefly store values one segment old; the next one corrects
    // them, and the close event is computed afresh.
    let e = unsafe { &mut *e };
    if e.flags & tcp_flags::CLOSED == 0 {
        refresh(e, &now, state);
    }
}

fn udp_count(ctx: &SkBuffContext, header: u32, ingress: bool) {
    let Some(payload) = ctx.len().checked_sub(header + UDP_HEADER) else {
        return;
    };
    let payload = u64::from(payload);
    // SAFETY: reading this skb's socket pointer is allowed for cgroup_skb programs.
    if full(unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }).is_some_and(marked) {
        return;
    }
    let cookie = cookie_of(ctx);
    let entry = match TPACCT_UDP.get_ptr_mut(cookie) {
        Some(e) => e,
        None => {
            // Losing the race to another CPU's insert is fine: NOEXIST keeps its entry.
            if TPACCT_UDP
                .insert(cookie, UdpSock::default(), u64::from(BPF_NOEXIST))
                .is_err()
                && TPACCT_UDP.get_ptr(cookie).is_none()
            {
                bump(Stat::UdpMapFull);
                if log_allowed(Stat::UdpMapFull) {
                    warn!(ctx, "udp socket map full: socket counted in user space");
                }
                return;
            }
            match TPACCT_UDP.get_ptr_mut(cookie) {
                Some(e) => e,
                None => return,
            }
        }
    };
    // SAFETY: a live map value from a successful lookup; concurrent writers on other CPUs
    // only use atomic adds on it.
    let e = unsafe { &mut *entry };
    if ingress {
        atomic_add(&mut e.rx, payload);
        atomic_add(&mut e.rx_packets, 1);
    } else {
        atomic_add(&mut e.tx, payload);
        atomic_add(&mut e.tx_packets, 1);
    }
}

#[cgroup_sock(sock_release)]
pub fn tpacct_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock for the program's run.
    let (protocol, mark) = unsafe { ((*ctx.sock).protocol, (*ctx.sock).mark) };
    if protocol != u32::from(IPPROTO_UDP) || mark != 0 {
        return 1;
    }
    let cookie = cookie_of(&ctx);
    let Some(e) = TPACCT_UDP.get_ptr_mut(cookie) else {
        return 1;
    };
    // SAFETY: a live map value from a successful lookup; the socket is being released, so no
    // datagram counts for it any more.
    let e = unsafe { &mut *e };
    // Final from here on: if the event cannot be sent, the entry stays for user space.
    e.flags |= udp_flags::CLOSED;
    let sent = close_event(CloseEvent {
        cookie,
        rx: e.rx,
        tx: e.tx,
        proto: proto::UDP,
        old_state: 0,
    });
    if sent {
        let _ = TPACCT_UDP.remove(cookie);
    }
    1
}
