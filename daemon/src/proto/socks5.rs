//! The SOCKS5 wire format (RFC 1928, RFC 1929): addresses, the UDP datagram header, reply
//! codes. Pure encoding and bounded decoding; the client (outbound) and the server (mixed
//! inbound) both use it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const VERSION: u8 = 5;
pub const NO_AUTH: u8 = 0;
pub const USER_PASS: u8 = 2;
pub const NO_ACCEPTABLE: u8 = 0xff;
pub const CMD_CONNECT: u8 = 1;
pub const CMD_BIND: u8 = 2;
pub const CMD_UDP_ASSOCIATE: u8 = 3;
pub const ATYP_V4: u8 = 1;
pub const ATYP_DOMAIN: u8 = 3;
pub const ATYP_V6: u8 = 4;

/// Reply codes.
pub mod reply {
    pub const SUCCEEDED: u8 = 0;
    pub const GENERAL_FAILURE: u8 = 1;
    pub const NOT_ALLOWED: u8 = 2;
    pub const NETWORK_UNREACHABLE: u8 = 3;
    pub const HOST_UNREACHABLE: u8 = 4;
    pub const CONNECTION_REFUSED: u8 = 5;
    pub const TTL_EXPIRED: u8 = 6;
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    pub const ADDRESS_NOT_SUPPORTED: u8 = 8;
}

/// A SOCKS address: an IP socket address or a name and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    Ip(SocketAddr),
    Domain(String, u16),
}

impl Addr {
    pub fn port(&self) -> u16 {
        match self {
            Addr::Ip(a) => a.port(),
            Addr::Domain(_, p) => *p,
        }
    }

    /// Appends the ATYP-prefixed encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Addr::Ip(SocketAddr::V4(a)) => {
                out.push(ATYP_V4);
                out.extend(a.ip().octets());
            }
            Addr::Ip(SocketAddr::V6(a)) => {
                out.push(ATYP_V6);
                out.extend(a.ip().octets());
            }
            Addr::Domain(host, _) => {
                out.push(ATYP_DOMAIN);
                let bytes = &host.as_bytes()[..host.len().min(255)];
                out.push(bytes.len() as u8);
                out.extend(bytes);
            }
        }
        out.extend(self.port().to_be_bytes());
    }

    /// Decodes an ATYP-prefixed address at the start of `bytes`: (address, bytes used).
    /// `Ok(None)`: more bytes are needed.
    pub fn decode(bytes: &[u8]) -> Result<Option<(Addr, usize)>, &'static str> {
        let Some(&atyp) = bytes.first() else {
            return Ok(None);
        };
        let (len, at) = match atyp {
            ATYP_V4 => (4, 1),
            ATYP_V6 => (16, 1),
            ATYP_DOMAIN => match bytes.get(1) {
                Some(&n) if n > 0 => (usize::from(n), 2),
                Some(_) => return Err("empty domain name"),
                None => return Ok(None),
            },
            _ => return Err("unknown address type"),
        };
        let end = at + len + 2;
        if bytes.len() < end {
            return Ok(None);
        }
        let port = u16::from_be_bytes([bytes[end - 2], bytes[end - 1]]);
        let raw = &bytes[at..at + len];
        let addr = match atyp {
            ATYP_V4 => {
                let o: [u8; 4] = raw.try_into().map_err(|_| "short address")?;
                Addr::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), port))
            }
            ATYP_V6 => {
                let o: [u8; 16] = raw.try_into().map_err(|_| "short address")?;
                Addr::Ip(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
            }
            _ => {
                let name = std::str::from_utf8(raw).map_err(|_| "domain name is not UTF-8")?;
                match name.parse::<IpAddr>() {
                    Ok(ip) => Addr::Ip(SocketAddr::new(ip, port)),
                    Err(_) => Addr::Domain(name.to_ascii_lowercase(), port),
                }
            }
        };
        Ok(Some((addr, end)))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Ip(a) => write!(f, "{a}"),
            Addr::Domain(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// The UDP request header: `RSV(2) FRAG(1) ADDR` before the payload.
pub fn udp_header(addr: &Addr, out: &mut Vec<u8>) {
    out.extend([0, 0, 0]);
    addr.encode(out);
}

/// Splits a SOCKS5 UDP datagram into its address and payload offset; fragments are refused.
pub fn parse_udp(datagram: &[u8]) -> Result<(Addr, usize), &'static str> {
    if datagram.len() < 4 {
        return Err("short datagram");
    }
    if datagram[2] != 0 {
        return Err("fragmented datagrams are not supported");
    }
    match Addr::decode(&datagram[3..])? {
        Some((addr, used)) => Ok((addr, 3 + used)),
        None => Err("short datagram"),
    }
}

/// A reply: `VER REP RSV ADDR`.
pub fn reply_bytes(code: u8, bound: &Addr) -> Vec<u8> {
    let mut out = vec![VERSION, code, 0];
    bound.encode(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for addr in [
            Addr::Ip("10.1.2.3:80".parse().expect("addr")),
            Addr::Ip("[fd00::1]:443".parse().expect("addr")),
            Addr::Domain("example.com".into(), 8080),
        ] {
            let mut buf = Vec::new();
            addr.encode(&mut buf);
            buf.extend(b"rest");
            let (back, used) = Addr::decode(&buf).expect("valid").expect("complete");
            assert_eq!((back, &buf[used..]), (addr, &b"rest"[..]));
            for cut in 0..used {
                assert_eq!(Addr::decode(&buf[..cut]).ok(), Some(None), "cut {cut}");
            }
        }
        assert!(Addr::decode(&[9, 1, 2]).is_err());
    }

    #[test]
    fn udp_headers() {
        let mut d = Vec::new();
        udp_header(&Addr::Domain("a.b".into(), 53), &mut d);
        d.extend(b"payload");
        let (addr, at) = parse_udp(&d).expect("datagram");
        assert_eq!(
            (addr, &d[at..]),
            (Addr::Domain("a.b".into(), 53), &b"payload"[..])
        );
        d[2] = 1;
        assert!(parse_udp(&d).is_err(), "fragments");
    }
}
