//! Detection: from token ids to a p-value that holds for one fixed key.
//!
//! Null hypothesis: the text was written without knowledge of the key. Then every
//! *distinct* keyed input (window seed, token) gives an independent PRF value, so:
//! - KGW / Unigram: each scored tuple is green with probability exactly γ′ (the
//!   quantised γ) → green count ~ Binomial(n, γ′);
//! - Gumbel: each `-ln(1 - r)` is Exp(1) → the sum ~ Gamma(n, 1);
//! - SynthID: each of the `m` g-bits is Bernoulli(½) → bit count ~ Binomial(n·m, ½).
//!
//! Independence needs distinct inputs, hence deduplication of repeated (window,
//! token) tuples — without it a repetitive human text (a list, a refrain) scores the
//! same tuple many times and the p-value collapses (three_bricks, Fernandez et al.
//! 2023). Only tokens whose whole window lies in the given text are scored (the
//! first `h` are context), and control tokens are never scored.
//!
//! With a [`CommonTuples`] list ([`Detector::with_common`]) tuples that are common in
//! human text are not scored either; see [`crate::common`] for why that keeps the
//! p-value valid and makes it hold for one fixed key.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::common::{tuple_id, CommonTuples, TupleShape};
use crate::hook::ExcludedTokens;
use crate::key::WatermarkKey;
use crate::prf::{green_threshold, is_green};
use crate::scheme::{gumbel_uniform, self_hash_green, Scheme, Seeding, WindowPrf};
use crate::stats::{ln_binomial_sf, ln_bonferroni, ln_gamma_sf, ln_to_log10};
use crate::weighted::{ln_weighted_binomial_sf, WeightLevel};

/// The result of one test.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// Scheme spec (parses back with `Scheme::from_str`).
    pub scheme: String,
    /// Id of the key tested.
    pub key_id: String,
    /// Distinct tuples scored.
    pub scored_tokens: u64,
    /// Distinct tuples not scored because they are common in human text (0 without a
    /// common-tuples list).
    pub common_excluded: u64,
    /// Green fraction (KGW/Unigram), mean score (Gumbel: 1 under the null) or mean
    /// g-value (SynthID: ½ under the null).
    pub statistic: f64,
    /// P-value; may underflow to 0 below ~1e-308 — see `log10_p_value`.
    pub p_value: f64,
    /// log10 of the p-value, exact far below f64's range.
    pub log10_p_value: f64,
    /// The weighted statistic, when the test weighted its tuples
    /// ([`Detector::detect_weighted`]) — enough to recompute the p-value with
    /// [`ln_weighted_binomial_sf`]. Absent for an unweighted test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted: Option<WeightedStatistic>,
}

/// The statistic of a weighted test: `observed = Σ w · hits` over `levels`, whose
/// null tail is [`ln_weighted_binomial_sf`]`(levels, observed, p)` with `p` the
/// scheme's null hit rate (γ′ for KGW/Unigram, ½ for SynthID g-bits).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightedStatistic {
    /// Trials at each weight (tuples × bits per tuple).
    pub levels: Vec<WeightLevel>,
    /// Weighted hit count.
    pub observed: u64,
}

impl WeightedStatistic {
    /// The weighted hit share `observed / Σ w · trials` (γ′ in expectation under the
    /// null for KGW/Unigram, ½ for SynthID); 0 with no trials. For the mass reading
    /// this is the suspect's probability on green candidates, where
    /// [`Detection::statistic`] counts each candidate once.
    pub fn share(&self) -> f64 {
        let total: u64 = self
            .levels
            .iter()
            .map(|l| l.trials * u64::from(l.weight))
            .sum();
        if total == 0 {
            0.0
        } else {
            self.observed as f64 / total as f64
        }
    }
}

/// Running totals of a test, so a corpus of many texts is one test with one shared
/// deduplication set.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    seen: HashSet<(u128, u32)>,
    /// Window seeds that may not be scored any more: the prompts' windows
    /// ([`Tally::exclude_windows`]) and, in reading mode, every window already read.
    windows: HashSet<u128>,
    n: u64,
    common: u64,
    sum: f64,
    /// `(tuples, sum of values)` scored at each weight (index = weight): the levels
    /// of a weighted test ([`Detector::detect_weighted`]); index 1 only for an
    /// unweighted one.
    by_weight: Vec<(u64, f64)>,
}

impl Tally {
    fn add(&mut self, weight: u8, value: f64) {
        self.n += 1;
        self.sum += value;
        let w = usize::from(weight);
        if self.by_weight.len() <= w {
            self.by_weight.resize(w + 1, (0, 0.0));
        }
        self.by_weight[w].0 += 1;
        self.by_weight[w].1 += value;
    }

