//! Engine tests on the real SmolLM2-135M-Instruct model (fetched by scripts/setup.sh).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use isotope_engine::{
    generate, BatchConfig, Batcher, ChatMessage, EngineError, Event, FinishReason,
    GenerationRequest, LoadOptions, Model, SeqId, TokenId,
};
use isotope_sampling::{Sampler, SamplingHook, SamplingParams, StepContext};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path() -> PathBuf {
    std::env::var_os("ISOTOPE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = model_path();
        assert!(
            path.exists(),
            "{} is missing: run scripts/setup.sh (or set ISOTOPE_MODEL)",
            path.display()
        );
        Model::load(&path, &LoadOptions::default()).expect("model loads")
    })
}

fn cfg(slots: usize) -> BatchConfig {
    BatchConfig {
        slots,
        ctx_per_slot: 512,
        prefill_chunk: 64,
        threads: None,
    }
}

fn chat(user: &str) -> Vec<TokenId> {
    model()
        .chat_tokens(&[ChatMessage::new("user", user)])
        .unwrap()
}

fn request(prompt: Vec<TokenId>, params: SamplingParams, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        sampler: Sampler::new(params, 0),
        max_tokens: Some(max_tokens),
        stop: vec![],
        top_logprobs: 0,
    }
}

fn run_single(prompt: Vec<TokenId>, params: SamplingParams, max_tokens: usize) -> Vec<TokenId> {
    generate(model(), request(prompt, params, max_tokens), cfg(1), |_| {})
        .unwrap()
        .tokens
}

/// Drive a batcher until every sequence is done; returns tokens per sequence.
fn drain(b: &mut Batcher<'_>) -> HashMap<SeqId, Vec<TokenId>> {
    let mut out: HashMap<SeqId, Vec<TokenId>> = HashMap::new();
    while b.active() > 0 {
        for e in b.step().unwrap() {
            if let Event::Token { seq, sampled, .. } = e {
                out.entry(seq).or_default().push(sampled.token);
            }
        }
    }
    out
}

const PROMPTS: [&str; 3] = [
    "Write a haiku about the sea.",
    "Explain what a binary search does, in two sentences.",
    "List three fruits that are red.",
];

#[test]
fn tokenizer_round_trips() {
    let m = model();
    for text in [
        "Hello, world!",
        "  leading spaces and\ttabs\nnew lines",
        "Ünïcödé — “quotes” and emoji 🦀🚀 and 中文字符",
        "fn main() { println!(\"{}\", 1 + 2); }",
    ] {
        let toks = m.tokenize(text, false, false);
        assert!(!toks.is_empty());
        assert_eq!(m.detokenize(&toks), text);
    }
    // Control-token markers are plain text unless special parsing is asked for.
    let marker = "<|im_start|>";
    assert!(m.tokenize(marker, false, false).len() > 1);
    let special = m.tokenize(marker, false, true);
    assert_eq!(special.len(), 1);
    assert!(m.is_control(special[0]));
}

