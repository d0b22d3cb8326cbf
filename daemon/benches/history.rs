//! History at home scale: a month of a 50-device home (10 M flows; 1 M with `--quick`)
//! written through the store's own transactions and rollups, then the dashboard's three
//! month-long queries through the same code as `/api/v1/stats` (a read snapshot holding
//! 1,000 unsaved flows, as the API does). The database is kept under `target/bench` and
//! reused while it has the flows asked for. Prints `insert flows_per_s` (only when it wrote
//! them) and one line per query: `name p50_ms p95_ms max_ms rows_read`.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use tpacct::store::{
    Import, Row,
    query::{self, INTERVALS, Query},
};

const DEVICES: u64 = 50;
const HOSTS: u64 = 2_000;
const DAY_MS: i64 = 86_400_000;
const DAYS: i64 = 30;
const RUNS: usize = 40;

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Skewed towards 0: a few devices and hosts carry most flows, as at home.
    fn skewed(&mut self, n: u64) -> u64 {
        ((self.unit().powi(3)) * n as f64) as u64
    }
}

/// (rule, outbound) pairs and their weights out of 100.
const ROUTES: [(&str, &str, u64); 6] = [
    ("GEOSITE", "DIRECT", 40),
    ("GEOIP", "DIRECT", 20),
    ("DOMAIN-SUFFIX", "proxy", 20),
    ("MATCH", "proxy", 12),
    ("IP-CIDR", "DIRECT", 5),
    ("DOMAIN", "REJECT", 3),
];

fn flow(rng: &mut Rng, i: u64, end_ms: i64) -> Row {
    let device = rng.skewed(DEVICES);
    let host = rng.skewed(HOSTS);
    let mut pick = rng.next() % 100;
    let (rule, outbound, _) = ROUTES
        .iter()
        .copied()
        .find(|r| {
            let hit = pick < r.2;
            pick = pick.saturating_sub(r.2);
            hit
        })
        .unwrap_or(ROUTES[0]);
    let tcp = rng.next() % 100 < 85;
    let download = 10f64.powf(2.0 + 5.0 * rng.unit().powi(2)) as u64;
    Row {
        id: uuid::Uuid::from_u64_pair(0x7470_6163_6374, i).to_string(),
        start_ms: end_ms - (rng.next() % 120_000) as i64,
        end_ms,
        network: if tcp { "tcp" } else { "udp" },
        inbound: if device < 3 && rng.next().is_multiple_of(4) {
            "mixed"
        } else {
            "tproxy"
        },
        inbound_type: "TProxy",
        source_ip: format!("192.168.1.{}", 10 + device),
        source_port: 30_000 + (rng.next() % 30_000) as u16,
        destination_ip: format!("203.0.{}.{}", host / 250, host % 250),
        destination_port: if tcp { 443 } else { 53 },
        host: format!("host{host}.example"),
        sniff_host: String::new(),
        process: String::new(),
        process_path: String::new(),
        uid: None,
        rule,
        rule_payload: String::new(),
        chains: format!("[\"{outbound}\"]"),
        outbound: outbound.to_owned(),
        device: format!("02:42:ac:11:00:{device:02x}"),
        upload: download / 20 + rng.next() % 2_000,
        download,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let flows: u64 = if quick { 1_000_000 } else { 10_000_000 };
    let dir = std::env::var_os("TPACCT_BENCH_DIR")
        .map_or_else(|| PathBuf::from("target/bench"), PathBuf::from);
    std::fs::create_dir_all(&dir).expect("bench directory");
    let path = dir.join(format!("history-{flows}.db"));
    let mut import = Import::open(&path).expect("database");
    let have: u64 = rusqlite::Connection::open(&path)
        .and_then(|c| c.query_row("SELECT COUNT(*) FROM flows", [], |r| r.get(0)))
        .expect("count");
    if have != flows {
        drop(import);
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
        import = Import::open(&path).expect("database");
        let mut rng = Rng(42);
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let start = end - DAYS * DAY_MS;
        let step = (DAYS * DAY_MS) as f64 / flows as f64;
        let started = Instant::now();
        let mut batch = Vec::with_capacity(5_000);
        for i in 0..flows {
            batch.push(flow(&mut rng, i, start + (i as f64 * step) as i64));
            if batch.len() == 5_000 || i + 1 == flows {
                import.write(&batch).expect("write");
                batch.clear();
            }
        }
        println!(
            "insert {:.0}",
            flows as f64 / started.elapsed().as_secs_f64()
        );
    }
    drop(import);

    let last: i64 = rusqlite::Connection::open(&path)
        .and_then(|c| c.query_row("SELECT MAX(end_ms) FROM flows", [], |r| r.get(0)))
        .expect("last flow");
    // A month back from the last flow, at odd milliseconds: the edges are real edges.
    let month = Query {
        from_ms: Some(last - DAYS * DAY_MS + 12_345),
        to_ms: Some(last),
        filters: Vec::new(),
    };
    let mut rng = Rng(7);
    let unsaved: Vec<Row> = (0..1_000)
        .map(|i| flow(&mut rng, u64::MAX - i, last - (i as i64) * 10))
        .collect();
    let hour = INTERVALS
        .iter()
        .find(|i| i.0 == "hour")
        .map(|i| (i.1, i.2))
        .expect("hour");
    type Run<'a> = Box<dyn Fn(&rusqlite::Connection) -> usize + 'a>;
    let cases: [(&str, Run); 3] = [
        (
            "summary",
            Box::new(|c| {
                query::summary(c, &month).expect("summary");
                1
            }),
        ),
        (
            "group_device",
            Box::new(|c| {
                let g = query::group(c, &month, ("device", "device"), ("total", true), 100);
                g.expect("group").as_array().map_or(0, Vec::len)
            }),
        ),
        (
            "timeseries_hour",
            Box::new(|c| {
                let t = query::timeseries(c, &month, hour, "total");
                t.expect("series").as_array().map_or(0, Vec::len)
            }),
        ),
    ];
    for (name, run) in &cases {
        let mut times: Vec<Duration> = Vec::new();
        let mut rows = 0;
        for i in 0..=RUNS {
            let started = Instant::now();
            let conn = query::open(&path, &unsaved).expect("query connection");
            rows = run(&conn);
            if i > 0 {
                times.push(started.elapsed());
            }
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{name} {:.2} {:.2} {:.2} {rows}",
            ms(times[times.len() / 2]),
            ms(times[times.len() * 95 / 100]),
            ms(times[times.len() - 1]),
        );
    }
}
