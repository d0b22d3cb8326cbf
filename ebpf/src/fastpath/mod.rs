//! The fast path (tc on LAN interfaces): decides at a flow's first packet whether the rules send
//! it DIRECT, marks it so nftables lets the kernel forward it, and counts its payload exactly —
//! from sequence numbers for TCP, per datagram for UDP.

// Keys and values go to the map helpers by reference: by value they would be copied onto the
// 512-byte BPF stack the verifier counts across calls.
#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference keeps 40-byte keys off the BPF stack"
)]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, classifier},
    programs::TcContext,
};
mod packet;
mod seq;

use packet::{IPPROTO_TCP, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, parse};
use seq::{advance, atomic_add, extend, fetch_or};
use tpacct_common::fastpath::{
    FAST_RING_BYTES, FastCtrl, FastEvent, FastFlow, FastRule, FastStat, FlowKey, MAX_FAST_FLOWS,
    MAX_FAST_RULES, RULE_PORT_RANGES, fast_flags, fast_reason, rule_kind,
};

#[btf_map]
static TPACCT_FAST_FLOWS: HashMap<FlowKey, FastFlow, { MAX_FAST_FLOWS as usize }> = HashMap::new();

#[btf_map]
static TPACCT_FAST_RULES: Array<FastRule, { 2 * MAX_FAST_RULES as usize }> = Array::new();

#[btf_map]
static TPACCT_FAST_CTRL: Array<FastCtrl, 1> = Array::new();

#[btf_map]
static TPACCT_FAST_EVENTS: RingBuf<FastEvent, { FAST_RING_BYTES as usize }> = RingBuf::new();

#[btf_map]
static TPACCT_FAST_STATS: PerCpuArray<u64, { FastStat::COUNT as usize }> = PerCpuArray::new();

/// Set by the loader (see `tpacct_common::fastpath::FAST_MARK`).
#[unsafe(no_mangle)]
static TPACCT_FAST_MARK: u32 = 0;
/// Set by the loader (see `tpacct_common::fastpath::COUNTED_MARK`).
#[unsafe(no_mangle)]
static TPACCT_COUNTED_MARK: u32 = 0;

fn global(v: &'static u32) -> u32 {
    // SAFETY: a read of a global the loader set before the program was loaded; volatile so the
    // compiler does not fold the initial 0.
    unsafe { core::ptr::read_volatile(v) }
}

fn bump(stat: FastStat) {
    if let Some(slot) = TPACCT_FAST_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a valid per-CPU slot; no other writer on this CPU while we run.
        unsafe { *slot += 1 };
    }
}

fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

fn prefix_matches(rule: &FastRule, family: u8, addr: &[u32; 4]) -> bool {
    if rule.family != u32::from(family) {
        return false;
    }
    let mut i = 0;
    while i < 4 {
        let bits = rule.prefix.saturating_sub(32 * i as u32).min(32);
        if bits > 0 {
            let mask = u32::MAX << (32 - bits);
            if u32::from_be(addr[i]) & mask != rule.addr[i] & mask {
                return false;
            }
        }
        i += 1;
    }
    true
}

fn port_matches(rule: &FastRule, port: u16) -> bool {
    let port = u32::from(port);
    let mut i = 0;
    while i < RULE_PORT_RANGES {
        if (i as u32) < rule.nranges && rule.port_lo[i] <= port && port <= rule.port_hi[i] {
            return true;
        }
        i += 1;
    }
    false
}

/// The first rule matching the flow, if it sends it DIRECT: (rule index, generation).
fn decide(key: &FlowKey) -> Option<(u32, u32)> {
    let ctrl = TPACCT_FAST_CTRL.get(0)?;
    let base = (ctrl.table & 1) * MAX_FAST_RULES;
    for i in 0..MAX_FAST_RULES {
        let rule = TPACCT_FAST_RULES.get(base + i)?;
        let hit = match rule.kind {
            rule_kind::MATCH => true,
            rule_kind::DST_CIDR => prefix_matches(rule, key.family, &key.server),
            rule_kind::SRC_CIDR => prefix_matches(rule, key.family, &key.client),
            rule_kind::DST_PORT => port_matches(rule, key.server_port),
            rule_kind::SRC_PORT => port_matches(rule, key.client_port),
            rule_kind::NETWORK => rule.port_lo[0] == u32::from(key.proto),
            _ => return None,
        };
        if hit {
            return (rule.fast == 1).then_some((rule.index, ctrl.generation));
        }
    }
    None
}

