//! Calibration of the detectors on unwatermarked human text, per fixed key.
//!
//! A detector's p-value claims `P(p ≤ α) ≤ α` for text written without the key. A
//! provider runs it with *one* key for years, so the claim that matters is per fixed
//! key, over the texts it is shown. For each scheme and each key we therefore run the
//! detector over thousands of human texts and measure:
//!
//! - the empirical false-positive rate at each nominal `α`, with a two-sided
//!   Clopper–Pearson interval; the test is *valid* at `α` unless the interval lies
//!   entirely above `α` (a discrete test may be — and is — conservative, so an FPR
//!   below `α` is fine);
//! - a Kolmogorov–Smirnov test of the p-values against `U(0, 1)`. The binomial tests
//!   (KGW, Unigram, SynthID) have discrete p-values, stochastically larger than
//!   uniform, so KS uses the *randomised* p-value `P(X > x) + U·P(X = x)`, `U ~ U(0,1)`
//!   from a fixed-seed RNG, which is exactly uniform under the null. Gumbel's Gamma
//!   test is continuous and uses the raw p-value.
//!
//! The same at corpus level (disjoint corpora of ~20 texts, one deduplicated test
//! each), and a negative control: the detector *without* deduplication, on the human
//! texts and on synthetic repetitive ones (a human sentence repeated), where its
//! p-values are invalid — which shows the checks above can fail.
//!
//! With [`CalibrationOptions::weights`] (one weight vector per human text, e.g. from
//! [`crate::entropy::entropy_weights`]) the per-text, corpus and fresh-key tests are
//! *entropy-aware*: only positions of non-zero weight are scored, each with its weight
//! (weights 0/1 are a mask; larger ones a weighted test, whose randomised p-value uses
//! the weighted statistic's own exact tail). The repetitive texts of the negative
//! control have no weights and are tested as before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use isotope_engine::Model;
use isotope_sampling::TokenId;
use isotope_watermark::stats::{clopper_pearson, ks_uniform, ln_binomial_sf};
use isotope_watermark::weighted::ln_weighted_binomial_sf;
use isotope_watermark::{green_threshold, CommonTuples, Detection, Detector, Scheme, WatermarkKey};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

use crate::data::{repetitive_texts, HumanText};

/// Knobs of [`calibrate_with`]; [`Default`] is what [`calibrate`] uses.
#[derive(Clone, Debug)]
pub struct CalibrationOptions {
    /// Nominal levels at which false-positive rates are measured.
    pub alphas: Vec<f64>,
    /// Confidence of the two-sided Clopper–Pearson intervals.
    pub confidence: f64,
    /// Number of disjoint corpora for the corpus-level test.
    pub corpora: usize,
    /// Texts per corpus (fewer if there are not `corpora × corpus_size` texts).
    pub corpus_size: usize,
    /// Synthetic repetitive texts for the no-dedup control.
    pub repetitive: usize,
    /// Times each sentence is repeated in a synthetic repetitive text.
    pub repeats: usize,
    /// Fresh keys per text (and per corpus) in the fresh-key control.
    pub fresh_replicates: usize,
    /// Seed of the randomisation of discrete p-values and of the corpus split.
    pub seed: u64,
    /// Worker threads; 0 = the machine's available parallelism.
    pub threads: usize,
    /// Tuples never scored because they are common in (other) human text; `None`
    /// scores every tuple. Applies to every detector run here, the controls included.
    pub common: Option<Arc<CommonTuples>>,
    /// Position weights, one vector per human text in the order given to
    /// [`calibrate_with`] (tokenized as there: no BOS, no special tokens); weight 0, a
    /// text without weights, or a position past its vector's end is not scored.
    /// `None` scores every position with weight 1.
    pub weights: Option<Arc<Vec<Vec<u8>>>>,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            alphas: vec![1e-2, 1e-3],
            confidence: 0.99,
            corpora: 500,
            corpus_size: 20,
            repetitive: 200,
            repeats: 8,
            fresh_replicates: 1,
            seed: 0x150_7095,
            threads: 0,
            common: None,
            weights: None,
        }
    }
}

