//! The history database's schema, one migration per version (`PRAGMA user_version`), applied
//! in order inside a transaction at open.

use rusqlite::Connection;

use super::rollup;

/// Each entry takes the database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: closed flows, and per-minute rollups for long ranges.
    "CREATE TABLE flows (
        id TEXT PRIMARY KEY,
        start_ms INTEGER NOT NULL,
        end_ms INTEGER NOT NULL,
        network TEXT NOT NULL,
        inbound TEXT NOT NULL,
        inbound_type TEXT NOT NULL,
        source_ip TEXT NOT NULL,
        source_port INTEGER NOT NULL,
        destination_ip TEXT NOT NULL,
        destination_port INTEGER NOT NULL,
        host TEXT NOT NULL,
        sniff_host TEXT NOT NULL,
        process TEXT NOT NULL,
        process_path TEXT NOT NULL,
        uid INTEGER,
        rule TEXT NOT NULL,
        rule_payload TEXT NOT NULL,
        chains TEXT NOT NULL,
        outbound TEXT NOT NULL,
        device TEXT NOT NULL,
        upload INTEGER NOT NULL,
        download INTEGER NOT NULL
    );
    CREATE INDEX flows_end ON flows (end_ms);
    CREATE INDEX flows_device_end ON flows (device, end_ms);
    CREATE TABLE rollup_minute (
        minute INTEGER NOT NULL,
        device TEXT NOT NULL,
        network TEXT NOT NULL,
        inbound TEXT NOT NULL,
        rule TEXT NOT NULL,
        outbound TEXT NOT NULL,
        connections INTEGER NOT NULL,
        upload INTEGER NOT NULL,
        download INTEGER NOT NULL,
        PRIMARY KEY (minute, device, network, inbound, rule, outbound)
    ) WITHOUT ROWID;",
];

/// Each migration's SQL: the fixed ones, then those built from the rollup tiers and levels
/// (whose names and columns never change once released).
fn migrations() -> Vec<String> {
    let mut all: Vec<String> = MIGRATIONS.iter().map(|m| (*m).to_owned()).collect();
    all.push(rollups_by_hour_and_day());
    all
}

/// 2: every tier at every level (the minute tier at full detail exists since 1), filled from
/// the minutes already kept.
fn rollups_by_hour_and_day() -> String {
    let mut sql = String::new();
    for tier in rollup::TIERS {
        for level in rollup::LEVELS {
            let table = tier.table(level);
            if table == "rollup_minute" {
                continue;
            }
            let per = tier.ms / 60_000;
            sql += &format!(
                "CREATE TABLE {table} (
                    {slot} INTEGER NOT NULL,
                    {typed}
                    connections INTEGER NOT NULL,
                    upload INTEGER NOT NULL,
                    download INTEGER NOT NULL,
                    PRIMARY KEY ({slot}{key})
                ) WITHOUT ROWID;
                INSERT INTO {table} SELECT minute / {per}, {dims}SUM(connections), SUM(upload),
                    SUM(download) FROM rollup_minute GROUP BY minute / {per}{key};\n",
                slot = tier.slot,
                typed = level
                    .dims
                    .iter()
                    .map(|d| format!("{d} TEXT NOT NULL,"))
                    .collect::<String>(),
                dims = level.columns(),
                key = level.key(),
            );
        }
    }
    sql
}

/// The schema version this build writes: the fixed migrations and the one built above.
pub const VERSION: usize = MIGRATIONS.len() + 1;

/// Brings `conn` to [`VERSION`]; refuses a database from a newer build.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<usize> {
    let at: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if at > VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database is at schema version {at}, newer than this build's {VERSION}"
        )));
    }
    for (i, sql) in migrations().iter().enumerate().skip(at) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_counts_every_migration() {
        assert_eq!(super::migrations().len(), super::VERSION);
    }
}
