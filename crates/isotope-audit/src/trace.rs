//! Provenance (`isotope trace`): did we serve this text, to whom, when?
//!
//! A text found in the wild is looked up three ways in the usage log, and the
//! caller adds the watermark test (one signal from the text alone, one from our log):
//!
//! 1. **exact**: SHA-256 of the text (as is, and trimmed) against the completion hash
//!    every usage event keeps — the only lookup that still works when the server stores
//!    hashes only (`store_texts = false`) or texts were purged by retention;
//! 2. **near-duplicate**: a MinHash signature of the text's word shingles, its LSH
//!    band keys looked up in a persistent index of the stored completions
//!    ([`index_pending`] fills it incrementally from events not yet indexed);
//! 3. **verification**: every candidate is re-scored by exact Jaccard similarity and
//!    containment of the shingle sets (from the stored completion text; from the
//!    signatures' agreement — an estimate — when only the signature is left).
//!
//! # Shingles and the LSH S-curve
//!
//! Words are maximal runs of alphanumeric characters, lower-cased; shingles are
//! [`SHINGLE_WORDS`]-word windows (a text shorter than that is one shingle). Changing
//! one word breaks at most `w` shingles, so a 150-word completion with 3 words
//! changed keeps Jaccard ≈ (147 − 12)/(147 + 12) ≈ 0.85 at w = 4; unrelated answers of
//! the same model share almost no 4-word windows (J ≈ 0.0–0.05).
//!
//! The signature has [`MINHASH_K`] = 128 minima; the index splits it into
//! [`LSH_BANDS`] = 32 bands of [`LSH_ROWS`] = 4 rows. Two texts with Jaccard `s` agree
//! on one row with probability `s`, on a whole band with `s^4`, and become
//! candidates (share ≥ 1 band) with probability
//!
//! ```text
//! P(s) = 1 − (1 − s^r)^b,   r = 4, b = 32:
//!   s = 0.1 → 0.003,  0.2 → 0.05,  0.3 → 0.23,  0.4 → 0.58,
//!   s = 0.5 → 0.87,   0.6 → 0.985, 0.7 → 0.9995, 0.8 → ≈1
//! ```
//!
//! The S-curve's steepest point is near (1/b)^(1/r) ≈ 0.42. Matches are reported from
//! [`DEFAULT_MIN_SIMILARITY`] = 0.5 (recall ≥ 0.87 there, ≥ 0.985 from 0.6), or when
//! ≥ [`DEFAULT_MIN_CONTAINMENT`] of the query's shingles lie in one served text (a
//! fragment: flagged `partial`). A fragment much shorter than half of the served text
//! has low Jaccard and may not become a candidate at all — the watermark test still
//! covers it. The parameters are recorded in the store's settings under
//! [`SETTING`]; an index built with other parameters is refused, not silently mixed.

use std::collections::{HashMap, HashSet};

use isotope_store::{Store, TraceEntry, UsageEvent};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Words per shingle.
pub const SHINGLE_WORDS: usize = 4;
/// MinHash functions per signature.
pub const MINHASH_K: usize = 128;
/// Rows per LSH band.
pub const LSH_ROWS: usize = 4;
/// LSH bands per signature.
pub const LSH_BANDS: usize = MINHASH_K / LSH_ROWS;
/// Smallest Jaccard similarity reported as a match.
pub const DEFAULT_MIN_SIMILARITY: f64 = 0.5;
/// Smallest containment (share of the query's shingles in a served text) reported as
/// a (partial) match.
pub const DEFAULT_MIN_CONTAINMENT: f64 = 0.8;
/// Settings key holding the index parameters.
pub const SETTING: &str = "trace.minhash";
/// Candidates fetched per query at most (most shared bands first).
pub const MAX_CANDIDATES: u32 = 2_000;

/// The index parameters as recorded in the store.
pub fn parameters() -> String {
    format!(
        "v1:words={SHINGLE_WORDS},k={MINHASH_K},rows={LSH_ROWS},bands={LSH_BANDS},hash=fnv1a-splitmix64"
    )
}

