//! The controller's accept loop: HTTP/1 with upgrades (WebSockets), bounded so that no client
//! can starve the gateway — a cap on connections served at once (more wait, accepted, up to a
//! second cap, then in the backlog), a deadline for each request head, and (in the router)
//! bodies over the limit answered 413 at once.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Controller connections served at once; more wait, accepted, for a slot.
pub const MAX_CONNECTIONS: usize = 1_024;
/// Accepted connections waiting for a slot; more wait in the listen backlog. Accepting them
/// drains the backlog, so a burst's handshakes are not dropped there (a handshake the kernel
/// drops because the queue is full ends, a minute later, in a reset).
const MAX_WAITING: usize = 4_096;
/// The listen backlog asked for (the kernel caps it at `net.core.somaxconn`): a burst of
/// clients waits here for a slot instead of having its handshakes dropped.
const BACKLOG: i32 = 4_096;

/// A non-blocking listener on the first of `addr`'s addresses that binds.
pub fn listen(addr: impl std::net::ToSocketAddrs) -> std::io::Result<std::net::TcpListener> {
    let mut last = None;
    for a in addr.to_socket_addrs()? {
        let bound = (|| {
            let s = socket2::Socket::new(
                socket2::Domain::for_address(a),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.set_reuse_address(true)?;
            s.bind(&a.into())?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(std::net::TcpListener::from(s))
        })();
        match bound {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}
/// How long a client may take to send a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `cancel`; connections run on `tracker`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let open = Arc::new(Semaphore::new(MAX_CONNECTIONS + MAX_WAITING));
    loop {
        let held = tokio::select! {
            () = cancel.cancelled() => return,
            p = open.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, _) = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!("external-controller: accept: {e}");
                    // Out of descriptors, say: give the process a moment.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        let slots = slots.clone();
        tracker.spawn(async move {
            let permit = tokio::select! {
                () = cancel.cancelled() => return,
                p = slots.acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("external-controller: connection: {e}");
                    }
                }
                () = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
            drop((permit, held));
        });
    }
}
