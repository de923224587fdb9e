//! The training loop: batches, AdamW with warm-up + cosine, clipping, checkpoints and
//! resume, the JSONL log and the loss curve.
//!
//! Everything random about a run derives from `TrainConfig::seed` and the step
//! number: the data order of epoch `e` is a shuffle seeded by `(seed, e)`, so the
//! position in the data is fully described by the step, and a run resumed from a
//! checkpoint (weights + AdamW moments + step) continues exactly as an uninterrupted
//! one would.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use isotope_sampling::TokenId;
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::config::StudentConfig;
use crate::data::Dataset;
use crate::error::{io_err, CandleContext, DistillError, Result};
use crate::loss::{cross_entropy_sum, kd_sum, LossKind, TeacherTargets, TopK};
use crate::model::Student;
use crate::optim::{clip_scale, grad_norm, lr_at, AdamW, AdamWParams};
use crate::plot::loss_png;
use crate::teacher::{self, OnPolicy, Scored, Teacher};
use crate::tokenizer::{StudentTokenizer, TOKENIZER_FILE};

/// Training log, one JSON object per step.
pub const LOG_FILE: &str = "train_log.jsonl";
/// The loss curve.
pub const LOSS_PNG: &str = "loss.png";
/// The latest checkpoint's directory inside the output directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// The run's position, inside the checkpoint directory.
pub const STATE_FILE: &str = "train_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// How to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub loss: LossKind,
    /// Teacher top-k entries used per position by the KD losses.
    pub top_k: usize,
    pub epochs: usize,
    pub batch_size: usize,
    /// Longest input per example; longer examples are cut (their tail is not trained).
    /// Batches are padded to their longest member, not always to `seq_len`.
    pub seq_len: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// The cosine ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Linear warm-up steps; `None`: 5% of the run, at most 100.
    pub warmup_steps: Option<usize>,
    pub adamw: AdamWParams,
    /// Global gradient-norm cap; `0` disables clipping.
    pub grad_clip: f64,
    pub seed: u64,
    /// Cap on the run's length in steps (the schedule is laid out over it).
    pub max_steps: Option<usize>,
    /// Stop (with a checkpoint) after this many steps without changing the schedule —
    /// for interrupting a run on purpose; a later call with `resume` finishes it.
    pub stop_after: Option<usize>,
    /// Checkpoint every this many steps (and always at the end); `0`: only at the end.
    pub checkpoint_every: usize,
    /// Continue from `OUT/checkpoint` if one is there.
    pub resume: bool,
    /// On-policy distillation (GKD): a share of the steps train on the student's own
    /// samples, scored by the teacher given to [`train_with_teacher`]. Needs a
    /// token-level loss (`kl`, `rkl` or `jsd`).
    pub on_policy: Option<OnPolicy>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            loss: LossKind::Sft,
            top_k: 20,
            epochs: 1,
            batch_size: 4,
            seq_len: 256,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: None,
            adamw: AdamWParams::default(),
            grad_clip: 1.0,
            seed: 0,
            max_steps: None,
            stop_after: None,
            checkpoint_every: 200,
            resume: true,
            on_policy: None,
        }
    }
}

impl TrainConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(DistillError::Config(m.to_string()));
        if self.batch_size == 0 || self.epochs == 0 {
            return bad("batch_size and epochs must be positive");
        }
        if self.seq_len < 2 {
            return bad("seq_len must be at least 2");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr must be a positive number");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio must be in [0, 1]");
        }
        if self.loss.needs_top_logprobs() && self.top_k == 0 {
            return bad("top_k must be positive for kl, rkl and jsd");
        }
        if let Some(op) = &self.on_policy {
            op.validate()?;
            if !self.loss.needs_top_logprobs() {
                return bad(
                    "on-policy distillation needs a token-level loss (kl, rkl or jsd): \
                     cross-entropy on the student's own samples teaches it nothing",
                );
            }
        }
        Ok(())
    }
}

/// What the progress callback sees after every step.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    /// Steps done (1-based after the first step).
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    /// Training throughput of this run so far.
    pub tokens_per_sec: f64,
}

/// One line of `train_log.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (non-padding positions) in this step's batch.
    pub tokens: usize,
    /// Training throughput of this run so far.
    pub tokens_per_sec: f64,
    /// The batch was the student's own samples, scored by the teacher.
    #[serde(default)]
    pub on_policy: bool,
}

