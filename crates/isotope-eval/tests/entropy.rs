//! Entropy-aware detection (SWEET) on the real SmolLM2 model.
//!
//! - Calibration: a few hundred held-out human texts (GSM8K, Self-Instruct), weights
//!   from the model's own next-token entropies over each text's first [`MAX_TOKENS`]
//!   tokens (positions past them are not scored) under isotope's fixed threshold rule
//!   and under the weighted rule, KGW under 20 fixed keys and under fresh keys: FPR at
//!   1e-2 within its binomial band, randomised p-values uniform under fresh keys. (The full
//!   11k-text calibration of `tests/calibration.rs` is the unmasked detector's; the
//!   mask's validity argument does not depend on the corpus size, and this keeps the
//!   model pass to a minute or two on two cores.)
//! - Power: on watermarked answers, the entropy-aware p-value (threshold and weighted
//!   rules) is lower than the plain detector's on the same tokens.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use isotope_engine::{LoadOptions, Model};
use isotope_eval::{
    batch_entropies, calibrate_with, default_common_path, default_data_dir, evaluate, fixed_keys,
    load_common_tuples, load_human_texts, render, rule_weights, CalibrationOptions, HumanText,
    PowerOptions,
};
use isotope_watermark::{EntropyRule, Scheme, WatermarkKey};

/// Human texts tested (the held-out split, in a fixed pseudo-random order).
const TEXTS: usize = 200;
/// Tokens of each human text read by the model (and so scored).
const MAX_TOKENS: usize = 64;

/// Threads for the model pass (`ISOTOPE_THREADS`, default 2): the test must not take
/// the machine.
fn threads() -> usize {
    std::env::var("ISOTOPE_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2)
}

fn model() -> Model {
    let path = std::env::var_os("ISOTOPE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    Model::load(&path, &LoadOptions::default()).expect("model loads")
}

fn held_out(texts: Vec<HumanText>, n: usize) -> Vec<HumanText> {
    let mut pool: Vec<HumanText> = texts.into_iter().filter(|t| !t.is_reference()).collect();
    // A fixed stride through the corpus mixes sources without an RNG.
    let stride = (pool.len() / n).max(1);
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while out.len() < n && !pool.is_empty() {
        out.push(pool.swap_remove(i % pool.len()));
        i += stride;
    }
    out
}

#[test]
fn entropy_aware_fpr_on_human_text_is_within_band() {
    let model = model();
    let texts = held_out(load_human_texts(default_data_dir()).unwrap(), TEXTS);
    let common = Arc::new(load_common_tuples(&default_common_path(), &model).unwrap());
    let scheme = Scheme::kgw();
    let tokens: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let mut v = model.tokenize(&t.text, false, false);
            v.truncate(MAX_TOKENS);
            v
        })
        .collect();
    let start = Instant::now();
    let batch = batch_entropies(&model, &tokens, &scheme, Some(threads()), || {}).unwrap();
    eprintln!(
        "model pass: {} texts, {} tokens in {:.1} s ({:.0} tok/s)",
        texts.len(),
        batch.tokens,
        start.elapsed().as_secs_f64(),
        batch.tokens as f64 / batch.seconds.max(1e-9),
    );
    // One model pass, both kinds of rule: the threshold mask and the weighted test.
    for rule in [EntropyRule::SPIKE_HALF, EntropyRule::Weighted] {
        let weights: Vec<Vec<u8>> = batch
            .entropies
            .iter()
            .map(|e| rule_weights(&rule, e, &scheme))
            .collect();
        for (t, w) in tokens.iter().zip(&weights) {
            assert_eq!(t.len(), w.len());
        }
        let kept: usize = weights
            .iter()
            .map(|m| m.iter().filter(|&&k| k > 0).count())
            .sum();
        let graded = weights.iter().flatten().filter(|&&w| w > 1).count();
        eprintln!(
            "rule {rule} keeps {:.1}% ({graded} positions weighted above 1)",
            100.0 * kept as f64 / batch.tokens.max(1) as f64
        );
        if rule == EntropyRule::Weighted {
            assert!(graded > 0, "the weighted rule grades positions");
        }
        let opts = CalibrationOptions {
            alphas: vec![1e-2, 1e-3],
            corpora: 15,
            corpus_size: 20,
            repetitive: 20,
            fresh_replicates: 4,
            threads: threads(),
            common: Some(common.clone()),
            weights: Some(Arc::new(weights)),
            ..CalibrationOptions::default()
        };
        let keys = fixed_keys(20);
        let report = calibrate_with(
            &model,
            &texts,
            &keys,
            std::slice::from_ref(&scheme),
            &opts,
            |_, _| {},
        );
        let s = &report.schemes[0];
        let show = |label: &str, t: &isotope_eval::TestSummary| {
            let f = t.at(1e-2).unwrap();
            eprintln!(
                "{rule} {label:<24} tests {:>5}, tuples/test {:>6.1}, FPR@1e-2 {:.4} \
                 [{:.4}, {:.4}]{}, KS p {:.3}",
                t.tests,
                t.mean_scored,
                f.fpr,
                f.ci_low,
                f.ci_high,
                if f.valid { "" } else { " INVALID" },
                t.ks_p
            );
        };
        show("pooled over 20 keys", &s.per_text.pooled);
        show("fresh key per text", &s.fresh_key.per_text);
        show("corpora, pooled", &s.corpus.pooled);
        for k in &s.per_text.per_key {
            let f = k.summary.at(1e-2).unwrap();
            assert!(
                f.valid,
                "{rule}, key {}: FPR@1e-2 {} [{}, {}] above 1e-2",
                k.key_id, f.fpr, f.ci_low, f.ci_high
            );
        }
        assert!(s.per_text.pooled.fpr_valid(), "{rule}: pooled FPR");
        assert!(s.fresh_key.per_text.fpr_valid(), "{rule}: fresh-key FPR");
        assert!(s.corpus.pooled.fpr_valid(), "{rule}: corpus FPR");
        // Fresh keys make every test independent and exactly uniform (randomised, with
        // the weighted statistic's own tail for the weighted rule).
        assert!(
            s.fresh_key.per_text.ks_p > 1e-3,
            "{rule}: fresh-key KS p = {}",
            s.fresh_key.per_text.ks_p
        );
        assert!(s.max_ln_p_mismatch < 1e-9, "{}", s.max_ln_p_mismatch);
        // The rule must leave something to test on most texts.
        assert!(s.per_text.pooled.mean_scored > 10.0);
    }
}

