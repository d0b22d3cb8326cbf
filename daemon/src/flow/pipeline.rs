//! The one owner of a TCP flow: track → register → name (DNS mapping, sniffing) → route → dial
//! → answer the client (proxy inbounds) → relay → finish. Inbounds only accept and describe;
//! everything after is here, the same for every inbound. A [`Finisher`] guard finishes the
//! flow exactly once, also when the task returns early or panics.

pub use super::{answer::Answer, answer::Transparent, finisher::Finisher};

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{FutureExt, future::OptionFuture};
use tokio::net::TcpStream;

use super::{DnsMode, Flow, FlowMeta, Leg, RouteInfo};
use crate::{
    config::TcpSniff,
    outbound::{self, Active, Kind, Target, Upstream},
    registry::Registry,
    relay,
    route::{
        Net, Query, Route, Router, Routing,
        dnsmap::{DnsMap, TcpAnswers},
    },
    sniff::{self, Sniffed},
};

/// How long REJECT-DROP holds a connection before closing it.
const DROP_HOLD: Duration = Duration::from_secs(30);
/// TCP flows to this port carry DNS (their answers are learned like UDP ones).
const DNS_PORT: u16 = 53;

/// A flow ready to relay: both ends open, the client answered.
#[derive(Debug)]
struct Ready {
    client: TcpStream,
    upstream: Upstream,
    flow: Arc<Flow>,
    finisher: Finisher,
    /// Counts the flow in its leaf's active flows while it lasts.
    _active: Active,
}

/// What every flow needs from the daemon.
#[derive(Debug)]
pub struct Pipeline {
    pub registry: Arc<Registry>,
    pub router: Arc<Router>,
    pub dns: Arc<DnsMap>,
    pub tcp_idle: Option<Duration>,
    /// Dial and sniff figures for `/metrics`.
    pub hooks: crate::metrics::Hooks,
    /// Finds the local process behind a flow (`find-process-mode`).
    pub processes: Arc<crate::process::Finder>,
    /// Refuses new flows while memory is over the limit.
    pub killswitch: Arc<crate::killswitch::KillSwitch>,
}