/// The outcome of [`train`]; the CLI's `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// Loss of the first step of the run (from the log when resumed).
    pub first_loss: f64,
    /// Mean loss of the last (up to) 10 steps — one step's loss on a small batch is
    /// noisy.
    pub final_loss: f64,
    /// Loss of the very last step.
    pub last_loss: f64,
    /// Tokens trained per second in this invocation.
    pub tokens_per_sec: f64,
    /// Trainable parameters of the student.
    pub params: usize,
    pub loss: LossKind,
    /// Steps done in total (including before a resume).
    pub steps: usize,
    pub total_steps: usize,
    /// True when the run reached `total_steps` (false when stopped by `stop_after`).
    pub finished: bool,
    /// Step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    pub examples: usize,
    /// Examples with teacher top-k log-probabilities.
    pub examples_with_top_logprobs: usize,
    /// Examples with nothing to train on within `seq_len` (prompt too long).
    pub examples_skipped: usize,
    /// Tokens trained in this invocation.
    pub tokens: u64,
    /// Steps (in this invocation) that trained on the student's own samples.
    pub on_policy_steps: usize,
    /// Harvest sequences with positions lacking top-k log-probs that the teacher
    /// scored to fill them (in this invocation; counted once per use).
    pub teacher_scored: usize,
    pub out_dir: PathBuf,
}

/// The run's position, saved with every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    step: usize,
    total_steps: usize,
    epoch: usize,
    batch_in_epoch: usize,
    seed: u64,
    data_fingerprint: String,
    examples: usize,
    batch_size: usize,
    seq_len: usize,
    loss: LossKind,
    top_k: usize,
    student: StudentConfig,
    #[serde(default)]
    on_policy: Option<OnPolicy>,
    /// A teacher scored the harvest's text-only sequences.
    #[serde(default)]
    teacher: bool,
}

/// One example cut to `seq_len`: inputs, and (position, target, teacher) per trained
/// position.
struct Sequence<'a> {
    inputs: &'a [TokenId],
    targets: Vec<(usize, TokenId, Option<&'a TopK>)>,
}

fn sequences(data: &Dataset, seq_len: usize) -> Vec<Sequence<'_>> {
    data.examples
        .iter()
        .filter_map(|ex| {
            let n_in = (ex.tokens.len() - 1).min(seq_len);
            let first = ex.prompt_len.saturating_sub(1);
            let targets: Vec<_> = (first..n_in)
                .map(|j| {
                    let r = j + 1 - ex.prompt_len;
                    (
                        j,
                        ex.tokens[j + 1],
                        ex.teacher.get(r).and_then(Option::as_ref),
                    )
                })
                .collect();
            (!targets.is_empty()).then(|| Sequence {
                inputs: &ex.tokens[..n_in],
                targets,
            })
        })
        .collect()
}

/// FNV-1a over the examples' tokens and prompt lengths: a resumed run must see the
/// same data.
fn fingerprint(data: &Dataset) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for ex in &data.examples {
        eat(ex.prompt_len as u64);
        eat(ex.tokens.len() as u64);
        ex.tokens.iter().for_each(|&t| eat(u64::from(t)));
    }
    format!("{h:016x}")
}

