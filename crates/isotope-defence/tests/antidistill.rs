//! Antidistillation sampling on tiny candle students (pure candle, seconds): λ = 0 is
//! plain sampling token for token (with and without a watermark), the finite
//! difference agrees with autograd, and defended text helps the proxy less.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use isotope_defence::{proxy_gradient, Antidistill, AntidistillConfig, ProxyGradient};
use isotope_distill::{Dataset, Example, Student, StudentConfig};
use isotope_sampling::{LogitAdjust, Sampler, SamplingParams, StepContext, TokenId};
use isotope_watermark::{Scheme, WatermarkHook, WatermarkKey};

const VOCAB: usize = 96;

fn tiny() -> StudentConfig {
    StudentConfig {
        vocab_size: VOCAB,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 48,
        rope_theta: 10_000.0,
        max_seq_len: 256,
        tie_embeddings: true,
        rms_norm_eps: 1e-5,
    }
}

fn student(seed: u64, dtype: DType) -> Student {
    Student::new(tiny(), seed, &Device::Cpu, dtype).unwrap()
}

/// Deterministic pseudo-random prompts of 4–11 tokens.
fn prompts(n: usize, salt: u64) -> Vec<Vec<TokenId>> {
    (0..n as u64)
        .map(|i| {
            let mut x = ((i + 1) * 0x9E37_79B9) ^ salt;
            let len = 4 + (x % 8) as usize;
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    ((x >> 33) % VOCAB as u64) as TokenId
                })
                .collect()
        })
        .collect()
}

fn params(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed,
        ..SamplingParams::default()
    }
}

fn dataset(seqs: &[(Vec<TokenId>, Vec<TokenId>)]) -> Dataset {
    Dataset {
        examples: seqs
            .iter()
            .enumerate()
            .map(|(i, (p, r))| Example {
                tokens: p.iter().chain(r).copied().collect(),
                prompt_len: p.len(),
                teacher: vec![None; r.len()],
                line: i + 1,
            })
            .collect(),
        warnings: Vec::new(),
    }
}

/// The teacher's (undefended) responses to `prompts`: the held-out task set.
fn teacher_outputs(teacher: &Student, prompts: &[Vec<TokenId>], len: usize) -> Dataset {
    let seqs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut s = Sampler::new(params(1000 + i as u64), 0);
            (p.clone(), teacher.generate(p, &mut s, len, &[]).unwrap())
        })
        .collect();
    dataset(&seqs)
}

fn defence(proxy: &Student, g: &ProxyGradient, lambda: f32, eps: f64) -> Arc<Antidistill> {
    let cfg = AntidistillConfig {
        lambda,
        eps,
        top_k: 16,
        ..AntidistillConfig::default()
    };
    Arc::new(Antidistill::new(proxy, g, cfg).unwrap())
}

fn setup() -> (Student, Student, ProxyGradient) {
    let teacher = student(1, DType::F32);
    let proxy = student(2, DType::F32);
    let held_out = teacher_outputs(&teacher, &prompts(6, 7), 24);
    let g = proxy_gradient(&proxy, &held_out, &mut |_, _| {}).unwrap();
    (teacher, proxy, g)
}

fn watermark() -> Box<WatermarkHook> {
    let key = Arc::new(WatermarkKey::from_bytes([7; 32]));
    let scheme: Scheme = "kgw:gamma=0.25,delta=2,h=1".parse().unwrap();
    Box::new(WatermarkHook::new(
        key,
        &scheme,
        vec![false; VOCAB].into(),
        false,
    ))
}

#[test]
fn lambda_zero_reproduces_plain_sampling_token_for_token() {
    let (teacher, proxy, g) = setup();
    let off = defence(&proxy, &g, 0.0, 1e-2);
    let on = defence(&proxy, &g, 8.0, 1e-2);
    let mut changed = 0;
    for (i, p) in prompts(5, 99).iter().enumerate() {
        for marked in [false, true] {
            let sampler = || {
                let s = Sampler::new(params(i as u64), 0);
                if marked {
                    s.with_hook(watermark())
                } else {
                    s
                }
            };
            let plain = teacher.generate(p, &mut sampler(), 40, &[]).unwrap();
            let mut zero = sampler().with_adjust(Box::new(off.stage()));
            assert_eq!(
                teacher.generate(p, &mut zero, 40, &[]).unwrap(),
                plain,
                "prompt {i}, watermark {marked}"
            );
            let mut strong = sampler().with_adjust(Box::new(on.stage()));
            if teacher.generate(p, &mut strong, 40, &[]).unwrap() != plain {
                changed += 1;
            }
        }
    }
    // The comparison is not vacuous: the stage ran, and λ > 0 does change the text.
    assert_eq!(off.stats().failures(), 0);
    assert!(off.stats().steps() >= 10 * 40);
    assert!(changed >= 8, "λ = 8 changed only {changed} of 10 texts");
}

