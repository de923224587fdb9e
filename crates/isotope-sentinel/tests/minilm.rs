//! all-MiniLM-L6-v2 through candle against sentence-transformers itself: the reference
//! numbers below were printed by `scripts/minilm_reference.py` (sentence-transformers
//! 6.3.0, torch 2.15.0, CPU) from the same model files
//! `scripts/setup.sh` unpacks. Needs the model: run `scripts/setup.sh` first (or set
//! ISOTOPE_MINILM_DIR).

use std::path::PathBuf;
use std::sync::Arc;

use isotope_sentinel::{embedder_for, Embedder, HashedEmbedder, MiniLmEmbedder, Model};

fn dir() -> PathBuf {
    let d = std::env::var_os("ISOTOPE_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2")
        });
    assert!(
        d.join("model.safetensors").exists(),
        "{} is missing: run scripts/setup.sh (or set ISOTOPE_MINILM_DIR)",
        d.display()
    );
    d
}

const TEXTS: [&str; 6] = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Write a haiku about the ocean at night.",
    "Compose a short Japanese-style poem describing the sea after dark.",
    "Ünïcödé — naïve café résumé: 東京タワー!",
    "x",
];

fn long_text() -> String {
    ["The quick brown fox jumps over the lazy dog while counting sheep."; 30].join(" ")
}

/// First 8 coordinates of each text's unit vector (TEXTS, then the long text).
const FIRST8: [[f32; 8]; 7] = [
    [
        -0.010961, -0.055319, 0.052292, -0.011726, -0.055486, 0.050244, 0.063477, 0.057595,
    ],
    [
        -0.015883, -0.069068, 0.050667, -0.014784, 0.017033, 0.062594, 0.033007, 0.021374,
    ],
    [
        -0.011819, -0.002256, 0.055412, 0.004523, 0.014636, -0.025490, 0.056804, -0.076047,
    ],
    [
        -0.027343, 0.061713, 0.090257, 0.050588, -0.024339, -0.028091, 0.060907, -0.042159,
    ],
    [
        -0.033218, 0.024318, 0.044531, -0.056135, -0.061597, 0.042525, 0.068749, -0.045968,
    ],
    [
        -0.097910, -0.064001, -0.023181, -0.046197, 0.021700, -0.028492, 0.154854, 0.054404,
    ],
    [
        0.072135, -0.052745, 0.051530, 0.033907, -0.053165, 0.019270, 0.013354, -0.065315,
    ],
];

/// Cosines of pairs (indices as in FIRST8).
const COSINES: [(usize, usize, f32); 5] = [
    (0, 1, 0.831117),
    (2, 3, 0.720841),
    (0, 2, -0.112106),
    (4, 5, 0.268826),
    (3, 6, 0.014173),
];

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn matches_sentence_transformers() {
    let m = MiniLmEmbedder::load(&dir()).expect("load");
    let long = long_text();
    let mut texts: Vec<&str> = TEXTS.to_vec();
    texts.push(&long);
    // one padded batch of very different lengths (7 to 256 tokens)
    let batch = m.embed_batch(&texts).unwrap();
    for (i, (v, want)) in batch.iter().zip(FIRST8).enumerate() {
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "text {i}: norm {norm}");
        for (k, (x, w)) in v.iter().zip(want).enumerate() {
            assert!((x - w).abs() < 2e-4, "text {i} coordinate {k}: {x} vs {w}");
        }
    }
    for (i, j, want) in COSINES {
        let c = cos(&batch[i], &batch[j]);
        assert!(
            (c - want).abs() < 1e-3,
            "cos({i},{j}) = {c}, reference {want}"
        );
    }
    // each text alone gives its batched vector: padding is masked out
    for (t, v) in texts.iter().zip(&batch) {
        let alone = m.embed_batch(&[t]).unwrap();
        assert!(cos(&alone[0], v) > 0.99999, "{t:?}");
    }
}

#[test]
fn embed_is_the_cached_quantised_vector_and_paraphrases_are_close() {
    let m = MiniLmEmbedder::load(&dir()).expect("load");
    let exact = m.embed_batch(&[TEXTS[2]]).unwrap().remove(0);
    let mut cold = vec![0.0; m.dim()];
    m.embed(TEXTS[2], &mut cold);
    let mut warm = vec![0.0; m.dim()];
    m.embed(TEXTS[2], &mut warm);
    assert_eq!(cold, warm, "same text, same vector, cached or not");
    for (a, b) in cold.iter().zip(&exact) {
        assert!((a - b).abs() <= 0.5 / 127.0 + 1e-6, "{a} vs {b}");
    }
    // prepared in a batch = embedded alone
    let fresh = MiniLmEmbedder::load(&dir()).expect("load");
    let done = std::sync::atomic::AtomicUsize::new(0);
    fresh.prepare(&TEXTS, &|n| {
        done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(done.into_inner(), TEXTS.len());
    let mut prepared = vec![0.0; m.dim()];
    fresh.embed(TEXTS[2], &mut prepared);
    assert_eq!(prepared, cold);
    // an empty text is the zero vector, as with the hashed embedder
    let mut z = vec![1.0; m.dim()];
    m.embed("   ", &mut z);
    assert!(z.iter().all(|&x| x == 0.0));
    // a paraphrase with no content word in common is close for MiniLM, far for
    // n-gram hashing: what MiniLM is for
    let mut a = vec![0.0; m.dim()];
    let mut b = vec![0.0; m.dim()];
    m.embed(TEXTS[2], &mut a);
    m.embed(TEXTS[3], &mut b);
    let h = HashedEmbedder::default();
    let (mut ha, mut hb) = (vec![0.0; h.dim()], vec![0.0; h.dim()]);
    h.embed(TEXTS[2], &mut ha);
    h.embed(TEXTS[3], &mut hb);
    assert!(cos(&a, &b) > 0.5, "minilm {}", cos(&a, &b));
    assert!(cos(&ha, &hb) < 0.3, "hashed {}", cos(&ha, &hb));
    assert!(
        m.name().starts_with("all-minilm-l6-v2:sha256="),
        "{}",
        m.name()
    );
    // replays batch MiniLM's prompts first; the hashed embedder needs nothing
    assert!(m.wants_prepare() && !h.wants_prepare());
}

#[test]
fn a_model_only_gets_the_embedder_it_was_trained_with() {
    let d = dir();
    let minilm = MiniLmEmbedder::load(&d).unwrap();
    let reference = isotope_sentinel::features::Reference::new(Vec::new());
    let m = Model::untrained(minilm.name(), reference.clone());
    let e = embedder_for(&m, &d).unwrap();
    assert_eq!(e.name(), minilm.name());
    // other weights (another digest) are refused with a message that says what to do
    let other = Model::untrained("all-minilm-l6-v2:sha256=0000000000000000".into(), reference);
    let err = embedder_for(&other, &d).err().expect("refused");
    assert!(err.contains("retrain"), "{err}");
    let cfg =
        isotope_sentinel::SentinelConfig::new(Arc::new(other), Arc::new(HashedEmbedder::default()));
    assert!(cfg.is_err());
}
