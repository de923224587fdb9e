//! `isotope eval watermark`: detection power, quality cost and robustness of each
//! scheme on real model output.
//!
//! For a seeded sample of prompts from `data/` (Self-Instruct instructions and GSM8K
//! questions, half each), the model answers every prompt once without a watermark and
//! once per scheme, with the *same* sampling seed per prompt, several sequences at a
//! time through the engine's [`Batcher`]. Then:
//!
//! - **power** by length bucket: the first `L` generated tokens of each response that
//!   reached `L` (EOS may end a response earlier; the count is reported) are tested;
//!   TPR at each α and the median p-value, and the same test on the unwatermarked
//!   answers (the control: its rate estimates the FPR);
//! - **quality**: perplexity of the outputs under the unwatermarked model (teacher
//!   forced, [`Model::score`], token-weighted over all responses) against the
//!   unwatermarked answers', and the mean length change;
//! - **robustness** on the first `robust_tokens` tokens: random substitution of 10 /
//!   25 / 50% of the tokens (seeded, by random non-control vocabulary tokens); a
//!   `crop_tokens` crop from the middle; that crop pasted into `mix_factor` times as much
//!   human text (held-out split), found by the windowed detector (p-value corrected
//!   for the spans it tried).
//!
//! With [`PowerOptions::entropy_rules`], every length bucket also shows
//! **entropy-aware** detection (SWEET): the unwatermarked model reads each response
//! (after a fixed prefix, not the prompt, which a detector does not have —
//! [`crate::entropy`]) and only positions whose next-token entropy passes the rule are
//! scored — the same responses, the same key, side by side with the plain detector,
//! and the same on the control. The model pass's throughput is reported.
//! [`PowerOptions::prompt_skip`] leaves out the first prompts of the seeded sample, so
//! a rule can be tuned on prompts the evaluation does not use.

use std::sync::Arc;
use std::time::Instant;

