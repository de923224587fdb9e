//! Continuous batching: many independent sequences decoded together in one context.
//!
//! A [`Batcher`] owns one llama.cpp context with `slots` sequence slots. Each call to
//! [`Batcher::step`] builds one llama.cpp batch holding
//!
//! 1. the last sampled token of every decoding sequence (one token each), then
//! 2. up to `prefill_chunk` prompt tokens of sequences still reading their prompt,
//!    oldest request first,
//!
//! decodes it once, and samples the next token of every sequence whose logits came
//! out. Requests join ([`Batcher::submit`]) and leave (finish, [`Batcher::cancel`])
//! between steps; a leaving sequence's KV cache is released at once. Because long
//! prompts are fed in chunks, running decodes never stall behind a long prefill.
//!
//! The KV cache is *not* unified: llama.cpp gives each of the `n_seq_max` sequences
//! `n_ctx / n_seq_max` cells, so the context is sized as `ctx_per_slot × slots` and
//! admission checks a prompt against `ctx_per_slot`.

use std::num::NonZeroU32;
use std::time::Instant;

use isotope_sampling::{Sampled, Sampler, StepContext, TokenId};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;

use crate::score::MAX_OUTPUT_ROWS;
use crate::text::{StopMatcher, StopScan, Utf8Stream};
use crate::{model::backend, EngineError, Model};

/// Shape of a [`Batcher`]'s context.
#[derive(Clone, Debug)]
pub struct BatchConfig {
    /// Sequences decoded at once.
    pub slots: usize,
    /// Context (prompt + generated tokens) available to each sequence.
    pub ctx_per_slot: u32,
    /// Most prompt tokens fed in one step, across all prefilling sequences.
    pub prefill_chunk: usize,
    /// CPU threads; `None` uses every available core.
    pub threads: Option<usize>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            slots: 1,
            ctx_per_slot: 2048,
            prefill_chunk: 256,
            threads: None,
        }
    }
}

pub(crate) fn thread_count(threads: Option<usize>) -> i32 {
    let n = threads
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    i32::try_from(n.max(1)).unwrap_or(i32::MAX)
}

/// One generation request (one choice; `n > 1` is `n` requests with choice indices).
pub struct GenerationRequest {
    /// Prompt tokens (chat template already applied).
    pub prompt: Vec<TokenId>,
    /// The sampler, with its seed, choice index and hooks.
    pub sampler: Sampler,
    /// Most tokens to generate; `None` runs to the end of the slot's context.
    pub max_tokens: Option<usize>,
    /// Stop strings: generation ends before the first of them, which is never emitted.
    pub stop: Vec<String>,
    /// How many alternatives to report per token (0 = none).
    pub top_logprobs: usize,
}

/// Handle of a submitted sequence, unique for the life of its [`Batcher`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SeqId(pub u64);

/// Why a sequence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the slot's context is full.
    Length,
}

/// Per-sequence counts and timings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeqStats {
    /// Prompt tokens read.
    pub prompt_tokens: usize,
    /// Tokens generated (end-of-generation token excluded).
    pub completion_tokens: usize,
    /// Seconds from submission to the first sampled token (prefill, shared with
    /// whatever else was in the batch).
    pub prefill_secs: f64,
    /// Seconds from the first sampled token to the end.
    pub decode_secs: f64,
}

/// What happened to a sequence during one [`Batcher::step`].
#[derive(Clone, Debug)]
pub enum Event {
    /// A token was sampled. `text` is the newly complete text it released: valid UTF-8,
    /// never part of a stop string; it may be empty.
    Token {
        /// The sequence.
        seq: SeqId,
        /// Token, its log-probability and alternatives.
        sampled: Sampled,
        /// Text released by this token.
        text: String,
    },
    /// The sequence ended and its slot and KV cache are free.
    Finished {
        /// The sequence.
        seq: SeqId,
        /// Why.
        reason: FinishReason,
        /// Text that was still held back (an unfinished stop-string prefix, an
        /// incomplete character) and is now released.
        text: String,
        /// Counts and timings.
        stats: SeqStats,
    },
}

struct Slot {
    id: SeqId,
    prompt: Vec<TokenId>,
    /// Prompt tokens already fed to the model.
    fed: usize,
    /// Tokens in this sequence's KV cache (= next position).
    n_past: usize,
    generated: Vec<TokenId>,
    /// Sampled but not yet fed back.
    pending: Option<TokenId>,
    sampler: Sampler,
    max_tokens: usize,
    top_logprobs: usize,
    utf8: Utf8Stream,
    stops: StopMatcher,
    submitted: Instant,
    first_token: Option<Instant>,
}

impl Slot {
    fn stats(&self) -> SeqStats {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        SeqStats {
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.generated.len(),
            prefill_secs: (first - self.submitted).as_secs_f64(),
            decode_secs: (now - first).as_secs_f64(),
        }
    }
}

