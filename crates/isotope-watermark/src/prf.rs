//! Per-window keystreams: one keyed hash per window seeds ChaCha8, which gives a value
//! per vocabulary entry, either all at once (a green mask over 49,152 tokens) or for
//! one token (detection, or a few candidates) by seeking to its word.
//!
//! Token `t` owns 32-bit word `t` of the stream. Green lists use its low 16 bits
//! (`γ` resolution 1/65,536; the detector uses the same quantised `γ`), Gumbel uses all
//! 32 bits as a uniform, SynthID uses bit `l` as the layer-`l` g-value.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// A ChaCha8 keystream seeded by a PRF output.
pub(crate) struct Keystream {
    rng: ChaCha8Rng,
}

impl Keystream {
    pub(crate) fn new(seed: [u8; 32]) -> Self {
        Self {
            rng: ChaCha8Rng::from_seed(seed),
        }
    }

    /// Word `index` of the stream.
    pub(crate) fn word(&mut self, index: u32) -> u32 {
        self.rng.set_word_pos(u128::from(index));
        self.rng.next_u32()
    }

    /// Words `0..n` into `out`.
    pub(crate) fn words(&mut self, n: usize, out: &mut Vec<u32>) {
        self.rng.set_word_pos(0);
        out.clear();
        out.resize(n, 0);
        let bytes: &mut [u8] = bytemuck_u32(out);
        self.rng.fill_bytes(bytes);
        if cfg!(target_endian = "big") {
            out.iter_mut().for_each(|w| *w = u32::from_le(*w));
        }
    }
}

/// View a `u32` slice as bytes (`u8` has no alignment or validity requirements).
fn bytemuck_u32(words: &mut [u32]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: every bit pattern is a valid u8, u8 has alignment 1, and the length is
    // the slice's size in bytes; the borrow is tied to `words`.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

/// Threshold on the low 16 bits for green-list fraction `gamma`, and the exact
/// fraction it implies (what the detector's null hypothesis uses).
pub fn green_threshold(gamma: f64) -> (u32, f64) {
    let t = (gamma * 65_536.0).round().clamp(1.0, 65_535.0) as u32;
    (t, f64::from(t) / 65_536.0)
}

/// Is `word` green at `threshold`?
#[inline]
pub(crate) fn is_green(word: u32, threshold: u32) -> bool {
    (word & 0xffff) < threshold
}

/// Uniform in (0, 1) from a 32-bit word: the midpoint of its cell, never 0 or 1.
#[inline]
pub(crate) fn uniform(word: u32) -> f64 {
    (f64::from(word) + 0.5) / 4_294_967_296.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_access_matches_the_dense_stream() {
        let mut ks = Keystream::new([3; 32]);
        let mut dense = Vec::new();
        ks.words(1000, &mut dense);
        for i in [0u32, 1, 15, 16, 17, 63, 64, 500, 999] {
            assert_eq!(ks.word(i), dense[i as usize], "word {i}");
        }
    }

    #[test]
    fn green_fraction_is_gamma() {
        let (t, g) = green_threshold(0.25);
        assert_eq!(g, 0.25);
        let mut ks = Keystream::new([9; 32]);
        let mut dense = Vec::new();
        ks.words(100_000, &mut dense);
        let greens = dense.iter().filter(|&&w| is_green(w, t)).count() as f64;
        assert!((greens / 100_000.0 - 0.25).abs() < 0.005);
    }

    #[test]
    fn uniform_stays_inside_the_open_interval() {
        assert!(uniform(0) > 0.0);
        assert!(uniform(u32::MAX) < 1.0);
    }
}