impl Pipeline {
    /// One TCP flow from an accepted `client` to its end, as a future to spawn. `handshake` is
    /// what the inbound already read and wrote on the socket (not payload).
    ///
    /// A task's future is as large as its largest state, and keeps its arguments for its whole
    /// life: an idle flow would carry the space of sniffing, routing and dialling, and its
    /// arguments twice, for as long as it lasts. So everything before relaying runs in its own
    /// allocation, made here and freed when the relay starts, and the returned future holds
    /// only that box and then the relay.
    pub fn tcp<A: Answer + 'static>(
        self: &Arc<Self>,
        client: TcpStream,
        meta: FlowMeta,
        handshake: (u64, u64),
        answer: A,
    ) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        #[expect(
            clippy::async_yields_async,
            reason = "the relay is the output: flattened in place of the box"
        )]
        let prepare = Box::pin(async move {
            let ready = this.prepare(client, meta, handshake, answer).await;
            OptionFuture::from(ready.map(|r| relay(this, r)))
        });
        // The box, then the relay in its place (an `async` block awaiting either would keep
        // both).
        prepare.flatten().map(drop)
    }

    /// Everything before relaying: admission, tracking, registration, naming, routing, the
    /// dial and the client's answer. `None` when the flow ended (and was finished) before
    /// relaying.
    async fn prepare<A: Answer>(
        self: &Arc<Self>,
        mut client: TcpStream,
        meta: FlowMeta,
        handshake: (u64, u64),
        mut answer: A,
    ) -> Option<Ready> {
        if !self.admit() {
            // Reset, not a graceful close: the client learns at once, nothing is registered.
            crate::relay::reset(&client);
            return None;
        }
        let accounting = self.registry.accounting();
        let tracked = match accounting.track_as(&client, crate::accounting::Proto::Tcp) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("{} → {:?}: {e}", meta.source, meta.destination());
                return None;
            }
        };
        let flow = self.registry.open(meta, tracked, Leg::Client);
        flow.skip_handshake(handshake.0, handshake.1);
        let finisher = Finisher::new(flow.clone(), self.registry.clone());
        let routing = self.router.routing();
        let sniffing = self.sniffing(&flow, &routing);
        let mut answered = false;
        if sniffing.is_some() && answer.waits() {
            // The client sends nothing before it hears back: answer first, as mihomo does.
            match answer.answer(&mut client, Ok(())).await {
                Ok(n) => flow.skip_handshake(0, n),
                Err(_) => {
                    finisher.finish().await;
                    return None;
                }
            }
            answered = true;
        }
        let sniffed = match sniffing {
            Some(s) => {
                let found = sniff_client(&client, &flow, s).await;
                if !s.forced
                    && let Some(to) = failing_key(&flow)
                {
                    routing.sniffer.record(to, found.is_some());
                }
                // mihomo ignores a sniffed name in `skip-domain` as if none was found.
                let skipped = found
                    .as_ref()
                    .is_some_and(|(h, _)| routing.sniff_skipped(h));
                self.hooks.sniffed(match (&found, skipped) {
                    (None, _) => "none",
                    (Some(_), true) => "skipped",
                    (Some(_), false) => "found",
                });
                found.filter(|_| !skipped)
            }
            None => None,
        };
        self.name(
            &flow,
            sniffed
                .as_ref()
                .filter(|(_, over)| *over)
                .map(|(h, _)| h.clone()),
        );
        if let Some((host, _)) = sniffed {
            flow.set_sniffed_host(host);
        }
        self.attribute(&flow, flow.meta.inbound, &routing).await;
        let (route, routing) = self.router.route(&query(&flow, Net::Tcp));
        flow.set_route(RouteInfo {
            rule: route.rule,
            payload: route.payload.clone(),
            chains: route.chains.clone(),
        });
        let target = target(&flow, &routing);
        let dialed = self
            .connect(
                &mut client,
                &flow,
                &route,
                &routing,
                target,
                answer,
                answered,
            )
            .await;
        match dialed {
            Some((upstream, active)) => Some(Ready {
                client,
                upstream,
                flow,
                finisher,
                _active: active,
            }),
            None => {
                drop(client);
                finisher.finish().await;
                None
            }
        }
    }

    /// Registers a flow that shares its socket with others (one request of a keep-alive HTTP
    /// proxy connection), names and routes it; the caller dials and relays, reporting the
    /// bytes it moves to the flow's meter.
    pub async fn request(&self, meta: FlowMeta) -> (Arc<Flow>, Finisher, Route, Arc<Routing>) {
        let network = meta.network;
        let tracked = self.registry.accounting().untracked(match network {
            super::Network::Tcp => crate::accounting::Proto::Tcp,
            super::Network::Udp => crate::accounting::Proto::Udp,
        });
        let flow = self.registry.open(meta, tracked, Leg::Client);
        let finisher = Finisher::new(flow.clone(), self.registry.clone());
        self.name(&flow, None);
        self.attribute(&flow, flow.meta.inbound, &self.router.routing())
            .await;
        let net = match network {
            super::Network::Tcp => Net::Tcp,
            super::Network::Udp => Net::Udp,
        };
        let (route, routing) = self.router.route(&query(&flow, net));
        flow.set_route(RouteInfo {
            rule: route.rule,
            payload: route.payload.clone(),
            chains: route.chains.clone(),
        });
        (flow, finisher, route, routing)
    }

    /// Whether a new flow may start (the memory kill switch refuses them after a trip).
    pub fn admit(&self) -> bool {
        self.killswitch.admit()
    }

    /// Looks up the local process behind the flow's client socket (whose remote end is
    /// `server`) when `find-process-mode` asks for it.
    pub async fn attribute(&self, flow: &Flow, server: SocketAddr, routing: &Routing) {
        if !self.processes.wanted(routing.needs_process()) {
            return;
        }
        let network = flow.meta.network;
        if let Some(owner) = self.processes.find(network, flow.meta.source, server).await {
            flow.set_owner(owner);
        }
    }

    /// Dials and answers the client; the upstream when the flow goes on to relay (else the
    /// client is marked for a reset, or was held by REJECT-DROP).
    #[allow(clippy::too_many_arguments)]
    async fn connect<A: Answer>(
        &self,
        client: &mut TcpStream,
        flow: &Flow,
        route: &Route,
        routing: &Routing,
        target: Option<Target>,
        mut answer: A,
        answered: bool,
    ) -> Option<(Upstream, Active)> {
        let leaf = &route.leaf;
        let refused = |e: outbound::Error| e;
        let dialed = match (&leaf.kind, target) {
            (Kind::RejectDrop, _) => {
                // Hold silently until the client gives up, the flow is closed, or time passes.
                let mut byte = [0u8; 1];
                tokio::select! {
                    _ = client.peek(&mut byte) => {}
                    () = flow.close_token().cancelled() => {}
                    () = tokio::time::sleep(DROP_HOLD) => {}
                }
                return None;
            }
            (_, None) => Err(refused(outbound::Error::Resolve(
                "the flow".into(),
                io::Error::new(io::ErrorKind::InvalidInput, "no destination"),
            ))),
            (_, Some(target)) => {
                let started = Instant::now();
                let r = tokio::select! {
                    r = routing.outbounds.connect(&route.chains, leaf, &target) => r,
                    () = flow.close_token().cancelled() => {
                        relay::reset(client);
                        return None;
                    }
                };
                let result = r.as_ref().map(|_| ());
                self.hooks
                    .dialed(leaf.clash_type(), started.elapsed(), result);
                r
            }
        };
        let (upstream, active) = match dialed {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("{} {} → {}: {e}", flow.id, flow.meta.source, chain(route));
                if !answered && let Ok(n) = answer.answer(client, Err(&e)).await {
                    flow.skip_handshake(0, n);
                }
                relay::reset(client);
                return None;
            }
        };
        if let Some(addr) = upstream.peer_addr() {
            flow.set_dialed(addr);
        }
        if !answered {
            match answer.answer(client, Ok(())).await {
                Ok(n) => flow.skip_handshake(0, n),
                Err(_) => return None,
            }
        }
        Some((upstream, active))
    }

    /// Which sniffers look at this flow (mihomo's rules for when to sniff).
    fn sniffing(&self, flow: &Flow, routing: &Routing) -> Option<TcpSniff> {
        let sniffer = &routing.sniffer;
        let config = &sniffer.config;
        let s = config.tcp_sniffers(flow.meta.destination_port)?;
        let ip_in =
            |nets: &[ipnet::IpNet], ip: std::net::IpAddr| nets.iter().any(|n| n.contains(&ip));
        if flow
            .meta
            .destination_ip
            .is_some_and(|ip| ip_in(&config.skip_dst_address, ip))
            || ip_in(&config.skip_src_address, flow.meta.source.ip())
        {
            return None;
        }
        let mapped = flow
            .meta
            .destination_ip
            .is_some_and(|ip| self.dns.name(ip).is_some());
        let forced = flow
            .meta
            .host
            .as_deref()
            .is_some_and(|h| routing.sniff_forced(h));
        let wanted = (flow.meta.host.is_none() && !mapped && config.parse_pure_ip)
            || (mapped && config.force_dns_mapping)
            || forced;
        // A destination whose first bytes never told a name lately (a server-first protocol
        // on a sniffed port) is not waited on again, unless forced.
        let failing = !forced && failing_key(flow).is_some_and(|to| sniffer.failing(to));
        (wanted && !failing).then_some(TcpSniff { forced, ..s })
    }

    /// Sets the flow's host: the sniffed name when it overrides, else a name the DNS answers
    /// gave for the destination (`dnsMode: mapping`), else the client's own.
    fn name(&self, flow: &Flow, overriding: Option<String>) {
        if let Some(h) = overriding {
            flow.set_host(h, DnsMode::Normal);
        } else if flow.host().is_none()
            && let Some(ip) = flow.meta.destination_ip
            && let Some(name) = self.dns.name(ip)
        {
            flow.set_host(name, DnsMode::Mapping);
        }
    }
}

