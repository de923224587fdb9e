//! Per-account features, updated one usage event at a time in bounded memory.
//!
//! Rates use exponentially decayed counters (1 h and 24 h time constants); request
//! shares, token ratios and inter-arrival statistics are lifetime running sums (an
//! account that changes behaviour shows it through the rates first). Prompts go
//! through a MinHash LSH ring (template reuse), an embedding reservoir (PRADA minimum
//! distances, diversity, MMD against a benign reference) and a 256-cell topic bitmap.

use isotope_store::UsageEvent;
use serde::{Deserialize, Serialize};

use crate::embed::{cosine_q, distance_q, mmd2_rbf, Quantized};
use crate::sketch::{BandRing, Decayed, Moments, Reservoir, LSH_BANDS};

/// Number of features.
pub const NF: usize = 29;

/// Feature names, in vector order; used in reasons and reports.
pub const FEATURE_NAMES: [&str; NF] = [
    "log_rate_1h",
    "log_rate_24h",
    "log_requests",
    "log_completion_tokens_24h",
    "gap_cv",
    "log_gap_std",
    "hour_entropy",
    "out_in_ratio",
    "share_logprobs",
    "share_top_logprobs",
    "share_n_gt1",
    "share_long",
    "share_reasoning",
    "share_multi_turn",
    "template_reuse",
    "near_duplicate_share",
    "min_distance_mean",
    "min_distance_jb",
    "diversity",
    "topic_coverage",
    "mmd_reference",
    "log_keys",
    "share_error",
    "share_followup_short_gap",
    "log_soft_labels",
    "log_soft_labels_24h",
    "log_active_slots",
    "log_rate_10m",
    "log_soft_labels_1h",
];

/// Features the risk can only rise with (the model's weight on each is constrained
/// to be ≥ 0): volume, rates, output per input, soft-label requests (logprobs,
/// top-k, n > 1, long answers, their cumulative volume), template reuse, keys, and
/// persistence, and short-window intensity (requests in the last ~10 minutes,
/// soft labels in the last ~hour). A simulator whose benign
/// developers reuse templates or ask for logprobs cannot teach the model that these
/// *lower* risk.
pub const MONOTONE: [&str; 16] = [
    "log_rate_1h",
    "log_rate_24h",
    "log_requests",
    "log_completion_tokens_24h",
    "share_logprobs",
    "share_top_logprobs",
    "share_n_gt1",
    "share_long",
    "template_reuse",
    "log_keys",
    "log_soft_labels",
    "log_soft_labels_24h",
    "log_active_slots",
    "out_in_ratio",
    "log_rate_10m",
    "log_soft_labels_1h",
];

/// `MONOTONE` as a per-feature mask.
pub fn monotone_mask() -> [bool; NF] {
    let mut m = [false; NF];
    for (i, name) in FEATURE_NAMES.iter().enumerate() {
        m[i] = MONOTONE.contains(name);
    }
    m
}

/// One feature vector (an account's or a cluster's).
pub type Features = [f64; NF];

const TEN_MIN_MS: f64 = 600_000.0;
const HOUR_MS: f64 = 3_600_000.0;
const DAY_MS: f64 = 86_400_000.0;

/// Sizes of the per-account sketches.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SketchConfig {
    /// Embeddings kept per account (reservoir sample of all its prompts).
    pub reservoir: usize,
    /// Prompts whose LSH band keys are remembered for template reuse.
    pub band_ring_prompts: usize,
    /// `top_logprobs` at or above this counts as asking for soft labels.
    pub top_logprobs_k: u32,
    /// `max_tokens` at or above this counts as asking for a long answer.
    pub long_max_tokens: u32,
    /// A prompt closer than this (Euclidean, unit vectors) to an earlier one of the
    /// same account is a near duplicate (paraphrase or re-ask).
    pub near_duplicate: f32,
}

impl Default for SketchConfig {
    fn default() -> Self {
        SketchConfig {
            reservoir: 48,
            band_ring_prompts: 128,
            top_logprobs_k: 5,
            long_max_tokens: 1000,
            near_duplicate: 0.6,
        }
    }
}

