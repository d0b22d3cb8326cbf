//! Outbounds: where flows go. One registry of named outbounds — the built-ins (DIRECT, REJECT,
//! REJECT-DROP, PASS, COMPATIBLE), the configured proxies (SOCKS5, HTTP) and groups — that the
//! router, the API's proxy list and delay tests all use. A name resolves through groups to a
//! leaf ([`Outbounds::resolve`], with mihomo's `chains`), and a leaf dials TCP or opens a UDP
//! session ([`Outbounds::dial_tcp`], [`Outbounds::udp`]).

mod affinity;
mod breaker;
pub mod checks;
mod dial;
mod group;
pub mod health;
pub mod http;
mod registry;
pub mod socks5;
mod stream;
mod udp;

use std::{fmt, io, net::SocketAddr, time::Duration};

pub use dial::SocketOpts;
pub use group::{CheckSpec, Group, Pick, Strategy, destination_key};
pub use health::Health;
pub use registry::{Active, BUILTINS, GLOBAL, Node, Outbounds, proxy};

/// Names the registry always has: the built-ins and GLOBAL.
pub fn registry_names() -> &'static [&'static str] {
    &[
        "DIRECT",
        "REJECT",
        "REJECT-DROP",
        "PASS",
        "COMPATIBLE",
        "GLOBAL",
    ]
}
pub use stream::{Stream, Upstream};
pub use udp::UdpSession;

use crate::proto::socks5::Addr;

/// Why an outbound could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to {0}: timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("outbound socket for {0}: {1}")]
    Socket(SocketAddr, io::Error),
    #[error("resolving {0}: {1}")]
    Resolve(String, io::Error),
    #[error("{proxy}: {source}")]
    Proxy { proxy: String, source: io::Error },
    #[error("rejected by {0}")]
    Rejected(String),
    #[error("{0} does not carry UDP")]
    NoUdp(String),
    #[error("no outbound named `{0}`")]
    Unknown(String),
    #[error("groups nest deeper than {0} levels (a cycle?)")]
    TooDeep(usize),
}

impl Error {
    /// A bounded name for metrics: `timeout`, `refused`, `unreachable`, `connect`, `socket`,
    /// `resolve`, `proxy`, `rejected`, `no_udp`, `unknown`, `too_deep`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Timeout(..) => "timeout",
            Error::Connect(_, e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
            Error::Connect(_, e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable
                ) =>
            {
                "unreachable"
            }
            Error::Connect(..) => "connect",
            Error::Socket(..) => "socket",
            Error::Resolve(..) => "resolve",
            Error::Proxy { .. } => "proxy",
            Error::Rejected(_) => "rejected",
            Error::NoUdp(_) => "no_udp",
            Error::Unknown(_) => "unknown",
            Error::TooDeep(_) => "too_deep",
        }
    }

    /// The errno-like kind, for choosing a SOCKS reply or an HTTP status.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Error::Timeout(..) => io::ErrorKind::TimedOut,
            Error::Connect(_, e) | Error::Socket(_, e) | Error::Proxy { source: e, .. } => e.kind(),
            Error::Resolve(..) => io::ErrorKind::NotFound,
            Error::Rejected(_) => io::ErrorKind::PermissionDenied,
            _ => io::ErrorKind::Other,
        }
    }
}

/// Where to dial: an address, or a name (resolved by the last hop that needs an address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Ip(SocketAddr),
    Host(String, u16),
}

impl Target {
    pub fn port(&self) -> u16 {
        match self {
            Target::Ip(a) => a.port(),
            Target::Host(_, p) => *p,
        }
    }

    /// `host:port` with IPv6 in brackets, as CONNECT and Host headers write it.
    pub fn authority(&self) -> String {
        self.to_string()
    }

    pub fn socks(&self) -> Addr {
        match self {
            Target::Ip(a) => Addr::Ip(*a),
            Target::Host(h, p) => Addr::Domain(h.clone(), *p),
        }
    }
}

impl From<Addr> for Target {
    fn from(a: Addr) -> Target {
        match a {
            Addr::Ip(a) => Target::Ip(a),
            Addr::Domain(h, p) => Target::Host(h, p),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Ip(a) => write!(f, "{a}"),
            Target::Host(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// What a leaf outbound is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Direct,
    /// Answers with a reset (TCP) or drops (UDP).
    Reject,
    /// Holds the connection silently, then closes it.
    RejectDrop,
    /// As a rule's target: matching goes on with the next rule.
    Pass,
    /// Stands in for an empty group.
    Compatible,
    Socks5(Box<ProxySpec>),
    Http(Box<ProxySpec>),
}

/// A configured proxy's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySpec {
    pub server: String,
    pub port: u16,
    pub auth: Option<(String, String)>,
    /// TLS to the proxy: (server name, skip certificate verification).
    pub tls: Option<(String, bool)>,
    pub udp: bool,
    pub headers: Vec<(String, String)>,
    pub dialer_proxy: Option<String>,
}

/// A leaf outbound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub name: String,
    pub kind: Kind,
    pub opts: SocketOpts,
}

impl Proxy {
    /// The type Clash clients show.
    pub fn clash_type(&self) -> &'static str {
        match self.kind {
            Kind::Direct => "Direct",
            Kind::Reject => "Reject",
            Kind::RejectDrop => "RejectDrop",
            Kind::Pass => "Pass",
            Kind::Compatible => "Compatible",
            Kind::Socks5(_) => "Socks5",
            Kind::Http(_) => "Http",
        }
    }

    /// Whether UDP flows can use it.
    pub fn udp(&self) -> bool {
        match &self.kind {
            Kind::Socks5(spec) => spec.udp,
            Kind::Http(_) => false,
            _ => true,
        }
    }

    pub fn spec(&self) -> Option<&ProxySpec> {
        match &self.kind {
            Kind::Socks5(s) | Kind::Http(s) => Some(s),
            _ => None,
        }
    }
}
