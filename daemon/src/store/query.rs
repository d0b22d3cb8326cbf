//! Stats over the history, exact to the byte at any moment: the committed rows, plus the
//! flows the database may not have yet (the registry's recently closed ring and the live
//! flows, counted at their current bytes) loaded into a temporary table on the reader's own
//! connection, each flow once (by id).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, ToSql, params_from_iter};
use serde_json::{Value, json};

use super::{
    COLUMNS, PLACEHOLDERS, Row,
    rollup::{self, DIMENSIONS, Level, Part},
};

/// What a stats request asks, already validated.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Milliseconds since the epoch, inclusive; flows are placed at their end (now, if live).
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// (column, value) equality filters.
    pub filters: Vec<(&'static str, String)>,
}

/// Group-by keys: the request's name, the response's key, the SQL expression.
/// A flow's name: its host, else its sniffed host, else its destination address.
const HOST: &str = "COALESCE(NULLIF(host, ''), NULLIF(sniff_host, ''), destination_ip)";

pub const GROUPS: &[(&str, &str, &str)] = &[
    ("network", "network", "network"),
    ("rule", "rule", "rule"),
    ("process", "process", "process"),
    ("destination", "destination", "destination_ip"),
    ("host", "host", HOST),
    ("chains", "node", "outbound"),
    ("source", "source", "source_ip"),
    ("device", "device", "device"),
    ("outbound", "outbound", "outbound"),
    ("inbound", "inbound", "inbound"),
];

/// Filters: the request's name and the column.
pub const FILTERS: &[(&str, &str)] = &[
    ("network", "network"),
    ("rule", "rule"),
    ("process", "process"),
    ("destination", "destination_ip"),
    ("host", "host"),
    ("source", "source_ip"),
    ("device", "device"),
    ("outbound", "outbound"),
    ("inbound", "inbound"),
];

/// Time buckets: the request's name, the SQL giving a bucket's start in milliseconds, and
/// the longest rollup slot no bucket splits.
pub const INTERVALS: &[(&str, &str, i64)] = &[
    ("minute", "end_ms / 60000 * 60000", 60_000),
    ("hour", "end_ms / 3600000 * 3600000", 3_600_000),
    ("day", "end_ms / 86400000 * 86400000", 86_400_000),
    // Weeks start on Monday; the epoch was a Thursday.
    (
        "week",
        "((end_ms / 86400000 + 3) / 7 * 7 - 3) * 86400000",
        86_400_000,
    ),
    (
        "month",
        "CAST(strftime('%s', end_ms / 1000, 'unixepoch', 'start of month') AS INTEGER) * 1000",
        86_400_000,
    ),
];

/// A read-only connection with `extra` (flows the database may not hold yet) in `mem_flows`,
/// inside a read transaction: every query on it sees one snapshot, in which each flow counts
/// once (a flow of `extra` already committed counts as committed).
pub fn open(path: &Path, extra: &[Row]) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(&format!(
        "CREATE TEMP TABLE mem_flows AS SELECT {COLUMNS} FROM main.flows WHERE 0"
    ))?;
    {
        let tx = conn.unchecked_transaction()?;
        let mut insert = tx.prepare(&format!(
            "INSERT INTO temp.mem_flows ({COLUMNS}) VALUES ({PLACEHOLDERS})"
        ))?;
        for r in extra {
            insert.execute(&r.params()[..])?;
        }
        drop(insert);
        tx.commit()?;
    }
    conn.execute_batch(
        "BEGIN;
         DELETE FROM temp.mem_flows
            WHERE EXISTS (SELECT 1 FROM main.flows f WHERE f.id = temp.mem_flows.id);",
    )?;
    Ok(conn)
}

/// The columns every source gives: a rollup row is `connections` flows.
const SHAPE: &str =
    "end_ms, device, network, inbound, rule, outbound, connections, upload, download";

impl Query {
    /// `from..to` in milliseconds (`to` exclusive).
    fn range(&self) -> (i64, i64) {
        (
            self.from_ms.unwrap_or(0).max(0),
            self.to_ms.map_or(i64::MAX / 2, |t| t.saturating_add(1)),
        )
    }

    /// The rollups that can answer it with buckets no shorter than `bucket` milliseconds
    /// (grouped by `column`): those keeping every column it groups and filters by.
    fn rollups(&self, column: Option<&str>, bucket: i64) -> Option<(i64, &'static Level)> {
        let needed = self.filters.iter().map(|(c, _)| *c).chain(column);
        rollup::level_for(needed).map(|level| (bucket, level))
    }
}

