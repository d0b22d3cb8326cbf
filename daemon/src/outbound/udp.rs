//! UDP sessions towards a destination: DIRECT (a connected socket) or through a SOCKS5 proxy's
//! UDP ASSOCIATE (datagrams wrapped in the SOCKS5 header; the association ends with its control
//! connection). Sends never wait: a full socket buffer drops the datagram, as the network would.

use std::{cell::RefCell, io, net::SocketAddr};

use socket2::SockRef;
use tokio::{io::AsyncReadExt, net::UdpSocket};

use super::Upstream;
use crate::proto::socks5::{self as wire, Addr};

/// A UDP path to one destination.
#[derive(Debug)]
pub enum UdpSession {
    Direct(UdpSocket),
    Socks5 {
        /// The control connection: the association lives as long as it does.
        control: tokio::sync::Mutex<Upstream>,
        /// Connected to the proxy's relay address.
        socket: UdpSocket,
        /// The SOCKS5 header for the destination, prepended to every datagram.
        header: Vec<u8>,
        destination: Addr,
    },
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 65_536 + 300]);
}

impl UdpSession {
    pub(super) fn socks5(control: Upstream, socket: UdpSocket, destination: Addr) -> UdpSession {
        let mut header = Vec::new();
        wire::udp_header(&destination, &mut header);
        UdpSession::Socks5 {
            control: tokio::sync::Mutex::new(control),
            socket,
            header,
            destination,
        }
    }

    fn socket(&self) -> &UdpSocket {
        match self {
            UdpSession::Direct(s) | UdpSession::Socks5 { socket: s, .. } => s,
        }
    }

    /// The socket whose traffic this session is (for accounting an upstream leg).
    pub fn udp_socket(&self) -> &UdpSocket {
        self.socket()
    }

    /// Sends one datagram of payload now; its payload length when sent.
    pub fn send(&self, payload: &[u8]) -> io::Result<usize> {
        match self {
            UdpSession::Direct(s) => SockRef::from(s).send(payload),
            UdpSession::Socks5 { socket, header, .. } => SCRATCH.with_borrow_mut(|buf| {
                let total = header.len() + payload.len();
                if total > buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "datagram too large",
                    ));
                }
                buf[..header.len()].copy_from_slice(header);
                buf[header.len()..total].copy_from_slice(payload);
                SockRef::from(socket)
                    .send(&buf[..total])
                    .map(|n| n.saturating_sub(header.len()))
            }),
        }
    }

    /// Waits until a datagram may be waiting.
    pub async fn readable(&self) -> io::Result<()> {
        self.socket().readable().await
    }

    /// Receives one datagram's payload into the start of `buf` without waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            UdpSession::Direct(s) => s.try_recv(buf),
            UdpSession::Socks5 { socket, .. } => loop {
                let n = socket.try_recv(buf)?;
                match wire::parse_udp(&buf[..n]) {
                    Ok((_, at)) => {
                        buf.copy_within(at..n, 0);
                        return Ok(n - at);
                    }
                    // Not a SOCKS5 datagram: skip it.
                    Err(e) => tracing::debug!("socks5 udp: {e}"),
                }
            },
        }
    }

    /// Resolves when the session can no longer carry datagrams (a SOCKS5 association's control
    /// connection closed); never for DIRECT.
    pub async fn ended(&self) {
        match self {
            UdpSession::Direct(_) => std::future::pending().await,
            UdpSession::Socks5 { control, .. } => {
                let mut control = control.lock().await;
                let mut byte = [0u8; 1];
                // The proxy sends nothing on the control connection; EOF or an error ends it.
                loop {
                    match control.read(&mut byte).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    /// Where datagrams go, for the flow's `remoteDestination`.
    pub fn destination(&self) -> Option<SocketAddr> {
        match self {
            UdpSession::Direct(s) => s.peer_addr().ok(),
            UdpSession::Socks5 { destination, .. } => match destination {
                Addr::Ip(a) => Some(*a),
                Addr::Domain(..) => None,
            },
        }
    }
}
