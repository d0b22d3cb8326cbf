//! Whole-map reads with `BPF_MAP_LOOKUP_BATCH`: a few thousand entries per system call
//! instead of one call per socket (aya 0.14 has no batch operations).

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, BorrowedFd},
};

/// `BPF_MAP_LOOKUP_BATCH` from `<linux/bpf.h>`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of the hash map behind `fd`, read in chunks. `Unsupported` when the
/// kernel refuses batch lookups on it (the caller then reads entry by entry).
///
/// `K` and `V` must be the map's exact key and value types: plain-old-data without padding
/// the kernel could leave unwritten.
pub fn read_all<K: Copy, V: Copy>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(CHUNK);
    let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(CHUNK);
    // The hash table's batch token is a bucket index (u32); u64 leaves room.
    let mut token = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::addr_of!(token) as u64
            },
            out_batch: std::ptr::addr_of_mut!(token) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` for this command; `keys` and `values`
        // have room for `count` (CHUNK) elements of the map's key and value sizes, and
        // `token` outlives the call. The kernel writes at most `count` of each and reports
        // how many in `attr.count`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::addr_of_mut!(attr),
                size_of::<BatchAttr>() as u32,
            )
        };
        // ENOENT: the end of the map, with `count` holding what this last call read.
        let done = r < 0;
        if done {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENOENT) => {}
                // 524 is the kernel's ENOTSUPP.
                Some(libc::EINVAL | libc::EOPNOTSUPP | 524) => {
                    return Err(io::ErrorKind::Unsupported.into());
                }
                _ => return Err(e),
            }
        }
        let n = (attr.count as usize).min(CHUNK);
        // SAFETY: the kernel initialised the first `n` keys and values.
        out.extend((0..n).map(|i| unsafe {
            (
                keys.as_ptr().add(i).read().assume_init(),
                values.as_ptr().add(i).read().assume_init(),
            )
        }));
        if done {
            return Ok(out);
        }
        first = false;
    }
}
