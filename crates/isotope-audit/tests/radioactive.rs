//! Audits on the real SmolLM2 model and tokenizer:
//! - `audit text` p-values are valid on unwatermarked human text (held-out GSM8K and
//!   Self-Instruct corpora × fixed keys, with the shipped common-tuples list) and tiny on
//!   the model's watermarked output;
//! - radioactivity: a small candle student trained on the model's watermarked output
//!   is caught by the supervised reading mode; a control student trained the same way
//!   on unwatermarked output of the same model is not;
//! - evidence bundles verify, and a tampered bundle or a wrong key does not.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use isotope_audit::bundle::{self, KeyCommitment, Manifest};
use isotope_audit::{
    score, top1_predictions, top_predictions, Evidence, EvidenceText, Mode, ReadingStatistic,
    Scoring, READING_TOP,
};
use isotope_distill::{
    parse_jsonl, DType, DataOptions, Device, Student, StudentConfig, TrainConfig,
};
use isotope_engine::{BatchConfig, Batcher, ChatMessage, Event, GenerationRequest, Model, SeqId};
use isotope_sampling::{Sampler, SamplingParams};
use isotope_watermark::{stats, Scheme, WatermarkHook, WatermarkKey};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        Model::load(
            root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            &Default::default(),
        )
        .unwrap()
    })
}

fn scoring(scheme: &str) -> Scoring {
    scoring_with(scheme, ReadingStatistic::Top1)
}

fn scoring_with(scheme: &str, reading: ReadingStatistic) -> Scoring {
    let m = model();
    Scoring {
        reading,
        scheme: scheme.parse::<Scheme>().unwrap(),
        excluded: m.control_mask().into(),
        common: Some(Arc::new(isotope_eval::shipped_common_tuples(m).unwrap())),
    }
}

fn key(i: u8) -> Arc<WatermarkKey> {
    Arc::new(WatermarkKey::from_bytes([i; 32]))
}

/// The watermark of the radioactivity test: a window of one token, which a small
/// student trained on a few thousand tokens can absorb (the h ≤ 2).
const SCHEME: &str = "kgw:gamma=0.25,delta=2,h=1";

struct Arms {
    prompts: Vec<Vec<u32>>,
    marked: Vec<Vec<u32>>,
    plain: Vec<Vec<u32>>,
}

/// The model's answers to Self-Instruct prompts, watermarked with key 1 and not.
fn arms() -> &'static Arms {
    static A: OnceLock<Arms> = OnceLock::new();
    A.get_or_init(|| {
        let m = model();
        let text = std::fs::read_to_string(
            root().join("data/self-instruct/user_oriented_instructions.jsonl"),
        )
        .unwrap();
        let (prompts, _) = isotope_distill::parse_prompts(&text);
        let prompts: Vec<Vec<u32>> = prompts
            .iter()
            .take(PROMPTS)
            .map(|p| {
                m.chat_tokens(&[ChatMessage::new("user", p.text.clone())])
                    .unwrap()
            })
            .collect();
        let t = Instant::now();
        let marked = generate(&prompts, Some(key(1)));
        let plain = generate(&prompts, None);
        let n: usize = marked.iter().chain(&plain).map(Vec::len).sum();
        eprintln!(
            "generated {n} tokens ({} prompts × 2 arms) in {:.1} s",
            prompts.len(),
            t.elapsed().as_secs_f64()
        );
        Arms {
            prompts,
            marked,
            plain,
        }
    })
}

const PROMPTS: usize = 32;
const MAX_TOKENS: usize = 128;

