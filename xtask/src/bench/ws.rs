//! `bench-client ws ADDR SECS`: dashboards following `/connections` over WebSocket at the
//! default interval (1 s), as many as [`CLIENTS`], each reading every frame for SECS seconds.

use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tungstenite::{client::IntoClientRequest, http::HeaderValue};

/// Concurrent followers.
pub(super) const CLIENTS: usize = 20;

/// Frames received by all followers of `ws://ADDR/connections` over `secs` seconds.
pub(super) fn follow(addr: &str, secs: u64) -> Result<u64> {
    let until = Instant::now() + Duration::from_secs(secs);
    let followers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = addr.to_owned();
            std::thread::spawn(move || one(&addr, until))
        })
        .collect();
    let mut frames = 0;
    for f in followers {
        frames += f
            .join()
            .map_err(|_| anyhow::anyhow!("a follower panicked"))??;
    }
    Ok(frames)
}

fn one(addr: &str, until: Instant) -> Result<u64> {
    let mut request = format!("ws://{addr}/connections").into_client_request()?;
    request
        .headers_mut()
        .insert("Authorization", HeaderValue::from_static("Bearer bench"));
    let stream =
        TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(10)).context("API")?;
    // A contender that stops answering fails the workload instead of hanging it.
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (mut ws, _) = tungstenite::client(request, stream).context("WebSocket handshake")?;
    // Wakes the reader at least every 200 ms to look at the clock.
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut frames = 0;
    while Instant::now() < until {
        match ws.read() {
            Ok(m) if m.is_text() || m.is_binary() => frames += 1,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let _ = ws.close(None);
    Ok(frames)
}
