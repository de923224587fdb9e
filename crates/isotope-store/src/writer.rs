//! Group commit of usage events.
//!
//! One commit per request would cap the server at the disk's fsync rate. Instead
//! every request hands its event to one background task, which gathers whatever
//! has arrived (up to `max_batch`, waiting at most `max_delay` after the first) and
//! commits it in ONE transaction. Each caller's future resolves only after the
//! transaction holding its event has committed, so "the response was sent" still
//! implies "the event is durable" — the server awaits `record` before finishing the
//! response (or before dropping the connection of a streamed one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Result, StoreError};
use crate::store::Store;
use crate::types::UsageEvent;

// Almost every message is a `Record`; boxing it would allocate once per event.
#[allow(clippy::large_enum_variant)]
enum Command {
    Record(UsageEvent, oneshot::Sender<Result<()>>),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Default)]
struct Counters {
    batches_committed: AtomicU64,
    events_committed: AtomicU64,
    batches_failed: AtomicU64,
}

/// What the writer has done so far (for `/metrics` and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub batches_committed: u64,
    /// Events in those transactions.
    pub events_committed: u64,
    /// Transactions that failed (their events' callers got the error).
    pub batches_failed: u64,
}

/// Handle to the group-commit task. Cheap to clone; all clones feed the same task.
#[derive(Clone)]
pub struct UsageWriter {
    tx: mpsc::Sender<Command>,
    counters: Arc<Counters>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for UsageWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageWriter")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl UsageWriter {
    /// Starts the task on the current tokio runtime. A batch holds at most
    /// `max_batch` events, and the first event of a batch waits at most
    /// `max_delay` for company (zero: commit whatever is already queued — events
    /// that arrive during a commit still share the next one). The queue holds
    /// `4 × max_batch` events; beyond that `record` waits (backpressure).
    pub fn spawn(store: Arc<dyn Store>, max_batch: usize, max_delay: Duration) -> UsageWriter {
        let max_batch = max_batch.max(1);
        let (tx, rx) = mpsc::channel(max_batch.saturating_mul(4));
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(store, rx, max_batch, max_delay, counters.clone()));
        UsageWriter {
            tx,
            counters,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }

    /// Queues `event` and resolves once the transaction holding it has committed
    /// (or failed: then every event of that batch gets [`StoreError::BatchFailed`]).
    /// After [`UsageWriter::shutdown`] it returns [`StoreError::WriterClosed`].
    pub async fn record(&self, event: UsageEvent) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Command::Record(event, done))
            .await
            .map_err(|_| StoreError::WriterClosed)?;
        wait.await.map_err(|_| StoreError::WriterClosed)?
    }

    /// Commits everything queued, then stops the task. Idempotent; events recorded
    /// afterwards are refused with [`StoreError::WriterClosed`].
    pub async fn shutdown(&self) {
        let (ack, acked) = oneshot::channel();
        if self.tx.send(Command::Shutdown(ack)).await.is_ok() {
            let _ = acked.await;
        }
        let task = self.task.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Counters since [`UsageWriter::spawn`], shared by all clones.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            batches_committed: self.counters.batches_committed.load(Ordering::Relaxed),
            events_committed: self.counters.events_committed.load(Ordering::Relaxed),
            batches_failed: self.counters.batches_failed.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct Batch {
    events: Vec<UsageEvent>,
    waiters: Vec<oneshot::Sender<Result<()>>>,
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Command>,
    max_batch: usize,
    max_delay: Duration,
    counters: Arc<Counters>,
) {
    // Shutdown requests seen so far; acknowledged once the queue is drained.
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let take = |batch: &mut Batch, acks: &mut Vec<_>, cmd| match cmd {
        Command::Record(event, done) => {
            batch.events.push(event);
            batch.waiters.push(done);
        }
        Command::Shutdown(ack) => acks.push(ack),
    };
    // `recv` returns None once the channel is closed (or every handle dropped)
    // AND empty, so everything queued before a shutdown is still committed.
    while let Some(first) = rx.recv().await {
        let mut batch = Batch::default();
        take(&mut batch, &mut acks, first);
        let deadline = Instant::now() + max_delay;
        while batch.events.len() < max_batch {
            let next = match rx.try_recv() {
                Ok(cmd) => Some(cmd),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                // Shutting down or not waiting: commit what is here now.
                Err(mpsc::error::TryRecvError::Empty)
                    if !acks.is_empty() || max_delay.is_zero() =>
                {
                    None
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten()
                }
            };
            match next {
                Some(cmd) => take(&mut batch, &mut acks, cmd),
                None => break,
            }
        }
        commit(store.as_ref(), &mut batch, &counters).await;
        if !acks.is_empty() {
            // Refuse new events; the loop drains what is already queued.
            rx.close();
        }
    }
    for ack in acks {
        let _ = ack.send(());
    }
}

async fn commit(store: &dyn Store, batch: &mut Batch, counters: &Counters) {
    if batch.events.is_empty() {
        return;
    }
    let n = batch.events.len();
    let outcome = store.insert_usage_events(&batch.events).await;
    match outcome {
        Ok(()) => {
            counters.batches_committed.fetch_add(1, Ordering::Relaxed);
            counters
                .events_committed
                .fetch_add(n as u64, Ordering::Relaxed);
            for w in batch.waiters.drain(..) {
                let _ = w.send(Ok(()));
            }
        }
        Err(e) => {
            counters.batches_failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("usage events not stored: {e}");
            let source = Arc::new(e);
            for w in batch.waiters.drain(..) {
                let _ = w.send(Err(StoreError::BatchFailed {
                    events: n,
                    source: source.clone(),
                }));
            }
        }
    }
}
