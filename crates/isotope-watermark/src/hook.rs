//! The watermark as a sampler hook: how generation embeds the signal.
//!
//! Rules, settled here once:
//! - Bias schemes (KGW, Unigram) add δ to green logits after temperature, before
//!   truncation; distortion-free schemes (Gumbel, SynthID) replace the draw on the
//!   truncated, renormalised distribution.
//! - Control and end-of-generation tokens are never biased.
//! - A position is watermarked only when its whole window (the `h` previous tokens)
//!   is generated text: windows reaching into the prompt are not scored by the
//!   detector (it never sees the prompt), so watermarking them would only cost
//!   quality — and, for Gumbel, make every choice of an `n > 1` request start
//!   identically, since they share the prompt.
//! - A window already watermarked earlier in the same response is not watermarked
//!   again: its tuples are deduplicated at detection anyway, and for Gumbel a repeated
//!   window would repeat the same keyed choice and lock the text into a loop.
//! - Greedy decoding cannot carry a distortion-free watermark (no randomness to
//!   steer), so the hook is built with [`Scheme::for_greedy`]: Gumbel/SynthID fall back
//!   to KGW, reported by [`WatermarkHook::scheme`].

use std::collections::HashSet;
use std::sync::Arc;

use isotope_sampling::{top_n, Distribution, SamplingHook, StepContext, TokenId};

use crate::key::WatermarkKey;
use crate::prf::{green_threshold, is_green};
use crate::scheme::{
    gumbel_uniform, self_hash_green, Scheme, Seeding, WindowPrf, SELF_HASH_CANDIDATES,
};

/// Marks tokens that must never be biased or scored (control, end-of-generation),
/// indexed by token id. Tokens beyond its length count as ordinary.
pub type ExcludedTokens = Arc<[bool]>;

/// Above this many candidates the draw computes the whole keystream at once instead
/// of seeking to each candidate's word.
const DENSE_DRAW: usize = 2048;

/// Embeds one watermark in one response (one choice of one request).
pub struct WatermarkHook {
    key: Arc<WatermarkKey>,
    scheme: Scheme,
    excluded: ExcludedTokens,
    used_windows: HashSet<Vec<TokenId>>,
    pending: Option<WindowPrf>,
    words: Vec<u32>,
    /// Per token: `delta` where biasable, `0` for excluded tokens (KGW), built once.
    delta_mask: Vec<f32>,
    /// Unigram's fixed bias vector (δ on green, non-excluded tokens), built once.
    unigram_bias: Vec<f32>,
    watermarked: usize,
}

impl WatermarkHook {
    /// A hook for `scheme` under `key`. `greedy` must say whether the sampler decodes
    /// at temperature 0 (distortion-free schemes then fall back to KGW).
    pub fn new(
        key: Arc<WatermarkKey>,
        scheme: &Scheme,
        excluded: ExcludedTokens,
        greedy: bool,
    ) -> Self {
        let scheme = if greedy {
            scheme.for_greedy()
        } else {
            scheme.clone()
        };
        Self {
            key,
            scheme,
            excluded,
            used_windows: HashSet::new(),
            pending: None,
            words: Vec::new(),
            delta_mask: Vec::new(),
            unigram_bias: Vec::new(),
            watermarked: 0,
        }
    }

    /// The scheme actually applied (after the greedy fallback).
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// How many positions carried the watermark so far.
    pub fn watermarked_positions(&self) -> usize {
        self.watermarked
    }

    fn excluded(&self, t: usize) -> bool {
        self.excluded.get(t).copied().unwrap_or(false)
    }

    /// The window for the next position, if it is wholly generated text and fresh.
    fn claim_window<'a>(&mut self, ctx: &StepContext<'a>) -> Option<&'a [TokenId]> {
        let h = self.scheme.context();
        let g = ctx.generated;
        if g.len() < h {
            return None;
        }
        let window = &g[g.len() - h..];
        if h > 0 && !self.used_windows.insert(window.to_vec()) {
            return None;
        }
        Some(window)
    }

    /// `delta` for every token that may be biased, `0` for excluded ones.
    fn delta_mask(&self, vocab: usize, delta: f32) -> Vec<f32> {
        (0..vocab)
            .map(|t| if self.excluded(t) { 0.0 } else { delta })
            .collect()
    }
}

/// `logits[t] += delta_mask[t]` where `words[t]` is green: branch-free over equal-length
/// slices so the compiler vectorises it (a compare to 0/1, a multiply-add per token).
fn add_green_bias(logits: &mut [f32], words: &[u32], delta_mask: &[f32], threshold: u32) {
    let n = logits.len().min(words.len()).min(delta_mask.len());
    let (logits, words, delta_mask) = (&mut logits[..n], &words[..n], &delta_mask[..n]);
    for ((l, &w), &d) in logits.iter_mut().zip(words).zip(delta_mask) {
        *l += d * f32::from(u8::from(is_green(w, threshold)));
    }
}

