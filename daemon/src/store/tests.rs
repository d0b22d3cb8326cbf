//! The store's answers checked against sums computed here from the rows written: rollups
//! and raw flows agree for any range, bucket and filter, and each flow counts once.

use std::collections::BTreeMap;

use super::{Row, query, writer};

const MIN: i64 = 60_000;
const DAY: i64 = 1_440 * MIN;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn row(rng: &mut Rng, id: usize, start: i64, span: i64) -> Row {
    let end_ms = start + rng.below(span as u64) as i64;
    let pick = |rng: &mut Rng, of: &[&'static str]| of[rng.below(of.len() as u64) as usize];
    let device = format!("02:00:00:00:00:{:02x}", rng.below(6));
    Row {
        id: format!("f{id}"),
        start_ms: end_ms - 10,
        end_ms,
        network: pick(rng, &["tcp", "udp"]),
        inbound: pick(rng, &["tproxy", "mixed"]),
        inbound_type: "TProxy",
        source_ip: "10.0.0.2".into(),
        source_port: 40_000,
        destination_ip: format!("10.9.0.{}", rng.below(4)),
        destination_port: 443,
        host: String::new(),
        sniff_host: String::new(),
        process: String::new(),
        process_path: String::new(),
        uid: None,
        rule: pick(rng, &["DOMAIN", "MATCH", "IP-CIDR"]),
        rule_payload: String::new(),
        chains: "[\"DIRECT\"]".into(),
        outbound: pick(rng, &["DIRECT", "proxy"]).into(),
        device,
        upload: rng.below(100_000),
        download: rng.below(10_000_000),
    }
}

/// The start of `ms`'s bucket, computed from the calendar (weeks start on Monday).
fn bucket_of(interval: &str, ms: i64) -> i64 {
    let day = ms.div_euclid(DAY);
    match interval {
        "minute" => ms / MIN * MIN,
        "hour" => ms / (60 * MIN) * 60 * MIN,
        "day" => day * DAY,
        // 1970-01-01 was a Thursday: Monday is 3 days before it.
        "week" => (day - (day + 3).rem_euclid(7)) * DAY,
        _ => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
            let text = humantime::format_rfc3339_seconds(t).to_string();
            ms_of(&format!("{}-01T00:00:00Z", &text[..7]))
        }
    }
}

fn ms_of(text: &str) -> i64 {
    let t = humantime::parse_rfc3339(text).expect("a time");
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[test]
fn rollups_and_flows_agree_with_the_rows_for_any_range() {
    let dir = std::env::temp_dir().join(format!("tpacct-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let path = dir.join("history.db");
    let mut conn = writer::open(&path).expect("open");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start = 20_000 * DAY + 7 * MIN + 123;
    let rows: Vec<Row> = (0..6_000)
        .map(|i| row(&mut rng, i, start, 40 * DAY))
        .collect();
    for batch in rows.chunks(700) {
        writer::write(&mut conn, batch.iter()).expect("write");
    }
    // Writing a batch again changes nothing.
    writer::write(&mut conn, rows[..700].iter()).expect("rewrite");
    // Not yet written: 50 flows; also 20 written ones seen live, with fewer bytes.
    let unsaved: Vec<Row> = (6_000..6_050)
        .map(|i| row(&mut rng, i, start, 40 * DAY))
        .collect();
    let mut extra = unsaved.clone();
    extra.extend(rows[..20].iter().map(|r| Row {
        upload: 0,
        download: 1,
        ..r.clone()
    }));
    let all: Vec<&Row> = rows.iter().chain(&unsaved).collect();
    let q = query::open(&path, &extra).expect("query connection");

    for _ in 0..40 {
        let a = start + rng.below(42 * DAY as u64) as i64 - DAY;
        let b = a + rng.below(12 * DAY as u64) as i64;
        let device = (rng.below(3) == 0).then(|| format!("02:00:00:00:00:{:02x}", rng.below(6)));
        let filters = device.iter().map(|d| ("device", d.clone())).collect();
        let query = query::Query {
            from_ms: Some(a),
            to_ms: Some(b),
            filters,
        };
        let inside: Vec<&&Row> = all
            .iter()
            .filter(|r| r.end_ms >= a && r.end_ms <= b)
            .filter(|r| device.as_ref().is_none_or(|d| &r.device == d))
            .collect();
        let sum = |f: fn(&Row) -> u64| inside.iter().map(|r| f(r)).sum::<u64>();

        let s = query::summary(&q, &query).expect("summary");
        assert_eq!(s["count"], inside.len() as u64, "{a}..{b}");
        assert_eq!(s["upload"], sum(|r| r.upload));
        assert_eq!(s["download"], sum(|r| r.download));

        // By device (the device level) and by rule (the full one).
        for key in ["device", "rule"] {
            let g = query::group(&q, &query, (key, key), ("total", true), 100).expect("group");
            let mut want = BTreeMap::<String, u64>::new();
            for r in &inside {
                let k = if key == "device" {
                    r.device.as_str()
                } else {
                    r.rule
                };
                *want.entry(k.to_owned()).or_default() += r.upload + r.download;
            }
            let got: BTreeMap<String, u64> = g
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let k = e[key].as_str().unwrap_or_default().to_owned();
                    (k, e["total"].as_u64().unwrap_or(0))
                })
                .collect();
            assert_eq!(got, want, "group by {key} {a}..{b}");
        }

        for &(name, bucket, slot) in query::INTERVALS {
            let t = query::timeseries(&q, &query, (bucket, slot), "connections").expect("series");
            let mut want = BTreeMap::<i64, u64>::new();
            for r in &inside {
                *want.entry(bucket_of(name, r.end_ms)).or_default() += 1;
            }
            let got: BTreeMap<i64, u64> = t
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    (
                        ms_of(e["time"].as_str().unwrap_or_default()),
                        e["value"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            assert_eq!(got, want, "{name} series {a}..{b}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