use isotope_engine::{
    BatchConfig, Batcher, ChatMessage, EngineError, Event, GenerationRequest, Model, SeqId,
};
use isotope_sampling::{Sampler, SamplingParams, TokenId};
use isotope_watermark::{
    CommonTuples, Detection, Detector, EntropyRule, Scheme, WatermarkHook, WatermarkKey,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

use crate::data::HumanText;
use crate::entropy::{batch_entropies, rule_weights, EntropyBatch, PositionEntropy};

/// Knobs of [`evaluate`].
#[derive(Clone, Debug)]
pub struct PowerOptions {
    /// Schemes to evaluate.
    pub schemes: Vec<Scheme>,
    /// Responses per scheme (and unwatermarked).
    pub n: usize,
    /// Tokens generated per response at most (EOS may end it earlier).
    pub max_tokens: usize,
    /// Lengths at which the first `L` tokens are tested.
    pub buckets: Vec<usize>,
    /// P-value thresholds.
    pub alphas: Vec<f64>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Seed of the prompt sample, the sampling seeds and the attacks.
    pub seed: u64,
    /// Sequences decoded at once.
    pub concurrency: usize,
    /// CPU threads (`None`: all).
    pub threads: Option<usize>,
    /// Fractions of tokens substituted in the edit attack.
    pub edit_rates: Vec<f64>,
    /// Length of the responses' prefix attacked (responses shorter are skipped).
    pub robust_tokens: usize,
    /// Length of the crop.
    pub crop_tokens: usize,
    /// Human text around the pasted crop, as a multiple of its length.
    pub mix_factor: usize,
    /// Shortest span (scored tuples) of the windowed detector.
    pub min_span: usize,
    /// Tuples never scored (common in human text); `None` scores all.
    pub common: Option<Arc<CommonTuples>>,
    /// Measure perplexity (costs one scoring pass per response).
    pub quality: bool,
    /// Entropy-aware detection rules shown beside the plain detector (empty: none,
    /// and no model pass).
    pub entropy_rules: Vec<EntropyRule>,
    /// Prompts of the seeded sample skipped before the `n` used (half from each kind),
    /// so that a tuning run and an evaluation run see disjoint prompts.
    pub prompt_skip: usize,
}

impl Default for PowerOptions {
    fn default() -> Self {
        Self {
            schemes: Scheme::NAMES
                .iter()
                .map(|n| Scheme::by_name(n).expect("known"))
                .collect(),
            n: 100,
            max_tokens: 256,
            buckets: vec![32, 64, 128, 256],
            alphas: vec![1e-3, 1e-4, 1e-6],
            temperature: 0.8,
            seed: 0x150_7095,
            concurrency: 8,
            threads: None,
            edit_rates: vec![0.1, 0.25, 0.5],
            robust_tokens: 128,
            crop_tokens: 64,
            mix_factor: 4,
            min_span: 16,
            common: None,
            quality: true,
            entropy_rules: Vec::new(),
            prompt_skip: 0,
        }
    }
}

/// Rate of `p ≤ α`.
#[derive(Clone, Debug, Serialize)]
pub struct RateAt {
    /// The threshold.
    pub alpha: f64,
    /// Fraction of the tests at or below it.
    pub rate: f64,
}

/// A family of tests.
#[derive(Clone, Debug, Serialize)]
pub struct Rates {
    /// Tests run.
    pub tests: usize,
    /// Rate at each α: TPR on watermarked text, FPR on the control.
    pub at: Vec<RateAt>,
    /// Median p-value.
    pub median_p: f64,
    /// Median log10 p-value (below f64's range too).
    pub median_log10_p: f64,
    /// Mean scored tuples per test.
    pub mean_scored: f64,
    /// Mean tuples left out as common per test.
    pub mean_common_excluded: f64,
}

impl Rates {
    fn of(alphas: &[f64], ds: &[Detection]) -> Self {
        let n = ds.len();
        let mut logs: Vec<f64> = ds.iter().map(|d| d.log10_p_value).collect();
        logs.sort_by(f64::total_cmp);
        let median_log10_p = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            logs[n / 2]
        } else {
            (logs[n / 2 - 1] + logs[n / 2]) / 2.0
        };
        let mean = |f: &dyn Fn(&Detection) -> f64| {
            if n == 0 {
                0.0
            } else {
                ds.iter().map(f).sum::<f64>() / n as f64
            }
        };
        Self {
            tests: n,
            at: alphas
                .iter()
                .map(|&alpha| RateAt {
                    alpha,
                    rate: if n == 0 {
                        0.0
                    } else {
                        ds.iter().filter(|d| d.p_value <= alpha).count() as f64 / n as f64
                    },
                })
                .collect(),
            median_p: 10f64.powf(median_log10_p),
            median_log10_p,
            mean_scored: mean(&|d| d.scored_tokens as f64),
            mean_common_excluded: mean(&|d| d.common_excluded as f64),
        }
    }

    /// Rate at `alpha`, if measured.
    pub fn at(&self, alpha: f64) -> Option<f64> {
        self.at.iter().find(|r| r.alpha == alpha).map(|r| r.rate)
    }
}

/// One length bucket.
#[derive(Clone, Debug, Serialize)]
pub struct BucketRow {
    /// `L`: tokens tested per response.
    pub tokens: usize,
    /// Watermarked responses with at least `L` tokens, tested on their first `L`.
    pub watermarked: Rates,
    /// Unwatermarked responses with at least `L` tokens, same key and scheme.
    pub control: Rates,
    /// The same responses under entropy-aware detection, one entry per rule (empty
    /// without [`PowerOptions::entropy_rules`]).
    pub entropy_aware: Vec<EntropyAwareRow>,
}

/// Entropy-aware detection under one rule.
#[derive(Clone, Debug, Serialize)]
pub struct EntropyAwareRow {
    /// The rule, e.g. `shannon:0.6`.
    pub rule: String,
    /// On the watermarked responses.
    pub watermarked: Rates,
    /// On the unwatermarked responses.
    pub control: Rates,
    /// Mean share of the positions after the first `h` that the rule keeps, on the
    /// watermarked responses.
    pub kept_share: f64,
}

