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
        Message::from_vec(response).map_or(0, |msg| self.learn_message(&msg))
    }

    fn learn_message(&self, msg: &Message) -> usize {
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

/// DNS over TCP as it passes to the client: 2-byte length-prefixed answers, each learned
/// when complete. Buffers at most one message (64 KiB); a stream that does not frame as DNS
/// stops being looked at.
#[derive(Debug)]
pub struct TcpAnswers {
    map: std::sync::Arc<DnsMap>,
    buf: Vec<u8>,
    broken: bool,
}

impl TcpAnswers {
    pub fn new(map: std::sync::Arc<DnsMap>) -> TcpAnswers {
        TcpAnswers {
            map,
            buf: Vec::new(),
            broken: false,
        }
    }

    /// Takes the next bytes the server sent.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !self.broken && !bytes.is_empty() {
            let want = match self.buf.get(..2) {
                Some(&[hi, lo]) => 2 + usize::from(u16::from_be_bytes([hi, lo])),
                _ => 2,
            };
            let take = (want - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == 2 && want == 2 {
                // The length is known now; a zero-length message is not DNS.
                self.broken = self.buf == [0, 0];
                continue;
            }
            if self.buf.len() == want {
                match Message::from_vec(&self.buf[2..]) {
                    Ok(msg) => {
                        self.map.learn_message(&msg);
                    }
                    Err(_) => self.broken = true,
                }
                self.buf.clear();
            }
        }
        if self.broken {
            self.buf = Vec::new();
        }
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
    fn tcp_answers_are_learned_across_any_split_and_junk_stops_the_parser() {
        let map = std::sync::Arc::new(DnsMap::default());
        let mut stream = Vec::new();
        for (name, ip) in [("one.test.", [10, 0, 0, 1]), ("two.test.", [10, 0, 0, 2])] {
            let msg = response(name, &[ip]);
            stream.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            stream.extend_from_slice(&msg);
        }
        for split in [1, 2, 3, 7, stream.len()] {
            map.clear();
            let mut answers = TcpAnswers::new(map.clone());
            stream.chunks(split).for_each(|c| answers.feed(c));
            assert_eq!(
                map.name("10.0.0.1".parse().expect("ip")),
                Some("one.test".into())
            );
            assert_eq!(
                map.name("10.0.0.2".parse().expect("ip")),
                Some("two.test".into())
            );
        }
        map.clear();
        let mut answers = TcpAnswers::new(map.clone());
        answers.feed(b"\x00\x05hello");
        answers.feed(&stream);
        assert!(
            map.is_empty(),
            "nothing is learned after a message that is not DNS"
        );
        assert!(answers.buf.capacity() == 0);
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