impl SamplingHook for WatermarkHook {
    fn bias(&mut self, ctx: &StepContext<'_>, logits: &mut [f32]) {
        self.pending = None;
        let Some(window) = self.claim_window(ctx) else {
            return;
        };
        let vocab = logits.len();
        match self.scheme.clone() {
            Scheme::Kgw {
                gamma,
                delta,
                seeding: Seeding::SelfHash,
                ..
            } => {
                for t in top_n(logits, SELF_HASH_CANDIDATES) {
                    if !self.excluded(t as usize) && self_hash_green(&self.key, window, t, gamma) {
                        logits[t as usize] += delta;
                    }
                }
            }
            Scheme::Kgw { gamma, delta, .. } => {
                if self.delta_mask.len() != vocab {
                    self.delta_mask = self.delta_mask(vocab, delta);
                }
                let mut prf = WindowPrf::new(&self.scheme, &self.key, window);
                prf.words(vocab, &mut self.words);
                let (threshold, _) = green_threshold(gamma);
                add_green_bias(logits, &self.words, &self.delta_mask, threshold);
            }
            Scheme::Unigram { gamma, delta } => {
                if self.unigram_bias.len() != vocab {
                    // One fixed list: the bias vector is computed once per response.
                    let mut words = Vec::new();
                    WindowPrf::new(&self.scheme, &self.key, &[]).words(vocab, &mut words);
                    let mut bias = vec![0.0; vocab];
                    add_green_bias(
                        &mut bias,
                        &words,
                        &self.delta_mask(vocab, delta),
                        green_threshold(gamma).0,
                    );
                    self.unigram_bias = bias;
                }
                for (l, &b) in logits.iter_mut().zip(&self.unigram_bias) {
                    *l += b;
                }
            }
            Scheme::Gumbel { .. } | Scheme::SynthId { .. } => {
                self.pending = Some(WindowPrf::new(&self.scheme, &self.key, window));
            }
        }
        self.watermarked += 1;
    }

    fn draw(&mut self, _ctx: &StepContext<'_>, dist: &Distribution<'_>, u: f64) -> Option<TokenId> {
        let mut prf = self.pending.take()?;
        let n = dist.tokens.len();
        // The keyed word of every candidate.
        let mut words: Vec<u32> = Vec::with_capacity(n);
        if n > DENSE_DRAW {
            let max = dist.tokens.iter().copied().max().unwrap_or(0) as usize + 1;
            prf.words(max, &mut self.words);
            words.extend(dist.tokens.iter().map(|&t| self.words[t as usize]));
        } else {
            words.extend(dist.tokens.iter().map(|&t| prf.word(t)));
        }
        match self.scheme {
            Scheme::Gumbel { .. } => {
                // argmax r^(1/p)  ⇔  argmax ln(r)/p: an exact sample from `dist`
                // when r is uniform, and a deterministic function of the key.
                let mut best = None;
                let mut best_score = f64::NEG_INFINITY;
                for ((&t, &p), &w) in dist.tokens.iter().zip(dist.probs).zip(&words) {
                    if p <= 0.0 {
                        continue;
                    }
                    let score = gumbel_uniform(w).ln() / f64::from(p);
                    if score > best_score {
                        best_score = score;
                        best = Some(t);
                    }
                }
                best
            }
            Scheme::SynthId { layers, .. } => {
                // Vectorised tournament (Dathathri et al., Alg. 2 for Bernoulli(½)
                // g-values): each layer maps q(x) → q(x)·(1 + g_l(x) − E_q[g_l]).
                // The result is then drawn with the request's own uniform.
                let mut q: Vec<f64> = dist.probs.iter().map(|&p| f64::from(p)).collect();
                for l in 0..layers {
                    let e: f64 = q
                        .iter()
                        .zip(&words)
                        .map(|(qi, w)| qi * f64::from((w >> l) & 1))
                        .sum();
                    for (qi, w) in q.iter_mut().zip(&words) {
                        *qi *= 1.0 + f64::from((w >> l) & 1) - e;
                    }
                }
                let total: f64 = q.iter().sum();
                let mut cum = 0.0;
                for (&t, qi) in dist.tokens.iter().zip(&q) {
                    cum += qi / total;
                    if u < cum {
                        return Some(t);
                    }
                }
                dist.tokens.last().copied()
            }
            _ => None,
        }
    }
}
