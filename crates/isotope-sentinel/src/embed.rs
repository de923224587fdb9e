//! Prompt embeddings for diversity, PRADA distances, MMD and Sybil centroids.
//!
//! The first version is [`HashedEmbedder`]: signed feature hashing of content words,
//! word bigrams and character 4-grams into a small dense vector. Signed hashing of a
//! sparse bag-of-n-grams is itself a random projection (its inner products are unbiased
//! estimates of the sparse ones), so no projection matrix is stored. It captures
//! lexical topic and near-paraphrase, not meaning. [`crate::MiniLmEmbedder`]
//! (all-MiniLM-L6-v2 run with candle) sits behind the same [`Embedder`] trait and
//! captures meaning; everything downstream only sees unit vectors, quantised to `i8`
//! ([`Quantized`]) so an account's reservoir stays a few KiB.

use crate::sketch::hash_bytes;

/// Turns a prompt into a unit-length vector of fixed dimension. Implementations must
/// be deterministic (the same text always gives the same vector) and thread-safe.
pub trait Embedder: Send + Sync {
    /// Dimension of the vectors.
    fn dim(&self) -> usize;
    /// Writes the unit vector of `text` into `out` (`out.len() == dim()`); an empty
    /// text gives the zero vector.
    fn embed(&self, text: &str, out: &mut [f32]);
    /// Embeds many texts ahead of use, so that later [`Embedder::embed`] calls on them
    /// are cheap: a model embedder batches and caches them (a replay of a simulated
    /// day embeds tens of thousands of distinct prompts). `progress` is told how many
    /// texts each step finished. Cheap embedders need no preparation.
    fn prepare(&self, texts: &[&str], progress: &dyn Fn(usize)) {
        progress(texts.len());
    }
    /// Whether [`Embedder::prepare`] pays off (a model embedder: batching is ~2×
    /// faster per text and a replay should show progress); callers skip collecting
    /// texts for embedders that say no.
    fn wants_prepare(&self) -> bool {
        false
    }
    /// A name recorded with trained models, so a model is never used with vectors
    /// from a different embedder.
    fn name(&self) -> String;
}

/// Words too common to say anything about a topic.
const STOPWORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "of", "to", "in", "on", "for", "is", "are", "was", "were", "be",
    "it", "this", "that", "with", "as", "at", "by", "from", "i", "you", "me", "my", "your", "what",
    "how", "can", "do", "does", "please", "if", "he", "she", "they", "his", "her", "their", "we",
    "our", "has", "have", "had", "will", "would",
];

/// Feature-hashing embedder (see the module docs for why and what it misses).
#[derive(Clone, Debug)]
pub struct HashedEmbedder {
    dim: usize,
}

impl HashedEmbedder {
    /// Default dimension: 128 keeps chance cosine between unrelated prompts around
    /// ±0.09 while an account's 48-vector reservoir is 6 KiB.
    pub const DEFAULT_DIM: usize = 128;

    /// An embedder of dimension `dim` (at least 8).
    pub fn new(dim: usize) -> Self {
        HashedEmbedder { dim: dim.max(8) }
    }

    fn add(&self, out: &mut [f32], feature: &[u8], seed: u64, weight: f32) {
        let h = hash_bytes(feature, seed);
        let idx = (h % self.dim as u64) as usize;
        let sign = if (h >> 63) == 1 { -1.0 } else { 1.0 };
        out[idx] += sign * weight;
    }
}

impl Default for HashedEmbedder {
    fn default() -> Self {
        HashedEmbedder::new(Self::DEFAULT_DIM)
    }
}

impl Embedder for HashedEmbedder {
    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, text: &str, out: &mut [f32]) {
        out.iter_mut().for_each(|x| *x = 0.0);
        let words = crate::text::words(text);
        let content: Vec<&str> = words
            .iter()
            .map(String::as_str)
            .filter(|w| !STOPWORDS.contains(w))
            .collect();
        for w in &content {
            self.add(out, w.as_bytes(), 11, 1.0);
            let chars: Vec<char> = std::iter::once('#')
                .chain(w.chars())
                .chain(std::iter::once('#'))
                .collect();
            if chars.len() > 5 {
                let mut buf = [0u8; 16];
                for g in chars.windows(4) {
                    let mut len = 0;
                    for c in g {
                        len += c.encode_utf8(&mut buf[len..]).len();
                    }
                    self.add(out, &buf[..len], 13, 0.35);
                }
            }
        }
        for pair in content.windows(2) {
            let mut b = pair[0].as_bytes().to_vec();
            b.push(b' ');
            b.extend_from_slice(pair[1].as_bytes());
            self.add(out, &b, 17, 0.7);
        }
        normalize(out);
    }

    fn name(&self) -> String {
        format!("hashed-ngrams-v1:dim={}", self.dim)
    }
}

/// Scales `v` to unit length (leaves the zero vector alone).
pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// A unit vector stored as `i8` (scale 127): a quarter of the memory of `f32`, and the
/// rounding error (≤ 0.4% per coordinate) is far below the distances that matter.
pub type Quantized = Vec<i8>;

