//! Linux: IP_TRANSPARENT / IPV6_TRANSPARENT sockets, the original destination of TPROXY'd
//! datagrams (IP_RECVORIGDSTADDR), and reply sockets bound to a foreign address.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrStorage, recvmsg, setsockopt,
    sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::UdpSocket};

fn transparent(addr: &SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(*addr), ty, Some(protocol))?;
    socket.set_reuse_address(true)?;
    match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A listening TCP socket that accepts connections to any address TPROXY sends it.
pub(crate) fn transparent_tcp_listener(
    addr: SocketAddr,
    backlog: i32,
) -> io::Result<std::net::TcpListener> {
    let socket = transparent(&addr, Type::STREAM, Protocol::TCP)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// A UDP socket receiving TPROXY'd datagrams along with their original destination.
pub(crate) fn transparent_udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = transparent(&addr, Type::DGRAM, Protocol::UDP)?;
    match addr {
        SocketAddr::V4(_) => setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true)?,
        SocketAddr::V6(_) => setsockopt(&socket, sockopt::Ipv6OrigDstAddr, &true)?,
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A UDP socket bound to `local` (an address of some other host: the client's original
/// destination) and connected to `peer` (the client), so replies come from where the client
/// sent its datagrams. Later datagrams of the same conversation arrive on it too.
pub(crate) fn reply_socket(local: SocketAddr, peer: SocketAddr) -> io::Result<UdpSocket> {
    let socket = transparent(&local, Type::DGRAM, Protocol::UDP)?;
    socket.set_reuse_port(true)?;
    socket.bind(&local.into())?;
    socket.connect(&peer.into())?;
    UdpSocket::from_std(socket.into())
}

/// Extension for TPROXY UDP sockets: receive with the original destination.
pub(crate) trait TransparentUdp {
    /// Receives one datagram: (length, source, original destination).
    async fn recv_orig(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)>;
}

impl TransparentUdp for UdpSocket {
    async fn recv_orig(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
        loop {
            self.readable().await?;
            match self.try_io(Interest::READABLE, || recv_orig_once(self, buf)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

fn recv_orig_once(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, SocketAddr)> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let source = msg
        .address
        .as_ref()
        .and_then(storage_to_std)
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    let mut dest = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                dest = Some(SocketAddr::V4(SocketAddrV4::from(SockaddrIn::from(a))));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                dest = Some(SocketAddr::V6(SocketAddrV6::from(SockaddrIn6::from(a))));
            }
            _ => {}
        }
    }
    let dest = dest.ok_or_else(|| io::Error::other("datagram without its original destination"))?;
    Ok((msg.bytes, source, dest))
}

fn storage_to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Raises the soft open-files limit to the hard one: each relayed connection holds two
/// sockets and two pipes.
pub(crate) fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("raising the open-files limit to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("reading the open-files limit: {e}"),
    }
}
