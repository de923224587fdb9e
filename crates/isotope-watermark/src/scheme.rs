//! Watermark schemes: their parameters, their names, and the keyed values both the
//! generator and the detector derive from a (window, token) pair.
//!
//! Keeping that derivation in one place is what makes detection match generation.

use std::fmt;
use std::str::FromStr;

use crate::key::WatermarkKey;
use crate::prf::{green_threshold, is_green, uniform, Keystream};

/// How KGW turns the context window into the green list's seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seeding {
    /// PRF of the `h` previous tokens in order (Kirchenbauer et al.'s LeftHash).
    Left,
    /// Minimum over the `h` previous tokens of a per-token PRF: order-free, so it
    /// survives some insertions and swaps (MinHash).
    Min,
    /// PRF of the window *and the candidate token itself*: a candidate is green for its
    /// own seed (SelfHash). Evaluated over the top candidates only.
    SelfHash,
}

impl Seeding {
    fn name(self) -> &'static str {
        match self {
            Seeding::Left => "left",
            Seeding::Min => "min",
            Seeding::SelfHash => "self",
        }
    }
}

/// A watermark scheme with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Scheme {
    /// Green/red list with a logit bias (Kirchenbauer et al. 2023).
    Kgw {
        /// Fraction of the vocabulary that is green.
        gamma: f64,
        /// Logit bias added to green tokens.
        delta: f32,
        /// Context width `h`: tokens that seed the green list.
        context: usize,
        /// How the window seeds the list.
        seeding: Seeding,
    },
    /// One fixed green list for every position (Zhao et al. 2023).
    Unigram {
        /// Fraction of the vocabulary that is green.
        gamma: f64,
        /// Logit bias added to green tokens.
        delta: f32,
    },
    /// Distortion-free exponential-minimum sampling keyed on the context (Aaronson;
    /// Kuditipudi et al.): choose `argmax r_w^{1/p_w}` with keyed uniforms `r`.
    Gumbel {
        /// Context width `h`.
        context: usize,
    },
    /// Tournament sampling with `layers` keyed binary g-values (Dathathri et al., Nature
    /// 2024), in its vectorised closed form.
    SynthId {
        /// Context width `h`.
        context: usize,
        /// Tournament layers `m` (1–32).
        layers: u32,
    },
}

/// Candidates evaluated by SelfHash seeding (by logit, after temperature).
pub const SELF_HASH_CANDIDATES: usize = 64;

impl Default for Scheme {
    fn default() -> Self {
        Scheme::kgw()
    }
}

/// An invalid scheme name or parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid watermark scheme `{spec}`: {message}")]
pub struct SchemeError {
    /// What was given.
    pub spec: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl Scheme {
    /// KGW with γ = 0.25, δ = 2, h = 4, LeftHash.
    pub fn kgw() -> Self {
        Scheme::Kgw {
            gamma: 0.25,
            delta: 2.0,
            context: 4,
            seeding: Seeding::Left,
        }
    }

    /// The scheme named `name` with default parameters.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "kgw" => Scheme::kgw(),
            "unigram" => Scheme::Unigram {
                gamma: 0.25,
                delta: 2.0,
            },
            "gumbel" => Scheme::Gumbel { context: 4 },
            "synthid" => Scheme::SynthId {
                context: 4,
                layers: 16,
            },
            _ => return None,
        })
    }

    /// Scheme names accepted by [`Scheme::by_name`].
    pub const NAMES: [&'static str; 4] = ["kgw", "unigram", "gumbel", "synthid"];

    /// The scheme's short name.
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::Kgw { .. } => "kgw",
            Scheme::Unigram { .. } => "unigram",
            Scheme::Gumbel { .. } => "gumbel",
            Scheme::SynthId { .. } => "synthid",
        }
    }

    /// Whether reading mode can score this scheme by green probability mass
    /// ([`crate::Detector::tally_reading_mass`]): KGW with a window seed (LeftHash or
    /// MinHash), whose green bits for different candidates after one seed are
    /// distinct keyed words — independent Bernoulli(γ′) trials. (SelfHash gives each
    /// candidate its own seed, Unigram has one seed for every window, Gumbel and
    /// SynthID have no green list.)
    pub fn supports_mass_reading(&self) -> bool {
        matches!(
            self,
            Scheme::Kgw {
                seeding: Seeding::Left | Seeding::Min,
                ..
            }
        )
    }

    /// Context width `h` (0 for Unigram).
    pub fn context(&self) -> usize {
        match *self {
            Scheme::Kgw { context, .. }
            | Scheme::Gumbel { context }
            | Scheme::SynthId { context, .. } => context,
            Scheme::Unigram { .. } => 0,
        }
    }

    /// True for schemes that leave the distribution unchanged and act through the draw
    /// (and so do nothing under greedy decoding).
    pub fn is_distortion_free(&self) -> bool {
        matches!(self, Scheme::Gumbel { .. } | Scheme::SynthId { .. })
    }

    /// What greedy decoding (temperature 0) uses instead of a distortion-free scheme:
    /// greedy has no randomness for the key to steer, so Gumbel and SynthID would be
    /// silently absent. They fall back to KGW (same key and context width, γ = 0.25,
    /// δ = 2), which biases the argmax and stays detectable — with `--scheme kgw`.
    pub fn for_greedy(&self) -> Scheme {
        if self.is_distortion_free() {
            Scheme::Kgw {
                gamma: 0.25,
                delta: 2.0,
                context: self.context(),
                seeding: Seeding::Left,
            }
        } else {
            self.clone()
        }
    }

    fn check(self, spec: &str) -> Result<Self, SchemeError> {
        let err = |m: String| SchemeError {
            spec: spec.to_owned(),
            message: m,
        };
        match &self {
            Scheme::Kgw { gamma, delta, .. } | Scheme::Unigram { gamma, delta } => {
                if !(0.0 < *gamma && *gamma < 1.0) {
                    return Err(err(format!("gamma must be in (0, 1), got {gamma}")));
                }
                if !delta.is_finite() || *delta < 0.0 || *delta > 20.0 {
                    return Err(err(format!("delta must be in [0, 20], got {delta}")));
                }
            }
            Scheme::SynthId { layers, .. } if !(1..=32).contains(layers) => {
                return Err(err(format!("layers must be in 1..=32, got {layers}")));
            }
            _ => {}
        }
        if self.context() > 64 {
            return Err(err(format!(
                "context width h must be ≤ 64, got {}",
                self.context()
            )));
        }
        if matches!(
            self,
            Scheme::Kgw {
                seeding: Seeding::Min | Seeding::SelfHash,
                context: 0,
                ..
            }
        ) {
            return Err(err("min/self seeding needs a context width h ≥ 1".into()));
        }
        Ok(self)
    }
}

