//! `tpacctd top` against a real gateway: one frame as text shows the device by its name with
//! its address and bytes, the live flow with its destination and rule, and the flow count; the live
//! view in a real terminal (a pty from `script`) draws on the alternate screen and quits on
//! `q`, leaving the alternate screen.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use tpacct::config::AccountingMode;

use crate::common::{
    daemon::BIN,
    topo::{API, CLIENT4, SERVER4, Topology, socket, with_gateway},
    upstreams::{fetch, identify_server},
};

crate::tests![root one_frame_and_a_live_terminal_show_devices_and_flows];

fn top(gateway_ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", gateway_ns, BIN, "top", "--controller", API])
        .args(args);
    cmd
}

/// A child killed if the test fails before it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Killed {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Killed {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

fn one_frame_and_a_live_terminal_show_devices_and_flows() {
    with_gateway(
        "top",
        AccountingMode::Ebpf,
        |c| {
            c.devices
                .insert(CLIENT4.to_owned(), "kitchen-laptop".to_owned());
        },
        |topo, gw| {
            identify_server(&topo.server, socket(SERVER4, 80));
            fetch(&topo.client, socket(SERVER4, 80), "done", 5_000);
            const HALF: &[u8] = b"GET /1 HTTP/1.1\r\nHost: held.example\r\n";
            let _held = Topology::run_in(&topo.client, || {
                let mut c = TcpStream::connect(socket(SERVER4, 80)).expect("connect");
                c.write_all(HALF).expect("write");
                c
            });
            // Routed (by address: the sniffer gives up on the unfinished head).
            gw.wait_until(10, "one flow closed, one live and routed", |r| {
                matches!(&r.live()[..], [only] if only.flow.route().is_some())
                    && r.closed(10).len() == 1
            });

            let out = top(
                &topo.gateway.name,
                &["--once", "160x30", "--interval", "200"],
            )
            .output()
            .expect("tpacctd top --once");
            let frame = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{frame}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("{frame}");
            let line = |needle: &str| {
                frame
                    .lines()
                    .find(|l| l.contains(needle))
                    .unwrap_or_else(|| panic!("no {needle:?} in\n{frame}"))
                    .to_owned()
            };
            assert!(line("tpacctd top").contains(" 1 flows"), "{frame}");
            // The device, by the name the config gives its address, with that address.
            let device = line("kitchen-laptop");
            assert!(device.contains(CLIENT4), "{device}");
            // The live flow, to the server, from the client, matched by MATCH (mihomo calls it `Match`).
            let flow = line(&format!("{SERVER4}:80"));
            assert!(flow.contains(CLIENT4) && flow.contains("Match"), "{flow}");

            // The live view in a terminal: drawn, refreshed, left on `q`.
            let mut child = Command::new("script")
                .args(["-qfec"])
                .arg(format!(
                    "stty rows 30 cols 160; exec ip netns exec {} {BIN} top --controller {API} \
                     --interval 100",
                    topo.gateway.name
                ))
                .arg("/dev/null")
                .env("TERM", "xterm-256color")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("script");
            let mut stdout = child.stdout.take().expect("stdout");
            let mut child = Killed(child);
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
            let mut screen = Vec::new();
            let count = |screen: &[u8], needle: &str| {
                String::from_utf8_lossy(screen).matches(needle).count()
            };
            // A frame drawn (later ones redraw only what changed).
            let deadline = Instant::now() + Duration::from_secs(10);
            while count(&screen, "kitchen-laptop") < 1 || count(&screen, "Match") < 1 {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(bytes) => screen.extend(bytes),
                    Err(_) => panic!("no frame: {:?}", String::from_utf8_lossy(&screen)),
                }
            }
            child
                .stdin
                .as_mut()
                .expect("stdin")
                .write_all(b"q")
                .expect("q");
            let deadline = Instant::now() + Duration::from_secs(5);
            let status = loop {
                if let Some(s) = child.try_wait().expect("wait") {
                    break s;
                }
                assert!(Instant::now() < deadline, "top did not quit on q");
                std::thread::sleep(Duration::from_millis(20));
            };
            while let Ok(bytes) = rx.recv_timeout(Duration::from_millis(500)) {
                screen.extend(bytes);
            }
            assert!(status.success(), "{status}");
            let text = String::from_utf8_lossy(&screen);
            assert!(
                text.contains("\x1b[?1049h"),
                "never entered the alternate screen"
            );
            assert!(
                text.contains("\x1b[?1049l"),
                "never left the alternate screen"
            );
        },
    );
}
