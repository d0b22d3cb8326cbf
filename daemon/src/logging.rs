//! Log output: `tracing` to stderr at mihomo's `log-level` (changeable at run time), records
//! also broadcast for the API's `/logs`. `RUST_LOG` overrides the level at start. Records from
//! the kernel programs (aya-log, through the `log` crate) arrive here too.

use std::sync::OnceLock;

use tokio::sync::broadcast;
use tracing::{Event, Subscriber, field::Visit};
use tracing_subscriber::{EnvFilter, Layer, Registry, layer::Context, prelude::*, reload};

use crate::config::LogLevel;

/// One log record as `/logs` sends it.
#[derive(Debug, Clone)]
pub struct Record {
    pub level: LogLevel,
    pub payload: String,
}

/// The installed logger's controls.
#[derive(Debug)]
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    records: broadcast::Sender<Record>,
    level: std::sync::Mutex<LogLevel>,
    /// Flushes the writer thread's queue when taken and dropped ([`flush`]).
    writer: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>>,
}

static LOGGING: OnceLock<Logging> = OnceLock::new();

/// Installs the global subscriber once; later calls return the first one's controls.
pub fn init(level: LogLevel) -> &'static Logging {
    LOGGING.get_or_init(|| {
        let filter =
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level.directive()));
        let (filter, handle) = reload::Layer::new(filter);
        let (records, _) = broadcast::channel(1024);
        let broadcast = Broadcast(records.clone());
        // Lines go to stderr from a writer thread; when its queue is full they are dropped
        // (and counted by the appender) rather than blocking the caller.
        let (stderr, guard) = tracing_appender::non_blocking(std::io::stderr());
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(
                        std::io::IsTerminal::is_terminal(&std::io::stderr())
                            && std::env::var_os("NO_COLOR").is_none(),
                    )
                    .with_writer(stderr),
            )
            .with(broadcast)
            .try_init();
        Logging {
            filter: handle,
            records,
            level: std::sync::Mutex::new(level),
            writer: std::sync::Mutex::new(Some(guard)),
        }
    })
}

/// Writes out every queued line; call before the process exits. Later lines are dropped.
pub fn flush() {
    if let Some(l) = LOGGING.get() {
        drop(l.writer.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// The installed logger, if any.
pub fn get() -> Option<&'static Logging> {
    LOGGING.get()
}

impl Logging {
    /// Changes the level at run time (`PATCH /configs`).
    pub fn set_level(&self, level: LogLevel) {
        if self
            .filter
            .modify(|f| *f = EnvFilter::new(level.directive()))
            .is_ok()
        {
            *self.level.lock().unwrap_or_else(|p| p.into_inner()) = level;
        }
    }

    pub fn level(&self) -> LogLevel {
        *self.level.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every record from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Record> {
        self.records.subscribe()
    }
}

/// Sends each event to `/logs` subscribers.
struct Broadcast(broadcast::Sender<Record>);

impl<S: Subscriber> Layer<S> for Broadcast {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let level = match *event.metadata().level() {
            tracing::Level::ERROR => LogLevel::Error,
            tracing::Level::WARN => LogLevel::Warning,
            tracing::Level::INFO => LogLevel::Info,
            _ => LogLevel::Debug,
        };
        let mut payload = Message(String::new());
        event.record(&mut payload);
        let _ = self.0.send(Record {
            level,
            payload: payload.0,
        });
    }
}

/// The formatted `message` field plus any others as `key=value`.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            self.record_debug(field, &value);
        }
    }
}
