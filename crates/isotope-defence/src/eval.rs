//! `isotope eval defences`: the trade-off of antidistillation sampling over λ, measured
//! with the real teacher (llama.cpp through `isotope-engine`) and the real distillation
//! trainer (`isotope_distill::train`).
//!
//! For each λ: the teacher answers the same training prompts with the defence at λ
//! (same sampling seeds); **teacher quality** is the perplexity of those answers under
//! the *undefended* teacher (what an ordinary user loses), how often each answer token
//! is the undefended teacher's first choice, and the answers' distinct-bigram share —
//! perplexity alone rewards a defence that makes answers repetitive, the bigram share
//! shows it. A student starting from the same weights is fine-tuned on them with the
//! same budget, and **student quality** is measured on held-out *undefended* teacher
//! answers to other prompts (what a distiller gains): its perplexity, its KL divergence
//! from the teacher's next-token distribution, and how often its first choice is the
//! teacher's. λ = 0 is the undefended baseline.
//!
//! The students may start from other weights than the defence's proxy
//! (`student_init`): a defence tuned against the very model that is then distilled
//! measures the best case, not what an attacker with their own student sees.
//!
//! The responses are generated locally through the engine with the same stage
//! `isotope serve` attaches per sequence (no HTTP in the loop, so the numbers measure
//! the defence, not the harvest). Every λ, 0 included, samples from the teacher's
//! top-k (the stage's candidate set), so λ = 0 differs from the others only by the
//! defence; the held-out reference answers are plain, untruncated sampling.
//!
//! This is the one module of the crate that touches llama.cpp (the teacher); the
//! defence itself does not.

use std::path::Path;
use std::sync::Arc;

use isotope_distill::{
    argmax, kl_top_tail, log_softmax_row, train, Dataset, Example, Student, StudentTokenizer,
    TrainConfig,
};
use isotope_engine::{BatchConfig, Batcher, ChatMessage, Event, GenerationRequest, Model};
use isotope_sampling::{Sampler, SamplingParams, TokenId};
use serde::Serialize;

use crate::antidistill::Antidistill;
use crate::error::{DefenceError, Result};

/// What to run.
#[derive(Clone, Debug)]
pub struct DefenceEvalConfig {
    pub lambdas: Vec<f32>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    /// Sequences decoded at once.
    pub concurrency: usize,
    pub threads: Option<usize>,
    /// The student's training budget (the same for every λ).
    pub train: TrainConfig,
}

/// Teacher alternatives kept per held-out position for the KL estimate.
pub const KL_TOP_K: usize = 20;

/// One λ of the trade-off.
#[derive(Clone, Debug, Serialize)]
pub struct DefencePoint {
    pub lambda: f32,
    /// Perplexity of the defended answers under the undefended teacher.
    pub teacher_ppl: f64,
    /// Response tokens those answers hold.
    pub teacher_tokens: usize,
    /// Share of answer tokens that are the undefended teacher's most likely token.
    pub teacher_top1_agreement: f64,
    /// Distinct bigrams / bigrams, per answer, averaged (1 = no repeated bigram).
    pub teacher_distinct2: f64,
    /// The student's perplexity on held-out undefended teacher answers.
    pub student_ppl: f64,
    /// Mean KL(teacher ‖ student) per held-out answer position (nats), over the
    /// teacher's top-[`KL_TOP_K`] tokens plus one bucket for the rest
    /// ([`isotope_distill::kl_top_tail`], the definition `distill eval` and the `kl`
    /// loss use): a lower bound on the full KL (merging outcomes never raises a
    /// divergence).
    pub student_kl: f64,
    /// Share of held-out positions where the student's most likely token is the
    /// teacher's.
    pub student_top1_agreement: f64,
    /// The student's final training loss.
    pub student_train_loss: f64,
    /// Sequences on which the defence gave up (should be 0).
    pub defence_failures: u64,
    /// Relative perplexity increase over the first λ (the baseline): what an ordinary
    /// user loses (teacher) and what the distiller loses (student). The goal of the
    /// defence is `student_ppl_increase ≥ 2 × teacher_ppl_increase`.
    pub teacher_ppl_increase: f64,
    pub student_ppl_increase: f64,
    /// Relative KL increase over the first λ.
    pub student_kl_increase: f64,
}