/// Empirical false-positive rate at one nominal level.
#[derive(Clone, Debug, Serialize)]
pub struct FprAt {
    /// Nominal level `α`.
    pub alpha: f64,
    /// Tests with `p ≤ α`.
    pub rejections: u64,
    /// `rejections / tests`.
    pub fpr: f64,
    /// Lower end of the two-sided Clopper–Pearson interval.
    pub ci_low: f64,
    /// Upper end of the interval.
    pub ci_high: f64,
    /// `α ≥ ci_low`: the FPR is not significantly above `α`.
    pub valid: bool,
}

/// One family of tests (one key, or pooled over keys).
#[derive(Clone, Debug, Serialize)]
pub struct TestSummary {
    /// Tests with at least one scored tuple.
    pub tests: u64,
    /// Tests with nothing to score (left out of everything else).
    pub untested: u64,
    /// Mean scored tuples per test.
    pub mean_scored: f64,
    /// Mean tuples per test left out as common in human text.
    pub mean_common_excluded: f64,
    /// False-positive rate at each `α`.
    pub fpr: Vec<FprAt>,
    /// Kolmogorov–Smirnov `D` of the p-values against `U(0, 1)`.
    pub ks_d: f64,
    /// Its p-value.
    pub ks_p: f64,
    /// Whether KS used randomised p-values (discrete tests).
    pub ks_randomised: bool,
    /// One-sided KS `D⁺ = sup (F_n(x) − x)`: how far the p-values are stochastically
    /// *smaller* than uniform (the anti-conservative direction).
    pub ks_d_plus: f64,
    /// Its asymptotic p-value, `exp(−2λ²)` with `λ = (√n + 0.12 + 0.11/√n) D⁺`.
    pub ks_p_plus: f64,
}

impl TestSummary {
    /// True if every FPR is valid.
    pub fn fpr_valid(&self) -> bool {
        self.fpr.iter().all(|f| f.valid)
    }

    /// The FPR entry at `alpha`, if measured.
    pub fn at(&self, alpha: f64) -> Option<&FprAt> {
        self.fpr.iter().find(|f| f.alpha == alpha)
    }
}

/// One key's summary.
#[derive(Clone, Debug, Serialize)]
pub struct KeySummary {
    /// The key's public id.
    pub key_id: String,
    /// Its tests.
    pub summary: TestSummary,
}

/// Tests under every key, and pooled.
#[derive(Clone, Debug, Serialize)]
pub struct Level {
    /// One entry per key, in the order given.
    pub per_key: Vec<KeySummary>,
    /// All keys' tests together.
    pub pooled: TestSummary,
}

/// The detector without deduplication (invalid by design).
#[derive(Clone, Debug, Serialize)]
pub struct NoDedupControl {
    /// On the human texts.
    pub human: Level,
    /// On the synthetic repetitive texts.
    pub repetitive: Level,
    /// For contrast: the normal (deduplicating) detector on the repetitive texts.
    pub repetitive_with_dedup: Level,
}

/// The same tests with a *fresh* key for every text (and every corpus), repeated
/// [`CalibrationOptions::fresh_replicates`] times: the p-values
/// are then independent across tests and, if the detector's arithmetic is right,
/// exactly uniform (randomised) — separating "the test is exact over random keys"
/// from "it is valid for one fixed key on this corpus".
#[derive(Clone, Debug, Serialize)]
pub struct FreshKeyControl {
    /// One test per human text, each under its own key.
    pub per_text: TestSummary,
    /// One test per corpus, each under its own key.
    pub corpus: TestSummary,
}

/// Everything measured for one scheme.
#[derive(Clone, Debug, Serialize)]
pub struct SchemeCalibration {
    /// Canonical scheme spec.
    pub scheme: String,
    /// Whether the test statistic is discrete (binomial).
    pub discrete: bool,
    /// One test per human text.
    pub per_text: Level,
    /// One test per corpus.
    pub corpus: Level,
    /// Negative control.
    pub no_dedup: NoDedupControl,
    /// Fresh key per test.
    pub fresh_key: FreshKeyControl,
    /// Largest `|ln P(X ≥ x) − ln p| / max(1, |ln p|)` between the tail recomputed
    /// here from the detection's count and the detector's own p-value (0 for Gumbel):
    /// checks that the randomisation uses the detector's exact statistic.
    pub max_ln_p_mismatch: f64,
}

