//! tpacct's kernel programs: exact per-socket payload counters keyed by socket cookie.
//!
//! * `sockops` (TCP): an entry is made when a connection is established, refreshed on every
//!   segment the socket receives (data or ACK) and on every RTT sample, and turned into a
//!   [`CloseEvent`] when the socket reaches TCP_CLOSE. SYN and FIN consume sequence numbers that
//!   the kernel's `bytes_received`/`bytes_acked` include; they are subtracted here.
//! * `cgroup_skb` ingress/egress (UDP): datagram payload per socket.
//! * `cgroup/sock_release` (UDP): final totals when the socket is released.
//!
//! * `process`: cgroup connect/sendmsg hooks and a sock_ops program recording which process
//!   opened a socket (by cookie, and for TCP clients by 4-tuple).
//!
//! Nothing here decides policy; it counts, and says when it could not.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(
    target_arch = "bpf",
    expect(unstable_features, reason = "inline asm for atomic add on bpf"),
    feature(asm_experimental_arch)
)]

#[cfg(target_arch = "bpf")]
mod process;
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(target_arch = "bpf")]
mod object;

/// The programs only exist for the BPF target; on the host this crate is an empty binary so
/// that `cargo clippy --workspace --all-targets` can still check it.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