/// The benign reference sample the MMD feature compares against: embeddings of
/// ordinary traffic, with the RBF bandwidth fixed (median heuristic) when it was built.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reference {
    /// Quantised unit vectors.
    pub vectors: Vec<Quantized>,
    /// RBF bandwidth.
    pub bandwidth: f32,
    /// Mean kernel between distinct reference vectors (constant part of MMD²).
    #[serde(default)]
    pub self_kernel: f64,
}

impl Reference {
    /// A reference from vectors, bandwidth by the median heuristic.
    pub fn new(vectors: Vec<Quantized>) -> Self {
        let refs: Vec<&[i8]> = vectors.iter().map(|v| v.as_slice()).collect();
        let bandwidth = crate::embed::median_distance(&refs);
        let self_kernel = crate::embed::mean_self_kernel(&refs, bandwidth).unwrap_or(0.0);
        Reference {
            vectors,
            bandwidth,
            self_kernel,
        }
    }
}

/// What one prompt contributed, computed once per event and shared by the account
/// and the Sybil linker.
pub struct PromptInfo {
    /// LSH band keys (None for an empty prompt).
    pub bands: Option<[u32; LSH_BANDS]>,
    /// Quantised embedding (None for an empty prompt).
    pub embedding: Option<Quantized>,
    /// The prompt asks for reasoning.
    pub reasoning: bool,
}

/// An account's running state. Its memory is bounded by [`SketchConfig`], whatever the
/// number of events.
#[derive(Clone, Debug)]
pub struct AccountState {
    /// Requests seen.
    pub n: u64,
    /// Time of the first and last event.
    pub first_ms: i64,
    /// Time of the last event.
    pub last_ms: i64,
    rate_1h: Decayed,
    rate_24h: Decayed,
    tokens_24h: Decayed,
    gaps: Moments,
    log_gaps: Moments,
    hours: [u32; 24],
    logprobs: u32,
    top_logprobs: u32,
    n_gt1: u32,
    long: u32,
    reasoning: u32,
    multi_turn: u32,
    errors: u32,
    short_followups: u32,
    ratio_sum: f64,
    /// Soft labels asked for: Σ completion tokens × n × max(top_logprobs, 1) over
    /// requests with `logprobs`.
    soft_labels: f64,
    soft_24h: Decayed,
    /// Soft labels, decayed with a 1 h time constant (short intense harvests).
    soft_1h: Decayed,
    /// Requests, decayed with a 10 min time constant.
    rate_10m: Decayed,
    /// Distinct ten-minute slots with activity (persistence).
    active_slots: u32,
    template_hits: u32,
    prompts: u32,
    ring: BandRing,
    reservoir: Reservoir<Quantized>,
    min_dist: Moments,
    near_dups: u32,
    cells: [u64; 4],
    centroid: Vec<f32>,
    /// Distinct API keys (hashes, at most 16 kept).
    keys: Vec<u64>,
    /// 10-minute activity slots: bit i = active in slot `slot - i`.
    pub activity: u64,
    /// The newest slot index in `activity`.
    pub activity_slot: i64,
}

/// Ten-minute slots for timing synchronisation.
pub const SLOT_MS: i64 = 600_000;

impl AccountState {
    /// A fresh account; `seed` makes its reservoir sampling deterministic.
    pub fn new(cfg: &SketchConfig, seed: u64, dim: usize) -> Self {
        AccountState {
            n: 0,
            first_ms: 0,
            last_ms: 0,
            rate_1h: Decayed::default(),
            rate_24h: Decayed::default(),
            tokens_24h: Decayed::default(),
            gaps: Moments::default(),
            log_gaps: Moments::default(),
            hours: [0; 24],
            logprobs: 0,
            top_logprobs: 0,
            n_gt1: 0,
            long: 0,
            reasoning: 0,
            multi_turn: 0,
            errors: 0,
            short_followups: 0,
            ratio_sum: 0.0,
            soft_labels: 0.0,
            soft_24h: Decayed::default(),
            soft_1h: Decayed::default(),
            rate_10m: Decayed::default(),
            active_slots: 0,
            template_hits: 0,
            prompts: 0,
            ring: BandRing::new(cfg.band_ring_prompts),
            reservoir: Reservoir::new(cfg.reservoir, seed),
            min_dist: Moments::default(),
            near_dups: 0,
            cells: [0; 4],
            centroid: vec![0.0; dim],
            keys: Vec::new(),
            activity: 0,
            activity_slot: 0,
        }
    }