/// A llama.cpp context decoding up to `slots` sequences together.
pub struct Batcher<'m> {
    model: &'m Model,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    cfg: BatchConfig,
    slots: Vec<Option<Slot>>,
    next_id: u64,
}

impl<'m> Batcher<'m> {
    /// Create the context. Fails if the configuration is unusable.
    pub fn new(model: &'m Model, cfg: BatchConfig) -> Result<Self, EngineError> {
        if cfg.slots == 0 || cfg.prefill_chunk == 0 || cfg.ctx_per_slot < 2 {
            return Err(EngineError::Config(format!(
                "slots, prefill_chunk must be ≥ 1 and ctx_per_slot ≥ 2 (got {cfg:?})"
            )));
        }
        if cfg.slots > MAX_OUTPUT_ROWS {
            return Err(EngineError::Config(format!(
                "at most {MAX_OUTPUT_ROWS} slots: beyond that llama.cpp changes kernels and a \
                 sequence's tokens would depend on what else is in the batch (got {})",
                cfg.slots
            )));
        }
        if cfg.ctx_per_slot > model.n_ctx_train() {
            return Err(EngineError::Config(format!(
                "ctx_per_slot {} exceeds the model's training context {}",
                cfg.ctx_per_slot,
                model.n_ctx_train()
            )));
        }
        let capacity = cfg.prefill_chunk + cfg.slots;
        // llama.cpp pads n_ctx to a multiple of 256 and then splits it across
        // sequences; allocating whole 256-cell blocks per slot keeps the split even.
        let per_slot = cfg.ctx_per_slot.div_ceil(256) * 256;
        let n_ctx = per_slot
            .checked_mul(cfg.slots as u32)
            .ok_or_else(|| EngineError::Config("ctx_per_slot × slots overflows".into()))?;
        let threads = thread_count(cfg.threads);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx))
            .with_n_seq_max(cfg.slots as u32)
            .with_kv_unified(false)
            .with_n_batch(capacity as u32)
            .with_n_ubatch(capacity as u32)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = model
            .inner
            .new_context(backend(), params)
            .map_err(|e| EngineError::Context(e.to_string()))?;
        let slots = (0..cfg.slots).map(|_| None).collect();
        Ok(Self {
            model,
            ctx,
            batch: LlamaBatch::new(capacity, 1),
            cfg,
            slots,
            next_id: 0,
        })
    }

    /// The configuration this batcher was built with.
    pub fn config(&self) -> &BatchConfig {
        &self.cfg
    }

    /// Number of sequences in flight.
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// True if a new request can be admitted now.
    pub fn has_free_slot(&self) -> bool {
        self.active() < self.slots.len()
    }

    /// Admit a request into a free slot. It starts prefilling at the next step.
    pub fn submit(&mut self, req: GenerationRequest) -> Result<SeqId, EngineError> {
        let limit = self.cfg.ctx_per_slot as usize;
        if req.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        // The prompt plus at least one generated token must fit.
        if req.prompt.len() >= limit {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: req.prompt.len(),
                context: limit,
            });
        }
        if let Some(&bad) = req
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.model.n_vocab())
        {
            return Err(EngineError::InvalidToken(bad));
        }
        let index = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(EngineError::NoFreeSlot)?;
        let id = SeqId(self.next_id);
        self.next_id += 1;
        let max_tokens = req.max_tokens.unwrap_or(usize::MAX);
        self.slots[index] = Some(Slot {
            id,
            prompt: req.prompt,
            fed: 0,
            n_past: 0,
            generated: Vec::new(),
            pending: None,
            sampler: req.sampler,
            max_tokens,
            top_logprobs: req.top_logprobs,
            utf8: Utf8Stream::default(),
            stops: StopMatcher::new(req.stop),
            submitted: Instant::now(),
            first_token: None,
        });
        Ok(id)
    }

    /// Drop a sequence (e.g. its client went away) and free its KV cache. Returns
    /// false if it is not (or no longer) in flight.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        match self.slot_index(id) {
            Some(i) => {
                self.release(i);
                true
            }
            None => false,
        }
    }

    fn slot_index(&self, id: SeqId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.id == id))
    }

    fn release(&mut self, index: usize) -> Option<Slot> {
        let slot = self.slots[index].take()?;
        // Removing a whole sequence cannot fail for a valid id.
        let _ = self.ctx.clear_kv_cache_seq(Some(index as u32), None, None);
        Some(slot)
    }

    /// Run one decode over every sequence in flight and return what happened. Returns
    /// no events when nothing is in flight.
    ///
    /// An error from llama.cpp leaves the context in an unknown state: drop the
    /// batcher (and its sequences) after one.
    pub fn step(&mut self) -> Result<Vec<Event>, EngineError> {
        self.batch.clear();
        // (slot index, index in the batch) of every position whose logits we sample.
        let mut sample_at: Vec<(usize, i32)> = Vec::with_capacity(self.slots.len());
        let mut n: i32 = 0;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(slot) = slot else { continue };
            if let Some(tok) = slot.pending.take() {
                add(&mut self.batch, tok, slot.n_past, i, true)?;
                slot.n_past += 1;
                sample_at.push((i, n));
                n += 1;
            }
        }
        let mut budget = self.cfg.prefill_chunk;
        let mut prefilling: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                self.slots[i]
                    .as_ref()
                    .is_some_and(|s| s.fed < s.prompt.len())
            })
            .collect();
        prefilling.sort_by_key(|&i| self.slots[i].as_ref().map(|s| s.id));
        for i in prefilling {
            if budget == 0 {
                break;
            }
            let slot = self.slots[i].as_mut().expect("filtered above");
            let take = budget.min(slot.prompt.len() - slot.fed);
            for k in slot.fed..slot.fed + take {
                let last = k + 1 == slot.prompt.len();
                add(&mut self.batch, slot.prompt[k], slot.n_past, i, last)?;
                slot.n_past += 1;
                if last {
                    sample_at.push((i, n));
                }
                n += 1;
            }
            slot.fed += take;
            budget -= take;
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        self.ctx
            .decode(&mut self.batch)
            .map_err(|e| EngineError::Decode(e.to_string()))?;

        let mut events = Vec::with_capacity(sample_at.len());
        let mut finished = Vec::new();
        for (i, at) in sample_at {
            let logits = self.ctx.get_logits_ith(at);
            let slot = self.slots[i].as_mut().expect("in flight");
            let step_ctx = StepContext {
                prompt: &slot.prompt,
                generated: &slot.generated,
            };
            let sampled = slot.sampler.sample(logits, &step_ctx, slot.top_logprobs);
            slot.first_token.get_or_insert_with(Instant::now);
            let tok = sampled.token;
            if self.model.is_eog(tok) {
                finished.push((i, FinishReason::Stop, false));
                continue;
            }
            slot.generated.push(tok);
            let piece = slot.utf8.push(&self.model.token_bytes(tok));
            let (text, stopped) = match slot.stops.push(&piece) {
                StopScan::Continue(t) => (t, false),
                StopScan::Stopped(t) => (t, true),
            };
            events.push(Event::Token {
                seq: slot.id,
                sampled,
                text,
            });
            if stopped {
                finished.push((i, FinishReason::Stop, true));
            } else if slot.generated.len() >= slot.max_tokens
                || slot.n_past + 1 > self.cfg.ctx_per_slot as usize
            {
                finished.push((i, FinishReason::Length, false));
            } else {
                slot.pending = Some(tok);
            }
        }
        for (i, reason, by_stop_string) in finished {
            let mut slot = self.release(i).expect("in flight");
            let text = if by_stop_string {
                String::new()
            } else {
                let tail = slot.utf8.finish();
                let mut text = match slot.stops.push(&tail) {
                    StopScan::Continue(t) | StopScan::Stopped(t) => t,
                };
                text.push_str(&slot.stops.finish());
                text
            };
            events.push(Event::Finished {
                seq: slot.id,
                reason,
                text,
                stats: slot.stats(),
            });
        }
        Ok(events)
    }
}

