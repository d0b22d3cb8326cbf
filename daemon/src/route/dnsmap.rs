//! Names without sniffing: the DNS answers tpacct relays are parsed and remembered as
//! IP → name for the record's TTL (bounded, least recently used dropped first), so a later
//! flow to that IP whose first bytes give no name (QUIC, SSH, games) still has its host, with
//! `dnsMode: mapping` as mihomo reports such names.

use std::{
    net::IpAddr,
    num::NonZeroUsize,
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType},
    rr::RData,
};

/// Entries kept at most.
pub const CAPACITY: usize = 65_536;
/// TTLs are clamped to this range.
const MIN_TTL: Duration = Duration::from_secs(60);
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// IP → (name, expiry).
#[derive(Debug)]
pub struct DnsMap {
    map: Mutex<lru::LruCache<IpAddr, (String, Instant)>>,
}

impl Default for DnsMap {
    fn default() -> Self {
        DnsMap::with_capacity(CAPACITY)
    }
}

impl DnsMap {
    pub fn with_capacity(n: usize) -> DnsMap {
        DnsMap {
            map: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    /// Records the addresses a DNS response gives for its question; returns how many.
    pub fn learn(&self, response: &[u8]) -> usize {
        let Ok(msg) = Message::from_vec(response) else {
            return 0;
        };
        if msg.message_type() != MessageType::Response {
            return 0;
        }
        let Some(question) = msg.queries().first() else {
            return 0;
        };
        let name = question
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if name.is_empty() {
            return 0;
        }
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut learned = 0;
        for record in msg.answers() {
            let ip = match record.data() {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            let ttl = Duration::from_secs(u64::from(record.ttl())).clamp(MIN_TTL, MAX_TTL);
            map.put(ip, (name.clone(), now + ttl));
            learned += 1;
        }
        learned
    }

    /// The name `ip` was last given for, if it has not expired.
    pub fn name(&self, ip: IpAddr) -> Option<String> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&ip) {
            Some((name, until)) if *until > Instant::now() => Some(name.clone()),
            Some(_) => {
                map.pop(&ip);
                None
            }
            None => None,
        }
    }

    /// Forgets every name (`POST /cache/dns/flush`).
    pub fn clear(&self) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };

    use super::*;

    fn response(name: &str, ips: &[[u8; 4]]) -> Vec<u8> {
        let mut msg = Message::new();
        msg.set_message_type(MessageType::Response);
        let qname = Name::from_str(name).expect("name");
        msg.add_query(Query::query(qname.clone(), RecordType::A));
        for ip in ips {
            msg.add_answer(Record::from_rdata(
                qname.clone(),
                300,
                RData::A(A::from(std::net::Ipv4Addr::from(*ip))),
            ));
        }
        msg.to_vec().expect("encode")
    }

    #[test]
    fn answers_map_addresses_to_the_question() {
        let map = DnsMap::default();
        assert_eq!(
            map.learn(&response(
                "Video.Example.com.",
                &[[203, 0, 113, 7], [203, 0, 113, 8]]
            )),
            2
        );
        assert_eq!(
            map.name("203.0.113.8".parse().expect("ip")),
            Some("video.example.com".into())
        );
        assert_eq!(map.name("203.0.113.9".parse().expect("ip")), None);
        assert_eq!(map.learn(b"not dns"), 0);
    }

    #[test]
    fn bounded_least_recently_used_first() {
        let map = DnsMap::with_capacity(2);
        map.learn(&response("a.test.", &[[10, 0, 0, 1]]));
        map.learn(&response("b.test.", &[[10, 0, 0, 2]]));
        assert!(map.name("10.0.0.1".parse().expect("ip")).is_some());
        map.learn(&response("c.test.", &[[10, 0, 0, 3]]));
        assert_eq!(map.len(), 2);
        assert_eq!(
            map.name("10.0.0.2".parse().expect("ip")),
            None,
            "least recently used"
        );
    }
}
