//! Sequence arithmetic and the atomics the counters are updated with (one instruction each;
//! a flow's packets can be counted on several CPUs at once).

/// `*p |= bits` atomically; the value before.
#[inline(always)]
pub(super) fn fetch_or(p: *mut u64, bits: u64) -> u64 {
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
pub(super) fn atomic_add(p: *mut u64, v: u64) {
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
pub(super) fn extend(near: u64, seq: u32) -> u64 {
    let delta = seq.wrapping_sub(near as u32) as i32;
    near.wrapping_add(delta as i64 as u64)
}

/// Raises the extended sequence number at `p` to `seq` if that is ahead of it, race-free
/// across CPUs.
pub(super) fn advance(p: *mut u64, seq: u32) {
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