/// The whole evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct DefenceEvalReport {
    pub points: Vec<DefencePoint>,
    /// The student before any fine-tuning, on the same held-out answers.
    pub student_ppl_before: f64,
    /// Its KL from the teacher there (see [`DefencePoint::student_kl`]).
    pub student_kl_before: f64,
    /// `"proxy"` when the students start from the defence's proxy, else their source.
    pub student_init: String,
    pub train_prompts: usize,
    pub heldout_prompts: usize,
    pub heldout_tokens: usize,
    pub note: &'static str,
}

/// Where the responses came from.
pub const NOTE: &str = "responses generated locally through the engine with the stage the \
server uses; every λ (0 included) samples from the teacher's top-k; students fine-tuned with sft \
on each λ's answers from the same start, same budget; held-out = plain teacher answers; KL over \
the teacher's top-20 + a tail bucket (a lower bound)";

/// Prompt tokens (the teacher's chat template) of each prompt text.
fn chat_prompts(model: &Model, prompts: &[String]) -> Result<Vec<Vec<TokenId>>> {
    prompts
        .iter()
        .map(|p| {
            model
                .chat_tokens(&[ChatMessage::new("user", p.clone())])
                .map_err(|e| DefenceError::Config(format!("chat template: {e}")))
        })
        .collect()
}

/// The teacher's answers (token ids, end-of-generation excluded) to `prompts`, with the
/// defence at `lambda` when given.
fn answers(
    model: &Model,
    prompts: &[Vec<TokenId>],
    defence: Option<(&Arc<Antidistill>, f32)>,
    cfg: &DefenceEvalConfig,
) -> Result<Vec<Vec<TokenId>>> {
    let eng = |e: isotope_engine::EngineError| DefenceError::Config(format!("engine: {e}"));
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut batcher = Batcher::new(
        model,
        BatchConfig {
            slots: cfg.concurrency.max(1),
            ctx_per_slot: (longest + cfg.max_tokens + 8) as u32,
            threads: cfg.threads,
            ..BatchConfig::default()
        },
    )
    .map_err(eng)?;
    let mut out = vec![Vec::new(); prompts.len()];
    let mut ids = std::collections::HashMap::new();
    let (mut next, mut done) = (0usize, 0usize);
    while done < prompts.len() {
        while next < prompts.len() && batcher.has_free_slot() {
            // Every defended point (λ = 0 included) samples from the teacher's top-k
            // above the plausibility cut only, as the stage does when λ > 0; otherwise
            // the λ = 0 baseline would differ from the others by truncation as well as
            // by the defence.
            let params = SamplingParams {
                temperature: cfg.temperature,
                seed: cfg.seed.wrapping_add(next as u64),
                top_k: defence.map_or(0, |(d, _)| d.config().top_k),
                min_p: defence.map_or(0.0, |(d, _)| d.config().min_p),
                ..SamplingParams::default()
            };
            let mut sampler = Sampler::new(params, 0);
            if let Some((d, lambda)) = defence {
                sampler = sampler.with_adjust(Box::new(d.stage_with_lambda(lambda)));
            }
            let id = batcher
                .submit(GenerationRequest {
                    prompt: prompts[next].clone(),
                    sampler,
                    max_tokens: Some(cfg.max_tokens),
                    stop: Vec::new(),
                    top_logprobs: 0,
                })
                .map_err(eng)?;
            ids.insert(id, next);
            next += 1;
        }
        for ev in batcher.step().map_err(eng)? {
            match ev {
                Event::Token { seq, sampled, .. } => {
                    if !model.is_eog(sampled.token) {
                        out[ids[&seq]].push(sampled.token);
                    }
                }
                Event::Finished { .. } => done += 1,
            }
        }
    }
    Ok(out)
}

