//! The fast path (tc on LAN interfaces): decides at a flow's first packet whether the rules send
//! it DIRECT, marks it so nftables lets the kernel forward it, and counts its payload exactly —
//! from sequence numbers for TCP, per datagram for UDP.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use tpacct_common::{
    AF_INET, AF_INET6,
    fastpath::{
        FAST_RING_BYTES, FastCtrl, FastEvent, FastFlow, FastRule, FastStat, FlowKey,
        MAX_FAST_FLOWS, MAX_FAST_RULES, RULE_PORT_RANGES, fast_flags, fast_reason, rule_kind,
    },
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

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

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

/// `*p |= bits` atomically; the value before.
#[inline(always)]
fn fetch_or(p: *mut u64, bits: u64) -> u64 {
    let mut v = bits;
    // SAFETY: `p` points at a u64 field of a live map value; one atomic instruction.
    unsafe {
        core::arch::asm!(
            "{v} = atomic_fetch_or((u64 *)({p} + 0), {v})",
            p = in(reg) p,
            v = inout(reg) v,
        );
    }
    v
}

/// `*p += v` atomically.
#[inline(always)]
fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: as for `fetch_or`.
    unsafe {
        core::arch::asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p, v = in(reg) v);
    }
}

/// If `*p == expected`, stores `new`; returns the value found.
#[inline(always)]
fn cmpxchg(p: *mut u64, expected: u64, new: u64) -> u64 {
    let mut found = expected;
    // SAFETY: as for `fetch_or`; r0 carries the expected value in and the found value out.
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({p} + 0, r0, {new})",
            p = in(reg) p,
            new = in(reg) new,
            inout("r0") found,
        );
    }
    found
}

/// `seq` (32 bits) placed next to the extended `near`: the 64-bit value within 2^31 of it.
fn extend(near: u64, seq: u32) -> u64 {
    let delta = seq.wrapping_sub(near as u32) as i32;
    near.wrapping_add(delta as i64 as u64)
}

/// Raises the extended sequence number at `p` to `seq` if that is ahead of it, race-free
/// across CPUs.
fn advance(p: *mut u64, seq: u32) {
    // SAFETY: `p` points at a u64 field of a live map value.
    let mut cur = unsafe { core::ptr::read_volatile(p) };
    for _ in 0..8 {
        let want = extend(cur, seq);
        if (want.wrapping_sub(cur) as i64) <= 0 {
            return;
        }
        let found = cmpxchg(p, cur, want);
        if found == cur {
            return;
        }
        cur = found;
    }
}

/// What a packet says about its flow.
struct Packet {
    key: FlowKey,
    /// TCP flags (0 for UDP).
    flags: u8,
    seq: u32,
    payload: u32,
}

fn load<T>(ctx: &TcContext, at: usize) -> Option<T> {
    ctx.load::<T>(at).ok()
}

/// Parses Ethernet + IPv4/IPv6 (extension headers skipped) + TCP/UDP. The key is oriented
/// client → server: `upload` packets are the client's, the others the server's.
fn parse(ctx: &TcContext, upload: bool) -> Option<Packet> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let mut src = [0u32; 4];
    let mut dst = [0u32; 4];
    let (family, mut proto, l4, ip_payload) = match ethertype {
        ETH_P_IP => {
            let first: u8 = load(ctx, ETH_HLEN)?;
            let ihl = usize::from(first & 0x0f) * 4;
            let frag = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
            if frag & 0x1fff != 0 {
                return None;
            }
            let tot = u32::from(u16::from_be(load::<u16>(ctx, ETH_HLEN + 2)?));
            // IPv4 BIG TCP: tot_len 0, the length is the skb's.
            let tot = if tot == 0 {
                ctx.len().saturating_sub(ETH_HLEN as u32)
            } else {
                tot
            };
            src[0] = load(ctx, ETH_HLEN + 12)?;
            dst[0] = load(ctx, ETH_HLEN + 16)?;
            let proto: u8 = load(ctx, ETH_HLEN + 9)?;
            (
                AF_INET,
                proto,
                ETH_HLEN + ihl,
                tot.saturating_sub(ihl as u32),
            )
        }
        ETH_P_IPV6 => {
            let plen = u32::from(u16::from_be(load::<u16>(ctx, ETH_HLEN + 4)?));
            let plen = if plen == 0 {
                ctx.len().saturating_sub(ETH_HLEN as u32 + 40)
            } else {
                plen
            };
            src = load(ctx, ETH_HLEN + 8)?;
            dst = load(ctx, ETH_HLEN + 24)?;
            let mut next: u8 = load(ctx, ETH_HLEN + 6)?;
            let mut at = ETH_HLEN + 40;
            let mut left = plen;
            for _ in 0..4 {
                let len = match next {
                    // Hop-by-hop, routing, destination options.
                    0 | 43 | 60 => (usize::from(load::<u8>(ctx, at + 1)?) + 1) * 8,
                    // Fragment: only a first fragment carries the transport header.
                    44 => {
                        let off = u16::from_be(load::<u16>(ctx, at + 2)?);
                        if off & 0xfff8 != 0 {
                            return None;
                        }
                        8
                    }
                    _ => break,
                };
                next = load(ctx, at)?;
                at += len;
                left = left.saturating_sub(len as u32);
            }
            (AF_INET6, next, at, left)
        }
        _ => return None,
    };
    let (sport, dport) = (
        u16::from_be(load::<u16>(ctx, l4)?),
        u16::from_be(load::<u16>(ctx, l4 + 2)?),
    );
    let (flags, seq, payload) = match proto {
        IPPROTO_TCP => {
            let doff = u32::from(load::<u8>(ctx, l4 + 12)? >> 4) * 4;
            let flags: u8 = load(ctx, l4 + 13)?;
            let seq = u32::from_be(load::<u32>(ctx, l4 + 4)?);
            (flags, seq, ip_payload.saturating_sub(doff))
        }
        // The UDP header's length: a fragmented datagram's first fragment carries the whole
        // datagram's (the other fragments have no header and are not looked at).
        IPPROTO_UDP => (
            0,
            0,
            u32::from(u16::from_be(load::<u16>(ctx, l4 + 4)?)).saturating_sub(8),
        ),
        _ => return None,
    };
    proto = if proto == IPPROTO_TCP {
        IPPROTO_TCP
    } else {
        IPPROTO_UDP
    };
    let key = if upload {
        FlowKey {
            client: src,
            server: dst,
            client_port: sport,
            server_port: dport,
            family: family as u8,
            proto,
            _pad: [0; 2],
        }
    } else {
        FlowKey {
            client: dst,
            server: src,
            client_port: dport,
            server_port: sport,
            family: family as u8,
            proto,
            _pad: [0; 2],
        }
    };
    Some(Packet {
        key,
        flags,
        seq,
        payload,
    })
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
    TC_ACT_OK as i32
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
        return TC_ACT_OK as i32;
    };
    match TPACCT_FAST_FLOWS.get_ptr_mut(&p.key) {
        Some(value) => {
            count(&p, value, false);
            TC_ACT_OK as i32
        }
        None => {
            // SAFETY: the program's own skb.
            let skb_mark = unsafe { (*ctx.skb.skb).mark };
            let fast = global(&TPACCT_FAST_MARK);
            if fast != 0 && skb_mark & fast != 0 {
                bump(FastStat::Dropped);
                TC_ACT_SHOT as i32
            } else {
                TC_ACT_OK as i32
            }
        }
    }
}