/// Errors of the trace index.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error(transparent)]
    Store(#[from] isotope_store::StoreError),
    #[error(
        "the trace index in this store was built with other parameters ({found}; this isotope \
         uses {wanted})"
    )]
    Parameters { found: String, wanted: String },
}

/// A MinHash signature.
pub type Signature = [u32; MINHASH_K];

/// SplitMix64's finaliser: a cheap, well-mixing bijection on `u64`.
#[inline]
fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The normalised words of `text`: maximal alphanumeric runs, lower-cased, so
/// punctuation, spacing and case edits do not break shingles.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The distinct shingle hashes of `text` (a fixed, portable hash: FNV-1a over the
/// words with a separator, then SplitMix64 — persisted signatures must not depend on
/// std's hasher or the Rust version).
pub fn shingles(text: &str) -> HashSet<u64> {
    let w = words(text);
    let hash = |ws: &[String]| {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for word in ws {
            for &b in word.as_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h ^= 0xff;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        mix64(h)
    };
    if w.is_empty() {
        return HashSet::new();
    }
    if w.len() < SHINGLE_WORDS {
        return HashSet::from([hash(&w)]);
    }
    w.windows(SHINGLE_WORDS).map(hash).collect()
}

/// MinHash of a shingle set; `None` when it is empty.
pub fn signature(shingles: &HashSet<u64>) -> Option<Signature> {
    if shingles.is_empty() {
        return None;
    }
    let mut sig = [u32::MAX; MINHASH_K];
    for &s in shingles {
        for (i, slot) in sig.iter_mut().enumerate() {
            let v = (mix64(s ^ (i as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407)) >> 32) as u32;
            if v < *slot {
                *slot = v;
            }
        }
    }
    Some(sig)
}

/// LSH bucket keys, one per band: equal keys ⇔ (up to 64-bit collisions) equal rows
/// in that band. The band index is mixed in, so equal rows in different bands differ.
pub fn buckets(sig: &Signature) -> Vec<i64> {
    (0..LSH_BANDS)
        .map(|b| {
            let mut h = mix64(b as u64 ^ 0x5452_4143_4500_0000);
            for r in 0..LSH_ROWS {
                h = mix64(h ^ u64::from(sig[b * LSH_ROWS + r]));
            }
            h as i64
        })
        .collect()
}

/// Share of agreeing minima: an unbiased estimate of the Jaccard similarity.
pub fn estimate(a: &Signature, b: &Signature) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / MINHASH_K as f64
}

/// `|a ∩ b| / |a ∪ b|` (0 for two empty sets).
pub fn jaccard(a: &HashSet<u64>, b: &HashSet<u64>) -> f64 {
    let inter = a.intersection(b).count();
    let union = a.len() + b.len() - inter;
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

/// `|query ∩ served| / |query|`: how much of the query lies in the served text.
pub fn containment(query: &HashSet<u64>, served: &HashSet<u64>) -> f64 {
    if query.is_empty() {
        return 0.0;
    }
    query.intersection(served).count() as f64 / query.len() as f64
}

/// Little-endian bytes of a signature, as stored.
pub fn encode(sig: &Signature) -> Vec<u8> {
    sig.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The inverse of [`encode`]; `None` for bytes of the wrong length.
pub fn decode(bytes: &[u8]) -> Option<Signature> {
    if bytes.len() != MINHASH_K * 4 {
        return None;
    }
    let mut sig = [0u32; MINHASH_K];
    for (slot, c) in sig.iter_mut().zip(bytes.chunks_exact(4)) {
        *slot = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Some(sig)
}

/// Hex SHA-256, as the server hashes completions.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The completions of one event: one text, or — when the request asked for `n > 1`
/// — the choices, which the server stores as a JSON array of strings.
pub fn choices(e: &UsageEvent) -> Vec<String> {
    let Some(text) = &e.completion_text else {
        return Vec::new();
    };
    if e.n > 1 {
        if let Ok(v) = serde_json::from_str::<Vec<String>>(text) {
            return v;
        }
    }
    vec![text.clone()]
}

/// The index entries of one event (one per choice; one without signature when
/// there is no text to index).
pub fn entries_of(e: &UsageEvent) -> Vec<TraceEntry> {
    let mut out: Vec<TraceEntry> = choices(e)
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            let sh = shingles(text);
            let sig = signature(&sh)?;
            Some(TraceEntry {
                event_id: e.id,
                choice: i as u32,
                shingles: sh.len().min(u32::MAX as usize) as u32,
                signature: Some(encode(&sig)),
                buckets: buckets(&sig),
            })
        })
        .collect();
    if out.is_empty() {
        out.push(TraceEntry {
            event_id: e.id,
            choice: 0,
            shingles: 0,
            signature: None,
            buckets: Vec::new(),
        });
    }
    out
}

/// Checks (and on first use records) the index parameters.
pub async fn check_parameters(store: &dyn Store) -> Result<(), TraceError> {
    let wanted = parameters();
    match store.get_setting(SETTING).await? {
        Some(found) if found != wanted => Err(TraceError::Parameters { found, wanted }),
        Some(_) => Ok(()),
        None => Ok(store.set_setting(SETTING, &wanted).await?),
    }
}

/// How far indexing got.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct IndexProgress {
    /// Events indexed by this call.
    pub indexed: u64,
    /// Events in the index now.
    pub total_indexed: u64,
    /// Usage events in the store.
    pub events: u64,
}

