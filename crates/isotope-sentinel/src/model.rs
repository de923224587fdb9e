//! The risk model: L2-regularised logistic regression on standardised features, and
//! thresholds that map its score to a policy level.
//!
//! Why logistic regression: two dozen features whose direction is known, a few
//! thousand training accounts from a simulator — a linear model with a fixed, strong
//! L2 penalty cannot memorise simulator artefacts the way trees can, its score is a
//! probability, and `weight × standardised value` is an honest per-feature reason.
//! Hyper-parameters are fixed constants, not searched.

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

    /// The level of a score.
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

/// A trained model: standardisation, weights, thresholds, and the benign reference
/// sample the MMD feature compares against (it is part of what was trained).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Model {
    /// The embedder the reference and training used ([`crate::Embedder::name`]).
    pub embedder: String,
    /// Feature names, in order (checked on load).
    pub features: Vec<String>,
    /// Per-feature mean of the training rows.
    pub mean: Vec<f64>,
    /// Per-feature standard deviation of the training rows (floored).
    pub scale: Vec<f64>,
    /// Weights on standardised features.
    pub weights: Vec<f64>,
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
    /// `weight × standardised value`, in logits.
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
            mean: vec![0.0; NF],
            scale: vec![1.0; NF],
            weights: vec![0.0; NF],
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
            || self.weights.len() != NF
            || self.mean.len() != NF
            || self.scale.len() != NF
        {
            return Err("model features do not match this build's feature list".into());
        }
        if let Some(i) = (0..NF).find(|&i| monotone_mask()[i] && self.weights[i] < 0.0) {
            return Err(format!(
                "model weight on {} is negative: risk must not fall as it grows",
                FEATURE_NAMES[i]
            ));
        }
        if self.scale.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            return Err("model feature scales must be positive".into());
        }
        Ok(())
    }

    /// The logit of a feature vector.
    pub fn logit(&self, f: &Features) -> f64 {
        self.bias
            + (0..NF)
                .map(|i| self.weights[i] * (f[i] - self.mean[i]) / self.scale[i])
                .sum::<f64>()
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
                contribution: self.weights[i] * (f[i] - self.mean[i]) / self.scale[i],
                scope: scope.to_string(),
            })
            .filter(|r| r.contribution > 0.0)
            .collect();
        r.sort_by(|a, b| b.contribution.total_cmp(&a.contribution));
        r.truncate(k);
        r
    }
}

/// L2 penalty on standardised weights (fixed; with ~25 features and thousands of
/// rows it mostly guards against separable simulator artefacts blowing up weights).
pub const L2: f64 = 1.0;

/// Fits logistic regression by Newton's method. Rows are weighted (`w`); the weights
/// are rescaled so each class has total weight 1 — the sim's class ratio is not the
/// real one, and thresholds are calibrated separately anyway. Returns
/// `(mean, scale, weights, bias)`.
pub fn fit_logistic(
    rows: &[Features],
    labels: &[bool],
    w: &[f64],
    l2: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
    fit_logistic_monotone(rows, labels, w, l2, &[false; NF])
}

/// [`fit_logistic`] with the weights of features in `nonneg` constrained to be ≥ 0
/// (the score is then non-decreasing in each of them). Active-set Newton: a
/// constrained weight that a step would make negative is held at 0; once converged,
/// a held weight whose gradient says the loss would fall if it grew is released;
/// repeated until no weight changes set (the loss is convex, so this reaches the
/// constrained optimum).
#[allow(clippy::needless_range_loop)] // dense linear algebra reads best with indexes
pub fn fit_logistic_monotone(
    rows: &[Features],
    labels: &[bool],
    w: &[f64],
    l2: f64,
    nonneg: &[bool; NF],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, f64) {
    let n = rows.len();
    let mut mean = vec![0.0; NF];
    let mut scale = vec![0.0; NF];
    let wsum: f64 = w.iter().sum::<f64>().max(1e-12);
    for (r, &wi) in rows.iter().zip(w) {
        for j in 0..NF {
            mean[j] += wi * r[j] / wsum;
        }
    }
    for (r, &wi) in rows.iter().zip(w) {
        for j in 0..NF {
            scale[j] += wi * (r[j] - mean[j]).powi(2) / wsum;
        }
    }
    scale.iter_mut().for_each(|s| *s = s.sqrt().max(1e-3));
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
    let cw: Vec<f64> = w
        .iter()
        .zip(labels)
        .map(|(&wi, &l)| {
            if l {
                wi / pos.max(1e-12)
            } else {
                wi / neg.max(1e-12)
            }
        })
        .collect();
    let d = NF + 1;
    let x = |i: usize, j: usize| -> f64 {
        if j == NF {
            1.0
        } else {
            (rows[i][j] - mean[j]) / scale[j]
        }
    };
    let mut beta = vec![0.0; d];
    let mut held = [false; NF];
    let gradient_hessian = |beta: &[f64]| {
        let mut g = vec![0.0; d];
        let mut h = vec![vec![0.0; d]; d];
        for i in 0..n {
            let z: f64 = (0..d).map(|j| beta[j] * x(i, j)).sum();
            let p = sigmoid(z);
            let y = labels[i] as u8 as f64;
            let xi: Vec<f64> = (0..d).map(|j| x(i, j)).collect();
            let s = cw[i] * p * (1.0 - p);
            for a in 0..d {
                g[a] += cw[i] * (p - y) * xi[a];
                for b in a..d {
                    h[a][b] += s * xi[a] * xi[b];
                }
            }
        }
        for a in 0..d {
            for b in 0..a {
                h[a][b] = h[b][a];
            }
        }
        // penalty (scaled to the total class weight of 2), not on the intercept
        for j in 0..NF {
            g[j] += l2 * 1e-2 * beta[j];
            h[j][j] += l2 * 1e-2;
        }
        h[NF][NF] += 1e-9;
        (g, h)
    };
    for _round in 0..4 * NF {
        for _ in 0..50 {
            let (mut g, mut h) = gradient_hessian(&beta);
            // held weights stay at 0: identity rows, zero gradient
            for j in (0..NF).filter(|&j| held[j]) {
                for k in 0..d {
                    h[j][k] = 0.0;
                    h[k][j] = 0.0;
                }
                h[j][j] = 1.0;
                g[j] = 0.0;
            }
            let step = solve(h, g);
            // a full Newton step, shortened so no constrained weight crosses 0; the
            // first one to reach 0 is held there
            let mut t = 1.0f64;
            let mut stop = None;
            for j in (0..NF).filter(|&j| nonneg[j] && !held[j]) {
                let next = beta[j] - step[j];
                if next < 0.0 && step[j] > 0.0 {
                    let tj = beta[j] / step[j];
                    if tj < t {
                        t = tj;
                        stop = Some(j);
                    }
                }
            }
            let mut max = 0.0f64;
            for j in 0..d {
                beta[j] -= t * step[j];
                max = max.max((t * step[j]).abs());
            }
            if let Some(j) = stop {
                beta[j] = 0.0;
                held[j] = true;
                continue;
            }
            if max < 1e-8 {
                break;
            }
        }
        // release held weights the loss wants to grow (negative gradient)
        let (g, _) = gradient_hessian(&beta);
        let release: Vec<usize> = (0..NF).filter(|&j| held[j] && g[j] < -1e-9).collect();
        if release.is_empty() {
            break;
        }
        for j in release {
            held[j] = false;
        }
    }
    let bias = beta[NF];
    beta.truncate(NF);
    (mean, scale, beta, bias)
}

