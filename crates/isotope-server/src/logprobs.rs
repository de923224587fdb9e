//! Returned log-probabilities under an output policy: rounded and/or noised.
//!
//! Why: top-k log-probabilities are the richest signal a distiller can buy (token-level
//! KD on them beats training on text alone), and an API hands them out by the million.
//! A suspected harvester can be given coarser numbers while a person reading them
//! loses nothing.
//!
//! **Noise keeps a proper distribution.** The returned set S (the top-k tokens plus the
//! sampled token) and one *tail* bucket for the rest of the mass are perturbed in log
//! space, `l'ᵢ = lᵢ + σ·zᵢ` with `zᵢ ~ N(0, 1)`, and renormalised so the k + 1 values
//! (and the tail) sum to one again. So every returned value stays ≤ 0, the returned
//! probabilities never add up to more than 1, and the sampled token's value equals its
//! entry in the top list — a client cannot spot the noise from inconsistencies, only
//! average it away with repeated queries (σ/√m after m of them: the noise buys a
//! factor in query cost, it is not a wall; say so to operators). Including the tail
//! bucket matters when only the sampled token is returned (`top_logprobs = 0`):
//! renormalising a set of one would cancel the noise. The list is re-sorted by the
//! noised values, as clients expect it sorted.
//!
//! **Rounding** (`decimals`) comes last, to the nearest multiple of 10^-decimals,
//! clamped to ≤ 0.

use isotope_sampling::{log_sum_exp, Sampled, TokenId};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Per-request noise source. Seeded from process randomness, not from the client's
/// `seed`: a client must not be able to replay the same noise.
pub struct Noise {
    rng: ChaCha20Rng,
}