/// A permutation of `0..n`: a Fisher–Yates shuffle from the ChaCha8 stream
/// `(seed, stream)`. The trainer's data order of epoch `e` is `shuffled_order(seed, e, n)`.
pub fn shuffled_order(seed: u64, stream: usize, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream as u64);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Loss of one batch (mean over trained positions) and its real token count.
fn batch_loss(
    student: &Student,
    seqs: &[&Sequence<'_>],
    cfg: &TrainConfig,
) -> Result<(Tensor, usize)> {
    let device = student.device();
    let len = seqs.iter().map(|s| s.inputs.len()).max().unwrap_or(1);
    let b = seqs.len();
    let mut ids = vec![0u32; b * len];
    let (mut ce_rows, mut ce_tgt) = (Vec::new(), Vec::new());
    let (mut kd_rows, mut kd_top) = (Vec::new(), Vec::new());
    for (i, s) in seqs.iter().enumerate() {
        ids[i * len..i * len + s.inputs.len()].copy_from_slice(s.inputs);
        for &(j, tgt, top) in &s.targets {
            let row = (i * len + j) as u32;
            match top {
                Some(t) if cfg.loss.needs_top_logprobs() => {
                    kd_rows.push(row);
                    kd_top.push(t);
                }
                _ => {
                    ce_rows.push(row);
                    ce_tgt.push(tgt);
                }
            }
        }
    }
    let tokens = seqs.iter().map(|s| s.inputs.len()).sum();
    let n = (ce_rows.len() + kd_rows.len()) as f64;
    let ids = Tensor::from_vec(ids, (b, len), device).ctx("batch ids")?;
    let hidden = student.hidden(&ids, None)?;
    let flat = hidden
        .reshape((b * len, student.config().hidden_size))
        .ctx("batch")?;
    let rows_of = |rows: Vec<u32>| -> Result<Tensor> {
        let r = rows.len();
        let idx = Tensor::from_vec(rows, r, device).ctx("rows")?;
        student.project(&flat.index_select(&idx, 0).ctx("rows")?)
    };
    let mut total: Option<Tensor> = None;
    if !ce_rows.is_empty() {
        let r = ce_tgt.len();
        let logits = rows_of(ce_rows)?;
        let tgt = Tensor::from_vec(ce_tgt, r, device).ctx("targets")?;
        total = Some(cross_entropy_sum(&logits, &tgt)?);
    }
    if !kd_rows.is_empty() {
        let logits = rows_of(kd_rows)?;
        // No wider than the widest row: padding columns cost a pass each.
        let widest = kd_top.iter().map(|t| t.ids.len()).max().unwrap_or(1);
        let k = cfg.top_k.min(widest).max(1);
        let teacher = TeacherTargets::new(&kd_top, k, device, student.dtype())?;
        let kd = kd_sum(cfg.loss, &logits, &teacher)?;
        total = Some(match total {
            Some(t) => (t + kd).ctx("loss")?,
            None => kd,
        });
    }
    let total = total.ok_or_else(|| DistillError::Config("a batch without targets".into()))?;
    Ok(((total / n).ctx("loss")?, tokens))
}

fn read_log(path: &Path) -> Result<Vec<LogEntry>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let f = File::open(path).map_err(io_err("reading", path))?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io_err("reading", path))?;
        // A line cut by a kill mid-write is dropped; the checkpoint decides anyway.
        if let Ok(e) = serde_json::from_str::<LogEntry>(&line) {
            out.push(e);
        }
    }
    Ok(out)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("plain data serialises");
    std::fs::write(path, text).map_err(io_err("writing", path))
}

/// Write the checkpoint into `out/checkpoint.tmp`, then swap it in, so a kill during
/// the write leaves the previous checkpoint intact.
fn save_checkpoint(out: &Path, student: &Student, opt: &AdamW, state: &TrainState) -> Result<()> {
    let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
    let dst = out.join(CHECKPOINT_DIR);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err("removing", &tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err("creating", &tmp))?;
    student.save(&tmp)?;
    opt.save(&tmp.join(OPTIMIZER_FILE))?;
    write_json(&tmp.join(STATE_FILE), state)?;
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(io_err("removing", &dst))?;
    }
    std::fs::rename(&tmp, &dst).map_err(io_err("renaming", &tmp))
}

