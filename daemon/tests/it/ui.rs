//! The usage page in a real browser (Debian's chromium, headless, driven by Playwright for
//! Python): known transfers from two devices are on its cards to the byte, group-by and
//! interval change its charts, a click on a device narrows the page to that device, and no
//! error reaches the console. Screenshots go to `target/ui-screenshots/`. And `external-ui`:
//! a dashboard folder's files with their content types, nothing from outside it.

use std::{io::Write, path::PathBuf, process::Command};

use tpacct::config::AccountingMode;

use crate::{
    common::{
        topo::{API, CLIENT4, SERVER4, Topology, socket, with_prepared_gateway},
        upstreams::identify_server,
    },
    devices::{client_mac, fetch_from},
};

crate::tests![root the_usage_page_shows_exact_totals_and_narrows_to_a_device, root external_ui_serves_a_folder_and_nothing_outside_it];

const SECRET: &str = "ui-secret";
/// The second device: its own MAC (a macvlan on the client's link) and address.
const SECOND4: &str = "10.91.1.9";
const SECOND_MAC: &str = "02:00:00:00:00:09";

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {args:?}");
}

fn the_usage_page_shows_exact_totals_and_narrows_to_a_device() {
    with_prepared_gateway(
        "ui",
        AccountingMode::Ebpf,
        |c| {
            c.secret = Some(SECRET.to_owned());
            c.devices
                .insert(SECOND_MAC.to_owned(), "living-room-tv".to_owned());
        },
        |topo| {
            let ns = topo.client.name.clone();
            ip(&[
                "-n", &ns, "link", "add", "c9", "address", SECOND_MAC, "link", "c0", "type",
                "macvlan", "mode", "bridge",
            ]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{SECOND4}/32"),
                "dev",
                "c9",
            ]);
            ip(&["-n", &ns, "link", "set", "c9", "up"]);
            // Its packets leave by its own link, and only it answers ARP for its address, so
            // the gateway's neighbour table has its MAC: a second device on the same LAN.
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "10.91.1.1",
                "dev",
                "c9",
                "table",
                "109",
            ]);
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                "10.91.1.1",
                "dev",
                "c9",
                "table",
                "109",
            ]);
            ip(&["-n", &ns, "rule", "add", "from", SECOND4, "table", "109"]);
            for key in [
                "net.ipv4.conf.all.arp_ignore=1",
                "net.ipv4.conf.all.arp_announce=2",
            ] {
                let status = Command::new("ip")
                    .args(["netns", "exec", &ns, "sysctl", "-qw", key])
                    .status()
                    .expect("sysctl");
                assert!(status.success(), "{key}");
            }
        },
        |topo, gw, ()| {
            identify_server(&topo.server, socket(SERVER4, 80));
            let first = [
                fetch_from(topo, socket(CLIENT4, 0), socket(SERVER4, 80), 1_000),
                fetch_from(topo, socket(CLIENT4, 0), socket(SERVER4, 80), 250_000),
            ];
            let second = [fetch_from(
                topo,
                socket(SECOND4, 0),
                socket(SERVER4, 80),
                40_000,
            )];
            crate::history::wait_committed(gw, 3);
            // And one still open: a range that ends now counts it to the byte.
            let held = Topology::run_in(&topo.client, || {
                let mut conn = std::net::TcpStream::connect(socket(SERVER4, 80)).expect("connect");
                conn.write_all(b"GET /held").expect("write");
                conn
            });
            gw.wait_until(10, "the held flow's bytes", |r| {
                r.live().iter().any(|f| f.traffic.upload == 9)
            });
            let sum = |moved: &[(u64, u64)]| {
                let (up, down) = moved.iter().fold((0, 0), |(u, d), (a, b)| (u + a, d + b));
                serde_json::json!({"count": moved.len(), "total": up + down, "download": down, "upload": up})
            };
            let all: Vec<(u64, u64)> = first
                .iter()
                .chain(&second)
                .chain(&[(9, 0)])
                .copied()
                .collect();
            let mac = client_mac(topo, "c0");
            let out = Command::new("ip")
                .args(["netns", "exec", &topo.gateway.name, "python3"])
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/ui_page.py"))
                .args([&format!("http://{API}/ui/"), SECRET, SECOND_MAC])
                .arg(screenshots())
                .output()
                .expect("python3 with playwright (cargo xtask setup installs it)");
            assert!(
                out.status.success(),
                "the page script failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let page: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("the script's JSON");
            let steps = &page["steps"];
            assert_eq!(page["console"], serde_json::json!([]), "console: {page}");
            assert_eq!(steps["wrong_secret"], "the secret was refused");
            assert_eq!(steps["cards"], sum(&all), "{page}");
            assert_eq!(steps["reopened_cards"], sum(&all), "{page}");
            let total = all.iter().map(|(u, d)| u + d).sum::<u64>();
            assert!(
                steps["card_text"]
                    .as_str()
                    .is_some_and(|t| t.replace(',', "") == format!("{total} B")),
                "{page}"
            );
            // The largest first: the first device (two transfers) then the second.
            assert_eq!(
                steps["bars_device"],
                serde_json::json!([mac, SECOND_MAC]),
                "{page}"
            );
            assert_eq!(
                steps["devices_table"],
                serde_json::json!([mac, SECOND_MAC]),
                "{page}"
            );
            assert_eq!(
                steps["bars_host"],
                // The held flow has sent no whole request yet: no name, its address.
                serde_json::json!(["dev250000.test", "dev40000.test", "dev1000.test", SERVER4]),
                "{page}"
            );
            assert_eq!(steps["series_interval"], "minute");
            let flows: u64 = steps["series_flows"]
                .as_array()
                .expect("bars")
                .iter()
                .filter_map(|t| t.as_str()?.split(": ").nth(1)?.strip_suffix(" flows"))
                .map(|n| n.parse::<u64>().expect("a count"))
                .sum();
            assert_eq!(flows, 4, "{page}");
            assert!(
                steps["minute_points"].as_u64() > steps["hour_points"].as_u64(),
                "every minute of the hour against every hour of the day: {page}"
            );
            drop(held);
            assert_eq!(steps["filtered_cards"], sum(&second), "{page}");
            assert_eq!(steps["chips"], serde_json::json!(["device"]));
            assert_eq!(
                steps["filtered_bars"],
                serde_json::json!([SECOND_MAC]),
                "{page}"
            );
            assert!(steps["theme"].is_string(), "{page}");
            assert_eq!(
                steps["phone_overflow"], false,
                "the page is wider than a phone"
            );
        },
    );
}

