//! Cost of one sampling step over a SmolLM2-sized vocabulary (49,152 logits).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use isotope_sampling::{Sampler, SamplingParams, StepContext};

/// Logits shaped like a language model's: a few likely tokens, a long tail.
fn logits(vocab: usize) -> Vec<f32> {
    let mut x = 0x9e3779b97f4a7c15u64;
    (0..vocab)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = (x >> 40) as f32 / (1u64 << 24) as f32;
            let head = if i % 4099 == 7 { 12.0 } else { 0.0 };
            noise * 6.0 - 3.0 + head
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let l = logits(49_152);
    let prompt: Vec<u32> = (0..200).map(|i| i * 37 % 49_152).collect();
    let generated: Vec<u32> = (0..100).map(|i| i * 91 % 49_152).collect();
    let ctx = StepContext {
        prompt: &prompt,
        generated: &generated,
    };
    let cases = [
        ("greedy", SamplingParams::greedy()),
        ("plain T=1", SamplingParams::default()),
        (
            "top_p=0.95 T=0.8",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                ..Default::default()
            },
        ),
        (
            "top_k=40 top_p=0.9",
            SamplingParams {
                top_k: 40,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "min_p=0.05 rep=1.1",
            SamplingParams {
                min_p: 0.05,
                repetition_penalty: 1.1,
                ..Default::default()
            },
        ),
    ];
    let mut g = c.benchmark_group("sample_49152");
    for (name, params) in cases {
        for top in [0usize, 20] {
            let mut s = Sampler::new(params.clone(), 0);
            g.bench_with_input(
                BenchmarkId::new(name, format!("top_logprobs={top}")),
                &top,
                |b, &top| b.iter(|| s.sample(&l, &ctx, top)),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
