//! splice(2) through a pipe: socket → pipe → socket without copying through user space.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};

/// Pipe capacity asked for (the kernel's default maximum for unprivileged pipes); a larger
/// pipe means fewer splice calls per megabyte.
const PIPE_SIZE: i32 = 1 << 20;

/// A non-blocking pipe used as the splice buffer of one direction.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    pub(super) capacity: usize,
}

impl Pipe {
    pub(super) fn new() -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // On failure the default size remains.
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
            Ok(size) if size > 0 => size as usize,
            _ => 64 * 1024,
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Moves up to `len` bytes from socket `from` into the pipe.
    pub(super) fn fill(&self, from: impl AsFd, len: usize) -> io::Result<usize> {
        move_bytes(from, &self.write, len)
    }

    /// Moves up to `len` bytes from the pipe into socket `to`.
    pub(super) fn drain(&self, to: impl AsFd, len: usize) -> io::Result<usize> {
        move_bytes(&self.read, to, len)
    }
}

fn move_bytes(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(splice(from, None, to, None, len, flags)?)
}
