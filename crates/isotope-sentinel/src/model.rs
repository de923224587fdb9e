//! The risk model: an additive logistic model — the logit is a bias plus one
//! piecewise-constant *shape function* per feature — fitted by gradient boosting of
//! one-feature stumps, and thresholds that map its score to a policy level.
//!
//! Why additive: a linear logit cannot say "persistent *or* intense": it has one
//! slope per feature, so a feature that only matters above some level (a burst's
//! 10-minute rate above anything a person types) gets the slope that suits the bulk
//! of accounts, often 0. A shape per feature can rise steeply where the evidence is and
//! stay flat elsewhere. Why not deeper trees: interactions between features are where
//! a simulator's artefacts hide (this pacing *with* that answer length); one feature
//! at a time, the model stays a sum of per-feature contributions, so each reason is
//! exactly that feature's share of the logit, and a monotone feature's shape is
//! constrained to be non-decreasing (risk never falls as volume, soft labels or
//! template reuse grow), which a stump checks split by split. Hyper-parameters are
//! fixed constants ([`BoostParams::default`]), not searched on evaluation data.

use serde::{Deserialize, Serialize};

use crate::features::{monotone_mask, Features, Reference, FEATURE_NAMES, NF};

/// The policy level: one definition, in `isotope-store` (where an operator's per-key
/// level is kept as its text), shared with the server that enforces it.
pub use isotope_store::Level;

/// Score thresholds (probabilities) at which each level starts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Thresholds {
    /// Calibrated so that at most the target share of benign accounts ever reach it.
    pub flag: f64,
    /// `flag` plus fixed logit offsets: each step needs e^k times stronger odds.
    pub throttle: f64,
    /// See `throttle`.
    pub degrade: f64,
    /// See `throttle`.
    pub block: f64,
}

/// Logit offsets above the flag threshold for throttle, degrade and block.
pub const LEVEL_OFFSETS: [f64; 3] = [1.0, 2.5, 4.0];

/// How far (in logit) a score must fall below a level's threshold before an account
/// at that level steps down. Why: a harvester's score drifts with its windows and
/// sits near a threshold for many re-scores; without a margin its level flaps
/// (observe → flag → observe → flag: one alert and one policy change each time),
/// which was seen in the red-team runs. Half the smallest gap between levels, so a
/// step down is still one level's worth of evidence less, never a whole level.
pub const STEP_DOWN_LOGIT: f64 = 0.5;

impl Thresholds {
    /// Thresholds from the flag threshold and [`LEVEL_OFFSETS`].
    pub fn from_flag(flag: f64) -> Self {
        let l = logit(flag);
        Thresholds {
            flag,
            throttle: sigmoid(l + LEVEL_OFFSETS[0]),
            degrade: sigmoid(l + LEVEL_OFFSETS[1]),
            block: sigmoid(l + LEVEL_OFFSETS[2]),
        }
    }

    /// The level of an account with this score that was at `previous` before: up at
    /// once to [`Thresholds::level`], down only as far as the score has fallen
    /// [`STEP_DOWN_LOGIT`] below each threshold it leaves (hysteresis). Never above
    /// `previous` or the score's own level, whichever is higher.
    pub fn level_after(&self, previous: Level, score: f64) -> Level {
        let now = self.level(score);
        if now >= previous {
            return now;
        }
        let held = self.level(sigmoid(logit(score) + STEP_DOWN_LOGIT));
        now.max(held.min(previous))
    }

    /// The level of a score (for an account with no previous level).
    pub fn level(&self, score: f64) -> Level {
        if score >= self.block {
            Level::Block
        } else if score >= self.degrade {
            Level::Degrade
        } else if score >= self.throttle {
            Level::Throttle
        } else if score >= self.flag {
            Level::Flag
        } else {
            Level::Observe
        }
    }
}

/// Logistic function.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Inverse of [`sigmoid`] (clamped away from 0 and 1).
pub fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

/// One feature's contribution to the logit: piecewise constant over the intervals
/// the `edges` cut the line into. A value `x` falls in interval `#{edges ≤ x}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// Ascending cut points.
    pub edges: Vec<f64>,
    /// `edges.len() + 1` logit contributions, one per interval.
    pub values: Vec<f64>,
}