/// The undefended teacher's view of answers: mean negative log-likelihood (nats per
/// token), answer tokens scored, and the share of them that were its first choice.
fn teacher_quality(
    model: &Model,
    prompts: &[Vec<TokenId>],
    answers: &[Vec<TokenId>],
    threads: Option<usize>,
) -> Result<(f64, usize, f64)> {
    let (mut sum, mut n, mut top1) = (0f64, 0usize, 0usize);
    for (p, a) in prompts.iter().zip(answers) {
        if a.is_empty() {
            continue;
        }
        let ids: Vec<TokenId> = p.iter().chain(a).copied().collect();
        let scores = model
            .score(&ids, 1, threads)
            .map_err(|e| DefenceError::Config(format!("scoring: {e}")))?;
        for s in &scores[p.len() - 1..] {
            sum -= f64::from(s.logprob);
            n += 1;
            top1 += usize::from(s.top.first().is_some_and(|t| t.0 == s.token));
        }
    }
    Ok((sum / n.max(1) as f64, n, top1 as f64 / n.max(1) as f64))
}

/// Distinct bigrams over bigrams of each answer (answers under two tokens skipped),
/// averaged over answers.
pub fn distinct2(answers: &[Vec<TokenId>]) -> f64 {
    let shares: Vec<f64> = answers
        .iter()
        .filter(|a| a.len() >= 2)
        .map(|a| {
            let pairs: std::collections::HashSet<(TokenId, TokenId)> =
                a.windows(2).map(|w| (w[0], w[1])).collect();
            pairs.len() as f64 / (a.len() - 1) as f64
        })
        .collect();
    shares.iter().sum::<f64>() / shares.len().max(1) as f64
}

/// The teacher's next-token distribution at each held-out answer position: its
/// top-[`KL_TOP_K`] (token, log-prob), most likely first.
type TeacherRef = Vec<Vec<(TokenId, f32)>>;

fn teacher_reference(
    model: &Model,
    prompts: &[Vec<TokenId>],
    answers: &[Vec<TokenId>],
    threads: Option<usize>,
) -> Result<Vec<TeacherRef>> {
    prompts
        .iter()
        .zip(answers)
        .map(|(p, a)| {
            if a.is_empty() {
                return Ok(Vec::new());
            }
            let ids: Vec<TokenId> = p.iter().chain(a).copied().collect();
            let scores = model
                .score(&ids, KL_TOP_K, threads)
                .map_err(|e| DefenceError::Config(format!("scoring: {e}")))?;
            Ok(scores[p.len() - 1..]
                .iter()
                .map(|s| s.top.clone())
                .collect())
        })
        .collect()
}

/// A student on held-out answers: mean NLL of the answer tokens, mean KL from the
/// teacher's distribution and the share of positions where its first choice is the
/// teacher's.
fn student_quality(
    student: &Student,
    prompts: &[Vec<TokenId>],
    answers: &[Vec<TokenId>],
    reference: &[TeacherRef],
) -> Result<(f64, f64, f64)> {
    let (mut nll, mut kl, mut top1, mut n) = (0f64, 0f64, 0usize, 0usize);
    for ((p, a), r) in prompts.iter().zip(answers).zip(reference) {
        if a.is_empty() {
            continue;
        }
        let ids: Vec<TokenId> = p.iter().chain(a).copied().collect();
        // row i predicts ids[i + 1]; the answer's tokens are predicted by rows
        // p.len() - 1 .. ids.len() - 1
        let logits = student.logits(&ids[..ids.len() - 1])?;
        for (k, row) in logits[p.len() - 1..].iter().enumerate() {
            let lq = log_softmax_row(row);
            nll -= lq[a[k] as usize];
            if let Some(top) = r.get(k) {
                kl += kl_top_tail(top, &lq);
                top1 += usize::from(top.first().map(|t| t.0) == Some(argmax(row)));
            }
            n += 1;
        }
    }
    let n = n.max(1) as f64;
    Ok((nll / n, kl / n, top1 as f64 / n))
}