/// Relays a dialled flow to its end, then finishes it. Only the relay's own state lives
/// here, for as long as the connection does: the parts of `ready` are used in place.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps a second copy of its arguments for its whole life"
)]
fn relay(this: Arc<Pipeline>, mut ready: Ready) -> impl Future<Output = ()> + Send {
    async move {
        let flow = &ready.flow;
        let opts = relay::Options {
            client_meter: flow.meter().clone(),
            cancel: flow.close_token().clone(),
            idle: this.tcp_idle,
            activity: || {
                let t = this.registry.traffic(flow);
                t.upload + t.download
            },
        };
        let client = &mut ready.client;
        // DNS over TCP is copied through user space so its answers can name later flows. The
        // copying relays (rarer, and larger) are boxed to keep the splice relay's state small.
        let end = match &mut ready.upstream {
            up if flow.meta.destination_port == DNS_PORT => {
                let mut answers = TcpAnswers::new(this.dns.clone());
                let copy = Box::pin(async move {
                    // Either kind of upstream: `Upstream` is itself a byte stream.
                    let mut up = relay::Tap::new(up, |b: &[u8]| answers.feed(b));
                    relay::copy(client, &mut up, opts).await
                });
                copy.await
            }
            Upstream::Tcp(up) => relay::tcp(client, up, opts).await,
            Upstream::Boxed(up) => {
                let copy = Box::pin(relay::copy(client, up, opts));
                copy.await
            }
        };
        tracing::debug!("{} {}: {end:?}", flow.id, flow.meta.source);
        // Both sockets close (a side marked for a reset sends it now) before the wait for the
        // final totals.
        let Ready {
            client,
            upstream,
            finisher,
            _active,
            ..
        } = ready;
        drop((client, upstream, _active));
        finisher.finish().await;
    }
}