impl Noise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// A fresh source keyed by process randomness.
    pub fn fresh() -> Self {
        use std::hash::{BuildHasher, RandomState};
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self::new(RandomState::new().hash_one(t))
    }

    /// A standard normal draw (Box–Muller).
    fn normal(&mut self) -> f64 {
        // u1 in (0, 1]: never ln(0).
        let u1 = ((self.rng.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// What to do to returned log-probabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Obscure {
    /// Round to this many decimals.
    pub decimals: Option<u32>,
    /// Gaussian noise, standard deviation in nats.
    pub noise: Option<f32>,
}

impl Obscure {
    pub fn is_identity(&self) -> bool {
        self.decimals.is_none() && self.noise.is_none_or(|s| s <= 0.0)
    }
}

/// `s` as the client may see it: its top list cut to `keep`, then noised and rounded
/// per `how`. The identity when `how` asks for nothing (the top list is still cut).
pub fn obscure(s: &Sampled, keep: usize, how: Obscure, noise: &mut Noise) -> Sampled {
    let mut top: Vec<(TokenId, f32)> = s.top_logprobs.iter().take(keep).copied().collect();
    let mut chosen = s.logprob;
    if let Some(sigma) = how.noise.filter(|&x| x > 0.0) {
        let sigma = f64::from(sigma);
        // The set: top list plus the chosen token if it is not in it.
        let mut ids: Vec<TokenId> = top.iter().map(|&(t, _)| t).collect();
        let mut vals: Vec<f64> = top.iter().map(|&(_, l)| f64::from(l)).collect();
        let chosen_at = match ids.iter().position(|&t| t == s.token) {
            Some(i) => i,
            None => {
                ids.push(s.token);
                vals.push(f64::from(s.logprob));
                ids.len() - 1
            }
        };
        let in_set = log_sum_exp(&vals.iter().map(|&v| v as f32).collect::<Vec<_>>());
        let in_set = f64::from(in_set).min(0.0);
        // ln(1 − e^in_set): the tail's mass; −∞ when the set holds it all.
        let tail = if in_set > -1e-12 {
            f64::NEG_INFINITY
        } else {
            (-in_set.exp()).ln_1p()
        };
        let mut noised: Vec<f64> = vals.iter().map(|&v| v + sigma * noise.normal()).collect();
        let tail_noised = tail + sigma * noise.normal();
        let mut all = noised.clone();
        all.push(tail_noised);
        let max = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let norm = max + all.iter().map(|&v| (v - max).exp()).sum::<f64>().ln();
        for v in &mut noised {
            *v = (*v - norm).min(0.0);
        }
        chosen = noised[chosen_at] as f32;
        top = ids
            .iter()
            .zip(&noised)
            .take(top.len())
            .map(|(&t, &v)| (t, v as f32))
            .collect();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    if let Some(d) = how.decimals {
        let scale = 10f64.powi(d as i32);
        let round = |x: f32| ((f64::from(x) * scale).round() / scale).min(0.0) as f32;
        chosen = round(chosen);
        for e in &mut top {
            e.1 = round(e.1);
        }
    }
    Sampled {
        token: s.token,
        logprob: chosen,
        top_logprobs: top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampled(lps: &[f32], chosen: usize) -> Sampled {
        // lps are raw scores; normalise them into log-probs over a larger vocabulary
        // whose remaining mass is 10%.
        let lse = log_sum_exp(lps);
        let top: Vec<(TokenId, f32)> = lps
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as TokenId, l - lse + 0.9f32.ln()))
            .collect();
        let mut top = top;
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        let logprob = top.iter().find(|e| e.0 == chosen as TokenId).unwrap().1;
        Sampled {
            token: chosen as TokenId,
            logprob,
            top_logprobs: top,
        }
    }

    #[test]
    fn identity_when_nothing_asked() {
        let s = sampled(&[1.0, 0.5, -2.0, 0.0], 2);
        let o = obscure(&s, 3, Obscure::default(), &mut Noise::new(1));
        assert_eq!(o.logprob, s.logprob);
        assert_eq!(o.top_logprobs, s.top_logprobs[..3].to_vec());
    }

    #[test]
    fn rounding_rounds_and_stays_nonpositive() {
        let s = sampled(&[3.0, 0.1, -1.0], 0);
        let how = Obscure {
            decimals: Some(1),
            noise: None,
        };
        let o = obscure(&s, 3, how, &mut Noise::new(1));
        for &(_, l) in &o.top_logprobs {
            assert!(l <= 0.0);
            assert!(((l * 10.0).round() - l * 10.0).abs() < 1e-4, "{l}");
        }
        assert_eq!(o.logprob, o.top_logprobs[0].1);
    }

    #[test]
    fn noise_changes_values_and_averages_out() {
        let s = sampled(&[2.0, 1.0, 0.0, -1.0], 1);
        let how = Obscure {
            decimals: None,
            noise: Some(0.5),
        };
        let mut noise = Noise::new(7);
        let reps = 4000;
        let mut mean_p = 0.0f64;
        let mut changed = 0;
        for _ in 0..reps {
            let o = obscure(&s, 4, how, &mut noise);
            if (o.logprob - s.logprob).abs() > 1e-3 {
                changed += 1;
            }
            mean_p += f64::from(o.logprob).exp() / f64::from(reps);
        }
        assert!(changed > reps * 9 / 10, "noise rarely applied: {changed}");
        // Noise in log space is not unbiased in probability, but it stays close to it.
        let truth = f64::from(s.logprob).exp();
        assert!((mean_p - truth).abs() < 0.25 * truth, "{mean_p} vs {truth}");
    }

    #[test]
    fn noise_applies_even_without_a_top_list() {
        let s = sampled(&[2.0, 1.0], 0);
        let how = Obscure {
            decimals: None,
            noise: Some(1.0),
        };
        let o = obscure(&s, 0, how, &mut Noise::new(3));
        assert!(o.top_logprobs.is_empty());
        assert!((o.logprob - s.logprob).abs() > 1e-6);
        assert!(o.logprob <= 0.0);
    }

    proptest! {
        #[test]
        fn noised_output_is_a_sub_distribution(
            raw in proptest::collection::vec(-10.0f32..10.0, 1..20),
            chosen_frac in 0.0f64..1.0,
            keep in 0usize..25,
            sigma in 0.01f32..3.0,
            seed in any::<u64>(),
            decimals in proptest::option::of(0u32..4),
        ) {
            let chosen = ((raw.len() as f64 * chosen_frac) as usize).min(raw.len() - 1);
            let s = sampled(&raw, chosen);
            let how = Obscure { decimals, noise: Some(sigma) };
            let o = obscure(&s, keep, how, &mut Noise::new(seed));
            prop_assert_eq!(o.token, s.token);
            prop_assert_eq!(o.top_logprobs.len(), keep.min(raw.len()));
            prop_assert!(o.logprob <= 0.0 && o.logprob.is_finite());
            let mut mass = 0.0f64;
            for w in o.top_logprobs.windows(2) {
                prop_assert!(w[0].1 >= w[1].1);
            }
            for &(t, l) in &o.top_logprobs {
                prop_assert!(l <= 0.0 && l.is_finite());
                mass += f64::from(l).exp();
                if t == o.token {
                    prop_assert_eq!(l, o.logprob);
                }
            }
            if decimals.is_none() {
                prop_assert!(mass <= 1.0 + 1e-4, "mass {}", mass);
            }
            // Same ids as the cut top list (noise may reorder them).
            let mut a: Vec<TokenId> = o.top_logprobs.iter().map(|e| e.0).collect();
            let mut b: Vec<TokenId> = s.top_logprobs.iter().take(keep).map(|e| e.0).collect();
            a.sort_unstable();
            b.sort_unstable();
            prop_assert_eq!(a, b);
        }
    }
}
