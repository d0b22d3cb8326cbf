//! Outbound dialers. DIRECT for now: connect with a timeout, `SO_MARK` = `routing-mark` so the
//! proxy's own connections are never captured again, optional `SO_BINDTODEVICE`.

use std::{io, net::SocketAddr, time::Duration};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::config::Config;

/// Why an outbound connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connect to {0}: timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("outbound socket for {0}: {1}")]
    Socket(SocketAddr, io::Error),
}

/// The DIRECT outbound.
#[derive(Debug, Clone)]
pub struct Direct {
    mark: u32,
    device: Option<String>,
    connect_timeout: Duration,
}

impl Direct {
    pub fn new(config: &Config) -> Direct {
        Direct {
            mark: config.routing_mark,
            device: config.interface_name.clone(),
            connect_timeout: config.connect_timeout.duration(),
        }
    }

    fn prepare(&self, socket: SockRef<'_>) -> io::Result<()> {
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        if let Some(device) = &self.device {
            socket.bind_device(Some(device.as_bytes()))?;
        }
        Ok(())
    }

    /// Opens a TCP connection to `dst`.
    pub async fn connect_tcp(&self, dst: SocketAddr) -> Result<TcpStream, Error> {
        let socket = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| Error::Socket(dst, e))?;
        self.prepare(SockRef::from(&socket))
            .map_err(|e| Error::Socket(dst, e))?;
        socket
            .set_nodelay(true)
            .map_err(|e| Error::Socket(dst, e))?;
        match tokio::time::timeout(self.connect_timeout, socket.connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => Err(Error::Connect(dst, e)),
            Err(_) => Err(Error::Timeout(dst, self.connect_timeout)),
        }
    }

    /// A UDP socket connected to `dst`.
    pub async fn connect_udp(&self, dst: SocketAddr) -> Result<UdpSocket, Error> {
        let any: SocketAddr = match dst {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(any)
            .await
            .map_err(|e| Error::Socket(dst, e))?;
        self.prepare(SockRef::from(&socket))
            .map_err(|e| Error::Socket(dst, e))?;
        socket
            .connect(dst)
            .await
            .map_err(|e| Error::Connect(dst, e))?;
        Ok(socket)
    }
}