fn chain(route: &Route) -> String {
    route.chains.join(" < ")
}

/// The destination whose sniffing failures are counted (mihomo's: the original address).
fn failing_key(flow: &Flow) -> Option<(std::net::IpAddr, u16)> {
    Some((flow.meta.destination_ip?, flow.meta.destination_port))
}

/// The query rules see for `flow`.
pub fn query(flow: &Flow, network: Net) -> Query<'_> {
    Query {
        network,
        source: flow.meta.source,
        destination: flow.meta.destination_ip,
        destination_port: flow.meta.destination_port,
        host: flow.rule_host(),
        in_port: flow.meta.inbound.port(),
        in_type: flow.meta.in_type,
        in_name: flow.meta.inbound_name,
        in_user: flow.meta.inbound_user.as_deref(),
        uid: flow.owner().map(|o| o.uid),
        process: flow.owner().map(|o| &*o.name),
        process_path: flow.owner().map(|o| &*o.path).filter(|p| !p.is_empty()),
    }
}

/// What to dial: the host when the flow has one that is not merely mapped (a proxy client's
/// name, or a sniffed name that overrides), else the original address.
fn target(flow: &Flow, _routing: &Routing) -> Option<Target> {
    let port = flow.meta.destination_port;
    match (flow.host(), flow.dns_mode(), flow.meta.destination_ip) {
        (Some(h), DnsMode::Normal, _) => Some(Target::Host(h.to_owned(), port)),
        (_, _, Some(ip)) => Some(Target::Ip(SocketAddr::new(ip, port))),
        (Some(h), DnsMode::Mapping, None) => Some(Target::Host(h.to_owned(), port)),
        (None, _, None) => None,
    }
}

/// Peeks at the client's first bytes (without consuming them) for a TLS SNI or HTTP Host, for
/// at most `s.timeout`; the name and whether it overrides the destination.
async fn sniff_client(client: &TcpStream, flow: &Flow, s: TcpSniff) -> Option<(String, bool)> {
    let deadline = Instant::now() + s.timeout;
    let mut buf = vec![0u8; 8192];
    loop {
        let peeked = tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), client.peek(&mut buf)) => r,
            () = flow.close_token().cancelled() => return None,
        };
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        match sniff::sniff(&buf[..n], s.tls, s.http) {
            Sniffed::Host(host) => return Some((host, s.override_destination)),
            Sniffed::No => return None,
            Sniffed::Incomplete => {
                if n == buf.len() || Instant::now() >= deadline {
                    return None;
                }
                // More of a split ClientHello or request head is on its way.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}
