//! End-to-end checks on simulated traffic: quality on a held-out seed and prompt
//! split (real training and replay, nothing hard-coded), determinism, the events file
//! and the online API.

use std::sync::Arc;

use isotope_sentinel::{
    evaluate, logit, simulate, train, Embedder, HashedEmbedder, Level, Scenario, Sentinel,
    SentinelConfig, Simulated, TrainConfig, STEP_DOWN_LOGIT,
};

/// The built-in model's embedder.
fn hashed() -> Arc<dyn Embedder> {
    Arc::new(HashedEmbedder::default())
}

/// The shipped (embedded) model on a seed and prompt split it never saw. (A model
/// re-trained here on a quarter of the traffic would calibrate its 0.1% threshold on
/// ~260 benign accounts — the single highest score plus a margin — and say more about
/// that than about the recipe.)
#[test]
fn held_out_seed_and_split_separates_harvesting_from_benign() {
    let model = isotope_sentinel::default_model().expect("built-in model");
    // evaluation: another seed and the disjoint prompt split
    let sim = simulate(&Scenario::default_mixed().scaled(0.25), 2024).expect("simulate");
    let r = evaluate(&sim.events, &sim.labels, model, &hashed()).unwrap();
    eprintln!(
        "tpr {:.3} fpr {:.4} (≤{:.4}) auc {:?} rtf {:?}",
        r.tpr, r.fpr, r.fpr_upper95, r.auc, r.median_requests_until_flagged
    );
    assert!(r.benign_accounts >= 200, "{}", r.benign_accounts);
    assert!(r.auc.unwrap() > 0.95, "auc {:?}", r.auc);
    assert!(r.fpr <= 0.01, "fpr {}", r.fpr);
    assert!(r.tpr >= 0.8, "tpr {}", r.tpr);
    for s in ["bulk", "topic_sweep", "paraphrase", "sybil"] {
        assert!(r.per_strategy.contains_key(s), "{s} missing");
    }
    let json = serde_json::to_value(&r).unwrap();
    for k in ["tpr", "fpr", "auc", "per_strategy", "fpr_upper95"] {
        assert!(json.get(k).is_some(), "{k}");
    }
}