    /// Whether some tuple was scored with a weight above 1.
    fn is_weighted(&self) -> bool {
        self.by_weight.iter().skip(2).any(|&(n, _)| n > 0)
    }

    /// Distinct tuples scored so far.
    pub fn scored(&self) -> u64 {
        self.n
    }

    /// Pre-seed the deduplication set with the tuples of `tokens` (e.g. the prompts a
    /// suspect was given) without scoring them.
    pub fn exclude(&mut self, detector: &Detector, tokens: &[u32]) {
        detector.visit(
            tokens,
            Positions::All,
            &mut self.seen,
            &HashSet::new(),
            |_, _, _| {},
        );
    }

    /// Pre-seed the deduplication set with the *windows* of `tokens` (the prompts a
    /// suspect was given): no tuple whose window seed occurs in them is scored
    /// afterwards, whatever its token.
    ///
    /// This, not [`Tally::exclude`], is what a black-box audit needs. A watermarked
    /// prompt's token after window `w` was chosen from `w`'s green list, so the rest of
    /// that list is no longer independent of the prompt: a clean model that continues
    /// the prompt's phrases (or avoids them) is scored on green lists the prompt has
    /// already revealed something about, and its p-value is no longer exact. Leaving
    /// out every window the prompts touched leaves only seeds whose keyed values the
    /// suspect's input never depended on.
    pub fn exclude_windows(&mut self, detector: &Detector, tokens: &[u32]) {
        let h = detector.scheme.context();
        for pos in h..=tokens.len() {
            let prf = WindowPrf::new(&detector.scheme, &detector.key, &tokens[pos - h..pos]);
            self.windows.insert(prf.id());
        }
    }

    /// Distinct tuples left out so far because they are common in human text.
    pub fn common_excluded(&self) -> u64 {
        self.common
    }
}

/// What happened to one (window, candidate) pair given to [`Detector::tally_pair`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PairOutcome {
    /// Scored: the tuple's value (green 0/1, Gumbel score, SynthID bit count).
    Scored(f64),
    /// The window's seed was already used: not scored.
    RepeatedWindow,
    /// The candidate is a control token: not scored.
    Control,
    /// The tuple is on the common-tuples list: not scored.
    Common,
    /// The suspect's prediction is unknown ([`NO_PREDICTION`]): the window is spent,
    /// nothing is scored.
    NoPrediction,
}

/// Stands in a reading-mode prediction list for a position whose top-1 is not known —
/// e.g. an API returned a token piece that several ids share. [`Detector::tally_pair`]
/// spends that window and scores nothing; which positions are unknown depends on the
/// suspect and the text, never on the key, so the null stays exact.
pub const NO_PREDICTION: u32 = u32::MAX;

/// The integer weight [`Detector::tally_reading_mass`] gives a candidate the suspect
/// predicts with natural-log probability `logprob`: round([`MASS_LEVELS`] · q).
/// Candidates below [`MASS_MIN_PROB`] get 0.
pub fn mass_weight(logprob: f32) -> u8 {
    let q = f64::from(logprob).exp();
    let levels = f64::from(MASS_LEVELS);
    if q.is_finite() {
        (q * levels).round().clamp(0.0, levels) as u8
    } else {
        0
    }
}

/// The mass statistic's resolution: a candidate of probability q weighs
/// round(MASS_LEVELS · q). Integer weights keep the null an exact weighted binomial
/// tail; 64 levels count candidates down to 1/128, which measured better than 16
/// (down to 1/32) on the red-team students (25% mixture: 10^-5.6 against 10^-4.8).
pub const MASS_LEVELS: u8 = 64;

/// The smallest probability [`mass_weight`] counts (weight 1): readers list the
/// candidates at or above it.
pub const MASS_MIN_PROB: f64 = 0.5 / MASS_LEVELS as f64;

/// Which positions of a text are scored, and with what integer weight.
#[derive(Clone, Copy)]
enum Positions<'a> {
    /// Every position, weight 1.
    All,
    /// `mask[p]` true: weight 1; false or past the end: not scored.
    Mask(&'a [bool]),
    /// `weights[p]` (0: not scored; past the end: not scored).
    Weights(&'a [u8]),
}

impl Positions<'_> {
    fn weight(&self, pos: usize) -> u8 {
        match self {
            Positions::All => 1,
            Positions::Mask(m) => u8::from(m.get(pos).copied().unwrap_or(false)),
            Positions::Weights(w) => w.get(pos).copied().unwrap_or(0),
        }
    }
}