/// Sends a flow's final totals once: when the flag the caller just set (its flags were
/// `before`) made it closing.
fn close_if_done(key: &FlowKey, value: *mut FastFlow, before: u64) {
    let closing = |f: u64| {
        f & fast_flags::RST != 0
            || f & (fast_flags::FIN_UP | fast_flags::FIN_DOWN)
                == (fast_flags::FIN_UP | fast_flags::FIN_DOWN)
    };
    // SAFETY: `value` points at a live map value.
    let flags = unsafe { core::ptr::addr_of_mut!((*value).flags) };
    // SAFETY: as above.
    let after = unsafe { core::ptr::read_volatile(flags) };
    if closing(before) || !closing(after) {
        return;
    }
    let reason = if after & fast_flags::RST != 0 {
        fast_reason::RST
    } else {
        fast_reason::FIN
    };
    emit(key, value, reason);
}

fn emit(key: &FlowKey, value: *mut FastFlow, reason: u32) {
    // SAFETY: `value` points at a live map value; the copy may race with other CPUs' updates,
    // which for a closed flow no longer change its totals.
    let flow = unsafe { core::ptr::read_volatile(value) };
    let event = FastEvent {
        key: *key,
        flow,
        reason,
        _pad: 0,
    };
    // SAFETY: as above.
    let flags = unsafe { core::ptr::addr_of_mut!((*value).flags) };
    if TPACCT_FAST_EVENTS.output(event, 0).is_err() {
        bump(FastStat::RingFull);
        fetch_or(flags, fast_flags::CLOSED | fast_flags::EVENT_LOST);
    } else {
        fetch_or(flags, fast_flags::CLOSED);
    }
}

/// Counts one TCP segment of a known flow.
fn count_tcp(p: &Packet, value: *mut FastFlow, upload: bool) {
    // SAFETY: `value` points at a live map value for the whole program run; the fields are
    // only touched through atomics or single aligned stores.
    let (start, end, fin, fin_bit) = unsafe {
        if upload {
            (
                core::ptr::addr_of_mut!((*value).up_start),
                core::ptr::addr_of_mut!((*value).up_end),
                core::ptr::addr_of_mut!((*value).up_fin),
                fast_flags::FIN_UP,
            )
        } else {
            (
                core::ptr::addr_of_mut!((*value).down_start),
                core::ptr::addr_of_mut!((*value).down_end),
                core::ptr::addr_of_mut!((*value).down_fin),
                fast_flags::FIN_DOWN,
            )
        }
    };
    // SAFETY: as above.
    let flags = unsafe { core::ptr::addr_of_mut!((*value).flags) };
    let syn = p.flags & TCP_SYN != 0;
    if !upload && syn {
        // The server's SYN-ACK: its ISN starts the download count (once).
        if fetch_or(flags, fast_flags::SYN_ACK) & fast_flags::SYN_ACK == 0 {
            let isn1 = u64::from(p.seq) + 1;
            // SAFETY: as above; written before any data segment can be counted against it.
            unsafe {
                core::ptr::write_volatile(start, isn1);
                core::ptr::write_volatile(end, isn1);
            }
        }
    }
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(start) } == 0 {
        return;
    }
    // Data on a SYN (TCP Fast Open) starts after the SYN's own sequence number.
    let data_end = p.seq.wrapping_add(u32::from(syn)).wrapping_add(p.payload);
    if p.payload > 0 {
        advance(end, data_end);
    }
    if p.flags & TCP_FIN != 0 {
        // SAFETY: as above.
        let near = unsafe { core::ptr::read_volatile(end) };
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(fin, extend(near, data_end)) };
        let before = fetch_or(flags, fin_bit);
        close_if_done(&p.key, value, before);
    }
    if p.flags & TCP_RST != 0 {
        let before = fetch_or(flags, fast_flags::RST);
        close_if_done(&p.key, value, before);
    }
}

