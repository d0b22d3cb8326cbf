//! Parsing a packet on a LAN interface into its flow key, TCP flags, sequence number and
//! payload length.

use aya_ebpf::programs::TcContext;
use tpacct_common::{AF_INET, AF_INET6, fastpath::FlowKey};

pub(super) const ETH_HLEN: usize = 14;
pub(super) const ETH_P_IP: u16 = 0x0800;
pub(super) const ETH_P_IPV6: u16 = 0x86dd;
pub(super) const IPPROTO_TCP: u8 = 6;
pub(super) const IPPROTO_UDP: u8 = 17;
pub(super) const TCP_FIN: u8 = 0x01;
pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_RST: u8 = 0x04;
pub(super) const TCP_ACK: u8 = 0x10;

/// What a packet says about its flow.
pub(super) struct Packet {
    pub(super) key: FlowKey,
    /// TCP flags (0 for UDP).
    pub(super) flags: u8,
    pub(super) seq: u32,
    pub(super) payload: u32,
}

fn load<T>(ctx: &TcContext, at: usize) -> Option<T> {
    ctx.load::<T>(at).ok()
}

/// Parses Ethernet + IPv4/IPv6 (extension headers skipped) + TCP/UDP. The key is oriented
/// client → server: `upload` packets are the client's, the others the server's.
pub(super) fn parse(ctx: &TcContext, upload: bool) -> Option<Packet> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let mut src = [0u32; 4];
    let mut dst = [0u32; 4];
    let (family, mut proto, l4, ip_payload) = match ethertype {
        ETH_P_IP => {
            let first: u8 = load(ctx, ETH_HLEN)?;
            let ihl = usize::from(first & 0x0f) * 4;
            let frag = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
            if frag & 0x1fff != 0 {
                return None;
            }
            let tot = u32::from(u16::from_be(load::<u16>(ctx, ETH_HLEN + 2)?));
            // IPv4 BIG TCP: tot_len 0, the length is the skb's.
            let tot = if tot == 0 {
                ctx.len().saturating_sub(ETH_HLEN as u32)
            } else {
                tot
            };
            src[0] = load(ctx, ETH_HLEN + 12)?;
            dst[0] = load(ctx, ETH_HLEN + 16)?;
            let proto: u8 = load(ctx, ETH_HLEN + 9)?;
            (
                AF_INET,
                proto,
                ETH_HLEN + ihl,
                tot.saturating_sub(ihl as u32),
            )
        }
        ETH_P_IPV6 => {
            let plen = u32::from(u16::from_be(load::<u16>(ctx, ETH_HLEN + 4)?));
            let plen = if plen == 0 {
                ctx.len().saturating_sub(ETH_HLEN as u32 + 40)
            } else {
                plen
            };
            src = load(ctx, ETH_HLEN + 8)?;
            dst = load(ctx, ETH_HLEN + 24)?;
            let mut next: u8 = load(ctx, ETH_HLEN + 6)?;
            let mut at = ETH_HLEN + 40;
            let mut left = plen;
            for _ in 0..4 {
                let len = match next {
                    // Hop-by-hop, routing, destination options.
                    0 | 43 | 60 => (usize::from(load::<u8>(ctx, at + 1)?) + 1) * 8,
                    // Fragment: only a first fragment carries the transport header.
                    44 => {
                        let off = u16::from_be(load::<u16>(ctx, at + 2)?);
                        if off & 0xfff8 != 0 {
                            return None;
                        }
                        8
                    }
                    _ => break,
                };
                next = load(ctx, at)?;
                at += len;
                left = left.saturating_sub(len as u32);
            }
            (AF_INET6, next, at, left)
        }
        _ => return None,
    };
    let (sport, dport) = (
        u16::from_be(load::<u16>(ctx, l4)?),
        u16::from_be(load::<u16>(ctx, l4 + 2)?),
    );
    let (flags, seq, payload) = match proto {
        IPPROTO_TCP => {
            let doff = u32::from(load::<u8>(ctx, l4 + 12)? >> 4) * 4;
            let flags: u8 = load(ctx, l4 + 13)?;
            let seq = u32::from_be(load::<u32>(ctx, l4 + 4)?);
            (flags, seq, ip_payload.saturating_sub(doff))
        }
        // The UDP header's length: a fragmented datagram's first fragment carries the whole
        // datagram's (the other fragments have no header and are not looked at).
        IPPROTO_UDP => (
            0,
            0,
            u32::from(u16::from_be(load::<u16>(ctx, l4 + 4)?)).saturating_sub(8),
        ),
        _ => return None,
    };
    proto = if proto == IPPROTO_TCP {
        IPPROTO_TCP
    } else {
        IPPROTO_UDP
    };
    let key = if upload {
        FlowKey {
            client: src,
            server: dst,
            client_port: sport,
            server_port: dport,
            family: family as u8,
            proto,
            _pad: [0; 2],
        }
    } else {
        FlowKey {
            client: dst,
            server: src,
            client_port: dport,
            server_port: sport,
            family: family as u8,
            proto,
            _pad: [0; 2],
        }
    };
    Some(Packet {
        key,
        flags,
        seq,
        payload,
    })
}
