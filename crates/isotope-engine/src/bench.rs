//! Throughput measurement: prompt and generation tokens/s at several concurrencies.
//!
//! Everything is measured in one run on the same model, so the rows compare: greedy
//! against full sampling (which reads and sorts the logits in Rust every step), one
//! sequence against several decoded together, and teacher-forced scoring.
//!
//! Sampler hooks (watermarks) are compared with the plain sampler as [`BenchVariant`]s:
//! the engine only ever sees a factory of [`SamplingHook`]s, never a scheme.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use isotope_sampling::{Distribution, Sampler, SamplingHook, SamplingParams, StepContext, TokenId};
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
    /// Hooked samplers to compare with the plain one (see [`VariantRow`]); none: no
    /// comparison is run.
    pub variants: Vec<BenchVariant>,
    /// Runs of each variant (and of the plain sampler) per concurrency; the best
    /// counts. At least 1.
    pub variant_rounds: usize,
}

impl BenchConfig {
    /// Concurrencies the variants are compared at: 1 and the largest of
    /// [`BenchConfig::concurrency`].
    pub fn variant_concurrencies(&self) -> Vec<usize> {
        let mut c = vec![1];
        if let Some(&max) = self.concurrency.iter().max() {
            if max > 1 {
                c.push(max);
            }
        }
        c
    }

    /// Decoding runs the variant comparison makes (for progress bars).
    pub fn variant_runs(&self) -> usize {
        if self.variants.is_empty() {
            return 0;
        }
        self.variant_concurrencies().len() * self.variant_rounds.max(1) * (self.variants.len() + 1)
    }
}

/// Builds a fresh hook for one sequence; the argument says whether the sampler is
/// greedy. `None` means the plain sampler.
pub type HookFactory = Arc<dyn Fn(bool) -> Option<Box<dyn SamplingHook>> + Send + Sync>;

/// A sampler hook measured side by side with the plain sampler (e.g. a watermark
/// scheme, built by the caller: the engine knows nothing of watermarks).
#[derive(Clone)]
pub struct BenchVariant {
    /// Name shown in the report.
    pub name: String,
    /// One hook per sequence.
    pub hook: HookFactory,
}

impl fmt::Debug for BenchVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BenchVariant")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// One variant at one concurrency, against the plain sampler of the same run.
#[derive(Clone, Debug, Serialize)]
pub struct VariantRow {
    /// `none` (the plain sampler) or the variant's name.
    pub variant: String,
    /// Always `sampled` (T=0.8, top-p 0.95), where every scheme acts as itself
    /// (greedy would turn the distortion-free ones into KGW).
    pub sampler: String,
    /// Sequences decoded together.
    pub concurrency: usize,
    /// Generation tokens/s (all sequences) of each run, in the order they ran.
    pub runs_gen_tokens_per_sec: Vec<f64>,
    /// The best of `runs_gen_tokens_per_sec`.
    pub gen_tokens_per_sec: f64,
    /// Tokens timed in the best run: all but each sequence's first, so
    /// `concurrency × (gen_tokens − 1)` (end-of-generation is banned in these runs).
    pub gen_tokens: usize,
    /// `gen_tokens_per_sec` ÷ the plain sampler's (1 for `none`).
    pub vs_plain: f64,
    /// Wall time per generated token minus the plain sampler's, in µs: the cost of
    /// the hook as decoding sees it (noisy: decode steps vary by several %).
    pub extra_us_per_token: f64,
    /// Time spent inside the hook's `bias`/`draw`/`on_token` per sampled token, in
    /// µs, over all runs (timed directly, so far less noisy; excludes what the
    /// sampler itself does differently with a hook, e.g. sorting the candidates).
    pub hook_us_per_token: f64,
    /// `hook_us_per_token` as a fraction of the plain sampler's wall time per
    /// generated token: the share of decoding the hook takes (0 for `none`).
    pub hook_share: f64,
}

/// Progress of the variant comparison: one decoding run finished.
#[derive(Clone, Debug)]
pub struct VariantRun {
    /// `none` or the variant's name.
    pub variant: String,
    /// Sequences decoded together.
    pub concurrency: usize,
    /// Round, from 0.
    pub round: usize,
    /// Generation tokens/s of this run.
    pub gen_tokens_per_sec: f64,
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
    /// Hooked samplers against the plain one, per concurrency (`none` first).
    pub variants: Vec<VariantRow>,
    /// Runs each variant's best was taken from.
    pub variant_rounds: usize,
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

/// The `sampled` row's sampler: T=0.8, top-p 0.95, seed 1.
fn sampled_params() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: 1,
        ..SamplingParams::default()
    }
}

