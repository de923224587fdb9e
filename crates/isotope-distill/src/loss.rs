//! Distillation losses.
//!
//! **Sequence-level KD** ([`LossKind::Sft`]): cross-entropy of the teacher's sampled
//! response tokens under the student — what an attacker with text only can do.
//!
//! **Token-level KD** ([`LossKind::Kl`], [`LossKind::Rkl`], [`LossKind::Jsd`]) on the
//! teacher's harvested top-k log-probabilities. An API reveals at most ~20 of them, so
//! both distributions are compared on **k + 1 buckets**: the teacher's top-k tokens
//! and one *tail* bucket for all other tokens.
//!
//! - Teacher: `q_i = exp(logprob_i)` for its top-k ids; if they sum to more than 1
//!   (rounding in the API) they are renormalised to sum 1; the tail is
//!   `q_tail = max(0, 1 − Σ q_i)`.
//! - Student: `p_i = softmax(logits)[id_i]` on the same ids, with the tail
//!   `p_tail = 1 − Σ p_i` (exactly the student's mass on every other token).
//!
//! Both are then proper distributions over the same k + 1 buckets, and
//!
//! - forward KL ([`LossKind::Kl`]) = KL(teacher ‖ student) = Σ_b q_b · ln(q_b / p_b)
//!   (mass-covering: the student is punished for missing what the teacher likes);
//! - reverse KL ([`LossKind::Rkl`]) = KL(student ‖ teacher) = Σ_b p_b · ln(p_b / q_b)
//!   (mode-seeking);
//! - JSD ([`LossKind::Jsd`]) = ½ KL(q ‖ m) + ½ KL(p ‖ m) with m = (p + q) / 2.
//!
//! `0 · ln 0 = 0`. Inside logarithms a probability below [`LOG_FLOOR`] is raised to it,
//! which keeps the reverse KL finite when the teacher's tail is 0 and the student's
//! tail gradient bounded; the student's top-k log-probabilities are used exactly.
//! Positions without teacher log-probabilities fall back to cross-entropy.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use isotope_sampling::TokenId;
use serde::{Deserialize, Serialize};

use crate::error::{CandleContext, DistillError, Result};

/// Probabilities below this are raised to it inside logarithms.
pub const LOG_FLOOR: f64 = 1e-6;

/// Which distillation loss to train with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossKind {
    /// Cross-entropy on the teacher's response tokens (sequence-level KD).
    Sft,
    /// Forward KL(teacher ‖ student) over top-k + tail.
    Kl,
    /// Reverse KL(student ‖ teacher) over top-k + tail.
    Rkl,
    /// Jensen–Shannon divergence over top-k + tail.
    Jsd,
}

impl LossKind {
    /// True for the losses that need the teacher's top-k log-probabilities.
    pub fn needs_top_logprobs(self) -> bool {
        self != LossKind::Sft
    }
}

impl fmt::Display for LossKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LossKind::Sft => "sft",
            LossKind::Kl => "kl",
            LossKind::Rkl => "rkl",
            LossKind::Jsd => "jsd",
        })
    }
}

impl FromStr for LossKind {
    type Err = DistillError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sft" => Ok(LossKind::Sft),
            "kl" => Ok(LossKind::Kl),
            "rkl" => Ok(LossKind::Rkl),
            "jsd" => Ok(LossKind::Jsd),
            other => Err(DistillError::Config(format!(
                "unknown loss `{other}` (expected sft, kl, rkl or jsd)"
            ))),
        }
    }
}

/// The teacher's top-k at one position: ids and natural-log probabilities, most likely
/// first (the order does not matter to the losses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopK {
    pub ids: Vec<TokenId>,
    pub logprobs: Vec<f32>,
}

/// Teacher targets for `n` rows as tensors over `k + 1` buckets (top-k, then tail).
pub struct TeacherTargets {
    /// `[n, k]` token ids (padding repeats a real id; its mask is 0).
    pub ids: Tensor,
    /// `[n, k]` 1 for real entries, 0 for padding.
    pub mask: Tensor,
    /// `[n, k + 1]` teacher probabilities (0 on padding).
    pub probs: Tensor,
    /// `[n, k + 1]` `ln max(q, LOG_FLOOR)`.
    pub log_probs: Tensor,
}

