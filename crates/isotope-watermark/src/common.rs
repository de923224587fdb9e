//! Tuples that are common in human text, left out of detection.
//!
//! **Why.** Deduplication makes the p-value exact *over random keys*. A provider,
//! though, runs one key for years, and some (window, token) tuples occur in many human
//! texts (`" = $"` followed by a digit, `"How many"`, …): under one fixed key such a
//! tuple carries the same keyed value in every text that contains it, so the texts'
//! p-values are correlated and, for an unlucky key, more than `α` of human texts can
//! fall below `α`. Not scoring the tuples that are common in a reference corpus of
//! human text removes most of that sharing.
//!
//! **Why the p-value stays valid.** The list is built from public human text without
//! any key, and fixed before the tested text is seen. Which tuples of a text get scored
//! then depends on the text and the list — not on the keyed values of the tuples — so,
//! conditional on the set of scored tuples, their keyed values are still independent
//! draws from the null law (distinct inputs to a PRF), and the tail probability
//! computed over them is still exact under "the text does not depend on the key".
//! Leaving out tuples is choosing which coins to look at before they are flipped.
//! MinHash is the one scheme whose tuple identity depends on the key: its seed is the
//! window token with the smallest keyed hash (domain `kgw-min-token`), and the list
//! is consulted for that token's pair. The choice then depends on the key only through
//! the `kgw-min-token` hashes, which are independent of the values scored (domain
//! `kgw-min`), so the same argument holds conditionally on them. The list costs power
//! only: watermarked text loses the signal of its common tuples.
//!
//! **Identity.** A tuple's key-independent identity depends on the scheme's window
//! ([`TupleShape`]): the `h` tokens before the position and the token (LeftHash,
//! SelfHash, Gumbel, SynthID), the MinHash anchor token and the token, or the token
//! alone (Unigram). Identities are 32-bit hashes; a collision only leaves out one more
//! tuple, which the argument above allows.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use crate::scheme::{Scheme, Seeding};

/// The key-independent identity of a scheme's scored tuples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TupleShape {
    /// The `h` tokens before the position, in order, and the token.
    Window(usize),
    /// One of the `h` tokens before the position (MinHash's anchor) and the token.
    MinPair(usize),
    /// The token alone (Unigram).
    Token,
}

impl TupleShape {
    /// The shape of `scheme`'s tuples.
    pub fn of(scheme: &Scheme) -> Self {
        match *scheme {
            Scheme::Kgw {
                seeding: Seeding::Min,
                context,
                ..
            } => TupleShape::MinPair(context),
            Scheme::Unigram { .. } => TupleShape::Token,
            _ => TupleShape::Window(scheme.context()),
        }
    }

    fn tag(self) -> u64 {
        match self {
            TupleShape::Window(h) => 0x1_0000 | h as u64,
            TupleShape::MinPair(h) => 0x2_0000 | h as u64,
            TupleShape::Token => 0x3_0000,
        }
    }

    /// Every identity of the tuple at `pos` that the list must hold for this shape to
    /// cover it (MinPair: the pair with each window token, as the key picks one).
    fn identities(self, tokens: &[u32], pos: usize, out: &mut Vec<u32>) {
        let token = tokens[pos];
        match self {
            TupleShape::Window(h) => out.push(tuple_id(self, &tokens[pos - h..pos], token)),
            TupleShape::MinPair(h) => out.extend(
                tokens[pos - h..pos]
                    .iter()
                    .map(|&a| tuple_id(self, &[a], token)),
            ),
            TupleShape::Token => out.push(tuple_id(self, &[], token)),
        }
    }

    fn context(self) -> usize {
        match self {
            TupleShape::Window(h) | TupleShape::MinPair(h) => h,
            TupleShape::Token => 0,
        }
    }
}

impl fmt::Display for TupleShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TupleShape::Window(h) => write!(f, "window:{h}"),
            TupleShape::MinPair(h) => write!(f, "min:{h}"),
            TupleShape::Token => write!(f, "token"),
        }
    }
}

impl std::str::FromStr for TupleShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |v: &str| v.parse::<usize>().map_err(|_| format!("bad shape `{s}`"));
        match s.split_once(':') {
            Some(("window", h)) => Ok(TupleShape::Window(num(h)?)),
            Some(("min", h)) => Ok(TupleShape::MinPair(num(h)?)),
            None if s == "token" => Ok(TupleShape::Token),
            _ => Err(format!("bad shape `{s}`")),
        }
    }
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser: stable, fast, well mixed (the identity is public).
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 32-bit key-independent identity of (`context`, `token`) for `shape`.
pub(crate) fn tuple_id(shape: TupleShape, context: &[u32], token: u32) -> u32 {
    let mut h = mix(0x6973_6f74_6f70_6531 ^ shape.tag());
    for &t in context {
        h = mix(h ^ u64::from(t));
    }
    h = mix(h ^ u64::from(token) ^ (1 << 40));
    (h >> 32) as u32
}

