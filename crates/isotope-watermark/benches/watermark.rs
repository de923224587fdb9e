//! What the watermark costs: one sampling step over a SmolLM2-sized vocabulary (49,152
//! logits) with each scheme's hook against the plain sampler, and detector throughput.
//!
//! The hook skips a window it has already used and a window reaching into the prompt,
//! so a benchmark feeding the same context every step would time the skip path. Every
//! step here therefore sees a new window: the generated tokens are a buffer that gets
//! one fresh pseudo-random token per step (and starts each response with `h` of them,
//! so even the first step has a whole generated window). A fresh sampler and hook are
//! built every [`RESPONSE`] steps, as a server would per response, which keeps the
//! hook's used-window set at a realistic size and counts its per-response set-up
//! (Unigram's one green list) amortised over the response.
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use isotope_sampling::{Sampler, SamplingHook, SamplingParams, StepContext, TokenId};
use isotope_watermark::{Detector, ExcludedTokens, Scheme, WatermarkHook, WatermarkKey};

const VOCAB: usize = 49_152;
/// Steps per response: a fresh sampler and hook after this many.
const RESPONSE: u64 = 512;
/// Tokens per text in the detector benchmark.
const DETECT_TOKENS: usize = 1_000;
/// Every hooked scheme measured, as `--scheme` spells them.
const SCHEMES: [&str; 6] = [
    "kgw",
    "kgw:seeding=min",
    "kgw:seeding=self",
    "unigram",
    "gumbel",
    "synthid",
];

/// Logits shaped like a language model's: a few likely tokens, a long tail (the
/// generator of `isotope-sampling`'s sampler benchmark).
fn logits(vocab: usize) -> Vec<f32> {
    let mut x = 0x9e3779b97f4a7c15u64;
    (0..vocab)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = (x >> 40) as f32 / (1u64 << 24) as f32;
            let head = if i % 4099 == 7 { 12.0 } else { 0.0 };
            noise * 6.0 - 3.0 + head
        })
        .collect()
}

/// Pseudo-random token ids (xorshift64*).
struct Tokens(u64);

impl Tokens {
    fn next(&mut self) -> TokenId {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as TokenId % VOCAB as TokenId
    }
}

/// A hook that does nothing: its presence alone makes the sampler sort the candidates
/// (a hook may draw), which is part of what any watermark costs.
struct Noop;
impl SamplingHook for Noop {}

/// Control tokens like SmolLM2's (the first 17 ids): never biased or scored.
fn excluded() -> ExcludedTokens {
    (0..VOCAB).map(|t| t < 17).collect::<Vec<_>>().into()
}

fn key() -> Arc<WatermarkKey> {
    Arc::new(WatermarkKey::from_bytes([7; 32]))
}

fn sampling(c: &mut Criterion) {
    let l = logits(VOCAB);
    let prompt: Vec<TokenId> = (0..200).map(|i| i * 37 % VOCAB as TokenId).collect();
    let key = key();
    let excluded = excluded();
    let settings = [
        (
            "T=0.8 top_p=0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: 1,
                ..Default::default()
            },
        ),
        (
            "plain T=1",
            SamplingParams {
                seed: 1,
                ..Default::default()
            },
        ),
    ];
    let mut variants: Vec<(&str, Option<Scheme>)> = vec![("none", None), ("noop hook", None)];
    variants.extend(
        SCHEMES
            .iter()
            .map(|s| (*s, Some(s.parse().expect("valid")))),
    );

    // The steps timed below must be watermarked ones, not the hook's skip path.
    for (_, scheme) in variants.iter().skip(2) {
        let scheme = scheme.as_ref().expect("hooked");
        let mut hook = WatermarkHook::new(key.clone(), scheme, excluded.clone(), false);
        let mut rng = Tokens(1);
        let mut generated: Vec<TokenId> = (0..scheme.context()).map(|_| rng.next()).collect();
        let mut work = l.clone();
        for _ in 0..64 {
            generated.push(rng.next());
            let ctx = StepContext {
                prompt: &prompt,
                generated: &generated,
            };
            hook.bias(&ctx, &mut work);
        }
        assert_eq!(hook.watermarked_positions(), 64, "{scheme}");
    }

    let mut g = c.benchmark_group("sample_step_49152");
    for (setting, params) in &settings {
        for (name, scheme) in &variants {
            let make = || {
                let s = Sampler::new(params.clone(), 0);
                match (scheme, *name) {
                    (Some(scheme), _) => s.with_hook(Box::new(WatermarkHook::new(
                        key.clone(),
                        scheme,
                        excluded.clone(),
                        params.is_greedy(),
                    ))),
                    (None, "noop hook") => s.with_hook(Box::new(Noop)),
                    (None, _) => s,
                }
            };
            let h = scheme.as_ref().map_or(0, Scheme::context);
            g.bench_function(BenchmarkId::new(*setting, *name), |b| {
                let mut rng = Tokens(0x853c_49e6_748f_ea9b);
                b.iter_custom(|iters| {
                    let mut generated: Vec<TokenId> = Vec::with_capacity(RESPONSE as usize + h);
                    let mut elapsed = Duration::ZERO;
                    let mut i = 0;
                    while i < iters {
                        // One response: fresh sampler and hook, `h` generated tokens
                        // so the first step already has a whole window.
                        generated.clear();
                        generated.extend((0..h).map(|_| rng.next()));
                        let steps = RESPONSE.min(iters - i);
                        let start = Instant::now();
                        let mut sampler = make();
                        for _ in 0..steps {
                            generated.push(rng.next());
                            let ctx = StepContext {
                                prompt: &prompt,
                                generated: &generated,
                            };
                            black_box(sampler.sample(black_box(&l), &ctx, 0));
                        }
                        elapsed += start.elapsed();
                        i += steps;
                    }
                    elapsed
                });
            });
        }
    }
    g.finish();
}