impl TeacherTargets {
    /// Tensors for `rows` (each at most `k` entries used; duplicates after the first
    /// dropped) on `device` in `dtype`.
    pub fn new(rows: &[&TopK], k: usize, device: &Device, dtype: DType) -> Result<Self> {
        let n = rows.len();
        let k = k.max(1);
        let mut ids = Vec::with_capacity(n * k);
        let mut mask = Vec::with_capacity(n * k);
        let mut probs = Vec::with_capacity(n * (k + 1));
        let mut logs = Vec::with_capacity(n * (k + 1));
        for row in rows {
            let mut seen: Vec<TokenId> = Vec::with_capacity(k);
            let mut lps: Vec<f64> = Vec::with_capacity(k);
            for (&id, &lp) in row.ids.iter().zip(&row.logprobs) {
                if seen.len() == k {
                    break;
                }
                if !seen.contains(&id) {
                    seen.push(id);
                    lps.push(f64::from(lp).min(0.0));
                }
            }
            let sum: f64 = lps.iter().map(|lp| lp.exp()).sum();
            let (shift, tail) = if sum > 1.0 {
                (sum.ln(), 0.0)
            } else {
                (0.0, 1.0 - sum)
            };
            let pad_id = seen.first().copied().unwrap_or(0);
            for j in 0..k {
                match (seen.get(j), lps.get(j)) {
                    (Some(&id), Some(&lp)) => {
                        let lq = lp - shift;
                        ids.push(id);
                        mask.push(1.0);
                        probs.push(lq.exp());
                        logs.push(lq.max(LOG_FLOOR.ln()));
                    }
                    _ => {
                        ids.push(pad_id);
                        mask.push(0.0);
                        probs.push(0.0);
                        logs.push(LOG_FLOOR.ln());
                    }
                }
            }
            probs.push(tail);
            logs.push(tail.max(LOG_FLOOR).ln());
        }
        let f = |v: Vec<f64>, cols: usize| {
            Tensor::from_vec(v, (n, cols), device).and_then(|t| t.to_dtype(dtype))
        };
        Ok(Self {
            ids: Tensor::from_vec(ids, (n, k), device).ctx("teacher ids")?,
            mask: f(mask, k).ctx("teacher mask")?,
            probs: f(probs, k + 1).ctx("teacher probs")?,
            log_probs: f(logs, k + 1).ctx("teacher log-probs")?,
        })
    }
}

/// Sum over rows of −ln p(target) for logits `[n, vocab]` and targets `[n]` (u32).
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    (|| {
        let lp = crate::ops::log_softmax_last(logits)?;
        let picked = lp.gather(&targets.unsqueeze(1)?, 1)?;
        picked.sum_all()?.neg()
    })()
    .ctx("cross-entropy")
}

