//! The scheduler: one OS thread that owns the llama.cpp context and runs continuous
//! batching for every request the server accepts.
//!
//! Handlers send a [`Job`] (one prompt, `n` choices) through a **bounded** queue;
//! a full queue is answered at once with 503 rather than growing memory. Between
//! decode steps the thread admits waiting choices into free slots (each choice is an
//! independent sequence with its own sampler), decodes all active sequences in one
//! batch, and forwards each sampled token to the job's event channel. When a job's
//! receiver is gone (client disconnected, handler dropped) its sequences are
//! cancelled and their KV cells freed before the next step.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use isotope_engine::{
    BatchConfig, Batcher, Event, FinishReason, GenerationRequest, Model, SeqId, SeqStats,
};
use isotope_sampling::{Sampled, Sampler, TokenId};
use tokio::sync::mpsc;

/// One request's work: a prompt and one sampler per choice.
pub struct Job {
    pub prompt: Vec<TokenId>,
    /// One sampler per choice; choice index = `first_choice` + position.
    pub samplers: Vec<Sampler>,
    /// Index of the first choice (several jobs of one request — batched prompts —
    /// share an event channel and number their choices consecutively).
    pub first_choice: usize,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub top_logprobs: usize,
    /// Where the scheduler reports progress. Dropping the receiver cancels the job.
    pub events: mpsc::UnboundedSender<JobEvent>,
}

/// Progress of one choice of a job.
#[derive(Debug)]
pub enum JobEvent {
    Token {
        choice: usize,
        sampled: Sampled,
        text: String,
    },
    Finished {
        choice: usize,
        reason: FinishReason,
        text: String,
        stats: SeqStats,
    },
    /// The engine failed; the choice is over.
    Failed { choice: usize, message: String },
}

/// Handle the server holds: submit jobs, read load.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::Sender<Job>,
    load: Arc<Load>,
    ctx_per_slot: usize,
}

/// Counters shared with the scheduler thread (for /metrics and admission).
#[derive(Default)]
pub struct Load {
    /// Jobs in the queue or waiting for a slot.
    pub queued: AtomicUsize,
    /// Sequences decoding now.
    pub active: AtomicUsize,
}

/// Why a job was not accepted.
#[derive(Debug)]
pub enum SubmitError {
    /// The queue is full.
    Overloaded,
    /// The scheduler thread is gone.
    Stopped,
}

impl Scheduler {
    /// Start the scheduler thread over `model`. `queue` bounds the jobs waiting for a
    /// slot.
    pub fn start(model: Arc<Model>, cfg: BatchConfig, queue: usize) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let load = Arc::new(Load::default());
        let ctx_per_slot = cfg.ctx_per_slot as usize;
        // Create the context on this thread first so configuration errors surface at
        // start-up, then move only the model into the worker (the batcher borrows it).
        {
            let probe = Batcher::new(&model, cfg.clone())?;
            drop(probe);
        }
        let thread_load = Arc::clone(&load);
        std::thread::Builder::new()
            .name("isotope-scheduler".into())
            .spawn(move || run(model, cfg, rx, thread_load))?;
        Ok(Self {
            tx,
            load,
            ctx_per_slot,
        })
    }

    /// Tokens of context each sequence has (prompt + completion).
    pub fn ctx_per_slot(&self) -> usize {
        self.ctx_per_slot
    }

    /// Queue a job without waiting; a full queue is an immediate error.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        match self.tx.try_send(job) {
            Ok(()) => {
                self.load.queued.fetch_add(1, Ordering::Relaxed);
                metrics::gauge!("isotope_queue_depth")
                    .set(self.load.queued.load(Ordering::Relaxed) as f64);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(SubmitError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::Stopped),
        }
    }

    pub fn load(&self) -> &Load {
        &self.load
    }
}

struct Running {
    job: Arc<JobShared>,
    choice: usize,
}

struct JobShared {
    events: mpsc::UnboundedSender<JobEvent>,
}