/// Indexes every usage event not in the index yet, `batch` events per transaction, so
/// an interrupted run keeps what it committed and the next run continues from there.
/// `progress` is called after every batch.
pub async fn index_pending(
    store: &dyn Store,
    batch: u32,
    progress: &mut (dyn FnMut(&IndexProgress) + Send),
) -> Result<IndexProgress, TraceError> {
    check_parameters(store).await?;
    let mut p = IndexProgress {
        indexed: 0,
        total_indexed: store.count_trace_indexed().await?,
        events: store.count_usage_events().await?,
    };
    progress(&p);
    loop {
        let events = store.trace_unindexed_events(batch.max(1)).await?;
        if events.is_empty() {
            break;
        }
        let entries: Vec<TraceEntry> = events.iter().flat_map(entries_of).collect();
        store.insert_trace_entries(&entries).await?;
        p.indexed += events.len() as u64;
        p.total_indexed += events.len() as u64;
        p.events = p.events.max(p.total_indexed);
        progress(&p);
    }
    Ok(p)
}

/// How a served completion matched a query text.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TraceMatch {
    pub event_id: i64,
    pub request_id: String,
    /// Choice index within the event (`n > 1`).
    pub choice: u32,
    pub account_id: i64,
    /// Filled by the caller when it knows account names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    pub api_key_id: String,
    pub created_at_ms: i64,
    pub endpoint: String,
    /// Jaccard similarity of the shingle sets (1 for an exact match).
    pub similarity: f64,
    /// Share of the query's shingles found in the served text.
    pub containment: f64,
    /// The query's text hashes to this completion's stored hash.
    pub exact: bool,
    /// Similarity from the signatures only (the stored text is gone: hashes-only store
    /// or retention purge).
    pub estimated: bool,
    /// The query is a fragment of the served text (containment high, similarity below
    /// the threshold).
    pub partial: bool,
    /// The served response itself was cut short (the client disconnected).
    pub event_partial: bool,
}

/// What to report.
#[derive(Clone, Copy, Debug)]
pub struct MatchOptions {
    pub min_similarity: f64,
    pub min_containment: f64,
    /// Matches kept per query (best first).
    pub top: usize,
}

impl Default for MatchOptions {
    fn default() -> Self {
        Self {
            min_similarity: DEFAULT_MIN_SIMILARITY,
            min_containment: DEFAULT_MIN_CONTAINMENT,
            top: 20,
        }
    }
}

