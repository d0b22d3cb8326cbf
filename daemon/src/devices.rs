//! Devices (nlbwmon's idea): the device behind a flow's source address is its MAC from the
//! kernel's neighbour table (netlink), so it keeps one history across address changes, else
//! the address itself; its name comes from the config's `devices:` map or a DHCP lease file
//! (`dhcp-leases:` — dnsmasq, ISC dhcpd or Kea CSV). Lookups read a table that is rebuilt on
//! a miss when it is older than the flow.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use arc_swap::ArcSwap;
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

/// The table is read again at most this often.
const MIN_REFRESH: Duration = Duration::from_millis(50);
/// Names are read again when the table is older than this.
const NAMES_FRESH: Duration = Duration::from_secs(10);
/// Addresses remembered as misses at most (then forgotten all at once).
const MAX_MISSES: usize = 4096;

#[derive(Debug, Default)]
struct Table {
    /// Address → MAC (lower-case, colon-separated).
    macs: HashMap<IpAddr, String>,
    /// MAC or address → name, from the lease file.
    leased: HashMap<String, String>,
}

/// The devices the gateway has seen.
#[derive(Debug)]
pub struct Devices {
    table: ArcSwap<Table>,
    /// When the table was last read (monotonic, and wall clock to compare with flow starts).
    read_at: Mutex<Option<(Instant, SystemTime)>>,
    /// Addresses not in the table at their last lookup, and when.
    misses: Mutex<HashMap<IpAddr, SystemTime>>,
    leases: Option<PathBuf>,
    /// The config's names: MAC or address → name.
    fixed: HashMap<String, String>,
}

impl Devices {
    pub fn new(leases: Option<PathBuf>, fixed: &indexmap::IndexMap<String, String>) -> Devices {
        let devices = Devices {
            table: ArcSwap::default(),
            read_at: Mutex::new(None),
            misses: Mutex::default(),
            leases,
            fixed: fixed
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        };
        devices.refresh();
        devices
    }

    fn refresh(&self) {
        *self.read_at.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), SystemTime::now()));
        let macs = neighbours().unwrap_or_else(|e| {
            tracing::debug!("neighbour table: {e}");
            HashMap::new()
        });
        let leased = self
            .leases
            .as_deref()
            .map(|p| match std::fs::read_to_string(p) {
                Ok(text) => parse_leases(&text),
                Err(e) => {
                    tracing::debug!("dhcp-leases {}: {e}", p.display());
                    HashMap::new()
                }
            })
            .unwrap_or_default();
        self.table.store(Arc::new(Table { macs, leased }));
    }

    /// The device behind `ip`, whose flow began at `started`: its MAC when the neighbour
    /// table knows it, else the address. The table is read again on a miss unless it was read
    /// after the flow began (it would have known then) — so a new device is known by its MAC
    /// from its first flow, and a source that is no neighbour costs one read per flow start
    /// at most, and none within [`MIN_REFRESH`] of another.
    pub fn id(&self, ip: IpAddr, started: SystemTime) -> String {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            // This host: no neighbour to look for.
            return ip.to_string();
        }
        if let Some(mac) = self.table.load().macs.get(&ip) {
            return mac.clone();
        }
        let mut misses = self.misses.lock().unwrap_or_else(PoisonError::into_inner);
        if misses.get(&ip).is_some_and(|t| *t >= started) {
            return ip.to_string();
        }
        let read = *self.read_at.lock().unwrap_or_else(PoisonError::into_inner);
        let due = read.is_none_or(|(at, wall)| wall < started || at.elapsed() >= MIN_REFRESH);
        if due {
            self.refresh();
        }
        match self.table.load().macs.get(&ip) {
            Some(mac) => mac.clone(),
            None => {
                if misses.len() >= MAX_MISSES {
                    misses.clear();
                }
                misses.insert(ip, SystemTime::now());
                ip.to_string()
            }
        }
    }

    /// The device's name: the config's, else the lease file's.
    pub fn name(&self, device: &str) -> Option<String> {
        let stale = self
            .read_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|(t, _)| t.elapsed() >= NAMES_FRESH);
        if stale {
            self.refresh();
        }
        let key = device.to_ascii_lowercase();
        self.fixed
            .get(&key)
            .cloned()
            .or_else(|| self.table.load().leased.get(&key).cloned())
    }

    /// The lease file, if one is configured.
    pub fn leases(&self) -> Option<&Path> {
        self.leases.as_deref()
    }
}

fn mac(bytes: &[u8]) -> Option<String> {
    (bytes.len() == 6 && bytes.iter().any(|&b| b != 0)).then(|| {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    })
}

