//! Rollups: per-minute, per-hour and per-day sums of closed flows by (device, network,
//! inbound, rule, outbound), written in the transaction that writes the flows, and the plan
//! that covers a query's time range with the coarsest rollups that fit inside it and raw
//! flows only at its edges, so a month reads thousands of rows, not millions.

use std::collections::HashMap;

use rusqlite::{Transaction, params};

use super::Row;

/// One level of rollups.
#[derive(Debug, PartialEq, Eq)]
pub struct Tier {
    /// Its table, and the column holding the slot (milliseconds / `ms`).
    pub table: &'static str,
    pub slot: &'static str,
    /// A slot's length in milliseconds; each tier's divides the next coarser one's.
    pub ms: i64,
    /// How long its rows are kept, in days (`None`: the flows' retention).
    pub keep_days: Option<i64>,
}

const MINUTE: Tier = Tier {
    table: "rollup_minute",
    slot: "minute",
    ms: 60_000,
    keep_days: None,
};
const HOUR: Tier = Tier {
    table: "rollup_hour",
    slot: "hour",
    ms: 3_600_000,
    keep_days: Some(400),
};
const DAY: Tier = Tier {
    table: "rollup_day",
    slot: "day",
    ms: 86_400_000,
    keep_days: Some(3_660),
};

/// Coarsest first.
pub const TIERS: [&Tier; 3] = [&DAY, &HOUR, &MINUTE];

/// The flow columns a rollup keeps; a query grouping or filtering only by these can use them.
pub const DIMENSIONS: &[&str] = &["device", "network", "inbound", "rule", "outbound"];

/// Adds `rows` (flows just inserted) to every tier: summed per key first, one upsert each.
pub fn add<'a>(tx: &Transaction<'_>, rows: impl Iterator<Item = &'a Row>) -> rusqlite::Result<()> {
    type Key<'r> = (usize, i64, [&'r str; 5]);
    let mut sums: HashMap<Key<'a>, (i64, i64, i64)> = HashMap::new();
    for r in rows {
        let dims = [
            r.device.as_str(),
            r.network,
            r.inbound,
            r.rule,
            r.outbound.as_str(),
        ];
        for (i, tier) in TIERS.iter().enumerate() {
            let sum = sums
                .entry((i, r.end_ms.div_euclid(tier.ms), dims))
                .or_default();
            sum.0 += 1;
            sum.1 += r.upload as i64;
            sum.2 += r.download as i64;
        }
    }
    for ((i, slot, d), (connections, upload, download)) in sums {
        let Tier { table, slot: s, .. } = TIERS[i];
        tx.prepare_cached(&format!(
            "INSERT INTO {table} ({s}, device, network, inbound, rule, outbound,
                connections, upload, download)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT ({s}, device, network, inbound, rule, outbound) DO UPDATE SET
                connections = connections + excluded.connections,
                upload = upload + excluded.upload,
                download = download + excluded.download"
        ))?
        .execute(params![
            slot,
            d[0],
            d[1],
            d[2],
            d[3],
            d[4],
            connections,
            upload,
            download
        ])?;
    }
    Ok(())
}

/// Where a piece of a time range is read from.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    /// Slots `from..to` of a tier.
    Rollup(&'static Tier, i64, i64),
    /// Flows that ended in `from..to` milliseconds.
    Flows(i64, i64),
}

/// Covers `from..to` (milliseconds) with whole slots of the tiers no longer than `bucket`
/// milliseconds (a time series' interval: its buckets must not split a slot), coarsest
/// first, and flows for what is left at the edges.
pub fn plan(from: i64, to: i64, bucket: i64) -> Vec<Part> {
    let tiers: Vec<&'static Tier> = TIERS.into_iter().filter(|t| t.ms <= bucket).collect();
    let mut parts = Vec::new();
    cover(from, to, &tiers, &mut parts);
    parts
}

fn cover(from: i64, to: i64, tiers: &[&'static Tier], parts: &mut Vec<Part>) {
    if from >= to {
        return;
    }
    let Some((tier, finer)) = tiers.split_first() else {
        parts.push(Part::Flows(from, to));
        return;
    };
    let first = from.div_euclid(tier.ms) + i64::from(from.rem_euclid(tier.ms) != 0);
    let end = to.div_euclid(tier.ms);
    if first >= end {
        return cover(from, to, finer, parts);
    }
    cover(from, first * tier.ms, finer, parts);
    parts.push(Part::Rollup(tier, first, end));
    cover(end * tier.ms, to, finer, parts);
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = 60_000;
    const H: i64 = 60 * M;
    const D: i64 = 24 * H;

    #[test]
    fn a_range_is_whole_slots_inside_and_flows_at_the_edges() {
        let from = 3 * D - H - 90 * 1000; // day 2, 22:58:30
        let to = 5 * D + 2 * H + 3 * M + 7;
        let parts = plan(from, to, i64::MAX);
        assert_eq!(
            parts,
            vec![
                Part::Flows(from, 3 * D - H - M),
                Part::Rollup(&MINUTE, (3 * D - H - M) / M, (3 * D - H) / M),
                Part::Rollup(&HOUR, (3 * D - H) / H, 3 * D / H),
                Part::Rollup(&DAY, 3, 5),
                Part::Rollup(&HOUR, 5 * D / H, (5 * D + 2 * H) / H),
                Part::Rollup(&MINUTE, (5 * D + 2 * H) / M, (5 * D + 2 * H + 3 * M) / M),
                Part::Flows(5 * D + 2 * H + 3 * M, to),
            ]
        );
        // The parts tile the range exactly.
        let mut at = from;
        for p in &parts {
            let (lo, hi) = match p {
                Part::Flows(lo, hi) => (*lo, *hi),
                Part::Rollup(t, a, b) => (a * t.ms, b * t.ms),
            };
            assert_eq!(lo, at);
            at = hi;
        }
        assert_eq!(at, to);
    }

    #[test]
    fn a_series_never_reads_slots_longer_than_its_buckets() {
        let parts = plan(0, 2 * D, H);
        assert_eq!(parts, vec![Part::Rollup(&HOUR, 0, 48)]);
        let parts = plan(10, 2 * M, M);
        assert_eq!(parts, vec![Part::Flows(10, M), Part::Rollup(&MINUTE, 1, 2)]);
        assert_eq!(plan(5, 5, i64::MAX), vec![]);
        assert_eq!(plan(5, 70, i64::MAX), vec![Part::Flows(5, 70)]);
    }
}
