//! SOCKS5 UDP ASSOCIATE: a relay socket bound for the association's life (it ends with the
//! TCP control connection), one flow per destination the client writes to, each with its own
//! outbound UDP session. The relay socket is shared by those flows, so each is counted by the
//! payload relayed for it (the SOCKS5 header is not payload).

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};
use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::{
    flow::{Flow, Network, pipeline::Finisher},
    outbound::{Kind, Target, UdpSession},
    proto::socks5::{self as wire, Addr, reply},
};

/// Destinations per association.
const MAX_DESTINATIONS: usize = 256;

struct Dest {
    flow: Arc<Flow>,
    session: Option<Arc<UdpSession>>,
    /// Counts the destination among its leaf's active flows.
    _active: Option<crate::outbound::Active>,
    stop: CancellationToken,
    last: Instant,
}

pub(super) async fn associate(
    mut control: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    user: Option<String>,
    ctx: &Ctx,
) -> io::Result<()> {
    let relay = Arc::new(UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await?);
    let bound = relay.local_addr()?;
    control
        .write_all(&wire::reply_bytes(reply::SUCCEEDED, &Addr::Ip(bound)))
        .await?;
    let mut client: Option<SocketAddr> = None;
    let mut dests: HashMap<Addr, Dest> = HashMap::new();
    let mut finishers: Vec<Finisher> = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let mut byte = [0u8; 1];
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            // The association ends with its control connection.
            r = control.read(&mut byte) => if matches!(r, Ok(0) | Err(_)) { break },
            () = ctx.cancel.cancelled() => break,
            _ = sweep.tick() => {
                dests.retain(|_, d| {
                    let keep = d.last.elapsed() < ctx.udp_idle && !d.flow.close_token().is_cancelled();
                    if !keep {
                        d.stop.cancel();
                    }
                    keep
                });
            }
            r = relay.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                // Only the client that associated, from the first port it used.
                if from.ip() != peer.ip() || client.is_some_and(|c| c != from) {
                    continue;
                }
                client = Some(from);
                let Ok((addr, at)) = wire::parse_udp(&buf[..n]) else { continue };
                let payload = &buf[at..n];
                if !dests.contains_key(&addr) {
                    if dests.len() >= MAX_DESTINATIONS || !ctx.pipeline.admit() {
                        continue;
                    }
                    let (dest, finisher) = open(ctx, peer, local, &user, &addr, &relay, from).await;
                    finishers.push(finisher);
                    dests.insert(addr.clone(), dest);
                }
                if let Some(d) = dests.get_mut(&addr) {
                    d.last = Instant::now();
                    d.flow.meter().add_rx(payload.len() as u64);
                    if let Some(s) = &d.session
                        && let Err(e) = s.send(payload)
                    {
                        tracing::debug!("{} socks5 udp → {addr}: {e}", d.flow.id);
                    }
                }
            }
        }
    }
    for d in dests.values() {
        d.stop.cancel();
    }
    drop(dests);
    for f in finishers {
        f.finish().await;
    }
    Ok(())
}

/// Registers and routes a destination's flow and starts pumping its replies to the client.
async fn open(
    ctx: &Ctx,
    peer: SocketAddr,
    local: SocketAddr,
    user: &Option<String>,
    addr: &Addr,
    relay: &Arc<UdpSocket>,
    client: SocketAddr,
) -> (Dest, Finisher) {
    let meta = super::socks::meta(
        ctx,
        Network::Udp,
        ("Socks5", "SOCKS5"),
        peer,
        local,
        addr,
        user.clone(),
    );
    let (flow, finisher, route, routing) = ctx.pipeline.request(meta).await;
    let target: Target = addr.clone().into();
    let session = match route.leaf.kind {
        Kind::Reject | Kind::RejectDrop | Kind::Pass | Kind::Compatible => None,
        _ => match routing
            .outbounds
            .open_udp(&route.chains, &route.leaf, &target)
            .await
        {
            Ok((s, active)) => {
                if let Some(a) = s.destination() {
                    flow.set_dialed(a);
                }
                Some((Arc::new(s), active))
            }
            Err(e) => {
                tracing::debug!("{} socks5 udp → {target}: {e}", flow.id);
                None
            }
        },
    };
    let (session, active) = match session {
        Some((s, a)) => (Some(s), Some(a)),
        None => (None, None),
    };
    let stop = CancellationToken::new();
    if let Some(s) = session.clone() {
        let (relay, flow, stop, addr) = (relay.clone(), flow.clone(), stop.clone(), addr.clone());
        ctx.tracker.spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let mut header = Vec::new();
            wire::udp_header(&addr, &mut header);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = flow.close_token().cancelled() => return,
                    () = s.ended() => return,
                    r = s.readable() => if r.is_err() { return },
                }
                loop {
                    match s.try_recv(&mut buf[header.len()..]) {
                        Ok(n) => {
                            buf[..header.len()].copy_from_slice(&header);
                            // Counted before the client can have it (see udp_session).
                            flow.meter().add_tx(n as u64);
                            if relay
                                .send_to(&buf[..header.len() + n], client)
                                .await
                                .is_err()
                            {
                                flow.meter().take_back_tx(n as u64);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                }
            }
        });
    }
    let dest = Dest {
        flow,
        session,
        _active: active,
        stop,
        last: Instant::now(),
    };
    (dest, finisher)
}
