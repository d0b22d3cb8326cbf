//! Pure parsers for the first bytes a client sends: the TLS ClientHello's SNI and the HTTP/1
//! `Host` header. Bytes in, a verdict out; no I/O.

mod http;
mod tls;

pub use http::host as http_host;
pub use tls::server_name as tls_server_name;

/// What a parser made of the bytes it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The host name.
    Host(String),
    /// The bytes so far are a prefix of this protocol; more may tell.
    Incomplete,
    /// Not this protocol, or this protocol without a host.
    No,
}

/// Runs every parser allowed for the flow over `bytes`.
pub fn sniff(bytes: &[u8], tls: bool, http: bool) -> Sniffed {
    let mut verdict = Sniffed::No;
    for (on, parse) in [
        (tls, tls_server_name as fn(&[u8]) -> Sniffed),
        (http, http_host),
    ] {
        if !on {
            continue;
        }
        match parse(bytes) {
            found @ Sniffed::Host(_) => return found,
            Sniffed::Incomplete => verdict = Sniffed::Incomplete,
            Sniffed::No => {}
        }
    }
    verdict
}

/// A plausible DNS host name (what SNI and Host may carry), lower-cased. An IP literal is not
/// a name (mihomo ignores it too): the flow keeps its IP destination.
fn host_name(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?.trim().trim_end_matches('.');
    let ok = !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && text.parse::<std::net::IpAddr>().is_err();
    ok.then(|| text.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_are_not_host_names() {
        assert_eq!(host_name(b"10.0.0.1"), None);
        assert_eq!(host_name(b"::1"), None);
        assert_eq!(host_name(b"10.0.0.1."), None);
        assert_eq!(host_name(b"Example.COM"), Some("example.com".into()));
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: 192.168.1.1:8080\r\n\r\n"),
            Sniffed::No
        );
        assert_eq!(
            tls_server_name(&tls::tests::client_hello("203.0.113.9")),
            Sniffed::No
        );
    }
}