/// Solves `H x = g` for a symmetric positive-definite `H` (Cholesky).
#[allow(clippy::needless_range_loop)]
fn solve(mut h: Vec<Vec<f64>>, g: Vec<f64>) -> Vec<f64> {
    let d = g.len();
    for j in 0..d {
        let mut s = h[j][j];
        for k in 0..j {
            s -= h[j][k] * h[j][k];
        }
        let diag = s.max(1e-12).sqrt();
        h[j][j] = diag;
        for i in (j + 1)..d {
            let mut s = h[i][j];
            for k in 0..j {
                s -= h[i][k] * h[j][k];
            }
            h[i][j] = s / diag;
        }
    }
    let mut y = vec![0.0; d];
    for i in 0..d {
        let mut s = g[i];
        for k in 0..i {
            s -= h[i][k] * y[k];
        }
        y[i] = s / h[i][i];
    }
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        let mut s = y[i];
        for k in (i + 1)..d {
            s -= h[k][i] * x[k];
        }
        x[i] = s / h[i][i];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_regression_learns_a_separating_direction() {
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..400 {
            let mut f = [0.0; NF];
            let pos = i % 2 == 0;
            f[0] = if pos { 2.0 } else { 0.0 } + ((i * 37 % 100) as f64 / 100.0);
            f[1] = (i * 53 % 100) as f64 / 100.0; // noise
            rows.push(f);
            labels.push(pos);
        }
        let (mean, scale, w, b) = fit_logistic(&rows, &labels, &vec![1.0; 400], L2);
        assert!(w[0] > 1.0, "{w:?}");
        assert!(w[1].abs() < 0.5 * w[0]);
        let mut m = Model::untrained("x".into(), Reference::default());
        m.mean = mean;
        m.scale = scale;
        m.weights = w;
        m.bias = b;
        let mut hi = [0.0; NF];
        hi[0] = 3.0;
        assert!(m.score(&hi) > 0.9 && m.score(&[0.0; NF]) < 0.1);
        assert_eq!(m.reasons(&hi, 3, "account")[0].feature, "log_rate_1h");
    }

    #[test]
    fn monotone_fit_holds_constrained_weights_at_or_above_zero() {
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
        for i in 0..600 {
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
        let wts = vec![1.0; rows.len()];
        let (_, _, w_free, _) = fit_logistic(&rows, &labels, &wts, L2);
        assert!(
            w_free[lp] < -0.1,
            "unconstrained fit goes negative: {}",
            w_free[lp]
        );
        let (mean, scale, w, b) = fit_logistic_monotone(&rows, &labels, &wts, L2, &mask);
        for j in 0..NF {
            if mask[j] {
                assert!(w[j] >= 0.0, "{}: {}", FEATURE_NAMES[j], w[j]);
            }
        }
        assert_eq!(w[lp], 0.0);
        assert!(w[tr] > 0.1 && w[0] > 0.1, "{w:?}");
        assert!(w[free] < -0.1, "{w:?}");
        // the constrained optimum: no held weight wants to grow, nothing diverged
        assert!(w.iter().all(|x| x.is_finite()) && b.is_finite());

        let mut m = Model::untrained("x".into(), Reference::default());
        m.mean = mean;
        m.scale = scale;
        m.weights = w;
        m.bias = b;
        m.validate().unwrap();
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
        bad.weights[lp] = -0.5;
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
}