/// Train `student` on `data`, writing into `out_dir`: `model.safetensors`,
/// `config.json`, `tokenizer.json` (when `tokenizer` is given), `train_log.jsonl`,
/// `loss.png` and `checkpoint/`. With `cfg.resume` and a checkpoint in `out_dir`, the
/// student's weights and the optimizer are restored from it and the run continues at
/// its step (the data, batch size, sequence length, loss and architecture must match).
/// `progress` is called after every step.
pub fn train(
    student: &Student,
    data: &Dataset,
    tokenizer: Option<&StudentTokenizer>,
    cfg: &TrainConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainReport> {
    train_with_teacher(student, data, tokenizer, cfg, None, out_dir, progress)
}

/// [`train`] with a local teacher: with `cfg.on_policy`, a share of the steps train on
/// the student's own continuations of the batch's prompts, scored by `teacher` (GKD);
/// and with a token-level loss, harvest positions that came without top-k log-probs
/// get `teacher`'s instead of falling back to cross-entropy (harvested ones are
/// kept). The student stops sampling at the tokenizer's `<|im_end|>` when a tokenizer
/// is given.
pub fn train_with_teacher(
    student: &Student,
    data: &Dataset,
    tokenizer: Option<&StudentTokenizer>,
    cfg: &TrainConfig,
    mut teacher: Option<&mut dyn Teacher>,
    out_dir: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainReport> {
    cfg.validate()?;
    if cfg.on_policy.is_some() && teacher.is_none() {
        return Err(DistillError::Config(
            "on-policy distillation needs a local teacher to score the student's samples".into(),
        ));
    }
    let end_ids: Vec<TokenId> = tokenizer
        .and_then(|t| t.token_id(crate::tokenizer::CHATML_END))
        .into_iter()
        .collect();
    let score_harvest = teacher.is_some() && cfg.loss.needs_top_logprobs();
    let seq_len = cfg.seq_len.min(student.config().max_seq_len);
    let seqs = sequences(data, seq_len);
    if seqs.is_empty() {
        return Err(DistillError::Config(format!(
            "none of the {} examples has a response token within seq_len {seq_len}",
            data.examples.len()
        )));
    }
    let n = seqs.len();
    let per_epoch = n.div_ceil(cfg.batch_size);
    let mut total = per_epoch * cfg.epochs;
    if let Some(m) = cfg.max_steps {
        total = total.min(m.max(1));
    }
    let warmup = cfg.warmup_steps.unwrap_or((total / 20).min(100));
    std::fs::create_dir_all(out_dir).map_err(io_err("creating", out_dir))?;

    let mut state = TrainState {
        step: 0,
        total_steps: total,
        epoch: 0,
        batch_in_epoch: 0,
        seed: cfg.seed,
        data_fingerprint: fingerprint(data),
        examples: n,
        batch_size: cfg.batch_size,
        seq_len,
        loss: cfg.loss,
        top_k: cfg.top_k,
        student: student.config().clone(),
        on_policy: cfg.on_policy.clone(),
        teacher: score_harvest,
    };
    let mut opt = AdamW::new(student.vars(), cfg.adamw.clone())?;
    let log_path = out_dir.join(LOG_FILE);
    let ckpt = out_dir.join(CHECKPOINT_DIR);
    let state_path = ckpt.join(STATE_FILE);
    let mut resumed_from = None;
    let mut log = Vec::new();
    if cfg.resume && state_path.exists() {
        let text = std::fs::read_to_string(&state_path).map_err(io_err("reading", &state_path))?;
        let saved: TrainState =
            serde_json::from_str(&text).map_err(|source| DistillError::Json {
                path: state_path.clone(),
                source,
            })?;
        let mismatch = |what: &str| DistillError::Resume {
            path: ckpt.clone(),
            message: format!("the checkpoint was made with a different {what}"),
        };
        if saved.data_fingerprint != state.data_fingerprint || saved.examples != n {
            return Err(mismatch("training data"));
        }
        if saved.batch_size != state.batch_size || saved.seq_len != state.seq_len {
            return Err(mismatch("batch size or sequence length"));
        }
        if saved.total_steps != state.total_steps || saved.seed != state.seed {
            return Err(mismatch("schedule (epochs, max_steps) or seed"));
        }
        if saved.loss != state.loss || saved.top_k != state.top_k {
            return Err(mismatch("loss"));
        }
        if saved.student != state.student {
            return Err(mismatch("student architecture"));
        }
        if saved.on_policy != state.on_policy || saved.teacher != state.teacher {
            return Err(mismatch("on-policy setting or teacher"));
        }
        student.load_weights(&ckpt.join(crate::model::WEIGHTS_FILE))?;
        opt.load(&ckpt.join(OPTIMIZER_FILE), saved.step)?;
        state = saved;
        resumed_from = Some(state.step);
        // Steps logged after the checkpoint are redone.
        log = read_log(&log_path)?;
        log.retain(|e| e.step <= state.step);
    }
    {
        let mut f = File::create(&log_path).map_err(io_err("writing", &log_path))?;
        for e in &log {
            writeln!(f, "{}", serde_json::to_string(e).expect("serialises"))
                .map_err(io_err("writing", &log_path))?;
        }
    }
    let mut log_file = OpenOptions::new()
        .append(true)
        .open(&log_path)
        .map_err(io_err("writing", &log_path))?;

    let stop = cfg.stop_after.unwrap_or(usize::MAX).min(total);
    let started = Instant::now();
    let mut tokens_run: u64 = 0;
    let (mut on_policy_steps, mut teacher_scored) = (0usize, 0usize);
    let mut order: Option<(usize, Vec<usize>)> = None;
    while state.step < stop {
        let epoch = state.step / per_epoch;
        let bi = state.step % per_epoch;
        if order.as_ref().map(|o| o.0) != Some(epoch) {
            order = Some((epoch, shuffled_order(cfg.seed, epoch, n)));
        }
        let idx = &order.as_ref().expect("set above").1;
        let batch: Vec<&Sequence<'_>> = idx
            [bi * cfg.batch_size..((bi + 1) * cfg.batch_size).min(n)]
            .iter()
            .map(|&i| &seqs[i])
            .collect();
        let lr = lr_at(state.step, total, warmup, cfg.lr, cfg.min_lr_ratio);
        let on_policy = cfg
            .on_policy
            .as_ref()
            .is_some_and(|op| op.is_on_policy_step(cfg.seed, state.step));
        // Sequences the teacher scored this step, and the batch rebuilt over them.
        let mut scored: Vec<Option<Scored>> = Vec::new();
        if let Some(t) = teacher.as_deref_mut() {
            for (row, s) in batch.iter().enumerate() {
                let prompt_len = s.targets[0].0 + 1;
                let job = if on_policy {
                    let op = cfg.on_policy.as_ref().expect("on_policy is set");
                    let prompt = &s.inputs[..prompt_len];
                    let stream = (cfg.seed ^ ((state.step as u64) << 24), row as u64);
                    let gen = teacher::sample(student, prompt, op, &end_ids, stream, seq_len + 1)?;
                    (!gen.is_empty()).then(|| [prompt, &gen[..]].concat())
                } else if score_harvest && s.targets.iter().any(|t| t.2.is_none()) {
                    teacher_scored += 1;
                    let last = s.targets.last().expect("non-empty").1;
                    Some([s.inputs, &[last][..]].concat())
                } else {
                    None
                };
                scored.push(match job {
                    Some(tokens) => Some(teacher::score(t, tokens, prompt_len, cfg.top_k)?),
                    None => None,
                });
            }
        }
        let any_scored = scored.iter().any(Option::is_some);
        let rebuilt: Vec<Sequence<'_>> = batch
            .iter()
            .zip(&scored)
            .filter(|_| any_scored)
            .filter_map(|(s, sc)| match sc {
                Some(sc) if on_policy => Some(Sequence {
                    inputs: &sc.tokens[..sc.tokens.len() - 1],
                    targets: (sc.prompt_len - 1..sc.tokens.len() - 1)
                        .map(|j| (j, sc.tokens[j + 1], Some(&sc.top[j])))
                        .collect(),
                }),
                // A harvest sequence: the teacher fills only the positions that came
                // without log-probs; harvested rows are kept.
                Some(sc) => Some(Sequence {
                    inputs: s.inputs,
                    targets: s
                        .targets
                        .iter()
                        .map(|&(j, tgt, top)| (j, tgt, top.or(Some(&sc.top[j]))))
                        .collect(),
                }),
                // An on-policy step trains on samples only.
                None if on_policy => None,
                None => Some(Sequence {
                    inputs: s.inputs,
                    targets: s.targets.clone(),
                }),
            })
            .collect();
        // Every sample empty (the student ended at once): train on the harvest batch.
        let on_policy = on_policy && any_scored;
        let step_batch: Vec<&Sequence<'_>> = if any_scored {
            rebuilt.iter().collect()
        } else {
            batch
        };
        on_policy_steps += usize::from(on_policy);
        let (loss, tokens) = batch_loss(student, &step_batch, cfg)?;
        let loss_value = loss
            .to_dtype(candle_core::DType::F64)
            .and_then(|l| l.to_scalar::<f64>())
            .ctx("reading the loss")?;
        if !loss_value.is_finite() {
            return Err(DistillError::Diverged {
                step: state.step + 1,
                loss: loss_value,
            });
        }
        let grads = loss.backward().ctx("backward pass")?;
        let norm = grad_norm(&grads, student.vars())?;
        opt.step(&grads, lr, clip_scale(norm, cfg.grad_clip))?;
        state.step += 1;
        state.epoch = state.step / per_epoch;
        state.batch_in_epoch = state.step % per_epoch;
        tokens_run += tokens as u64;
        let tps = tokens_run as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let entry = LogEntry {
            step: state.step,
            epoch,
            loss: loss_value,
            lr,
            grad_norm: norm,
            tokens,
            tokens_per_sec: tps,
            on_policy,
        };
        writeln!(
            log_file,
            "{}",
            serde_json::to_string(&entry).expect("serialises")
        )
        .map_err(io_err("writing", &log_path))?;
        log.push(entry);
        progress(&Progress {
            step: state.step,
            total_steps: total,
            epoch,
            loss: loss_value,
            lr,
            tokens_per_sec: tps,
        });
        if cfg.checkpoint_every > 0
            && state.step.is_multiple_of(cfg.checkpoint_every)
            && state.step < stop
        {
            save_checkpoint(out_dir, student, &opt, &state)?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if resumed_from != Some(state.step) {
        save_checkpoint(out_dir, student, &opt, &state)?;
    }
    student.save(out_dir)?;
    if let Some(t) = tokenizer {
        t.save(&out_dir.join(TOKENIZER_FILE))?;
    }
    let points: Vec<(usize, f64)> = log.iter().map(|e| (e.step, e.loss)).collect();
    if !points.is_empty() {
        loss_png(&out_dir.join(LOSS_PNG), &points)?;
    }
    let tail = &log[log.len().saturating_sub(10)..];
    let mean = |xs: &[LogEntry]| xs.iter().map(|e| e.loss).sum::<f64>() / xs.len().max(1) as f64;
    Ok(TrainReport {
        first_loss: log.first().map_or(f64::NAN, |e| e.loss),
        final_loss: mean(tail),
        last_loss: log.last().map_or(f64::NAN, |e| e.loss),
        tokens_per_sec: if elapsed > 0.0 {
            tokens_run as f64 / elapsed
        } else {
            0.0
        },
        params: student.param_count(),
        loss: cfg.loss,
        steps: state.step,
        total_steps: total,
        finished: state.step >= total,
        resumed_from,
        examples: n,
        examples_with_top_logprobs: data.with_top_logprobs(),
        examples_skipped: data.examples.len() - n,
        tokens: tokens_run,
        on_policy_steps,
        teacher_scored,
        out_dir: out_dir.to_path_buf(),
    })
}

/// Training throughput of `cfg` on random tokens: `steps` SFT steps on batches of
/// `batch` × `seq_len` (after one warm-up step), in tokens per second.
pub fn measure_tokens_per_sec(
    cfg: StudentConfig,
    batch: usize,
    seq_len: usize,
    steps: usize,
) -> Result<f64> {
    let device = Device::Cpu;
    let student = Student::new(cfg.clone(), 0, &device, candle_core::DType::F32)?;
    let mut opt = AdamW::new(student.vars(), AdamWParams::default())?;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let examples: Vec<Vec<TokenId>> = (0..batch)
        .map(|_| {
            (0..=seq_len)
                .map(|_| (rng.next_u64() % cfg.vocab_size as u64) as TokenId)
                .collect()
        })
        .collect();
    let seqs: Vec<Sequence<'_>> = examples
        .iter()
        .map(|t| Sequence {
            inputs: &t[..seq_len],
            targets: (0..seq_len).map(|j| (j, t[j + 1], None)).collect(),
        })
        .collect();
    let refs: Vec<&Sequence<'_>> = seqs.iter().collect();
    let tcfg = TrainConfig::default();
    let mut run = || -> Result<()> {
        let (loss, _) = batch_loss(&student, &refs, &tcfg)?;
        let grads = loss.backward().ctx("backward pass")?;
        opt.step(&grads, 1e-4, 1.0)
    };
    run()?;
    let t0 = Instant::now();
    for _ in 0..steps.max(1) {
        run()?;
    }
    Ok((batch * seq_len * steps.max(1)) as f64 / t0.elapsed().as_secs_f64())
}

/// The entries of a run's `train_log.jsonl`, in step order.
pub fn read_train_log(out_dir: &Path) -> Result<Vec<LogEntry>> {
    read_log(&out_dir.join(LOG_FILE))
}
