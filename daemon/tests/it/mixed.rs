//! The mixed inbound with real clients: our own CONNECT and SOCKS5 clients moving exact byte
//! counts each way (0 B to 100 MiB), curl (HTTP proxy with credentials, socks5h), openssl
//! `s_client -proxy`, a Python SOCKS5 UDP client, two requests on one keep-alive connection,
//! 1,000 concurrent tunnels, and every kind of bad client, which never disturbs the others.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use tpacct::config::AccountingMode;

use crate::common::{
    topo::{Gateway, SERVER4, Topology, read_all, socket, spawn_in, with_gateway, write_pattern},
    upstreams::identify_server,
};

const PROXY: &str = "10.91.1.1:7890";

fn mixed(c: &mut tpacct::config::Config) {
    c.mixed_port = 7890;
    c.allow_lan = true;
    c.authentication = vec!["alice:wonder".into()];
    c.skip_auth_prefixes = vec!["10.91.1.0/28".parse().expect("net")];
}

/// A server that reads `up` bytes, then sends `down` bytes and closes.
fn exchange_server(topo: &Topology, port: u16, up: u64, down: u64) -> std::thread::JoinHandle<u64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = spawn_in(&topo.server, move || {
        let listener = TcpListener::bind(socket(SERVER4, port)).expect("bind");
        ready_tx.send(()).expect("ready");
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < up {
            let n = conn.read(&mut buf).expect("read");
            assert!(n > 0, "upload cut short at {got}");
            got += n as u64;
        }
        write_pattern(&mut conn, down);
        got
    });
    ready_rx.recv().expect("server");
    h
}

/// Opens a tunnel to `to` through the proxy with `how` (`connect` or `socks5`).
fn tunnel(how: &str, to: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(PROXY).expect("connect to the proxy");
    match how {
        "connect" => {
            c.write_all(format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes())
                .expect("CONNECT");
            let mut reply = [0u8; 39];
            c.read_exact(&mut reply).expect("reply");
            assert_eq!(&reply, b"HTTP/1.1 200 Connection established\r\n\r\n");
        }
        _ => {
            c.write_all(&[5, 1, 0]).expect("greeting");
            let mut m = [0u8; 2];
            c.read_exact(&mut m).expect("method");
            assert_eq!(m, [5, 0]);
            let SocketAddr::V4(v4) = to else {
                unreachable!()
            };
            let mut req = vec![5, 1, 0, 1];
            req.extend(v4.ip().octets());
            req.extend(v4.port().to_be_bytes());
            c.write_all(&req).expect("request");
            let mut reply = [0u8; 10];
            c.read_exact(&mut reply).expect("reply");
            assert_eq!(reply[1], 0, "succeeded");
        }
    }
    c
}

fn exact(topo: &Topology, gw: &Gateway, how: &str, up: u64, down: u64, port: u16) {
    let server = exchange_server(topo, port, up, down);
    let to = socket(SERVER4, port);
    let how2 = how.to_owned();
    let got = spawn_in(&topo.client, move || {
        let mut c = tunnel(&how2, to);
        write_pattern(&mut c, up);
        let got = read_all(&mut c).0;
        let _ = c.shutdown(Shutdown::Both);
        got
    })
    .join()
    .expect("client");
    assert_eq!(got, down, "{how}: the download arrived");
    assert_eq!(server.join().expect("server"), up);
    gw.wait_until(20, "the tunnel to close", |r| r.live_count() == 0);
    let closed = gw.registry.closed(1).remove(0);
    assert_eq!(
        (closed.traffic.upload, closed.traffic.download),
        (up, down),
        "{how} {up}/{down}: exactly the tunnelled bytes"
    );
    assert_eq!(closed.meta.inbound_name, "DEFAULT-MIXED");
    let kind = if how == "connect" { "HTTPS" } else { "Socks5" };
    assert_eq!(closed.meta.inbound_type, kind);
}

fn tunnels_count_exactly_the_tunnelled_bytes() {
    for mode in [AccountingMode::Ebpf, AccountingMode::Userspace] {
        with_gateway("mixed_exact", mode, mixed, |topo, gw| {
            let mut port = 7000;
            for how in ["connect", "socks5"] {
                for (up, down) in [(0, 0), (1, 1), (1 << 20, 3), (5, 1 << 20)] {
                    port += 1;
                    exact(topo, gw, how, up, down, port);
                }
            }
            if mode == AccountingMode::Ebpf {
                exact(topo, gw, "connect", 100 << 20, 100 << 20, 7100);
                exact(topo, gw, "socks5", 100 << 20, 100 << 20, 7101);
            }
        });
    }
}

