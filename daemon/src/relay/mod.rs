//! Moving bytes. TCP: `splice(2)` through a pipe per direction, half-close propagated each way,
//! a reset answered with a reset, close on demand, idle timeout. Knows nothing of Clash: it
//! reports moved bytes to a [`Meter`] (a no-op under eBPF accounting) and nothing else.

mod copy;
mod splice;
mod tap;

pub use copy::copy;
pub use tap::Tap;

use std::{future::Future, io, task::Poll, time::Duration};

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::accounting::Meter;
use splice::{Direction, Failed};

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

/// Relays between `client` and `upstream` with splice until both directions end, either side
/// fails, the idle timeout passes, or `opts.cancel` fires. The caller drops the sockets
/// afterwards (a side marked by [`reset`] then sends its reset).
///
/// One poll function drives both directions from the sockets' own readiness slots, so an idle
/// relay holds two small [`Direction`]s, the cancellation and the idle timer: no wait-list
/// entries per direction.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments for its whole life"
)]
pub fn tcp<'a, A: Fn() -> u64 + 'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    opts: Options<A>,
) -> impl Future<Output = End> + 'a {
    async move {
        let no_meter = Meter::default();
        let (mut up, mut down) = (Direction::default(), Direction::default());
        // Pinned where they are made: a moved future would take its space twice in this one.
        let mut cancelled = std::pin::pin!(opts.cancel.cancelled());
        let mut idle = std::pin::pin!(idle_watch(opts.idle, &opts.activity));
        std::future::poll_fn(|cx| {
            let ended = forward(
                &mut up,
                cx,
                (client, upstream),
                (&opts.client_meter, &no_meter),
            )
            .map(|f| f.end(End::ClientReset, End::UpstreamReset))
            .or_else(|| {
                forward(
                    &mut down,
                    cx,
                    (upstream, client),
                    (&no_meter, &opts.client_meter),
                )
                .map(|f| f.end(End::UpstreamReset, End::ClientReset))
            });
            if let Some((end, e)) = ended {
                return Poll::Ready(failed(end, &e, client, upstream));
            }
            if up.done() && down.done() {
                return Poll::Ready(End::Done);
            }
            if cancelled.as_mut().poll(cx).is_ready() {
                // Closed on demand: both sides end now, unread and unsent data discarded.
                reset(client);
                reset(upstream);
                return Poll::Ready(End::Closed);
            }
            if idle.as_mut().poll(cx).is_ready() {
                shutdown_both(client, upstream);
                return Poll::Ready(End::Idle);
            }
            Poll::Pending
        })
        .await
    }
}

/// Moves what is ready one way, `src` → `dst` (meters: read, write), unless that way is done;
/// passes a half-close on at EOF. The failure that ends the relay, if one did.
fn forward(
    d: &mut Direction,
    cx: &mut std::task::Context<'_>,
    (src, dst): (&TcpStream, &TcpStream),
    (read, write): (&Meter, &Meter),
) -> Option<Failed> {
    if d.done() {
        return None;
    }
    match d.poll(cx, src, dst, read, write) {
        Poll::Ready(Ok(())) => {
            let _ = SockRef::from(dst).shutdown(std::net::Shutdown::Write);
            None
        }
        Poll::Ready(Err(f)) => Some(f),
        Poll::Pending => None,
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
