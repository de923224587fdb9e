//! Training end to end on the real tokenizer and real text (GSM8K), checkpoint/resume,
//! and a finite-difference gradient check. No llama.cpp here.

use std::path::{Path, PathBuf};

use isotope_distill::*;
use isotope_sampling::{Sampler, SamplingParams};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn teacher_gguf() -> PathBuf {
    root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The first `n` GSM8K training pairs as `{"prompt", "response"}` lines.
fn gsm8k_jsonl(n: usize) -> String {
    let text = std::fs::read_to_string(root().join("data/gsm8k/train.jsonl")).unwrap();
    text.lines()
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({"prompt": v["question"], "response": v["answer"]}).to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn mini_config() -> StudentConfig {
    StudentConfig {
        hidden_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 128,
        ..StudentConfig::tiny()
    }
}

#[test]
fn tiny_student_learns_gsm8k_and_reloads_identically() {
    let tok = StudentTokenizer::from_gguf(&teacher_gguf()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_path = dir.path().join("data.jsonl");
    // Two malformed lines among 50 real pairs: reported with their numbers, skipped.
    let mut text = gsm8k_jsonl(50);
    text.push_str("\n{\"prompt\": \"no response\"}\nnot json\n");
    std::fs::write(&data_path, text).unwrap();
    let data = load_jsonl(&data_path, Some(&tok), &DataOptions::default()).unwrap();
    assert_eq!(data.examples.len(), 50);
    let lines: Vec<usize> = data.warnings.iter().map(|w| w.line).collect();
    assert_eq!(lines, vec![51, 52]);
    // The prompt is ChatML and the response ends with <|im_end|>.
    let ex = &data.examples[0];
    let end = tok.token_id(CHATML_END).unwrap();
    assert_eq!(*ex.tokens.last().unwrap(), end);
    assert!(tok
        .decode(&ex.tokens[..ex.prompt_len])
        .unwrap()
        .starts_with("<|im_start|>user\nNatalia"));

    let student = Student::new(mini_config(), 7, &Device::Cpu, DType::F32).unwrap();
    let out = dir.path().join("student");
    let cfg = TrainConfig {
        epochs: 4,
        batch_size: 4,
        seq_len: 128,
        lr: 3e-3,
        max_steps: Some(30),
        checkpoint_every: 0,
        ..TrainConfig::default()
    };
    let mut calls = 0;
    let report = train(
        &student,
        &data,
        Some(&tok),
        &cfg,
        &out,
        &mut |p: &Progress| {
            calls += 1;
            assert_eq!(p.step, calls);
            assert_eq!(p.total_steps, 30);
        },
    )
    .unwrap();
    eprintln!(
        "tiny GSM8K run: first_loss {:.3} final_loss {:.3} tokens/s {:.0} params {}",
        report.first_loss, report.final_loss, report.tokens_per_sec, report.params
    );
    assert_eq!(calls, 30);
    assert!(report.finished);
    assert!(report.first_loss > 9.0, "starts near ln(49152) ≈ 10.8");
    assert!(
        report.final_loss < report.first_loss - 3.0,
        "loss fell from {} to {}",
        report.first_loss,
        report.final_loss
    );
    let json = serde_json::to_value(&report).unwrap();
    for k in ["first_loss", "final_loss", "tokens_per_sec", "params"] {
        assert!(json.get(k).is_some(), "{k}");
    }
    for f in [
        WEIGHTS_FILE,
        CONFIG_FILE,
        TOKENIZER_FILE,
        LOG_FILE,
        LOSS_PNG,
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let png = std::fs::read(out.join(LOSS_PNG)).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert_eq!(read_train_log(&out).unwrap().len(), 30);

    // Reload: same logits bit for bit, same greedy and sampled continuations.
    let loaded = Student::load(&out, &Device::Cpu).unwrap();
    let tok2 = StudentTokenizer::load(&out.join(TOKENIZER_FILE)).unwrap();
    let prompt = tok2
        .encode(&chatml_prompt(
            "Tom has 3 apples and buys 4 more. How many?",
            None,
        ))
        .unwrap();
    assert_eq!(
        prompt,
        tok.encode(&chatml_prompt(
            "Tom has 3 apples and buys 4 more. How many?",
            None
        ))
        .unwrap()
    );
    assert_eq!(
        student.logits(&prompt).unwrap(),
        loaded.logits(&prompt).unwrap()
    );
    assert_eq!(
        student.score(&prompt).unwrap(),
        loaded.score(&prompt).unwrap()
    );
    for params in [
        SamplingParams::greedy(),
        SamplingParams {
            seed: 5,
            temperature: 0.8,
            ..Default::default()
        },
    ] {
        let a = student
            .generate(&prompt, &mut Sampler::new(params.clone(), 0), 24, &[end])
            .unwrap();
        let b = loaded
            .generate(&prompt, &mut Sampler::new(params, 0), 24, &[end])
            .unwrap();
        assert_eq!(a, b);
        assert!(!a.is_empty());
    }
}

/// Generation with the KV cache equals recomputing the whole sequence each step.
#[test]
fn cached_generation_matches_full_recompute() {
    let cfg = StudentConfig {
        vocab_size: 300,
        ..mini_config()
    };
    let s = Student::new(cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let prompt = vec![5u32, 17, 42, 7];
    let out = s
        .generate(
            &prompt,
            &mut Sampler::new(SamplingParams::greedy(), 0),
            12,
            &[],
        )
        .unwrap();
    let mut seq = prompt.clone();
    for &t in &out {
        let logits = s.logits(&seq).unwrap();
        let last = logits.last().unwrap();
        let argmax = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]))
            .unwrap() as u32;
        assert_eq!(argmax, t);
        seq.push(t);
    }
}

fn synthetic(n: usize, vocab: u32) -> Dataset {
    let text: Vec<String> = (0..n)
        .map(|i| {
            let p: Vec<u32> = (0..4).map(|j| (i as u32 * 7 + j * 3) % vocab).collect();
            let r: Vec<u32> = (0..6).map(|j| (i as u32 + j * 11) % vocab).collect();
            let top: Vec<serde_json::Value> = r
                .iter()
                .map(|&t| serde_json::json!([{"token_id": t, "logprob": -0.3}, {"token_id": (t + 1) % vocab, "logprob": -1.8}]))
                .collect();
            serde_json::json!({"prompt_ids": p, "response_ids": r, "top_logprobs": top}).to_string()
        })
        .collect();
    let ds = parse_jsonl(
        &text.join("\n"),
        None,
        &DataOptions {
            vocab_size: vocab as usize,
            ..Default::default()
        },
    );
    assert!(ds.warnings.is_empty());
    ds
}

/// Training 8 steps straight equals training 4, stopping, and resuming for 4 more —
/// even when the resumed process starts from a differently initialised student.
#[test]
fn resume_from_checkpoint_matches_uninterrupted_run() {
    let vocab = 256;
    let cfg = StudentConfig {
        vocab_size: vocab,
        ..mini_config()
    };
    let data = synthetic(12, vocab as u32);
    let tcfg = TrainConfig {
        loss: LossKind::Kl,
        top_k: 2,
        epochs: 3,
        batch_size: 4,
        seq_len: 32,
        lr: 5e-3,
        checkpoint_every: 3,
        seed: 11,
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let straight = Student::new(cfg.clone(), 1, &Device::Cpu, DType::F32).unwrap();
    let r = train(
        &straight,
        &data,
        None,
        &tcfg,
        &dir.path().join("a"),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.steps, 9);

    let out_b = dir.path().join("b");
    let first = Student::new(cfg.clone(), 1, &Device::Cpu, DType::F32).unwrap();
    let stop = TrainConfig {
        stop_after: Some(4),
        ..tcfg.clone()
    };
    let r1 = train(&first, &data, None, &stop, &out_b, &mut |_| {}).unwrap();
    assert!(!r1.finished);
    assert_eq!(r1.steps, 4);
    let fresh = Student::new(cfg, 99, &Device::Cpu, DType::F32).unwrap();
    let r2 = train(&fresh, &data, None, &tcfg, &out_b, &mut |_| {}).unwrap();
    assert_eq!(r2.resumed_from, Some(4));
    assert!(r2.finished);
    assert_eq!(r2.first_loss, r.first_loss);
    assert_eq!(read_train_log(&out_b).unwrap().len(), 9);
    let worst = max_param_diff(&straight, &fresh);
    eprintln!("resume: max |Δparam| = {worst:e}");
    assert!(worst < 1e-5, "max difference {worst}");

    // Resuming with different data is refused.
    let other = synthetic(13, vocab as u32);
    let again = Student::new(mini_config_v(vocab), 1, &Device::Cpu, DType::F32).unwrap();
    assert!(matches!(
        train(&again, &other, None, &tcfg, &out_b, &mut |_| {}),
        Err(DistillError::Resume { .. })
    ));
}

/// Largest absolute difference between the same parameter of two students.
fn max_param_diff(a: &Student, b: &Student) -> f32 {
    let flat = |v: &candle_core::Var| -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    };
    a.vars()
        .iter()
        .flat_map(|(name, v)| {
            let (x, y) = (flat(v), flat(&b.vars()[name]));
            x.into_iter().zip(y).map(|(x, y)| (x - y).abs())
        })
        .fold(0f32, f32::max)
}

fn mini_config_v(vocab: usize) -> StudentConfig {
    StudentConfig {
        vocab_size: vocab,
        ..mini_config()
    }
}

/// Central finite differences against backprop, in f64, for elements of every kind of
/// parameter, through cross-entropy and the KD losses. A fused op without a backward
/// pass (candle-nn 0.11's `rms_norm`, `softmax_last_dim`, `rope_i`) would leave a
/// gradient missing or wrong here.
#[test]
fn finite_difference_gradient_check() {
    let cfg = StudentConfig {
        vocab_size: 40,
        hidden_size: 16,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 24,
        tie_embeddings: false,
        ..StudentConfig::tiny()
    };
    let dev = Device::Cpu;
    let s = Student::new(cfg, 5, &dev, DType::F64).unwrap();
    // Non-trivial norm gains, so their gradients are not special.
    for (name, v) in s.vars() {
        if v.rank() == 1 {
            let n = v.elem_count();
            let vals: Vec<f64> = (0..n)
                .map(|i| 0.8 + 0.03 * ((i * 7 + name.len()) % 13) as f64)
                .collect();
            v.set(&candle_core::Tensor::from_vec(vals, n, &dev).unwrap())
                .unwrap();
        }
    }
    let ids = candle_core::Tensor::from_vec(
        vec![3u32, 17, 5, 9, 31, 2, 8, 8, 1, 39, 0, 12],
        (2, 6),
        &dev,
    )
    .unwrap();
    let targets =
        candle_core::Tensor::from_vec(vec![17u32, 5, 9, 31, 2, 4, 8, 1, 39, 0, 12, 7], 12, &dev)
            .unwrap();
    let tops: Vec<TopK> = (0..12)
        .map(|i| TopK {
            ids: vec![(i * 3) % 40, (i * 5 + 1) % 40],
            logprobs: vec![-0.7, -1.6],
        })
        .collect();
    let top_refs: Vec<&TopK> = tops.iter().collect();
    let teacher = TeacherTargets::new(&top_refs, 2, &dev, DType::F64).unwrap();
    let loss_fn = |kind: LossKind| -> candle_core::Tensor {
        let logits = s.forward(&ids).unwrap().reshape((12, 40)).unwrap();
        match kind {
            LossKind::Sft => cross_entropy_sum(&logits, &targets).unwrap(),
            k => kd_sum(k, &logits, &teacher).unwrap(),
        }
    };
    let names = [
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.attn_v.weight",
        "blk.1.attn_output.weight",
        "blk.1.ffn_norm.weight",
        "blk.0.ffn_gate.weight",
        "blk.1.ffn_up.weight",
        "blk.1.ffn_down.weight",
        "output_norm.weight",
        "output.weight",
    ];
    let mut checked = 0;
    for kind in [LossKind::Sft, LossKind::Kl, LossKind::Rkl, LossKind::Jsd] {
        let grads = loss_fn(kind).backward().unwrap();
        for (ni, name) in names.iter().enumerate() {
            let var = &s.vars()[*name];
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{kind}: no gradient for {name}"))
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let shape = var.as_tensor().shape().clone();
            // Three elements per parameter; for the embedding, rows of tokens in the batch.
            let picks = if *name == "token_embd.weight" {
                vec![17 * 16 + 3, 5 * 16 + 11, 9 * 16]
            } else {
                let n = base.len();
                vec![(ni * 37) % n, (ni * 101 + 7) % n, n - 1]
            };
            for &i in &picks {
                let h = 1e-5;
                let eval = |delta: f64| -> f64 {
                    let mut p = base.clone();
                    p[i] += delta;
                    var.set(&candle_core::Tensor::from_vec(p, shape.clone(), &dev).unwrap())
                        .unwrap();
                    loss_fn(kind).to_scalar::<f64>().unwrap()
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                var.set(&candle_core::Tensor::from_vec(base.clone(), shape.clone(), &dev).unwrap())
                    .unwrap();
                let err = (fd - g[i]).abs() / (fd.abs().max(g[i].abs()).max(1e-4));
                assert!(
                    err < 1e-4,
                    "{kind} {name}[{i}]: backprop {} vs finite difference {fd}",
                    g[i]
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * names.len() * 3);
}

#[test]
fn throughput_measurement_runs() {
    let tps = measure_tokens_per_sec(mini_config(), 2, 32, 2).unwrap();
    eprintln!("mini config training throughput: {tps:.0} tokens/s");
    assert!(tps > 0.0);
}

/// A synthetic teacher for on-policy training: after token `t` it puts 0.9 on
/// `rule(t)` and 0.05 on `t` — a bigram the student can only learn on its own
/// samples when the data never shows it. Counts its calls.
struct BigramTeacher {
    vocab: u32,
    calls: usize,
}

impl BigramTeacher {
    fn rule(&self, t: u32) -> u32 {
        (t * 5 + 1) % self.vocab
    }
}

impl Teacher for BigramTeacher {
    fn top_k(&mut self, tokens: &[u32], _k: usize) -> Result<Vec<TopK>, TeacherError> {
        self.calls += 1;
        Ok(tokens[..tokens.len() - 1]
            .iter()
            .map(|&t| TopK {
                ids: vec![self.rule(t), t],
                logprobs: vec![0.9f32.ln(), 0.05f32.ln()],
            })
            .collect())
    }
}

/// Share of the student's sampled continuations of the data's prompts that follow the
/// teacher's bigram rule.
fn follows_rule(student: &Student, data: &Dataset, teacher: &BigramTeacher) -> f64 {
    let (mut hits, mut n) = (0usize, 0usize);
    for (i, ex) in data.examples.iter().enumerate() {
        let prompt = &ex.tokens[..ex.prompt_len];
        let mut sampler = Sampler::new(
            SamplingParams {
                seed: 5,
                ..SamplingParams::default()
            },
            i as u64,
        );
        let out = student.generate(prompt, &mut sampler, 12, &[]).unwrap();
        let mut prev = *prompt.last().unwrap();
        for &t in &out {
            hits += usize::from(t == teacher.rule(prev));
            n += 1;
            prev = t;
        }
    }
    hits as f64 / n as f64
}

/// On-policy distillation (GKD): with every step on-policy the harvest's responses
/// (which never follow the rule) are not trained on at all, so the student's own samples
/// can only come to follow the teacher's bigram through the teacher's scores of them.
/// Half on-policy, a run stopped and resumed equals the uninterrupted one, and the
/// setting is part of the checkpoint.
#[test]
fn on_policy_training_moves_the_students_own_samples_towards_the_teacher() {
    let vocab = 64;
    let cfg = mini_config_v(vocab);
    let data = synthetic(16, vocab as u32);
    let mut teacher = BigramTeacher {
        vocab: vocab as u32,
        calls: 0,
    };
    let student = Student::new(cfg.clone(), 3, &Device::Cpu, DType::F32).unwrap();
    let before = follows_rule(&student, &data, &teacher);
    let on_policy = OnPolicy {
        fraction: 1.0,
        max_new_tokens: 12,
        temperature: 1.0,
    };
    let tcfg = TrainConfig {
        loss: LossKind::Kl,
        top_k: 2,
        epochs: 15,
        batch_size: 4,
        seq_len: 32,
        lr: 1e-2,
        checkpoint_every: 0,
        seed: 4,
        on_policy: Some(on_policy.clone()),
        ..TrainConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let r = train_with_teacher(
        &student,
        &data,
        None,
        &tcfg,
        Some(&mut teacher),
        &dir.path().join("a"),
        &mut |_| {},
    )
    .unwrap();
    let after = follows_rule(&student, &data, &teacher);
    eprintln!(
        "on-policy: samples following the teacher's rule {before:.3} → {after:.3} ({} steps, {} teacher calls)",
        r.steps, teacher.calls
    );
    assert_eq!(r.on_policy_steps, r.steps);
    assert_eq!(teacher.calls, 60 * 4);
    assert!(read_train_log(&dir.path().join("a"))
        .unwrap()
        .iter()
        .all(|e| e.on_policy));
    assert!(before < 0.1, "{before}");
    assert!(after > 0.6, "{before} → {after}");

    // Without a teacher, or with cross-entropy, on-policy training is refused.
    let fresh = || Student::new(cfg.clone(), 3, &Device::Cpu, DType::F32).unwrap();
    let out = dir.path().join("x");
    assert!(matches!(
        train(&fresh(), &data, None, &tcfg, &out, &mut |_| {}),
        Err(DistillError::Config(_))
    ));
    let sft = TrainConfig {
        loss: LossKind::Sft,
        ..tcfg.clone()
    };
    assert!(matches!(
        train_with_teacher(
            &fresh(),
            &data,
            None,
            &sft,
            Some(&mut teacher),
            &out,
            &mut |_| {}
        ),
        Err(DistillError::Config(_))
    ));

    // Half on-policy: stop after 3 steps and resume = 8 steps straight.
    let half = TrainConfig {
        epochs: 2,
        checkpoint_every: 2,
        on_policy: Some(OnPolicy {
            fraction: 0.5,
            ..on_policy
        }),
        ..tcfg.clone()
    };
    let straight = fresh();
    let r = train_with_teacher(
        &straight,
        &data,
        None,
        &half,
        Some(&mut teacher),
        &dir.path().join("b"),
        &mut |_| {},
    )
    .unwrap();
    assert!(
        r.on_policy_steps > 0 && r.on_policy_steps < 8,
        "{}",
        r.on_policy_steps
    );
    let out_c = dir.path().join("c");
    let stop = TrainConfig {
        stop_after: Some(3),
        ..half.clone()
    };
    train_with_teacher(
        &fresh(),
        &data,
        None,
        &stop,
        Some(&mut teacher),
        &out_c,
        &mut |_| {},
    )
    .unwrap();
    let resumed = Student::new(cfg.clone(), 77, &Device::Cpu, DType::F32).unwrap();
    let r2 = train_with_teacher(
        &resumed,
        &data,
        None,
        &half,
        Some(&mut teacher),
        &out_c,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r2.resumed_from, Some(3));
    let log_b: Vec<bool> = read_train_log(&dir.path().join("b"))
        .unwrap()
        .iter()
        .map(|e| e.on_policy)
        .collect();
    let log_c: Vec<bool> = read_train_log(&out_c)
        .unwrap()
        .iter()
        .map(|e| e.on_policy)
        .collect();
    assert_eq!(log_b, log_c);
    let worst = max_param_diff(&straight, &resumed);
    assert!(worst < 1e-5, "max difference {worst}");
    // A different on-policy fraction cannot resume that run.
    let other = TrainConfig {
        on_policy: Some(OnPolicy {
            fraction: 0.25,
            max_new_tokens: 12,
            temperature: 1.0,
        }),
        ..half
    };
    assert!(matches!(
        train_with_teacher(
            &fresh(),
            &data,
            None,
            &other,
            Some(&mut teacher),
            &out_c,
            &mut |_| {}
        ),
        Err(DistillError::Resume { .. })
    ));
}