/// Hashes are already uniform: a set of them needs no further hashing.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v) | (u64::from(v) << 32);
    }
}

type IdSet = HashSet<u32, BuildHasherDefault<IdentityHasher>>;

/// A fixed, key-independent list of tuples never scored (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct CommonTuples {
    meta: CommonMeta,
    ids: Vec<u32>,
    set: IdSetWrapper,
}

/// What a [`CommonTuples`] list was built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommonMeta {
    /// Fingerprint of the tokenizer whose token ids the list holds.
    pub tokenizer: String,
    /// Shapes covered.
    pub shapes: Vec<TupleShape>,
    /// A tuple is common if it occurs in at least this many reference texts.
    pub min_texts: u32,
    /// Reference texts the list was built from.
    pub reference_texts: u32,
    /// Free-form description of the reference corpus.
    pub source: String,
}

#[derive(Clone, Default)]
struct IdSetWrapper(IdSet);

impl fmt::Debug for IdSetWrapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ids", self.0.len())
    }
}

impl PartialEq for IdSetWrapper {
    fn eq(&self, _: &Self) -> bool {
        true // equal iff `ids` are, compared alongside
    }
}

/// A malformed common-tuples file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid common-tuples list: {0}")]
pub struct CommonTuplesError(pub String);

const MAGIC: &str = "isotope-common-tuples 1";

impl CommonTuples {
    fn from_ids(meta: CommonMeta, mut ids: Vec<u32>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        let set = IdSetWrapper(ids.iter().copied().collect());
        Self { meta, ids, set }
    }

    /// What the list was built from.
    pub fn meta(&self) -> &CommonMeta {
        &self.meta
    }

    /// Identities in the list.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True if the list is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether the list was built for `shape` (else it filters nothing for it).
    pub fn covers(&self, shape: TupleShape) -> bool {
        self.meta.shapes.contains(&shape)
    }

    pub(crate) fn contains(&self, id: u32) -> bool {
        self.set.0.contains(&id)
    }

    /// Serialise: a text header (`key=value` lines, a blank line), then the sorted
    /// identities as LEB128 varints of their successive differences (~2 bytes each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let m = &self.meta;
        let shapes: Vec<String> = m.shapes.iter().map(ToString::to_string).collect();
        let mut out = format!(
            "{MAGIC}\ntokenizer={}\nshapes={}\nmin_texts={}\nreference_texts={}\nsource={}\ncount={}\n\n",
            m.tokenizer,
            shapes.join(","),
            m.min_texts,
            m.reference_texts,
            m.source.replace('\n', " "),
            self.ids.len()
        )
        .into_bytes();
        let mut prev = 0u32;
        for &id in &self.ids {
            let mut d = id - prev;
            prev = id;
            loop {
                let b = (d & 0x7f) as u8;
                d >>= 7;
                if d == 0 {
                    out.push(b);
                    break;
                }
                out.push(b | 0x80);
            }
        }
        out
    }

    /// Parse what [`CommonTuples::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CommonTuplesError> {
        let err = |m: &str| CommonTuplesError(m.to_owned());
        let end = bytes
            .windows(2)
            .position(|w| w == b"\n\n")
            .ok_or_else(|| err("no header"))?;
        let header = std::str::from_utf8(&bytes[..end]).map_err(|_| err("header not UTF-8"))?;
        let mut lines = header.lines();
        if lines.next() != Some(MAGIC) {
            return Err(err("not an isotope common-tuples file (bad magic)"));
        }
        let mut fields = HashMap::new();
        for l in lines {
            let (k, v) = l.split_once('=').ok_or_else(|| err("bad header line"))?;
            fields.insert(k, v);
        }
        let get = |k: &str| {
            fields
                .get(k)
                .copied()
                .ok_or_else(|| err(&format!("no {k}")))
        };
        let num = |k: &str| get(k)?.parse::<u64>().map_err(|_| err(&format!("bad {k}")));
        let shapes = get("shapes")?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<TupleShape>().map_err(|e| err(&e)))
            .collect::<Result<Vec<_>, _>>()?;
        let meta = CommonMeta {
            tokenizer: get("tokenizer")?.to_owned(),
            shapes,
            min_texts: num("min_texts")? as u32,
            reference_texts: num("reference_texts")? as u32,
            source: get("source")?.to_owned(),
        };
        let count = num("count")? as usize;
        let mut ids = Vec::with_capacity(count);
        let (mut prev, mut d, mut shift) = (0u64, 0u64, 0u32);
        for &b in &bytes[end + 2..] {
            if shift > 28 {
                return Err(err("varint too long"));
            }
            d |= u64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                prev += d;
                if prev > u64::from(u32::MAX) {
                    return Err(err("identity out of range"));
                }
                ids.push(prev as u32);
                (d, shift) = (0, 0);
            }
        }
        if shift != 0 || ids.len() != count {
            return Err(err("truncated"));
        }
        Ok(Self::from_ids(meta, ids))
    }
}