#[test]
fn same_seed_same_events_and_scores() {
    let sc = Scenario::default_mixed().scaled(0.05);
    let a = simulate(&sc, 5).unwrap();
    let b = simulate(&sc, 5).unwrap();
    assert_eq!(a.events, b.events);
    assert_eq!(a.labels, b.labels);
    let c = simulate(&sc, 6).unwrap();
    assert_ne!(a.events, c.events);
    // both splits share no prompt text
    let tune = simulate(&Scenario::training().scaled(0.05), 5).unwrap();
    let p = |s: &Simulated| -> std::collections::HashSet<String> {
        s.events
            .iter()
            .filter(|e| e.endpoint == "/v1/completions" && e.turns == 1)
            .filter_map(|e| e.prompt_text.clone())
            .collect()
    };
    let shared = p(&a).intersection(&p(&tune)).count();
    assert!(shared < 20, "{shared} identical prompts across splits");

    let model = Arc::new(isotope_sentinel::Model::untrained(
        "hashed-ngrams-v1:dim=128".into(),
        Default::default(),
    ));
    let run = || {
        let mut s = Sentinel::new(SentinelConfig::with_model(model.clone()));
        a.events
            .iter()
            .filter_map(|e| s.observe(e))
            .map(|x| (x.account_id, x.requests, x.score.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn events_file_round_trips() {
    let sim = simulate(&Scenario::default_mixed().scaled(0.02), 3).unwrap();
    let text = sim.to_jsonl();
    let back = Simulated::from_jsonl(&text).unwrap();
    assert_eq!(back.events, sim.events);
    assert_eq!(back.labels, sim.labels);
    let first = text.lines().next().unwrap();
    let v: serde_json::Value = serde_json::from_str(first).unwrap();
    assert!(v.get("event").is_some() && v.get("label").is_some());
    assert!(Simulated::from_jsonl("{not json").is_err());
}

#[test]
fn online_api_levels_and_assess() {
    let model = Arc::new(
        train(
            &TrainConfig {
                scenario: Scenario::training().scaled(0.1),
                ..TrainConfig::default()
            },
            &hashed(),
        )
        .unwrap(),
    );
    let sim = simulate(&Scenario::default_mixed().scaled(0.1), 99).unwrap();
    let t = model.thresholds.clone();
    let mut s = Sentinel::new(SentinelConfig::with_model(model));
    // each account's own level, to check the hysteresis on the way down
    let mut last: std::collections::HashMap<i64, Level> = Default::default();
    let threshold = |l: Level| match l {
        Level::Observe => 0.0,
        Level::Flag => t.flag,
        Level::Throttle => t.throttle,
        Level::Degrade => t.degrade,
        Level::Block => t.block,
    };
    let (mut ups, mut downs) = (0, 0);
    for e in &sim.events {
        if let Some(a) = s.observe(e) {
            assert!((0.0..=1.0).contains(&a.score));
            assert!(a.cluster_size >= 1);
            // never below the score's own level; above it only when held from before
            assert!(a.level >= t.level(a.score));
            let prev = last.insert(a.account_id, a.level).unwrap_or(Level::Observe);
            if a.level > t.level(a.score) {
                assert!(
                    prev >= a.level,
                    "{} held {:?} it never had",
                    a.account_id,
                    a.level
                );
            }
            if a.level < prev {
                downs += 1;
                // stepped down: the score fell past the margin below what it left
                assert!(
                    logit(a.score) < logit(threshold(prev)) - STEP_DOWN_LOGIT + 1e-9,
                    "{} left {prev:?} at score {}",
                    a.account_id,
                    a.score
                );
            } else if a.level > prev {
                ups += 1;
            }
        }
    }
    eprintln!("level changes: {ups} up, {downs} down");
    assert!(ups > 0);
    let now = sim.events.last().unwrap().created_at_ms;
    let all = s.assess(now);
    assert_eq!(all.len(), sim.labels.len());
    assert!(all.windows(2).all(|w| w[0].score >= w[1].score));
    // the top-scored account is a harvester and is acted on
    let top = &all[0];
    assert_ne!(sim.labels[&top.account_id], "benign");
    assert!(s.level(top.account_id) >= Level::Flag);
    assert!(!top.reasons.is_empty());
    assert_eq!(s.level(-1), Level::Observe);
    assert!(s.bytes_per_account() < 64.0 * 1024.0);
}

/// The built-in model is embedded as JSON (no training at server start). It must be
/// exactly what the training recipe produces from this build's simulator and
/// features; when this fails, refresh it with
/// `isotope sentinel train --out crates/isotope-sentinel/src/default_model.json`.
#[test]
fn embedded_model_is_what_the_training_recipe_produces() {
    let embedded = isotope_sentinel::default_model().expect("embedded model");
    let fresh = train(&TrainConfig::default(), &hashed()).expect("train");
    assert_eq!(embedded.features, fresh.features);
    assert_eq!(embedded.trained_on, fresh.trained_on);
    let close = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-9 * (1.0 + x.abs()))
    };
    for (e, f) in embedded.shapes.iter().zip(&fresh.shapes) {
        assert!(
            close(&e.edges, &f.edges) && e.edges.len() == f.edges.len(),
            "shape cut points differ: retrain"
        );
        assert!(
            close(&e.values, &f.values) && e.values.len() == f.values.len(),
            "shapes differ: retrain"
        );
    }
    assert!((embedded.bias - fresh.bias).abs() < 1e-9);
    assert!((embedded.thresholds.flag - fresh.thresholds.flag).abs() < 1e-9);
    assert_eq!(embedded.reference.vectors, fresh.reference.vectors);
}

/// The finding of the last round: a templated account asking top-20 logprobs with
/// 4-token answers scored like one asking for nothing. With the soft-label features
/// constrained to raise risk, asking for logprobs can only raise an account's score,
/// and it raises it measurably (odds × 2 or more). It does not make an 80-second burst
/// of 80 requests a flag: benign benchmark runs look the same, and the model waits
/// for persistence or for a day's volume. Run with `--nocapture` for the scores,
/// including the server test's harvester (64 tokens, top-20): about 0.005 at 80
/// requests.
#[test]
fn asking_for_soft_labels_never_lowers_the_score() {
    let model = isotope_sentinel::default_model().unwrap();
    let run = |max_tokens: u32, top: Option<u32>| {
        let mut s = Sentinel::new(SentinelConfig::with_model(model.clone()));
        let mut last = None;
        for i in 0..80i64 {
            let prompt = format!(
                "Explain topic number {i} in detail. Give a thorough, step by step answer with examples."
            );
            let ev = isotope_store::UsageEvent {
                id: 0,
                request_id: format!("r{i}"),
                account_id: 1,
                api_key_id: "ik_1".into(),
                created_at_ms: 1_700_000_000_000 + i * 1000,
                endpoint: "/v1/chat/completions".into(),
                model: "m".into(),
                prompt_text: Some(prompt.clone()),
                prompt_hash: String::new(),
                turns: 1,
                completion_text: None,
                completion_hash: None,
                prompt_tokens: 30,
                completion_tokens: max_tokens,
                n: 1,
                logprobs: top.is_some(),
                top_logprobs: top,
                max_tokens: Some(max_tokens),
                temperature: Some(1.0),
                watermark_scheme: None,
                watermark_key_id: None,
                latency_ms: 10,
                status: 200,
                finish_reason: Some("length".into()),
                client_addr: Some("10.9.8.7".into()),
                user_agent: Some("python-requests/2.31.0".into()),
                user: None,
                policy: None,
                partial: false,
            };
            if let Some(a) = s.observe(&ev) {
                last = Some(a.score);
            }
        }
        last.unwrap()
    };
    let short_plain = run(4, None);
    let short_soft = run(4, Some(20));
    let long_plain = run(200, None);
    let long_soft = run(200, Some(20));
    let mid_soft = run(64, Some(20));
    eprintln!(
        "80 templated requests 1 s apart, 64 tokens with top-20: {mid_soft:.4} \
         (level {:?} at flag 0.1, {:?} at the model's flag)",
        isotope_sentinel::Thresholds::from_flag(0.1).level(mid_soft),
        model.thresholds.level(mid_soft)
    );
    eprintln!(
        "80 templated requests 1 s apart: 4 tokens {short_plain:.4} → with top-20 {short_soft:.4}; \
         200 tokens {long_plain:.4} → with top-20 {long_soft:.4} (flag at {:.4})",
        model.thresholds.flag
    );
    assert!(short_soft >= short_plain && long_soft >= long_plain);
    let logit = |p: f64| (p / (1.0 - p)).ln();
    assert!(
        logit(short_soft) - logit(short_plain) > 2f64.ln(),
        "logprobs barely count: {short_plain} → {short_soft}"
    );
}