fn to_match(e: &UsageEvent, choice: u32, similarity: f64, containment: f64) -> TraceMatch {
    TraceMatch {
        event_id: e.id,
        request_id: e.request_id.clone(),
        choice,
        account_id: e.account_id,
        account: None,
        api_key_id: e.api_key_id.clone(),
        created_at_ms: e.created_at_ms,
        endpoint: e.endpoint.clone(),
        similarity,
        containment,
        exact: false,
        estimated: false,
        partial: false,
        event_partial: e.partial,
    }
}

/// The served completions matching `text`, best first (exact, then by similarity,
/// then containment, then oldest). Reads the index as it is: call [`index_pending`]
/// first to include the newest events.
pub async fn find(
    store: &dyn Store,
    text: &str,
    opts: &MatchOptions,
) -> Result<Vec<TraceMatch>, TraceError> {
    let mut found: HashMap<(i64, u32), TraceMatch> = HashMap::new();
    // 1. Exact: the text as given and trimmed (files end with a newline).
    let mut hashes = vec![sha256_hex(text)];
    let trimmed = sha256_hex(text.trim());
    if trimmed != hashes[0] {
        hashes.push(trimmed);
    }
    for h in &hashes {
        for e in store.find_completions_by_hash(h).await? {
            let mut m = to_match(&e, 0, 1.0, 1.0);
            m.exact = true;
            found.insert((e.id, 0), m);
        }
    }
    // 2. Candidates from the LSH index.
    let query = shingles(text);
    if let Some(sig) = signature(&query) {
        let cands = store
            .trace_candidates(&buckets(&sig), MAX_CANDIDATES)
            .await?;
        let ids: Vec<i64> = {
            let mut v: Vec<i64> = cands.iter().map(|c| c.event_id).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let events: HashMap<i64, UsageEvent> = store
            .usage_events_by_ids(&ids)
            .await?
            .into_iter()
            .map(|e| (e.id, e))
            .collect();
        for c in &cands {
            if found.contains_key(&(c.event_id, c.choice)) {
                continue;
            }
            let Some(e) = events.get(&c.event_id) else {
                continue;
            };
            // 3. Verify: exact on the stored text when there is one.
            let texts = choices(e);
            let (similarity, containment, estimated) = match texts.get(c.choice as usize) {
                Some(served) => {
                    let s = shingles(served);
                    (jaccard(&query, &s), containment(&query, &s), false)
                }
                None => match c.signature.as_deref().and_then(decode) {
                    Some(stored) => {
                        let j = estimate(&sig, &stored);
                        // Containment from J and the two set sizes:
                        // |A∩B| = J(|A|+|B|)/(1+J).
                        let inter = j * (query.len() as f64 + f64::from(c.shingles)) / (1.0 + j);
                        (j, (inter / query.len() as f64).min(1.0), true)
                    }
                    None => continue,
                },
            };
            if similarity < opts.min_similarity && containment < opts.min_containment {
                continue;
            }
            let mut m = to_match(e, c.choice, similarity, containment);
            m.estimated = estimated;
            m.partial = similarity < opts.min_similarity;
            found.insert((c.event_id, c.choice), m);
        }
    }
    let mut out: Vec<TraceMatch> = found.into_values().collect();
    out.sort_by(|a, b| {
        b.exact
            .cmp(&a.exact)
            .then(b.similarity.total_cmp(&a.similarity))
            .then(b.containment.total_cmp(&a.containment))
            .then(a.event_id.cmp(&b.event_id))
    });
    out.truncate(opts.top.max(1));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TEXT: &str = "The lighthouse keeper climbed the spiral stairs every evening, \
        trimmed the wick, polished the great lens and watched the storm roll in from the \
        west while the gulls wheeled over the rocks below and the fishing boats hurried \
        home before the rain.";

    #[test]
    fn words_ignore_case_and_punctuation() {
        assert_eq!(
            words("Hello, WORLD!  it's 42."),
            ["hello", "world", "it", "s", "42"]
        );
        assert_eq!(shingles("Hello, world"), shingles("hello world"));
        assert_eq!(shingles("").len(), 0);
        assert_eq!(shingles("one two").len(), 1);
        assert_eq!(shingles("a b c d e").len(), 2);
    }

    #[test]
    fn identical_texts_share_every_band_and_unrelated_ones_none() {
        let a = signature(&shingles(TEXT)).unwrap();
        assert_eq!(buckets(&a), buckets(&signature(&shingles(TEXT)).unwrap()));
        assert_eq!(estimate(&a, &a), 1.0);
        let other = signature(&shingles(
            "Natalia sold clips to 48 of her friends in April, and then she sold half as \
             many clips in May. How many clips did Natalia sell altogether?",
        ))
        .unwrap();
        let shared = buckets(&a)
            .iter()
            .filter(|b| buckets(&other).contains(b))
            .count();
        assert_eq!(shared, 0);
        assert!(estimate(&a, &other) < 0.1);
    }

    #[test]
    fn signature_bytes_round_trip_and_wrong_lengths_are_refused() {
        let s = signature(&shingles(TEXT)).unwrap();
        assert_eq!(decode(&encode(&s)), Some(s));
        assert_eq!(decode(&[0u8; 12]), None);
    }

    #[test]
    fn a_lightly_edited_copy_stays_similar() {
        let edited = TEXT
            .replace("spiral", "winding")
            .replace("gulls", "seabirds")
            .replace(" before the rain.", ".");
        let (a, b) = (shingles(TEXT), shingles(&edited));
        let j = jaccard(&a, &b);
        // 42 words, 39 shingles: each substituted word breaks 4, the cut 3 more, so
        // about 28 shared of ~48 in the union (J ≈ 0.6) and ~28/36 of the copy's own.
        assert!(j > 0.55 && j < 0.65, "{j}");
        let c = containment(&b, &a);
        assert!(c > 0.75 && c < 0.85, "{c}");
        // Bands agree with high probability at this similarity.
        let (sa, sb) = (signature(&a).unwrap(), signature(&b).unwrap());
        assert!(buckets(&sa).iter().any(|x| buckets(&sb).contains(x)));
    }

    #[test]
    fn candidate_probability_matches_the_documented_s_curve() {
        let p = |s: f64| 1.0 - (1.0 - s.powi(LSH_ROWS as i32)).powi(LSH_BANDS as i32);
        assert!((p(0.5) - 0.873).abs() < 0.01);
        assert!(p(0.2) < 0.06 && p(0.6) > 0.98);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Jaccard and containment are in [0, 1], symmetric where they should be, 1 on
        /// identical sets; the MinHash estimate is within a loose bound of the truth
        /// (sd ≤ 0.5/√128 ≈ 0.044; 0.25 is > 5 sd).
        #[test]
        fn similarity_laws(
            a in proptest::collection::vec(0u8..40, 1..120),
            b in proptest::collection::vec(0u8..40, 1..120),
        ) {
            let text = |v: &[u8]| v.iter().map(|x| format!("w{x}")).collect::<Vec<_>>().join(" ");
            let (ta, tb) = (text(&a), text(&b));
            let (sa, sb) = (shingles(&ta), shingles(&tb));
            let j = jaccard(&sa, &sb);
            prop_assert!((0.0..=1.0).contains(&j));
            prop_assert_eq!(j, jaccard(&sb, &sa));
            prop_assert_eq!(jaccard(&sa, &sa), 1.0);
            prop_assert_eq!(containment(&sa, &sa), 1.0);
            prop_assert!(containment(&sa, &sb) >= j);
            let (ga, gb) = (signature(&sa).unwrap(), signature(&sb).unwrap());
            prop_assert!((estimate(&ga, &gb) - j).abs() < 0.25, "estimate {} vs {}", estimate(&ga, &gb), j);
            // Equal band keys whenever the band's rows agree, and only then (no 64-bit
            // collisions expected at this size).
            let (ba, bb) = (buckets(&ga), buckets(&gb));
            for band in 0..LSH_BANDS {
                let rows = band * LSH_ROWS..(band + 1) * LSH_ROWS;
                prop_assert_eq!(ga[rows.clone()] == gb[rows], ba[band] == bb[band]);
            }
        }
    }
}
