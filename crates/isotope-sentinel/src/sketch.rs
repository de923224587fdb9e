//! Bounded-memory building blocks: a fixed hash, MinHash signatures with LSH band
//! keys, a reservoir sample, exponentially decayed counters and streaming moments.
//!
//! Everything here is deterministic (no `RandomState`): the same events give the same
//! sketches on every run and every replica, which the evaluation and the tests rely on.

/// SplitMix64 finaliser: a cheap, well-mixing bijection on `u64`.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// FNV-1a over the bytes, then [`mix64`] with a seed: a fixed, portable hash (std's
/// hasher is not guaranteed stable across Rust versions).
#[inline]
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix64(h)
}

/// Number of MinHash functions.
pub const MINHASH_K: usize = 24;
/// Rows per LSH band: two rows keep chance collisions between unrelated prompts rare
/// (both minima must agree) while a shared template still collides often.
pub const LSH_ROWS: usize = 2;
/// LSH bands per signature.
pub const LSH_BANDS: usize = MINHASH_K / LSH_ROWS;

/// A MinHash signature over a set of shingle hashes.
pub type Signature = [u32; MINHASH_K];

/// MinHash of a set of shingle hashes; `None` for an empty set (no shingles, no
/// template to share).
pub fn minhash<I: IntoIterator<Item = u64>>(shingles: I) -> Option<Signature> {
    let mut sig = [u32::MAX; MINHASH_K];
    let mut any = false;
    for s in shingles {
        any = true;
        for (i, slot) in sig.iter_mut().enumerate() {
            let v = (mix64(s ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407)) >> 32) as u32;
            if v < *slot {
                *slot = v;
            }
        }
    }
    any.then_some(sig)
}

/// Estimated Jaccard similarity of two signatures.
pub fn jaccard_estimate(a: &Signature, b: &Signature) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / MINHASH_K as f64
}

/// LSH band keys: two prompts whose signatures agree on every row of some band share
/// that band's key. Keys are non-zero (0 marks an empty slot in [`BandRing`]).
pub fn band_keys(sig: &Signature) -> [u32; LSH_BANDS] {
    let mut out = [0u32; LSH_BANDS];
    for (b, key) in out.iter_mut().enumerate() {
        let mut h = (b as u64) << 56;
        for r in 0..LSH_ROWS {
            h = mix64(h ^ sig[b * LSH_ROWS + r] as u64);
        }
        *key = (h as u32).max(1);
    }
    out
}

/// The band keys of an account's last `cap` prompts, in a ring. A linear scan of a few
/// thousand `u32` is faster than a hash map at this size and its memory is fixed.
#[derive(Clone, Debug)]
pub struct BandRing {
    keys: Vec<u32>,
    cap: usize,
    pos: usize,
}

impl BandRing {
    /// A ring holding the band keys of up to `cap_prompts` prompts.
    pub fn new(cap_prompts: usize) -> Self {
        BandRing {
            keys: Vec::new(),
            cap: cap_prompts.max(1) * LSH_BANDS,
            pos: 0,
        }
    }

    /// True if any of `keys` was seen among the remembered prompts.
    pub fn contains_any(&self, keys: &[u32; LSH_BANDS]) -> bool {
        self.keys.iter().any(|k| keys.contains(k))
    }

    /// The keys of `keys` that were seen among the remembered prompts (one scan).
    pub fn matching(&self, keys: &[u32; LSH_BANDS]) -> Vec<u32> {
        let mut hit = [false; LSH_BANDS];
        for k in &self.keys {
            for (i, q) in keys.iter().enumerate() {
                hit[i] |= k == q;
            }
        }
        keys.iter()
            .zip(hit)
            .filter(|(_, h)| *h)
            .map(|(k, _)| *k)
            .collect()
    }

    /// Remembers one prompt's keys, evicting the oldest prompt when full.
    pub fn push(&mut self, keys: &[u32; LSH_BANDS]) {
        for &k in keys {
            if self.keys.len() < self.cap {
                self.keys.push(k);
            } else {
                self.keys[self.pos] = k;
                self.pos = (self.pos + 1) % self.cap;
            }
        }
    }

    /// Keys currently held (at most the capacity).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when nothing was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Heap bytes.
    pub fn heap_bytes(&self) -> usize {
        self.keys.capacity() * 4
    }
}

