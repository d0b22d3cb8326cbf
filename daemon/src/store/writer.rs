//! The writer thread: opens (and migrates) the database, commits rows in batches, keeps the
//! rows a failed commit could not write and retries them, prunes old rows hourly.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::Ordering,
        mpsc::{Receiver, RecvTimeoutError},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rusqlite::Connection;

use super::{BATCH_WINDOW, COLUMNS, Counts, Msg, PLACEHOLDERS, Row, rollup, schema};

/// Rows kept for a retry while the database cannot be written; the oldest go first.
const MAX_PENDING: usize = 200_000;
/// Rows committed in one transaction at most.
const MAX_BATCH: usize = 5_000;
/// How long after a failure the next attempt is made.
const RETRY: Duration = Duration::from_secs(2);
/// At most one log line about failures per this interval.
const LOG_EVERY: Duration = Duration::from_secs(60);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
const DAY_MS: i64 = 86_400_000;

pub(super) fn spawn(
    path: PathBuf,
    retention_days: u32,
    rx: Receiver<Msg>,
    counts: Arc<Counts>,
    devices: Arc<crate::devices::Devices>,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("tpacct-store".into())
        .spawn(move || {
            Writer {
                path,
                retention_days,
                counts,
                devices,
                conn: None,
                pending: VecDeque::new(),
                retry_at: None,
                last_log: None,
                pruned_at: None,
            }
            .run(&rx)
        })
        .unwrap_or_else(|e| panic!("spawning the store writer: {e}"))
}

struct Writer {
    path: PathBuf,
    retention_days: u32,
    counts: Arc<Counts>,
    devices: Arc<crate::devices::Devices>,
    conn: Option<Connection>,
    pending: VecDeque<Row>,
    retry_at: Option<Instant>,
    last_log: Option<Instant>,
    pruned_at: Option<Instant>,
}

pub(super) fn open(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // WAL: readers never block the writer; NORMAL: a commit survives the process dying.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let from = schema::migrate(&mut conn)?;
    if from < schema::VERSION {
        tracing::info!(
            "history: schema {from} → {} in {}",
            schema::VERSION,
            path.display()
        );
    }
    Ok(conn)
}

impl Writer {
    fn run(mut self, rx: &Receiver<Msg>) {
        // Opened at once, so the schema is there and a problem shows at start; a failure here
        // is retried when rows are to be written.
        match open(&self.path) {
            Ok(c) => self.conn = Some(c),
            Err(e) => self.failed("opening", &e),
        }
        // Rows left in the queue by a full batch: take them without waiting.
        let mut backlog = false;
        loop {
            let mut stop = None;
            // Wait for a row (or the next retry / prune), then let the batch window fill while
            // asleep: a sender only wakes this thread for the first row of a batch, not for
            // every flow that closes.
            if !backlog {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(Msg::Row(r)) => {
                        self.push(*r);
                        std::thread::sleep(BATCH_WINDOW);
                    }
                    Ok(Msg::Stop(done)) => stop = Some(done),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return self.commit(),
                }
            }
            let mut full = false;
            while stop.is_none() {
                if self.pending.len() >= MAX_BATCH {
                    full = true;
                    break;
                }
                match rx.try_recv() {
                    Ok(Msg::Row(r)) => self.push(*r),
                    Ok(Msg::Stop(done)) => stop = Some(done),
                    Err(_) => break,
                }
            }
            let due = self.retry_at.is_none_or(|t| Instant::now() >= t);
            if due || stop.is_some() {
                self.commit();
            }
            // Straight on only after a commit that may have made room (a failing database
            // waits for its retry instead).
            backlog = full && self.retry_at.is_none();
            if let Some(done) = stop {
                let _ = done.send(());
                return;
            }
            self.prune();
        }
    }

    fn push(&mut self, mut row: Row) {
        if let Ok(ip) = row.source_ip.parse() {
            let started = UNIX_EPOCH + Duration::from_millis(row.start_ms.max(0) as u64);
            row.device = self.devices.id(ip, started);
        }
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            self.counts.pending.fetch_sub(1, Ordering::Relaxed);
        }
        self.pending.push_back(row);
    }

    fn failed(&mut self, what: &str, e: &rusqlite::Error) {
        self.counts.errors.fetch_add(1, Ordering::Relaxed);
        self.retry_at = Some(Instant::now() + RETRY);
        if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.last_log = Some(Instant::now());
            tracing::error!(
                "history: {what} {}: {e}; {} flows wait, relaying goes on",
                self.path.display(),
                self.pending.len()
            );
        }
    }

    /// Writes the pending rows, a batch per transaction; on failure they stay for a retry.
    fn commit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if self.conn.is_none() {
            match open(&self.path) {
                Ok(c) => self.conn = Some(c),
                Err(e) => return self.failed("opening", &e),
            }
        }
        while !self.pending.is_empty() {
            let n = self.pending.len().min(MAX_BATCH);
            let started = Instant::now();
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match write(conn, self.pending.range(..n)) {
                Ok(()) => {
                    self.pending.drain(..n);
                    self.retry_at = None;
                    let c = &self.counts;
                    c.written.fetch_add(n as u64, Ordering::Relaxed);
                    c.pending.fetch_sub(n as u64, Ordering::Relaxed);
                    c.batches.fetch_add(1, Ordering::Relaxed);
                    c.last_batch_us
                        .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    // Reopen next time: the file may have been replaced or remounted.
                    self.conn = None;
                    return self.failed("writing", &e);
                }
            }
        }
    }

    fn prune(&mut self) {
        if self.pruned_at.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return;
        }
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        self.pruned_at = Some(Instant::now());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let flows_before = now - i64::from(self.retention_days) * DAY_MS;
        let r = conn
            .execute("DELETE FROM flows WHERE end_ms < ?1", [flows_before])
            .and_then(|_| {
                rollup::TIERS.iter().try_for_each(|t| {
                    let days = t.keep_days.unwrap_or(i64::from(self.retention_days));
                    let before = (now - days * DAY_MS) / t.ms;
                    conn.execute(
                        &format!("DELETE FROM {} WHERE {} < ?1", t.table, t.slot),
                        [before],
                    )
                    .map(drop)
                })
            });
        if let Err(e) = r {
            tracing::warn!("history: pruning: {e}");
        }
    }
}

/// One transaction: each flow once (a retried batch inserts nothing twice), and the flows
/// inserted added to the rollups.
pub(super) fn write<'a>(
    conn: &mut Connection,
    rows: impl Iterator<Item = &'a Row>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let mut inserted = Vec::new();
    {
        let mut flow = tx.prepare_cached(&format!(
            "INSERT OR IGNORE INTO flows ({COLUMNS}) VALUES ({PLACEHOLDERS})"
        ))?;
        for r in rows {
            if flow.execute(&r.params()[..])? == 1 {
                inserted.push(r);
            }
        }
    }
    rollup::add(&tx, inserted.into_iter())?;
    tx.commit()
}
