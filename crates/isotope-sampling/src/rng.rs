//! Per-request randomness.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

/// The random stream of one choice of one request.
///
/// It is derived from `(seed, choice index)` only — never from anything about the
/// batch the request happens to share — and the sampler draws exactly one value from
/// it per generated token, greedy or not. So the same request yields the same tokens
/// whatever else is decoded alongside it and however its output is chunked, and choice
/// `i` of an `n > 1` request is independent of choice `j`.
///
/// ChaCha20 gives independent streams per choice (`set_stream`) from one 64-bit seed.
/// This is *not* the watermark's randomness: that comes from a keyed PRF over the
/// context, so it can be recomputed by the detector.
#[derive(Clone, Debug)]
pub struct RequestRng {
    inner: ChaCha20Rng,
}

impl RequestRng {
    /// The stream for choice `choice` of a request seeded with `seed`.
    pub fn new(seed: u64, choice: u64) -> Self {
        let mut inner = ChaCha20Rng::seed_from_u64(seed);
        inner.set_stream(choice);
        Self { inner }
    }

    /// Next uniform in `[0, 1)` with 53 bits of precision. Called once per token.
    pub fn next_uniform(&mut self) -> f64 {
        (self.inner.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_choice_same_stream() {
        let mut a = RequestRng::new(7, 0);
        let mut b = RequestRng::new(7, 0);
        for _ in 0..100 {
            assert_eq!(a.next_uniform(), b.next_uniform());
        }
    }

    #[test]
    fn choices_and_seeds_differ() {
        let first = |s, c| RequestRng::new(s, c).next_uniform();
        assert_ne!(first(7, 0), first(7, 1));
        assert_ne!(first(7, 0), first(8, 0));
    }

    #[test]
    fn uniform_in_unit_interval() {
        let mut r = RequestRng::new(1, 2);
        let xs: Vec<f64> = (0..10_000).map(|_| r.next_uniform()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}