#[test]
fn entropy_aware_p_value_is_lower_on_watermarked_answers() {
    let model = model();
    let texts = load_human_texts(default_data_dir()).unwrap();
    let common = load_common_tuples(&default_common_path(), &model).unwrap();
    let opts = PowerOptions {
        schemes: vec![Scheme::kgw()],
        n: 6,
        max_tokens: 128,
        buckets: vec![128],
        alphas: vec![1e-2, 1e-4],
        temperature: 0.8,
        concurrency: 6,
        threads: Some(threads()),
        robust_tokens: 64,
        crop_tokens: 32,
        common: Some(Arc::new(common)),
        quality: false,
        entropy_rules: vec![EntropyRule::SPIKE_HALF, EntropyRule::Weighted],
        ..PowerOptions::default()
    };
    let key = Arc::new(WatermarkKey::from_bytes([42; 32]));
    let report = evaluate(&model, &texts, key, &opts, &mut |_, _, _| {}).unwrap();
    eprintln!("{}", render(&report));
    let b = &report.schemes[0].buckets[0];
    assert!(
        b.watermarked.tests >= 3,
        "{} reached 128",
        b.watermarked.tests
    );
    assert_eq!(b.entropy_aware.len(), 2);
    for (e, rule) in b.entropy_aware.iter().zip(&opts.entropy_rules) {
        assert_eq!(e.rule, rule.to_string());
        assert_eq!(e.watermarked.tests, b.watermarked.tests);
        assert!(
            e.watermarked.mean_scored < b.watermarked.mean_scored,
            "{rule}: positions of weight 0 are dropped"
        );
        assert!(
            e.watermarked.median_log10_p < b.watermarked.median_log10_p,
            "{rule}: entropy-aware median log10 p {} vs plain {}",
            e.watermarked.median_log10_p,
            b.watermarked.median_log10_p
        );
        assert!(
            e.control.median_p > 1e-2,
            "{rule}: control {}",
            e.control.median_p
        );
    }
    let d = report.entropy_detector.as_ref().expect("speed reported");
    assert!(d.tokens > 0 && d.tokens_per_sec > 0.0);
    let json = serde_json::to_value(&report).unwrap();
    assert!(
        json["schemes"][0]["buckets"][0]["entropy_aware"][0]["watermarked"]["at"][0]["rate"]
            .is_number()
    );
}
