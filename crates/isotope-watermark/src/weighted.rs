//! The exact upper tail of a weighted sum of independent binomials: the null
//! distribution of entropy-*weighted* detection.
//!
//! A masked test ([`crate::Detector::detect_masked`]) gives each kept tuple weight 1
//! and each dropped one weight 0. Between "certain" and "free choice" there are many
//! positions where the watermark's bias moves the choice a little; the most powerful
//! test for independent Bernoulli trials whose success probabilities differ under the
//! alternative (Neyman–Pearson) sums the successes weighted by their log-odds gain
//! ([`crate::entropy::spike_weight`]). With integer weights `w_l` and `n_l` tuples at
//! weight `l`, the null statistic is `S = Σ_l w_l · B_l` with independent
//! `B_l ~ Binomial(n_l·m, p)` (`m` trials per tuple: 1 for KGW, the layer count for
//! SynthID). The weights are fixed before the key is used (a function of the text and
//! a model only), so this tail is the exact p-value, with nothing asymptotic in it.
//!
//! **How it is computed.** The pmf of `S` is a convolution of scaled binomial pmfs;
//! far in the tail (p-values of 1e-300 and below) its values underflow any float. So
//! the convolution is done under the *exponentially tilted* measure
//! `P_θ(s) = P(s) e^{θs} / M(θ)`, `M(θ) = Π_l (1 − p + p e^{θ w_l})^{n_l}`, with θ chosen
//! so that the tilted mean is the observed value: there the tilted pmf is of order
//! `1/sd` and is computed in plain `f64` without loss. Then, exactly,
//! `P(S ≥ s) = M(θ) e^{−θs} Σ_{t ≥ s} P_θ(t) e^{−θ(t−s)}`. Entries more than `e^{−92}`
//! (1e-40) below the running maximum are dropped from both ends of the tilted pmf,
//! which keeps the work to the pmf's bulk (`O(√n)` wide) and changes the result by
//! less than f64 rounding.

use serde::{Deserialize, Serialize};

use crate::stats::{ln_binomial_sf, ln_choose};

/// Tuples sharing one weight: `trials` independent Bernoulli(p) trials under the null,
/// each success adding `weight` to the statistic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightLevel {
    /// Points per success.
    pub weight: u32,
    /// Independent trials at this weight.
    pub trials: u64,
}

/// Entries of the tilted pmf more than `e^{−CUT}` below its maximum are dropped.
const CUT: f64 = 92.0;