fn curl(topo: &Topology, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &topo.client.name, "curl", "-s", "-m", "10"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn real_clients_through_the_proxy() {
    with_gateway(
        "mixed_clients",
        AccountingMode::Ebpf,
        |c| {
            mixed(c);
            // This client must authenticate.
            c.skip_auth_prefixes = vec![];
        },
        |topo, gw| {
            identify_server(&topo.server, socket(SERVER4, 80));
            identify_server(&topo.server, socket("10.91.2.2", 8080));
            let plain = format!("http://{SERVER4}/100");
            let (ok, body) = curl(
                topo,
                &[
                    "-w",
                    "%{http_code}",
                    "-o",
                    "/dev/null",
                    "--proxy",
                    &format!("http://{PROXY}"),
                    &plain,
                ],
            );
            assert!(ok && body == "407", "no credentials: {body}");
            let creds = format!("http://alice:wonder@{PROXY}");
            let (ok, body) = curl(topo, &["--proxy", &creds, &plain]);
            assert!(ok && body.len() == 100, "{body}");
            let (ok, body) = curl(
                topo,
                &[
                    "--proxy",
                    &format!("socks5h://alice:wonder@{PROXY}"),
                    &plain,
                ],
            );
            assert!(ok && body.len() == 100, "socks5h");
            let (ok, _) = curl(
                topo,
                &["--proxy", &format!("socks5h://alice:wrong@{PROXY}"), &plain],
            );
            assert!(!ok, "wrong password refused");
            // Two requests on one keep-alive connection: two flows, each with its host.
            gw.wait_until(10, "earlier flows", |r| r.live_count() == 0);
            let before = gw.registry.opened().0;
            let (ok, body) = curl(
                topo,
                &[
                    "--proxy",
                    &creds,
                    &plain,
                    "http://10.91.2.2:8080/7",
                    "-H",
                    "Connection: keep-alive",
                ],
            );
            assert!(ok && body.len() == 107, "{body}");
            gw.wait_until(10, "both requests", |r| {
                r.opened().0 == before + 2 && r.live_count() == 0
            });
            let two = gw.registry.closed(2);
            assert_eq!(two[0].meta.destination_port, 8080);
            assert_eq!(two[1].meta.destination_port, 80);
            assert!(two.iter().all(|c| c.meta.inbound_type == "HTTP"));
            assert!(
                two.iter()
                    .all(|c| c.meta.inbound_user.as_deref() == Some("alice"))
            );

            // openssl through an HTTP CONNECT tunnel (the server reads the hello and closes).
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let server = spawn_in(&topo.server, move || {
                let l = TcpListener::bind(socket(SERVER4, 443)).expect("bind");
                ready_tx.send(()).expect("ready");
                let (mut c, _) = l.accept().expect("accept");
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf);
            });
            ready_rx.recv().expect("the server is listening");
            let status = Command::new("ip")
                .args(["netns", "exec", &topo.client.name, "openssl", "s_client"])
                .args([
                    "-proxy",
                    PROXY,
                    "-proxy_user",
                    "alice",
                    "-proxy_pass",
                    "pass:wonder",
                ])
                .args([
                    "-connect",
                    &format!("{SERVER4}:443"),
                    "-servername",
                    "tunnel.test",
                ])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl");
            let _ = status;
            server.join().expect("server");
            gw.wait_until(10, "the TLS tunnel", |r| r.live_count() == 0);
            let tls = gw.registry.closed(1).remove(0);
            assert_eq!(tls.meta.inbound_type, "HTTPS");
            assert_eq!(
                tls.sniffed_host.as_deref(),
                Some("tunnel.test"),
                "sniffed inside the tunnel"
            );
        },
    );
}

