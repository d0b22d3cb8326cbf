//! The threads that answer history queries: one per CPU at a low CPU priority (nice 10), so
//! that any number of dashboard requests wait here in a bounded queue while the relay keeps
//! the CPU, and no query ever occupies the runtime's blocking pool.

use std::{
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread,
};

/// Queries waiting for a thread; more are refused (busy) rather than queued without bound.
pub const QUEUE: usize = 1_024;
/// The niceness of the query threads.
const NICE: libc::c_int = 10;

type Job = Box<dyn FnOnce() + Send>;

/// Started on first use.
#[derive(Debug, Default)]
pub struct Queries {
    tx: OnceLock<SyncSender<Job>>,
}

/// Why a query did not run.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("too many history queries are waiting; try again")]
    Busy,
    #[error("the query thread ended without an answer")]
    Lost,
}

impl Queries {
    fn sender(&self) -> &SyncSender<Job> {
        self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
            let rx = Arc::new(Mutex::new(rx));
            let n = thread::available_parallelism().map_or(2, |n| n.get());
            for i in 0..n {
                let rx = rx.clone();
                let spawned = thread::Builder::new()
                    .name(format!("tpacct-query-{i}"))
                    .spawn(move || work(&rx));
                if let Err(e) = spawned {
                    tracing::error!("history: starting a query thread: {e}");
                }
            }
            tx
        })
    }

    /// Runs `f` on a query thread and waits for its answer without blocking the runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, QueryError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.sender().try_send(job) {
            Ok(()) => rx.await.map_err(|_| QueryError::Lost),
            Err(TrySendError::Full(_)) => Err(QueryError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(QueryError::Lost),
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    // SAFETY: gettid and setpriority take no pointers; on Linux PRIO_PROCESS with a thread id
    // sets that thread's niceness only.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) };
    if r != 0 {
        tracing::debug!(
            "history: query thread niceness: {}",
            std::io::Error::last_os_error()
        );
    }
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => {
                if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)) {
                    tracing::error!("history: a query panicked: {p:?}");
                }
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queries_run_at_low_priority_and_a_full_queue_says_busy() {
        let q = Arc::new(Queries::default());
        let nice = q
            .run(|| {
                // SAFETY: as above; getpriority takes no pointers.
                unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
            })
            .await
            .expect("answer");
        assert_eq!(nice, NICE);
        // Every thread held, the queue filled: the next is refused at once.
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let hold = Arc::new(Mutex::new(hold_rx));
        let n = thread::available_parallelism().map_or(2, |n| n.get());
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let mut held = Vec::new();
        for _ in 0..n {
            let (q, hold, started) = (q.clone(), hold.clone(), started_tx.clone());
            held.push(tokio::spawn(async move {
                q.run(move || {
                    let _ = started.send(());
                    let _ = hold.lock().map(|h| h.recv());
                })
                .await
            }));
        }
        // (Waiting on a std channel would hold this worker; the tasks run on the other.)
        tokio::task::block_in_place(|| {
            for _ in 0..n {
                started_rx.recv().expect("a held thread");
            }
        });
        while q.sender().try_send(Box::new(|| {})).is_ok() {}
        assert!(matches!(q.run(|| ()).await, Err(QueryError::Busy)));
        drop(hold_tx);
        for h in held {
            assert!(h.await.expect("joined").is_ok());
        }
    }
}