/// `⟨ĝ, ∇θ log p(x | prefix)⟩` by autograd, for every x.
fn autograd_directional(
    proxy: &Student,
    dir: &BTreeMap<String, Tensor>,
    prefix: &[TokenId],
) -> Vec<f64> {
    (0..VOCAB as TokenId)
        .map(|x| {
            let ids = Tensor::from_slice(prefix, (1, prefix.len()), &Device::Cpu).unwrap();
            let logits = proxy.forward(&ids).unwrap();
            let last = logits
                .narrow(1, prefix.len() - 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap();
            let lp = isotope_distill::log_softmax_last(&last.unsqueeze(0).unwrap()).unwrap();
            let lx = lp.narrow(1, x as usize, 1).unwrap().sum_all().unwrap();
            let grads = lx.backward().unwrap();
            let mut dot = 0f64;
            for (name, var) in proxy.vars() {
                if let (Some(gr), Some(d)) = (grads.get(var.as_tensor()), dir.get(name)) {
                    let d = d.to_dtype(DType::F64).unwrap();
                    dot += (gr * d)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                }
            }
            dot
        })
        .collect()
}

#[test]
fn finite_difference_agrees_with_autograd() {
    // f64 weights: the check is about the formula, not f32 rounding.
    let teacher = student(1, DType::F32);
    let proxy = student(2, DType::F64);
    let held_out = teacher_outputs(&teacher, &prompts(3, 5), 12);
    let g = proxy_gradient(&proxy, &held_out, &mut |_, _| {}).unwrap();
    let dir = g.unit_direction().unwrap();
    let ad = defence(&proxy, &g, 1.0, 1e-4);
    let prefix = &prompts(1, 11)[0];
    let want = autograd_directional(&proxy, &dir, prefix);
    let got = ad.delta_full(prefix).unwrap();
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    assert!(scale > 1e-3, "degenerate direction: max |Δ| = {scale}");
    for (x, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(
            (w - g).abs() < 1e-5 * scale,
            "token {x}: autograd {w}, finite difference {g}"
        );
    }
    // The fast path (candidate rows only, no normaliser) equals the full Δ up to one
    // shared constant.
    let cands: Vec<TokenId> = (0..VOCAB as TokenId).step_by(5).collect();
    let ids = Tensor::from_slice(prefix.as_slice(), (1, prefix.len()), &Device::Cpu).unwrap();
    let last = |s: &Student| {
        s.hidden(&ids, None)
            .unwrap()
            .narrow(1, prefix.len() - 1, 1)
            .unwrap()
            .reshape((1, 32))
            .unwrap()
    };
    let plus = proxy.perturbed(&dir, 1e-4).unwrap();
    let minus = proxy.perturbed(&dir, -1e-4).unwrap();
    let fast = ad
        .delta_unnormalised(&last(&plus), &last(&minus), &cands)
        .unwrap();
    let shift = f64::from(fast[0]) - got[cands[0] as usize];
    for (&c, f) in cands.iter().zip(&fast) {
        let d = f64::from(*f) - got[c as usize] - shift;
        assert!(d.abs() < 1e-5 * scale, "token {c}: off by {d}");
    }
}

/// Held-out loss of `proxy` after one SGD step of size `lr` on `texts`.
fn loss_after_one_step(proxy: &Student, texts: &Dataset, held_out: &Dataset, lr: f64) -> f64 {
    let step = proxy_gradient(proxy, texts, &mut |_, _| {}).unwrap();
    let trained = proxy.perturbed(&step.tensors, -lr).unwrap();
    proxy_gradient(&trained, held_out, &mut |_, _| {})
        .unwrap()
        .report
        .unwrap()
        .loss
}

/// One step on plain vs defended teacher text at λ = 6 × the typical |Δ|: the
/// held-out loss gains (plain, defended). The plain text is truncated exactly as the
/// defence truncates (top-16, and the plausibility cut `min_p`), so the only
/// difference between the two text sets is the λ·Δ adjustment.
fn gains(min_p: f32, no_repeat_ngram: usize) -> (f64, f64) {
    // A teacher with something to learn: a random student's logits are nearly flat
    // (std ≈ 0.1), so its embedding is scaled ×40 (logit std ≈ 4).
    let base = student(1, DType::F32);
    let embd = base.vars()["token_embd.weight"].as_tensor().clone();
    let teacher = base
        .perturbed(
            &BTreeMap::from([("token_embd.weight".to_string(), embd)]),
            39.0,
        )
        .unwrap();
    let proxy = student(2, DType::F32);
    let held_out = teacher_outputs(&teacher, &prompts(8, 7), 24);
    let g = proxy_gradient(&proxy, &held_out, &mut |_, _| {}).unwrap();
    let before = g.report.as_ref().unwrap().loss;
    // λ in units of the typical |Δ| on one prefix: the adjustment is then ~6 logits.
    const LAMBDA_RMS: f64 = 6.0;
    let probe = defence(&proxy, &g, 1.0, 1e-2);
    let d = probe.delta_full(&prompts(1, 3)[0]).unwrap();
    let rms = (d.iter().map(|x| x * x).sum::<f64>() / d.len() as f64).sqrt();
    let ad = Arc::new(
        Antidistill::new(
            &proxy,
            &g,
            AntidistillConfig {
                lambda: (LAMBDA_RMS / rms) as f32,
                eps: 1e-2,
                top_k: 16,
                min_p,
                no_repeat_ngram,
            },
        )
        .unwrap(),
    );
    let truncated = |seed| SamplingParams {
        top_k: 16,
        min_p,
        ..params(seed)
    };
    let mut plain = Vec::new();
    let mut defended = Vec::new();
    for (i, p) in prompts(12, 1234).iter().enumerate() {
        let mut s = Sampler::new(truncated(50 + i as u64), 0);
        plain.push((p.clone(), teacher.generate(p, &mut s, 32, &[]).unwrap()));
        let mut s = Sampler::new(truncated(50 + i as u64), 0).with_adjust(Box::new(ad.stage()));
        defended.push((p.clone(), teacher.generate(p, &mut s, 32, &[]).unwrap()));
    }
    assert_eq!(ad.stats().failures(), 0);
    // A small step, where the first-order reasoning behind Δ holds: with the same
    // texts at lr 0.2 the curvature term dominates and the defended (higher-gradient)
    // text helps *more* — the defence is a first-order one, as in the paper.
    let lr = 0.05;
    let after_plain = loss_after_one_step(&proxy, &dataset(&plain), &held_out, lr);
    let after_defended = loss_after_one_step(&proxy, &dataset(&defended), &held_out, lr);
    eprintln!(
        "min_p {min_p}, no-repeat {no_repeat_ngram}: λ = {:.1} (rms Δ {rms:.4}); held-out \
         loss {before:.4}: one step on plain text → {after_plain:.4}, on defended text → \
         {after_defended:.4}",
        LAMBDA_RMS / rms
    );
    (before - after_plain, before - after_defended)
}

/// The mechanism itself (no guards): defended text helps the proxy less than half as
/// much as plain text.
#[test]
fn defended_text_helps_the_proxy_less() {
    let (gain_plain, gain_defended) = gains(0.0, 0);
    assert!(
        gain_plain > 0.0,
        "plain teacher text should help the proxy: {gain_plain}"
    );
    assert!(
        gain_defended < 0.5 * gain_plain,
        "defended text helped the proxy {gain_defended:.5} nats, plain text {gain_plain:.5}"
    );
}

/// With the default repeat guard the defence keeps its effect. The plausibility cut
/// is off here (its default, `DEFAULT_MIN_P`, is for real teachers) for the reason
/// this teacher shows: its logits are sharp (std ≈ 4), and even α = 0.001 left the
/// defended text helping the proxy as much as plain text (3.9619 vs 3.9618 after one
/// step, measured) — here the defence works only by promoting tokens the teacher finds
/// implausible.
#[test]
fn guarded_defence_still_helps_the_proxy_less() {
    let d = AntidistillConfig::default();
    assert_eq!(d.min_p, isotope_defence::DEFAULT_MIN_P);
    let (gain_plain, gain_defended) = gains(0.0, d.no_repeat_ngram);
    assert!(gain_plain > 0.0, "{gain_plain}");
    assert!(
        gain_defended < 0.5 * gain_plain,
        "defended text helped the proxy {gain_defended:.5} nats, plain text {gain_plain:.5}"
    );
}

fn guarded(
    proxy: &Student,
    g: &ProxyGradient,
    min_p: f32,
    no_repeat_ngram: usize,
) -> Arc<Antidistill> {
    let cfg = AntidistillConfig {
        lambda: 8.0,
        eps: 1e-2,
        top_k: 16,
        min_p,
        no_repeat_ngram,
    };
    Arc::new(Antidistill::new(proxy, g, cfg).unwrap())
}

/// Logits of one step, pseudo-random but fixed.
fn step_logits() -> Vec<f32> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..VOCAB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 1000) as f32 / 250.0
        })
        .collect()
}

