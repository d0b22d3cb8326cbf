//! TLS ClientHello → server_name extension (RFC 6066, host_name type).

use super::{Sniffed, host_name};

const HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const SERVER_NAME: u16 = 0;

/// Reads big-endian fields from a slice, failing past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n.into())
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n.into())
    }
}

/// The SNI host name of a ClientHello starting at `bytes`.
pub fn server_name(bytes: &[u8]) -> Sniffed {
    // Record header: type, version (3.x), length.
    match bytes {
        [] => return Sniffed::No,
        [t, ..] if *t != HANDSHAKE => return Sniffed::No,
        [_, major, ..] if *major != 3 => return Sniffed::No,
        _ if bytes.len() < 5 => return Sniffed::Incomplete,
        _ => {}
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    let record = &bytes[5..];
    // The hello may span records; the first one almost always holds the extensions. Parse
    // what is there and ask for more only if it ends early.
    let available = &record[..record.len().min(record_len)];
    match parse_hello(available) {
        Some(found) => found,
        None if record.len() < record_len => Sniffed::Incomplete,
        None => Sniffed::No,
    }
}

/// None: the bytes ended before the answer.
fn parse_hello(b: &[u8]) -> Option<Sniffed> {
    let mut r = Reader(b);
    if r.u8()? != CLIENT_HELLO {
        return Some(Sniffed::No);
    }
    let _length = r.u24()?;
    r.take(2 + 32)?; // version, random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut exts = Reader(r.vec16()?);
    while let Some(kind) = exts.u16() {
        let body = exts.vec16()?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut list = Reader(body);
        let mut names = Reader(list.vec16()?);
        while let Some(name_type) = names.u8() {
            let name = names.vec16()?;
            if name_type == 0 {
                return Some(host_name(name).map_or(Sniffed::No, Sniffed::Host));
            }
        }
        return Some(Sniffed::No);
    }
    Some(Sniffed::No)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal but well-formed ClientHello carrying `sni`.
    pub(crate) fn client_hello(sni: &str) -> Vec<u8> {
        let mut sni_ext = Vec::new();
        let name = sni.as_bytes();
        let entry_len = 1 + 2 + name.len();
        sni_ext.extend((entry_len as u16).to_be_bytes());
        sni_ext.push(0);
        sni_ext.extend((name.len() as u16).to_be_bytes());
        sni_ext.extend(name);
        let mut exts = Vec::new();
        exts.extend(10u16.to_be_bytes()); // supported_groups, before SNI
        exts.extend(4u16.to_be_bytes());
        exts.extend([0, 2, 0, 29]);
        exts.extend(SERVER_NAME.to_be_bytes());
        exts.extend((sni_ext.len() as u16).to_be_bytes());
        exts.extend(sni_ext);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![CLIENT_HELLO];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![HANDSHAKE, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn finds_sni() {
        let hello = client_hello("Sniffed.Example.org");
        assert_eq!(
            server_name(&hello),
            Sniffed::Host("sniffed.example.org".into())
        );
    }

    #[test]
    fn every_prefix_is_incomplete_never_wrong() {
        let hello = client_hello("a.example");
        for cut in 1..hello.len() {
            assert_eq!(
                server_name(&hello[..cut]),
                Sniffed::Incomplete,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn other_bytes_are_not_tls() {
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n"), Sniffed::No);
        assert_eq!(server_name(&[22, 2, 0]), Sniffed::No);
        assert_eq!(server_name(&[]), Sniffed::No);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 1;
        for len in 0..600 {
            let mut buf = vec![22u8, 3, 1, 2, 0];
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf.push(x as u8);
            }
            let _ = server_name(&buf);
        }
    }
}
