//! The attacker's training harness of isotope: a Llama-architecture **student** in
//! candle, trained on a **teacher**'s harvested responses (sequence-level KD) or its
//! top-k log-probabilities (token-level KD), saved as safetensors, scored, sampled
//! through isotope's own sampler, and exported as GGUF.
//!
//! Flow: [`StudentTokenizer::from_gguf`] (the teacher's tokenizer) →
//! [`load_jsonl`] (prompt/response lines → token sequences with a loss mask) →
//! [`Student::new`] / [`Student::from_gguf`] → [`train`] (writes the output directory,
//! returns a [`TrainReport`]) → [`Student::load`], [`Student::score`],
//! [`Student::generate`], [`export_gguf`].
//!
//! ```no_run
//! use std::path::Path;
//! use isotope_distill::*;
//!
//! # fn main() -> Result<()> {
//! let teacher = Path::new("models/SmolLM2-135M-Instruct.Q4_1.gguf");
//! let tok = StudentTokenizer::from_gguf(teacher)?;
//! let data = load_jsonl(Path::new("data.jsonl"), Some(&tok), &DataOptions::default())?;
//! for w in &data.warnings {
//!     eprintln!("data.jsonl:{}: {}", w.line, w.message);
//! }
//! let student = Student::new(StudentConfig::tiny(), 0, &Device::Cpu, DType::F32)?;
//! let cfg = TrainConfig { loss: LossKind::Sft, epochs: 2, ..TrainConfig::default() };
//! let report = train(&student, &data, Some(&tok), &cfg, Path::new("student"), &mut |p| {
//!     eprintln!("step {}/{} loss {:.3} {:.0} tok/s", p.step, p.total_steps, p.loss, p.tokens_per_sec);
//! })?;
//! println!("{}", serde_json::to_string(&report).unwrap());
//! # Ok(())
//! # }
//! ```
//!
//! Harvesting ([`harvest`], [`read_prompts`]) and [`echo`] are the async,
//! HTTP-speaking modules: the first asks any OpenAI-compatible endpoint for
//! completions and writes resumable JSONL that [`load_jsonl`] reads as is; the second
//! reads a model's top-1 predictions along a given text out of its prompt log-probs
//! (for an audit of a suspect whose weights are not in hand). Knows nothing of llama.cpp: the student is
//! pure candle, and samples through `isotope_sampling::Sampler` so that it decodes —
//! and watermarks — exactly as the server does.

mod config;
mod data;
pub mod echo;
mod error;
mod export;
mod harvest;
mod loss;
mod metrics;
mod model;
mod ops;
mod optim;
mod plot;
mod teacher;
mod tokenizer;
mod train;

pub use candle_core::{DType, Device};
pub use config::{StudentConfig, SMOLLM2_VOCAB};
pub use data::{load_jsonl, parse_jsonl, DataOptions, Dataset, Example, LineWarning};
pub use error::{DistillError, Result};
pub use export::{export_gguf, ExportDtype};
pub use harvest::{
    endpoint_urls, harvest, open_output, parse_prompts, read_prompts, record_id, Existing,
    HarvestConfig, HarvestProgress, HarvestRecord, HarvestReport, Prompt,
};
pub use loss::{cross_entropy_sum, kd_sum, LossKind, TeacherTargets, TopK, LOG_FLOOR};
pub use metrics::{argmax, final_answer, kl_top_tail, log_softmax_row};
pub use model::{KvCache, Student, CONFIG_FILE, WEIGHTS_FILE};
pub use ops::log_softmax_last;
pub use optim::{clip_scale, grad_norm, lr_at, AdamW, AdamWParams};
pub use plot::loss_png;
pub use teacher::{eval_own_samples, OnPolicy, OwnSampleEval, Teacher, TeacherError};
pub use tokenizer::{chatml_prompt, StudentTokenizer, CHATML_END, TOKENIZER_FILE};
pub use train::{
    measure_tokens_per_sec, read_train_log, shuffled_order, train, train_with_teacher, LogEntry,
    Progress, TrainConfig, TrainReport, CHECKPOINT_DIR, LOG_FILE, LOSS_PNG, STATE_FILE,
};
