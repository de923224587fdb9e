//! Throughput measurement: prompt and generation tokens/s at several concurrencies.
//!
//! Everything is measured in one run on the same model, so the rows compare: greedy
//! against full sampling (which reads and sorts the logits in Rust every step), one
//! sequence against several decoded together, and teacher-forced scoring.

use std::time::Instant;

use isotope_sampling::{Sampler, SamplingParams, TokenId};
use serde::Serialize;

use std::num::NonZeroU32;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use crate::batch::thread_count;
use crate::model::backend;
use crate::{BatchConfig, Batcher, EngineError, Event, GenerationRequest, Model};

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Concurrent sequences per row.
    pub concurrency: Vec<usize>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens generated per sequence.
    pub gen_tokens: usize,
    /// CPU threads (`None`: all cores).
    pub threads: Option<usize>,
}

/// One measured row.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// `isotope` (our batcher and Rust sampler) or `llama.cpp` (its own sampler chain
    /// in a plain single-sequence loop: the anchor).
    pub engine: String,
    /// `greedy` or `sampled` (T=0.8, top-p 0.95).
    pub sampler: String,
    /// Sequences decoded together.
    pub concurrency: usize,
    /// Prompt tokens read per second (all sequences together).
    pub prompt_tokens_per_sec: f64,
    /// Tokens generated per second (all sequences together).
    pub gen_tokens_per_sec: f64,
    /// Generation tokens/s per sequence.
    pub gen_tokens_per_sec_per_seq: f64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Model file.
    pub model: String,
    /// CPU threads used.
    pub threads: i32,
    /// Prompt length per sequence.
    pub prompt_tokens: usize,
    /// Generated tokens per sequence.
    pub gen_tokens: usize,
    /// Rows, one per (sampler, concurrency).
    pub rows: Vec<BenchRow>,
    /// Teacher-forced scoring throughput (tokens/s, with top-20 alternatives).
    pub score_tokens_per_sec: f64,
}

/// A deterministic prompt of exactly `n` tokens; `salt` makes sequences differ.
fn prompt(model: &Model, n: usize, salt: usize) -> Vec<TokenId> {
    let text = format!(
        "Request {salt}. Summarise the following notes about rivers, mountains, cities and \
         the history of trade between them, then answer questions about them. "
    );
    let base = model.tokenize(&text, false, false);
    base.iter().copied().cycle().take(n.max(1)).collect()
}