/// Quantises a unit vector.
pub fn quantize(v: &[f32]) -> Quantized {
    v.iter()
        .map(|x| (x * 127.0).round().clamp(-127.0, 127.0) as i8)
        .collect()
}

/// Cosine similarity of two quantised unit vectors.
#[inline]
pub fn cosine_q(a: &[i8], b: &[i8]) -> f32 {
    let dot: i32 = a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum();
    dot as f32 / (127.0 * 127.0)
}

/// Euclidean distance between two quantised unit vectors, via `|a-b|² = 2 - 2cos`;
/// in [0, 2].
#[inline]
pub fn distance_q(a: &[i8], b: &[i8]) -> f32 {
    (2.0 - 2.0 * cosine_q(a, b)).max(0.0).sqrt()
}

/// Mean RBF kernel value over distinct pairs of a sample (the `k(y, y')` term of
/// MMD²); for a fixed reference it is computed once.
pub fn mean_self_kernel(y: &[&[i8]], bandwidth: f32) -> Option<f64> {
    let n = y.len();
    if n < 2 {
        return None;
    }
    let g = 1.0 / (2.0 * bandwidth * bandwidth);
    let mut s = 0.0;
    for i in 0..n {
        for j in (i + 1)..n {
            s += rbf(y[i], y[j], g);
        }
    }
    Some(2.0 * s / (n * (n - 1)) as f64)
}

#[inline]
fn rbf(a: &[i8], b: &[i8], g: f32) -> f64 {
    let d2 = (2.0 - 2.0 * cosine_q(a, b)).max(0.0);
    (-d2 * g).exp() as f64
}

/// Unbiased MMD² between samples `x` and `y` with the RBF kernel
/// `k(a,b) = exp(-|a-b|² / (2 h²))` (Gretton et al. 2012). Near 0 when both come from
/// the same distribution; `None` when either side has fewer than two vectors.
/// `kyy` may pass the precomputed [`mean_self_kernel`] of `y`.
pub fn mmd2_rbf(x: &[&[i8]], y: &[&[i8]], bandwidth: f32, kyy: Option<f64>) -> Option<f64> {
    let (m, n) = (x.len(), y.len());
    if m < 2 || n < 2 {
        return None;
    }
    let g = 1.0 / (2.0 * bandwidth * bandwidth);
    let kxx = mean_self_kernel(x, bandwidth)?;
    let kyy = match kyy {
        Some(k) => k,
        None => mean_self_kernel(y, bandwidth)?,
    };
    let mut kxy = 0.0;
    for a in x {
        for b in y {
            kxy += rbf(a, b, g);
        }
    }
    Some(kxx + kyy - 2.0 * kxy / (m * n) as f64)
}

/// The median pairwise distance of a sample: the usual RBF bandwidth heuristic.
pub fn median_distance(x: &[&[i8]]) -> f32 {
    let mut d = Vec::new();
    for i in 0..x.len() {
        for j in (i + 1)..x.len() {
            d.push(distance_q(x[i], x[j]));
        }
    }
    if d.is_empty() {
        return 1.0;
    }
    d.sort_by(|a, b| a.total_cmp(b));
    d[d.len() / 2].max(1e-3)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(t: &str) -> Quantized {
        let emb = HashedEmbedder::default();
        let mut v = vec![0.0; emb.dim()];
        emb.embed(t, &mut v);
        quantize(&v)
    }

    #[test]
    fn paraphrases_are_closer_than_unrelated_prompts() {
        let a =
            e("Natalia sold clips to 48 of her friends in April, and then half as many in May.");
        let b = e(
            "In April Natalia sold clips to 48 friends, then she sold half as many clips in May.",
        );
        let c = e("Write a haiku about the ocean at night.");
        assert!(distance_q(&a, &b) < 0.9, "{}", distance_q(&a, &b));
        assert!(distance_q(&a, &c) > 1.2, "{}", distance_q(&a, &c));
        assert!(distance_q(&a, &a) < 0.02);
    }

    #[test]
    fn mmd_separates_distributions() {
        let math: Vec<Quantized> = (0..20)
            .map(|i| {
                e(&format!(
                    "How many apples does Tom have if he buys {i} boxes of apples"
                ))
            })
            .collect();
        let math2: Vec<Quantized> = (20..40)
            .map(|i| {
                e(&format!(
                    "How many apples does Tom have if he buys {i} boxes of apples"
                ))
            })
            .collect();
        let poems: Vec<Quantized> = (0..20)
            .map(|i| {
                e(&format!(
                    "Write a poem about the colour number {i} and the sea"
                ))
            })
            .collect();
        fn r(v: &[Quantized]) -> Vec<&[i8]> {
            v.iter().map(|x| x.as_slice()).collect()
        }
        let h = median_distance(&r(&math));
        let same = mmd2_rbf(&r(&math), &r(&math2), h, None).unwrap();
        let diff = mmd2_rbf(&r(&math), &r(&poems), h, None).unwrap();
        assert!(diff > same + 0.1, "same {same} diff {diff}");
    }
}
