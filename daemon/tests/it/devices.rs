//! Devices from the kernel's neighbour table and a real dnsmasq-format lease file: flows from
//! a client's IPv4 address, its IPv6 address and a second IPv4 address it takes later are one
//! device (its MAC) with one history, named from the leases, with exact totals per period.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
};

use tpacct::config::AccountingMode;

use crate::common::{
    topo::{CLIENT4, CLIENT6, SERVER4, SERVER6, Topology, http, socket, with_prepared_gateway},
    upstreams::identify_server,
};

/// The client's MAC on its link to the gateway.
pub(crate) fn client_mac(topo: &Topology, link: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", &topo.client.name, "-j", "link", "show", link])
        .output()
        .expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    links[0]["address"].as_str().expect("address").to_owned()
}

/// `GET /<n>` from `from` to `to`; (bytes sent, bytes received).
pub(crate) fn fetch_from(
    topo: &Topology,
    from: SocketAddr,
    to: SocketAddr,
    n: usize,
) -> (u64, u64) {
    Topology::run_in(&topo.client, move || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        socket.bind(&from.into()).expect("bind the source");
        socket.connect(&to.into()).expect("connect");
        let mut conn: TcpStream = socket.into();
        let request = format!("GET /{n} HTTP/1.1\r\nHost: dev{n}.test\r\n\r\n");
        conn.write_all(request.as_bytes()).expect("request");
        let mut reply = Vec::new();
        conn.read_to_end(&mut reply).expect("reply");
        (request.len() as u64, reply.len() as u64)
    })
}

fn one_device_across_addresses_named_by_its_lease() {
    let leases = crate::common::api::state_dir("devices").join("dnsmasq.leases");
    std::fs::create_dir_all(leases.parent().expect("dir")).expect("dir");
    let lease_path = leases.clone();
    with_prepared_gateway(
        "devices",
        AccountingMode::Ebpf,
        move |c| c.dhcp_leases = Some(lease_path),
        |topo| {
            // dnsmasq's lease for the client, there before the gateway starts.
            let mac = client_mac(topo, "c0");
            std::fs::write(
                &leases,
                format!("1900000000 {mac} {CLIENT4} kitchen-laptop 01:{mac}\n"),
            )
            .expect("leases");
            mac
        },
        |topo, gw, mac| {
            identify_server(&topo.server, socket(SERVER4, 80));
            identify_server(&topo.server, socket(SERVER6, 80));
            let mut moved = Vec::new();
            moved.push(fetch_from(
                topo,
                socket(CLIENT4, 0),
                socket(SERVER4, 80),
                1_000,
            ));
            moved.push(fetch_from(
                topo,
                socket(CLIENT6, 0),
                socket(SERVER6, 80),
                2_000,
            ));
            // The device takes another address: still the same device.
            let added = Command::new("ip")
                .args([
                    "-n",
                    &topo.client.name,
                    "addr",
                    "add",
                    "10.91.1.3/24",
                    "dev",
                    "c0",
                ])
                .status()
                .expect("ip addr");
            assert!(added.success());
            moved.push(fetch_from(
                topo,
                socket("10.91.1.3", 0),
                socket(SERVER4, 80),
                3_000,
            ));
            crate::history::wait_committed(gw, 3);
            let (status, body) = http(topo, "GET", "/api/v1/devices");
            assert_eq!(status, 200, "{body}");
            let total: u64 = moved.iter().map(|(u, d)| u + d).sum();
            let up: u64 = moved.iter().map(|(u, _)| u).sum();
            let device = &body["data"][0];
            assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
            assert_eq!(device["device"], mac);
            assert_eq!(device["mac"], mac);
            assert_eq!(device["hostname"], "kitchen-laptop");
            assert_eq!(
                device["ips"],
                serde_json::json!(["10.91.1.2", "10.91.1.3", CLIENT6])
            );
            assert_eq!(device["connections"], 3);
            assert_eq!(device["upload"], up);
            for period in ["today", "month", "total"] {
                assert_eq!(device[period], total, "{period}");
            }
            let (_, body) = http(topo, "GET", "/api/v1/stats?type=group&group_by=device");
            assert_eq!(body["data"][0]["device"], mac);
            assert_eq!(body["data"][0]["total"], total);
        },
    );
}

crate::tests![root one_device_across_addresses_named_by_its_lease];
