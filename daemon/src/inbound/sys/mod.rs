//! Socket plumbing the TPROXY inbound needs from the OS.

mod linux;

pub(crate) use linux::{
    TransparentUdp, raise_nofile_limit, reply_socket, transparent_tcp_listener,
    transparent_udp_socket,
};