fn add(
    batch: &mut LlamaBatch<'_>,
    token: TokenId,
    pos: usize,
    seq: usize,
    logits: bool,
) -> Result<(), EngineError> {
    batch
        .add(LlamaToken(token as i32), pos as i32, &[seq as i32], logits)
        .map_err(|e| EngineError::Decode(e.to_string()))
}

/// A finished single generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated text (stop string excluded).
    pub text: String,
    /// Generated token ids (end-of-generation token excluded).
    pub tokens: Vec<TokenId>,
    /// Per-token log-probabilities and alternatives.
    pub logprobs: Vec<Sampled>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Counts and timings.
    pub stats: SeqStats,
}

/// Generate one sequence, calling `on_text` with each piece of text as soon as it is
/// safe to show.
pub fn generate(
    model: &Model,
    req: GenerationRequest,
    cfg: BatchConfig,
    mut on_text: impl FnMut(&str),
) -> Result<Generation, EngineError> {
    let mut batcher = Batcher::new(model, BatchConfig { slots: 1, ..cfg })?;
    let seq = batcher.submit(req)?;
    let mut out = Generation {
        text: String::new(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        finish_reason: FinishReason::Stop,
        stats: SeqStats::default(),
    };
    loop {
        for event in batcher.step()? {
            match event {
                Event::Token { sampled, text, .. } => {
                    on_text(&text);
                    out.text.push_str(&text);
                    out.tokens.push(sampled.token);
                    out.logprobs.push(sampled);
                }
                Event::Finished {
                    reason,
                    text,
                    stats,
                    seq: done,
                } => {
                    debug_assert_eq!(done, seq);
                    on_text(&text);
                    out.text.push_str(&text);
                    out.finish_reason = reason;
                    out.stats = stats;
                    return Ok(out);
                }
            }
        }
    }
}