#[test]
fn chat_template_matches_python_jinja2_reference() {
    let conversation = vec![
        ChatMessage::new("user", "Hi there! What's the capital of France?"),
        ChatMessage::new("assistant", "The capital of France is Paris."),
        ChatMessage::new("user", "And of Italy?\nAnswer briefly."),
    ];
    let dir = tempfile::tempdir().unwrap();
    let msgs = dir.path().join("messages.json");
    std::fs::write(&msgs, serde_json::to_vec(&conversation).unwrap()).unwrap();
    let python = std::env::var_os("ISOTOPE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let out = std::process::Command::new(&python)
        .arg(workspace().join("scripts/chat_reference.py"))
        .arg(model_path())
        .arg(&msgs)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", python.display()));
    assert!(
        out.status.success(),
        "reference renderer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = String::from_utf8(out.stdout).unwrap();
    let ours = model().render_chat(&conversation).unwrap();
    assert_eq!(ours, reference);
    // The template's default system prompt is there (llama.cpp's built-in ChatML drops it).
    assert!(ours.contains("You are a helpful AI assistant named SmolLM"));
}

#[test]
fn greedy_is_identical_across_runs_and_single_vs_batched() {
    let singles: Vec<Vec<TokenId>> = PROMPTS
        .iter()
        .map(|p| run_single(chat(p), SamplingParams::greedy(), 40))
        .collect();
    for (p, s) in PROMPTS.iter().zip(&singles) {
        assert_eq!(&run_single(chat(p), SamplingParams::greedy(), 40), s);
        assert!(s.len() > 5);
    }
    // Continuous batching: the first request is already decoding when the others join.
    let mut b = Batcher::new(model(), cfg(3)).unwrap();
    let first = b
        .submit(request(chat(PROMPTS[0]), SamplingParams::greedy(), 40))
        .unwrap();
    let mut got: HashMap<SeqId, Vec<TokenId>> = HashMap::new();
    for _ in 0..5 {
        for e in b.step().unwrap() {
            if let Event::Token { seq, sampled, .. } = e {
                got.entry(seq).or_default().push(sampled.token);
            }
        }
    }
    assert!(!got.is_empty(), "first sequence started decoding");
    let others: Vec<SeqId> = PROMPTS[1..]
        .iter()
        .map(|p| {
            b.submit(request(chat(p), SamplingParams::greedy(), 40))
                .unwrap()
        })
        .collect();
    for (seq, toks) in drain(&mut b) {
        got.entry(seq).or_default().extend(toks);
    }
    assert_eq!(got[&first], singles[0]);
    assert_eq!(got[&others[0]], singles[1]);
    assert_eq!(got[&others[1]], singles[2]);
}

#[test]
fn seeded_sampling_is_reproducible_and_batch_independent() {
    let params = |seed| SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed,
        ..SamplingParams::default()
    };
    let prompt = chat("Tell me a short story about a robot.");
    let a = run_single(prompt.clone(), params(42), 48);
    let b = run_single(prompt.clone(), params(42), 48);
    let c = run_single(prompt.clone(), params(43), 48);
    assert_eq!(a, b);
    assert_ne!(a, c, "a different seed should give a different sample");

    // Same request inside a batch with unrelated traffic, and as choices 0 and 1.
    let mut batcher = Batcher::new(model(), cfg(3)).unwrap();
    let noise = batcher
        .submit(request(chat(PROMPTS[2]), params(7), 48))
        .unwrap();
    let mine = batcher
        .submit(request(prompt.clone(), params(42), 48))
        .unwrap();
    let choice1 = batcher
        .submit(GenerationRequest {
            sampler: Sampler::new(params(42), 1),
            ..request(prompt, params(42), 48)
        })
        .unwrap();
    let out = drain(&mut batcher);
    assert_eq!(out[&mine], a);
    assert_ne!(out[&choice1], a, "choice 1 draws from its own stream");
    assert!(out.contains_key(&noise));
}

#[test]
fn scoring_matches_step_by_step_decoding() {
    let m = model();
    let prompt = chat("Describe a sunrise over the mountains.");
    let gen = generate(
        m,
        GenerationRequest {
            top_logprobs: 5,
            ..request(prompt.clone(), SamplingParams::greedy(), 32)
        },
        cfg(1),
        |_| {},
    )
    .unwrap();
    let mut text = prompt.clone();
    text.extend(&gen.tokens);
    let scores = m.score(&text, 5, None).unwrap();
    assert_eq!(scores.len(), text.len() - 1);
    let generated_scores = &scores[prompt.len() - 1..];
    assert_eq!(generated_scores.len(), gen.tokens.len());
    let mut max_diff = 0f32;
    for (s, g) in generated_scores.iter().zip(&gen.logprobs) {
        assert_eq!(s.token, g.token);
        max_diff = max_diff.max((s.logprob - g.logprob).abs());
        // Greedy: the scored token is the scorer's own top-1.
        assert_eq!(s.top[0].0, g.token);
        // Alternatives: the same k best log-probabilities (near-ties may swap ids).
        assert_eq!(s.top.len(), g.top_logprobs.len());
        for (a, b) in s.top.iter().zip(&g.top_logprobs) {
            max_diff = max_diff.max((a.1 - b.1).abs());
        }
    }
    assert!(max_diff < 1e-4, "scoring vs decoding differ by {max_diff}");

    // Top-1 after every prefix (reading mode): the scorer's top-1 at every scored
    // position, and after the last token the greedy continuation.
    let top1 = m.top1_predictions(&text, 1024, None).unwrap();
    assert_eq!(top1.len(), text.len());
    for (k, s) in scores.iter().enumerate() {
        assert_eq!(top1[k], s.top[0].0, "position {k}");
    }
    let shorter = m
        .top1_predictions(&text[..text.len() - 1], 1024, None)
        .unwrap();
    assert_eq!(
        shorter.last(),
        gen.tokens.last(),
        "greedy: the last token is top-1"
    );
    // In pieces: each piece is read from a fresh context.
    let pieces = m.top1_predictions(&text, 16, None).unwrap();
    assert_eq!(pieces.len(), text.len());
    assert_eq!(pieces[..16], top1[..16]);
    assert_eq!(
        pieces[16..32],
        m.top1_predictions(&text[16..32], 1024, None).unwrap()[..]
    );
    assert!(m.top1_predictions(&[], 16, None).unwrap().is_empty());

    // A human sentence has a plausible per-token loss (≈ 2 nats for this model).
    let human = m.tokenize(
        "The quick brown fox jumps over the lazy dog. It was a sunny day and the children played in the park.",
        false,
        false,
    );
    let nll: f32 = -m
        .score(&human, 0, None)
        .unwrap()
        .iter()
        .map(|s| s.logprob)
        .sum::<f32>()
        / (human.len() - 1) as f32;
    assert!((0.5..6.0).contains(&nll), "mean NLL {nll}");
}

/// Forces a fixed token sequence, to drive the real streaming path with chosen tokens.
struct Force(Vec<TokenId>);
impl SamplingHook for Force {
    fn bias(&mut self, ctx: &StepContext<'_>, logits: &mut [f32]) {
        if let Some(&t) = self.0.get(ctx.generated.len()) {
            logits[t as usize] += 1e4;
        }
    }
}

#[test]
fn split_multibyte_character_streams_whole() {
    let m = model();
    let target = "🦀 crab é";
    let forced = m.tokenize(target, false, false);
    // The emoji must really be split across tokens for this test to mean anything.
    assert!(
        forced
            .iter()
            .any(|&t| std::str::from_utf8(&m.token_bytes(t)).is_err()),
        "expected a token that is not valid UTF-8 on its own"
    );
    let mut pieces = Vec::new();
    let gen = generate(
        m,
        GenerationRequest {
            sampler: Sampler::new(SamplingParams::greedy(), 0)
                .with_hook(Box::new(Force(forced.clone()))),
            ..request(
                chat("Say something."),
                SamplingParams::greedy(),
                forced.len(),
            )
        },
        cfg(1),
        |t| pieces.push(t.to_owned()),
    )
    .unwrap();
    assert_eq!(gen.tokens, forced);
    assert_eq!(gen.text, target);
    assert_eq!(pieces.concat(), target);
    assert!(pieces.iter().all(|p| !p.contains('\u{fffd}')));
    // The first token (a partial crab) released no text.
    assert_eq!(pieces[0], "");
}

#[test]
fn stop_strings_end_generation_and_are_never_streamed() {
    let m = model();
    let prompt = chat(PROMPTS[1]);
    let full = generate(
        m,
        request(prompt.clone(), SamplingParams::greedy(), 48),
        cfg(1),
        |_| {},
    )
    .unwrap();
    // Pick a stop string from the middle of the greedy answer.
    let mid = full
        .text
        .char_indices()
        .nth(full.text.chars().count() / 2)
        .unwrap()
        .0;
    let stop: String = full.text[mid..].chars().take(4).collect();
    let mut pieces = Vec::new();
    let cut = generate(
        m,
        GenerationRequest {
            stop: vec![stop.clone()],
            ..request(prompt, SamplingParams::greedy(), 48)
        },
        cfg(1),
        |t| pieces.push(t.to_owned()),
    )
    .unwrap();
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    let expect = &full.text[..full.text.find(&stop).unwrap()];
    assert_eq!(cut.text, expect);
    assert_eq!(pieces.concat(), expect);
    assert!(!pieces.concat().contains(&stop));
}

#[test]
fn max_tokens_and_cancellation_free_the_slot() {
    let m = model();
    let gen = generate(
        m,
        request(chat(PROMPTS[0]), SamplingParams::greedy(), 3),
        cfg(1),
        |_| {},
    )
    .unwrap();
    assert_eq!(gen.tokens.len(), 3);
    assert_eq!(gen.finish_reason, FinishReason::Length);

    let mut b = Batcher::new(m, cfg(2)).unwrap();
    let a = b
        .submit(request(chat(PROMPTS[0]), SamplingParams::greedy(), 100))
        .unwrap();
    let _c = b
        .submit(request(chat(PROMPTS[1]), SamplingParams::greedy(), 100))
        .unwrap();
    assert!(matches!(
        b.submit(request(chat(PROMPTS[2]), SamplingParams::greedy(), 5)),
        Err(EngineError::NoFreeSlot)
    ));
    b.step().unwrap();
    assert!(b.cancel(a));
    assert!(!b.cancel(a));
    // The freed slot serves a new request that matches a fresh single run.
    let d = b
        .submit(request(chat(PROMPTS[2]), SamplingParams::greedy(), 20))
        .unwrap();
    let out = drain(&mut b);
    assert!(!out.contains_key(&a));
    assert_eq!(
        out[&d],
        run_single(chat(PROMPTS[2]), SamplingParams::greedy(), 20)
    );
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let m = model();
    let mut b = Batcher::new(m, cfg(1)).unwrap();
    let long = vec![m.tokenize("word", false, false)[0]; 600];
    assert!(matches!(
        b.submit(request(long, SamplingParams::greedy(), 5)),
        Err(EngineError::PromptTooLong {
            prompt_tokens: 600,
            context: 512
        })
    ));
    assert!(matches!(
        b.submit(request(vec![], SamplingParams::greedy(), 5)),
        Err(EngineError::EmptyPrompt)
    ));
    assert!(matches!(
        b.submit(request(vec![1, 999_999], SamplingParams::greedy(), 5)),
        Err(EngineError::InvalidToken(999_999))
    ));

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.gguf");
    let e = Model::load(&missing, &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("nope.gguf"), "{e}");

    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, b"this is not a model").unwrap();
    let e = Model::load(&not_gguf, &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not a GGUF"), "{e}");

    // A truncated copy of the real model: right magic, missing tensor data.
    let truncated = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(model_path()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let e = Model::load(&truncated, &LoadOptions::default()).unwrap_err();
    assert!(e.to_string().contains("truncated or corrupt"), "{e}");
}
