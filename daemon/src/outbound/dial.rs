//! Opening sockets towards an address: `SO_MARK`, `SO_BINDTODEVICE`, TCP Fast Open, MPTCP,
//! the connect timeout, and resolving a name with the configured IP-version preference.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use super::{Error, Target};
use crate::config::IpVersion;

/// How sockets towards one outbound's peers are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOpts {
    pub mark: u32,
    pub device: Option<String>,
    pub connect_timeout: Duration,
    pub ip_version: IpVersion,
    pub tfo: bool,
    pub mptcp: bool,
}

impl SocketOpts {
    fn prepare(&self, socket: SockRef<'_>) -> io::Result<()> {
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        if let Some(device) = &self.device {
            socket.bind_device(Some(device.as_bytes()))?;
        }
        Ok(())
    }

    /// The addresses to try for `target`, in order.
    pub async fn addresses(&self, target: &Target) -> Result<Vec<SocketAddr>, Error> {
        let mut addrs: Vec<SocketAddr> = match target {
            Target::Ip(a) => return Ok(vec![*a]),
            Target::Host(host, port) => tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| Error::Resolve(host.clone(), e))?
                .collect(),
        };
        let v4 = |a: &SocketAddr| a.is_ipv4();
        match self.ip_version {
            IpVersion::Dual => {}
            IpVersion::Ipv4 => addrs.retain(v4),
            IpVersion::Ipv6 => addrs.retain(|a| !v4(a)),
            IpVersion::Ipv4Prefer => addrs.sort_by_key(|a| !v4(a)),
            IpVersion::Ipv6Prefer => addrs.sort_by_key(v4),
        }
        if addrs.is_empty() {
            return Err(Error::Resolve(
                target.to_string(),
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "no address of the wanted IP version",
                ),
            ));
        }
        Ok(addrs)
    }

    /// A TCP connection to `target`: each address in turn until one answers.
    pub async fn connect(&self, target: &Target) -> Result<TcpStream, Error> {
        let mut last = None;
        for addr in self.addresses(target).await? {
            match self.connect_addr(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| Error::Resolve(target.to_string(), io::ErrorKind::NotFound.into())))
    }

    async fn connect_addr(&self, dst: SocketAddr) -> Result<TcpStream, Error> {
        let socket = self.tcp_socket(dst).map_err(|e| Error::Socket(dst, e))?;
        match tokio::time::timeout(self.connect_timeout, socket.connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(Error::Connect(dst, e)),
            Err(_) => Err(Error::Timeout(dst, self.connect_timeout)),
        }
    }

    fn tcp_socket(&self, dst: SocketAddr) -> io::Result<TcpSocket> {
        let domain = socket2::Domain::for_address(dst);
        let protocol = if self.mptcp {
            socket2::Protocol::MPTCP
        } else {
            socket2::Protocol::TCP
        };
        // Non-blocking from the start, and close-on-exec (socket2 sets that on Linux): no
        // `fcntl` calls per dial.
        let stream = socket2::Type::STREAM.nonblocking();
        let socket = socket2::Socket::new(domain, stream, Some(protocol)).or_else(|e| {
            // A kernel without MPTCP: plain TCP.
            if self.mptcp {
                socket2::Socket::new(domain, stream, Some(socket2::Protocol::TCP))
            } else {
                Err(e)
            }
        })?;
        self.prepare(SockRef::from(&socket))?;
        socket.set_tcp_nodelay(true)?;
        if self.tfo {
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::TcpFastOpenConnect,
                &true,
            )?;
        }
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// A UDP socket connected to `dst`.
    pub async fn udp_connected(&self, dst: SocketAddr) -> Result<UdpSocket, Error> {
        let socket = self.udp_for(dst.ip()).await?;
        socket
            .connect(dst)
            .await
            .map_err(|e| Error::Connect(dst, e))?;
        Ok(socket)
    }

    /// An unconnected UDP socket of `ip`'s family.
    pub async fn udp_for(&self, ip: IpAddr) -> Result<UdpSocket, Error> {
        let any: SocketAddr = match ip {
            IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(any)
            .await
            .map_err(|e| Error::Socket(any, e))?;
        self.prepare(SockRef::from(&socket))
            .map_err(|e| Error::Socket(any, e))?;
        Ok(socket)
    }
}
