//! History: every closed flow in SQLite (WAL), with per-minute rollups. The relay never waits
//! on it: [`Store::record`] hands a row to a bounded queue; one writer thread commits batches
//! at most [`BATCH_WINDOW`] after a flow closes, keeps what it could not write (the database
//! full, read-only or missing) in a bounded buffer, retries, and counts every loss.

pub mod query;
pub mod rollup;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::flow::ClosedFlow;

pub use schema::VERSION as SCHEMA_VERSION;

/// Rows waiting for the writer; more are dropped (and counted) rather than wait.
const QUEUE: usize = 65_536;
/// How long the writer gathers rows before committing them.
pub const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// A flow's columns, in the order [`Row::params`] gives them.
pub(crate) const COLUMNS: &str = "id, start_ms, end_ms, network, inbound, inbound_type, \
    source_ip, source_port, destination_ip, destination_port, host, sniff_host, process, \
    process_path, uid, rule, rule_payload, chains, outbound, device, upload, download";
/// Its placeholders.
pub(crate) const PLACEHOLDERS: &str = "?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, \
    ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22";

/// The database file's name in the state directory.
pub const FILE: &str = "history.db";

/// What the store has done, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counts {
    /// Flows committed.
    pub written: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Microseconds the last commit took.
    pub last_batch_us: AtomicU64,
    /// Rows queued or waiting for a retry.
    pub pending: AtomicU64,
    /// Writes (or opens) that failed; the rows stay pending.
    pub errors: AtomicU64,
    /// Rows lost: the queue or the retry buffer was full.
    pub dropped: AtomicU64,
}

/// One closed flow as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub network: &'static str,
    pub inbound: &'static str,
    pub inbound_type: &'static str,
    pub source_ip: String,
    pub source_port: u16,
    pub destination_ip: String,
    pub destination_port: u16,
    pub host: String,
    pub sniff_host: String,
    pub process: String,
    pub process_path: String,
    pub uid: Option<u32>,
    pub rule: &'static str,
    pub rule_payload: String,
    /// mihomo's `chains` as a JSON array, the leaf first.
    pub chains: String,
    /// The leaf (`chains[0]`).
    pub outbound: String,
    /// The device: its MAC when known, else its IP.
    pub device: String,
    pub upload: u64,
    pub download: u64,
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Row {
    /// The columns, in [`COLUMNS`] order, as statement parameters.
    pub(crate) fn params(&self) -> [&dyn rusqlite::ToSql; 22] {
        [
            &self.id,
            &self.start_ms,
            &self.end_ms,
            &self.network,
            &self.inbound,
            &self.inbound_type,
            &self.source_ip,
            &self.source_port,
            &self.destination_ip,
            &self.destination_port,
            &self.host,
            &self.sniff_host,
            &self.process,
            &self.process_path,
            &self.uid,
            &self.rule,
            &self.rule_payload,
            &self.chains,
            &self.outbound,
            &self.device,
            &self.upload,
            &self.download,
        ]
    }

    pub fn of(c: &ClosedFlow) -> Row {
        let source_ip = c.meta.source.ip().to_canonical().to_string();
        Row {
            id: c.id.to_string(),
            start_ms: ms(c.start),
            end_ms: ms(c.closed_at),
            network: c.meta.network.as_str(),
            inbound: c.meta.inbound_name,
            inbound_type: c.meta.inbound_type,
            device: source_ip.clone(),
            source_ip,
            source_port: c.meta.source.port(),
            destination_ip: c
                .meta
                .destination_ip
                .map(|ip| ip.to_canonical().to_string())
                .unwrap_or_default(),
            destination_port: c.meta.destination_port,
            host: c.host.clone().unwrap_or_default(),
            sniff_host: c.sniffed_host.clone().unwrap_or_default(),
            process: c
                .owner
                .as_ref()
                .map(|o| o.name.to_string())
                .unwrap_or_default(),
            process_path: c
                .owner
                .as_ref()
                .map(|o| o.path.to_string())
                .unwrap_or_default(),
            uid: c.owner.as_ref().map(|o| o.uid),
            rule: c.route.rule,
            rule_payload: c.route.payload.clone(),
            chains: serde_json::to_string(&c.route.chains).unwrap_or_default(),
            outbound: c.route.chains.first().cloned().unwrap_or_default(),
            upload: c.traffic.upload,
            download: c.traffic.download,
        }
    }
}

/// A direct writer for rows that were not this process's flows (imports, benches): the same
/// schema, migrations, transactions and rollups as the writer thread, on the caller's thread.
#[derive(Debug)]
pub struct Import(rusqlite::Connection);

impl Import {
    pub fn open(path: &Path) -> rusqlite::Result<Import> {
        writer::open(path).map(Import)
    }

    /// Writes `rows` in one transaction (rows already there are left alone).
    pub fn write(&mut self, rows: &[Row]) -> rusqlite::Result<()> {
        writer::write(&mut self.0, rows.iter())
    }
}

enum Msg {
    Row(Box<Row>),
    /// Commit what is pending, answer, and end.
    Stop(mpsc::Sender<()>),
}

/// The store's front.
#[derive(Debug)]
pub struct Store {
    tx: SyncSender<Msg>,
    /// Which device each flow's source is.
    pub devices: Arc<crate::devices::Devices>,
    path: PathBuf,
    pub counts: Arc<Counts>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Row(_) => "Row",
            Msg::Stop(_) => "Stop",
        })
    }
}

impl Store {
    /// Starts the writer for the database at `path` (made, and migrated, by the writer: a
    /// database that cannot be opened yet is retried while rows wait).
    pub fn start(
        path: &Path,
        retention_days: u32,
        devices: Arc<crate::devices::Devices>,
    ) -> Arc<Store> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let thread = writer::spawn(
            path.to_owned(),
            retention_days,
            rx,
            counts.clone(),
            devices.clone(),
        );
        tracing::info!("history: {} (schema {})", path.display(), SCHEMA_VERSION);
        Arc::new(Store {
            tx,
            devices,
            path: path.to_owned(),
            counts,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The row for `flow`, its device named.
    pub fn row(&self, flow: &ClosedFlow) -> Row {
        Row {
            device: self.devices.id(flow.meta.source.ip(), flow.start),
            ..Row::of(flow)
        }
    }

    /// Queues a closed flow; never waits (its device is named by the writer, off the
    /// runtime: that may read the neighbour table).
    pub fn record(&self, flow: &ClosedFlow) {
        match self.tx.try_send(Msg::Row(Box::new(Row::of(flow)))) {
            Ok(()) => {
                self.counts.pending.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => {
                if self.counts.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!("history: the write queue is full; flows are being dropped");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Commits everything queued and stops the writer (at shutdown).
    pub fn close(&self) {
        let (done_tx, done_rx) = mpsc::channel();
        if self.tx.send(Msg::Stop(done_tx)).is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(10));
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database file and its write-ahead log, in bytes.
    pub fn size(&self) -> u64 {
        let len = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        len(self.path.clone()) + len(PathBuf::from(wal))
    }
}
