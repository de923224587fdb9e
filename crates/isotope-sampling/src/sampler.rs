//! The sampler chain: penalties → temperature → adjust stages → hook bias → truncation
//! → draw.

use std::cmp::Ordering;

use crate::{RequestRng, SamplingParams, TokenId};

/// What the sampler knows about the sequence at one step.
///
/// The prompt and the generated tokens are kept apart because they are treated
/// differently: penalties of the OpenAI kind look only at generated tokens, and a
/// watermark detector never scores prompt tokens.
#[derive(Clone, Copy, Debug)]
pub struct StepContext<'a> {
    /// Tokens of the prompt (after the chat template), as fed to the model.
    pub prompt: &'a [TokenId],
    /// Tokens generated so far in this choice.
    pub generated: &'a [TokenId],
}

impl<'a> StepContext<'a> {
    /// The last `n` tokens of prompt followed by generated (all when `n == 0`).
    pub fn tail(&self, n: usize) -> impl Iterator<Item = TokenId> + 'a {
        let total = self.prompt.len() + self.generated.len();
        let skip = if n == 0 { 0 } else { total.saturating_sub(n) };
        self.prompt
            .iter()
            .chain(self.generated.iter())
            .skip(skip)
            .copied()
    }
}

/// The truncated, renormalised distribution the draw picks from: most likely first
/// when any truncation is on; in vocabulary order for plain sampling (sorting 49k
/// candidates would cost more than the rest of the step, and no draw needs the order).
#[derive(Clone, Copy, Debug)]
pub struct Distribution<'a> {
    /// Candidate tokens.
    pub tokens: &'a [TokenId],
    /// Their probabilities; they sum to 1.
    pub probs: &'a [f32],
}