/// `ln(1 + e^x)` without overflow.
fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `ln P(S ≥ observed)` for `S = Σ weight_l · Binomial(trials_l, p)`, independent.
///
/// Exact to floating-point accuracy far below `1e-300` (the result is a natural log).
/// Levels with weight or trials 0 contribute nothing; `observed = 0 → 0.0`;
/// `observed` above the largest possible sum → `−∞`; `p ∉ [0, 1]` or NaN → NaN.
/// A single level is the binomial tail ([`ln_binomial_sf`]) exactly.
pub fn ln_weighted_binomial_sf(levels: &[WeightLevel], observed: u64, p: f64) -> f64 {
    if !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    // Merge equal weights, drop empty levels, sort by weight.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for l in levels.iter().filter(|l| l.weight > 0 && l.trials > 0) {
        let w = u64::from(l.weight);
        match merged.iter_mut().find(|(mw, _)| *mw == w) {
            Some((_, n)) => *n += l.trials,
            None => merged.push((w, l.trials)),
        }
    }
    merged.sort_unstable();
    if observed == 0 {
        return 0.0;
    }
    let max: u128 = merged
        .iter()
        .map(|&(w, n)| u128::from(w) * u128::from(n))
        .sum();
    if u128::from(observed) > max || p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return 0.0;
    }
    // A common factor of the weights: S = g·S′, and S ≥ k ⇔ S′ ≥ ⌈k / g⌉.
    let g = merged.iter().fold(0, |g, &(w, _)| gcd(g, w));
    let observed = observed.div_ceil(g);
    for (w, _) in &mut merged {
        *w /= g;
    }
    let max = max / u128::from(g);
    if let [(w, n)] = merged[..] {
        return ln_binomial_sf(observed.div_ceil(w), n, p);
    }
    let ln_p = p.ln();
    if u128::from(observed) == max {
        // Only "every trial succeeds" reaches the maximum.
        return merged.iter().map(|&(_, n)| n as f64 * ln_p).sum();
    }
    let logit_p = ln_p - (-p).ln_1p();
    let s = observed as f64;
    let tilted_mean = |theta: f64| -> f64 {
        merged
            .iter()
            .map(|&(w, n)| {
                let x = theta * w as f64 + logit_p;
                n as f64 * w as f64 / (1.0 + (-x).exp())
            })
            .sum()
    };
    let theta = if s <= tilted_mean(0.0) {
        0.0
    } else {
        let mut hi = 1.0f64;
        while tilted_mean(hi) < s && hi < 1e6 {
            hi *= 2.0;
        }
        let mut lo = 0.0f64;
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if tilted_mean(mid) < s {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };

    // The tilted pmf: `vals[i]` ∝ P_θ(S = offset + i).
    let mut offset: u64 = 0;
    let mut vals: Vec<f64> = vec![1.0];
    let mut terms: Vec<f64> = Vec::new();
    for &(w, n) in &merged {
        let x = theta * w as f64 + logit_p;
        // ln q and ln(1 − q) of the tilted success probability q = σ(x).
        let (ln_q, ln_1q) = (-softplus(-x), -softplus(x));
        let ln_term = |j: u64| ln_choose(n, j) + j as f64 * ln_q + (n - j) as f64 * ln_1q;
        let q = 1.0 / (1.0 + (-x).exp());
        let mode = (((n + 1) as f64 * q).floor() as u64).min(n);
        let top = ln_term(mode);
        let mut lo = mode;
        while lo > 0 && ln_term(lo - 1) - top > -CUT {
            lo -= 1;
        }
        let mut hi = mode;
        while hi < n && ln_term(hi + 1) - top > -CUT {
            hi += 1;
        }
        terms.clear();
        terms.extend((lo..=hi).map(|j| (ln_term(j) - top).exp()));
        let step = w as usize;
        let mut next = vec![0.0f64; vals.len() + step * (terms.len() - 1)];
        for (j, &b) in terms.iter().enumerate() {
            let base = j * step;
            for (i, &v) in vals.iter().enumerate() {
                next[base + i] += v * b;
            }
        }
        offset += w * lo;
        // Renormalise and drop the negligible ends.
        let peak = next.iter().copied().fold(0.0f64, f64::max);
        let floor = peak * (-CUT).exp();
        let first = next.iter().position(|&v| v >= floor).unwrap_or(0);
        let last = next.iter().rposition(|&v| v >= floor).unwrap_or(0);
        vals = next[first..=last].iter().map(|v| v / peak).collect();
        offset += first as u64;
    }
    let total: f64 = vals.iter().sum();
    let tail: f64 = vals
        .iter()
        .enumerate()
        .filter_map(|(i, &v)| {
            let t = offset + i as u64;
            (t >= observed).then(|| v * (-theta * (t - observed) as f64).exp())
        })
        .sum::<f64>()
        / total;
    // ln M(θ) − θ s: the Chernoff bound; `tail ≤ 1` sharpens it to the exact value.
    let ln_mgf: f64 = merged
        .iter()
        .map(|&(w, n)| n as f64 * ((-p).ln_1p() + softplus(theta * w as f64 + logit_p)))
        .sum();
    let chernoff = ln_mgf - theta * s;
    if tail > 0.0 && tail.is_finite() {
        (chernoff + tail.ln()).min(0.0)
    } else {
        // Not reached for a tilt centred on `observed`; the bound is still valid.
        chernoff.min(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lv(weight: u32, trials: u64) -> WeightLevel {
        WeightLevel { weight, trials }
    }

    /// `P(S ≥ k)` by enumerating every outcome of every trial.
    fn brute(levels: &[WeightLevel], k: u64, p: f64) -> f64 {
        let trials: Vec<u64> = levels
            .iter()
            .flat_map(|l| std::iter::repeat_n(u64::from(l.weight), l.trials as usize))
            .collect();
        let n = trials.len();
        let mut total = 0.0;
        for mask in 0u32..(1 << n) {
            let (mut s, mut hits) = (0u64, 0i32);
            for (i, &w) in trials.iter().enumerate() {
                if mask >> i & 1 == 1 {
                    s += w;
                    hits += 1;
                }
            }
            if s >= k {
                total += p.powi(hits) * (1.0 - p).powi(n as i32 - hits);
            }
        }
        total
    }

    #[test]
    fn matches_enumeration() {
        let cases: &[(&[WeightLevel], f64)] = &[
            (&[lv(1, 3), lv(2, 4), lv(5, 3)], 0.25),
            (&[lv(3, 5), lv(7, 6)], 0.25),
            (&[lv(1, 1), lv(16, 2), lv(9, 4), lv(4, 5)], 0.5),
            (&[lv(2, 6), lv(6, 6)], 0.1),
        ];
        for &(levels, p) in cases {
            let max: u64 = levels.iter().map(|l| u64::from(l.weight) * l.trials).sum();
            for k in 0..=max + 1 {
                let want = brute(levels, k, p);
                let got = ln_weighted_binomial_sf(levels, k, p).exp();
                assert!(
                    (got - want).abs() <= 1e-12 + 1e-9 * want,
                    "{levels:?} k={k}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn one_level_is_the_binomial_tail() {
        for k in [0, 1, 30, 50, 90, 200] {
            assert_eq!(
                ln_weighted_binomial_sf(&[lv(1, 200)], k, 0.25),
                ln_binomial_sf(k, 200, 0.25)
            );
            // Weight 3: S ≥ k ⇔ B ≥ ⌈k/3⌉; levels of one weight merge.
            assert_eq!(
                ln_weighted_binomial_sf(&[lv(3, 120), lv(3, 80), lv(0, 9)], k, 0.25),
                ln_binomial_sf(k.div_ceil(3), 200, 0.25)
            );
        }
    }

    #[test]
    fn deep_tail_in_closed_form() {
        // Every one of 2,000 trials but one of the lightest succeeds: S ≥ max − 3 is
        // reached by "all succeed" or "exactly one weight-3 trial fails", so
        // P = p^{N−1} (p + n₃ (1 − p)) — about 1e-1200, far below f64.
        let levels = [lv(3, 700), lv(8, 600), lv(16, 700)];
        let max = 3 * 700 + 8 * 600 + 16 * 700;
        let p: f64 = 0.25;
        let want = 1999.0 * p.ln() + (p + 700.0 * (1.0 - p)).ln();
        let got = ln_weighted_binomial_sf(&levels, max - 3, p);
        assert!((got - want).abs() < 1e-9 * want.abs(), "{got} vs {want}");
        assert_eq!(
            ln_weighted_binomial_sf(&levels, max, p),
            2000.0 * p.ln(),
            "only all-successes reaches the max"
        );
        assert_eq!(
            ln_weighted_binomial_sf(&levels, max + 1, p),
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn edge_cases() {
        let l = [lv(1, 10), lv(2, 10)];
        assert_eq!(ln_weighted_binomial_sf(&l, 0, 0.25), 0.0);
        assert_eq!(ln_weighted_binomial_sf(&[], 0, 0.25), 0.0);
        assert_eq!(ln_weighted_binomial_sf(&[], 1, 0.25), f64::NEG_INFINITY);
        assert_eq!(ln_weighted_binomial_sf(&l, 5, 0.0), f64::NEG_INFINITY);
        assert_eq!(ln_weighted_binomial_sf(&l, 5, 1.0), 0.0);
        assert!(ln_weighted_binomial_sf(&l, 5, 1.5).is_nan());
        assert!(ln_weighted_binomial_sf(&l, 5, f64::NAN).is_nan());
    }

    #[test]
    fn a_large_sum_stays_accurate_against_the_unweighted_limit() {
        // Weights 2 and 4 share the factor 2: the test must equal the one with
        // weights 1 and 2 at half the threshold (rounded up).
        let a = ln_weighted_binomial_sf(&[lv(2, 5_000), lv(4, 3_000)], 9_001, 0.25);
        let b = ln_weighted_binomial_sf(&[lv(1, 5_000), lv(2, 3_000)], 4_501, 0.25);
        assert!((a - b).abs() < 1e-12 * a.abs().max(1.0), "{a} vs {b}");
        assert!(a < -300.0 && a.is_finite(), "{a}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Agrees with enumeration on random small problems.
        #[test]
        fn prop_matches_enumeration(
            raw in proptest::collection::vec((1u32..12, 0u64..4), 1..5),
            p in 0.05f64..0.95,
            frac in 0.0f64..1.1,
        ) {
            let levels: Vec<WeightLevel> = raw.iter().map(|&(w, n)| lv(w, n)).collect();
            let total: u64 = levels.iter().map(|l| l.trials).sum();
            prop_assume!(total <= 14);
            let max: u64 = levels.iter().map(|l| u64::from(l.weight) * l.trials).sum();
            let k = (frac * max as f64).round() as u64;
            let want = brute(&levels, k, p);
            let got = ln_weighted_binomial_sf(&levels, k, p).exp();
            prop_assert!((got - want).abs() <= 1e-12 + 1e-9 * want, "{got} vs {want}");
        }

        /// The tail never increases with the threshold.
        #[test]
        fn prop_monotone(
            raw in proptest::collection::vec((1u32..17, 1u64..120), 2..5),
            p in 0.05f64..0.6,
        ) {
            let levels: Vec<WeightLevel> = raw.iter().map(|&(w, n)| lv(w, n)).collect();
            let max: u64 = levels.iter().map(|l| u64::from(l.weight) * l.trials).sum();
            let mut last = 0.0f64;
            let step = (max / 25).max(1);
            let mut k = 0;
            while k <= max {
                let v = ln_weighted_binomial_sf(&levels, k, p);
                prop_assert!(v <= last + 1e-9 * last.abs().max(1e-12), "k={k}: {v} > {last}");
                prop_assert!(v <= 0.0);
                last = v;
                k += step;
            }
        }
    }
}
