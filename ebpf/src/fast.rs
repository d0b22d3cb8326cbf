//! tpacct's fast path: tc programs on LAN interfaces that let the kernel forward the flows the
//! rules send DIRECT, and count their payload exactly (TCP from sequence numbers, UDP per
//! datagram). A separate object from the socket counters: it is loaded only when
//! `fast-path.enable` is set.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(
    target_arch = "bpf",
    expect(unstable_features, reason = "inline asm for atomics on bpf"),
    feature(asm_experimental_arch)
)]

#[cfg(target_arch = "bpf")]
mod fastpath;

#[cfg(target_arch = "bpf")]
mod object;

/// The programs only exist for the BPF target (see `main.rs`).
#[cfg(not(target_arch = "bpf"))]
fn main() {}