/// Run the benchmark; `on_row` is called as each row completes.
pub fn run(
    model: &Model,
    cfg: &BenchConfig,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<BenchReport, EngineError> {
    let samplers = [
        ("greedy", SamplingParams::greedy()),
        (
            "sampled",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
    ];
    let mut rows = Vec::new();
    for (name, params) in &samplers {
        // The anchor first: llama.cpp's own sampler on one sequence, no batcher.
        let row = anchor(model, cfg, name, params)?;
        on_row(&row);
        rows.push(row);
        for &n in &cfg.concurrency {
            let row = measure(model, cfg, name, params, n)?;
            on_row(&row);
            rows.push(row);
        }
    }
    let text = prompt(model, 512, 0);
    let t = Instant::now();
    let scored = model.score(&text, 20, cfg.threads)?.len();
    let score_tokens_per_sec = scored as f64 / t.elapsed().as_secs_f64();
    Ok(BenchReport {
        model: model.path().display().to_string(),
        threads: thread_count(cfg.threads),
        prompt_tokens: cfg.prompt_tokens,
        gen_tokens: cfg.gen_tokens,
        rows,
        score_tokens_per_sec,
    })
}

fn measure(
    model: &Model,
    cfg: &BenchConfig,
    name: &str,
    params: &SamplingParams,
    n: usize,
) -> Result<BenchRow, EngineError> {
    let mut batcher = Batcher::new(
        model,
        BatchConfig {
            slots: n,
            ctx_per_slot: (cfg.prompt_tokens + cfg.gen_tokens + 8) as u32,
            prefill_chunk: 512,
            threads: cfg.threads,
        },
    )?;
    for i in 0..n {
        batcher.submit(GenerationRequest {
            prompt: prompt(model, cfg.prompt_tokens, i),
            sampler: Sampler::new(params.clone(), i as u64),
            max_tokens: Some(cfg.gen_tokens),
            stop: vec![],
            top_logprobs: 0,
        })?;
    }
    // Phase 1: until every sequence has its first token (prefill of all prompts).
    let start = Instant::now();
    let mut started = std::collections::HashSet::new();
    while started.len() < n && batcher.active() > 0 {
        for e in batcher.step()? {
            if let Event::Token { seq, .. } = e {
                started.insert(seq);
            }
        }
    }
    let prefill = start.elapsed().as_secs_f64();
    // Phase 2: decoding until all are done.
    let start = Instant::now();
    let mut decoded = 0usize;
    while batcher.active() > 0 {
        for e in batcher.step()? {
            if matches!(e, Event::Token { .. }) {
                decoded += 1;
            }
        }
    }
    let decode = start.elapsed().as_secs_f64();
    let gen_tps = decoded as f64 / decode.max(1e-9);
    Ok(BenchRow {
        engine: "isotope".into(),
        sampler: name.to_owned(),
        concurrency: n,
        prompt_tokens_per_sec: (n * cfg.prompt_tokens) as f64 / prefill.max(1e-9),
        gen_tokens_per_sec: gen_tps,
        gen_tokens_per_sec_per_seq: gen_tps / n as f64,
    })
}

/// llama.cpp's own sampler chain (greedy, or temperature → top-p → dist) on one
/// sequence in a minimal decode loop: what our batcher + Rust sampler is compared to.
fn anchor(
    model: &Model,
    cfg: &BenchConfig,
    name: &str,
    params: &SamplingParams,
) -> Result<BenchRow, EngineError> {
    let err = |e: &dyn std::fmt::Display| EngineError::Decode(e.to_string());
    let threads = thread_count(cfg.threads);
    let n_ctx = ((cfg.prompt_tokens + cfg.gen_tokens + 8) as u32).div_ceil(256) * 256;
    let ctx_params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(512)
        .with_n_ubatch(512)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model
        .inner
        .new_context(backend(), ctx_params)
        .map_err(|e| EngineError::Context(e.to_string()))?;
    let mut sampler = if params.is_greedy() {
        LlamaSampler::greedy()
    } else {
        LlamaSampler::chain_simple([
            LlamaSampler::temp(params.temperature),
            LlamaSampler::top_p(params.top_p, 1),
            LlamaSampler::dist(params.seed as u32),
        ])
    };
    let prompt = prompt(model, cfg.prompt_tokens, 0);
    let mut batch = LlamaBatch::new(prompt.len().max(1), 1);
    let start = std::time::Instant::now();
    for (i, &t) in prompt.iter().enumerate() {
        batch
            .add(LlamaToken(t as i32), i as i32, &[0], i + 1 == prompt.len())
            .map_err(|e| err(&e))?;
    }
    ctx.decode(&mut batch).map_err(|e| err(&e))?;
    let mut token = sampler.sample(&ctx, batch.n_tokens() - 1);
    let prefill = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    for pos in prompt.len()..prompt.len() + cfg.gen_tokens - 1 {
        batch.clear();
        batch
            .add(token, pos as i32, &[0], true)
            .map_err(|e| err(&e))?;
        ctx.decode(&mut batch).map_err(|e| err(&e))?;
        token = sampler.sample(&ctx, 0);
    }
    let decode = start.elapsed().as_secs_f64();
    let gen_tps = (cfg.gen_tokens - 1) as f64 / decode.max(1e-9);
    Ok(BenchRow {
        engine: "llama.cpp".into(),
        sampler: name.to_owned(),
        concurrency: 1,
        prompt_tokens_per_sec: cfg.prompt_tokens as f64 / prefill.max(1e-9),
        gen_tokens_per_sec: gen_tps,
        gen_tokens_per_sec_per_seq: gen_tps,
    })
}