/// A detector for one key and scheme.
#[derive(Clone)]
pub struct Detector {
    key: Arc<WatermarkKey>,
    scheme: Scheme,
    excluded: ExcludedTokens,
    dedup: bool,
    common: Option<Arc<CommonTuples>>,
}

impl Detector {
    /// A detector; `excluded` marks control tokens (never scored).
    pub fn new(key: Arc<WatermarkKey>, scheme: Scheme, excluded: ExcludedTokens) -> Self {
        Self {
            key,
            scheme,
            excluded,
            dedup: true,
            common: None,
        }
    }

    /// Leave out tuples in `common` (a fixed, key-independent list of tuples common in
    /// human text). A list that does not cover this scheme's [`TupleShape`] filters
    /// nothing — see [`Detector::common_active`].
    pub fn with_common(mut self, common: Arc<CommonTuples>) -> Self {
        self.common = Some(common);
        self
    }

    /// Whether a common-tuples list is set and covers this scheme.
    pub fn common_active(&self) -> bool {
        self.active_common().is_some()
    }

    fn active_common(&self) -> Option<&CommonTuples> {
        let shape = TupleShape::of(&self.scheme);
        self.common.as_deref().filter(|c| c.covers(shape))
    }

    /// Turn deduplication off. **Invalidates the p-value** on repetitive text; exists
    /// only so tests can show why deduplication is needed.
    pub fn without_dedup(mut self) -> Self {
        self.dedup = false;
        self
    }

    /// The scheme tested.
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// Calls `f(position, value, weight)` for every scored, first-seen tuple of
    /// `tokens`; returns how many distinct tuples were left out as common. A position
    /// of weight 0 under `positions` neither scores nor spends its tuple, so a tuple
    /// first met there can still be scored where it recurs. Gumbel scores are summed
    /// unweighted (there is no exact weighted Gamma tail here): any weight above 0
    /// counts as 1.
    fn visit(
        &self,
        tokens: &[u32],
        positions: Positions<'_>,
        seen: &mut HashSet<(u128, u32)>,
        windows: &HashSet<u128>,
        mut f: impl FnMut(usize, f64, u8),
    ) -> u64 {
        let gumbel = matches!(self.scheme, Scheme::Gumbel { .. });
        let h = self.scheme.context();
        let common = self.active_common();
        let shape = TupleShape::of(&self.scheme);
        let mut left_out = 0;
        // Unigram has one fixed list: derive it once.
        let mut fixed = matches!(self.scheme, Scheme::Unigram { .. })
            .then(|| WindowPrf::new(&self.scheme, &self.key, &[]));
        for pos in h..tokens.len() {
            let weight = positions.weight(pos);
            if weight == 0 {
                continue;
            }
            let token = tokens[pos];
            if self.excluded.get(token as usize).copied().unwrap_or(false) {
                continue;
            }
            let window = &tokens[pos - h..pos];
            let mut local;
            let prf = match fixed.as_mut() {
                Some(prf) => prf,
                None => {
                    local = WindowPrf::new(&self.scheme, &self.key, window);
                    &mut local
                }
            };
            if windows.contains(&prf.id()) {
                continue;
            }
            let first = seen.insert((prf.id(), token));
            if let Some(common) = common {
                let id = match shape {
                    TupleShape::Window(_) => tuple_id(shape, window, token),
                    TupleShape::MinPair(_) => tuple_id(shape, &[prf.anchor], token),
                    TupleShape::Token => tuple_id(shape, &[], token),
                };
                if common.contains(id) {
                    left_out += u64::from(first);
                    continue;
                }
            }
            if !first && self.dedup {
                continue;
            }
            let value = self.value(prf, window, token);
            f(pos, value, if gumbel { 1 } else { weight });
        }
        left_out
    }

    /// The keyed value of (window, token): green 0/1, Gumbel score or SynthID bits.
    fn value(&self, prf: &mut WindowPrf, window: &[u32], token: u32) -> f64 {
        match self.scheme {
            Scheme::Kgw {
                gamma,
                seeding: Seeding::SelfHash,
                ..
            } => f64::from(u8::from(self_hash_green(&self.key, window, token, gamma))),
            Scheme::Kgw { gamma, .. } | Scheme::Unigram { gamma, .. } => {
                let (threshold, _) = green_threshold(gamma);
                f64::from(u8::from(is_green(prf.word(token), threshold)))
            }
            Scheme::Gumbel { .. } => -(1.0 - gumbel_uniform(prf.word(token))).ln(),
            Scheme::SynthId { layers, .. } => {
                let mask = if layers == 32 {
                    u32::MAX
                } else {
                    (1u32 << layers) - 1
                };
                f64::from((prf.word(token) & mask).count_ones())
            }
        }
    }