/// A uniform sample of at most `cap` items from a stream (Vitter's algorithm R), with
/// its own deterministic generator so the sample depends only on the stream.
#[derive(Clone, Debug)]
pub struct Reservoir<T> {
    items: Vec<T>,
    cap: usize,
    seen: u64,
    rng: u64,
}

impl<T> Reservoir<T> {
    /// An empty reservoir of capacity `cap`, its sampling seeded by `seed`.
    pub fn new(cap: usize, seed: u64) -> Self {
        Reservoir {
            items: Vec::new(),
            cap: cap.max(1),
            seen: 0,
            rng: mix64(seed),
        }
    }

    /// Offers one item; it is kept with probability `cap / seen`.
    pub fn offer(&mut self, item: T) {
        self.seen += 1;
        if self.items.len() < self.cap {
            self.items.push(item);
            return;
        }
        self.rng = mix64(self.rng);
        let j = self.rng % self.seen;
        if (j as usize) < self.cap {
            self.items[j as usize] = item;
        }
    }

    /// The sample.
    pub fn items(&self) -> &[T] {
        &self.items
    }

    /// Items offered so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Capacity.
    pub fn cap(&self) -> usize {
        self.cap
    }
}

/// A count that decays exponentially with time constant `tau_ms`: after a quiet
/// period of `tau_ms` it is worth 1/e of what it was. At a steady rate `r` per ms it
/// converges to `r * tau_ms`, i.e. "events in the last tau" — a sliding window in
/// two floats instead of a ring of buckets.
#[derive(Clone, Copy, Debug, Default)]
pub struct Decayed {
    value: f64,
    at_ms: i64,
}

impl Decayed {
    /// Adds `amount` at time `now_ms` (times may only move forward; an earlier time is
    /// treated as `at_ms`, so out-of-order events do not inflate the count).
    pub fn add(&mut self, amount: f64, now_ms: i64, tau_ms: f64) {
        self.value = self.get(now_ms, tau_ms) + amount;
        self.at_ms = self.at_ms.max(now_ms);
    }

    /// The decayed value at `now_ms`.
    pub fn get(&self, now_ms: i64, tau_ms: f64) -> f64 {
        let dt = (now_ms - self.at_ms).max(0) as f64;
        self.value * (-dt / tau_ms).exp()
    }
}

/// Streaming count, mean and the second to fourth central moments (Pébay's update),
/// for the shape of a distribution without keeping it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
    m3: f64,
    m4: f64,
}

impl Moments {
    /// Adds one value.
    pub fn push(&mut self, x: f64) {
        let n1 = self.n;
        self.n += 1.0;
        let n = self.n;
        let delta = x - self.mean;
        let delta_n = delta / n;
        let delta_n2 = delta_n * delta_n;
        let term1 = delta * delta_n * n1;
        self.mean += delta_n;
        self.m4 += term1 * delta_n2 * (n * n - 3.0 * n + 3.0) + 6.0 * delta_n2 * self.m2
            - 4.0 * delta_n * self.m3;
        self.m3 += term1 * delta_n * (n - 2.0) - 3.0 * delta_n * self.m2;
        self.m2 += term1;
    }

    /// Number of values.
    pub fn count(&self) -> f64 {
        self.n
    }

    /// Mean (0 when empty).
    pub fn mean(&self) -> f64 {
        self.mean
    }

    /// Population variance (0 with fewer than two values).
    pub fn variance(&self) -> f64 {
        if self.n < 2.0 {
            0.0
        } else {
            self.m2 / self.n
        }
    }

    /// Standard deviation.
    pub fn std(&self) -> f64 {
        self.variance().sqrt()
    }

    /// Sample skewness (0 when undefined).
    pub fn skewness(&self) -> f64 {
        if self.n < 3.0 || self.m2 <= 1e-12 {
            return 0.0;
        }
        self.n.sqrt() * self.m3 / self.m2.powf(1.5)
    }

    /// Excess kurtosis (0 when undefined).
    pub fn excess_kurtosis(&self) -> f64 {
        if self.n < 4.0 || self.m2 <= 1e-12 {
            return 0.0;
        }
        self.n * self.m4 / (self.m2 * self.m2) - 3.0
    }

