//! Export a student as a llama GGUF that llama.cpp (and so `isotope generate` /
//! `isotope serve`) can load.
//!
//! Tensor names are already the GGUF llama names, and q/k weights are already in the
//! layout for llama.cpp's interleaved RoPE (the student applies the same RoPE), so
//! export is a copy. The tokenizer metadata (`tokenizer.*`: vocabulary, merges, token
//! types, special ids, chat template) is copied from the teacher GGUF, whose vocabulary
//! the student shares.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::DType;

use crate::error::{io_err, CandleContext, DistillError, Result};
use crate::model::Student;

/// Storage type of the exported matrices (vectors are always f32, as llama.cpp wants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    /// 8-bit blocks of 32; matrices whose rows are not a multiple of 32 stay f32.
    Q8_0,
}

impl std::str::FromStr for ExportDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            other => Err(format!(
                "unknown export type \"{other}\": expected `f32` or `q8_0`"
            )),
        }
    }
}

impl std::fmt::Display for ExportDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
        })
    }
}

/// Write `student` to `out` as a llama GGUF with the tokenizer of `tokenizer_gguf`.
pub fn export_gguf(
    student: &Student,
    tokenizer_gguf: &Path,
    out: &Path,
    dtype: ExportDtype,
    name: &str,
) -> Result<()> {
    let cfg = student.config();
    let gerr = |message: String| DistillError::Gguf {
        path: tokenizer_gguf.to_path_buf(),
        message,
    };
    let mut f = File::open(tokenizer_gguf).map_err(io_err("opening", tokenizer_gguf))?;
    let teacher = gguf_file::Content::read(&mut f).map_err(|e| gerr(e.to_string()))?;
    let n_tokens = match teacher.metadata.get("tokenizer.ggml.tokens") {
        Some(gguf_file::Value::Array(a)) => a.len(),
        _ => return Err(gerr("no `tokenizer.ggml.tokens`".into())),
    };
    if n_tokens != cfg.vocab_size {
        return Err(gerr(format!(
            "its vocabulary has {n_tokens} tokens, the student {}",
            cfg.vocab_size
        )));
    }
    use gguf_file::Value as V;
    let u32v = |x: usize| V::U32(x as u32);
    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String("llama".into())),
        ("general.name".into(), V::String(name.into())),
        (
            "general.file_type".into(),
            V::U32(if dtype == ExportDtype::F32 { 0 } else { 7 }),
        ),
        ("llama.vocab_size".into(), u32v(cfg.vocab_size)),
        ("llama.context_length".into(), u32v(cfg.max_seq_len)),
        ("llama.embedding_length".into(), u32v(cfg.hidden_size)),
        ("llama.block_count".into(), u32v(cfg.num_layers)),
        (
            "llama.feed_forward_length".into(),
            u32v(cfg.intermediate_size),
        ),
        ("llama.rope.dimension_count".into(), u32v(cfg.head_dim())),
        ("llama.attention.head_count".into(), u32v(cfg.num_heads)),
        (
            "llama.attention.head_count_kv".into(),
            u32v(cfg.num_kv_heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            V::F32(cfg.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base".into(), V::F32(cfg.rope_theta)),
    ];
    let mut tok_keys: Vec<&String> = teacher
        .metadata
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    tok_keys.sort();
    for k in tok_keys {
        meta.push((k.clone(), teacher.metadata[k].clone()));
    }

    let mut tensors = Vec::new();
    for (tname, var) in student.vars() {
        let t = var.as_tensor().to_dtype(DType::F32).ctx("export")?;
        let cols = *t.dims().last().unwrap_or(&0);
        let q = if dtype == ExportDtype::Q8_0 && t.rank() == 2 && cols.is_multiple_of(32) {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        };
        let qt = QTensor::quantize(&t, q).ctx(format!("quantizing {tname}"))?;
        tensors.push((tname.clone(), qt));
    }
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    // Written beside `out` and renamed into place, so an interrupted export never
    // leaves a truncated GGUF where a server or audit would load it.
    let mut part = out.as_os_str().to_owned();
    part.push(".part");
    let part = std::path::PathBuf::from(part);
    let file = File::create(&part).map_err(io_err("creating", &part))?;
    let mut w = BufWriter::new(file);
    gguf_file::write(&mut w, &meta_refs, &tensor_refs)
        .ctx(format!("writing {}", part.display()))?;
    use std::io::Write;
    w.flush().map_err(io_err("writing", &part))?;
    drop(w);
    std::fs::rename(&part, out).map_err(io_err("renaming into place", out))
}