    /// Whether (window, token) is on the common-tuples list.
    fn is_common(&self, prf: &WindowPrf, window: &[u32], token: u32) -> bool {
        let Some(common) = self.active_common() else {
            return false;
        };
        let shape = TupleShape::of(&self.scheme);
        let id = match shape {
            TupleShape::Window(_) => tuple_id(shape, window, token),
            TupleShape::MinPair(_) => tuple_id(shape, &[prf.anchor], token),
            TupleShape::Token => tuple_id(shape, &[], token),
        };
        common.contains(id)
    }

    /// Score one explicit (window, candidate) pair into `tally`, at most one pair per
    /// distinct window seed — the building block of the white-box *reading mode*.
    /// `window` must be exactly `h` tokens.
    ///
    /// The window's seed is marked used whatever the outcome (also when the candidate
    /// is a control token or the tuple is common), because the
    /// exactness argument of [`Detector::tally_reading`] needs every window the suspect
    /// has read to be spent.
    pub fn tally_pair(&self, tally: &mut Tally, window: &[u32], candidate: u32) -> PairOutcome {
        debug_assert_eq!(window.len(), self.scheme.context());
        let mut prf = WindowPrf::new(&self.scheme, &self.key, window);
        if !tally.windows.insert(prf.id()) {
            return PairOutcome::RepeatedWindow;
        }
        if candidate == NO_PREDICTION {
            return PairOutcome::NoPrediction;
        }
        self.score_candidate(tally, &mut prf, window, candidate, 1)
    }

    /// One candidate at a window being read for the first time: not scored if it is a
    /// control token or a common tuple, else its keyed value is added at `weight`.
    fn score_candidate(
        &self,
        tally: &mut Tally,
        prf: &mut WindowPrf,
        window: &[u32],
        candidate: u32,
        weight: u8,
    ) -> PairOutcome {
        if (self.excluded.get(candidate as usize))
            .copied()
            .unwrap_or(false)
        {
            return PairOutcome::Control;
        }
        if self.is_common(prf, window, candidate) {
            tally.common += 1;
            return PairOutcome::Common;
        }
        let v = self.value(prf, window, candidate);
        tally.add(weight, v);
        PairOutcome::Scored(v)
    }

    /// Reading mode (Sander et al. 2024, white-box): a suspect model read `tokens`
    /// teacher-forced, and `predictions[i]` is its top-1 next token after
    /// `tokens[..=i]` (so `predictions.len() == tokens.len()`). Each position `p ≥ h`
    /// scores the pair (window `tokens[p-h..p]`, `predictions[p-1]`), once per distinct
    /// window seed over everything tallied so far. (The supervised and unsupervised
    /// variants differ in which texts the suspect reads, not in a filter here.) Calls
    /// `on_pair(p, window, candidate, outcome)` for each position, so the scored
    /// tuples can be written to an evidence bundle.
    ///
    /// **Why the p-value is exact.** Null hypothesis: the suspect's weights do not
    /// depend on the key. The fed text may be watermarked — its tokens were chosen
    /// with the keyed lists of its earlier windows — but the suspect's prediction at
    /// `p` is a function of `tokens[..p]` only, and those tokens were chosen using the
    /// keyed values of *earlier* window seeds. A seed is scored only the first time it
    /// appears in the whole run, and every window read (scored or not) spends its
    /// seed, so no token the suspect has read was ever chosen with the scored seed's
    /// keyed values (the token after the window is exactly the one the suspect is not
    /// shown). Hence, conditionally on everything scored before, the scored value is a
    /// fresh keyed value of a fixed (seed, candidate) pair: green with probability
    /// exactly γ′ (Exp(1) for Gumbel, Binomial(m, ½) bits for SynthID), independently
    /// across seeds — the same tails as [`Detector::finish`]. Scoring (window, token)
    /// tuples instead of one per window would not be exact: two candidates after the
    /// same window would share the reading of the fed text's next token. A z-test on
    /// the suspect's real-valued *probability mass* on green tokens would only be
    /// approximate; [`Detector::tally_reading_mass`] scores that mass exactly, with
    /// integer weights. Unigram has one seed for every window, so a reading tally
    /// scores at most one tuple under it.
    pub fn tally_reading(
        &self,
        tally: &mut Tally,
        tokens: &[u32],
        predictions: &[u32],
        mut on_pair: impl FnMut(usize, &[u32], u32, PairOutcome),
    ) {
        let h = self.scheme.context();
        let end = tokens.len().min(predictions.len());
        for pos in h.max(1)..=end {
            let window = &tokens[pos - h..pos];
            let candidate = predictions[pos - 1];
            let outcome = self.tally_pair(tally, window, candidate);
            on_pair(pos, window, candidate, outcome);
        }
    }