/// `GET path` on the controller from inside the gateway: (status, content type, body).
fn get(topo: &Topology, path: &str) -> (u16, String, Vec<u8>) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.gateway.name,
            "curl",
            "-s",
            "--path-as-is",
        ])
        .args(["-o", "-", "-w", "\n%{http_code} %{content_type}"])
        .arg(format!("http://{API}{path}"))
        .output()
        .expect("curl");
    let text = out.stdout;
    let cut = text.iter().rposition(|&b| b == b'\n').expect("status line");
    let tail = String::from_utf8_lossy(&text[cut + 1..]).into_owned();
    let (status, kind) = tail.split_once(' ').unwrap_or((&tail, ""));
    (
        status.parse().expect("status"),
        kind.to_owned(),
        text[..cut].to_vec(),
    )
}

fn external_ui_serves_a_folder_and_nothing_outside_it() {
    let base = crate::common::api::state_dir("ui_external");
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("ui/xd");
    std::fs::create_dir_all(root.join("assets")).expect("dirs");
    std::fs::write(root.join("index.html"), "<!doctype html><title>xd</title>").expect("index");
    std::fs::write(root.join("assets/app 1.js"), "console.log(1)").expect("js");
    std::fs::write(root.join("assets/app.css"), "body{}").expect("css");
    std::fs::write(root.join("assets/logo.svg"), "<svg/>").expect("svg");
    std::fs::write(base.join("secret.txt"), "not for you").expect("outside");
    std::os::unix::fs::symlink(base.join("secret.txt"), root.join("assets/leak.txt"))
        .expect("symlink");
    let ui = base.join("ui");
    with_prepared_gateway(
        "ui_external",
        AccountingMode::Ebpf,
        move |c| {
            c.secret = Some(SECRET.to_owned());
            c.external_ui = Some(ui);
            c.external_ui_name = Some("xd".to_owned());
        },
        |_| (),
        |topo, _, ()| {
            let (status, kind, body) = get(topo, "/ui/xd/");
            assert_eq!((status, kind.as_str()), (200, "text/html; charset=utf-8"));
            assert_eq!(body, b"<!doctype html><title>xd</title>");
            for (path, kind) in [
                ("/ui/xd/assets/app%201.js", "text/javascript; charset=utf-8"),
                ("/ui/xd/assets/app.css", "text/css; charset=utf-8"),
                ("/ui/xd/assets/logo.svg", "image/svg+xml; charset=utf-8"),
            ] {
                let (status, got, _) = get(topo, path);
                assert_eq!((status, got.as_str()), (200, kind), "{path}");
            }
            // Without the secret (a dashboard asks for it itself), and the page links to it.
            let (status, _, page) = get(topo, "/ui/");
            assert_eq!(status, 200);
            assert!(String::from_utf8_lossy(&page).contains("href=\"/ui/xd/\""));
            assert_eq!(get(topo, "/ui/xd").0, 308, "a slash is added");
            for (path, status) in [
                ("/ui/xd/../../secret.txt", 400),
                ("/ui/xd/assets/%2e%2e/%2e%2e/secret.txt", 400),
                ("/ui/xd/..%2f..%2fsecret.txt", 400),
                ("/ui/xd/assets%2fapp.css", 400),
                ("/ui/xd/assets/leak.txt", 403),
                ("/ui/xd/nothing.js", 404),
                ("/ui/other/", 404),
            ] {
                let (got, kind, body) = get(topo, path);
                assert_eq!(got, status, "{path}");
                assert_eq!(kind, "application/json", "{path}");
                assert!(!String::from_utf8_lossy(&body).contains("not for you"));
            }
        },
    );
}