fn detection(c: &mut Criterion) {
    let key = key();
    let excluded = excluded();
    let mut rng = Tokens(0xda3e_39cb_94b9_5bdb);
    let text: Vec<TokenId> = (0..DETECT_TOKENS).map(|_| rng.next()).collect();
    let mut g = c.benchmark_group("detect_1000_tokens");
    g.throughput(Throughput::Elements(DETECT_TOKENS as u64));
    for spec in SCHEMES {
        let det = Detector::new(key.clone(), spec.parse().expect("valid"), excluded.clone());
        g.bench_function(spec, |b| b.iter(|| det.detect(black_box(&text))));
    }
    g.finish();
}

/// The green-list bias loop alone, over 49,152 logits: the branchy loop the hook had
/// before it was made branch-free (copied from git `HEAD` of `hook.rs`, kept here as a
/// baseline) against the current one (a copy of `hook::add_green_bias`; both private,
/// so copied — keep in step with `hook.rs`). The keyed words come from any
/// pseudo-random source: only the loop is timed.
fn bias_loop(c: &mut Criterion) {
    /// `prf::is_green`.
    fn is_green(word: u32, threshold: u32) -> bool {
        (word & 0xffff) < threshold
    }
    /// Before: a branch per token on the green test and on the excluded mask.
    fn old(logits: &mut [f32], words: &[u32], excluded: &[bool], threshold: u32, delta: f32) {
        for (t, (l, &w)) in logits.iter_mut().zip(words.iter()).enumerate() {
            if is_green(w, threshold) && !excluded.get(t).copied().unwrap_or(false) {
                *l += delta;
            }
        }
    }
    /// Now: a precomputed per-token δ (0 on excluded tokens), no branch.
    fn new(logits: &mut [f32], words: &[u32], delta_mask: &[f32], threshold: u32) {
        let n = logits.len().min(words.len()).min(delta_mask.len());
        let (logits, words, delta_mask) = (&mut logits[..n], &words[..n], &delta_mask[..n]);
        for ((l, &w), &d) in logits.iter_mut().zip(words).zip(delta_mask) {
            *l += d * f32::from(u8::from(is_green(w, threshold)));
        }
    }
    let mut rng = Tokens(0x2545_f491_4f6c_dd1d);
    let words: Vec<u32> = (0..VOCAB)
        .map(|_| (rng.next() << 16) ^ rng.next())
        .collect();
    let excluded = excluded();
    let delta = 2.0f32;
    let delta_mask: Vec<f32> = excluded
        .iter()
        .map(|&e| if e { 0.0 } else { delta })
        .collect();
    let threshold = isotope_watermark::green_threshold(0.25).0;
    let base = logits(VOCAB);
    // Same result, or the comparison means nothing.
    let (mut a, mut b) = (base.clone(), base.clone());
    old(&mut a, &words, &excluded, threshold, delta);
    new(&mut b, &words, &delta_mask, threshold);
    assert_eq!(a, b);

    let mut g = c.benchmark_group("green_bias_loop_49152");
    let mut work = base.clone();
    g.bench_function("old (branchy, HEAD)", |bch| {
        bch.iter(|| {
            old(
                black_box(&mut work),
                black_box(&words),
                black_box(&excluded),
                threshold,
                delta,
            )
        })
    });
    let mut work = base.clone();
    g.bench_function("new (branch-free)", |bch| {
        bch.iter(|| {
            new(
                black_box(&mut work),
                black_box(&words),
                black_box(&delta_mask),
                threshold,
            )
        })
    });
    // What the loop sits next to in a KGW step: the window's keystream (ChaCha8, a
    // 32-bit word per vocabulary entry), as `prf::Keystream::words` makes it.
    let mut bytes = vec![0u8; VOCAB * 4];
    let mut seed = 0u8;
    g.bench_function("chacha8 keystream (context)", |bch| {
        bch.iter(|| {
            use rand_core::{RngCore, SeedableRng};
            seed = seed.wrapping_add(1);
            let mut rng = rand_chacha::ChaCha8Rng::from_seed([seed; 32]);
            rng.fill_bytes(black_box(&mut bytes));
        })
    });
    g.finish();
}

criterion_group!(benches, sampling, detection, bias_loop);
criterion_main!(benches);
