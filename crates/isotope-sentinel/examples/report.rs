//! Full measurement on the default scenario: `cargo run --release -p isotope-sentinel
//! --example report [-- EVAL_SEED [SCALE]]`. Prints one JSON object. `EMBEDDER=minilm`
//! (with `ISOTOPE_MINILM_DIR`, default `models/all-MiniLM-L6-v2`) trains and evaluates
//! on MiniLM prompt vectors instead of hashed n-grams; `NO_LOO=1` skips the
//! leave-one-strategy-out runs.

use std::sync::Arc;
use std::time::Instant;

use isotope_sentinel::{
    bench, evaluate, leave_one_out, simulate, train, Embedder, HashedEmbedder, MiniLmEmbedder,
    Scenario, TrainConfig,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seed: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(42);
    let scale: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let t = Instant::now();
    let tc = TrainConfig {
        scenario: Scenario::training().scaled(scale),
        ..TrainConfig::default()
    };
    let emb: Arc<dyn Embedder> = match std::env::var("EMBEDDER").as_deref() {
        Ok("minilm") => {
            let dir = std::env::var_os("ISOTOPE_MINILM_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| isotope_sentinel::minilm::DEFAULT_DIR.into());
            Arc::new(MiniLmEmbedder::load(&dir).expect("MiniLM"))
        }
        _ => Arc::new(HashedEmbedder::default()),
    };
    let model = Arc::new(train(&tc, &emb).expect("train"));
    eprintln!("trained in {:.1}s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let sim = simulate(&Scenario::default_mixed().scaled(scale), seed).expect("simulate");
    eprintln!(
        "simulated {} events in {:.1}s",
        sim.events.len(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let report = evaluate(&sim.events, &sim.labels, model.clone(), &emb).expect("evaluate");
    eprintln!("evaluated in {:.1}s", t.elapsed().as_secs_f64());
    let loo = if std::env::var_os("NO_LOO").is_none() {
        Some(leave_one_out(&tc, &emb, &sim).expect("loo"))
    } else {
        None
    };
    let b = bench(&sim.events, model.clone(), &emb).expect("bench");
    // how far each feature's shape can move the logit
    let weights: Vec<(String, f64)> = model
        .features
        .iter()
        .cloned()
        .zip(model.shapes.iter().map(|s| s.range()))
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "eval": report, "leave_one_out": loo, "bench": b, "weights": weights,
        }))
        .unwrap()
    );
}
