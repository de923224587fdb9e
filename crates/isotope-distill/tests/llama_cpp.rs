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
    let small = Student::new(
        StudentConfig {
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 128,
            ..StudentConfig::tiny()
        },
        3,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
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
    let student = Student::new(
        StudentConfig {
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 128,
            ..StudentConfig::tiny()
        },
        9,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
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
