//! The student's architecture, saved beside its weights as `config.json`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{io_err, DistillError, Result};

/// Vocabulary of SmolLM2 (the default teacher); the presets use it so that a student
/// shares the teacher's tokenizer and can be trained on its token ids directly.
pub const SMOLLM2_VOCAB: usize = 49_152;

/// A Llama-architecture decoder: pre-norm blocks of grouped-query attention with
/// interleaved RoPE and a SwiGLU MLP, RMSNorm, optionally tied input/output embeddings.
///
/// RoPE is the *interleaved* variant (pairs `(0,1), (2,3), …`) because that is what
/// llama.cpp applies to llama GGUFs, whose q/k weights were permuted for it on
/// conversion: a student initialised from a GGUF, and a student exported to one, then
/// need no permutation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudentConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub rope_theta: f32,
    /// Longest sequence the student is meant for (RoPE tables are built this long).
    pub max_seq_len: usize,
    pub tie_embeddings: bool,
    pub rms_norm_eps: f64,
}

impl StudentConfig {
    /// ~7M parameters (width 128, 4 layers); the 49152 × 128 embedding is most of it.
    /// Trains at a few hundred tokens/s on 2 cores.
    pub fn tiny() -> Self {
        Self {
            vocab_size: SMOLLM2_VOCAB,
            hidden_size: 128,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 352,
            rope_theta: 10_000.0,
            max_seq_len: 2048,
            tie_embeddings: true,
            rms_norm_eps: 1e-5,
        }
    }

    /// ~15M parameters (width 256, 4 layers).
    pub fn small() -> Self {
        Self {
            hidden_size: 256,
            num_heads: 4,
            num_kv_heads: 2,
            intermediate_size: 704,
            ..Self::tiny()
        }
    }

    /// A named preset: `tiny` or `small`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            other => Err(DistillError::Config(format!(
                "unknown student preset `{other}` (expected `tiny` or `small`)"
            ))),
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Check the shape constraints the model relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DistillError::Config(m));
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_layers == 0 {
            return bad("vocab_size, hidden_size and num_layers must be positive".into());
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} must be a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads {} must be a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        if self.intermediate_size == 0 || self.max_seq_len == 0 {
            return bad("intermediate_size and max_seq_len must be positive".into());
        }
        Ok(())
    }

    /// Number of trainable parameters this configuration has.
    pub fn param_count(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim();
        let per_layer = 2 * h // two norms
            + h * h * 2 // q, o
            + h * kv * 2 // k, v
            + 3 * h * self.intermediate_size;
        let emb = self.vocab_size * h;
        let out = if self.tie_embeddings { 0 } else { emb };
        emb + out + h + self.num_layers * per_layer
    }

    /// Read `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|source| DistillError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Write `config.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("config serialises");
        std::fs::write(path, text).map_err(io_err("writing", path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_sizes() {
        let tiny = StudentConfig::tiny().param_count();
        let small = StudentConfig::small().param_count();
        assert!((6_500_000..8_000_000).contains(&tiny), "{tiny}");
        assert!((14_000_000..17_000_000).contains(&small), "{small}");
        StudentConfig::tiny().validate().unwrap();
        StudentConfig::small().validate().unwrap();
        assert!(StudentConfig::preset("huge").is_err());
    }
}