    /// Folds one usage event in. Events of one account should arrive in time order;
    /// an out-of-order one is counted with a zero gap.
    pub fn observe(&mut self, ev: &UsageEvent, p: &PromptInfo, cfg: &SketchConfig) {
        let t = ev.created_at_ms;
        if self.n == 0 {
            self.first_ms = t;
        } else {
            let gap_s = ((t - self.last_ms).max(0) as f64 / 1000.0).clamp(0.05, 86_400.0);
            self.gaps.push(gap_s);
            self.log_gaps.push(gap_s.ln());
            if ev.turns > 1 && gap_s < 8.0 {
                self.short_followups += 1;
            }
        }
        self.n += 1;
        self.last_ms = self.last_ms.max(t);
        self.rate_1h.add(1.0, t, HOUR_MS);
        self.rate_24h.add(1.0, t, DAY_MS);
        self.rate_10m.add(1.0, t, TEN_MIN_MS);
        let out_tokens = ev.completion_tokens as f64 * ev.n.max(1) as f64;
        self.tokens_24h.add(out_tokens, t, DAY_MS);
        self.hours[((t.rem_euclid(86_400_000)) / 3_600_000) as usize] += 1;
        self.logprobs += ev.logprobs as u32;
        self.top_logprobs += (ev.top_logprobs.unwrap_or(0) >= cfg.top_logprobs_k) as u32;
        self.n_gt1 += (ev.n > 1) as u32;
        self.long += (ev.max_tokens.unwrap_or(0) >= cfg.long_max_tokens) as u32;
        self.reasoning += p.reasoning as u32;
        self.multi_turn += (ev.turns > 1) as u32;
        self.errors += (ev.status >= 400) as u32;
        self.ratio_sum += ((out_tokens + 1.0) / (ev.prompt_tokens as f64 + 1.0)).ln();
        if ev.logprobs {
            let soft = out_tokens * ev.top_logprobs.unwrap_or(0).max(1) as f64;
            self.soft_labels += soft;
            self.soft_24h.add(soft, t, DAY_MS);
            self.soft_1h.add(soft, t, HOUR_MS);
        }
        let kh = crate::sketch::hash_bytes(ev.api_key_id.as_bytes(), 5);
        if self.keys.len() < 16 && !self.keys.contains(&kh) {
            self.keys.push(kh);
        }
        let slot = t.div_euclid(SLOT_MS);
        if slot > self.activity_slot {
            let shift = (slot - self.activity_slot).min(64) as u32;
            self.activity = self.activity.checked_shl(shift).unwrap_or(0);
            self.activity_slot = slot;
        }
        let back = self.activity_slot - slot;
        if (0..64).contains(&back) {
            if self.activity & (1 << back) == 0 {
                self.active_slots += 1;
            }
            self.activity |= 1 << back;
        }

        if let Some(bands) = &p.bands {
            self.prompts += 1;
            if self.ring.contains_any(bands) {
                self.template_hits += 1;
            }
            self.ring.push(bands);
        }
        if let Some(e) = &p.embedding {
            let min = self
                .reservoir
                .items()
                .iter()
                .map(|r| distance_q(r, e))
                .fold(f32::INFINITY, f32::min);
            if min.is_finite() {
                self.min_dist.push(min as f64);
                if min < cfg.near_duplicate {
                    self.near_dups += 1;
                }
            }
            let cell = topic_cell(e);
            self.cells[cell / 64] |= 1 << (cell % 64);
            for (c, &x) in self.centroid.iter_mut().zip(e) {
                *c += x as f32 / 127.0;
            }
            self.reservoir.offer(e.clone());
        }
    }

