//! The programs and maps themselves (BPF target only).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG,
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock_ops,
    },
    btf_maps::{HashMap, PerCpuArray, RingBuf},
    helpers::bpf_get_socket_cookie,
    macros::{btf_map, cgroup_skb, cgroup_sock, sock_ops},
    programs::{SkBuffContext, SockContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use tpacct_common::{
    CLOSE_RING_BYTES, CloseEvent, MAX_SOCKETS, Stat, TcpSock, UdpSock, proto, tcp_flags,
};

#[btf_map]
static TPACCT_TCP: HashMap<u64, TcpSock, { MAX_SOCKETS as usize }> = HashMap::new();

#[btf_map]
static TPACCT_UDP: HashMap<u64, UdpSock, { MAX_SOCKETS as usize }> = HashMap::new();

#[btf_map]
static TPACCT_CLOSED: RingBuf<CloseEvent, { CLOSE_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
static TPACCT_STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

// TCP states (include/net/tcp_states.h).
const TCP_FIN_WAIT1: u32 = 4;
const TCP_FIN_WAIT2: u32 = 5;
const TCP_CLOSE: u32 = 7;
const TCP_CLOSE_WAIT: u32 = 8;
const TCP_LAST_ACK: u32 = 9;
const TCP_CLOSING: u32 = 11;

const TCPHDR_FIN: u32 = 0x01;
const IPPROTO_UDP: u8 = 17;
const UDP_HEADER: u32 = 8;

fn bump(stat: Stat) {
    if let Some(slot) = TPACCT_STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

/// `*p += v` as one BPF atomic instruction (two CPUs may count the same UDP socket at once).
#[inline(always)]
fn atomic_add(p: *mut u64, v: u64) {
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {v}",
            p = in(reg) p,
            v = in(reg) v,
        );
    }
}

fn close_event(event: CloseEvent) {
    if TPACCT_CLOSED.output(event, 0).is_err() {
        bump(Stat::CloseRingFull);
    }
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
    unsafe { &*ctx.ops }
}

fn tcp_established(ctx: &SockOpsContext) {
    let o = ops(ctx);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let entry = TcpSock {
        rx_base: u64::from(o.bytes_received),
        tx_base: o.bytes_acked,
        ..TcpSock::default()
    };
    if TPACCT_TCP
        .insert(cookie, entry, u64::from(BPF_NOEXIST))
        .is_err()
    {
        bump(Stat::TcpMapFull);
        warn!(
            ctx,
            "tcp socket map full ({} entries): socket not accounted", MAX_SOCKETS
        );
        return;
    }
    let flags = BPF_SOCK_OPS_STATE_CB_FLAG
        | BPF_SOCK_OPS_RTT_CB_FLAG
        | BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
}

/// Whether our FIN has been acknowledged, judged in TCP state `state`.
fn fin_acked(o: &bpf_sock_ops, state: u32) -> bool {
    match state {
        TCP_FIN_WAIT2 => true,
        TCP_FIN_WAIT1 | TCP_CLOSING | TCP_LAST_ACK => o.snd_una == o.snd_nxt,
        _ => false,
    }
}

/// Payload totals from the kernel's counters, SYN and FIN taken out.
fn totals(o: &bpf_sock_ops, e: &TcpSock, state: u32, fin_received: bool) -> (u64, u64) {
    let rx = u64::from(o.bytes_received)
        .saturating_sub(e.rx_base)
        .saturating_sub(u64::from(fin_received));
    let tx = o
        .bytes_acked
        .saturating_sub(e.tx_base)
        .saturating_sub(u64::from(fin_acked(o, state)));
    (rx, tx)
}

fn tcp_refresh(ctx: &SockOpsContext, parsed_segment: bool) {
    let o = ops(ctx);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(e) = TPACCT_TCP.get_ptr_mut(cookie) else {
        return;
    };
    // sock_ops callbacks run under the socket lock: one writer per entry.
    let e = unsafe { &mut *e };
    let (rx, tx) = totals(o, e, o.state, e.flags & tcp_flags::FIN_RECEIVED != 0);
    e.rx = rx;
    e.tx = tx;
    if parsed_segment {
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
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(e) = TPACCT_TCP.get_ptr_mut(cookie) else {
        return;
    };
    let e = unsafe { &mut *e };
    // The peer's FIN moves us to CLOSE_WAIT or CLOSING. From FIN_WAIT2 it ends the socket
    // directly (TIME_WAIT is kept by a separate mini socket), while the segment being handled
    // is the FIN itself; a reset or a timeout from FIN_WAIT2 comes without one.
    if new == TCP_CLOSE_WAIT
        || new == TCP_CLOSING
        || (old == TCP_FIN_WAIT2 && new == TCP_CLOSE && e.flags & tcp_flags::LAST_SEGMENT_FIN != 0)
    {
        e.flags |= tcp_flags::FIN_RECEIVED;
    }
    let (rx, tx) = totals(o, e, old, e.flags & tcp_flags::FIN_RECEIVED != 0);
    e.rx = rx;
    e.tx = tx;
    if new != TCP_CLOSE {
        return;
    }
    close_event(CloseEvent {
        cookie,
        rx,
        tx,
        proto: proto::TCP,
        old_state: old,
    });
    let _ = TPACCT_TCP.remove(cookie);
}

// ---------------------------------------------------------------------------------------------
// UDP: cgroup_skb + sock_release
// ---------------------------------------------------------------------------------------------

#[cgroup_skb(ingress)]
pub fn tpacct_skb_ingress(ctx: SkBuffContext) -> i32 {
    udp_count(&ctx, true);
    1
}

#[cgroup_skb(egress)]
pub fn tpacct_skb_egress(ctx: SkBuffContext) -> i32 {
    udp_count(&ctx, false);
    1
}

/// UDP payload length of the IP packet in `ctx` (cgroup_skb data starts at the IP header).
fn udp_payload(ctx: &SkBuffContext) -> Option<u64> {
    let first: u8 = ctx.load(0).ok()?;
    let (header, protocol) = match first >> 4 {
        4 => (u32::from(first & 0x0f) * 4, ctx.load::<u8>(9).ok()?),
        6 => (40, ctx.load::<u8>(6).ok()?),
        _ => return None,
    };
    if protocol != IPPROTO_UDP {
        return None;
    }
    Some(u64::from(ctx.len().checked_sub(header + UDP_HEADER)?))
}

fn udp_count(ctx: &SkBuffContext, ingress: bool) {
    let Some(payload) = udp_payload(ctx) else {
        return;
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
                warn!(
                    ctx,
                    "udp socket map full ({} entries): socket not accounted", MAX_SOCKETS
                );
                return;
            }
            match TPACCT_UDP.get_ptr_mut(cookie) {
                Some(e) => e,
                None => return,
            }
        }
    };
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
    let protocol = unsafe { (*ctx.sock).protocol };
    if protocol != u32::from(IPPROTO_UDP) {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(e) = TPACCT_UDP.get_ptr(cookie) {
        let e = unsafe { *e };
        close_event(CloseEvent {
            cookie,
            rx: e.rx,
            tx: e.tx,
            proto: proto::UDP,
            old_state: 0,
        });
        let _ = TPACCT_UDP.remove(cookie);
    }
    1
}