impl Shape {
    /// The flat shape (contributes nothing).
    pub fn flat() -> Self {
        Shape {
            edges: Vec::new(),
            values: vec![0.0],
        }
    }

    /// The contribution of value `x`.
    pub fn at(&self, x: f64) -> f64 {
        self.values[self.edges.partition_point(|&e| e <= x)]
    }

    /// Largest minus smallest contribution: how much this feature can move the logit.
    pub fn range(&self) -> f64 {
        let (lo, hi) = self
            .values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        hi - lo
    }

    fn check(&self) -> Result<(), String> {
        if self.values.len() != self.edges.len() + 1 {
            return Err("needs one value more than edges".into());
        }
        if self.edges.iter().any(|e| !e.is_finite()) || self.edges.windows(2).any(|w| w[0] >= w[1])
        {
            return Err("edges must be finite and strictly ascending".into());
        }
        if self.values.iter().any(|v| !v.is_finite()) {
            return Err("values must be finite".into());
        }
        Ok(())
    }
}

/// A trained model: one shape per feature, bias, thresholds, and the benign reference
/// sample the MMD feature compares against (it is part of what was trained).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Model {
    /// The embedder the reference and training used ([`crate::Embedder::name`]).
    pub embedder: String,
    /// Feature names, in order (checked on load).
    pub features: Vec<String>,
    /// Per feature, its contribution to the logit, centred so that the average benign
    /// training row gets 0 from each feature (a reason > 0 says "more harvest-like than
    /// a typical benign account in this respect").
    pub shapes: Vec<Shape>,
    /// Intercept.
    pub bias: f64,
    /// Level thresholds.
    pub thresholds: Thresholds,
    /// Benign reference sample for MMD.
    pub reference: Reference,
    /// Accounts need this many requests before their own score counts (fewer say
    /// nothing; clusters pool requests and are scored sooner).
    pub min_requests: u64,
    /// Free text: what it was trained on.
    pub trained_on: String,
}

/// One feature's share in a score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// Feature name.
    pub feature: String,
    /// Its raw value.
    pub value: f64,
    /// The feature's shape at that value, in logits (0: as a typical benign account).
    pub contribution: f64,
    /// `account` or `cluster`.
    pub scope: String,
}

impl Model {
    /// A model that scores everything 0.5 and flags nothing: what feature extraction
    /// runs with while a model is being trained.
    pub fn untrained(embedder: String, reference: Reference) -> Self {
        Model {
            embedder,
            features: FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
            shapes: vec![Shape::flat(); NF],
            bias: 0.0,
            thresholds: Thresholds::from_flag(1.0),
            reference,
            min_requests: 5,
            trained_on: "untrained".into(),
        }
    }

    /// Checks a loaded model against this build's feature list.
    pub fn validate(&self) -> Result<(), String> {
        if self.features.len() != NF
            || self.features.iter().zip(FEATURE_NAMES).any(|(a, b)| a != b)
            || self.shapes.len() != NF
        {
            return Err("model features do not match this build's feature list".into());
        }
        for (i, s) in self.shapes.iter().enumerate() {
            s.check()
                .map_err(|e| format!("model shape of {}: {e}", FEATURE_NAMES[i]))?;
            if monotone_mask()[i] && s.values.windows(2).any(|w| w[1] < w[0]) {
                return Err(format!(
                    "model shape of {} falls: risk must not fall as it grows",
                    FEATURE_NAMES[i]
                ));
            }
        }
        if !self.bias.is_finite() {
            return Err("model bias must be finite".into());
        }
        Ok(())
    }

    /// The logit of a feature vector.
    pub fn logit(&self, f: &Features) -> f64 {
        self.bias + (0..NF).map(|i| self.shapes[i].at(f[i])).sum::<f64>()
    }

    /// Risk score in [0, 1].
    pub fn score(&self, f: &Features) -> f64 {
        sigmoid(self.logit(f))
    }

    /// The `k` features pushing the score up most.
    pub fn reasons(&self, f: &Features, k: usize, scope: &str) -> Vec<Reason> {
        let mut r: Vec<Reason> = (0..NF)
            .map(|i| Reason {
                feature: FEATURE_NAMES[i].to_string(),
                value: f[i],
                contribution: self.shapes[i].at(f[i]),
                scope: scope.to_string(),
            })
            .filter(|r| r.contribution > 0.0)
            .collect();
        r.sort_by(|a, b| b.contribution.total_cmp(&a.contribution));
        r.truncate(k);
        r
    }
}

