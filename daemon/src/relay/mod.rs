//! Moving bytes. TCP: `splice(2)` through a pipe per direction, half-close propagated each way,
//! a reset answered with a reset, close on demand, idle timeout. Knows nothing of Clash: it
//! reports moved bytes to a [`Meter`] (a no-op under eBPF accounting) and nothing else.

mod copy;
mod splice;
mod tap;

pub use copy::copy;
pub use tap::Tap;

use std::{io, time::Duration};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};
use tokio_util::sync::CancellationToken;

use crate::accounting::Meter;
use splice::Pipe;

/// How a relayed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions reached EOF.
    Done,
    /// The client reset (or reading from it failed); both sides were reset.
    ClientReset,
    /// The upstream reset (or failed); both sides were reset.
    UpstreamReset,
    /// Nothing moved for the idle timeout.
    Idle,
    /// Closed on demand: both sockets were reset, so neither side receives anything that was
    /// still buffered in the proxy.
    Closed,
}

/// What a relay needs besides the two sockets.
#[derive(Debug)]
pub struct Options<A> {
    /// Counts client-leg bytes: received from the client (rx), sent to it (tx).
    pub client_meter: Meter,
    /// Ends the relay on demand.
    pub cancel: CancellationToken,
    /// End after this long without activity.
    pub idle: Option<Duration>,
    /// Total bytes moved so far on the client leg (checked only every idle/4).
    pub activity: A,
}

#[derive(Debug)]
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// Relays between `client` and `upstream` with splice until both directions end, either side
/// fails, the idle timeout passes, or `opts.cancel` fires. The caller drops the sockets
/// afterwards (a side marked by [`reset`] then sends its reset).
pub async fn tcp<A: Fn() -> u64>(
    client: &TcpStream,
    upstream: &TcpStream,
    opts: Options<A>,
) -> End {
    let no_meter = Meter::default();
    let up = pump(client, upstream, &opts.client_meter, &no_meter);
    let down = pump(upstream, client, &no_meter, &opts.client_meter);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let idle = idle_watch(opts.idle, &opts.activity);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => {
                    up_done = true;
                    let _ = SockRef::from(upstream).shutdown(std::net::Shutdown::Write);
                }
                Err(PumpError::Read(e)) => return failed(End::ClientReset, &e, client, upstream),
                Err(PumpError::Write(e)) => return failed(End::UpstreamReset, &e, client, upstream),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => {
                    down_done = true;
                    let _ = SockRef::from(client).shutdown(std::net::Shutdown::Write);
                }
                Err(PumpError::Read(e)) => return failed(End::UpstreamReset, &e, client, upstream),
                Err(PumpError::Write(e)) => return failed(End::ClientReset, &e, client, upstream),
            },
            () = opts.cancel.cancelled() => {
                // Closed on demand: both sides end now, unread and unsent data discarded.
                reset(client);
                reset(upstream);
                return End::Closed;
            }
            () = &mut idle => {
                shutdown_both(client, upstream);
                return End::Idle;
            }
        }
        if up_done && down_done {
            return End::Done;
        }
    }
}

/// One side failed with `e` (or the relay did: no pipe, say): both are reset, so neither
/// peer takes the end for an orderly one.
fn failed(end: End, e: &io::Error, client: &TcpStream, upstream: &TcpStream) -> End {
    tracing::debug!("relay: {end:?}: {e}");
    reset(client);
    reset(upstream);
    end
}

/// Resolves once `activity` has not changed for `idle`; never without a timeout.
pub(crate) async fn idle_watch(idle: Option<Duration>, activity: &impl Fn() -> u64) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let step = (idle / 4).max(Duration::from_millis(250));
    let mut last = activity();
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(step).await;
        let now = activity();
        if now == last {
            quiet += step;
            if quiet >= idle {
                return;
            }
        } else {
            (last, quiet) = (now, Duration::ZERO);
        }
    }
}

/// Moves everything from `src` to `dst` until EOF on `src`. The pipe is made when the first
/// bytes arrive, so an idle connection holds none.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    read_meter: &Meter,
    write_meter: &Meter,
) -> Result<(), PumpError> {
    // Readiness can be reported with nothing to read (seen with thousands of idle
    // connections held at once): the pipe is made only once a byte or the end is there.
    loop {
        src.readable().await.map_err(PumpError::Read)?;
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        match src.try_io(Interest::READABLE, || SockRef::from(src).peek(&mut byte)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PumpError::Read(e)),
            Ok(0) => return Ok(()),
            Ok(_) => break,
        }
    }
    let pipe = Pipe::new().map_err(PumpError::Read)?;
    loop {
        let n = loop {
            match src.try_io(Interest::READABLE, || pipe.fill(src, pipe.capacity)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable().await.map_err(PumpError::Read)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other.map_err(PumpError::Read)?,
            }
        };
        if n == 0 {
            return Ok(());
        }
        read_meter.add_rx(n as u64);
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || pipe.drain(dst, left)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable().await.map_err(PumpError::Write)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PumpError::Write(e)),
                Ok(m) => {
                    write_meter.add_tx(m as u64);
                    left -= m;
                }
            }
        }
    }
}

/// Makes the socket's close send a reset (SO_LINGER 0). A shutdown first would send FIN
/// instead, so nothing else is done: the caller drops the socket.
pub fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// An orderly end both ways (nothing is buffered on an idle connection).
fn shutdown_both(a: &TcpStream, b: &TcpStream) {
    for s in [a, b] {
        let _ = SockRef::from(s).shutdown(std::net::Shutdown::Both);
    }
}