    /// Reading mode scored by the suspect's **green probability mass** instead of
    /// its top-1 alone: at a window's first reading, every candidate `v` the suspect
    /// gives probability `q` counts with the integer weight [`mass_weight`]`(q)` =
    /// round(64 q) (so candidates under 1/128 count for nothing) — except the top-1,
    /// which always counts at least 1, so that a model too unsure for any weight
    /// (e.g. barely trained) is still read as the top-1 test reads it — and the
    /// statistic is `Σ weight · green`. `top[i]` lists the suspect's candidates after
    /// `tokens[..=i]`, most likely first, with their natural-log probabilities (what
    /// is not listed has weight 0); `on_pair(p, window, candidate, weight, outcome)`
    /// is called for every listed candidate of every position.
    ///
    /// **Why the p-value is exact.** The argument of [`Detector::tally_reading`] shows
    /// that, at a seed's first reading and conditionally on everything tallied
    /// before, the seed's keyed words are fresh; the suspect's distribution there
    /// depends only on the text before the window, so the weights are fixed before
    /// those words are drawn. Under a window seed, different candidates read
    /// different words, so their green bits are independent Bernoulli(γ′) trials, and
    /// `Σ weight · green` has exactly the null of a weighted sum of binomials — the
    /// tail [`Detector::finish`] computes for weighted tallies
    /// ([`crate::weighted::ln_weighted_binomial_sf`]). (A z-test on the real-valued
    /// mass would only be approximate; quantised weights keep the tail exact.)
    ///
    /// **Why it is more powerful.** A student that learned the watermark shifts some
    /// probability towards green candidates at every window it learned, but its
    /// top-1 changes only where two candidates were nearly tied; the mass sees the
    /// shift everywhere. On the session-14 red-team students (KGW h = 1, 6,164
    /// windows; `audit model`, corrected p) the 100% student reads 6e-43 by mass
    /// against 1e-15 by top-1, and the 25% mixture 5.5e-6 against 9e-3.
    ///
    /// Control tokens and common tuples count for nothing; a candidate listed twice
    /// is scored once; [`NO_PREDICTION`] entries are skipped. Panics (debug) unless the
    /// scheme [supports](Scheme::supports_mass_reading) it.
    pub fn tally_reading_mass(
        &self,
        tally: &mut Tally,
        tokens: &[u32],
        top: &[Vec<(u32, f32)>],
        mut on_pair: impl FnMut(usize, &[u32], u32, u8, PairOutcome),
    ) {
        debug_assert!(self.scheme.supports_mass_reading());
        let h = self.scheme.context();
        let end = tokens.len().min(top.len());
        let mut done: Vec<u32> = Vec::new();
        for pos in h.max(1)..=end {
            let window = &tokens[pos - h..pos];
            let mut prf = WindowPrf::new(&self.scheme, &self.key, window);
            let fresh = tally.windows.insert(prf.id());
            done.clear();
            for (rank, &(candidate, logprob)) in top[pos - 1].iter().enumerate() {
                let weight = if rank == 0 {
                    mass_weight(logprob).max(1)
                } else {
                    mass_weight(logprob)
                };
                let outcome = if !fresh {
                    PairOutcome::RepeatedWindow
                } else if candidate == NO_PREDICTION || weight == 0 || done.contains(&candidate) {
                    PairOutcome::NoPrediction
                } else {
                    self.score_candidate(tally, &mut prf, window, candidate, weight)
                };
                if candidate != NO_PREDICTION {
                    done.push(candidate);
                }
                on_pair(pos, window, candidate, weight, outcome);
            }
        }
    }

    /// Score the generated tokens of one text into `tally`.
    pub fn tally(&self, tally: &mut Tally, tokens: &[u32]) {
        self.tally_with(tally, tokens, |_, _| {});
    }

    /// [`Detector::tally`], calling `on_scored(position, value)` for every tuple
    /// scored (the tuple is `(tokens[position-h..position], tokens[position])`) — for
    /// evidence bundles that list the scored tuples.
    pub fn tally_with(&self, tally: &mut Tally, tokens: &[u32], on_scored: impl FnMut(usize, f64)) {
        self.tally_positions(tally, tokens, Positions::All, on_scored);
    }

    /// [`Detector::tally`] scoring only the positions `p` with `mask[p]` true (see
    /// [`Detector::detect_masked`] for why the p-value stays exact).
    pub fn tally_masked(&self, tally: &mut Tally, tokens: &[u32], mask: &[bool]) {
        self.tally_positions(tally, tokens, Positions::Mask(mask), |_, _| {});
    }

