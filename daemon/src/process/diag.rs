//! One socket by its 4-tuple through netlink `sock_diag` (`SOCK_DIAG_BY_FAMILY` with an exact
//! socket id): its cookie, owner uid and inode, without walking `/proc`.

use std::{
    net::SocketAddr,
    sync::{Mutex, PoisonError},
};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

use crate::flow::Network;

/// What the kernel says of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diag {
    pub cookie: u64,
    pub uid: u32,
    pub inode: u32,
}

/// A netlink socket for queries, opened on first use and kept.
#[derive(Debug, Default)]
pub struct SockDiag {
    socket: Mutex<Option<Socket>>,
}

impl SockDiag {
    /// The socket on this host whose local end is `local` and remote end `remote`; None when
    /// there is none (the client is on another machine) or the query failed.
    pub fn find(&self, network: Network, local: SocketAddr, remote: SocketAddr) -> Option<Diag> {
        let mut guard = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none() {
            *guard = open()
                .inspect_err(|e| tracing::debug!("sock_diag: {e}"))
                .ok();
        }
        let socket = guard.as_ref()?;
        let answer = query(socket, network, local, remote);
        if let Err(e) = &answer {
            tracing::debug!("sock_diag {local} → {remote}: {e}");
            // A socket left mid-answer would answer the next query with this one's reply.
            *guard = None;
        }
        answer.ok().flatten()
    }
}

fn open() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn query(
    socket: &Socket,
    network: Network,
    local: SocketAddr,
    remote: SocketAddr,
) -> std::io::Result<Option<Diag>> {
    let (local, remote) = (canonical(local), canonical(remote));
    let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: match network {
                Network::Tcp => IPPROTO_TCP,
                Network::Udp => IPPROTO_UDP,
            },
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match by the tuple alone.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut answer = vec![0u8; 8192];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&answer[..n])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
            let c = r.header.socket_id.cookie;
            let lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            let hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
            Some(Diag {
                cookie: (u64::from(hi) << 32) | u64::from(lo),
                uid: r.header.uid,
                inode: r.header.inode,
            })
        }
        // ENOENT: no such socket here.
        _ => None,
    })
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_local_tcp_connection_is_found_with_its_cookie_uid_and_inode() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let client =
            std::net::TcpStream::connect(listener.local_addr().unwrap_or_else(|e| panic!("{e}")))
                .unwrap_or_else(|e| panic!("{e}"));
        let (local, remote) = (
            client.local_addr().unwrap_or_else(|e| panic!("{e}")),
            client.peer_addr().unwrap_or_else(|e| panic!("{e}")),
        );
        let diag = SockDiag::default();
        let found = diag
            .find(Network::Tcp, local, remote)
            .unwrap_or_else(|| panic!("{local} → {remote} not found"));
        let link = std::fs::read_link(format!("/proc/self/fd/{}", client.as_raw_fd()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(link.to_string_lossy(), format!("socket:[{}]", found.inode));
        assert_eq!(found.uid, nix::unistd::geteuid().as_raw());
        let cookie = socket2::SockRef::from(&client)
            .cookie()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(found.cookie, cookie);
        // The other way round is the accepted socket; a port nobody uses is nothing.
        let unused = SocketAddr::new(local.ip(), 1);
        assert_eq!(diag.find(Network::Tcp, unused, remote), None);
    }
}