/// The kernel's neighbour table (IPv4 ARP and IPv6 ND): address → MAC.
fn neighbours() -> std::io::Result<HashMap<IpAddr, String>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_DUMP | NLM_F_REQUEST;
    let mut request = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetNeighbour(
            NeighbourMessage::default(),
        )),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut found = HashMap::new();
    let mut answer = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut answer[..], 0)?;
        let mut at = 0;
        while at < n {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[at..n])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
            let len = message.header.length as usize;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("{e:?}")));
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => {
                    let mut ip = None;
                    let mut lladdr = None;
                    for a in m.attributes {
                        match a {
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                                ip = Some(IpAddr::V4(v4));
                            }
                            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                                ip = Some(IpAddr::V6(v6));
                            }
                            NeighbourAttribute::LinkLayerAddress(l) => lladdr = mac(&l),
                            _ => {}
                        }
                    }
                    if let (Some(ip), Some(mac)) = (ip, lladdr) {
                        found.insert(ip.to_canonical(), mac);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

/// Names from a DHCP lease file: dnsmasq (`expiry mac ip name id`), ISC dhcpd
/// (`lease IP { hardware ethernet MAC; client-hostname "name"; }`) or Kea's CSV
/// (`address,hwaddr,…,hostname,…`). Keys are the MAC and the address, lower-case.
pub fn parse_leases(text: &str) -> HashMap<String, String> {
    let mut names = HashMap::new();
    let mut add = |mac: &str, ip: &str, name: &str| {
        let name = name.trim_matches('"').trim_end_matches('.');
        if name.is_empty() || name == "*" {
            return;
        }
        for key in [mac, ip] {
            if !key.is_empty() {
                names.insert(key.to_ascii_lowercase(), name.to_owned());
            }
        }
    };
    if text.contains("lease ") && text.contains('{') {
        // ISC dhcpd.
        for block in text.split("lease ").skip(1) {
            let ip = block.split_whitespace().next().unwrap_or("");
            let field = |key: &str| {
                block.lines().find_map(|l| {
                    l.trim()
                        .strip_prefix(key)
                        .map(|v| v.trim().trim_end_matches(';').trim().to_owned())
                })
            };
            let mac = field("hardware ethernet").unwrap_or_default();
            if let Some(name) = field("client-hostname") {
                add(&mac, ip, &name);
            }
        }
    } else if let Some(head) = text.lines().next().filter(|h| h.starts_with("address,")) {
        // Kea CSV: columns by the header's names.
        let cols: Vec<&str> = head.split(',').collect();
        let at = |name: &str| cols.iter().position(|c| *c == name);
        if let (Some(a), Some(h), Some(n)) = (at("address"), at("hwaddr"), at("hostname")) {
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split(',').collect();
                if let (Some(ip), Some(mac), Some(name)) = (f.get(a), f.get(h), f.get(n)) {
                    add(mac, ip, name);
                }
            }
        }
    } else {
        // dnsmasq.
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 4 && f[0].chars().all(|c| c.is_ascii_digit()) {
                add(f[1], f[2], f[3]);
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_lease_formats() {
        let dnsmasq = "1700000000 aa:bb:cc:00:00:01 192.168.1.10 laptop 01:aa:bb:cc:00:00:01\n\
                       1700000000 aa:bb:cc:00:00:02 192.168.1.11 * *\n";
        let n = parse_leases(dnsmasq);
        assert_eq!(
            n.get("aa:bb:cc:00:00:01").map(String::as_str),
            Some("laptop")
        );
        assert_eq!(n.get("192.168.1.10").map(String::as_str), Some("laptop"));
        assert!(
            !n.contains_key("aa:bb:cc:00:00:02"),
            "no name: none recorded"
        );
        let isc = "lease 192.168.1.20 {\n  starts 3 2026/11/23 10:00:00;\n  \
                   hardware ethernet AA:BB:CC:00:00:03;\n  client-hostname \"phone\";\n}\n";
        let n = parse_leases(isc);
        assert_eq!(
            n.get("aa:bb:cc:00:00:03").map(String::as_str),
            Some("phone")
        );
        let kea = "address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,\
                   hostname,state\n192.168.1.30,aa:bb:cc:00:00:04,,3600,1700000000,1,0,0,tv.,0\n";
        let n = parse_leases(kea);
        assert_eq!(n.get("192.168.1.30").map(String::as_str), Some("tv"));
    }

    #[test]
    fn the_kernel_neighbour_table_is_read() {
        // Whatever it holds here, the dump itself must work and give MACs in one format.
        let table = neighbours().unwrap_or_else(|e| panic!("{e}"));
        for mac in table.values() {
            assert_eq!(mac.len(), 17, "{mac}");
        }
    }
}