impl fmt::Display for Scheme {
    /// Canonical spec, e.g. `kgw:gamma=0.25,delta=2,h=4,seeding=left`; parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::Kgw {
                gamma,
                delta,
                context,
                seeding,
            } => write!(
                f,
                "kgw:gamma={gamma},delta={delta},h={context},seeding={}",
                seeding.name()
            ),
            Scheme::Unigram { gamma, delta } => write!(f, "unigram:gamma={gamma},delta={delta}"),
            Scheme::Gumbel { context } => write!(f, "gumbel:h={context}"),
            Scheme::SynthId { context, layers } => write!(f, "synthid:h={context},layers={layers}"),
        }
    }
}

impl FromStr for Scheme {
    type Err = SchemeError;

    /// `name` or `name:param=value,...` (parameters `gamma`, `delta`, `h`, `seeding`,
    /// `layers`, as the scheme has them).
    fn from_str(spec: &str) -> Result<Self, SchemeError> {
        let err = |m: String| SchemeError {
            spec: spec.to_owned(),
            message: m,
        };
        let (name, params) = spec.split_once(':').unwrap_or((spec, ""));
        let mut scheme = Scheme::by_name(name.trim()).ok_or_else(|| {
            err(format!(
                "unknown scheme; expected one of {}",
                Scheme::NAMES.join(", ")
            ))
        })?;
        for kv in params.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err(format!("`{kv}` is not param=value")))?;
            let (k, v) = (k.trim(), v.trim());
            let num = |v: &str| {
                v.parse::<f64>()
                    .map_err(|_| err(format!("`{k}` needs a number, got `{v}`")))
            };
            let int = |v: &str| {
                v.parse::<usize>()
                    .map_err(|_| err(format!("`{k}` needs a whole number, got `{v}`")))
            };
            match (&mut scheme, k) {
                (Scheme::Kgw { gamma, .. } | Scheme::Unigram { gamma, .. }, "gamma") => {
                    *gamma = num(v)?
                }
                (Scheme::Kgw { delta, .. } | Scheme::Unigram { delta, .. }, "delta") => {
                    *delta = num(v)? as f32
                }
                (
                    Scheme::Kgw { context, .. }
                    | Scheme::Gumbel { context }
                    | Scheme::SynthId { context, .. },
                    "h",
                ) => *context = int(v)?,
                (Scheme::Kgw { seeding, .. }, "seeding") => {
                    *seeding = match v {
                        "left" => Seeding::Left,
                        "min" => Seeding::Min,
                        "self" => Seeding::SelfHash,
                        _ => {
                            return Err(err(format!(
                                "seeding must be left, min or self, got `{v}`"
                            )))
                        }
                    }
                }
                (Scheme::SynthId { layers, .. }, "layers") => *layers = int(v)? as u32,
                _ => return Err(err(format!("`{k}` is not a parameter of {name}"))),
            }
        }
        scheme.check(spec)
    }
}

