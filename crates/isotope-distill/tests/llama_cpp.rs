//! The candle student against llama.cpp (through `isotope_engine`) on the real
//! SmolLM2 GGUF: same token ids, same scores within 0.01 nats/token when initialised
//! from the GGUF, and an exported student that llama.cpp loads and scores like candle.

use std::path::{Path, PathBuf};

use isotope_distill::*;
use isotope_engine::{LoadOptions, Model};

fn teacher_gguf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

const TEXT: &str = "The water cycle describes how water evaporates from the surface of the earth, \
rises into the atmosphere, cools and condenses into clouds, and falls again as rain or snow. \
In 2023, about 1,234 mm of rain fell here — twice the usual amount!\n\nQ: Why?\nA: Nobody knows.";

/// A ~3.2M-parameter student with SmolLM2's vocabulary (most of it the embedding).
fn mini_student(seed: u64) -> Student {
    let cfg = StudentConfig {
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 128,
        ..StudentConfig::tiny()
    };
    Student::new(cfg, seed, &Device::Cpu, DType::F32).unwrap()
}

fn mean_nll(lp: &[f32]) -> f64 {
    -lp.iter().map(|&x| f64::from(x)).sum::<f64>() / lp.len() as f64
}

#[test]
fn tokenizer_ids_match_llama_cpp() {
    let tok = StudentTokenizer::from_gguf(&teacher_gguf()).unwrap();
    let model = Model::load(
        teacher_gguf(),
        &LoadOptions {
            vocab_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let chat = chatml_prompt(
        "What is 12 * 7?  Explain\tbriefly.",
        Some("You are helpful."),
    );
    for text in [
        TEXT,
        chat.as_str(),
        " leading space",
        "naïve café 東京 🙂",
        "a\n\n\n  b",
    ] {
        assert_eq!(
            tok.encode(text).unwrap(),
            model.tokenize(text, false, true),
            "{text:?}"
        );
    }
}

#[test]
fn gguf_student_scores_like_llama_cpp_and_exports() {
    let model = Model::load(teacher_gguf(), &LoadOptions::default()).unwrap();
    let ids = model.tokenize(TEXT, false, false);
    assert!(ids.len() > 60);
    let reference = model.score(&ids, 0, None).unwrap();
    let ref_lp: Vec<f32> = reference.iter().map(|s| s.logprob).collect();
    let student = Student::from_gguf(&teacher_gguf(), &Device::Cpu).unwrap();
    assert_eq!(student.config().num_layers, 30);
    assert!(student.config().tie_embeddings);
    let lp = student.score(&ids).unwrap();
    let (a, b) = (mean_nll(&ref_lp), mean_nll(&lp));
    eprintln!(
        "SmolLM2 on {} tokens: llama.cpp {a:.4} nats/token, candle student {b:.4} (Δ {:.4})",
        ids.len(),
        (a - b).abs()
    );
    assert!((a - b).abs() < 0.01, "llama.cpp {a} vs candle {b}");

    // A small student exported as GGUF: llama.cpp loads it and scores like candle.
    let small = mini_student(3);
    // Weights ~10× the init scale, so the logits are far from uniform and a layout
    // error (transposed matrix, wrong RoPE pairing, wrong head grouping) would show.
    for v in small.vars().values() {
        if v.rank() == 2 {
            v.set(&(v.as_tensor() * 10.0).unwrap()).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    for (dtype, tol) in [(ExportDtype::F32, 1e-3), (ExportDtype::Q8_0, 2e-2)] {
        let path = dir.path().join(format!("student-{dtype:?}.gguf"));
        export_gguf(&small, &teacher_gguf(), &path, dtype, "isotope-student").unwrap();
        let exported = Model::load(&path, &LoadOptions::default()).unwrap();
        assert_eq!(exported.tokenize(TEXT, false, false), ids);
        let lp_cpp: Vec<f32> = exported
            .score(&ids, 0, None)
            .unwrap()
            .iter()
            .map(|s| s.logprob)
            .collect();
        let lp_candle = small.score(&ids).unwrap();
        let (x, y) = (mean_nll(&lp_cpp), mean_nll(&lp_candle));
        let worst = lp_cpp
            .iter()
            .zip(&lp_candle)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        eprintln!("exported {dtype:?}: llama.cpp {x:.5} candle {y:.5} nats/token, worst position Δ {worst:.5}");
        assert!((x - y).abs() < tol, "{dtype:?}: {x} vs {y}");
    }
}

/// Token-level KD on real teacher log-probabilities: llama.cpp scores GSM8K answers
/// (top-5 per position, as a harvest with `top_logprobs` would record them), and a
/// small student trained with forward KL on them gets closer to the teacher.
#[test]
fn kd_on_teacher_top_logprobs_reduces_kl() {
    let model = Model::load(teacher_gguf(), &LoadOptions::default()).unwrap();
    let tok = StudentTokenizer::from_gguf(&teacher_gguf()).unwrap();
    let end = tok.token_id(CHATML_END).unwrap();
    let gsm = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gsm8k/train.jsonl"),
    )
    .unwrap();
    let mut lines = Vec::new();
    let t0 = std::time::Instant::now();
    // Few and short: llama.cpp scoring with logits at every position is slow here.
    for l in gsm.lines().take(6) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let prompt = tok
            .encode(&chatml_prompt(v["question"].as_str().unwrap(), None))
            .unwrap();
        let mut response = tok.encode(v["answer"].as_str().unwrap()).unwrap();
        response.truncate(32);
        let mut full = prompt.clone();
        full.extend_from_slice(&response);
        full.push(end);
        let scores = model.score(&full, 5, None).unwrap();
        let top: Vec<Vec<serde_json::Value>> = (0..response.len())
            .map(|j| {
                scores[prompt.len() + j - 1]
                    .top
                    .iter()
                    .map(|&(id, lp)| serde_json::json!({"token_id": id, "logprob": lp}))
                    .collect()
            })
            .collect();
        lines.push(
            serde_json::json!({
                "prompt_ids": prompt, "response_ids": response,
                "top_logprobs": top, "finish_reason": "stop"
            })
            .to_string(),
        );
    }
    eprintln!("teacher scoring: {:?}", t0.elapsed());
    drop(model);
    let data = parse_jsonl(&lines.join("\n"), Some(&tok), &DataOptions::default());
    assert!(data.warnings.is_empty(), "{:?}", data.warnings);
    assert_eq!(data.with_top_logprobs(), 6);
    let student = mini_student(9);
    let dir = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        loss: LossKind::Kl,
        top_k: 5,
        epochs: 10,
        batch_size: 3,
        seq_len: 128,
        lr: 3e-3,
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let r = train(&student, &data, Some(&tok), &cfg, dir.path(), &mut |_| {}).unwrap();
    eprintln!(
        "forward-KL KD on SmolLM2 top-5: first_loss {:.3} final_loss {:.3} ({} steps, {:.0} tokens/s)",
        r.first_loss, r.final_loss, r.steps, r.tokens_per_sec
    );
    assert_eq!(r.steps, 20);
    assert!(
        r.final_loss < r.first_loss - 2.0,
        "{} → {}",
        r.first_loss,
        r.final_loss
    );
}

/// SmolLM2 through llama.cpp as the trainer's [`Teacher`].
struct LlamaTeacher(Model);

impl Teacher for LlamaTeacher {
    fn top_k(&mut self, tokens: &[u32], k: usize) -> Result<Vec<TopK>, TeacherError> {
        Ok(self
            .0
            .score(tokens, k, None)?
            .into_iter()
            .map(|s| TopK {
                ids: s.top.iter().map(|t| t.0).collect(),
                logprobs: s.top.iter().map(|t| t.1).collect(),
            })
            .collect())
    }
}

/// Mean KL(teacher ‖ student) (top-5 + tail) over the student's own sampled
/// continuations of `prompts` (16 tokens each) — the quantity on-policy distillation
/// minimises.
fn on_policy_kl(student: &Student, teacher: &mut LlamaTeacher, prompts: &[Vec<u32>]) -> f64 {
    let prompts: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let cfg = OnPolicy {
        fraction: 1.0,
        max_new_tokens: 16,
        temperature: 1.0,
    };
    let r = eval_own_samples(student, teacher, &prompts, &cfg, 5, &[], 21).unwrap();
    assert_eq!(r.samples, prompts.len());
    assert!(r.tokens > 0 && (0.0..=1.0).contains(&r.top1_agreement));
    r.kl
}

/// On-policy distillation against the real teacher: the student samples, llama.cpp
/// scores its samples, and the KL to the teacher on the student's *own* samples falls.
/// The harvest here is text only, so its steps are teacher-scored too.
#[test]
fn on_policy_kd_with_llama_cpp_teacher_reduces_kl_on_own_samples() {
    let model = Model::load(teacher_gguf(), &LoadOptions::default()).unwrap();
    let tok = StudentTokenizer::from_gguf(&teacher_gguf()).unwrap();
    let gsm = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/gsm8k/train.jsonl"),
    )
    .unwrap();
    let lines: Vec<String> = gsm
        .lines()
        .take(6)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["question"], "response": v["answer"]}).to_string()
        })
        .collect();
    let data = parse_jsonl(&lines.join("\n"), Some(&tok), &DataOptions::default());
    assert_eq!(data.with_top_logprobs(), 0);
    let prompts: Vec<Vec<u32>> = data
        .examples
        .iter()
        .map(|e| e.tokens[..e.prompt_len].to_vec())
        .collect();
    let student = mini_student(9);
    let mut teacher = LlamaTeacher(model);
    let before = on_policy_kl(&student, &mut teacher, &prompts);
    let cfg = TrainConfig {
        loss: LossKind::Kl,
        top_k: 5,
        epochs: 10,
        batch_size: 3,
        seq_len: 160,
        lr: 5e-3,
        checkpoint_every: 0,
        on_policy: Some(OnPolicy {
            fraction: 0.5,
            max_new_tokens: 16,
            temperature: 1.0,
        }),
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let r = train_with_teacher(
        &student,
        &data,
        Some(&tok),
        &cfg,
        Some(&mut teacher),
        dir.path(),
        &mut |_| {},
    )
    .unwrap();
    let after = on_policy_kl(&student, &mut teacher, &prompts);
    eprintln!(
        "on-policy KD with the llama.cpp teacher: KL on own samples {before:.3} → {after:.3} \
         ({} steps, {} on-policy, {} harvest sequences teacher-scored, {:.0} tokens/s)",
        r.steps, r.on_policy_steps, r.teacher_scored, r.tokens_per_sec
    );
    assert_eq!(r.steps, 20);
    assert!(r.on_policy_steps > 0 && r.on_policy_steps < 20);
    assert!(r.teacher_scored > 0);
    assert!(after < 0.8 * before, "{before} → {after}");
}
