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

use serde::Serialize;

use crate::common::{tuple_id, CommonTuples, TupleShape};
use crate::hook::ExcludedTokens;
use crate::key::WatermarkKey;
use crate::prf::{green_threshold, is_green};
use crate::scheme::{gumbel_uniform, self_hash_green, Scheme, Seeding, WindowPrf};
use crate::stats::{ln_binomial_sf, ln_bonferroni, ln_gamma_sf, ln_to_log10};

/// The result of one test.
#[derive(Clone, Debug, PartialEq, Serialize)]
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
}

/// Running totals of a test, so a corpus of many texts is one test with one shared
/// deduplication set.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    seen: HashSet<(u128, u32)>,
    n: u64,
    common: u64,
    sum: f64,
}

impl Tally {
    /// Distinct tuples scored so far.
    pub fn scored(&self) -> u64 {
        self.n
    }

    /// Pre-seed the deduplication set with the tuples of `tokens` (e.g. the prompts a
    /// suspect was given) without scoring them.
    pub fn exclude(&mut self, detector: &Detector, tokens: &[u32]) {
        detector.visit(tokens, &mut self.seen, |_, _| {});
    }

    /// Distinct tuples left out so far because they are common in human text.
    pub fn common_excluded(&self) -> u64 {
        self.common
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

    /// Calls `f(position, value)` for every scored, first-seen tuple of `tokens`;
    /// returns how many distinct tuples were left out as common.
    fn visit(
        &self,
        tokens: &[u32],
        seen: &mut HashSet<(u128, u32)>,
        mut f: impl FnMut(usize, f64),
    ) -> u64 {
        let h = self.scheme.context();
        let common = self.active_common();
        let shape = TupleShape::of(&self.scheme);
        let mut left_out = 0;
        // Unigram has one fixed list: derive it once.
        let mut fixed = matches!(self.scheme, Scheme::Unigram { .. })
            .then(|| WindowPrf::new(&self.scheme, &self.key, &[]));
        for pos in h..tokens.len() {
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
            let value = match self.scheme {
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
            };
            f(pos, value);
        }
        left_out
    }

    /// Score the generated tokens of one text into `tally`.
    pub fn tally(&self, tally: &mut Tally, tokens: &[u32]) {
        let (mut n, mut sum) = (0u64, 0.0f64);
        tally.common += self.visit(tokens, &mut tally.seen, |_, v| {
            n += 1;
            sum += v;
        });
        tally.n += n;
        tally.sum += sum;
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
        self.detection(
            tally.n,
            tally.sum,
            self.ln_p(tally.n, tally.sum),
            tally.common,
        )
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
        }
    }

    /// Test one text (its generated tokens).
    pub fn detect(&self, tokens: &[u32]) -> Detection {
        let mut t = Tally::default();
        self.tally(&mut t, tokens);
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
        let mut seen = HashSet::new();
        let mut pos = Vec::new();
        let mut prefix = vec![0.0f64];
        let common = self.visit(tokens, &mut seen, |p, v| {
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
    let per_key: Vec<Detection> = keys
        .iter()
        .map(|k| {
            let mut d = Detector::new(k.clone(), scheme.clone(), excluded.clone());
            if let Some(c) = common {
                d = d.with_common(c.clone());
            }
            d.detect(tokens)
        })
        .collect();
    let best = per_key
        .iter()
        .min_by(|a, b| a.log10_p_value.total_cmp(&b.log10_p_value));
    let ln_best = best.map_or(0.0, |d| d.log10_p_value * std::f64::consts::LN_10);
    let corrected = ln_bonferroni(ln_best, keys.len().max(1) as u64);
    MultiKeyDetection {
        p_value: corrected.exp(),
        log10_p_value: ln_to_log10(corrected),
        best_key_id: best.map(|d| d.key_id.clone()).unwrap_or_default(),
        per_key,
    }
}
