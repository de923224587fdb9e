//! Prompt-embedding throughput on one events file: `cargo run --release -p
//! isotope-sentinel --example embed_rate -- EVENTS.jsonl [N] [minilm|hashed]`. Takes the
//! first N distinct prompts (default 2,000), embeds them cold in batches
//! (`Embedder::prepare` then `embed`, as `eval` and `train` do) and the first 200 one
//! at a time on a fresh embedder (as the online sentinel does on a cache miss), and
//! prints texts per second for both.

use std::sync::Arc;
use std::time::Instant;

use isotope_sentinel::{Embedder, HashedEmbedder, MiniLmEmbedder, Simulated};

fn load(kind: &str) -> Arc<dyn Embedder> {
    match kind {
        "hashed" => Arc::new(HashedEmbedder::default()),
        _ => Arc::new(
            MiniLmEmbedder::load(isotope_sentinel::minilm::DEFAULT_DIR.as_ref()).expect("MiniLM"),
        ),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).expect("events file");
    let sim = Simulated::from_jsonl(&text).expect("events");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let kind = args.get(3).map(String::as_str).unwrap_or("minilm");
    let mut texts = isotope_sentinel::eval::prompt_texts(&sim.events);
    texts.truncate(n);
    let chars = texts.iter().map(String::len).sum::<usize>() as f64 / texts.len() as f64;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let e = load(kind);
    let mut out = vec![0.0; e.dim()];
    let t = Instant::now();
    e.prepare(&refs, &|_| {});
    for s in &refs {
        e.embed(s, &mut out);
    }
    let batched = texts.len() as f64 / t.elapsed().as_secs_f64();
    let e = load(kind);
    let single: Vec<&str> = refs.iter().copied().take(200).collect();
    let t = Instant::now();
    for s in &single {
        e.embed(s, &mut out);
    }
    let one = single.len() as f64 / t.elapsed().as_secs_f64();
    println!(
        "{{\"embedder\":{:?},\"texts\":{},\"mean_chars\":{chars:.0},\"batched_per_sec\":{batched:.1},\"single_per_sec\":{one:.1}}}",
        e.name(),
        texts.len()
    );
}
