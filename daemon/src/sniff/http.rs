//! HTTP/1 request head → `Host` (port removed).

use super::{Sniffed, host_name};

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
/// Request heads longer than this are not worth waiting for.
const MAX_HEAD: usize = 8192;

/// The `Host` header of an HTTP/1 request head.
pub fn host(bytes: &[u8]) -> Sniffed {
    let prefix = &bytes[..bytes.len().min(8)];
    let method = METHODS
        .iter()
        .any(|m| m.starts_with(prefix) || bytes.starts_with(m));
    if bytes.is_empty() || !method {
        return Sniffed::No;
    }
    let Some(end) = find(bytes, b"\r\n\r\n") else {
        return if bytes.len() < MAX_HEAD {
            Sniffed::Incomplete
        } else {
            Sniffed::No
        };
    };
    for line in bytes[..end].split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"host") {
            continue;
        }
        let value = trim(&line[colon + 1..]);
        let name = match value.first() {
            // [v6]:port: an address, not a name.
            Some(b'[') => return Sniffed::No,
            _ => value.split(|&b| b == b':').next().unwrap_or(value),
        };
        return host_name(name).map_or(Sniffed::No, Sniffed::Host);
    }
    Sniffed::No
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_host_without_port() {
        let req = b"GET /x HTTP/1.1\r\nUser-Agent: t\r\nHOST: Example.COM:8080\r\n\r\n";
        assert_eq!(host(req), Sniffed::Host("example.com".into()));
    }

    #[test]
    fn partial_heads_wait_and_others_do_not() {
        assert_eq!(host(b"GE"), Sniffed::Incomplete);
        assert_eq!(host(b"GET / HTTP/1.1\r\nHost: a"), Sniffed::Incomplete);
        assert_eq!(host(b"SSH-2.0-OpenSSH\r\n"), Sniffed::No);
        assert_eq!(host(b"GET / HTTP/1.1\r\n\r\n"), Sniffed::No);
        assert_eq!(
            host(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Sniffed::No
        );
        assert_eq!(host(b""), Sniffed::No);
    }
}