/// Speed of the entropy-aware detector.
#[derive(Clone, Debug, Serialize)]
pub struct DetectorSpeed {
    /// Tokens read by the model pass (every response, plain and watermarked).
    pub tokens: u64,
    /// Seconds of the model pass (entropies included).
    pub model_seconds: f64,
    /// Seconds of the masked detections (every bucket and rule).
    pub detect_seconds: f64,
    /// Tokens detected per second including the model pass: `tokens / (model pass +
    /// one masked detection of each response)`.
    pub tokens_per_sec: f64,
}

/// One attack.
#[derive(Clone, Debug, Serialize)]
pub struct RobustRow {
    /// What was done, e.g. `edit 25%`, `crop 64`, `mixed 64 in 256`.
    pub attack: String,
    /// On watermarked text.
    pub watermarked: Rates,
    /// The same attack on unwatermarked text.
    pub control: Rates,
}

/// Quality cost.
#[derive(Clone, Debug, Serialize)]
pub struct Quality {
    /// Perplexity of the watermarked outputs under the unwatermarked model.
    pub ppl_watermarked: Option<f64>,
    /// Perplexity of the unwatermarked outputs.
    pub ppl_plain: Option<f64>,
    /// Mean generated tokens, watermarked.
    pub mean_tokens: f64,
    /// Mean generated tokens, unwatermarked.
    pub mean_tokens_plain: f64,
    /// `mean_tokens / mean_tokens_plain − 1`.
    pub length_change: f64,
}

/// Everything measured for one scheme.
#[derive(Clone, Debug, Serialize)]
pub struct SchemePower {
    /// Canonical scheme spec.
    pub scheme: String,
    /// Power per length bucket.
    pub buckets: Vec<BucketRow>,
    /// Quality cost.
    pub quality: Quality,
    /// Attacks.
    pub robustness: Vec<RobustRow>,
    /// Generated tokens per second (batched).
    pub gen_tokens_per_sec: f64,
}