    /// The LSH band ring (template memory).
    pub fn ring(&self) -> &BandRing {
        &self.ring
    }

    /// Distinct API keys seen (up to 16).
    pub fn keys(&self) -> usize {
        self.keys.len()
    }

    /// The sum of the account's prompt embeddings (its direction is the centroid).
    pub fn centroid(&self) -> &[f32] {
        &self.centroid
    }

    /// The reservoir sample of prompt embeddings.
    pub fn sample(&self) -> &[Quantized] {
        self.reservoir.items()
    }

    /// Approximate bytes this account holds (struct plus heap), for the memory report.
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.ring.heap_bytes()
            + self.reservoir.cap() * std::mem::size_of::<Quantized>()
            + self
                .reservoir
                .items()
                .iter()
                .map(|v| v.capacity())
                .sum::<usize>()
            + self.centroid.capacity() * 4
            + self.keys.capacity() * 8
    }

    /// Raw sums, so clusters can pool accounts before turning them into features.
    pub fn sums(&self, now_ms: i64) -> Sums {
        let mut s = Sums::default();
        s.add(self, now_ms);
        s
    }

    /// This account's features at `now_ms`.
    pub fn features(&self, now_ms: i64, reference: &Reference) -> Features {
        let sample: Vec<&[i8]> = self.sample().iter().map(|v| v.as_slice()).collect();
        self.sums(now_ms).features(&[sample], reference)
    }
}

/// Pooled raw counts of one or more accounts.
#[derive(Clone, Debug, Default)]
pub struct Sums {
    n: f64,
    rate_1h: f64,
    rate_24h: f64,
    tokens_24h: f64,
    gap_cv: f64,
    log_gap_std: f64,
    gap_weight: f64,
    hours: [f64; 24],
    logprobs: f64,
    top_logprobs: f64,
    n_gt1: f64,
    long: f64,
    reasoning: f64,
    multi_turn: f64,
    errors: f64,
    short_followups: f64,
    ratio_sum: f64,
    soft_labels: f64,
    soft_24h: f64,
    soft_1h: f64,
    rate_10m: f64,
    active_slots: f64,
    template_hits: f64,
    prompts: f64,
    min_dist_mean: f64,
    min_dist_jb: f64,
    min_dist_weight: f64,
    near_dups: f64,
    cells: [u64; 4],
    keys: f64,
    members: usize,
}

impl Sums {
    /// Adds one account's state.
    pub fn add(&mut self, a: &AccountState, now_ms: i64) {
        let n = a.n as f64;
        self.members += 1;
        self.n += n;
        self.rate_1h += a.rate_1h.get(now_ms, HOUR_MS);
        self.rate_24h += a.rate_24h.get(now_ms, DAY_MS);
        self.tokens_24h += a.tokens_24h.get(now_ms, DAY_MS);
        if a.gaps.count() >= 2.0 {
            let w = a.gaps.count();
            self.gap_cv += w * (a.gaps.std() / a.gaps.mean().max(1e-9)).min(10.0);
            self.log_gap_std += w * a.log_gaps.std();
            self.gap_weight += w;
        }
        for (h, &c) in self.hours.iter_mut().zip(&a.hours) {
            *h += c as f64;
        }
        self.logprobs += a.logprobs as f64;
        self.top_logprobs += a.top_logprobs as f64;
        self.n_gt1 += a.n_gt1 as f64;
        self.long += a.long as f64;
        self.reasoning += a.reasoning as f64;
        self.multi_turn += a.multi_turn as f64;
        self.errors += a.errors as f64;
        self.short_followups += a.short_followups as f64;
        self.ratio_sum += a.ratio_sum;
        self.soft_labels += a.soft_labels;
        self.soft_24h += a.soft_24h.get(now_ms, DAY_MS);
        self.soft_1h += a.soft_1h.get(now_ms, HOUR_MS);
        self.rate_10m += a.rate_10m.get(now_ms, TEN_MIN_MS);
        // a cluster is as persistent as its most persistent member (a shared office
        // NAT must not add its members' hours up)
        self.active_slots = self.active_slots.max(a.active_slots as f64);
        self.template_hits += a.template_hits as f64;
        self.prompts += a.prompts as f64;
        if a.min_dist.count() >= 1.0 {
            let w = a.min_dist.count();
            self.min_dist_mean += w * a.min_dist.mean();
            self.min_dist_jb += w * a.min_dist.jarque_bera().ln_1p();
            self.min_dist_weight += w;
        }
        self.near_dups += a.near_dups as f64;
        for (c, &x) in self.cells.iter_mut().zip(&a.cells) {
            *c |= x;
        }
        self.keys += a.keys() as f64;
    }