struct Waiting {
    job: Arc<JobShared>,
    choice: usize,
    req: GenerationRequest,
}

fn run(model: Arc<Model>, cfg: BatchConfig, mut rx: mpsc::Receiver<Job>, load: Arc<Load>) {
    let mut batcher = match Batcher::new(&model, cfg.clone()) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("scheduler could not create its context: {e}");
            return;
        }
    };
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut running: HashMap<SeqId, Running> = HashMap::new();
    let mut open = true;
    loop {
        // Take new jobs: block only when there is nothing else to do.
        if running.is_empty() && waiting.is_empty() {
            if !open {
                return;
            }
            match rx.blocking_recv() {
                Some(job) => enqueue(&mut waiting, job),
                None => return,
            }
        }
        while open && waiting.len() < cfg.slots * 2 {
            match rx.try_recv() {
                Ok(job) => enqueue(&mut waiting, job),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                }
            }
        }
        // Drop work whose client is gone.
        waiting.retain(|w| !w.job.events.is_closed());
        let gone: Vec<SeqId> = running
            .iter()
            .filter(|(_, r)| r.job.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            batcher.cancel(id);
            running.remove(&id);
            metrics::counter!("isotope_sequences_cancelled_total").increment(1);
        }
        // Admit waiting choices into free slots, oldest first.
        while batcher.has_free_slot() {
            let Some(w) = waiting.pop_front() else { break };
            match batcher.submit(w.req) {
                Ok(id) => {
                    running.insert(
                        id,
                        Running {
                            job: w.job,
                            choice: w.choice,
                        },
                    );
                }
                Err(e) => {
                    let _ = w.job.events.send(JobEvent::Failed {
                        choice: w.choice,
                        message: e.to_string(),
                    });
                }
            }
        }
        let distinct_waiting = waiting.len();
        load.queued
            .store(rx.len() + distinct_waiting, Ordering::Relaxed);
        load.active.store(running.len(), Ordering::Relaxed);
        metrics::gauge!("isotope_active_sequences").set(running.len() as f64);
        metrics::gauge!("isotope_queue_depth").set((rx.len() + distinct_waiting) as f64);
        if running.is_empty() {
            continue;
        }
        match batcher.step() {
            Ok(events) => {
                for event in events {
                    dispatch(&mut running, event);
                }
            }
            Err(e) => {
                tracing::error!("decode failed, resetting the context: {e}");
                for (_, r) in running.drain() {
                    let _ = r.job.events.send(JobEvent::Failed {
                        choice: r.choice,
                        message: format!("the engine failed: {e}"),
                    });
                }
                drop(batcher);
                batcher = match Batcher::new(&model, cfg.clone()) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!("scheduler could not recreate its context: {e}");
                        return;
                    }
                };
            }
        }
    }
}

fn enqueue(waiting: &mut VecDeque<Waiting>, job: Job) {
    let shared = Arc::new(JobShared { events: job.events });
    for (i, sampler) in job.samplers.into_iter().enumerate() {
        waiting.push_back(Waiting {
            job: Arc::clone(&shared),
            choice: job.first_choice + i,
            req: GenerationRequest {
                prompt: job.prompt.clone(),
                sampler,
                max_tokens: Some(job.max_tokens),
                stop: job.stop.clone(),
                top_logprobs: job.top_logprobs,
            },
        });
    }
}

fn dispatch(running: &mut HashMap<SeqId, Running>, event: Event) {
    match event {
        Event::Token { seq, sampled, text } => {
            metrics::counter!("isotope_generated_tokens_total").increment(1);
            if let Some(r) = running.get(&seq) {
                let _ = r.job.events.send(JobEvent::Token {
                    choice: r.choice,
                    sampled,
                    text,
                });
            }
        }
        Event::Finished {
            seq,
            reason,
            text,
            stats,
        } => {
            if let Some(r) = running.remove(&seq) {
                let _ = r.job.events.send(JobEvent::Finished {
                    choice: r.choice,
                    reason,
                    text,
                    stats,
                });
            }
        }
    }
}