/// Where a watermark (or any other logits processor) plugs into the sampler without
/// touching the decode loop.
///
/// The order is fixed: penalties → temperature → [`LogitAdjust`] stages →
/// [`SamplingHook::bias`] → top-k /
/// top-p / min-p → [`SamplingHook::draw`] (or the default inverse-CDF draw). A green-
/// list scheme biases logits; a distortion-free scheme (Gumbel, tournament) replaces
/// the draw on the truncated distribution. Greedy decoding (temperature 0) takes the
/// argmax of the biased logits and never calls `draw`.
pub trait SamplingHook: Send {
    /// Adjust the logits, indexed by token id, after penalties and temperature.
    fn bias(&mut self, _ctx: &StepContext<'_>, _logits: &mut [f32]) {}

    /// Choose the token from the truncated distribution, or `None` for the default
    /// draw. `u` is this step's uniform from the request's random stream, for schemes
    /// that reshape the distribution and still need an unkeyed draw (SynthID).
    fn draw(
        &mut self,
        _ctx: &StepContext<'_>,
        _dist: &Distribution<'_>,
        _u: f64,
    ) -> Option<TokenId> {
        None
    }

    /// Told which token was chosen, after the choice.
    fn on_token(&mut self, _ctx: &StepContext<'_>, _token: TokenId) {}
}

/// A logit-adjusting stage that runs *before* the hook (the watermark): a defence such
/// as antidistillation sampling, which reshapes the teacher's distribution.
///
/// Why a separate stage rather than a second [`SamplingHook`]: the watermark must be
/// applied to the *final* distribution. A green-list bias added before another stage
/// reshapes the logits could be undone or amplified by it, and a distortion-free draw
/// (Gumbel, SynthID) is only exact for the distribution it is handed; the detector's
/// null hypothesis does not care what that distribution is, but the watermark's
/// strength does. So the order is fixed here: penalties → temperature → adjust stages
/// (in the order they were added) → hook bias → truncation → draw, and an adjust stage
/// cannot draw.
///
/// Stages are infallible by design (the decode loop has no error path per token): a
/// stage that cannot compute its adjustment leaves the logits unchanged and reports it
/// its own way.
pub trait LogitAdjust: Send {
    /// Adjust the logits, indexed by token id, after penalties and temperature and
    /// before the hook's bias. Setting an entry to `-inf` removes the token.
    fn adjust(&mut self, ctx: &StepContext<'_>, logits: &mut [f32]);

    /// Told which token was chosen, after the choice.
    fn on_token(&mut self, _ctx: &StepContext<'_>, _token: TokenId) {}
}

/// One sampled token and the log-probabilities that describe its step.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token: TokenId,
    /// Log-probability of `token` under the distribution the sampler truncated: after
    /// penalties, temperature (1 when greedy), the adjust stages and the hook's bias,
    /// before truncation.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens of that same distribution, most likely
    /// first (empty unless asked for).
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// The full sampler of one choice of one request. Pure Rust: used by the llama.cpp
/// engine and, later, by candle students alike.
pub struct Sampler {
    params: SamplingParams,
    rng: RequestRng,
    hook: Option<Box<dyn SamplingHook>>,
    /// Stages applied, in order, between temperature and the hook.
    adjust: Vec<Box<dyn LogitAdjust>>,
    /// Scratch: the working logits (dense, by token id).
    work: Vec<f32>,
    /// Scratch: `exp(work - max)`, dense by token id.
    weights: Vec<f32>,
    /// Scratch: candidates (weight, id) during truncation.
    cands: Vec<(f32, TokenId)>,
    /// The truncated distribution: ids and probabilities.
    ids: Vec<TokenId>,
    probs: Vec<f32>,
    /// Scratch: penalised tokens.
    seen: Vec<TokenId>,
}

/// Relative weight (to the most likely token) below which top-p first ignores tokens:
/// if the tokens above it already hold the nucleus mass — nearly always — the nucleus
/// is found by sorting those few instead of the whole vocabulary. Exact either way.
const TOP_P_PREFILTER: f32 = 1e-4;

impl Sampler {
    /// A sampler for choice `choice` of a request. `params` must be valid
    /// ([`SamplingParams::validate`]).
    pub fn new(params: SamplingParams, choice: u64) -> Self {
        let rng = RequestRng::new(params.seed, choice);
        Self {
            params,
            rng,
            hook: None,
            adjust: Vec::new(),
            work: Vec::new(),
            weights: Vec::new(),
            cands: Vec::new(),
            ids: Vec::new(),
            probs: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Attach a hook (e.g. a watermark scheme).
    pub fn with_hook(mut self, hook: Box<dyn SamplingHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    /// Append a logit-adjusting stage (e.g. antidistillation sampling). Stages run in
    /// the order added, after temperature and before the hook, whatever the order of
    /// `with_hook` and `with_adjust` calls.
    pub fn with_adjust(mut self, stage: Box<dyn LogitAdjust>) -> Self {
        self.adjust.push(stage);
        self
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Choose the next token from `logits` (one per vocabulary entry).
    ///
    /// Draws exactly one value from the request's random stream, whatever the
    /// parameters, so that choice streams stay aligned token by token.
    pub fn sample(
        &mut self,
        logits: &[f32],
        ctx: &StepContext<'_>,
        top_logprobs: usize,
    ) -> Sampled {
        assert!(!logits.is_empty(), "empty logits");
        let u = self.rng.next_uniform();
        self.work.clear();
        self.work.extend_from_slice(logits);
        self.apply_penalties(ctx);
        if !self.params.is_greedy() && self.params.temperature != 1.0 {
            let inv_t = 1.0 / self.params.temperature;
            self.work.iter_mut().for_each(|l| *l *= inv_t);
        }
        for stage in &mut self.adjust {
            stage.adjust(ctx, &mut self.work);
        }
        if let Some(hook) = self.hook.as_mut() {
            hook.bias(ctx, &mut self.work);
        }
        let (max, argmax) = max_and_argmax(&self.work);
        // One exp pass serves both the log-probabilities and the truncation.
        self.weights.clear();
        self.weights
            .extend(self.work.iter().map(|&l| exp_nonpositive(l - max)));
        let z = sum_f64(&self.weights);
        let log_z = max + z.ln() as f32;

        let token = if self.params.is_greedy() {
            argmax
        } else {
            self.truncate(z);
            let dist = Distribution {
                tokens: &self.ids,
                probs: &self.probs,
            };
            let hooked = self.hook.as_mut().and_then(|h| h.draw(ctx, &dist, u));
            hooked.unwrap_or_else(|| inverse_cdf(&dist, u))
        };
        for stage in &mut self.adjust {
            stage.on_token(ctx, token);
        }
        if let Some(hook) = self.hook.as_mut() {
            hook.on_token(ctx, token);
        }

        let top = top_n(&self.work, top_logprobs)
            .into_iter()
            .map(|id| (id, self.work[id as usize] - log_z))
            .collect();
        Sampled {
            token,
            logprob: self.work[token as usize] - log_z,
            top_logprobs: top,
        }
    }

    fn apply_penalties(&mut self, ctx: &StepContext<'_>) {
        let p = &self.params;
        let vocab = self.work.len();
        if p.repetition_penalty != 1.0 {
            self.seen.clear();
            self.seen.extend(ctx.tail(p.penalty_last_n));
            self.seen.sort_unstable();
            self.seen.dedup();
            for &t in &self.seen {
                if let Some(l) = self.work.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            self.seen.clear();
            self.seen.extend_from_slice(ctx.generated);
            self.seen.sort_unstable();
            for run in self.seen.chunk_by(|a, b| a == b) {
                let t = run[0] as usize;
                if t < vocab {
                    self.work[t] -= p.frequency_penalty * run.len() as f32 + p.presence_penalty;
                }
            }
        }
    }

    /// top-k → top-p → min-p over `weights` (whose sum is `z`), leaving the survivors
    /// in `ids`/`probs`, renormalised. They are sorted most likely first whenever any
    /// truncation is on; plain sampling keeps vocabulary order (the draw does not need
    /// sorting, and sorting 49k entries per step costs more than the rest of the step).
    fn truncate(&mut self, z: f64) {
        let p = &self.params;
        let w = &self.weights;
        let vocab = w.len();
        let desc = |a: &(f32, TokenId), b: &(f32, TokenId)| -> Ordering {
            b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
        };
        let top_k = p.top_k > 0 && p.top_k < vocab;
        let top_p = p.top_p < 1.0;
        let min_p = p.min_p > 0.0;
        self.cands.clear();
        // `mass`: total weight of the set the nucleus is taken from.
        let mut mass = z;
        if top_k {
            self.cands
                .extend(w.iter().enumerate().map(|(i, &x)| (x, i as TokenId)));
            self.cands.select_nth_unstable_by(p.top_k - 1, desc);
            self.cands.truncate(p.top_k);
            mass = self.cands.iter().map(|c| f64::from(c.0)).sum();
        } else if top_p || min_p {
            // min-p drops everything below its threshold whatever top-p keeps (the
            // most likely token has weight 1), so filtering at it is exact; the extra
            // top-p prefilter is checked and undone if it kept too little mass.
            let exact = if min_p { p.min_p } else { 0.0 };
            let first = if top_p {
                exact.max(TOP_P_PREFILTER)
            } else {
                exact
            };
            filter(w, first, &mut self.cands);
            let kept: f64 = self.cands.iter().map(|c| f64::from(c.0)).sum();
            if top_p && first > exact && kept < f64::from(p.top_p) * z {
                filter(w, exact, &mut self.cands);
            }
        } else {
            self.cands
                .extend(w.iter().enumerate().map(|(i, &x)| (x, i as TokenId)));
        }
        if top_k || top_p || min_p {
            self.cands.sort_unstable_by(desc);
        }
        if top_p {
            let target = f64::from(p.top_p) * mass;
            let mut cum = 0.0f64;
            let mut keep = self.cands.len();
            for (i, c) in self.cands.iter().enumerate() {
                cum += f64::from(c.0);
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.cands.truncate(keep);
        }
        if min_p {
            let threshold = self.cands[0].0 * p.min_p;
            let keep = self.cands.iter().take_while(|c| c.0 >= threshold).count();
            self.cands.truncate(keep.max(1));
        }
        let total: f64 = self.cands.iter().map(|c| f64::from(c.0)).sum();
        self.ids.clear();
        self.probs.clear();
        self.ids.extend(self.cands.iter().map(|c| c.1));
        self.probs
            .extend(self.cands.iter().map(|c| (f64::from(c.0) / total) as f32));
    }
}

/// Every `(weight, id)` with weight at least `threshold`.
fn filter(w: &[f32], threshold: f32, out: &mut Vec<(f32, TokenId)>) {
    out.clear();
    out.extend(
        w.iter()
            .enumerate()
            .filter(|(_, &x)| x >= threshold)
            .map(|(i, &x)| (x, i as TokenId)),
    );
}

/// Largest value and its index (the lowest index on ties, so greedy is deterministic).
fn max_and_argmax(xs: &[f32]) -> (f32, TokenId) {
    let mut best = 0usize;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    (xs[best], best as TokenId)
}

/// `e^x` for `x ≤ 0`, to f32 precision (relative error < 5e-7), branch-free so the
/// loops over the vocabulary vectorise: libm's `expf` does not, and was most of the
/// cost of a sampling step. `e^x = 2^n · 2^f` with `n = round(x·log2 e)`,
/// `|f| ≤ ½`, and 2^f by its degree-6 Taylor series (remainder < 1.2e-7).
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    // Below this e^x is under f32's normal range; the result is flushed to zero.
    let x = x.max(-87.0);
    // Cody–Waite: ln 2 split in a part with few mantissa bits (n·LN2_HI is exact)
    // and the rest, so the reduced argument keeps full precision for large |x|.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let g = (x - n * LN2_HI) - n * LN2_LO; // |g| ≤ ln2/2
    let p = 1.0
        + g * (1.0
            + g * (0.5
                + g * (1.0 / 6.0 + g * (1.0 / 24.0 + g * (1.0 / 120.0 + g * (1.0 / 720.0))))));
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    if x <= -87.0 {
        0.0
    } else {
        p * scale
    }
}

/// Sum in f64, in blocks of f32 so the inner loop vectorises.
fn sum_f64(xs: &[f32]) -> f64 {
    xs.chunks(256)
        .map(|c| f64::from(c.iter().sum::<f32>()))
        .sum()
}

/// The `n` largest entries' indices, largest first (ties: lower id first).
///
/// One linear pass keeping a small sorted buffer: for the n ≤ 20 that log-probability
/// APIs ask for, nearly every entry is rejected by a single comparison.
pub fn top_n(xs: &[f32], n: usize) -> Vec<TokenId> {
    let n = n.min(xs.len());
    let mut best: Vec<(f32, TokenId)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (i, &x) in xs.iter().enumerate() {
        if best.len() == n && x.partial_cmp(&best[n - 1].0) != Some(Ordering::Greater) {
            continue;
        }
        // Insert after every entry >= x: equal values keep their lower ids first.
        let at = best.partition_point(|b| b.0 >= x);
        best.insert(at, (x, i as TokenId));
        best.truncate(n);
    }
    best.into_iter().map(|b| b.1).collect()
}

/// `log Σ exp(x)` computed stably.
pub fn log_sum_exp(xs: &[f32]) -> f32 {
    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let s: f64 = xs
        .chunks(256)
        .map(|c| f64::from(c.iter().map(|&x| exp_nonpositive(x - max)).sum::<f32>()))
        .sum();
    max + s.ln() as f32
}

/// Inverse-CDF draw: the first token whose cumulative probability exceeds `u`.
fn inverse_cdf(dist: &Distribution<'_>, u: f64) -> TokenId {
    let mut cum = 0.0f64;
    for (&t, &p) in dist.tokens.iter().zip(dist.probs) {
        cum += f64::from(p);
        if u < cum {
            return t;
        }
    }
    // Rounding left the total just under 1 and u above it.
    *dist
        .tokens
        .last()
        .expect("truncation keeps at least one token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EMPTY: StepContext<'static> = StepContext {
        prompt: &[],
        generated: &[],
    };

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = 0.0f32;
        while x > -87.0 {
            let got = f64::from(exp_nonpositive(x));
            let want = f64::from(x).exp();
            worst = worst.max((got - want).abs() / want);
            x -= 0.000_37;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), 0);
        let out = s.sample(&[0.1, 3.0, 2.0, -1.0], &EMPTY, 2);
        assert_eq!(out.token, 1);
        assert_eq!(
            out.top_logprobs.iter().map(|x| x.0).collect::<Vec<_>>(),
            [1, 2]
        );
        let z = log_sum_exp(&[0.1, 3.0, 2.0, -1.0]);
        assert!((out.logprob - (3.0 - z)).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_seed() {
        for seed in 0..50 {
            let mut s = Sampler::new(
                params(|p| {
                    p.top_k = 1;
                    p.seed = seed;
                }),
                0,
            );
            assert_eq!(s.sample(&[0.1, 3.0, 2.9, -1.0], &EMPTY, 0).token, 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // probs ∝ e^[2, 1, 0, -10]: ≈ 0.665, 0.245, 0.090, ~0.
        let logits = [2.0, 1.0, 0.0, -10.0];
        for seed in 0..200 {
            let mut s = Sampler::new(
                params(|p| {
                    p.top_p = 0.85;
                    p.seed = seed;
                }),
                0,
            );
            let t = s.sample(&logits, &EMPTY, 0).token;
            assert!(t == 0 || t == 1, "token {t} outside the 0.85 nucleus");
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let logits = [2.0, 1.9, 0.0, -1.0];
        for seed in 0..200 {
            let mut s = Sampler::new(
                params(|p| {
                    p.min_p = 0.5;
                    p.seed = seed;
                }),
                0,
            );
            let t = s.sample(&logits, &EMPTY, 0).token;
            assert!(t <= 1);
        }
    }

    #[test]
    fn repetition_penalty_discourages_context_tokens() {
        let logits = [2.0, 1.99, 0.0];
        let ctx = StepContext {
            prompt: &[0],
            generated: &[],
        };
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.repetition_penalty = 1.5;
            }),
            0,
        );
        assert_eq!(s.sample(&logits, &ctx, 0).token, 1);
    }

    #[test]
    fn frequency_and_presence_penalties_count_generated_only() {
        let logits = [2.0, 1.0, 0.0];
        let prompt_only = StepContext {
            prompt: &[0, 0, 0],
            generated: &[],
        };
        let generated = StepContext {
            prompt: &[],
            generated: &[0, 0],
        };
        let greedy_pen = params(|p| {
            p.temperature = 0.0;
            p.frequency_penalty = 0.4;
            p.presence_penalty = 0.3;
        });
        // 2.0 - 2 * 0.4 - 0.3 = 0.9 < 1.0
        assert_eq!(
            Sampler::new(greedy_pen.clone(), 0)
                .sample(&logits, &generated, 0)
                .token,
            1
        );
        assert_eq!(
            Sampler::new(greedy_pen, 0)
                .sample(&logits, &prompt_only, 0)
                .token,
            0
        );
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        let logits = [1.0f32, 0.0, -0.5, 0.5];
        let z = log_sum_exp(&logits);
        let mut counts = [0usize; 4];
        let mut s = Sampler::new(params(|p| p.seed = 42), 0);
        let n = 40_000;
        for _ in 0..n {
            counts[s.sample(&logits, &EMPTY, 0).token as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let expect = (logits[i] - z).exp() as f64;
            let got = c as f64 / n as f64;
            // 5 standard errors.
            let se = (expect * (1.0 - expect) / n as f64).sqrt();
            assert!(
                (got - expect).abs() < 5.0 * se,
                "token {i}: {got} vs {expect}"
            );
        }
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [1.0f32, 0.0];
        let mut cold = Sampler::new(
            params(|p| {
                p.temperature = 0.25;
                p.seed = 3;
            }),
            0,
        );
        let ones = (0..5000)
            .filter(|_| cold.sample(&logits, &EMPTY, 0).token == 1)
            .count();
        // p(1) = 1 / (1 + e^4) ≈ 0.018
        assert!(ones < 200, "{ones}");
    }

    struct Boost(TokenId);
    impl SamplingHook for Boost {
        fn bias(&mut self, _: &StepContext<'_>, logits: &mut [f32]) {
            logits[self.0 as usize] += 100.0;
        }
    }

    #[test]
    fn hook_bias_comes_before_truncation_and_shows_in_logprobs() {
        let logits = [5.0, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(params(|p| p.top_k = 1), 0).with_hook(Box::new(Boost(2)));
        let out = s.sample(&logits, &EMPTY, 1);
        assert_eq!(out.token, 2);
        assert!(out.logprob > -1e-3);
        assert_eq!(out.top_logprobs[0].0, 2);
    }

    /// Records the logits it sees, then removes every token but `keep`.
    struct OnlyAfter(TokenId, std::sync::Arc<std::sync::Mutex<Vec<f32>>>);
    impl LogitAdjust for OnlyAfter {
        fn adjust(&mut self, _: &StepContext<'_>, logits: &mut [f32]) {
            *self.1.lock().unwrap() = logits.to_vec();
            for (i, l) in logits.iter_mut().enumerate() {
                if i != self.0 as usize {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }

    #[test]
    fn adjust_runs_after_temperature_and_before_the_hook() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let logits = [4.0, 2.0, 0.0, 1.0];
        // The hook is attached first, but the adjust stage still runs before it: the
        // stage keeps only token 3, and the hook's +100 on token 2 cannot revive it.
        let mut s = Sampler::new(params(|p| p.temperature = 0.5), 0)
            .with_hook(Box::new(Boost(2)))
            .with_adjust(Box::new(OnlyAfter(3, seen.clone())));
        let out = s.sample(&logits, &EMPTY, 0);
        assert_eq!(out.token, 3);
        assert_eq!(*seen.lock().unwrap(), vec![8.0, 4.0, 0.0, 2.0]);
    }

    struct PickLast;
    impl SamplingHook for PickLast {
        fn draw(&mut self, _: &StepContext<'_>, d: &Distribution<'_>, _: f64) -> Option<TokenId> {
            assert!((d.probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(d.probs.windows(2).all(|w| w[0] >= w[1]));
            d.tokens.last().copied()
        }
    }

    #[test]
    fn hook_draw_sees_the_truncated_renormalised_distribution() {
        let logits = [3.0, 2.0, 1.0, 0.0, -1.0];
        let mut s = Sampler::new(params(|p| p.top_k = 3), 0).with_hook(Box::new(PickLast));
        assert_eq!(s.sample(&logits, &EMPTY, 0).token, 2);
    }

    #[test]
    fn top_p_prefix_shortcut_agrees_with_full_sort() {
        // A large flat vocabulary where the prefix holds too little mass, and a peaked
        // one where it holds enough: both must keep exactly the nucleus.
        let flat: Vec<f32> = (0..5000).map(|i| -(i as f32) * 1e-4).collect();
        let peaked: Vec<f32> = (0..5000).map(|i| -(i as f32) * 0.05).collect();
        // One likely token and a heavy tail of tokens each below the prefilter.
        let heavy_tail: Vec<f32> = (0..40_000)
            .map(|i| if i == 0 { 0.0 } else { -10.0 })
            .collect();
        for logits in [flat, peaked, heavy_tail] {
            let mut s = Sampler::new(params(|p| p.top_p = 0.9), 0);
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            s.weights = logits.iter().map(|l| (l - max).exp()).collect();
            let z = s.weights.iter().map(|&w| w as f64).sum();
            s.truncate(z);
            let z = log_sum_exp(&logits);
            let mut sorted: Vec<f32> = logits.iter().map(|l| (l - z).exp()).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let mut cum = 0.0f64;
            let expect = sorted
                .iter()
                .position(|&q| {
                    cum += q as f64;
                    cum >= 0.9
                })
                .unwrap()
                + 1;
            assert!(
                (s.ids.len() as i64 - expect as i64).abs() <= 1,
                "{} vs {expect}",
                s.ids.len()
            );
        }
    }

    /// Truncation the slow, obvious way: sort everything, then top-k, top-p, min-p.
    fn reference_support(logits: &[f32], p: &SamplingParams) -> Vec<TokenId> {
        let mut ids: Vec<TokenId> = (0..logits.len() as TokenId).collect();
        ids.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        if p.top_k > 0 {
            ids.truncate(p.top_k);
        }
        let max = logits[ids[0] as usize];
        let w: Vec<f64> = ids
            .iter()
            .map(|&i| ((logits[i as usize] - max) as f64).exp())
            .collect();
        let z: f64 = w.iter().sum();
        let mut keep = ids.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, x) in w.iter().enumerate() {
                cum += x / z;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            keep = keep.min(
                w.iter()
                    .take_while(|&&x| x >= p.min_p as f64 * w[0])
                    .count()
                    .max(1),
            );
        }
        ids.truncate(keep);
        ids.sort_unstable();
        ids
    }

    proptest! {
        #[test]
        fn truncation_matches_the_obvious_implementation(
            logits in prop::collection::vec(-12.0f32..12.0, 1..3000),
            top_k in prop_oneof![Just(0usize), 1usize..50],
            top_p in prop_oneof![Just(1.0f32), 0.05f32..0.99],
            min_p in prop_oneof![Just(0.0f32), 0.001f32..0.5]) {
            let p = params(|p| { p.top_k = top_k; p.top_p = top_p; p.min_p = min_p; });
            let mut s = Sampler::new(p.clone(), 0);
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            s.weights = logits.iter().map(|l| (l - max).exp()).collect();
            let z = s.weights.iter().map(|&w| w as f64).sum();
            s.truncate(z);
            let mut got = s.ids.clone();
            got.sort_unstable();
            let expect = reference_support(&logits, &p);
            // f32 vs f64 rounding may move the top-p boundary by one token.
            prop_assert!((got.len() as i64 - expect.len() as i64).abs() <= 1,
                "{} vs {} tokens", got.len(), expect.len());
            let common = got.iter().filter(|t| expect.binary_search(t).is_ok()).count();
            prop_assert!(common + 1 >= got.len().max(expect.len()));
            prop_assert!((s.probs.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        }

        #[test]
        fn top_n_matches_sorting(xs in prop::collection::vec(-5.0f32..5.0, 0..500), n in 0usize..30) {
            let mut ids: Vec<TokenId> = (0..xs.len() as TokenId).collect();
            ids.sort_by(|a, b| xs[*b as usize].total_cmp(&xs[*a as usize]).then(a.cmp(b)));
            ids.truncate(n);
            prop_assert_eq!(top_n(&xs, n), ids);
        }

        #[test]
        fn same_seed_same_tokens(logits in prop::collection::vec(-10.0f32..10.0, 2..64),
                                 seed in any::<u64>(), choice in 0u64..4) {
            let p = params(|p| { p.seed = seed; p.top_p = 0.95; p.top_k = 40; });
            let mut a = Sampler::new(p.clone(), choice);
            let mut b = Sampler::new(p, choice);
            for _ in 0..8 {
                prop_assert_eq!(a.sample(&logits, &EMPTY, 0).token, b.sample(&logits, &EMPTY, 0).token);
            }
        }

        #[test]
        fn sampled_token_is_always_valid(logits in prop::collection::vec(-50.0f32..50.0, 1..64),
                                         seed in any::<u64>(), t in 0.0f32..3.0,
                                         top_p in 0.01f32..1.0, min_p in 0.0f32..1.0, top_k in 0usize..10) {
            let p = params(|p| { p.seed = seed; p.temperature = t; p.top_p = top_p; p.min_p = min_p; p.top_k = top_k; });
            let out = Sampler::new(p, 0).sample(&logits, &EMPTY, 3);
            prop_assert!((out.token as usize) < logits.len());
            prop_assert!(out.logprob <= 1e-6);
            prop_assert!(out.top_logprobs.len() == 3.min(logits.len()));
        }
    }
}