    /// Turns the pooled counts into features. `samples` are the members' embedding
    /// reservoirs (diversity and MMD are computed on their union, capped at 96).
    pub fn features(&self, samples: &[Vec<&[i8]>], reference: &Reference) -> Features {
        let n = self.n.max(0.0);
        // mild shrinkage towards 0 so two requests are not "100% logprobs"
        let share = |c: f64| c / (n + 2.0);
        let mut f = [0.0; NF];
        f[0] = self.rate_1h.ln_1p();
        f[1] = self.rate_24h.ln_1p();
        f[2] = n.ln_1p();
        f[3] = self.tokens_24h.ln_1p();
        // neutral values (a Poisson process) until there are gaps to measure
        let (cv, lstd) = if self.gap_weight > 0.0 {
            (
                self.gap_cv / self.gap_weight,
                self.log_gap_std / self.gap_weight,
            )
        } else {
            (1.0, 1.28)
        };
        f[4] = cv;
        f[5] = lstd.ln_1p();
        let total_h: f64 = self.hours.iter().sum();
        f[6] = if total_h > 0.0 {
            -self
                .hours
                .iter()
                .filter(|&&c| c > 0.0)
                .map(|&c| {
                    let p = c / total_h;
                    p * p.ln()
                })
                .sum::<f64>()
                / 24f64.ln()
        } else {
            0.0
        };
        f[7] = if n > 0.0 { self.ratio_sum / n } else { 0.0 };
        f[8] = share(self.logprobs);
        f[9] = share(self.top_logprobs);
        f[10] = share(self.n_gt1);
        f[11] = share(self.long);
        f[12] = share(self.reasoning);
        f[13] = share(self.multi_turn);
        f[14] = self.template_hits / (self.prompts + 2.0);
        f[15] = self.near_dups / (self.prompts + 2.0);
        let (mean, jb) = if self.min_dist_weight > 0.0 {
            (
                self.min_dist_mean / self.min_dist_weight,
                self.min_dist_jb / self.min_dist_weight,
            )
        } else {
            (1.2, 0.0)
        };
        f[16] = mean;
        f[17] = jb;
        let mut all: Vec<&[i8]> = samples.iter().flatten().copied().collect();
        all.truncate(96);
        f[18] = diversity(&all);
        let distinct = self.cells.iter().map(|c| c.count_ones()).sum::<u32>() as f64;
        // expected distinct cells for `prompts` uniform draws over 256 cells
        let expected = 256.0 * (1.0 - (1.0 - 1.0 / 256.0f64).powf(self.prompts));
        f[19] = if expected > 0.0 {
            distinct / expected
        } else {
            0.0
        };
        let refs: Vec<&[i8]> = reference.vectors.iter().map(|v| v.as_slice()).collect();
        f[20] = mmd2_rbf(
            &all,
            &refs,
            reference.bandwidth.max(1e-3),
            Some(reference.self_kernel),
        )
        .unwrap_or(0.0);
        f[21] = self.keys.max(1.0).ln();
        f[22] = share(self.errors);
        f[23] = share(self.short_followups);
        f[24] = self.soft_labels.ln_1p();
        f[25] = self.soft_24h.ln_1p();
        f[26] = self.active_slots.ln_1p();
        f[27] = self.rate_10m.ln_1p();
        f[28] = self.soft_1h.ln_1p();
        f
    }