/// The plausibility cut: exactly the top-k candidates with p ≥ α · p_max survive a
/// strong defence, whatever the proxy says about the others.
#[test]
fn plausibility_cut_keeps_exactly_the_plausible_candidates() {
    let (_, proxy, g) = setup();
    let prompt: Vec<TokenId> = vec![3, 14, 15, 92];
    let ctx = StepContext {
        prompt: &prompt,
        generated: &[],
    };
    let before = step_logits();
    let top = isotope_sampling::top_n(&before, 16);
    let z_max = before[top[0] as usize];
    for alpha in [0.0f32, 0.3, 0.6, 0.95] {
        let mut stage = guarded(&proxy, &g, alpha, 0).stage();
        let mut logits = before.clone();
        stage.adjust(&ctx, &mut logits);
        let want: Vec<TokenId> = top
            .iter()
            .copied()
            .filter(|&c| alpha == 0.0 || (before[c as usize] - z_max).exp() >= alpha)
            .collect();
        let mut kept: Vec<TokenId> = (0..VOCAB as TokenId)
            .filter(|&c| logits[c as usize].is_finite())
            .collect();
        kept.sort_unstable();
        let mut want_sorted = want.clone();
        want_sorted.sort_unstable();
        assert_eq!(kept, want_sorted, "α = {alpha}");
        assert!(!kept.is_empty());
    }
}