    /// [`Detector::tally_with`] over the positions `mask` keeps (`None`: all) —
    /// e.g. to list the tuples an entropy-aware test scored.
    pub fn tally_masked_with(
        &self,
        tally: &mut Tally,
        tokens: &[u32],
        mask: Option<&[bool]>,
        on_scored: impl FnMut(usize, f64),
    ) {
        let positions = mask.map_or(Positions::All, Positions::Mask);
        self.tally_positions(tally, tokens, positions, on_scored);
    }

    /// [`Detector::tally`] with a weight per position (see
    /// [`Detector::detect_weighted`]).
    pub fn tally_weighted(&self, tally: &mut Tally, tokens: &[u32], weights: &[u8]) {
        self.tally_positions(tally, tokens, Positions::Weights(weights), |_, _| {});
    }

    fn tally_positions(
        &self,
        tally: &mut Tally,
        tokens: &[u32],
        positions: Positions<'_>,
        mut on_scored: impl FnMut(usize, f64),
    ) {
        let mut scored = Vec::new();
        tally.common += self.visit(
            tokens,
            positions,
            &mut tally.seen,
            &tally.windows,
            |p, v, w| {
                scored.push((w, v));
                on_scored(p, v);
            },
        );
        for (w, v) in scored {
            tally.add(w, v);
        }
    }

    /// Natural-log p-value of `n` tuples with total `sum`.
    fn ln_p(&self, n: u64, sum: f64) -> f64 {
        if n == 0 {
            return 0.0;
        }
        match self.scheme {
            Scheme::Kgw { gamma, .. } | Scheme::Unigram { gamma, .. } => {
                ln_binomial_sf(sum.round() as u64, n, green_threshold(gamma).1)
            }
            Scheme::Gumbel { .. } => ln_gamma_sf(n, sum),
            Scheme::SynthId { layers, .. } => {
                ln_binomial_sf(sum.round() as u64, n * u64::from(layers), 0.5)
            }
        }
    }

    fn per_tuple_scale(&self) -> f64 {
        match self.scheme {
            Scheme::SynthId { layers, .. } => f64::from(layers),
            _ => 1.0,
        }
    }

    /// The test's result for a tally.
    pub fn finish(&self, tally: &Tally) -> Detection {
        let weighted = tally
            .is_weighted()
            .then(|| self.weighted_statistic(&tally.by_weight))
            .flatten();
        match weighted {
            Some((stat, p)) => {
                let ln_p = ln_weighted_binomial_sf(&stat.levels, stat.observed, p);
                let mut d = self.detection(tally.n, tally.sum, ln_p, tally.common);
                d.weighted = Some(stat);
                d
            }
            None => self.detection(
                tally.n,
                tally.sum,
                self.ln_p(tally.n, tally.sum),
                tally.common,
            ),
        }
    }

    /// The weighted statistic of per-weight totals and the null hit rate: the
    /// test is the exact tail of `Σ_w w · (hits at weight w)`
    /// ([`ln_weighted_binomial_sf`]). `None` for Gumbel, whose tallies are never
    /// weighted (see [`Detector::visit`]).
    fn weighted_statistic(&self, by_weight: &[(u64, f64)]) -> Option<(WeightedStatistic, f64)> {
        let (p, trials_per_tuple) = match self.scheme {
            Scheme::Kgw { gamma, .. } | Scheme::Unigram { gamma, .. } => {
                (green_threshold(gamma).1, 1)
            }
            Scheme::SynthId { layers, .. } => (0.5, u64::from(layers)),
            Scheme::Gumbel { .. } => return None,
        };
        let levels = by_weight
            .iter()
            .enumerate()
            .filter(|(w, &(n, _))| *w > 0 && n > 0)
            .map(|(w, &(n, _))| WeightLevel {
                weight: w as u32,
                trials: n * trials_per_tuple,
            })
            .collect();
        let observed = by_weight
            .iter()
            .enumerate()
            .map(|(w, &(_, sum))| w as u64 * sum.round() as u64)
            .sum();
        Some((WeightedStatistic { levels, observed }, p))
    }

    fn detection(&self, n: u64, sum: f64, ln_p: f64, common_excluded: u64) -> Detection {
        Detection {
            scheme: self.scheme.to_string(),
            key_id: self.key.id().to_owned(),
            scored_tokens: n,
            common_excluded,
            statistic: if n == 0 {
                0.0
            } else {
                sum / (n as f64 * self.per_tuple_scale())
            },
            p_value: ln_p.exp(),
            log10_p_value: ln_to_log10(ln_p),
            weighted: None,
        }
    }

