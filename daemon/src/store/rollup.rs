//! Rollups: per-minute, per-hour and per-day sums of closed flows at three levels of detail —
//! by (device, network, inbound, rule, outbound), by device, and in all — written in the
//! transaction that writes the flows; and the plan that covers a query's time range with the
//! coarsest slots inside it, at the least detail the query needs, and raw flows only at its
//! edges, so a month reads hundreds or thousands of rows, not millions.

use std::collections::HashMap;

use rusqlite::Transaction;

use super::Row;

/// One length of slot.
#[derive(Debug, PartialEq, Eq)]
pub struct Tier {
    /// Its tables' stem, and the column holding the slot (milliseconds / `ms`).
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

/// The flow columns the most detailed rollups keep; a query grouping or filtering only by
/// these can use rollups.
pub const DIMENSIONS: &[&str] = &["device", "network", "inbound", "rule", "outbound"];

/// A level of detail: the flow columns its rows are keyed by (a prefix of [`DIMENSIONS`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Level {
    suffix: &'static str,
    pub dims: &'static [&'static str],
}

impl Level {
    /// Its columns, each followed by `", "` (for a column list they start).
    pub fn columns(&self) -> String {
        self.dims.iter().map(|d| format!("{d}, ")).collect()
    }

    /// Its columns, each preceded by `", "` (for a key after the slot).
    pub fn key(&self) -> String {
        self.dims.iter().map(|d| format!(", {d}")).collect()
    }
}

/// The least detail first.
pub const LEVELS: [&Level; 3] = [
    &Level {
        suffix: "_total",
        dims: &[],
    },
    &Level {
        suffix: "_device",
        dims: &["device"],
    },
    &Level {
        suffix: "",
        dims: DIMENSIONS,
    },
];

impl Tier {
    /// The table holding this tier at `level`.
    pub fn table(&self, level: &Level) -> String {
        format!("{}{}", self.table, level.suffix)
    }
}

/// The least detailed level keeping every column in `needed`, if any does.
pub fn level_for<'a>(mut needed: impl Iterator<Item = &'a str> + Clone) -> Option<&'static Level> {
    LEVELS
        .into_iter()
        .find(|l| needed.clone().all(|c| l.dims.contains(&c)))
        .filter(|_| needed.all(|c| DIMENSIONS.contains(&c)))
}

/// Adds `rows` (flows just inserted) to every tier at every level: summed per key first,
/// one upsert each.
pub fn add<'a>(tx: &Transaction<'_>, rows: impl Iterator<Item = &'a Row>) -> rusqlite::Result<()> {
    type Key<'r> = (usize, usize, i64, [&'r str; 5]);
    let mut sums: HashMap<Key<'a>, (i64, i64, i64)> = HashMap::new();
    for r in rows {
        let all = [
            r.device.as_str(),
            r.network,
            r.inbound,
            r.rule,
            r.outbound.as_str(),
        ];
        for (t, tier) in TIERS.iter().enumerate() {
            for (l, level) in LEVELS.iter().enumerate() {
                let mut dims = [""; 5];
                dims[..level.dims.len()].copy_from_slice(&all[..level.dims.len()]);
                let sum = sums
                    .entry((t, l, r.end_ms.div_euclid(tier.ms), dims))
                    .or_default();
                sum.0 += 1;
                sum.1 += r.upload as i64;
                sum.2 += r.download as i64;
            }
        }
    }
    for ((t, l, slot, dims), (connections, upload, download)) in sums {
        let (tier, level) = (TIERS[t], LEVELS[l]);
        let n = level.dims.len();
        let marks: String = (0..n).map(|i| format!("?{}, ", i + 5)).collect();
        let mut stmt = tx.prepare_cached(&format!(
            "INSERT INTO {table} ({s}, {columns}connections, upload, download)
             VALUES (?1, {marks}?2, ?3, ?4)
             ON CONFLICT ({s}{key}) DO UPDATE SET
                connections = connections + excluded.connections,
                upload = upload + excluded.upload,
                download = download + excluded.download",
            table = tier.table(level),
            s = tier.slot,
            columns = level.columns(),
            key = level.key(),
        ))?;
        stmt.raw_bind_parameter(1, slot)?;
        stmt.raw_bind_parameter(2, connections)?;
        stmt.raw_bind_parameter(3, upload)?;
        stmt.raw_bind_parameter(4, download)?;
        for (i, d) in dims[..n].iter().enumerate() {
            stmt.raw_bind_parameter(i + 5, d)?;
        }
        stmt.raw_execute()?;
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
    fn a_query_reads_the_least_detail_it_needs() {
        assert_eq!(level_for([].into_iter()), Some(LEVELS[0]));
        assert_eq!(level_for(["device"].into_iter()), Some(LEVELS[1]));
        assert_eq!(level_for(["device", "rule"].into_iter()), Some(LEVELS[2]));
        assert_eq!(level_for(["outbound"].into_iter()), Some(LEVELS[2]));
        assert_eq!(level_for(["device", "host"].into_iter()), None);
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