fn dataset(prompts: &[Vec<TokenId>], answers: &[Vec<TokenId>], end: Option<TokenId>) -> Dataset {
    Dataset {
        examples: prompts
            .iter()
            .zip(answers)
            .enumerate()
            .map(|(i, (p, a))| {
                let mut tokens: Vec<TokenId> = p.iter().chain(a).copied().collect();
                tokens.extend(end);
                Example {
                    prompt_len: p.len(),
                    teacher: vec![None; tokens.len() - p.len()],
                    tokens,
                    line: i + 1,
                }
            })
            .collect(),
        warnings: Vec::new(),
    }
}

/// Run the evaluation. `student_init` is the students' starting point (named
/// `student_init_name` in the report; the defence's proxy unless the caller has
/// another); `work` receives one student directory per λ. `progress` gets a short
/// status.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_defences(
    model: &Model,
    student_init: &Student,
    student_init_name: &str,
    tokenizer: &StudentTokenizer,
    defence: &Arc<Antidistill>,
    train_prompts: &[String],
    heldout_prompts: &[String],
    cfg: &DefenceEvalConfig,
    work: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<DefenceEvalReport> {
    let end = tokenizer.token_id(isotope_distill::CHATML_END);
    let train_p = chat_prompts(model, train_prompts)?;
    let held_p = chat_prompts(model, heldout_prompts)?;
    progress("held-out teacher answers");
    let held_a = answers(model, &held_p, None, cfg)?;
    let reference = teacher_reference(model, &held_p, &held_a, cfg.threads)?;
    let (before_nll, before_kl, _) = student_quality(student_init, &held_p, &held_a, &reference)?;
    let mut points = Vec::new();
    for &lambda in &cfg.lambdas {
        progress(&format!("λ={lambda}: teacher answers"));
        let failures0 = defence.stats().failures();
        let a = answers(model, &train_p, Some((defence, lambda)), cfg)?;
        let failures = defence.stats().failures() - failures0;
        let (t_nll, t_tokens, t_top1) = teacher_quality(model, &train_p, &a, cfg.threads)?;
        progress(&format!("λ={lambda}: training the student"));
        let student = student_init.perturbed(&Default::default(), 0.0)?;
        let dir = work.join(format!("student-lambda-{lambda}"));
        let report = train(
            &student,
            &dataset(&train_p, &a, end),
            Some(tokenizer),
            &cfg.train,
            &dir,
            &mut |_| {},
        )?;
        progress(&format!("λ={lambda}: measuring the student"));
        let (s_nll, s_kl, s_top1) = student_quality(&student, &held_p, &held_a, &reference)?;
        points.push(DefencePoint {
            lambda,
            teacher_ppl: t_nll.exp(),
            teacher_tokens: t_tokens,
            teacher_top1_agreement: t_top1,
            teacher_distinct2: distinct2(&a),
            student_ppl: s_nll.exp(),
            student_kl: s_kl,
            student_top1_agreement: s_top1,
            student_train_loss: report.final_loss,
            defence_failures: failures,
            teacher_ppl_increase: 0.0,
            student_ppl_increase: 0.0,
            student_kl_increase: 0.0,
        });
    }
    if let Some(base) = points.first().cloned() {
        for p in &mut points {
            p.teacher_ppl_increase = p.teacher_ppl / base.teacher_ppl - 1.0;
            p.student_ppl_increase = p.student_ppl / base.student_ppl - 1.0;
            p.student_kl_increase = p.student_kl / base.student_kl.max(1e-12) - 1.0;
        }
    }
    Ok(DefenceEvalReport {
        points,
        student_ppl_before: before_nll.exp(),
        student_kl_before: before_kl,
        student_init: student_init_name.to_owned(),
        train_prompts: train_prompts.len(),
        heldout_prompts: heldout_prompts.len(),
        heldout_tokens: held_a.iter().map(Vec::len).sum(),
        note: NOTE,
    })
}