/// The rows a query reads, and their parameters. With `rollups` (the longest slot its
/// buckets allow, and the level keeping what it needs), whole slots come from the rollups and
/// only the range's edges from flows; else every flow in the range, with all its columns.
fn source(q: &Query, rollups: Option<(i64, &Level)>) -> (String, Vec<Box<dyn ToSql>>) {
    let (from, to) = q.range();
    let parts: Vec<String> = match rollups {
        Some((bucket, level)) => rollup::plan(from, to, bucket)
            .into_iter()
            .map(|p| match p {
                Part::Rollup(t, a, b) => format!(
                    "SELECT {slot} * {ms} AS end_ms, {dims}connections, upload, download \
                     FROM main.{table} WHERE {slot} >= {a} AND {slot} < {b}",
                    slot = t.slot,
                    ms = t.ms,
                    table = t.table(level),
                    dims = DIMENSIONS
                        .iter()
                        .map(|d| match level.dims.contains(d) {
                            true => format!("{d}, "),
                            false => format!("NULL AS {d}, "),
                        })
                        .collect::<String>(),
                ),
                Part::Flows(lo, hi) => format!(
                    "SELECT {} FROM main.flows WHERE end_ms >= {lo} AND end_ms < {hi}",
                    SHAPE.replace("connections", "1 AS connections")
                ),
            })
            .chain([format!(
                "SELECT {} FROM temp.mem_flows WHERE end_ms >= {from} AND end_ms < {to}",
                SHAPE.replace("connections", "1 AS connections")
            )])
            .collect(),
        None => ["main.flows", "temp.mem_flows"]
            .iter()
            .map(|t| {
                format!(
                    "SELECT {COLUMNS}, 1 AS connections FROM {t} \
                     WHERE end_ms >= {from} AND end_ms < {to}"
                )
            })
            .collect(),
    };
    let mut conds = Vec::new();
    let mut args: Vec<Box<dyn ToSql>> = Vec::new();
    for (column, value) in &q.filters {
        if *column == "network" {
            conds.push(format!("{column} = lower(?)"));
        } else if *column == "host" {
            // The name a flow is grouped under by `group_by=host`, so a group's key filters
            // to exactly that group.
            conds.push(format!("{HOST} = ?"));
        } else {
            conds.push(format!("{column} = ?"));
        }
        args.push(Box::new(value.clone()));
    }
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    (
        format!("(SELECT * FROM ({}) {filter})", parts.join(" UNION ALL ")),
        args,
    )
}

const SUMS: &str = "COALESCE(SUM(connections), 0) AS count, \
    COALESCE(SUM(download), 0) AS download, COALESCE(SUM(upload), 0) AS upload, \
    COALESCE(SUM(upload + download), 0) AS total";

/// `{count, download, upload, total}`.
pub fn summary(conn: &Connection, q: &Query) -> rusqlite::Result<Value> {
    let (from, args) = source(q, q.rollups(None, i64::MAX));
    conn.query_row(
        &format!("SELECT {SUMS} FROM {from}"),
        params_from_iter(args.iter()),
        |r| {
            Ok(json!({
                "count": r.get::<_, i64>(0)?,
                "download": r.get::<_, i64>(1)?,
                "upload": r.get::<_, i64>(2)?,
                "total": r.get::<_, i64>(3)?,
            }))
        },
    )
}

/// One entry per group: `{<key>: value, count, download, upload, total}`, sorted and limited.
pub fn group(
    conn: &Connection,
    q: &Query,
    (key, expr): (&str, &str),
    (sort_by, descending): (&str, bool),
    limit: u32,
) -> rusqlite::Result<Value> {
    let (from, args) = source(q, q.rollups(Some(expr), i64::MAX));
    let order = if descending { "DESC" } else { "ASC" };
    let sql = format!(
        "SELECT {expr} AS grp, {SUMS} FROM {from} GROUP BY grp \
         ORDER BY {sort_by} {order}, grp ASC LIMIT {limit}"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args.iter()), |r| {
        let mut entry = serde_json::Map::new();
        entry.insert(key.to_owned(), json!(r.get::<_, Option<String>>(0)?));
        entry.insert("count".into(), json!(r.get::<_, i64>(1)?));
        entry.insert("download".into(), json!(r.get::<_, i64>(2)?));
        entry.insert("upload".into(), json!(r.get::<_, i64>(3)?));
        entry.insert("total".into(), json!(r.get::<_, i64>(4)?));
        Ok(Value::Object(entry))
    })?;
    rows.collect::<Result<Vec<_>, _>>().map(Value::Array)
}

/// `[{time, value}]` for each bucket that has flows, oldest first.
pub fn timeseries(
    conn: &Connection,
    q: &Query,
    (bucket, slot): (&str, i64),
    metric: &str,
) -> rusqlite::Result<Value> {
    let (from, args) = source(q, q.rollups(None, slot));
    let sql = format!("SELECT {bucket} AS t, {SUMS} FROM {from} GROUP BY t ORDER BY t ASC");
    let column = match metric {
        "connections" => 1,
        "download" => 2,
        "upload" => 3,
        _ => 4,
    };
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args.iter()), |r| {
        let t: i64 = r.get(0)?;
        let time = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(t.max(0) as u64),
        )
        .to_string();
        Ok(json!({ "time": time, "value": r.get::<_, i64>(column)? }))
    })?;
    rows.collect::<Result<Vec<_>, _>>().map(Value::Array)
}