fn touch(value: *mut FastFlow) {
    // SAFETY: `value` points at a live map value; a plain aligned store (the latest wins).
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*value).last_ns), now()) };
}

fn count(p: &Packet, value: *mut FastFlow, upload: bool) {
    touch(value);
    if p.key.proto == IPPROTO_TCP {
        count_tcp(p, value, upload);
    } else {
        // SAFETY: `value` points at a live map value.
        let end = unsafe {
            if upload {
                core::ptr::addr_of_mut!((*value).up_end)
            } else {
                core::ptr::addr_of_mut!((*value).down_end)
            }
        };
        atomic_add(end, u64::from(p.payload));
    }
}

fn mark(ctx: &TcContext, bits: u32) {
    // SAFETY: the program's own skb, valid for its run.
    let old = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(old | bits);
}

/// Client → server on a LAN interface's ingress: decide new flows, count known ones, mark what
/// the kernel may forward. Never drops (nftables does, for an uncounted fast flow).
#[classifier]
pub fn tpacct_fast_ingress(ctx: TcContext) -> i32 {
    upload(&ctx);
    TC_ACT_OK
}

fn upload(ctx: &TcContext) {
    let Some(p) = parse(ctx, true) else {
        return;
    };
    let marks = global(&TPACCT_FAST_MARK) | global(&TPACCT_COUNTED_MARK);
    let tcp = p.key.proto == IPPROTO_TCP;
    let opening = tcp && p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(value) = TPACCT_FAST_FLOWS.get_ptr_mut(&p.key) {
        // SAFETY: a live map value.
        let same = !opening || unsafe { (*value).up_start } == u64::from(p.seq) + 1;
        if same {
            count(&p, value, true);
            mark(ctx, marks);
            return;
        }
        // A new connection on the old one's 5-tuple: the old one is over.
        // SAFETY: as above.
        let flags = unsafe { core::ptr::addr_of_mut!((*value).flags) };
        if fetch_or(flags, 0) & fast_flags::CLOSED == 0 {
            emit(&p.key, value, fast_reason::NEW_SYN);
        }
    } else if tcp && !opening {
        // Not ours: a proxied flow, or one older than the program.
        return;
    }
    let Some((rule, generation)) = decide(&p.key) else {
        return;
    };
    let t = now();
    let isn1 = if tcp { u64::from(p.seq) + 1 } else { 0 };
    let flow = FastFlow {
        up_start: isn1,
        up_end: isn1,
        first_ns: t,
        last_ns: t,
        rule,
        generation,
        ..FastFlow::default()
    };
    let how = if opening { BPF_ANY } else { BPF_NOEXIST };
    if TPACCT_FAST_FLOWS
        .insert(&p.key, &flow, u64::from(how))
        .is_err()
    {
        // Full (or, for UDP, another CPU just made it): leave the flow to the proxy.
        bump(FastStat::MapFull);
        return;
    }
    bump(FastStat::Decided);
    if let Some(value) = TPACCT_FAST_FLOWS.get_ptr_mut(&p.key) {
        count(&p, value, true);
    }
    mark(ctx, marks);
}

/// Server → client on a LAN interface's egress: count known flows; drop a packet nftables
/// marked as a fast flow's when its entry is gone (it would pass uncounted).
#[classifier]
pub fn tpacct_fast_egress(ctx: TcContext) -> i32 {
    let Some(p) = parse(&ctx, false) else {
        return TC_ACT_OK;
    };
    match TPACCT_FAST_FLOWS.get_ptr_mut(&p.key) {
        Some(value) => {
            count(&p, value, false);
            TC_ACT_OK
        }
        None => {
            // SAFETY: the program's own skb.
            let skb_mark = unsafe { (*ctx.skb.skb).mark };
            let fast = global(&TPACCT_FAST_MARK);
            if fast != 0 && skb_mark & fast != 0 {
                bump(FastStat::Dropped);
                TC_ACT_SHOT
            } else {
                TC_ACT_OK
            }
        }
    }
}