/// The trade-off as a PNG: over λ (x axis, as given), the teacher's perplexity (red),
/// the student's held-out perplexity (blue) and its KL from the teacher (green), each
/// divided by its value at the first λ (the baseline), so all share one axis. No text (plotters' text needs a
/// font a fresh machine lacks); the numbers are in the table / JSON.
pub fn tradeoff_png(path: &Path, report: &DefenceEvalReport) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: String| DefenceError::Config(format!("drawing {}: {e}", path.display()));
    let pts = &report.points;
    if pts.is_empty() {
        return Err(err("no points".into()));
    }
    let rel = |f: &dyn Fn(&DefencePoint) -> f64| -> Vec<(f64, f64)> {
        let base = f(&pts[0]).max(1e-12);
        pts.iter()
            .map(|p| (f64::from(p.lambda), f(p) / base))
            .collect()
    };
    let teacher = rel(&|p| p.teacher_ppl);
    let student = rel(&|p| p.student_ppl);
    let student_kl = rel(&|p| p.student_kl);
    let x_max = teacher.iter().map(|p| p.0).fold(1e-6, f64::max);
    let y_max = teacher
        .iter()
        .chain(&student)
        .chain(&student_kl)
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .build_cartesian_2d(0.0..x_max * 1.05, 0.0..y_max)
        .map_err(|e| err(e.to_string()))?;
    // Grid: tenths of the x range; y lines at every 0.25 of the baseline ratio.
    let grid = RGBColor(225, 225, 225);
    for i in 0..=10 {
        let x = x_max * f64::from(i) / 10.0;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_max)],
                grid.stroke_width(1),
            )))
            .map_err(|e| err(e.to_string()))?;
    }
    let mut y = 0.0;
    while y <= y_max {
        let colour = if (y - 1.0f64).abs() < 1e-9 {
            RGBColor(120, 120, 120)
        } else {
            grid
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, y), (x_max * 1.05, y)],
                colour.stroke_width(1),
            )))
            .map_err(|e| err(e.to_string()))?;
        y += 0.25;
    }
    for (series, colour) in [
        (teacher, RGBColor(200, 40, 40)),
        (student, RGBColor(30, 70, 190)),
        (student_kl, RGBColor(30, 150, 60)),
    ] {
        chart
            .draw_series(LineSeries::new(series.clone(), colour.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(series.iter().map(|&p| Circle::new(p, 4, colour.filled())))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_the_same_distribution_and_positive_otherwise() {
        let q = log_softmax_row(&[2.0, 1.0, 0.5, -1.0, 0.0]);
        let top: Vec<(TokenId, f32)> = vec![(0, q[0] as f32), (1, q[1] as f32)];
        assert!(kl_top_tail(&top, &q).abs() < 1e-6);
        let other = log_softmax_row(&[0.0, 2.0, 0.5, -1.0, 0.0]);
        let kl = kl_top_tail(&top, &other);
        assert!(kl > 0.1, "{kl}");
        // a lower bound on the full KL
        let full: f64 = q.iter().zip(&other).map(|(&p, &o)| p.exp() * (p - o)).sum();
        assert!(kl <= full + 1e-6, "{kl} > {full}"); // teacher log-probs are f32
    }

    #[test]
    fn distinct_bigrams() {
        assert_eq!(distinct2(&[vec![1, 2, 3, 4]]), 1.0);
        // 1 2 1 2 1 2: bigrams (1,2) (2,1) (1,2) (2,1) (1,2) → 2 distinct of 5
        assert!((distinct2(&[vec![1, 2, 1, 2, 1, 2]]) - 0.4).abs() < 1e-12);
        assert!((distinct2(&[vec![1, 2, 3], vec![7, 7, 7], vec![5]]) - 0.75).abs() < 1e-12);
    }
}
