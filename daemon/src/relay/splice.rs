//! One direction of the splice relay: socket → pipe → socket without copying through user
//! space, driven by the sockets' readiness.

use std::{
    cell::RefCell,
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, OwnedFd},
    task::{Context, Poll, ready},
};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};

use super::End;
use crate::accounting::Meter;

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};

/// Pipe capacity asked for (the kernel's default maximum for unprivileged pipes); a larger
/// pipe means fewer splice calls per megabyte.
const PIPE_SIZE: i32 = 1 << 20;

/// Chunks moved in one poll before a busy direction yields to the other and to other tasks.
const CHUNKS_PER_POLL: u32 = 16;

/// Which side failed.
#[derive(Debug)]
pub(super) enum Failed {
    Read(io::Error),
    Write(io::Error),
}

impl Failed {
    /// How the relay ends: `read` when the source failed, `write` when the destination did.
    pub(super) fn end(self, read: End, write: End) -> (End, io::Error) {
        match self {
            Failed::Read(e) => (read, e),
            Failed::Write(e) => (write, e),
        }
    }
}

/// Empty pipes kept per worker thread for the next direction with bytes to move.
const POOL_MAX: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// One direction's state: the pipe while bytes move (taken from this thread's pool, or made
/// when the first byte arrives; given back whenever it is empty and the source has nothing
/// more, so an idle connection holds none), the bytes in it not yet written, and whether EOF
/// was passed on.
#[derive(Debug, Default)]
pub(super) struct Direction {
    pipe: Option<Pipe>,
    left: usize,
    done: bool,
}

impl Direction {
    pub(super) fn done(&self) -> bool {
        self.done
    }

    /// Gives the (empty) pipe back to this thread's pool; a full pool closes it.
    fn release(&mut self) {
        debug_assert_eq!(self.left, 0);
        if let Some(pipe) = self.pipe.take() {
            let _ = POOL.try_with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.len() < POOL_MAX {
                    pool.push(pipe);
                }
            });
        }
    }

    /// Moves what is ready from `src` to `dst`. `Ready(Ok)` once `src` reached EOF and
    /// everything read was written; `Pending` with the waker registered on the readiness
    /// it waits for.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        read_meter: &Meter,
        write_meter: &Meter,
    ) -> Poll<Result<(), Failed>> {
        let mut budget = CHUNKS_PER_POLL;
        loop {
            if let Some(pipe) = &self.pipe
                && self.left > 0
            {
                match dst.try_io(Interest::WRITABLE, || pipe.drain(dst, self.left)) {
                    Ok(m) => {
                        write_meter.add_tx(m as u64);
                        self.left -= m;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(dst.poll_write_ready(cx)).map_err(Failed::Write)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Poll::Ready(Err(Failed::Write(e))),
                }
                continue;
            }
            if budget == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            budget -= 1;
            if self.pipe.is_none() {
                self.pipe = Pipe::pooled();
            }
            let read = match &self.pipe {
                Some(pipe) => src.try_io(Interest::READABLE, || pipe.fill(src, pipe.capacity)),
                // Readiness can be reported with nothing to read (seen with thousands of idle
                // connections held at once): the pipe is made once a byte or the end is there.
                None => {
                    let mut byte = [MaybeUninit::<u8>::uninit()];
                    src.try_io(Interest::READABLE, || SockRef::from(src).peek(&mut byte))
                }
            };
            match read {
                Ok(0) => {
                    self.release();
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => match &self.pipe {
                    Some(_) => {
                        read_meter.add_rx(n as u64);
                        self.left = n;
                    }
                    None => self.pipe = Some(Pipe::new().map_err(Failed::Read)?),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.release();
                    ready!(src.poll_read_ready(cx)).map_err(Failed::Read)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(Failed::Read(e))),
            }
        }
    }
}

/// A non-blocking pipe used as the splice buffer of one direction.
#[derive(Debug)]
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
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

    /// An empty pipe from this thread's pool, if it has one.
    fn pooled() -> Option<Pipe> {
        POOL.try_with(|pool| pool.borrow_mut().pop()).ok().flatten()
    }

    /// Moves up to `len` bytes from socket `from` into the pipe.
    fn fill(&self, from: impl AsFd, len: usize) -> io::Result<usize> {
        move_bytes(from, &self.write, len)
    }

    /// Moves up to `len` bytes from the pipe into socket `to`.
    fn drain(&self, to: impl AsFd, len: usize) -> io::Result<usize> {
        move_bytes(&self.read, to, len)
    }
}

fn move_bytes(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(splice(from, None, to, None, len, flags)?)
}