/// A SOCKS5 UDP ASSOCIATE client in Python (its standard library only).
const UDP_CLIENT: &str = r#"
import socket, struct, sys
proxy, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctl = socket.create_connection((proxy.split(':')[0], int(proxy.split(':')[1])))
ctl.sendall(b'\x05\x01\x00'); assert ctl.recv(2) == b'\x05\x00'
ctl.sendall(b'\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00')
r = ctl.recv(10); assert r[1] == 0, r
relay = (socket.inet_ntoa(r[4:8]), struct.unpack('!H', r[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
head = b'\x00\x00\x00\x01' + socket.inet_aton(dst) + struct.pack('!H', port)
sent = got = 0
for size in (1, 100, 1200):
    u.sendto(head + b'q' * size, relay); sent += size
    data, _ = u.recvfrom(4096)
    assert data[:10] == head, data[:10]
    got += len(data) - 10
print(sent, got)
ctl.close()
"#;

fn socks5_udp_from_a_python_client() {
    with_gateway("mixed_udp", AccountingMode::Ebpf, mixed, |topo, gw| {
        crate::common::upstreams::udp_identify_server(&topo.server, socket(SERVER4, 5353));
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &topo.client.name,
                "python3",
                "-c",
                UDP_CLIENT,
                PROXY,
                SERVER4,
                "5353",
            ])
            .output()
            .expect("python3");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut nums = text
            .split_whitespace()
            .map(|n| n.parse::<u64>().expect("count"));
        let (sent, got) = (nums.next().expect("sent"), nums.next().expect("got"));
        gw.wait_until(10, "the association to end", |r| r.live_count() == 0);
        let flow = gw.registry.closed(1).remove(0);
        assert_eq!(flow.meta.network.as_str(), "udp");
        assert_eq!(
            (flow.traffic.upload, flow.traffic.download),
            (sent, got),
            "payload, not SOCKS headers"
        );
    });
}

fn bad_clients_get_their_answer_and_disturb_nobody() {
    with_gateway(
        "mixed_bad",
        AccountingMode::Ebpf,
        |c| {
            mixed(c);
            c.skip_auth_prefixes = vec![];
        },
        |topo, gw| {
            // A good long tunnel runs the whole time.
            let server = exchange_server(topo, 7200, 10, 20 << 20);
            let good = spawn_in(&topo.client, || {
                let mut c = TcpStream::connect(PROXY).expect("proxy");
                c.write_all(b"CONNECT 10.91.2.2:7200 HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6d29uZGVy\r\n\r\n")
                    .expect("connect");
                let mut reply = [0u8; 39];
                c.read_exact(&mut reply).expect("reply");
                std::thread::sleep(Duration::from_millis(300));
                c.write_all(&[1; 10]).expect("up");
                read_all(&mut c).0
            });
            let bad = |bytes: &'static [u8]| -> Vec<u8> {
                Topology::run_in(&topo.client, move || {
                    let mut c = TcpStream::connect(PROXY).expect("proxy");
                    c.set_read_timeout(Some(Duration::from_secs(15)))
                        .expect("timeout");
                    let _ = c.write_all(bytes);
                    let mut out = Vec::new();
                    let _ = c.read_to_end(&mut out);
                    out
                })
            };
            // Wrong credentials (SOCKS5 user/pass: status 1).
            assert_eq!(bad(b"\x05\x01\x02\x01\x05alice\x05wrong"), [5, 2, 1, 1]);
            // No acceptable method.
            assert_eq!(bad(b"\x05\x01\x00"), [5, 0xff]);
            // An unknown address type, after authenticating.
            let r = bad(b"\x05\x01\x02\x01\x05alice\x06wonder\x05\x01\x00\x09");
            assert_eq!(&r[..4], &[5, 2, 1, 0], "authenticated");
            assert_eq!(r[5], 8, "address type not supported");
            // BIND is not supported.
            let r =
                bad(b"\x05\x01\x02\x01\x05alice\x06wonder\x05\x02\x00\x01\x0a\x00\x00\x01\x00\x50");
            assert_eq!(r[5], 7, "command not supported");
            // HTTP without credentials, garbage, an oversized head.
            assert!(bad(b"GET http://a/ HTTP/1.1\r\n\r\n").starts_with(b"HTTP/1.1 407"));
            assert!(bad(b"\x16\x03\x01 garbage\r\n\r\n").starts_with(b"HTTP/1.1 400"));
            let mut huge = b"GET http://a/ HTTP/1.1\r\nX: ".to_vec();
            huge.resize(70 * 1024, b'a');
            let huge: &'static [u8] = huge.leak();
            assert!(bad(huge).starts_with(b"HTTP/1.1 400"), "oversized head");
            // A slowloris: half a greeting, then nothing: dropped after the handshake deadline.
            let started = std::time::Instant::now();
            assert!(bad(b"\x05\x02").is_empty());
            let took = started.elapsed();
            assert!(
                took >= Duration::from_secs(9) && took < Duration::from_secs(15),
                "dropped after {took:?}"
            );
            assert_eq!(
                good.join().expect("good tunnel"),
                20 << 20,
                "the good tunnel was untouched"
            );
            assert_eq!(server.join().expect("server"), 10);
            gw.wait_until(10, "flows", |r| r.live_count() == 0);
        },
    );
}

fn a_thousand_concurrent_tunnels() {
    with_gateway("mixed_1000", AccountingMode::Ebpf, mixed, |topo, gw| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        spawn_in(&topo.server, move || {
            let l = TcpListener::bind(socket(SERVER4, 7300)).expect("bind");
            ready_tx.send(()).expect("ready");
            for c in l.incoming().map_while(Result::ok).take(1000) {
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut b = [0u8; 4];
                    if c.read_exact(&mut b).is_ok() {
                        let _ = c.write_all(&b);
                        let _ = c.read(&mut b);
                    }
                });
            }
        });
        ready_rx.recv().expect("server");
        let conns = Topology::run_in(&topo.client, || {
            (0..1000)
                .map(|i| {
                    let mut c = tunnel(
                        if i % 2 == 0 { "connect" } else { "socks5" },
                        socket(SERVER4, 7300),
                    );
                    c.write_all(b"ping").expect("ping");
                    let mut b = [0u8; 4];
                    c.read_exact(&mut b).expect("pong");
                    c
                })
                .collect::<Vec<_>>()
        });
        gw.wait_until(20, "1000 live tunnels", |r| r.live_count() == 1000);
        drop(conns);
        gw.wait_until(30, "every tunnel to close", |r| r.live_count() == 0);
        let closed = gw.registry.closed(1000);
        assert!(
            closed
                .iter()
                .all(|c| (c.traffic.upload, c.traffic.download) == (4, 4))
        );
    });
}

crate::tests![
    root tunnels_count_exactly_the_tunnelled_bytes,
    root real_clients_through_the_proxy,
    root socks5_udp_from_a_python_client,
    root bad_clients_get_their_answer_and_disturb_nobody,
    root a_thousand_concurrent_tunnels,
];