/// The result of [`calibrate`].
#[derive(Clone, Debug, Serialize)]
pub struct CalibrationReport {
    /// Human texts tested.
    pub texts: usize,
    /// Their tokens in total.
    pub tokens: u64,
    /// Synthetic repetitive texts (no-dedup control).
    pub repetitive_texts: usize,
    /// Corpora in the corpus-level test.
    pub corpora: usize,
    /// Texts per corpus.
    pub corpus_size: usize,
    /// Ids of the keys, in order.
    pub keys: Vec<String>,
    /// Nominal levels.
    pub alphas: Vec<f64>,
    /// Confidence of the intervals.
    pub confidence: f64,
    /// Worker threads used.
    pub threads: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// One entry per scheme, in the order given.
    pub schemes: Vec<SchemeCalibration>,
}

/// `n` fixed, random-looking keys: secret `i` is BLAKE3 of a fixed label and `i`.
pub fn fixed_keys(n: usize) -> Vec<Arc<WatermarkKey>> {
    (0..n)
        .map(|i| Arc::new(labelled_key(&format!("isotope-eval calibration key {i}"))))
        .collect()
}

fn labelled_key(label: &str) -> WatermarkKey {
    WatermarkKey::from_bytes(*blake3::hash(label.as_bytes()).as_bytes())
}

/// Calibrate every scheme under every key with [`CalibrationOptions::default`].
/// `progress(done, total)` is called on the calling thread as (scheme, key) jobs
/// finish.
pub fn calibrate(
    model: &Model,
    texts: &[HumanText],
    keys: &[Arc<WatermarkKey>],
    schemes: &[Scheme],
    progress: impl Fn(usize, usize),
) -> CalibrationReport {
    calibrate_with(
        model,
        texts,
        keys,
        schemes,
        &CalibrationOptions::default(),
        progress,
    )
}

/// The raw outcome of one family of tests under one key.
#[derive(Default)]
struct Outcome {
    tested: u64,
    untested: u64,
    scored: u64,
    common: u64,
    /// Rejections at each α.
    rejections: Vec<u64>,
    /// P-values for KS (randomised where discrete).
    ks_samples: Vec<f64>,
}

/// The distribution of a discrete statistic: `(N trials, hit probability, trials per
/// scored tuple)`, or `None` for a continuous one.
fn discrete_law(scheme: &Scheme) -> Option<(f64, f64)> {
    match *scheme {
        Scheme::Kgw { gamma, .. } | Scheme::Unigram { gamma, .. } => {
            Some((green_threshold(gamma).1, 1.0))
        }
        Scheme::SynthId { layers, .. } => Some((0.5, f64::from(layers))),
        Scheme::Gumbel { .. } => None,
    }
}

/// Turns detections into an [`Outcome`], randomising discrete p-values.
struct Recorder<'a> {
    alphas: &'a [f64],
    law: Option<(f64, f64)>,
    rng: ChaCha8Rng,
    mismatch: f64,
    out: Outcome,
}

impl<'a> Recorder<'a> {
    fn new(alphas: &'a [f64], scheme: &Scheme, seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self {
            alphas,
            law: discrete_law(scheme),
            rng,
            mismatch: 0.0,
            out: Outcome {
                rejections: vec![0; alphas.len()],
                ..Outcome::default()
            },
        }
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn record(&mut self, d: &Detection) {
        if d.scored_tokens == 0 {
            self.out.untested += 1;
            return;
        }
        self.out.tested += 1;
        self.out.scored += d.scored_tokens;
        self.out.common += d.common_excluded;
        for (r, &a) in self.out.rejections.iter_mut().zip(self.alphas) {
            if d.p_value <= a {
                *r += 1;
            }
        }
        let sample = match self.law {
            None => d.p_value,
            Some((q, scale)) => {
                // The detector's statistic is hits / (tuples · scale) with an integer
                // number of hits among `tuples · scale` Bernoulli(q) trials.
                // A weighted test (`d.weighted`) has its own exact tail.
                let trials = d.scored_tokens * scale as u64;
                let hits = (d.statistic * trials as f64).round() as u64;
                let sf = |k: u64| match &d.weighted {
                    Some(w) => ln_weighted_binomial_sf(&w.levels, k, q),
                    None => ln_binomial_sf(k, trials, q),
                };
                let hits = d.weighted.as_ref().map_or(hits, |w| w.observed);
                let ln_ge = sf(hits);
                let ln_p = d.log10_p_value * std::f64::consts::LN_10;
                let diff = (ln_ge - ln_p).abs() / ln_p.abs().max(1.0);
                if diff.is_finite() {
                    self.mismatch = self.mismatch.max(diff);
                } else if ln_ge != ln_p {
                    self.mismatch = f64::INFINITY;
                }
                let ge = d.p_value;
                let gt = sf(hits + 1).exp();
                let u = self.uniform();
                (gt + u * (ge - gt).max(0.0)).clamp(0.0, 1.0)
            }
        };
        self.out.ks_samples.push(sample);
    }
}