    /// Test one text (its generated tokens).
    pub fn detect(&self, tokens: &[u32]) -> Detection {
        let mut t = Tally::default();
        self.tally(&mut t, tokens);
        self.finish(&t)
    }

    /// Test one text scoring only the positions `p` with `mask[p]` true (positions past
    /// the mask's end are not scored) — entropy-aware detection (SWEET, Lee et al.
    /// 2023), where the mask keeps the tokens at which an unwatermarked model was
    /// uncertain enough for the watermark's bias to have changed the choice. Every
    /// other rule still holds: the first `h` tokens are context, control tokens and
    /// windows already tested are skipped, repeated (window, token) tuples are scored
    /// once, common tuples are left out.
    ///
    /// **Why the p-value stays exact.** The mask must be a function of the text (and
    /// of things fixed before it, such as a model), never of the key. Under the null
    /// the text does not depend on the key, so neither does the set of distinct tuples
    /// the mask selects: the detector scores a key-independent set of distinct keyed
    /// inputs, each green with probability exactly γ′ independently — the same
    /// binomial (Gamma, SynthID) tail as [`Detector::detect`], over fewer tuples. A
    /// mask chosen by looking at green lists would break this; one chosen by entropy
    /// does not. [`Detector::detect_weighted`] generalises the mask to integer
    /// weights, with the exact tail of the weighted count.
    pub fn detect_masked(&self, tokens: &[u32], mask: &[bool]) -> Detection {
        let mut t = Tally::default();
        self.tally_masked(&mut t, tokens, mask);
        self.finish(&t)
    }

    /// Test one text with an integer weight per position (`weights[p]`, 0 = not
    /// scored; positions past the end are not scored) — entropy-*weighted* detection
    /// ([`crate::EntropyRule::Weighted`]): the statistic is the weighted count of
    /// green tuples (of g-bits for SynthID), and the p-value is its exact tail under
    /// the null ([`crate::weighted`]). Every other rule of [`Detector::detect`] holds.
    /// With weights 0/1 this is [`Detector::detect_masked`] exactly; Gumbel scores
    /// count every weight above 0 as 1.
    ///
    /// **Why the p-value stays exact.** As for a mask: the weights must be a
    /// function of the text (and of things fixed before it, such as a model), never of
    /// the key. Under the null the scored tuples and their weights are then fixed
    /// independently of the keyed values, each tuple is green with probability exactly
    /// γ′ independently, and `Σ w·green` has the distribution
    /// [`ln_weighted_binomial_sf`] sums. [`Detection::statistic`] stays the
    /// unweighted green share.
    pub fn detect_weighted(&self, tokens: &[u32], weights: &[u8]) -> Detection {
        let mut t = Tally::default();
        self.tally_weighted(&mut t, tokens, weights);
        self.finish(&t)
    }

    /// [`Detector::detect_corpus`] with one weight vector per text (see
    /// [`Detector::detect_weighted`]; weights 0/1 are a mask).
    pub fn detect_corpus_weighted<'a>(
        &self,
        texts: impl IntoIterator<Item = (&'a [u32], &'a [u8])>,
    ) -> Detection {
        let mut t = Tally::default();
        for (text, weights) in texts {
            self.tally_weighted(&mut t, text, weights);
        }
        self.finish(&t)
    }

    /// One test over a whole corpus, deduplicating across texts.
    pub fn detect_corpus<'a>(&self, texts: impl IntoIterator<Item = &'a [u32]>) -> Detection {
        let mut t = Tally::default();
        for text in texts {
            self.tally(&mut t, text);
        }
        self.finish(&t)
    }

    /// The most significant span of a long text — for watermarked text pasted into
    /// human text. Spans of `min_len · 2^i` scored tuples (and the whole text), each
    /// length at starts a quarter-length apart, are tested; the best p-value is
    /// Bonferroni-corrected by the number of spans tested, so it stays valid.
    pub fn detect_windowed(&self, tokens: &[u32], min_len: usize) -> WindowedDetection {
        self.windowed(tokens, None, min_len)
    }

    /// [`Detector::detect_windowed`] over the positions `mask` keeps (see
    /// [`Detector::detect_masked`]); spans count scored tuples, so a span is as long
    /// in evidence as an unmasked one.
    pub fn detect_windowed_masked(
        &self,
        tokens: &[u32],
        mask: &[bool],
        min_len: usize,
    ) -> WindowedDetection {
        self.windowed(tokens, Some(mask), min_len)
    }

    fn windowed(&self, tokens: &[u32], mask: Option<&[bool]>, min_len: usize) -> WindowedDetection {
        let mut seen = HashSet::new();
        let mut pos = Vec::new();
        let mut prefix = vec![0.0f64];
        let positions = mask.map_or(Positions::All, Positions::Mask);
        let common = self.visit(tokens, positions, &mut seen, &HashSet::new(), |p, v, _| {
            pos.push(p);
            prefix.push(prefix.last().copied().unwrap_or(0.0) + v);
        });
        let n = pos.len();
        let mut lengths = Vec::new();
        let mut len = min_len.max(1);
        while len < n {
            lengths.push(len);
            len *= 2;
        }
        lengths.push(n);
        let mut tests = 0u64;
        let mut best = (0.0f64, 0usize, n);
        for &len in &lengths {
            if len == 0 {
                continue;
            }
            let stride = (len / 4).max(1);
            let mut start = 0;
            while start + len <= n {
                let ln_p = self.ln_p(len as u64, prefix[start + len] - prefix[start]);
                tests += 1;
                if ln_p < best.0 {
                    best = (ln_p, start, start + len);
                }
                start += stride;
            }
        }
        let (ln_p, a, b) = best;
        let corrected = ln_bonferroni(ln_p, tests.max(1));
        let detection = self.detection((b - a) as u64, prefix[b] - prefix[a], corrected, common);
        WindowedDetection {
            span_tokens: if n == 0 {
                (0, 0)
            } else {
                (pos[a], pos[b - 1] + 1)
            },
            spans_tested: tests,
            detection,
        }
    }
}

