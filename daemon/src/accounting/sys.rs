//! Socket facts the accounting needs: the cookie (`SO_COOKIE`, the key of the kernel maps) and
//! the transport (`SO_PROTOCOL`).

use std::os::fd::BorrowedFd;

use socket2::{Protocol, SockRef};

use super::{Error, Proto};

/// The socket's cookie: the kernel's stable 64-bit id for it, as `bpf_get_socket_cookie` sees it.
pub(super) fn cookie(fd: BorrowedFd<'_>) -> Result<u64, Error> {
    SockRef::from(&fd).cookie().map_err(|source| Error::Socket {
        what: "SO_COOKIE",
        source,
    })
}

/// TCP or UDP.
pub(super) fn proto(fd: BorrowedFd<'_>) -> Result<Proto, Error> {
    match SockRef::from(&fd).protocol() {
        Ok(Some(p)) if p == Protocol::UDP => Ok(Proto::Udp),
        Ok(_) => Ok(Proto::Tcp),
        Err(source) => Err(Error::Socket {
            what: "SO_PROTOCOL",
            source,
        }),
    }
}
