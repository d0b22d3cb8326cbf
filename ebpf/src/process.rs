//! Process attribution (BPF target only): who opened a socket, recorded by cgroup hooks in the
//! process's own context, by socket cookie and — for TCP clients, once the source port is
//! bound — by connection 4-tuple, so the daemon finds the owner of a flow it accepted.
//!
//! These programs attach where the local processes are (the root cgroup by default) and only
//! record; they never change a verdict.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_SOCK_OPS_TCP_CONNECT_CB},
    btf_maps::LruHashMap,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_boot_ns,
    },
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use tpacct_common::{AF_INET, AF_INET6, MAX_PROC_RECORDS, ProcKey, ProcRecord, proto};

#[btf_map]
static TPACCT_PROC_SOCK: LruHashMap<u64, ProcRecord, { MAX_PROC_RECORDS as usize }> =
    LruHashMap::new();

#[btf_map]
static TPACCT_PROC_TUPLE: LruHashMap<ProcKey, ProcRecord, { MAX_PROC_RECORDS as usize }> =
    LruHashMap::new();

/// Set by the daemon at load time: its own sockets are not recorded.
#[unsafe(no_mangle)]
static TPACCT_SELF_TGID: u32 = 0;

fn self_tgid() -> u32 {
    // SAFETY: a read of a global the loader may have rewritten; volatile so the compiler
    // does not fold the zero it was declared with.
    unsafe { core::ptr::read_volatile(&TPACCT_SELF_TGID) }
}

/// The current task as a record, or None for the daemon itself.
fn current() -> Option<ProcRecord> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == self_tgid() {
        return None;
    }
    let uid_gid = bpf_get_current_uid_gid();
    Some(ProcRecord {
        // SAFETY: no preconditions.
        at_ns: unsafe { bpf_ktime_get_boot_ns() },
        tgid,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    })
}

fn cookie_of<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the program's own context, of a type the helper accepts (sock_addr, sock_ops).
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Records the current task for the socket: always on connect (the task connecting owns it
/// now), on sendmsg only when nothing is recorded yet (one lookup per datagram, no write).
fn remember(ctx: &SockAddrContext, replace: bool) {
    let cookie = cookie_of(ctx);
    if !replace && TPACCT_PROC_SOCK.get_ptr(cookie).is_some() {
        return;
    }
    if let Some(record) = current() {
        let _ = TPACCT_PROC_SOCK.insert(cookie, record, u64::from(BPF_ANY));
    }
}

#[cgroup_sock_addr(connect4)]
pub fn tpacct_proc_connect4(ctx: SockAddrContext) -> i32 {
    remember(&ctx, true);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn tpacct_proc_connect6(ctx: SockAddrContext) -> i32 {
    remember(&ctx, true);
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tpacct_proc_sendmsg4(ctx: SockAddrContext) -> i32 {
    remember(&ctx, false);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tpacct_proc_sendmsg6(ctx: SockAddrContext) -> i32 {
    remember(&ctx, false);
    1
}

/// On a TCP client's connect, after the source port is bound and before the SYN leaves:
/// the socket's record, keyed by its 4-tuple.
#[sock_ops]
pub fn tpacct_proc_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        by_tuple(&ctx);
    }
    1
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), words in network order.
fn v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0xffff_u32.to_be()
}

/// The local and remote IPv6 addresses, each word read at its own constant offset (the
/// verifier refuses a load through a context pointer that was moved first, which is what
/// copying the arrays compiles to).
fn ip6(ctx: &SockOpsContext) -> ([u32; 4], [u32; 4]) {
    let ops = ctx.ops;
    // SAFETY: the kernel's bpf_sock_ops for this run; each read is one u32 field.
    unsafe {
        let l = |i: usize| core::ptr::read_volatile(&raw const (*ops).local_ip6[i]);
        let r = |i: usize| core::ptr::read_volatile(&raw const (*ops).remote_ip6[i]);
        ([l(0), l(1), l(2), l(3)], [r(0), r(1), r(2), r(3)])
    }
}

fn by_tuple(ctx: &SockOpsContext) {
    // SAFETY: a pointer into the map's value, copied at once.
    let Some(record) = TPACCT_PROC_SOCK
        .get_ptr(cookie_of(ctx))
        .map(|p| unsafe { *p })
    else {
        return;
    };
    let mut key = ProcKey {
        // SAFETY: the program's own sock_ops context.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local_port: ctx.local_port(),
        // The kernel gives the remote port in network order in the upper half.
        remote_port: u32::from_be(ctx.remote_port()),
        proto: proto::TCP,
        ..ProcKey::default()
    };
    match ctx.family() {
        AF_INET => {
            key.family = AF_INET;
            key.local[0] = ctx.local_ip4();
            key.remote[0] = ctx.remote_ip4();
        }
        AF_INET6 => {
            let (local, remote) = ip6(ctx);
            if v4_mapped(&remote) {
                key.family = AF_INET;
                key.local[0] = local[3];
                key.remote[0] = remote[3];
            } else {
                key.family = AF_INET6;
                key.local = local;
                key.remote = remote;
            }
        }
        _ => return,
    }
    let _ = TPACCT_PROC_TUPLE.insert(key, record, u64::from(BPF_ANY));
}