/// Fixed boosting constants (textbook values — histogram boosting's defaults with
/// stumps — not searched).
#[derive(Clone, Debug)]
pub struct BoostParams {
    /// Quantile bins per feature (cut points come from the training rows; at most
    /// 256, since a row's bin is kept in a byte).
    pub bins: usize,
    /// Boosting rounds (one stump each).
    pub rounds: usize,
    /// Shrinkage of each stump.
    pub learning_rate: f64,
    /// L2 penalty on leaf values (in units of the class-balanced row weight).
    pub l2: f64,
    /// Rows each side of a split must have.
    pub min_leaf_rows: usize,
}

impl Default for BoostParams {
    fn default() -> Self {
        BoostParams {
            bins: 32,
            rounds: 300,
            learning_rate: 0.1,
            l2: 1.0,
            min_leaf_rows: 50,
        }
    }
}

/// Quantile cut points of one feature's values: at most `bins − 1`, strictly
/// ascending. Each goes halfway between the value at a quantile and the next distinct
/// value above it, so ties never swallow a cut: a feature that is 0 for most rows
/// still gets a cut just above 0.
fn cut_points(values: &mut [f64], bins: usize) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let mut cuts: Vec<f64> = Vec::new();
    if n == 0 {
        return cuts;
    }
    for k in 0..bins.saturating_sub(1) {
        let v = values[(k * n / bins).min(n - 1)];
        let above = values.partition_point(|&x| x <= v);
        if let Some(&next) = values.get(above) {
            let c = v + (next - v) / 2.0;
            if cuts.last().is_none_or(|&l| l < c) {
                cuts.push(c);
            }
        }
    }
    cuts
}