/// The result of [`evaluate`].
#[derive(Clone, Debug, Serialize)]
pub struct PowerReport {
    /// Key tested.
    pub key_id: String,
    /// Responses per scheme.
    pub n: usize,
    /// Tokens generated at most.
    pub max_tokens: usize,
    /// Temperature.
    pub temperature: f32,
    /// Seed.
    pub seed: u64,
    /// Sequences decoded at once.
    pub concurrency: usize,
    /// Whether common tuples were left out.
    pub common_filter: bool,
    /// Thresholds.
    pub alphas: Vec<f64>,
    /// Unwatermarked generation, tokens per second.
    pub plain_tokens_per_sec: f64,
    /// Entropy-aware rules shown (canonical strings).
    pub entropy_rules: Vec<String>,
    /// Prompts skipped at the start of the seeded sample.
    pub prompt_skip: usize,
    /// Throughput of entropy-aware detection (with the model pass), if any rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy_detector: Option<DetectorSpeed>,
    /// Per scheme.
    pub schemes: Vec<SchemePower>,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Prompts: a seeded sample of `n` instructions and questions, half each, after
/// skipping the first `skip` of the sample (half each too).
fn sample_prompts(texts: &[HumanText], n: usize, skip: usize, seed: u64) -> Vec<String> {
    let pick = |suffix: &str, skip: usize, k: usize, stream: u64| {
        let mut pool: Vec<&str> = texts
            .iter()
            .filter(|t| t.source.ends_with(suffix))
            .map(|t| t.text.as_str())
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        shuffle(&mut pool, &mut rng);
        pool.into_iter()
            .skip(skip)
            .take(k)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let a = pick(":instruction", skip / 2, n / 2, 1);
    let b = pick(":question", skip - skip / 2, n - a.len(), 2);
    // Interleave so any prefix of the run mixes both kinds.
    let mut out = Vec::with_capacity(n);
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => break,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
    out
}

fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Generate one response per prompt with `sampler(i)`, `concurrency` at a time.
fn generate_all(
    model: &Model,
    prompts: &[Vec<TokenId>],
    opts: &PowerOptions,
    mut sampler: impl FnMut(usize) -> Sampler,
    mut tick: impl FnMut(),
) -> Result<(Vec<Vec<TokenId>>, f64), EngineError> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let cfg = BatchConfig {
        slots: opts.concurrency.max(1),
        ctx_per_slot: ((longest + opts.max_tokens + 8) as u32).min(model.n_ctx_train()),
        threads: opts.threads,
        ..BatchConfig::default()
    };
    let mut batcher = Batcher::new(model, cfg)?;
    let mut out: Vec<Vec<TokenId>> = vec![Vec::new(); prompts.len()];
    let mut index: Vec<(SeqId, usize)> = Vec::new();
    let (mut next, mut done) = (0, 0);
    let start = Instant::now();
    while done < prompts.len() {
        while next < prompts.len() && batcher.has_free_slot() {
            let id = batcher.submit(GenerationRequest {
                prompt: prompts[next].clone(),
                sampler: sampler(next),
                max_tokens: Some(opts.max_tokens),
                stop: Vec::new(),
                top_logprobs: 0,
            })?;
            index.push((id, next));
            next += 1;
        }
        for event in batcher.step()? {
            let (seq, token) = match &event {
                Event::Token { seq, sampled, .. } => (*seq, Some(sampled.token)),
                Event::Finished { seq, .. } => (*seq, None),
            };
            let i = index
                .iter()
                .find(|(s, _)| *s == seq)
                .map(|&(_, i)| i)
                .expect("submitted");
            match token {
                Some(t) => out[i].push(t),
                None => {
                    done += 1;
                    tick();
                }
            }
        }
    }
    let tokens: usize = out.iter().map(Vec::len).sum();
    Ok((out, tokens as f64 / start.elapsed().as_secs_f64().max(1e-9)))
}

/// Token-weighted perplexity of `responses` after their prompts.
fn perplexity(
    model: &Model,
    prompts: &[Vec<TokenId>],
    responses: &[Vec<TokenId>],
    threads: Option<usize>,
    mut tick: impl FnMut(),
) -> Result<f64, EngineError> {
    let (mut nll, mut n) = (0.0f64, 0usize);
    for (p, r) in prompts.iter().zip(responses) {
        if !r.is_empty() {
            let mut all = p.clone();
            all.extend_from_slice(r);
            let scores = model.score(&all, 0, threads)?;
            // scores[k] is token k + 1 given tokens ..= k: the response starts at
            // index p.len() − 1.
            for s in &scores[p.len() - 1..] {
                nll -= f64::from(s.logprob);
                n += 1;
            }
        }
        tick();
    }
    Ok((nll / n.max(1) as f64).exp())
}

/// Substitute `rate` of the tokens at random positions with random non-control tokens.
fn edit(tokens: &[TokenId], rate: f64, vocab: &[TokenId], rng: &mut ChaCha8Rng) -> Vec<TokenId> {
    let mut out = tokens.to_vec();
    let mut positions: Vec<usize> = (0..out.len()).collect();
    shuffle(&mut positions, rng);
    let k = (rate * out.len() as f64).round() as usize;
    for &p in &positions[..k.min(out.len())] {
        out[p] = vocab[(rng.next_u64() % vocab.len() as u64) as usize];
    }
    out
}

/// `span` pasted at a random token boundary inside `mix_factor × len` human tokens.
fn mixed(span: &[TokenId], human: &[TokenId], rng: &mut ChaCha8Rng) -> Vec<TokenId> {
    let at = (rng.next_u64() % (human.len() as u64 + 1)) as usize;
    let mut out = human[..at].to_vec();
    out.extend_from_slice(span);
    out.extend_from_slice(&human[at..]);
    out
}

/// Human token streams of `len` tokens each, from held-out texts in a seeded order.
fn human_streams(
    model: &Model,
    texts: &[HumanText],
    count: usize,
    len: usize,
    seed: u64,
) -> Vec<Vec<TokenId>> {
    let mut pool: Vec<&HumanText> = texts
        .iter()
        .filter(|t| !t.is_reference() && !t.source.ends_with(":question"))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(3);
    shuffle(&mut pool, &mut rng);
    let mut pool = pool.into_iter().cycle();
    (0..count)
        .map(|_| {
            let mut s = Vec::with_capacity(len + 64);
            while s.len() < len {
                let t = pool.next().expect("non-empty pool");
                s.extend(model.tokenize(&format!("{}\n\n", t.text), false, false));
            }
            s.truncate(len);
            s
        })
        .collect()
}

/// Progress: `(phase, done, total)` over all phases.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// Run the evaluation (see the module docs). `texts` are the human corpora (prompts
/// come from their instructions/questions, mixing text from their held-out split).
pub fn evaluate(
    model: &Model,
    texts: &[HumanText],
    key: Arc<WatermarkKey>,
    opts: &PowerOptions,
    progress: Progress<'_>,
) -> Result<PowerReport, EngineError> {
    let start = Instant::now();
    let s = opts.schemes.len();
    let passes = 1 + usize::from(opts.quality) + usize::from(!opts.entropy_rules.is_empty());
    let total = opts.n * (s + 1) * passes;
    let mut done = 0usize;
    let mut step = |phase: &str| {
        done += 1;
        progress(phase, done, total);
    };
    let prompts: Vec<Vec<TokenId>> = sample_prompts(texts, opts.n, opts.prompt_skip, opts.seed)
        .into_iter()
        .map(|p| model.chat_tokens(&[ChatMessage::new("user", p)]))
        .collect::<Result<_, _>>()?;
    let excluded: Arc<[bool]> = model.control_mask().into();
    let params = |i: usize| SamplingParams {
        temperature: opts.temperature,
        seed: opts.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        ..SamplingParams::default()
    };
    let (plain, plain_tps) = generate_all(
        model,
        &prompts,
        opts,
        |i| Sampler::new(params(i), 0),
        || step("unwatermarked"),
    )?;
    // The model reads only what the buckets test.
    let longest_bucket = opts.buckets.iter().copied().max().unwrap_or(0);
    let shortest_bucket = opts.buckets.iter().copied().min().unwrap_or(0);
    let mut speed = DetectorSpeed {
        tokens: 0,
        model_seconds: 0.0,
        detect_seconds: 0.0,
        tokens_per_sec: 0.0,
    };
    let entropies_of = |rs: &[Vec<TokenId>],
                        scheme: &Scheme,
                        speed: &mut DetectorSpeed,
                        step: &mut dyn FnMut(&str)|
     -> Result<Vec<Vec<PositionEntropy>>, EngineError> {
        if opts.entropy_rules.is_empty() {
            return Ok(Vec::new());
        }
        // Responses shorter than every bucket are never tested: not read (empty).
        let cut: Vec<Vec<TokenId>> = rs
            .iter()
            .map(|r| {
                if r.len() < shortest_bucket {
                    Vec::new()
                } else {
                    r[..r.len().min(longest_bucket)].to_vec()
                }
            })
            .collect();
        let EntropyBatch {
            entropies,
            tokens,
            seconds,
        } = batch_entropies(model, &cut, scheme, opts.threads, || step("entropy"))?;
        speed.tokens += tokens;
        speed.model_seconds += seconds;
        Ok(entropies)
    };
    // The spike modulus is the scheme's, so the control is read once per scheme below;
    // Shannon entropies do not depend on it.
    let plain_entropies = entropies_of(
        &plain,
        opts.schemes.first().unwrap_or(&Scheme::kgw()),
        &mut speed,
        &mut step,
    )?;
    let ppl_plain = if opts.quality {
        Some(perplexity(model, &prompts, &plain, opts.threads, || {
            step("perplexity")
        })?)
    } else {
        None
    };
    let vocab: Vec<TokenId> = (0..model.n_vocab() as TokenId)
        .filter(|&t| !excluded[t as usize])
        .collect();
    let humans = human_streams(
        model,
        texts,
        opts.n,
        opts.crop_tokens * opts.mix_factor,
        opts.seed,
    );
    let mean_len =
        |r: &[Vec<TokenId>]| r.iter().map(Vec::len).sum::<usize>() as f64 / r.len().max(1) as f64;

    let mut schemes = Vec::with_capacity(s);
    for scheme in &opts.schemes {
        let greedy = opts.temperature == 0.0;
        let (marked, tps) = generate_all(
            model,
            &prompts,
            opts,
            |i| {
                let hook = WatermarkHook::new(key.clone(), scheme, excluded.clone(), greedy);
                Sampler::new(params(i), 0).with_hook(Box::new(hook))
            },
            || step(scheme.name()),
        )?;
        let ppl = if opts.quality {
            Some(perplexity(model, &prompts, &marked, opts.threads, || {
                step("perplexity")
            })?)
        } else {
            None
        };
        let marked_entropies = entropies_of(&marked, scheme, &mut speed, &mut step)?;
        let control_entropies = if opts.schemes.first() == Some(scheme) {
            plain_entropies.clone()
        } else {
            // Only the spike modulus differs: recompute it from the stored Shannon
            // pass would need the logits again, so read the control once more.
            entropies_of(&plain, scheme, &mut speed, &mut |_| {})?
        };
        let applied = if greedy {
            scheme.for_greedy()
        } else {
            scheme.clone()
        };
        let mut detector = Detector::new(key.clone(), applied.clone(), excluded.clone());
        if let Some(c) = &opts.common {
            detector = detector.with_common(c.clone());
        }
        let mut detect_seconds = 0.0f64;
        let rates = |rs: &[Vec<TokenId>], f: &dyn Fn(&[TokenId]) -> Option<Detection>| {
            let ds: Vec<Detection> = rs.iter().filter_map(|r| f(r)).collect();
            Rates::of(&opts.alphas, &ds)
        };
        let buckets = opts
            .buckets
            .iter()
            .map(|&l| {
                let f = |r: &[TokenId]| (r.len() >= l).then(|| detector.detect(&r[..l]));
                let entropy_aware = opts
                    .entropy_rules
                    .iter()
                    .map(|rule| {
                        let t0 = Instant::now();
                        let masked = |rs: &[Vec<TokenId>], es: &[Vec<PositionEntropy>]| {
                            let ds: Vec<Detection> = rs
                                .iter()
                                .zip(es)
                                .filter(|(r, _)| r.len() >= l)
                                .map(|(r, e)| {
                                    detector.detect_weighted(
                                        &r[..l],
                                        &rule_weights(rule, &e[..l], &applied),
                                    )
                                })
                                .collect();
                            Rates::of(&opts.alphas, &ds)
                        };
                        let h = applied.context();
                        let (mut kept, mut of) = (0usize, 0usize);
                        for (r, e) in marked.iter().zip(&marked_entropies) {
                            if r.len() >= l && l > h {
                                kept += rule_weights(rule, &e[h..l], &applied)
                                    .iter()
                                    .filter(|&&w| w > 0)
                                    .count();
                                of += l - h;
                            }
                        }
                        let row = EntropyAwareRow {
                            rule: rule.to_string(),
                            watermarked: masked(&marked, &marked_entropies),
                            control: masked(&plain, &control_entropies),
                            kept_share: kept as f64 / of.max(1) as f64,
                        };
                        detect_seconds += t0.elapsed().as_secs_f64();
                        row
                    })
                    .collect();
                BucketRow {
                    tokens: l,
                    watermarked: rates(&marked, &f),
                    control: rates(&plain, &f),
                    entropy_aware,
                }
            })
            .collect();

        // Attacks, each seeded per (attack, response) so the control sees the same.
        let rt = opts.robust_tokens;
        let attacked =
            |rs: &[Vec<TokenId>],
             attack: u64,
             f: &dyn Fn(&[TokenId], &mut ChaCha8Rng, usize) -> Detection| {
                let ds: Vec<Detection> = rs
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.len() >= rt)
                    .map(|(i, r)| {
                        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ attack);
                        rng.set_stream(i as u64);
                        f(&r[..rt], &mut rng, i)
                    })
                    .collect();
                Rates::of(&opts.alphas, &ds)
            };
        let mut robustness = Vec::new();
        for (k, &rate) in opts.edit_rates.iter().enumerate() {
            let f = |r: &[TokenId], rng: &mut ChaCha8Rng, _: usize| {
                detector.detect(&edit(r, rate, &vocab, rng))
            };
            robustness.push(RobustRow {
                attack: format!("edit {:.0}% of {rt}", rate * 100.0),
                watermarked: attacked(&marked, 100 + k as u64, &f),
                control: attacked(&plain, 100 + k as u64, &f),
            });
        }
        let ct = opts.crop_tokens.min(rt);
        let crop = |r: &[TokenId]| {
            let a = (r.len() - ct) / 2;
            r[a..a + ct].to_vec()
        };
        let f = |r: &[TokenId], _: &mut ChaCha8Rng, _: usize| detector.detect(&crop(r));
        robustness.push(RobustRow {
            attack: format!("crop {ct} of {rt}"),
            watermarked: attacked(&marked, 200, &f),
            control: attacked(&plain, 200, &f),
        });
        let f = |r: &[TokenId], rng: &mut ChaCha8Rng, i: usize| {
            let text = mixed(&crop(r), &humans[i % humans.len()], rng);
            detector.detect_windowed(&text, opts.min_span).detection
        };
        robustness.push(RobustRow {
            attack: format!("mixed: {ct} in {} human (windowed)", ct * opts.mix_factor),
            watermarked: attacked(&marked, 300, &f),
            control: attacked(&plain, 300, &f),
        });

