//! Property tests (proptest) for what the mixed inbound parses from clients: HTTP request
//! heads, SOCKS5 addresses and UDP headers. Arbitrary and mutated input never panics or reads
//! past what it was given; valid input parses back to what was encoded, and any strict prefix
//! of it asks for more instead of failing. Bounded: a fixed number of cases per property.

use std::net::{IpAddr, SocketAddr};

use proptest::prelude::*;

use super::{MAX_HEAD, http::parse_head};
use crate::proto::socks5::{Addr, parse_udp, udp_header};

fn addr() -> impl Strategy<Value = Addr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(o, p)| Addr::Ip(SocketAddr::new(IpAddr::from(o), p))),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(o, p)| Addr::Ip(SocketAddr::new(IpAddr::from(o), p))),
        ("[a-z0-9-]{1,63}(\\.[a-z0-9-]{1,63}){0,3}", any::<u16>())
            .prop_filter("not an IP literal", |(h, _)| h.parse::<IpAddr>().is_err())
            .prop_map(|(h, p)| Addr::Domain(h, p)),
    ]
}

fn head() -> impl Strategy<Value = (String, String, Vec<u8>)> {
    let method = prop_oneof![Just("CONNECT"), Just("GET"), Just("POST"), Just("HEAD")];
    let target = "[a-z0-9.-]{1,40}:[0-9]{1,5}";
    let headers = proptest::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,60}"), 0..8);
    (method, target, headers).prop_map(|(m, t, hs)| {
        let mut text = format!("{m} {t} HTTP/1.1\r\n");
        for (k, v) in hs {
            text += &format!("{k}: {}\r\n", v.trim());
        }
        text += "\r\n";
        (m.to_owned(), t, text.into_bytes())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(Some(h)) = parse_head(&bytes) {
            prop_assert!(h.len <= bytes.len() && h.len <= MAX_HEAD);
        }
        if let Ok(Some((_, used))) = Addr::decode(&bytes) {
            prop_assert!(used <= bytes.len());
        }
        if let Ok((_, at)) = parse_udp(&bytes) {
            prop_assert!(at <= bytes.len());
        }
    }

    #[test]
    fn valid_heads_parse_and_their_prefixes_ask_for_more(
        (method, target, bytes) in head(),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut with_body = bytes.clone();
        with_body.extend(&tail);
        let h = parse_head(&with_body).expect("valid").expect("complete");
        prop_assert_eq!((h.method.as_str(), h.target.as_str(), h.len), (method.as_str(), target.as_str(), bytes.len()));
        for cut in 0..bytes.len() {
            prop_assert!(matches!(parse_head(&bytes[..cut]), Ok(None)), "prefix {cut}");
        }
    }

    #[test]
    fn mutated_heads_never_panic(
        (_, _, mut bytes) in head(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        for (i, b) in flips {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(Some(h)) = parse_head(&bytes) {
            prop_assert!(h.len <= bytes.len());
        }
    }

    #[test]
    fn socks_addresses_round_trip_and_prefixes_ask_for_more(a in addr(), payload in proptest::collection::vec(any::<u8>(), 0..32)) {
        let mut bytes = Vec::new();
        a.encode(&mut bytes);
        let encoded = bytes.len();
        bytes.extend(&payload);
        prop_assert_eq!(Addr::decode(&bytes), Ok(Some((a.clone(), encoded))));
        for cut in 0..encoded {
            prop_assert_eq!(Addr::decode(&bytes[..cut]), Ok(None), "prefix {}", cut);
        }
        let mut datagram = Vec::new();
        udp_header(&a, &mut datagram);
        datagram.extend(&payload);
        let (got, at) = parse_udp(&datagram).expect("valid UDP header");
        prop_assert_eq!((got, &datagram[at..]), (a, &payload[..]));
    }
}