/// Fits the additive model by gradient boosting of one-feature stumps on the logistic
/// loss (Newton leaf values, L2 on leaves). Rows are weighted (`w`); the weights are
/// rescaled so each class has the same total — the simulator's class ratio is not the
/// real one, and thresholds are calibrated separately anyway. A stump on a feature in
/// `monotone` may only step up. Returns `(shapes, bias)`, each shape centred on the
/// benign rows' weighted mean (moved into the bias).
pub fn fit_additive(
    rows: &[Features],
    labels: &[bool],
    w: &[f64],
    monotone: &[bool; NF],
    p: &BoostParams,
) -> (Vec<Shape>, f64) {
    let n = rows.len();
    let pos: f64 = w
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l)
        .map(|(w, _)| w)
        .sum();
    let neg: f64 = w
        .iter()
        .zip(labels)
        .filter(|(_, &l)| !l)
        .map(|(w, _)| w)
        .sum();
    // class-balanced, mean weight 1
    let cw: Vec<f64> = w
        .iter()
        .zip(labels)
        .map(|(&wi, &l)| {
            let total = if l { pos } else { neg };
            wi / total.max(1e-300) * n as f64 / 2.0
        })
        .collect();
    let cuts: Vec<Vec<f64>> = (0..NF)
        .map(|j| {
            let mut v: Vec<f64> = rows.iter().map(|r| r[j]).collect();
            cut_points(&mut v, p.bins.clamp(2, 256))
        })
        .collect();
    let bin: Vec<[u8; NF]> = rows
        .iter()
        .map(|r| {
            let mut b = [0u8; NF];
            for j in 0..NF {
                b[j] = cuts[j].partition_point(|&e| e <= r[j]) as u8;
            }
            b
        })
        .collect();
    let mut table: Vec<Vec<f64>> = cuts.iter().map(|c| vec![0.0; c.len() + 1]).collect();
    let mut logit = vec![0.0f64; n];
    let mut bias = 0.0;
    let (mut g, mut h) = (vec![0.0; n], vec![0.0; n]);
    for _ in 0..p.rounds {
        for i in 0..n {
            let q = sigmoid(logit[i]);
            g[i] = cw[i] * (q - labels[i] as u8 as f64);
            h[i] = cw[i] * q * (1.0 - q);
        }
        let (gt, ht): (f64, f64) = (g.iter().sum(), h.iter().sum());
        let parent = gt * gt / (ht + p.l2);
        // best (gain, feature, last bin on the left, left value, right value)
        let mut best: Option<(f64, usize, usize, f64, f64)> = None;
        for j in 0..NF {
            let k = table[j].len();
            let (mut gb, mut hb, mut nb) = (vec![0.0; k], vec![0.0; k], vec![0usize; k]);
            for i in 0..n {
                let b = bin[i][j] as usize;
                gb[b] += g[i];
                hb[b] += h[i];
                nb[b] += 1;
            }
            let (mut gl, mut hl, mut nl) = (0.0, 0.0, 0usize);
            for t in 0..k.saturating_sub(1) {
                gl += gb[t];
                hl += hb[t];
                nl += nb[t];
                let (gr, hr, nr) = (gt - gl, ht - hl, n - nl);
                if nl < p.min_leaf_rows || nr < p.min_leaf_rows || hl < 1e-3 || hr < 1e-3 {
                    continue;
                }
                let (vl, vr) = (-gl / (hl + p.l2), -gr / (hr + p.l2));
                if monotone[j] && vl > vr {
                    continue;
                }
                let gain = gl * gl / (hl + p.l2) + gr * gr / (hr + p.l2) - parent;
                if gain > 1e-12 && best.is_none_or(|b| gain > b.0) {
                    best = Some((gain, j, t, vl, vr));
                }
            }
        }
        let Some((_, j, t, vl, vr)) = best else {
            break;
        };
        let (vl, vr) = (p.learning_rate * vl, p.learning_rate * vr);
        for (b, v) in table[j].iter_mut().enumerate() {
            *v += if b <= t { vl } else { vr };
        }
        for i in 0..n {
            logit[i] += if bin[i][j] as usize <= t { vl } else { vr };
        }
    }
    // centre each shape on the benign rows, merge equal neighbouring intervals
    let mut shapes = Vec::with_capacity(NF);
    for j in 0..NF {
        let (mut s, mut sw) = (0.0, 0.0);
        for i in (0..n).filter(|&i| !labels[i]) {
            s += cw[i] * table[j][bin[i][j] as usize];
            sw += cw[i];
        }
        let c = if sw > 0.0 { s / sw } else { 0.0 };
        bias += c;
        let mut shape = Shape {
            edges: Vec::new(),
            values: vec![table[j][0] - c],
        };
        for (e, &v) in cuts[j].iter().zip(&table[j][1..]) {
            if Some(&(v - c)) != shape.values.last() {
                shape.edges.push(*e);
                shape.values.push(v - c);
            }
        }
        shapes.push(shape);
    }
    (shapes, bias)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_from(shapes: Vec<Shape>, bias: f64) -> Model {
        let mut m = Model::untrained("x".into(), Reference::default());
        m.shapes = shapes;
        m.bias = bias;
        m
    }

    #[test]
    fn shapes_are_piecewise_constant_and_cut_points_split_distinct_values() {
        let s = Shape {
            edges: vec![1.0, 2.0],
            values: vec![-1.0, 0.5, 2.0],
        };
        assert_eq!(s.at(0.0), -1.0);
        assert_eq!(s.at(1.0), 0.5); // an edge belongs to the interval above it
        assert_eq!(s.at(1.5), 0.5);
        assert_eq!(s.at(9.0), 2.0);
        assert_eq!(s.range(), 3.0);
        let mut v: Vec<f64> = (0..100).map(|i| (i % 10) as f64).collect();
        let c = cut_points(&mut v, 4);
        assert_eq!(c, vec![0.5, 2.5, 5.5]);
        // a constant feature gives no cut, few distinct values give at most one each
        assert!(cut_points(&mut [3.0; 50], 32).is_empty());
        assert_eq!(cut_points(&mut [0.0, 0.0, 1.0, 1.0], 32), vec![0.5]);
        assert!(Shape {
            edges: vec![2.0, 1.0],
            values: vec![0.0; 3]
        }
        .check()
        .is_err());
        assert!(Shape {
            edges: vec![1.0],
            values: vec![0.0]
        }
        .check()
        .is_err());
    }

    /// What a linear logit cannot do: harvesters are the accounts that are *either*
    /// persistent *or* intense, and intensity only matters far above the benign range.
    #[test]
    fn additive_model_learns_either_or_thresholds() {
        let (slots, rate) = (26, 27); // log_active_slots, log_rate_10m
        assert_eq!(FEATURE_NAMES[slots], "log_active_slots");
        assert_eq!(FEATURE_NAMES[rate], "log_rate_10m");
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..3000 {
            let noise = |k: usize| ((i * k) % 101) as f64 / 101.0;
            let mut f = [0.0; NF];
            f[slots] = 2.0 * noise(37);
            f[rate] = 2.0 * noise(53);
            f[1] = noise(71); // unrelated
            let kind = i % 6;
            // the classes overlap (a separable sample lets boosting chase noise)
            if kind == 4 {
                f[slots] += 1.5; // persistent harvester
            } else if kind == 5 {
                f[rate] += 2.0; // intense burst
            }
            rows.push(f);
            labels.push(kind >= 4);
        }
        let (shapes, bias) = fit_additive(
            &rows,
            &labels,
            &vec![1.0; rows.len()],
            &monotone_mask(),
            &BoostParams::default(),
        );
        let m = model_from(shapes, bias);
        m.validate().unwrap();
        let mut persistent = [0.0; NF];
        persistent[slots] = 3.4;
        let mut intense = [0.0; NF];
        intense[rate] = 3.9;
        let mut ordinary = [0.0; NF];
        ordinary[slots] = 1.0;
        ordinary[rate] = 1.0;
        assert!(
            m.score(&persistent) > 0.95,
            "{} {:?} {:?}",
            m.score(&persistent),
            m.shapes[slots],
            m.shapes[rate]
        );
        assert!(m.score(&intense) > 0.95, "{}", m.score(&intense));
        assert!(m.score(&ordinary) < 0.05, "{}", m.score(&ordinary));
        // flat where there is no evidence: inside the benign range the rate barely counts
        let inside = m.shapes[rate].at(1.4) - m.shapes[rate].at(0.1);
        let beyond = m.shapes[rate].at(3.9) - m.shapes[rate].at(1.4);
        assert!(beyond > 5.0 * inside.abs(), "{inside} {beyond}");
        assert!(m.shapes[1].range() < 1.0, "{:?}", m.shapes[1]);
        assert_eq!(m.reasons(&intense, 3, "account")[0].feature, "log_rate_10m");
    }

    #[test]
    fn monotone_shapes_never_fall() {
        let mask = monotone_mask();
        let lp = FEATURE_NAMES
            .iter()
            .position(|n| *n == "share_logprobs")
            .unwrap();
        let tr = FEATURE_NAMES
            .iter()
            .position(|n| *n == "template_reuse")
            .unwrap();
        let free = FEATURE_NAMES
            .iter()
            .position(|n| *n == "share_reasoning")
            .unwrap();
        assert!(mask[lp] && mask[tr] && !mask[free]);
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..1200 {
            let mut f = [0.0; NF];
            let pos = i % 3 == 0;
            let noise = |k: usize| ((i * k) % 97) as f64 / 97.0;
            f[0] = if pos { 1.5 } else { 0.0 } + noise(37);
            // in this (simulated) sample harvesters ask for logprobs *less*…
            f[lp] = if pos { 0.1 } else { 0.4 } + 0.3 * noise(53);
            // …and reuse templates more
            f[tr] = if pos { 0.6 } else { 0.2 } + 0.3 * noise(61);
            // an unconstrained feature pointing down stays free to
            f[free] = if pos { 0.0 } else { 0.5 } + 0.3 * noise(71);
            rows.push(f);
            labels.push(pos);
        }
        let w = vec![1.0; rows.len()];
        let p = BoostParams::default();
        let (free_fit, _) = fit_additive(&rows, &labels, &w, &[false; NF], &p);
        let falls = |s: &Shape| s.values.first().unwrap() - s.values.last().unwrap();
        assert!(
            falls(&free_fit[lp]) > 0.5,
            "unconstrained shape falls: {:?}",
            free_fit[lp]
        );
        let (shapes, bias) = fit_additive(&rows, &labels, &w, &mask, &p);
        let m = model_from(shapes, bias);
        m.validate().unwrap();
        assert!(m.shapes[lp].values.windows(2).all(|v| v[1] >= v[0]));
        assert!(m.shapes[tr].range() > 0.1 && m.shapes[0].range() > 0.1);
        assert!(falls(&m.shapes[free]) > 0.1, "{:?}", m.shapes[free]);
        // the score never falls as a monotone feature rises, whatever the rest is
        for (i, row) in rows.iter().enumerate().take(200) {
            let mut f = *row;
            for j in (0..NF).filter(|&j| mask[j]) {
                let before = m.score(&f);
                f[j] += 0.1 + (i % 7) as f64;
                assert!(
                    m.score(&f) >= before,
                    "{} lowered the score",
                    FEATURE_NAMES[j]
                );
            }
        }
        // a model file that breaks the rule is refused
        let mut bad = m.clone();
        bad.shapes[lp] = Shape {
            edges: vec![0.5],
            values: vec![0.0, -0.5],
        };
        assert!(bad.validate().unwrap_err().contains("share_logprobs"));
    }

    #[test]
    fn thresholds_are_ordered_and_levels_follow() {
        let t = Thresholds::from_flag(0.8);
        assert!(t.flag < t.throttle && t.throttle < t.degrade && t.degrade < t.block);
        assert_eq!(t.level(0.5), Level::Observe);
        assert_eq!(t.level(0.81), Level::Flag);
        assert_eq!(t.level(1.0), Level::Block);
        assert_eq!(
            serde_json::to_string(&Level::Degrade).unwrap(),
            "\"degrade\""
        );
    }

    /// A score this many logits from the threshold `p`.
    fn near(p: f64, by: f64) -> f64 {
        sigmoid(logit(p) + by)
    }

    #[test]
    fn levels_go_up_at_once_and_down_only_past_the_margin() {
        let t = Thresholds::from_flag(0.8);
        // up: immediate, from any level
        assert_eq!(t.level_after(Level::Observe, 1.0), Level::Block);
        assert_eq!(
            t.level_after(Level::Observe, near(t.flag, 0.01)),
            Level::Flag
        );
        // just under the flag threshold: a flagged account stays flagged, an observed
        // one is not raised
        let under = near(t.flag, -0.2);
        assert_eq!(t.level_after(Level::Flag, under), Level::Flag);
        assert_eq!(t.level_after(Level::Observe, under), Level::Observe);
        // past the margin it steps down
        let past = near(t.flag, -(STEP_DOWN_LOGIT + 0.1));
        assert_eq!(t.level_after(Level::Flag, past), Level::Observe);
        // from block, a score just under degrade's threshold holds degrade only (one
        // level's margin, not a pass to stay at block)
        assert_eq!(
            t.level_after(Level::Block, near(t.degrade, -0.2)),
            Level::Degrade
        );
        // …and a score well inside the throttle band falls to throttle
        assert_eq!(
            t.level_after(Level::Block, near(t.throttle, 0.1)),
            Level::Throttle
        );
    }

    #[test]
    fn a_score_wobbling_at_the_threshold_changes_level_once() {
        let t = Thresholds::from_flag(0.9);
        let scores: Vec<f64> = (0..40)
            .map(|i| near(t.flag, if i % 2 == 0 { 0.1 } else { -0.1 }))
            .collect();
        let changes = |hysteresis: bool| {
            let mut level = Level::Observe;
            let mut n = 0;
            for &s in &scores {
                let next = if hysteresis {
                    t.level_after(level, s)
                } else {
                    t.level(s)
                };
                n += usize::from(next != level);
                level = next;
            }
            n
        };
        assert_eq!(changes(false), 40);
        assert_eq!(changes(true), 1);
    }

    proptest::proptest! {
        /// Hysteresis only ever holds a level the account had: the new level is at
        /// least the score's own and at most the higher of that and the previous one,
        /// and it is the score's own whenever that is not lower than the previous.
        #[test]
        fn level_after_stays_between_the_score_and_the_previous_level(
            flag in 0.05f64..0.999,
            score in 0.0f64..=1.0,
            prev in 0usize..5,
        ) {
            let t = Thresholds::from_flag(flag);
            let previous = [Level::Observe, Level::Flag, Level::Throttle, Level::Degrade, Level::Block][prev];
            let own = t.level(score);
            let after = t.level_after(previous, score);
            proptest::prop_assert!(after >= own);
            proptest::prop_assert!(after <= own.max(previous));
            if own >= previous {
                proptest::prop_assert_eq!(after, own);
            }
        }
    }
}