fn generate(prompts: &[Vec<u32>], key: Option<Arc<WatermarkKey>>) -> Vec<Vec<u32>> {
    let m = model();
    let scheme: Scheme = SCHEME.parse().unwrap();
    let excluded: Arc<[bool]> = m.control_mask().into();
    let mut batcher = Batcher::new(
        m,
        BatchConfig {
            slots: 8,
            ctx_per_slot: 512,
            // One thread: on a loaded 2-core CI box llama.cpp's OpenMP barriers with
            // two threads spin for seconds per step.
            threads: Some(1),
            ..BatchConfig::default()
        },
    )
    .unwrap();
    let mut out = vec![Vec::new(); prompts.len()];
    let mut ids: Vec<(SeqId, usize)> = Vec::new();
    let (mut next, mut done) = (0, 0);
    while done < prompts.len() {
        while next < prompts.len() && batcher.has_free_slot() {
            let params = SamplingParams {
                seed: 1000 + next as u64,
                ..SamplingParams::default()
            };
            let mut sampler = Sampler::new(params, 0);
            if let Some(k) = &key {
                let hook = WatermarkHook::new(k.clone(), &scheme, excluded.clone(), false);
                sampler = sampler.with_hook(Box::new(hook));
            }
            let id = batcher
                .submit(GenerationRequest {
                    prompt: prompts[next].clone(),
                    sampler,
                    max_tokens: Some(MAX_TOKENS),
                    stop: Vec::new(),
                    top_logprobs: 0,
                })
                .unwrap();
            ids.push((id, next));
            next += 1;
        }
        for e in batcher.step().unwrap() {
            let (seq, tok) = match &e {
                Event::Token { seq, sampled, .. } => (*seq, Some(sampled.token)),
                Event::Finished { seq, .. } => (*seq, None),
            };
            let i = ids.iter().find(|(s, _)| *s == seq).unwrap().1;
            match tok {
                Some(t) => out[i].push(t),
                None => done += 1,
            }
        }
    }
    out
}

fn texts(seqs: &[Vec<u32>]) -> Vec<EvidenceText> {
    seqs.iter()
        .enumerate()
        .map(|(i, t)| EvidenceText {
            source: format!("answer {i}"),
            text: model().detokenize(t),
            tokens: t.clone(),
            predictions: None,
            top: None,
        })
        .collect()
}

fn fpr_valid(p: &[f64], alpha: f64) -> bool {
    let hits = p.iter().filter(|&&x| x <= alpha).count() as u64;
    let (lo, hi) = stats::clopper_pearson(hits, p.len() as u64, 0.01);
    eprintln!(
        "FPR@{alpha}: {hits}/{} = {:.4} (99% CP [{lo:.4}, {hi:.4}])",
        p.len(),
        hits as f64 / p.len() as f64
    );
    lo <= alpha
}

#[test]
fn audit_text_is_valid_on_human_text_and_finds_watermarked_output() {
    let m = model();
    let human = isotope_eval::load_human_texts(isotope_eval::default_data_dir()).unwrap();
    let held_out: Vec<_> = human.iter().filter(|t| !t.is_reference()).collect();
    // 40 corpora of 25 held-out texts × 4 fixed keys × 2 schemes = 320 corpus tests.
    let corpora: Vec<Evidence> = held_out
        .chunks(25)
        .step_by(held_out.len() / 25 / 40)
        .take(40)
        .map(|c| Evidence {
            texts: c
                .iter()
                .map(|t| EvidenceText {
                    source: t.source.clone(),
                    text: t.text.clone(),
                    tokens: m.tokenize(&t.text, false, false),
                    predictions: None,
                    top: None,
                })
                .collect(),
            ..Evidence::default()
        })
        .collect();
    assert_eq!(corpora.len(), 40);
    let mut p = Vec::new();
    let mut scored = 0u64;
    for scheme in ["kgw", SCHEME] {
        let s = scoring(scheme);
        for k in 10..14u8 {
            for c in &corpora {
                let r = score(Mode::Text, c, &[key(k)], &s, |_| {}).unwrap();
                scored += r.scored_tokens;
                p.push(r.p_value);
            }
        }
    }
    eprintln!(
        "human corpora: {} tests, {:.0} scored tuples per corpus",
        p.len(),
        scored as f64 / p.len() as f64
    );
    assert!(fpr_valid(&p, 0.01));
    assert!(fpr_valid(&p, 0.05));

    // The model's watermarked answers: one corpus test, and the multi-key correction.
    let a = arms();
    let s = scoring(SCHEME);
    let marked = Evidence {
        texts: texts(&a.marked[..8]),
        ..Evidence::default()
    };
    let r = score(Mode::Text, &marked, &[key(1)], &s, |_| {}).unwrap();
    eprintln!(
        "8 watermarked answers: p = {:.3e} over {} tuples",
        r.p_value, r.scored_tokens
    );
    assert!(r.p_value < 1e-8, "p = {}", r.p_value);
    let multi = score(Mode::Text, &marked, &[key(2), key(1), key(3)], &s, |_| {}).unwrap();
    assert_eq!(multi.variants[0].best_key_id, key(1).id());
    assert!((multi.log10_p_value - (r.log10_p_value + 3f64.log10())).abs() < 1e-9);
    let plain = Evidence {
        texts: texts(&a.plain[..8]),
        ..Evidence::default()
    };
    let r = score(Mode::Text, &plain, &[key(1)], &s, |_| {}).unwrap();
    assert!(r.p_value > 1e-3, "unwatermarked answers: p = {}", r.p_value);
}