/// The five families of one (scheme, key) job.
struct JobResult {
    per_text: Outcome,
    corpus: Outcome,
    no_dedup_human: Outcome,
    no_dedup_repetitive: Outcome,
    dedup_repetitive: Outcome,
    mismatch: f64,
}

/// A unit of work: one scheme under one fixed key, or one scheme under fresh keys.
#[derive(Clone, Copy)]
enum Job {
    Fixed { scheme: usize, key: usize },
    Fresh { scheme: usize, replicate: usize },
}

enum Done {
    Fixed(Box<JobResult>),
    Fresh(usize, Outcome, Outcome),
}

struct Inputs<'a> {
    human: &'a [Vec<TokenId>],
    repetitive: &'a [Vec<TokenId>],
    corpora: &'a [Vec<usize>],
    excluded: Arc<[bool]>,
    opts: &'a CalibrationOptions,
}

impl Inputs<'_> {
    fn detector(&self, key: Arc<WatermarkKey>, scheme: &Scheme) -> Detector {
        let d = Detector::new(key, scheme.clone(), self.excluded.clone());
        match &self.opts.common {
            Some(c) => d.with_common(c.clone()),
            None => d,
        }
    }

    /// Test human text `i` (weighted if weights are given).
    fn detect(&self, d: &Detector, i: usize) -> Detection {
        match &self.opts.weights {
            Some(w) => d.detect_weighted(&self.human[i], w.get(i).map_or(&[][..], |v| v)),
            None => d.detect(&self.human[i]),
        }
    }

    /// Test corpus `c` as one deduplicated test (weighted if weights are given).
    fn detect_corpus(&self, d: &Detector, c: &[usize]) -> Detection {
        match &self.opts.weights {
            Some(m) => d.detect_corpus_weighted(c.iter().map(|&i| {
                (
                    self.human[i].as_slice(),
                    m.get(i).map_or(&[][..], |v| v.as_slice()),
                )
            })),
            None => d.detect_corpus(c.iter().map(|&i| self.human[i].as_slice())),
        }
    }
}

fn run_job(inputs: &Inputs<'_>, key: &Arc<WatermarkKey>, scheme: &Scheme, job: u64) -> JobResult {
    let alphas = &inputs.opts.alphas;
    let seed = inputs.opts.seed;
    let detector = inputs.detector(key.clone(), scheme);
    let raw = detector.clone().without_dedup();
    let mut mismatch = 0.0f64;
    let mut family = |stream: u64, run: &mut dyn FnMut(&mut Recorder<'_>)| {
        let mut rec = Recorder::new(alphas, scheme, seed, job * 8 + stream);
        run(&mut rec);
        mismatch = mismatch.max(rec.mismatch);
        rec.out
    };
    let per_text = family(0, &mut |rec| {
        for i in 0..inputs.human.len() {
            rec.record(&inputs.detect(&detector, i));
        }
    });
    let corpus = family(1, &mut |rec| {
        for c in inputs.corpora {
            rec.record(&inputs.detect_corpus(&detector, c));
        }
    });
    let no_dedup_human = family(2, &mut |rec| {
        for t in inputs.human {
            rec.record(&raw.detect(t));
        }
    });
    let no_dedup_repetitive = family(3, &mut |rec| {
        for t in inputs.repetitive {
            rec.record(&raw.detect(t));
        }
    });
    let dedup_repetitive = family(4, &mut |rec| {
        for t in inputs.repetitive {
            rec.record(&detector.detect(t));
        }
    });
    JobResult {
        per_text,
        corpus,
        no_dedup_human,
        no_dedup_repetitive,
        dedup_repetitive,
        mismatch,
    }
}