    /// Jarque–Bera statistic `n/6 (S² + K²/4)`: 0 for a normal shape, large for a
    /// skewed or heavy-tailed one. The streaming stand-in for PRADA's Shapiro–Wilk.
    pub fn jarque_bera(&self) -> f64 {
        let s = self.skewness();
        let k = self.excess_kurtosis();
        self.n / 6.0 * (s * s + k * k / 4.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decayed_counts_converge_to_rate_times_tau() {
        let mut d = Decayed::default();
        let tau = 3_600_000.0;
        // one event per minute for 10 hours
        for i in 0..600 {
            d.add(1.0, i * 60_000, tau);
        }
        let v = d.get(599 * 60_000, tau);
        assert!((v - 60.0).abs() < 2.0, "{v}");
        // an hour of silence divides by e
        let later = d.get(599 * 60_000 + 3_600_000, tau);
        assert!((later - v / std::f64::consts::E).abs() < 1e-9);
    }

    #[test]
    fn moments_match_direct_computation() {
        let xs = [1.0, 2.0, 2.0, 3.0, 10.0, 4.0, 0.5];
        let mut m = Moments::default();
        xs.iter().for_each(|&x| m.push(x));
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let m2: f64 = xs.iter().map(|x| (x - mean).powi(2)).sum();
        let m3: f64 = xs.iter().map(|x| (x - mean).powi(3)).sum();
        let m4: f64 = xs.iter().map(|x| (x - mean).powi(4)).sum();
        assert!((m.mean() - mean).abs() < 1e-12);
        assert!((m.variance() - m2 / n).abs() < 1e-9);
        assert!((m.skewness() - n.sqrt() * m3 / m2.powf(1.5)).abs() < 1e-9);
        assert!((m.excess_kurtosis() - (n * m4 / (m2 * m2) - 3.0)).abs() < 1e-9);
    }

    #[test]
    fn minhash_of_identical_sets_is_identical_and_similar_sets_collide() {
        let a: Vec<u64> = (0..40).collect();
        let mut b = a.clone();
        b.extend(100..104);
        let sa = minhash(a.iter().copied()).unwrap();
        let sb = minhash(b.iter().copied()).unwrap();
        assert_eq!(sa, minhash(a.iter().copied()).unwrap());
        assert!(jaccard_estimate(&sa, &sb) > 0.6);
        let ka = band_keys(&sa);
        let kb = band_keys(&sb);
        assert!(ka.iter().any(|k| kb.contains(k)));
        let c: Vec<u64> = (1000..1040).collect();
        let kc = band_keys(&minhash(c).unwrap());
        assert!(!ka.iter().any(|k| kc.contains(k)));
        assert!(minhash(std::iter::empty()).is_none());
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reservoir_never_exceeds_capacity(cap in 1usize..64, n in 0usize..2000, seed: u64) {
            let mut r = Reservoir::new(cap, seed);
            for i in 0..n { r.offer(i); }
            prop_assert_eq!(r.items().len(), n.min(cap));
            prop_assert_eq!(r.seen(), n as u64);
            // every kept item came from the stream, none twice
            let mut v = r.items().to_vec();
            v.sort_unstable();
            v.dedup();
            prop_assert_eq!(v.len(), n.min(cap));
            prop_assert!(v.iter().all(|&x| x < n));
        }

        #[test]
        fn band_ring_is_bounded_and_remembers_the_latest(cap in 1usize..32, n in 1usize..300) {
            let mut ring = BandRing::new(cap);
            let mut last = [0u32; LSH_BANDS];
            for i in 0..n {
                let sig = minhash([i as u64, (i * 7) as u64, (i * 13) as u64]).unwrap();
                last = band_keys(&sig);
                ring.push(&last);
            }
            prop_assert!(ring.len() <= cap * LSH_BANDS);
            prop_assert!(ring.contains_any(&last));
        }

        #[test]
        fn decayed_is_never_negative_and_bounded_by_total(times in proptest::collection::vec(0i64..10_000_000, 1..200)) {
            let mut d = Decayed::default();
            let mut sorted = times.clone();
            sorted.sort_unstable();
            for &t in &sorted { d.add(1.0, t, 60_000.0); }
            let v = d.get(*sorted.last().unwrap(), 60_000.0);
            prop_assert!(v >= 0.0 && v <= sorted.len() as f64 + 1e-9);
        }

        #[test]
        fn minhash_estimate_is_one_on_equal_sets(xs in proptest::collection::vec(any::<u64>(), 1..50)) {
            let a = minhash(xs.iter().copied()).unwrap();
            let mut ys = xs.clone();
            ys.reverse();
            let b = minhash(ys).unwrap();
            prop_assert_eq!(jaccard_estimate(&a, &b), 1.0);
        }
    }
}