/// Run the benchmark; `on_row` is called as each row completes, `on_run` as each
/// decoding run of the variant comparison does.
pub fn run(
    model: &Model,
    cfg: &BenchConfig,
    mut on_row: impl FnMut(&BenchRow),
    on_run: impl FnMut(&VariantRun),
) -> Result<BenchReport, EngineError> {
    let samplers = [
        ("greedy", SamplingParams::greedy()),
        ("sampled", sampled_params()),
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
    let variants = compare_variants(model, cfg, on_run)?;
    Ok(BenchReport {
        model: model.path().display().to_string(),
        threads: thread_count(cfg.threads),
        prompt_tokens: cfg.prompt_tokens,
        gen_tokens: cfg.gen_tokens,
        rows,
        score_tokens_per_sec,
        variants,
        variant_rounds: cfg.variant_rounds.max(1),
    })
}

/// The variant comparison. Decode speed on a shared CPU drifts and jitters by ±10%
/// over a run — far more than a hook costs — so the runs are arranged to cancel that:
/// - every run uses the same prompts, seeds (sequence `i` is choice `i` of seed 1)
///   and concurrency as the plain sampler's, in the same process and batcher set-up;
/// - the plain sampler and the variants are interleaved, in the order
///   `none, v1, …, vn` in even rounds and reversed in odd ones, so slow drift hits
///   every variant alike, and each takes the best of `variant_rounds` runs, since
///   interference from other processes only ever slows a run down;
/// - every sequence runs to `gen_tokens`: end-of-generation tokens are banned (logit
///   −∞, after the variant's own bias) in every run, the plain sampler's included.
///   Otherwise a variant whose text happens to end early would decode smaller
///   batches and look faster or slower for it. For the plain sampler that ban is its
///   only hook; at top-p < 1 the sampler sorts the nucleus anyway, so the ban costs
///   a few nanoseconds and takes no other code path;
/// - besides tokens/s, the time inside the hook is measured directly by wrapping it
///   ([`VariantRow::hook_us_per_token`]), which decode noise does not affect.
fn compare_variants(
    model: &Model,
    cfg: &BenchConfig,
    mut on_run: impl FnMut(&VariantRun),
) -> Result<Vec<VariantRow>, EngineError> {
    if cfg.variants.is_empty() {
        return Ok(Vec::new());
    }
    let params = sampled_params();
    let rounds = cfg.variant_rounds.max(1);
    let eog: Arc<[TokenId]> = (0..model.n_vocab() as TokenId)
        .filter(|&t| model.is_eog(t))
        .collect();
    let mut names = vec!["none".to_owned()];
    names.extend(cfg.variants.iter().map(|v| v.name.clone()));
    let mut out = Vec::new();
    for n in cfg.variant_concurrencies() {
        // Per variant (index 0: plain): each run's (tok/s, tokens), hook ns, hook calls.
        let mut runs: Vec<Vec<(f64, usize)>> = vec![Vec::new(); names.len()];
        let mut hook_time = vec![(0u64, 0u64); names.len()];
        for round in 0..rounds {
            let mut order: Vec<usize> = (0..names.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for v in order {
                let timer = HookTimer::default();
                let inner = (v > 0).then(|| timed(cfg.variants[v - 1].hook.clone(), &timer));
                let hook = full_length(eog.clone(), inner);
                let m = run_batch(model, cfg, &params, n, Some(&hook))?;
                let tps = m.gen_tokens_per_sec();
                runs[v].push((tps, m.decoded));
                hook_time[v].0 += timer.nanos.load(Ordering::Relaxed);
                hook_time[v].1 += timer.tokens.load(Ordering::Relaxed);
                on_run(&VariantRun {
                    variant: names[v].clone(),
                    concurrency: n,
                    round,
                    gen_tokens_per_sec: tps,
                });
            }
        }
        let best = |r: &[(f64, usize)]| {
            r.iter()
                .copied()
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap_or((0.0, 0))
        };
        let plain = best(&runs[0]).0;
        for (v, name) in names.iter().enumerate() {
            let (tps, tokens) = best(&runs[v]);
            let (nanos, calls) = hook_time[v];
            let hook_us = nanos as f64 / 1e3 / calls.max(1) as f64;
            out.push(VariantRow {
                variant: name.clone(),
                sampler: "sampled".into(),
                concurrency: n,
                runs_gen_tokens_per_sec: runs[v].iter().map(|r| r.0).collect(),
                gen_tokens_per_sec: tps,
                gen_tokens: tokens,
                vs_plain: tps / plain.max(1e-9),
                extra_us_per_token: 1e6 / tps.max(1e-9) - 1e6 / plain.max(1e-9),
                hook_us_per_token: hook_us,
                hook_share: hook_us * plain / 1e6,
            });
        }
    }
    Ok(out)
}

/// Each sequence's hook from `inner` (if any), followed by a ban on the `eog` tokens.
fn full_length(eog: Arc<[TokenId]>, inner: Option<HookFactory>) -> HookFactory {
    Arc::new(move |greedy| {
        Some(Box::new(FullLength {
            eog: eog.clone(),
            inner: inner.as_ref().and_then(|f| f(greedy)),
        }) as Box<dyn SamplingHook>)
    })
}

/// Runs `inner`, then sets the end-of-generation tokens' logits to −∞.
struct FullLength {
    eog: Arc<[TokenId]>,
    inner: Option<Box<dyn SamplingHook>>,
}

impl SamplingHook for FullLength {
    fn bias(&mut self, ctx: &StepContext<'_>, logits: &mut [f32]) {
        if let Some(h) = self.inner.as_mut() {
            h.bias(ctx, logits);
        }
        for &t in self.eog.iter() {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    fn draw(&mut self, ctx: &StepContext<'_>, dist: &Distribution<'_>, u: f64) -> Option<TokenId> {
        self.inner.as_mut().and_then(|h| h.draw(ctx, dist, u))
    }

    fn on_token(&mut self, ctx: &StepContext<'_>, token: TokenId) {
        if let Some(h) = self.inner.as_mut() {
            h.on_token(ctx, token);
        }
    }
}

/// Time spent inside a hook, summed over the sequences of one run.
#[derive(Clone, Default)]
struct HookTimer {
    nanos: Arc<AtomicU64>,
    /// Tokens chosen (`on_token` calls).
    tokens: Arc<AtomicU64>,
}

/// `factory`, with every hook it builds timed into `timer`.
fn timed(factory: HookFactory, timer: &HookTimer) -> HookFactory {
    let timer = timer.clone();
    Arc::new(move |greedy| {
        factory(greedy).map(|inner| {
            Box::new(Timed {
                inner,
                timer: timer.clone(),
            }) as Box<dyn SamplingHook>
        })
    })
}

/// A hook that times another.
struct Timed {
    inner: Box<dyn SamplingHook>,
    timer: HookTimer,
}

impl Timed {
    fn add(&self, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.timer.nanos.fetch_add(ns, Ordering::Relaxed);
    }
}

impl SamplingHook for Timed {
    fn bias(&mut self, ctx: &StepContext<'_>, logits: &mut [f32]) {
        let t = Instant::now();
        self.inner.bias(ctx, logits);
        self.add(t);
    }

    fn draw(&mut self, ctx: &StepContext<'_>, dist: &Distribution<'_>, u: f64) -> Option<TokenId> {
        let t = Instant::now();
        let token = self.inner.draw(ctx, dist, u);
        self.add(t);
        token
    }

    fn on_token(&mut self, ctx: &StepContext<'_>, token: TokenId) {
        let t = Instant::now();
        self.inner.on_token(ctx, token);
        self.add(t);
        self.timer.tokens.fetch_add(1, Ordering::Relaxed);
    }
}

fn measure(
    model: &Model,
    cfg: &BenchConfig,
    name: &str,
    params: &SamplingParams,
    n: usize,
) -> Result<BenchRow, EngineError> {
    let m = run_batch(model, cfg, params, n, None)?;
    let gen_tps = m.gen_tokens_per_sec();
    Ok(BenchRow {
        engine: "isotope".into(),
        sampler: name.to_owned(),
        concurrency: n,
        prompt_tokens_per_sec: (n * cfg.prompt_tokens) as f64 / m.prefill_secs.max(1e-9),
        gen_tokens_per_sec: gen_tps,
        gen_tokens_per_sec_per_seq: gen_tps / n as f64,
    })
}

/// Timings of one batched run.
struct Measured {
    /// Until every sequence had its first token.
    prefill_secs: f64,
    /// From then until all finished.
    decode_secs: f64,
    /// Tokens generated during `decode_secs`.
    decoded: usize,
}

impl Measured {
    fn gen_tokens_per_sec(&self) -> f64 {
        self.decoded as f64 / self.decode_secs.max(1e-9)
    }
}

/// `n` sequences (prompt `i`, choice `i` of `params`' seed) decoded together, each
/// sampler with a hook from `hook` when given.
fn run_batch(
    model: &Model,
    cfg: &BenchConfig,
    params: &SamplingParams,
    n: usize,
    hook: Option<&HookFactory>,
) -> Result<Measured, EngineError> {
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
        let mut sampler = Sampler::new(params.clone(), i as u64);
        if let Some(h) = hook.and_then(|f| f(params.is_greedy())) {
            sampler = sampler.with_hook(h);
        }
        batcher.submit(GenerationRequest {
            prompt: prompt(model, cfg.prompt_tokens, i),
            sampler,
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
    Ok(Measured {
        prefill_secs: prefill,
        decode_secs: start.elapsed().as_secs_f64(),
        decoded,
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