/// Every text and every corpus under its own key.
fn run_fresh(
    inputs: &Inputs<'_>,
    scheme: &Scheme,
    (index, replicate): (usize, usize),
    job: u64,
) -> (Outcome, Outcome) {
    let opts = inputs.opts;
    let detector = |what: &str, i: usize| {
        let key = labelled_key(&format!(
            "isotope-eval fresh key {} {index} {replicate} {what} {i}",
            opts.seed
        ));
        inputs.detector(Arc::new(key), scheme)
    };
    let mut rec = Recorder::new(&opts.alphas, scheme, opts.seed, job * 8);
    for i in 0..inputs.human.len() {
        rec.record(&inputs.detect(&detector("text", i), i));
    }
    let per_text = rec.out;
    let mut rec = Recorder::new(&opts.alphas, scheme, opts.seed, job * 8 + 1);
    for (i, c) in inputs.corpora.iter().enumerate() {
        rec.record(&inputs.detect_corpus(&detector("corpus", i), c));
    }
    (per_text, rec.out)
}

/// One-sided KS against `U(0, 1)` in the direction "stochastically smaller": the
/// direction in which a test is invalid. Returns `(D+, p)` with the asymptotic
/// `p = exp(−2λ²)`. Conservative (discrete) p-values pass it, as they should.
pub fn ks_plus(samples: &[f64]) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 1.0);
    }
    let mut x = samples.to_vec();
    x.sort_by(f64::total_cmp);
    let n = x.len() as f64;
    let d = x
        .iter()
        .enumerate()
        .map(|(i, &v)| (i + 1) as f64 / n - v.clamp(0.0, 1.0))
        .fold(0.0, f64::max);
    let lambda = (n.sqrt() + 0.12 + 0.11 / n.sqrt()) * d;
    (d, (-2.0 * lambda * lambda).exp().min(1.0))
}

fn summarise(outcomes: &[&Outcome], opts: &CalibrationOptions, randomised: bool) -> TestSummary {
    let tests: u64 = outcomes.iter().map(|o| o.tested).sum();
    let untested = outcomes.iter().map(|o| o.untested).sum();
    let scored: u64 = outcomes.iter().map(|o| o.scored).sum();
    let common: u64 = outcomes.iter().map(|o| o.common).sum();
    let fpr = opts
        .alphas
        .iter()
        .enumerate()
        .map(|(i, &alpha)| {
            let rejections: u64 = outcomes.iter().map(|o| o.rejections[i]).sum();
            let (ci_low, ci_high) = clopper_pearson(rejections, tests, 1.0 - opts.confidence);
            FprAt {
                alpha,
                rejections,
                fpr: if tests == 0 {
                    0.0
                } else {
                    rejections as f64 / tests as f64
                },
                ci_low,
                ci_high,
                valid: alpha >= ci_low,
            }
        })
        .collect();
    let samples: Vec<f64> = outcomes
        .iter()
        .flat_map(|o| o.ks_samples.iter().copied())
        .collect();
    let (ks_d, ks_p) = ks_uniform(&samples);
    let (ks_d_plus, ks_p_plus) = ks_plus(&samples);
    TestSummary {
        tests,
        untested,
        mean_scored: if tests == 0 {
            0.0
        } else {
            scored as f64 / tests as f64
        },
        mean_common_excluded: if tests == 0 {
            0.0
        } else {
            common as f64 / tests as f64
        },
        fpr,
        ks_d,
        ks_p,
        ks_randomised: randomised,
        ks_d_plus,
        ks_p_plus,
    }
}