fn student_config() -> StudentConfig {
    StudentConfig {
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 128,
        max_seq_len: 512,
        ..StudentConfig::tiny()
    }
}

/// Train a student on (prompt, answer) pairs; returns it and the training tokens.
fn train_student(
    prompts: &[Vec<u32>],
    answers: &[Vec<u32>],
    epochs: usize,
    dir: &Path,
) -> (Student, usize) {
    let lines: Vec<String> = prompts
        .iter()
        .zip(answers)
        .map(|(p, a)| {
            serde_json::json!({"prompt": "", "response": "", "prompt_ids": p, "response_ids": a})
                .to_string()
        })
        .collect();
    let data = parse_jsonl(&lines.join("\n"), None, &DataOptions::default());
    assert_eq!(data.examples.len(), answers.len(), "{:?}", data.warnings);
    let student = Student::new(student_config(), 7, &Device::Cpu, DType::F32).unwrap();
    let cfg = TrainConfig {
        epochs,
        batch_size: 8,
        seq_len: 512,
        lr: 1e-2,
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let t = Instant::now();
    let report = isotope_distill::train(&student, &data, None, &cfg, dir, &mut |_| {}).unwrap();
    eprintln!(
        "trained {} epochs on {} tokens in {:.1} s: loss {:.2} → {:.2}",
        epochs,
        data.tokens(),
        t.elapsed().as_secs_f64(),
        report.first_loss,
        report.final_loss
    );
    (student, data.tokens() * epochs)
}

/// What `student` reads in reading mode, with its top-1 predictions and its candidates
/// for the mass statistic: our watermarked
/// answers (`ours`, the supervised variant) and other texts (`unseen`, the
/// unsupervised one).
fn fed(student: &Student, ours: &[Vec<u32>], unseen: &[Vec<u32>]) -> Evidence {
    let read = |seqs: &[Vec<u32>]| {
        let mut t = texts(seqs);
        for x in &mut t {
            x.predictions = Some(top1_predictions(student, &x.tokens).unwrap());
            x.top = Some(top_predictions(student, &x.tokens, READING_TOP).unwrap());
        }
        t
    };
    Evidence {
        supervised: read(ours),
        texts: read(unseen),
        prompts: Vec::new(),
    }
}

/// Reading-mode audit of `student` on our watermarked answers (supervised) and the
/// unwatermarked arm's (unsupervised: text the watermarked student never saw).
fn reading(
    student: &Student,
    ours: &[Vec<u32>],
    unseen: &[Vec<u32>],
    keys: &[Arc<WatermarkKey>],
    statistic: ReadingStatistic,
) -> isotope_audit::AuditResult {
    score(
        Mode::Reading,
        &fed(student, ours, unseen),
        keys,
        &scoring_with(SCHEME, statistic),
        |_| {},
    )
    .unwrap()
}

/// Radioactivity at a test-sized budget. Measured on a loaded 2-core box (prompts ×
/// ≤128 tokens per arm, mini student from scratch, supervised reading mode):
///
/// | prompts | epochs | training tokens | final loss | watermarked student p | control p |
/// |---|---|---|---|---|---|
/// | 40 | 1 | 7,150 | 10.26 | 0.75 | 0.77 |
/// | 40 | 4 | 28,600 | 6.63 | 0.55 | 0.88 |
/// | 32 | 4 | 23,076 | 6.75 | 0.25 | 0.62 |
///
/// At this budget the student has not yet learnt the bigram-level green bias, so the
/// *power* side is not asserted here (it is shown on the synthetic model in
/// `isotope-watermark/tests/reading.rs` and on a live server in
/// `isotope/tests/audit.rs`). What is asserted is the side that must hold at any
/// budget: the control student and the watermarked student under other keys are not
/// flagged — the reading mode's null is exact even though both read watermarked text.
#[test]
fn reading_mode_does_not_flag_innocent_students_and_reports_power() {
    let a = arms();
    let dir = tempfile::tempdir().unwrap();
    let epochs = 4;
    let (marked, tokens) = train_student(&a.prompts, &a.marked, epochs, &dir.path().join("m"));
    let (control, _) = train_student(&a.prompts, &a.plain, epochs, &dir.path().join("c"));
    let rm = reading(
        &marked,
        &a.marked,
        &a.plain,
        &[key(1)],
        ReadingStatistic::Top1,
    );
    let rc = reading(
        &control,
        &a.marked,
        &a.plain,
        &[key(1)],
        ReadingStatistic::Top1,
    );
    let rm_mass = reading(
        &marked,
        &a.marked,
        &a.plain,
        &[key(1)],
        ReadingStatistic::Mass,
    );
    let rc_mass = reading(
        &control,
        &a.marked,
        &a.plain,
        &[key(1)],
        ReadingStatistic::Mass,
    );
    let sup = |r: &isotope_audit::AuditResult| {
        r.variants
            .iter()
            .find(|v| v.name == "supervised")
            .unwrap()
            .clone()
    };
    eprintln!(
        "training tokens {tokens}: watermarked student p = {:.3e} (supervised, {} tuples), \
         {:.3e} (unsupervised); control p = {:.3e} (supervised, {} tuples)",
        sup(&rm).p_value,
        sup(&rm).per_key[0].scored_tokens,
        rm.variants[0].p_value,
        sup(&rc).p_value,
        sup(&rc).per_key[0].scored_tokens,
    );
    eprintln!(
        "mass statistic: watermarked student p = {:.3e} (supervised, {} pairs), {:.3e} \
         (unsupervised); control p = {:.3e}",
        sup(&rm_mass).p_value,
        sup(&rm_mass).per_key[0].scored_tokens,
        rm_mass.variants[0].p_value,
        rc_mass.p_value,
    );
    assert!(sup(&rm).per_key[0].scored_tokens > 500);
    assert!(sup(&rm_mass).per_key[0].scored_tokens > sup(&rm).per_key[0].scored_tokens);
    for (name, r) in [("top-1", &rc), ("mass", &rc_mass)] {
        assert!(
            r.p_value > 1e-3,
            "control student flagged ({name}): p = {}",
            r.p_value
        );
    }
    // Under other keys the watermarked student is just another innocent model: its
    // supervised and unsupervised p-values under 100 random keys are consistent with
    // U(0, 1) — one-sided KS in the direction that would make the audit invalid
    // (p-values too small), and no more small ones than chance allows.
    let evidence = fed(&marked, &a.marked, &a.plain);
    let mut p: [Vec<f64>; 4] = Default::default();
    for k in 100..200u8 {
        for (i, stat) in [ReadingStatistic::Top1, ReadingStatistic::Mass]
            .into_iter()
            .enumerate()
        {
            let r = score(
                Mode::Reading,
                &evidence,
                &[key(k)],
                &scoring_with(SCHEME, stat),
                |_| {},
            )
            .unwrap();
            p[2 * i].push(sup(&r).p_value);
            p[2 * i + 1].push(r.variants[0].p_value);
        }
    }
    let names = [
        "supervised",
        "unsupervised",
        "mass, supervised",
        "mass, unsupervised",
    ];
    for (name, p) in names.into_iter().zip(&p) {
        let (d, ks_p) = isotope_eval::calibration::ks_plus(p);
        let small = p.iter().filter(|&&x| x < 0.01).count();
        eprintln!("watermarked student under 100 other keys, {name}: KS D+ = {d:.3}, p = {ks_p:.3}; {small} below 0.01");
        assert!(
            ks_p > 1e-3,
            "{name} p-values under random keys are too small: D+ = {d}"
        );
        // P(Binomial(100, 0.01) ≥ 6) ≈ 5e-4
        assert!(small <= 5, "{name}: {small} of 100 random keys below 0.01");
    }
}

#[test]
fn bundle_verifies_and_tampering_is_caught() {
    let a = arms();
    let s = scoring(SCHEME);
    let keys = [key(1), key(2)];
    let evidence = Evidence {
        prompts: texts(&a.prompts[..4]),
        texts: texts(&a.marked[..6]),
        supervised: Vec::new(),
    };
    let mut tuples = Vec::new();
    let result = score(Mode::BlackBox, &evidence, &keys, &s, |t| tuples.push(t)).unwrap();
    let manifest = Manifest {
        format: bundle::FORMAT.into(),
        tool_version: "test".into(),
        mode: Mode::BlackBox,
        scheme: SCHEME.parse::<Scheme>().unwrap().to_string(),
        keys: keys
            .iter()
            .map(|k| KeyCommitment {
                key_id: k.id().into(),
                commitment: k.commitment(),
            })
            .collect(),
        common_filter: None,
        parameters: serde_json::json!({}),
        result: result.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    bundle::write(dir.path(), &manifest, &evidence, &tuples).unwrap();
    let manifest_text = std::fs::read_to_string(dir.path().join("bundle.json")).unwrap();
    assert!(
        !manifest_text.contains(&hex_secret(1)),
        "the key itself is never written"
    );

    let b = bundle::read(dir.path()).unwrap();
    let v = bundle::verify(&b, &keys, &s).unwrap();
    assert!(v.ok, "{:?}", v.problems);
    assert_eq!(v.tuples_recorded, tuples.len());
    // One key alone verifies its own part.
    assert!(bundle::verify(&b, &keys[..1], &s).unwrap().ok);
    // A key that is not the committed one.
    let v = bundle::verify(&b, &[key(9)], &s).unwrap();
    assert!(
        !v.ok && v.problems[0].contains("not one of"),
        "{:?}",
        v.problems
    );

    // Tamper with one answer: the recomputation no longer matches.
    let path = dir.path().join("texts.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rows: Vec<EvidenceText> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let t = &mut rows[2].tokens;
    let mid = t.len() / 2;
    t[mid] = t[mid].wrapping_add(1) % 49_152;
    std::fs::write(
        &path,
        rows.iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let v = bundle::verify(&bundle::read(dir.path()).unwrap(), &keys, &s).unwrap();
    assert!(!v.ok, "tampered texts verified");
    eprintln!("tampered bundle: {:?}", v.problems);

    // Tamper with the recorded p-value only.
    std::fs::write(&path, text).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&manifest_text).unwrap();
    m["result"]["variants"][0]["per_key"][0]["log10_p_value"] = serde_json::json!(-99.0);
    std::fs::write(dir.path().join("bundle.json"), m.to_string()).unwrap();
    let v = bundle::verify(&bundle::read(dir.path()).unwrap(), &keys, &s).unwrap();
    assert!(!v.ok, "tampered p-value verified");
}

fn hex_secret(i: u8) -> String {
    format!("{:02x}", i).repeat(32)
}

#[test]
fn tokenizer_mismatch_is_refused_by_the_student() {
    // Reading mode needs the suspect to share the tokenizer: a student with a smaller
    // vocabulary refuses our token ids instead of predicting garbage.
    let cfg = StudentConfig {
        vocab_size: 1000,
        ..student_config()
    };
    let s = Student::new(cfg, 1, &Device::Cpu, DType::F32).unwrap();
    let tokens = model().tokenize("A sentence with ordinary words in it.", false, false);
    assert!(tokens.iter().any(|&t| t >= 1000));
    assert!(top1_predictions(&s, &tokens).is_err());
}

/// A "suspect" whose top-1 after `tokens[..=i]` is the text's own next token (a model
/// that has memorised the text); after the last token it predicts the first.
fn memorised(seqs: &[Vec<u32>]) -> Vec<EvidenceText> {
    let mut t = texts(seqs);
    for x in &mut t {
        let mut p: Vec<u32> = x.tokens.iter().skip(1).copied().collect();
        p.push(x.tokens[0]);
        x.predictions = Some(p);
    }
    t
}

#[test]
fn reading_variants_are_what_the_suspect_read() {
    // Supervised = the suspect reads our outputs; unsupervised = it reads other texts.
    // A suspect that reproduces our watermarked answers is caught when it reads them,
    // and the unwatermarked answers it reads in the same audit say nothing.
    let a = arms();
    let s = scoring(SCHEME);
    let keys = [key(1)];
    let both = Evidence {
        prompts: Vec::new(),
        texts: memorised(&a.plain),
        supervised: memorised(&a.marked),
    };
    let mut seen = Vec::new();
    let r = score(Mode::Reading, &both, &keys, &s, |t| seen.push(t)).unwrap();
    let names: Vec<&str> = r.variants.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["unsupervised", "supervised"]);
    eprintln!(
        "memorising suspect: supervised p = {:.3e}, unsupervised p = {:.3e}",
        r.variants[1].p_value, r.variants[0].p_value
    );
    assert!(r.variants[1].p_value < 1e-6, "{:?}", r.variants[1]);
    assert!(r.variants[0].p_value > 1e-3, "{:?}", r.variants[0]);
    // The headline is the better variant corrected for two.
    assert!((r.log10_p_value - (r.variants[1].log10_p_value + 2f64.log10())).abs() < 1e-9);
    assert_eq!(r.texts, a.plain.len() + a.marked.len());
    // Each tuple indexes its own variant's texts, and its window is taken from them.
    for t in &seen {
        let set = if t.variant == "supervised" {
            &both.supervised
        } else {
            &both.texts
        };
        let text = &set[t.text].tokens;
        assert_eq!(&text[t.position - 1..t.position], t.window.as_slice());
    }

    // Our outputs only: one variant, no correction.
    let sup_only = Evidence {
        texts: Vec::new(),
        ..both.clone()
    };
    let r1 = score(Mode::Reading, &sup_only, &keys, &s, |_| {}).unwrap();
    assert_eq!(r1.variants.len(), 1);
    assert_eq!(r1.variants[0].name, "supervised");
    assert_eq!(r1.p_value, r1.variants[0].p_value);
    assert_eq!(r1.variants[0], r.variants[1]);

    // Nothing read, or a text without predictions: refused.
    let none = Evidence::default();
    assert!(score(Mode::Reading, &none, &keys, &s, |_| {}).is_err());
    let mut unread = both.clone();
    unread.supervised[0].predictions = None;
    let e = score(Mode::Reading, &unread, &keys, &s, |_| {}).unwrap_err();
    assert!(e.to_string().contains("supervised text 0"), "{e}");
}
