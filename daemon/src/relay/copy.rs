//! The relay for upstreams that are not a plain socket (TLS to an HTTPS proxy, a tunnel through
//! another proxy): copied through one buffer per direction, allocated once, with the same
//! half-close, reset, close-on-demand and idle behaviour as the splice relay.

use std::io;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use super::{End, Options, idle_watch, reset};
use crate::accounting::Meter;

const BUFFER: usize = 64 * 1024;

fn failed(end: End, e: &io::Error) -> End {
    tracing::debug!("relay: {end:?}: {e}");
    end
}

enum Failed {
    Read(io::Error),
    Write(io::Error),
}

async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    read_meter: &Meter,
    write_meter: &Meter,
) -> Result<(), Failed>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await.map_err(Failed::Read)?;
        if n == 0 {
            return to.shutdown().await.map_err(Failed::Write);
        }
        read_meter.add_rx(n as u64);
        to.write_all(&buf[..n]).await.map_err(Failed::Write)?;
        to.flush().await.map_err(Failed::Write)?;
        write_meter.add_tx(n as u64);
    }
}

/// Relays between `client` and any `upstream` stream until both directions end, either side
/// fails, the idle timeout passes, or `opts.cancel` fires.
pub async fn copy<U, A>(client: &mut TcpStream, upstream: &mut U, opts: Options<A>) -> End
where
    U: AsyncRead + AsyncWrite + Unpin,
    A: Fn() -> u64,
{
    let end = run(client, upstream, opts).await;
    if !matches!(end, End::Done | End::Idle) {
        reset(client);
    }
    end
}

async fn run<U, A>(client: &mut TcpStream, upstream: &mut U, opts: Options<A>) -> End
where
    U: AsyncRead + AsyncWrite + Unpin,
    A: Fn() -> u64,
{
    let no_meter = Meter::default();
    let (mut client_r, mut client_w) = client.split();
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let up = pump(&mut client_r, &mut up_w, &opts.client_meter, &no_meter);
    let down = pump(&mut up_r, &mut client_w, &no_meter, &opts.client_meter);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let idle = idle_watch(opts.idle, &opts.activity);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(Failed::Read(e)) => break failed(End::ClientReset, &e),
                Err(Failed::Write(e)) => break failed(End::UpstreamReset, &e),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(Failed::Read(e)) => break failed(End::UpstreamReset, &e),
                Err(Failed::Write(e)) => break failed(End::ClientReset, &e),
            },
            () = opts.cancel.cancelled() => break End::Closed,
            () = &mut idle => break End::Idle,
        }
        if up_done && down_done {
            break End::Done;
        }
    }
}