fn level(
    results: &[JobResult],
    keys: &[Arc<WatermarkKey>],
    opts: &CalibrationOptions,
    randomised: bool,
    pick: impl Fn(&JobResult) -> &Outcome,
) -> Level {
    let per_key = results
        .iter()
        .zip(keys)
        .map(|(r, k)| KeySummary {
            key_id: k.id().to_owned(),
            summary: summarise(&[pick(r)], opts, randomised),
        })
        .collect();
    let all: Vec<&Outcome> = results.iter().map(&pick).collect();
    Level {
        per_key,
        pooled: summarise(&all, opts, randomised),
    }
}

/// [`calibrate`] with explicit options.
pub fn calibrate_with(
    model: &Model,
    texts: &[HumanText],
    keys: &[Arc<WatermarkKey>],
    schemes: &[Scheme],
    opts: &CalibrationOptions,
    progress: impl Fn(usize, usize),
) -> CalibrationReport {
    let start = Instant::now();
    let tokenize = |t: &HumanText| model.tokenize(&t.text, false, false);
    let human: Vec<Vec<TokenId>> = texts.iter().map(tokenize).collect();
    let repetitive: Vec<Vec<TokenId>> = repetitive_texts(texts, opts.repetitive, opts.repeats)
        .iter()
        .map(tokenize)
        .collect();

    // Disjoint corpora over a fixed-seed shuffle of the texts, so each mixes sources.
    let mut order: Vec<usize> = (0..human.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    for i in (1..order.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let corpus_size = opts
        .corpus_size
        .min(human.len() / opts.corpora.max(1))
        .max(1);
    let corpora: Vec<Vec<usize>> = order
        .chunks_exact(corpus_size)
        .take(opts.corpora)
        .map(<[usize]>::to_vec)
        .collect();

    let inputs = Inputs {
        human: &human,
        repetitive: &repetitive,
        corpora: &corpora,
        excluded: model.control_mask().into(),
        opts,
    };
    // Fresh-key jobs first: they are the cheapest and tell the most if they fail.
    let jobs: Vec<Job> = (0..schemes.len())
        .flat_map(|scheme| {
            (0..opts.fresh_replicates).map(move |replicate| Job::Fresh { scheme, replicate })
        })
        .chain(
            (0..schemes.len())
                .flat_map(|scheme| (0..keys.len()).map(move |key| Job::Fixed { scheme, key })),
        )
        .collect();
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        opts.threads
    }
    .clamp(1, jobs.len().max(1));

    let mut results: Vec<Option<Done>> = (0..jobs.len()).map(|_| None).collect();
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..threads {
            let tx = tx.clone();
            let (next, jobs, inputs) = (&next, &jobs, &inputs);
            scope.spawn(move || loop {
                let j = next.fetch_add(1, Ordering::Relaxed);
                let Some(&job) = jobs.get(j) else { break };
                let done = match job {
                    Job::Fixed { scheme, key } => Done::Fixed(Box::new(run_job(
                        inputs,
                        &keys[key],
                        &schemes[scheme],
                        j as u64,
                    ))),
                    Job::Fresh { scheme, replicate } => {
                        let (t, c) =
                            run_fresh(inputs, &schemes[scheme], (scheme, replicate), j as u64);
                        Done::Fresh(scheme, t, c)
                    }
                };
                if tx.send((j, done)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut done = 0;
        progress(0, jobs.len());
        for (j, r) in rx {
            results[j] = Some(r);
            done += 1;
            progress(done, jobs.len());
        }
    });
    let mut fresh: Vec<(Vec<Outcome>, Vec<Outcome>)> = (0..schemes.len())
        .map(|_| (Vec::new(), Vec::new()))
        .collect();
    let mut fixed = Vec::new();
    for r in results {
        match r.expect("every job reports") {
            Done::Fresh(s, t, c) => {
                fresh[s].0.push(t);
                fresh[s].1.push(c);
            }
            Done::Fixed(r) => fixed.push(*r),
        }
    }
    let mut fixed = fixed.into_iter();

    let schemes = schemes
        .iter()
        .zip(&fresh)
        .map(|(scheme, (fresh_text, fresh_corpus))| {
            let rs: Vec<JobResult> = fixed.by_ref().take(keys.len()).collect();
            let randomised = discrete_law(scheme).is_some();
            let lvl = |pick: fn(&JobResult) -> &Outcome| level(&rs, keys, opts, randomised, pick);
            SchemeCalibration {
                scheme: scheme.to_string(),
                discrete: randomised,
                per_text: lvl(|r| &r.per_text),
                corpus: lvl(|r| &r.corpus),
                no_dedup: NoDedupControl {
                    human: lvl(|r| &r.no_dedup_human),
                    repetitive: lvl(|r| &r.no_dedup_repetitive),
                    repetitive_with_dedup: lvl(|r| &r.dedup_repetitive),
                },
                fresh_key: FreshKeyControl {
                    per_text: summarise(&fresh_text.iter().collect::<Vec<_>>(), opts, randomised),
                    corpus: summarise(&fresh_corpus.iter().collect::<Vec<_>>(), opts, randomised),
                },
                max_ln_p_mismatch: rs.iter().map(|r| r.mismatch).fold(0.0, f64::max),
            }
        })
        .collect();

    CalibrationReport {
        texts: texts.len(),
        tokens: human.iter().map(|t| t.len() as u64).sum(),
        repetitive_texts: repetitive.len(),
        corpora: corpora.len(),
        corpus_size,
        keys: keys.iter().map(|k| k.id().to_owned()).collect(),
        alphas: opts.alphas.clone(),
        confidence: opts.confidence,
        threads,
        seconds: start.elapsed().as_secs_f64(),
        schemes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_keys_are_fixed_and_distinct() {
        let a = fixed_keys(5);
        let b = fixed_keys(5);
        assert_eq!(a, b);
        let ids: std::collections::HashSet<_> = a.iter().map(|k| k.id().to_owned()).collect();
        assert_eq!(ids.len(), 5);
    }

    fn detection(n: u64, statistic: f64, ln_p: f64) -> Detection {
        Detection {
            scheme: String::new(),
            key_id: String::new(),
            scored_tokens: n,
            common_excluded: 0,
            statistic,
            p_value: ln_p.exp(),
            log10_p_value: ln_p / std::f64::consts::LN_10,
            weighted: None,
        }
    }

    /// Randomised p-values of an exact Binomial(n, q) null are exactly uniform.
    #[test]
    fn randomised_binomial_p_values_are_uniform() {
        let scheme = Scheme::kgw();
        let alphas = [1e-2];
        let mut rec = Recorder::new(&alphas, &scheme, 1, 0);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n = 7u64;
        for _ in 0..20_000 {
            let k = (0..n).filter(|_| rng.next_u32() % 4 == 0).count() as u64;
            rec.record(&detection(
                n,
                k as f64 / n as f64,
                ln_binomial_sf(k, n, 0.25),
            ));
        }
        assert!(rec.mismatch < 1e-12, "{}", rec.mismatch);
        let (_, p_raw) = ks_uniform(
            &(0..20_000)
                .map(|_| {
                    let k = (0..n).filter(|_| rng.next_u32() % 4 == 0).count() as u64;
                    ln_binomial_sf(k, n, 0.25).exp()
                })
                .collect::<Vec<_>>(),
        );
        let (_, p_rand) = ks_uniform(&rec.out.ks_samples);
        assert!(
            p_raw < 1e-6,
            "raw discrete p-values are not uniform: {p_raw}"
        );
        assert!(p_rand > 1e-3, "randomised ones are: {p_rand}");
    }

    #[test]
    fn synthid_counts_bits_not_tuples() {
        let scheme: Scheme = "synthid:layers=4".parse().unwrap();
        let alphas = [1e-2];
        let mut rec = Recorder::new(&alphas, &scheme, 1, 0);
        // 3 tuples × 4 layers = 12 trials, 10 hits.
        rec.record(&detection(3, 10.0 / 12.0, ln_binomial_sf(10, 12, 0.5)));
        assert!(rec.mismatch < 1e-12, "{}", rec.mismatch);
        let s = rec.out.ks_samples[0];
        let gt = ln_binomial_sf(11, 12, 0.5).exp();
        let ge = ln_binomial_sf(10, 12, 0.5).exp();
        assert!(gt <= s && s <= ge);
    }
}