/// Sum over rows of the token-level KD loss `kind` (see the module docs) between the
/// student's `logits` `[n, vocab]` and the teacher's top-k + tail `teacher`.
/// `kind` must not be [`LossKind::Sft`].
pub fn kd_sum(kind: LossKind, logits: &Tensor, teacher: &TeacherTargets) -> Result<Tensor> {
    if kind == LossKind::Sft {
        return Err(DistillError::Config(
            "kd_sum called with the sft loss".into(),
        ));
    }
    (|| {
        let lp_all = crate::ops::log_softmax_last(logits)?;
        let lp_k = lp_all.gather(&teacher.ids, 1)?; // [n, k]
        let p_k = (lp_k.exp()? * &teacher.mask)?;
        let one = Tensor::ones((p_k.dim(0)?, 1), p_k.dtype(), p_k.device())?;
        let p_tail = (one - p_k.sum_keepdim(1)?)?.clamp(0.0, 1.0)?;
        let lp_tail = p_tail.clamp(LOG_FLOOR, 1.0)?.log()?;
        let p = Tensor::cat(&[&p_k, &p_tail], 1)?; // [n, k+1]
        let lp = Tensor::cat(&[&lp_k, &lp_tail], 1)?;
        let (q, lq) = (&teacher.probs, &teacher.log_probs);
        let total = match kind {
            // Σ q (ln q − ln p); q = 0 entries vanish.
            LossKind::Kl => (q * (lq - &lp)?)?.sum_all()?,
            // Σ p (ln p − ln q); padding has p = 0.
            LossKind::Rkl => (&p * (&lp - lq)?)?.sum_all()?,
            LossKind::Jsd => {
                let m = ((&p + q)? * 0.5)?;
                let lm = m.clamp(LOG_FLOOR, 1.0)?.log()?;
                let a = (q * (lq - &lm)?)?.sum_all()?;
                let b = (&p * (&lp - &lm)?)?.sum_all()?;
                ((a + b)? * 0.5)?
            }
            LossKind::Sft => unreachable!("rejected above"),
        };
        Ok(total)
    })()
    .ctx(format!("{kind} loss"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A student over 5 tokens and a teacher top-2, computed by hand below.
    const LOGITS: [f64; 5] = [2.0, 1.0, 0.5, -1.0, 0.0];

    fn student_probs() -> Vec<f64> {
        let z: f64 = LOGITS.iter().map(|l| l.exp()).sum();
        LOGITS.iter().map(|l| l.exp() / z).collect()
    }

    /// Teacher: token 1 with 0.5, token 0 with 0.3, tail 0.2.
    fn teacher() -> TopK {
        TopK {
            ids: vec![1, 0],
            logprobs: vec![0.5f32.ln(), 0.3f32.ln()],
        }
    }

    fn buckets() -> (Vec<f64>, Vec<f64>) {
        let s = student_probs();
        let q = vec![0.5, 0.3, 0.2];
        let p = vec![s[1], s[0], 1.0 - s[1] - s[0]];
        (q, p)
    }

    fn kl(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .filter(|(x, _)| **x > 0.0)
            .map(|(x, y)| x * (x / y).ln())
            .sum()
    }

    fn run(kind: LossKind, top: &TopK, k: usize) -> f64 {
        let dev = Device::Cpu;
        let logits = Tensor::from_slice(&LOGITS, (1, 5), &dev).unwrap();
        let t = TeacherTargets::new(&[top], k, &dev, DType::F64).unwrap();
        kd_sum(kind, &logits, &t)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn forward_kl_is_kl_teacher_student() {
        let (q, p) = buckets();
        let want = kl(&q, &p);
        let got = run(LossKind::Kl, &teacher(), 2);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        // And it is not the reverse direction.
        assert!((got - kl(&p, &q)).abs() > 1e-3);
    }

    #[test]
    fn reverse_kl_is_kl_student_teacher() {
        let (q, p) = buckets();
        let got = run(LossKind::Rkl, &teacher(), 2);
        assert!((got - kl(&p, &q)).abs() < 1e-6, "{got}");
    }

    #[test]
    fn jsd_matches_definition() {
        let (q, p) = buckets();
        let m: Vec<f64> = q.iter().zip(&p).map(|(a, b)| (a + b) / 2.0).collect();
        let want = 0.5 * kl(&q, &m) + 0.5 * kl(&p, &m);
        let got = run(LossKind::Jsd, &teacher(), 2);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!(got > 0.0 && got < 2f64.ln());
    }

    #[test]
    fn padding_and_overfull_teacher() {
        // k = 4 but only 2 entries: padding must not change the loss.
        let got = run(LossKind::Kl, &teacher(), 4);
        let (q, p) = buckets();
        assert!((got - kl(&q, &p)).abs() < 1e-6);
        // Probabilities summing past 1 are renormalised; the tail is then empty.
        let top = TopK {
            ids: vec![0, 1],
            logprobs: vec![0.7f32.ln(), 0.5f32.ln()],
        };
        let s = student_probs();
        let q = [0.7 / 1.2, 0.5 / 1.2, 0.0];
        let p = [s[0], s[1], 1.0 - s[0] - s[1]];
        let got = run(LossKind::Kl, &top, 2);
        assert!((got - kl(&q, &p)).abs() < 1e-6);
        // Reverse KL stays finite with an empty teacher tail (floored logarithm).
        assert!(run(LossKind::Rkl, &top, 2).is_finite());
    }

    #[test]
    fn identical_distributions_give_zero() {
        let s = student_probs();
        let top = TopK {
            ids: vec![0, 1, 2],
            logprobs: vec![s[0].ln() as f32, s[1].ln() as f32, s[2].ln() as f32],
        };
        for kind in [LossKind::Kl, LossKind::Rkl, LossKind::Jsd] {
            assert!(run(kind, &top, 3).abs() < 1e-6, "{kind}");
        }
    }

    #[test]
    fn cross_entropy_is_negative_log_likelihood() {
        let dev = Device::Cpu;
        let logits = Tensor::from_slice(&LOGITS, (1, 5), &dev).unwrap();
        let tgt = Tensor::from_slice(&[2u32], 1, &dev).unwrap();
        let got = cross_entropy_sum(&logits, &tgt)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got + student_probs()[2].ln()).abs() < 1e-9);
    }

    #[test]
    fn parse_names() {
        for k in ["sft", "kl", "rkl", "jsd"] {
            assert_eq!(k.parse::<LossKind>().unwrap().to_string(), k);
        }
        assert!("mse".parse::<LossKind>().is_err());
    }
}