/// Counts, per tuple identity, the reference texts it occurs in.
pub struct CommonTuplesBuilder {
    shapes: Vec<TupleShape>,
    excluded: Vec<bool>,
    counts: HashMap<u32, u32, BuildHasherDefault<IdentityHasher>>,
    texts: u32,
}

impl CommonTuplesBuilder {
    /// A builder for `shapes`; `excluded` marks control tokens (never scored, so never
    /// listed).
    pub fn new(shapes: Vec<TupleShape>, excluded: &[bool]) -> Self {
        Self {
            shapes,
            excluded: excluded.to_vec(),
            counts: HashMap::default(),
            texts: 0,
        }
    }

    /// Count the distinct tuples of one reference text.
    pub fn add_text(&mut self, tokens: &[u32]) {
        let mut ids = Vec::new();
        for &shape in &self.shapes {
            for pos in shape.context()..tokens.len() {
                if self
                    .excluded
                    .get(tokens[pos] as usize)
                    .copied()
                    .unwrap_or(false)
                {
                    continue;
                }
                shape.identities(tokens, pos, &mut ids);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            *self.counts.entry(id).or_default() += 1;
        }
        self.texts += 1;
    }

    /// The tuples found in at least `min_texts` of the texts added.
    pub fn finish(self, min_texts: u32, tokenizer: &str, source: &str) -> CommonTuples {
        let ids = self
            .counts
            .into_iter()
            .filter(|&(_, c)| c >= min_texts)
            .map(|(id, _)| id)
            .collect();
        CommonTuples::from_ids(
            CommonMeta {
                tokenizer: tokenizer.to_owned(),
                shapes: self.shapes,
                min_texts,
                reference_texts: self.texts,
                source: source.to_owned(),
            },
            ids,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn built() -> CommonTuples {
        let mut b = CommonTuplesBuilder::new(
            vec![
                TupleShape::Window(2),
                TupleShape::MinPair(2),
                TupleShape::Token,
            ],
            &[false; 10],
        );
        b.add_text(&[1, 2, 3, 4]);
        b.add_text(&[1, 2, 3, 5]);
        b.add_text(&[9, 2, 3, 5, 5]);
        b.finish(2, "tok", "test")
    }

    #[test]
    fn counts_texts_not_occurrences() {
        let c = built();
        let w = TupleShape::Window(2);
        assert!(c.contains(tuple_id(w, &[1, 2], 3)));
        assert!(!c.contains(tuple_id(w, &[2, 3], 4)));
        // (3, 5) after window (2, 3) is in two texts; (5, 5) repeats in one only.
        assert!(c.contains(tuple_id(w, &[2, 3], 5)));
        assert!(!c.contains(tuple_id(w, &[3, 5], 5)));
        let t = TupleShape::Token;
        assert!(c.contains(tuple_id(t, &[], 3)));
        assert!(!c.contains(tuple_id(t, &[], 4)));
        let m = TupleShape::MinPair(2);
        assert!(c.contains(tuple_id(m, &[1], 3)));
        assert!(c.contains(tuple_id(m, &[2], 3)));
        assert!(!c.contains(tuple_id(m, &[9], 3)));
    }

    #[test]
    fn control_tokens_are_never_listed() {
        let mut b = CommonTuplesBuilder::new(vec![TupleShape::Token], &[false, true]);
        for _ in 0..3 {
            b.add_text(&[0, 1]);
        }
        let c = b.finish(1, "tok", "test");
        assert!(c.contains(tuple_id(TupleShape::Token, &[], 0)));
        assert!(!c.contains(tuple_id(TupleShape::Token, &[], 1)));
    }

    #[test]
    fn bytes_round_trip_and_errors_are_clear() {
        let c = built();
        let bytes = c.to_bytes();
        let back = CommonTuples::from_bytes(&bytes).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.meta().min_texts, 2);
        assert!(back.covers(TupleShape::MinPair(2)));
        assert!(!back.covers(TupleShape::Window(4)));
        for id in &c.ids {
            assert!(back.contains(*id));
        }
        assert!(CommonTuples::from_bytes(b"hello").is_err());
        assert!(CommonTuples::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        let mut bad = bytes.clone();
        bad[0] = b'X';
        let e = CommonTuples::from_bytes(&bad).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
    }
}