/// Milliseconds since the epoch as RFC 3339 with milliseconds, UTC.
fn time(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

/// Milliseconds since the epoch at the start of `now`'s UTC day and month.
fn day_and_month(now: std::time::SystemTime) -> (i64, i64) {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let day = secs / 86_400 * 86_400;
    let text = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(day as u64),
    )
    .to_string();
    let month_start = format!("{}-01T00:00:00Z", &text[..7]);
    let month = humantime::parse_rfc3339(&month_start)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(day, |d| d.as_secs() as i64);
    (day * 1000, month * 1000)
}

/// Per device: `{device, mac, ips, first_seen, last_seen, connections, upload, download,
/// today, month, total}` (bytes; today and month in UTC), the biggest first.
pub fn devices(conn: &Connection, now: std::time::SystemTime) -> rusqlite::Result<Vec<Value>> {
    let (from, args) = source(&Query::default(), None);
    let (day, month) = day_and_month(now);
    let sql = format!(
        "SELECT device, GROUP_CONCAT(DISTINCT source_ip), MIN(start_ms), MAX(end_ms), COUNT(*),
            SUM(upload), SUM(download),
            SUM(CASE WHEN end_ms >= {day} THEN upload + download ELSE 0 END),
            SUM(CASE WHEN end_ms >= {month} THEN upload + download ELSE 0 END),
            SUM(upload + download) AS total
         FROM {from} GROUP BY device ORDER BY total DESC, device ASC"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args.iter()), |r| {
        let device: String = r.get(0)?;
        let ips: String = r.get::<_, Option<String>>(1)?.unwrap_or_default();
        let mut ips: Vec<&str> = ips.split(',').filter(|s| !s.is_empty()).collect();
        ips.sort_unstable();
        let is_mac = device.len() == 17 && device.matches(':').count() == 5;
        Ok(json!({
            "device": device,
            "mac": if is_mac { Some(device.clone()) } else { None },
            "ips": ips,
            "first_seen": time(r.get(2)?),
            "last_seen": time(r.get(3)?),
            "connections": r.get::<_, i64>(4)?,
            "upload": r.get::<_, i64>(5)?,
            "download": r.get::<_, i64>(6)?,
            "today": r.get::<_, i64>(7)?,
            "month": r.get::<_, i64>(8)?,
            "total": r.get::<_, i64>(9)?,
        }))
    })?;
    rows.collect()
}

/// Closed flows, newest first (by end, then id), after `after` (a previous page's last
/// `(end_ms, id)`); the page and the cursor for the next one, if there is more.
pub fn closed(
    conn: &Connection,
    q: &Query,
    after: Option<(i64, String)>,
    limit: u32,
) -> rusqlite::Result<(Vec<Value>, Option<String>)> {
    let (from, mut args) = source(q, None);
    let page = match after {
        Some((ms, id)) => {
            args.push(Box::new(ms));
            args.push(Box::new(ms));
            args.push(Box::new(id));
            "WHERE end_ms < ? OR (end_ms = ? AND id < ?)"
        }
        None => "",
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM {from} {page} ORDER BY end_ms DESC, id DESC LIMIT {}",
        limit + 1
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows: Vec<(i64, String, Value)> = stmt
        .query_map(params_from_iter(args.iter()), |r| {
            let id: String = r.get(0)?;
            let end: i64 = r.get(2)?;
            let chains: String = r.get(17)?;
            Ok((
                end,
                id.clone(),
                json!({
                    "id": id,
                    "start": time(r.get(1)?),
                    "end": time(end),
                    "network": r.get::<_, String>(3)?,
                    "inbound": r.get::<_, String>(4)?,
                    "inbound_type": r.get::<_, String>(5)?,
                    "source_ip": r.get::<_, String>(6)?,
                    "source_port": r.get::<_, u16>(7)?,
                    "destination_ip": r.get::<_, String>(8)?,
                    "destination_port": r.get::<_, u16>(9)?,
                    "host": r.get::<_, String>(10)?,
                    "sniff_host": r.get::<_, String>(11)?,
                    "process": r.get::<_, String>(12)?,
                    "process_path": r.get::<_, String>(13)?,
                    "uid": r.get::<_, Option<u32>>(14)?,
                    "rule": r.get::<_, String>(15)?,
                    "rule_payload": r.get::<_, String>(16)?,
                    "chains": serde_json::from_str::<Value>(&chains).unwrap_or(Value::Null),
                    "outbound": r.get::<_, String>(18)?,
                    "device": r.get::<_, String>(19)?,
                    "upload": r.get::<_, i64>(20)?,
                    "download": r.get::<_, i64>(21)?,
                }),
            ))
        })?
        .collect::<Result<_, _>>()?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = more
        .then(|| rows.last().map(|(end, id, _)| format!("{end}_{id}")))
        .flatten();
    Ok((rows.into_iter().map(|(_, _, v)| v).collect(), next))
}