    /// Accounts pooled.
    pub fn members(&self) -> usize {
        self.members
    }
}

/// Mean pairwise distance of a sample (0 for fewer than two): how spread out an
/// account's prompts are.
pub fn diversity(x: &[&[i8]]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let mut s = 0.0;
    let mut c = 0.0;
    for i in 0..x.len() {
        for j in (i + 1)..x.len() {
            s += distance_q(x[i], x[j]) as f64;
            c += 1.0;
        }
    }
    s / c
}

/// One of 256 topic cells: the signs of 8 fixed pseudo-random projections.
pub fn topic_cell(e: &[i8]) -> usize {
    let mut cell = 0usize;
    for b in 0..8u64 {
        let mut dot = 0i32;
        for (i, &x) in e.iter().enumerate() {
            let h = crate::sketch::mix64((b << 32) | i as u64);
            dot += if h & 1 == 1 { x as i32 } else { -(x as i32) };
        }
        if dot > 0 {
            cell |= 1 << b;
        }
    }
    cell
}

/// Cosine of two (unnormalised) centroids.
pub fn centroid_cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Cosine of quantised vectors, re-exported for the linker.
pub fn cos(a: &[i8], b: &[i8]) -> f32 {
    cosine_q(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::{quantize, Embedder, HashedEmbedder};
    use crate::sketch::{band_keys, minhash};
    use crate::text;

    pub(crate) fn event(account: i64, t: i64, prompt: &str) -> UsageEvent {
        UsageEvent {
            id: 0,
            request_id: format!("r{t}"),
            account_id: account,
            api_key_id: format!("ik_{account}"),
            created_at_ms: t,
            endpoint: "/v1/completions".into(),
            model: "m".into(),
            prompt_text: Some(prompt.into()),
            prompt_hash: String::new(),
            turns: 1,
            completion_text: None,
            completion_hash: None,
            prompt_tokens: 20,
            completion_tokens: 100,
            n: 1,
            logprobs: false,
            top_logprobs: None,
            max_tokens: None,
            temperature: None,
            watermark_scheme: None,
            watermark_key_id: None,
            latency_ms: 0,
            status: 200,
            finish_reason: None,
            client_addr: None,
            user_agent: None,
            user: None,
            policy: None,
            partial: false,
        }
    }

    fn info(prompt: &str) -> PromptInfo {
        let emb = HashedEmbedder::default();
        let mut v = vec![0.0; emb.dim()];
        emb.embed(prompt, &mut v);
        let w = text::words(prompt);
        PromptInfo {
            bands: minhash(text::shingles(&w)).map(|s| band_keys(&s)),
            embedding: Some(quantize(&v)),
            reasoning: text::asks_reasoning(prompt),
        }
    }

    fn run(events: &[UsageEvent]) -> Features {
        let cfg = SketchConfig::default();
        let mut a = AccountState::new(&cfg, 1, HashedEmbedder::DEFAULT_DIM);
        for e in events {
            a.observe(e, &info(e.prompt_text.as_deref().unwrap()), &cfg);
        }
        a.features(events.last().unwrap().created_at_ms, &Reference::default())
    }

    const TOPICS: [&str; 8] = [
        "photosynthesis in desert plants",
        "the french revolution and its causes",
        "compound interest on a savings account",
        "how vaccines train the immune system",
        "sorting algorithms like quicksort",
        "the plot of hamlet",
        "volcanic eruptions and plate tectonics",
        "writing a cover letter for a nursing job",
    ];

    #[test]
    fn regular_stream_has_low_cv_and_high_rate() {
        let ev: Vec<_> = (0..200)
            .map(|i| event(1, i * 10_000, TOPICS[i as usize % 8]))
            .collect();
        let f = run(&ev);
        assert!(f[4] < 0.05, "cv {}", f[4]);
        assert!(f[0] > 5.0, "rate {}", f[0]); // ~360 in the last hour
    }

    #[test]
    fn bursty_stream_has_high_cv() {
        let mut t = 0;
        let mut ev = Vec::new();
        for i in 0..60 {
            t += if i % 6 == 0 { 7_200_000 } else { 20_000 };
            ev.push(event(1, t, TOPICS[i % 8]));
        }
        assert!(run(&ev)[4] > 1.5);
    }

    #[test]
    fn shares_count_request_options() {
        let ev: Vec<_> = (0..98)
            .map(|i| {
                let mut e = event(1, i * 1000, "Solve it step by step: 2+2");
                e.logprobs = i % 2 == 0;
                e.top_logprobs = Some(if i % 2 == 0 { 10 } else { 0 });
                e.n = if i % 7 == 0 { 3 } else { 1 };
                e.max_tokens = Some(2048);
                e.turns = 2;
                e
            })
            .collect();
        let f = run(&ev);
        assert!((f[8] - 0.5).abs() < 0.02 && (f[9] - 0.5).abs() < 0.02);
        assert!((f[10] - 14.0 / 100.0).abs() < 0.01);
        assert!(f[11] > 0.97 && f[12] > 0.97 && f[13] > 0.97);
    }

    #[test]
    fn templates_are_reused_and_distinct_prompts_are_not() {
        let templ: Vec<_> = (0..40)
            .map(|i| {
                event(1, i * 1000, &format!(
                    "You are an expert. Write a detailed, comprehensive explanation of {} for an advanced reader, with examples.",
                    TOPICS[i as usize % 8]
                ))
            })
            .collect();
        let distinct: Vec<_> = (0..8)
            .map(|i| event(1, i * 1000, TOPICS[i as usize]))
            .collect();
        let ft = run(&templ);
        let fd = run(&distinct);
        assert!(ft[14] > 0.7, "templated {}", ft[14]);
        assert!(fd[14] < 0.15, "distinct {}", fd[14]);
        // the templated sweep repeats topics: near duplicates, small minimum distances
        assert!(ft[15] > fd[15] && ft[16] < fd[16]);
        assert!(ft[18] < fd[18], "diversity {} vs {}", ft[18], fd[18]);
    }

    #[test]
    fn soft_labels_count_tokens_times_top_k_and_slots_count_once() {
        let ev: Vec<_> = (0..10)
            .map(|i| {
                let mut e = event(1, i * 60_000, TOPICS[i as usize % 8]);
                e.completion_tokens = 4;
                e.logprobs = i < 5;
                e.top_logprobs = (i < 5).then_some(20);
                e.n = if i == 0 { 2 } else { 1 };
                e
            })
            .collect();
        let f = run(&ev);
        // 4 tokens × 20 × (2 + 1 + 1 + 1 + 1) requests' choices = 480
        assert!((f[24] - 480f64.ln_1p()).abs() < 1e-9, "{}", f[24]);
        assert!(f[25] <= f[24] && f[25] > 0.99 * f[24]);
        // ten minutes apart from 0 to 9 minutes: one slot
        assert!((f[26] - 2f64.ln()).abs() < 1e-9, "{}", f[26]);
        let spread: Vec<_> = (0..10)
            .map(|i| event(1, i * 3_600_000, TOPICS[0]))
            .collect();
        assert!((run(&spread)[26] - 11f64.ln()).abs() < 1e-9);
        let mask = monotone_mask();
        assert!(mask[8] && mask[24] && !mask[12]);
        assert_eq!(mask.iter().filter(|&&m| m).count(), MONOTONE.len());
    }

    #[test]
    fn hour_entropy_is_high_around_the_clock() {
        let day: Vec<_> = (0..96)
            .map(|i| event(1, i * 900_000, TOPICS[i as usize % 8]))
            .collect();
        let office: Vec<_> = (0..96)
            .map(|i| {
                event(
                    1,
                    (i / 8) * 86_400_000 + 9 * 3_600_000 + (i % 8) * 1_800_000,
                    TOPICS[i as usize % 8],
                )
            })
            .collect();
        assert!(run(&day)[6] > 0.99);
        assert!(run(&office)[6] < 0.45);
    }
}
