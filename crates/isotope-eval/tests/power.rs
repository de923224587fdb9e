//! `isotope eval watermark` in miniature on the real model: a few responses per
//! scheme, short, checked for structure and for the obvious — watermarked answers are
//! detected, unwatermarked ones (same prompts, same sampling seeds) are not.

use std::path::PathBuf;
use std::sync::Arc;

use isotope_engine::{LoadOptions, Model};
use isotope_eval::{
    default_common_path, default_data_dir, evaluate, load_common_tuples, load_human_texts, render,
    PowerOptions,
};
use isotope_watermark::{Scheme, WatermarkKey};

#[test]
fn watermarked_answers_are_detected_and_plain_ones_are_not() {
    let path = std::env::var_os("ISOTOPE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let model = Model::load(&path, &LoadOptions::default()).expect("model loads");
    let texts = load_human_texts(default_data_dir()).unwrap();
    let common = load_common_tuples(&default_common_path(), &model).unwrap();
    let opts = PowerOptions {
        schemes: vec![Scheme::kgw(), Scheme::by_name("gumbel").unwrap()],
        n: 8,
        max_tokens: 64,
        buckets: vec![48, 64],
        alphas: vec![1e-2, 1e-3],
        concurrency: 4,
        robust_tokens: 64,
        crop_tokens: 32,
        common: Some(Arc::new(common)),
        ..PowerOptions::default()
    };
    let key = Arc::new(WatermarkKey::from_bytes([42; 32]));
    let mut last = (0, 0);
    let report = evaluate(&model, &texts, key, &opts, &mut |_, d, t| last = (d, t)).unwrap();
    eprintln!("{}", render(&report));
    assert_eq!(last.0, last.1, "progress reaches its total");
    assert_eq!(last.1, 8 * 3 * 2);
    assert_eq!(report.schemes.len(), 2);
    assert!(report.common_filter);
    for s in &report.schemes {
        assert_eq!(s.buckets.len(), 2);
        assert_eq!(s.robustness.len(), 5, "3 edit rates, crop, mixed");
        let b = &s.buckets[0];
        assert_eq!(b.tokens, 48);
        assert!(
            b.watermarked.tests >= 4,
            "{}: {} reached 48",
            s.scheme,
            b.watermarked.tests
        );
        assert!(b.watermarked.mean_scored > 20.0);
        // Power on the longest bucket. At 64 tokens KGW (δ = 2, γ = ¼) is not yet
        // reliable on this small model's low-entropy answers (arithmetic, short
        // instructions): a measured run gave KGW 5 of 6 and Gumbel 6 of 6 at p ≤ 1e-2
        // (KGW only 4 of 7 at 48 tokens), so the bar is "most, and far above the
        // control", not "all".
        let b = s.buckets.last().unwrap();
        let tpr = b.watermarked.at(1e-2).unwrap();
        let fpr = b.control.at(1e-2).unwrap();
        assert!(tpr >= 0.5, "{}: TPR@1e-2 = {tpr}", s.scheme);
        assert!(fpr <= 0.25, "{}: control FPR@1e-2 = {fpr}", s.scheme);
        assert!(
            b.watermarked.median_p < 1e-2 && b.control.median_p > 1e-2,
            "{}: median p {} watermarked, {} control",
            s.scheme,
            b.watermarked.median_p,
            b.control.median_p
        );
        let q = &s.quality;
        let (pw, pp) = (q.ppl_watermarked.unwrap(), q.ppl_plain.unwrap());
        assert!(pw > 1.0 && pp > 1.0 && pw < 1e3 && pp < 1e3, "{pw} {pp}");
        assert!(q.mean_tokens > 0.0 && q.mean_tokens <= 64.0);
    }
    let json = serde_json::to_value(&report).unwrap();
    assert!(json["schemes"][0]["buckets"][0]["watermarked"]["at"][0]["rate"].is_number());
}