        // Detections per response: one per bucket and rule, watermarked and control.
        let per_response = (opts.buckets.len() * opts.entropy_rules.len() * 2).max(1);
        speed.detect_seconds += detect_seconds / per_response as f64;
        let (mt, mp) = (mean_len(&marked), mean_len(&plain));
        schemes.push(SchemePower {
            scheme: applied.to_string(),
            buckets,
            quality: Quality {
                ppl_watermarked: ppl,
                ppl_plain,
                mean_tokens: mt,
                mean_tokens_plain: mp,
                length_change: if mp > 0.0 { mt / mp - 1.0 } else { 0.0 },
            },
            robustness,
            gen_tokens_per_sec: tps,
        });
    }
    Ok(PowerReport {
        key_id: key.id().to_owned(),
        n: opts.n,
        max_tokens: opts.max_tokens,
        temperature: opts.temperature,
        seed: opts.seed,
        concurrency: opts.concurrency,
        common_filter: opts.common.is_some(),
        alphas: opts.alphas.clone(),
        plain_tokens_per_sec: plain_tps,
        entropy_rules: opts.entropy_rules.iter().map(ToString::to_string).collect(),
        prompt_skip: opts.prompt_skip,
        entropy_detector: (!opts.entropy_rules.is_empty()).then(|| DetectorSpeed {
            tokens_per_sec: speed.tokens as f64
                / (speed.model_seconds + speed.detect_seconds).max(1e-9),
            ..speed
        }),
        schemes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The report as a text table.
pub fn render(r: &PowerReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let alphas: Vec<String> = r.alphas.iter().map(|a| format!("TPR@{a:.0e}")).collect();
    let _ = writeln!(
        s,
        "key {}, n = {} per scheme, ≤ {} tokens, T = {}, seed {}, common-tuple filter {}, \
         {:.0} s; unwatermarked generation {:.0} tok/s",
        r.key_id,
        r.n,
        r.max_tokens,
        r.temperature,
        r.seed,
        if r.common_filter { "on" } else { "off" },
        r.seconds,
        r.plain_tokens_per_sec
    );
    if let Some(d) = &r.entropy_detector {
        let _ = writeln!(
            s,
            "entropy-aware detection (rules {}; prompts skipped {}): {:.0} tok/s with the model \
             pass ({} tokens, {:.1} s model, {:.2} s detection)",
            r.entropy_rules.join(", "),
            r.prompt_skip,
            d.tokens_per_sec,
            d.tokens,
            d.model_seconds,
            d.detect_seconds
        );
    }
    for sc in &r.schemes {
        let q = &sc.quality;
        let ppl = |p: Option<f64>| p.map_or("-".into(), |p| format!("{p:.2}"));
        let _ = writeln!(
            s,
            "\n{}  ({:.0} tok/s) perplexity {} vs {} unwatermarked; mean length {:.1} vs {:.1} \
             ({:+.1}%)",
            sc.scheme,
            sc.gen_tokens_per_sec,
            ppl(q.ppl_watermarked),
            ppl(q.ppl_plain),
            q.mean_tokens,
            q.mean_tokens_plain,
            q.length_change * 100.0
        );
        let _ = writeln!(
            s,
            "  {:<34} {:>5} {}  {:>10} {:>7}  | control {}",
            "tokens / attack",
            "n",
            alphas
                .iter()
                .map(|a| format!("{a:>10}"))
                .collect::<String>(),
            "median p",
            "scored",
            r.alphas
                .iter()
                .map(|a| format!("FPR@{a:.0e} "))
                .collect::<String>()
        );
        let row = |s: &mut String, label: &str, w: &Rates, c: &Rates| {
            let _ = writeln!(
                s,
                "  {label:<34} {:>5} {}  {:>10.2e} {:>7.1}  | {:>5} {}",
                w.tests,
                w.at.iter()
                    .map(|a| format!("{:>10.3}", a.rate))
                    .collect::<String>(),
                w.median_p,
                w.mean_scored,
                c.tests,
                c.at.iter()
                    .map(|a| format!("{:>9.3} ", a.rate))
                    .collect::<String>()
            );
        };
        for b in &sc.buckets {
            row(
                &mut s,
                &format!("first {} tokens", b.tokens),
                &b.watermarked,
                &b.control,
            );
            for e in &b.entropy_aware {
                row(
                    &mut s,
                    &format!("  entropy-aware {} ({:.0}%)", e.rule, e.kept_share * 100.0),
                    &e.watermarked,
                    &e.control,
                );
            }
        }
        for a in &sc.robustness {
            row(&mut s, &a.attack, &a.watermarked, &a.control);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_substitute_the_requested_share() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let t: Vec<TokenId> = (0..100).collect();
        let vocab: Vec<TokenId> = (1000..2000).collect();
        let e = edit(&t, 0.25, &vocab, &mut rng);
        assert_eq!(e.iter().zip(&t).filter(|(a, b)| a != b).count(), 25);
    }

    #[test]
    fn mixing_keeps_the_span_whole() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let m = mixed(&[7, 8, 9], &[1, 2, 3, 4], &mut rng);
        assert_eq!(m.len(), 7);
        assert!(m.windows(3).any(|w| w == [7, 8, 9]));
    }

    #[test]
    fn rates_and_medians() {
        let d = |p: f64| Detection {
            scheme: String::new(),
            key_id: String::new(),
            scored_tokens: 10,
            common_excluded: 2,
            statistic: 0.0,
            p_value: p,
            log10_p_value: p.log10(),
            weighted: None,
        };
        let r = Rates::of(&[1e-3], &[d(1e-5), d(0.5), d(1e-4)]);
        assert_eq!(r.tests, 3);
        assert!((r.at(1e-3).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.median_p - 1e-4).abs() < 1e-12);
        assert_eq!(r.mean_common_excluded, 2.0);
    }
}