/// The keyed values of one window, shared by generation and detection.
pub(crate) struct WindowPrf {
    /// Seeds the keystream (and identifies the window for deduplication).
    pub(crate) seed: [u8; 32],
    /// MinHash: the window token whose keyed hash is smallest (it alone seeds the
    /// list); 0 for other schemes.
    pub(crate) anchor: u32,
    stream: Keystream,
}

impl WindowPrf {
    /// Derive the window's seed. `window` is exactly the `h` tokens before the
    /// position (empty for Unigram).
    pub(crate) fn new(scheme: &Scheme, key: &WatermarkKey, window: &[u32]) -> Self {
        let mut anchor = 0;
        let seed = match scheme {
            Scheme::Kgw {
                seeding: Seeding::Left,
                ..
            } => key.prf(b"kgw-left", window),
            Scheme::Kgw {
                seeding: Seeding::Min,
                ..
            } => {
                let (min, token) = window
                    .iter()
                    .map(|&t| {
                        let h = key.prf(b"kgw-min-token", &[t]);
                        (u64::from_le_bytes(h[..8].try_into().expect("8 bytes")), t)
                    })
                    .min()
                    .unwrap_or((0, 0));
                anchor = token;
                key.prf(b"kgw-min", &[min as u32, (min >> 32) as u32])
            }
            Scheme::Kgw {
                seeding: Seeding::SelfHash,
                ..
            } => key.prf(b"kgw-self", window),
            Scheme::Unigram { .. } => key.prf(b"unigram", &[]),
            Scheme::Gumbel { .. } => key.prf(b"gumbel", window),
            Scheme::SynthId { .. } => key.prf(b"synthid", window),
        };
        Self {
            seed,
            anchor,
            stream: Keystream::new(seed),
        }
    }

    /// Dense words for the whole vocabulary.
    pub(crate) fn words(&mut self, vocab: usize, out: &mut Vec<u32>) {
        self.stream.words(vocab, out)
    }

    /// The word of one token.
    pub(crate) fn word(&mut self, token: u32) -> u32 {
        self.stream.word(token)
    }

    /// Dedup identity of this window (first 128 bits of the seed).
    pub(crate) fn id(&self) -> u128 {
        u128::from_le_bytes(self.seed[..16].try_into().expect("16 bytes"))
    }
}

/// SelfHash greenness of `token` after `window`: one keyed hash per candidate.
pub(crate) fn self_hash_green(key: &WatermarkKey, window: &[u32], token: u32, gamma: f64) -> bool {
    let mut input = Vec::with_capacity(window.len() + 1);
    input.extend_from_slice(window);
    input.push(token);
    let h = key.prf(b"kgw-self-token", &input);
    is_green(
        u32::from_le_bytes(h[..4].try_into().expect("4 bytes")),
        green_threshold(gamma).0,
    )
}

/// Gumbel's keyed uniform for a token word.
pub(crate) fn gumbel_uniform(word: u32) -> f64 {
    uniform(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip() {
        for name in Scheme::NAMES {
            let s = Scheme::by_name(name).unwrap();
            assert_eq!(s.to_string().parse::<Scheme>().unwrap(), s);
            assert_eq!(name.parse::<Scheme>().unwrap(), s);
        }
        let s: Scheme = "kgw:gamma=0.5,delta=1.5,h=2,seeding=min".parse().unwrap();
        assert_eq!(
            s,
            Scheme::Kgw {
                gamma: 0.5,
                delta: 1.5,
                context: 2,
                seeding: Seeding::Min
            }
        );
    }

    #[test]
    fn bad_specs_say_why() {
        for (spec, needle) in [
            ("kgb", "unknown scheme"),
            ("kgw:gamma=2", "gamma must be"),
            ("kgw:gamma=x", "needs a number"),
            ("gumbel:gamma=0.5", "not a parameter"),
            ("synthid:layers=40", "layers"),
            ("kgw:h=0,seeding=self", "h ≥ 1"),
            ("kgw:seeding=max", "seeding must be"),
        ] {
            let e = spec.parse::<Scheme>().unwrap_err();
            assert!(e.to_string().contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn greedy_falls_back_to_kgw_for_distortion_free_schemes() {
        assert_eq!(
            Scheme::by_name("gumbel").unwrap().for_greedy().name(),
            "kgw"
        );
        assert_eq!(
            Scheme::by_name("synthid").unwrap().for_greedy().name(),
            "kgw"
        );
        let u = Scheme::by_name("unigram").unwrap();
        assert_eq!(u.for_greedy(), u);
    }
}