/// The result of [`Detector::detect_windowed`].
#[derive(Clone, Debug, Serialize)]
pub struct WindowedDetection {
    /// Token range `[start, end)` of the most significant span.
    pub span_tokens: (usize, usize),
    /// Spans tested (the Bonferroni factor applied).
    pub spans_tested: u64,
    /// The best span's test, p-value already corrected.
    pub detection: Detection,
}

/// Several keys tested on one text.
#[derive(Clone, Debug, Serialize)]
pub struct MultiKeyDetection {
    /// The smallest per-key p-value times the number of keys (Bonferroni).
    pub p_value: f64,
    /// log10 of `p_value`.
    pub log10_p_value: f64,
    /// Key with the smallest p-value.
    pub best_key_id: String,
    /// Each key's own (uncorrected) result.
    pub per_key: Vec<Detection>,
}

/// Test `tokens` under each of `keys` (leaving out `common` tuples, if given) and
/// correct for testing several.
pub fn detect_multi_key(
    keys: &[Arc<WatermarkKey>],
    scheme: &Scheme,
    excluded: &ExcludedTokens,
    common: Option<&Arc<CommonTuples>>,
    tokens: &[u32],
) -> MultiKeyDetection {
    detect_multi_key_weighted(keys, scheme, excluded, common, tokens, None)
}

/// [`detect_multi_key`] with a weight per position (see
/// [`Detector::detect_weighted`]; weights 0/1 are a mask); `None` scores every
/// position with weight 1.
pub fn detect_multi_key_weighted(
    keys: &[Arc<WatermarkKey>],
    scheme: &Scheme,
    excluded: &ExcludedTokens,
    common: Option<&Arc<CommonTuples>>,
    tokens: &[u32],
    weights: Option<&[u8]>,
) -> MultiKeyDetection {
    let per_key: Vec<Detection> = keys
        .iter()
        .map(|k| {
            let mut d = Detector::new(k.clone(), scheme.clone(), excluded.clone());
            if let Some(c) = common {
                d = d.with_common(c.clone());
            }
            match weights {
                Some(w) => d.detect_weighted(tokens, w),
                None => d.detect(tokens),
            }
        })
        .collect();
    MultiKeyDetection::from_per_key(per_key)
}

impl MultiKeyDetection {
    /// Combine the results of several keys on the same data (per text, per corpus or
    /// per reading-mode run): the smallest p-value, Bonferroni-corrected by the number
    /// of keys.
    pub fn from_per_key(per_key: Vec<Detection>) -> Self {
        let best = per_key
            .iter()
            .min_by(|a, b| a.log10_p_value.total_cmp(&b.log10_p_value));
        let ln_best = best.map_or(0.0, |d| d.log10_p_value * std::f64::consts::LN_10);
        let corrected = ln_bonferroni(ln_best, per_key.len().max(1) as u64);
        MultiKeyDetection {
            p_value: corrected.exp(),
            log10_p_value: ln_to_log10(corrected),
            best_key_id: best.map(|d| d.key_id.clone()).unwrap_or_default(),
            per_key,
        }
    }
}
