//! Socket options the accounting needs that nix does not wrap: `SO_COOKIE`, `SO_PROTOCOL`.

use std::{mem::size_of, os::fd::AsRawFd, os::fd::BorrowedFd};

use super::{Error, Proto};

fn getsockopt_int<T: Default + Copy>(
    fd: BorrowedFd<'_>,
    opt: libc::c_int,
    what: &'static str,
) -> Result<T, Error> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a plain integer of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(Error::Socket {
            what,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// The socket's cookie: the kernel's stable 64-bit id for it, as `bpf_get_socket_cookie` sees it.
pub(super) fn cookie(fd: BorrowedFd<'_>) -> Result<u64, Error> {
    getsockopt_int::<u64>(fd, libc::SO_COOKIE, "SO_COOKIE")
}

/// TCP or UDP.
pub(super) fn proto(fd: BorrowedFd<'_>) -> Result<Proto, Error> {
    match getsockopt_int::<libc::c_int>(fd, libc::SO_PROTOCOL, "SO_PROTOCOL")? {
        libc::IPPROTO_UDP => Ok(Proto::Udp),
        _ => Ok(Proto::Tcp),
    }
}