/// The repeat guard: a candidate that would repeat a trigram of the answer is never
/// raised. Every candidate is tried as the repeat; without the guard some are raised.
#[test]
fn repeat_guard_never_raises_a_token_that_repeats_an_ngram() {
    let (_, proxy, g) = setup();
    let prompt: Vec<TokenId> = vec![3, 14, 15, 92];
    let before = step_logits();
    let cands = isotope_sampling::top_n(&before, 16);
    let mut raised_without_guard = 0;
    for &c in &cands {
        // The answer so far ends in (7, 8), which was followed by c before.
        let generated = vec![7, 8, c, 40, 7, 8];
        let ctx = StepContext {
            prompt: &prompt,
            generated: &generated,
        };
        for (guard, d) in [
            (true, guarded(&proxy, &g, 0.0, 3)),
            (false, guarded(&proxy, &g, 0.0, 0)),
        ] {
            let mut stage = d.stage();
            let mut logits = before.clone();
            stage.adjust(&ctx, &mut logits);
            let i = c as usize;
            assert!(logits[i].is_finite(), "candidate {c} kept");
            if guard {
                assert!(
                    logits[i] <= before[i],
                    "candidate {c}: {} → {}",
                    before[i],
                    logits[i]
                );
            } else if logits[i] > before[i] {
                raised_without_guard += 1;
            }
            // Non-candidates are removed either way.
            let kept = logits.iter().filter(|l| l.is_finite()).count();
            assert_eq!(kept, cands.len());
        }
    }
    assert!(
        raised_without_guard > 0,
        "the unguarded defence raises some candidates"
    );
}
