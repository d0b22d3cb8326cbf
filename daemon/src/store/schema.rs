//! The history database's schema, one migration per version (`PRAGMA user_version`), applied
//! in order inside a transaction at open.

use rusqlite::Connection;

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
    // 2: hourly and daily rollups, filled from the minutes already kept.
    "CREATE TABLE rollup_hour (
        hour INTEGER NOT NULL,
        device TEXT NOT NULL,
        network TEXT NOT NULL,
        inbound TEXT NOT NULL,
        rule TEXT NOT NULL,
        outbound TEXT NOT NULL,
        connections INTEGER NOT NULL,
        upload INTEGER NOT NULL,
        download INTEGER NOT NULL,
        PRIMARY KEY (hour, device, network, inbound, rule, outbound)
    ) WITHOUT ROWID;
    CREATE TABLE rollup_day (
        day INTEGER NOT NULL,
        device TEXT NOT NULL,
        network TEXT NOT NULL,
        inbound TEXT NOT NULL,
        rule TEXT NOT NULL,
        outbound TEXT NOT NULL,
        connections INTEGER NOT NULL,
        upload INTEGER NOT NULL,
        download INTEGER NOT NULL,
        PRIMARY KEY (day, device, network, inbound, rule, outbound)
    ) WITHOUT ROWID;
    INSERT INTO rollup_hour SELECT minute / 60, device, network, inbound, rule, outbound,
        SUM(connections), SUM(upload), SUM(download) FROM rollup_minute
        GROUP BY minute / 60, device, network, inbound, rule, outbound;
    INSERT INTO rollup_day SELECT minute / 1440, device, network, inbound, rule, outbound,
        SUM(connections), SUM(upload), SUM(download) FROM rollup_minute
        GROUP BY minute / 1440, device, network, inbound, rule, outbound;",
];

/// The schema version this build writes.
pub const VERSION: usize = MIGRATIONS.len();

/// Brings `conn` to [`VERSION`]; refuses a database from a newer build.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<usize> {
    let at: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if at > VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database is at schema version {at}, newer than this build's {VERSION}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(at) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(at)
}
