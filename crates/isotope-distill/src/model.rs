//! The student: a hand-written Llama decoder on candle `Var`s.
//!
//! Written out rather than taken from `candle_transformers`, whose llama returns only
//! the last position's logits (training needs every position) and whose fused kernels
//! (`ops::rms_norm`, `softmax_last_dim`, `rope_i`) have no backward pass in candle-nn
//! 0.11 and silently cut gradients. Here every op is a plain tensor op with a backward:
//! `rms_norm_slow`, `ops::softmax(.., D::Minus1)` and `rope_i_slow`; the
//! finite-difference test in `tests/` would catch a cut gradient.
//!
//! Parameters are named as in a llama GGUF (`token_embd.weight`,
//! `blk.{i}.attn_q.weight`, …) so that loading a GGUF, saving safetensors and exporting
//! a GGUF all use one set of names.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, Var, D};
use isotope_sampling::{Sampler, StepContext, TokenId};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::config::StudentConfig;
use crate::error::{io_err, CandleContext, DistillError, Result};

/// File names inside a saved student directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The architecture, as JSON.
pub const CONFIG_FILE: &str = "config.json";

/// One decoder block's parameters.
#[derive(Clone)]
struct Block {
    attn_norm: Var,
    wq: Var,
    wk: Var,
    wv: Var,
    wo: Var,
    ffn_norm: Var,
    w_gate: Var,
    w_up: Var,
    w_down: Var,
}

/// Keys and values of the positions seen so far, per layer, for incremental decoding.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A Llama-architecture student with trainable parameters.
pub struct Student {
    cfg: StudentConfig,
    device: Device,
    dtype: DType,
    vars: BTreeMap<String, Var>,
    tok_embd: Var,
    output_norm: Var,
    output: Option<Var>,
    blocks: Vec<Block>,
}

/// The parameter names and shapes of `cfg`, in a fixed order (the GGUF llama names).
fn param_shapes(cfg: &StudentConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let kv = cfg.num_kv_heads * cfg.head_dim();
    let ff = cfg.intermediate_size;
    let mut out = vec![("token_embd.weight".to_string(), vec![cfg.vocab_size, h])];
    for i in 0..cfg.num_layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        out.push((p("attn_norm"), vec![h]));
        out.push((p("attn_q"), vec![h, h]));
        out.push((p("attn_k"), vec![kv, h]));
        out.push((p("attn_v"), vec![kv, h]));
        out.push((p("attn_output"), vec![h, h]));
        out.push((p("ffn_norm"), vec![h]));
        out.push((p("ffn_gate"), vec![ff, h]));
        out.push((p("ffn_up"), vec![ff, h]));
        out.push((p("ffn_down"), vec![h, ff]));
    }
    out.push(("output_norm.weight".to_string(), vec![h]));
    if !cfg.tie_embeddings {
        out.push(("output.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    out
}

/// Standard normal draws from a seeded stream (Box–Muller), so that initialisation is
/// reproducible across runs and machines (candle's CPU `randn` cannot be seeded per
/// tensor).
fn normal_vec(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    let uniform =
        |rng: &mut ChaCha8Rng| ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    while out.len() < n {
        let (u1, u2) = (uniform(rng), uniform(rng));
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push(r * a.cos());
        out.push(r * a.sin());
    }
    out.truncate(n);
    out
}

impl Student {
    /// A randomly initialised student: weights ~ N(0, 0.02²), residual output
    /// projections scaled down by √(2·layers) (GPT-2), norms at 1. `seed` fixes it.
    pub fn new(cfg: StudentConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let resid = 0.02 / (2.0 * cfg.num_layers as f64).sqrt();
        let mut tensors = BTreeMap::new();
        for (name, shape) in param_shapes(&cfg) {
            let t = if shape.len() == 1 {
                Tensor::ones(shape.as_slice(), dtype, device)
            } else {
                let std =
                    if name.ends_with("attn_output.weight") || name.ends_with("ffn_down.weight") {
                        resid
                    } else {
                        0.02
                    };
                let n = shape.iter().product();
                Tensor::from_vec(normal_vec(&mut rng, n, std), shape.as_slice(), device)
                    .and_then(|t| t.to_dtype(dtype))
            }
            .ctx(format!("initialising {name}"))?;
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg, tensors, device)
    }

    /// Build from named tensors (every name of the config must be present with its
    /// shape; extra names are an error so that a mismatched file is not half-loaded).
    fn from_tensors(
        cfg: StudentConfig,
        mut tensors: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let mut vars = BTreeMap::new();
        let mut dtype = None;
        for (name, shape) in param_shapes(&cfg) {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| DistillError::Config(format!("weights lack tensor `{name}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(DistillError::Config(format!(
                    "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                    t.dims()
                )));
            }
            let d = *dtype.get_or_insert(t.dtype());
            let t = t.to_dtype(d).ctx(format!("converting {name}"))?;
            vars.insert(name, Var::from_tensor(&t).ctx("creating variable")?);
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(DistillError::Config(format!(
                "weights hold tensor `{extra}` that the config does not use"
            )));
        }
        let dtype = dtype.unwrap_or(DType::F32);
        let get = |n: &str| vars[n].clone();
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let p = |n: &str| get(&format!("blk.{i}.{n}.weight"));
                Block {
                    attn_norm: p("attn_norm"),
                    wq: p("attn_q"),
                    wk: p("attn_k"),
                    wv: p("attn_v"),
                    wo: p("attn_output"),
                    ffn_norm: p("ffn_norm"),
                    w_gate: p("ffn_gate"),
                    w_up: p("ffn_up"),
                    w_down: p("ffn_down"),
                }
            })
            .collect();
        Ok(Self {
            tok_embd: get("token_embd.weight"),
            output_norm: get("output_norm.weight"),
            output: (!cfg.tie_embeddings).then(|| get("output.weight")),
            blocks,
            cfg,
            device: device.clone(),
            dtype,
            vars,
        })
    }

    /// Initialise from a llama GGUF by dequantizing every tensor to f32 trainable
    /// variables. The architecture comes from the `llama.*` metadata; a GGUF without
    /// `output.weight` has tied embeddings. q/k weights are used as stored: they are
    /// permuted for interleaved RoPE, which is the RoPE this model applies.
    pub fn from_gguf(path: &Path, device: &Device) -> Result<Self> {
        let gerr = |message: String| DistillError::Gguf {
            path: path.to_path_buf(),
            message,
        };
        let mut file = File::open(path).map_err(io_err("opening", path))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| gerr(e.to_string()))?;
        let cfg = config_from_gguf(&ct).map_err(gerr)?;
        let mut tensors = BTreeMap::new();
        for (name, _) in param_shapes(&cfg) {
            let q = ct
                .tensor(&mut file, &name, device)
                .map_err(|e| gerr(format!("tensor `{name}`: {e}")))?;
            let t = q
                .dequantize(device)
                .map_err(|e| gerr(format!("dequantizing `{name}`: {e}")))?;
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg, tensors, device)
    }

    /// Load a student saved by [`Student::save`] (`config.json` + `model.safetensors`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = StudentConfig::load(&dir.join(CONFIG_FILE))?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.exists() {
            return Err(DistillError::Io {
                action: "opening",
                path: weights,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let tensors = candle_core::safetensors::load(&weights, device)
            .ctx(format!("reading {}", weights.display()))?;
        Self::from_tensors(cfg, tensors.into_iter().collect(), device)
    }

    /// Save `config.json` and `model.safetensors` into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        self.cfg.save(&dir.join(CONFIG_FILE))?;
        self.save_weights(&dir.join(WEIGHTS_FILE))
    }

    /// Save only the weights (safetensors, by GGUF name).
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path).ctx(format!("writing {}", path.display()))
    }

    /// Replace every weight by the one in a safetensors file of the same layout.
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let tensors = candle_core::safetensors::load(path, &self.device)
            .ctx(format!("reading {}", path.display()))?;
        for (name, var) in &self.vars {
            let t = tensors.get(name).ok_or_else(|| {
                DistillError::Config(format!("`{}` lacks tensor `{name}`", path.display()))
            })?;
            var.set(&t.to_dtype(self.dtype).ctx("converting")?)
                .ctx(format!("setting {name}"))?;
        }
        Ok(())
    }

    /// A copy whose every weight is `w + scale · direction[name]` (a name missing from
    /// `direction` is copied unchanged; a name the student lacks, or a shape that
    /// differs, is an error). The copy shares nothing mutable with `self`.
    ///
    /// For finite differences along a direction in weight space: antidistillation
    /// sampling runs the proxy student at `θ ± ε·g`.
    pub fn perturbed(&self, direction: &BTreeMap<String, Tensor>, scale: f64) -> Result<Self> {
        if let Some(extra) = direction.keys().find(|k| !self.vars.contains_key(*k)) {
            return Err(DistillError::Config(format!(
                "the direction names tensor `{extra}`, which the student lacks"
            )));
        }
        let mut tensors = BTreeMap::new();
        for (name, var) in &self.vars {
            let w = var.as_tensor();
            let t = match direction.get(name) {
                Some(d) if d.dims() != w.dims() => {
                    return Err(DistillError::Config(format!(
                        "direction `{name}` has shape {:?}, the student's weight {:?}",
                        d.dims(),
                        w.dims()
                    )))
                }
                Some(d) => d
                    .to_dtype(self.dtype)
                    .and_then(|d| d.to_device(&self.device))
                    .and_then(|d| w + (d * scale)?)
                    .ctx(format!("perturbing {name}"))?,
                None => w.copy().ctx(format!("copying {name}"))?,
            };
            tensors.insert(name.clone(), t);
        }
        Self::from_tensors(self.cfg.clone(), tensors, &self.device)
    }

    /// The output layer's weight `[vocab, hidden]` (the token embedding when tied):
    /// `project` is `hidden @ output_weight()^T`, so logits of a few tokens need only
    /// their rows.
    pub fn output_weight(&self) -> &Tensor {
        self.output.as_ref().unwrap_or(&self.tok_embd).as_tensor()
    }

    /// The architecture.
    pub fn config(&self) -> &StudentConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype (f32 normally; f64 for gradient checks).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every trainable variable by name, in a fixed order.
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    /// Total number of parameters.
    pub fn param_count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    /// cos/sin tables `[len, head_dim/2]` for positions `offset..offset+len`.
    fn rope_tables(&self, offset: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let half = self.cfg.head_dim() / 2;
        let d = self.cfg.head_dim() as f64;
        let theta = f64::from(self.cfg.rope_theta);
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in offset..offset + len {
            for i in 0..half {
                let freq = theta.powf(-((2 * i) as f64) / d);
                let a = p as f64 * freq;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let mk = |v: Vec<f64>| {
            Tensor::from_vec(v, (len, half), &self.device).and_then(|t| t.to_dtype(self.dtype))
        };
        Ok((mk(cos).ctx("rope table")?, mk(sin).ctx("rope table")?))
    }

    /// Hidden states after the final norm, `[batch, len, hidden]`, for token ids
    /// `[batch, len]` at positions `cache.len()..`. With a cache, keys and values are
    /// appended to it (batch must then be 1 per cache).
    pub fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.hidden_inner(ids, cache).ctx("student forward pass")
    }

    fn hidden_inner(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        if offset + t > cfg.max_seq_len {
            candle_core::bail!(
                "sequence of {} tokens exceeds the student's max_seq_len {}",
                offset + t,
                cfg.max_seq_len
            );
        }
        let (cos, sin) = self
            .rope_tables(offset, t)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let total = offset + t;
        // Causal mask: query i (absolute offset+i) sees keys 0..=offset+i.
        let mask: Vec<f64> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > offset + i {
                        f64::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), &self.device)?.to_dtype(self.dtype)?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim());
        let rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = cfg.rms_norm_eps as f32;

        let mut x = self
            .tok_embd
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, cfg.hidden_size))?;
        for (li, blk) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm_slow(&x, &blk.attn_norm, eps)?;
            let q = linear(&h, &blk.wq)?
                .reshape((b, t, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = linear(&h, &blk.wk)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = linear(&h, &blk.wv)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = candle_nn::rotary_emb::rope_i_slow(&q, &cos, &sin)?;
            let mut k = candle_nn::rotary_emb::rope_i_slow(&k, &cos, &sin)?;
            let mut v = v;
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = c.layers.get(li) {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                if li < c.layers.len() {
                    c.layers[li] = (k.clone(), v.clone());
                } else {
                    c.layers.push((k.clone(), v.clone()));
                }
            }
            let (k, v) = if rep > 1 {
                let expand = |x: &Tensor| -> candle_core::Result<Tensor> {
                    x.unsqueeze(2)?
                        .broadcast_as((b, nkv, rep, total, hd))?
                        .reshape((b, nh, total, hd))
                };
                (expand(&k)?, expand(&v)?)
            } else {
                (k, v)
            };
            let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            let y = att
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, cfg.hidden_size))?;
            let x1 = (&x + linear(&y, &blk.wo)?)?;
            let h = candle_nn::ops::rms_norm_slow(&x1, &blk.ffn_norm, eps)?;
            let gate = linear(&h, &blk.w_gate)?.silu()?;
            let up = linear(&h, &blk.w_up)?;
            x = (&x1 + linear(&(gate * up)?, &blk.w_down)?)?;
        }
        if let Some(c) = cache {
            c.len = total;
        }
        candle_nn::ops::rms_norm_slow(&x, &self.output_norm, eps)
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]` (the output layer alone:
    /// training applies it only to positions that carry a loss, since the 49152-wide
    /// output layer dominates a small student's cost).
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.output.as_ref().unwrap_or(&self.tok_embd);
        hidden
            .matmul(&w.t().ctx("output layer")?)
            .ctx("output layer")
    }

    /// Logits at every position, `[batch, len, vocab]`, for ids `[batch, len]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2().ctx("forward: ids must be [batch, len]")?;
        let h = self.hidden(ids, None)?;
        let flat = h.reshape((b * t, self.cfg.hidden_size)).ctx("forward")?;
        self.project(&flat)?
            .reshape((b, t, self.cfg.vocab_size))
            .ctx("forward")
    }

    fn check_ids(&self, ids: &[TokenId]) -> Result<()> {
        match ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            Some(&token) => Err(DistillError::InvalidToken {
                token,
                vocab: self.cfg.vocab_size,
            }),
            None => Ok(()),
        }
    }

    fn ids_tensor(&self, ids: &[TokenId]) -> Result<Tensor> {
        self.check_ids(ids)?;
        Tensor::from_slice(ids, (1, ids.len()), &self.device).ctx("token ids")
    }

    /// Logits at every position of one sequence, as rows of f32.
    pub fn logits(&self, ids: &[TokenId]) -> Result<Vec<Vec<f32>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let l = self.forward(&self.ids_tensor(ids)?)?;
        l.squeeze(0)
            .and_then(|l| l.to_dtype(DType::F32))
            .and_then(|l| l.to_vec2())
            .ctx("reading logits")
    }

    /// Teacher-forced log-probabilities: entry `i` is log p(ids[i+1] | ids[..=i])
    /// (natural log, temperature 1), so the result has `ids.len() - 1` entries — the
    /// same convention as `isotope_engine::Model::score`.
    pub fn score(&self, ids: &[TokenId]) -> Result<Vec<f32>> {
        if ids.len() < 2 {
            return Ok(Vec::new());
        }
        let l = self.forward(&self.ids_tensor(&ids[..ids.len() - 1])?)?;
        let lp = crate::ops::log_softmax_last(&l.squeeze(0).ctx("score")?).ctx("score")?;
        let next = Tensor::from_slice(&ids[1..], (ids.len() - 1, 1), &self.device).ctx("score")?;
        lp.gather(&next, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1())
            .ctx("score")
    }

    /// Generate up to `max_tokens` after `prompt`, choosing every token with `sampler`
    /// — the same sampler chain (and watermark hook) the server uses — and stopping
    /// after any token in `stop`. Incremental: keys and values are cached.
    pub fn generate(
        &self,
        prompt: &[TokenId],
        sampler: &mut Sampler,
        max_tokens: usize,
        stop: &[TokenId],
    ) -> Result<Vec<TokenId>> {
        if prompt.is_empty() {
            return Err(DistillError::Config(
                "generate needs a non-empty prompt".into(),
            ));
        }
        self.check_ids(prompt)?;
        let mut cache = KvCache::default();
        let mut generated = Vec::new();
        let mut next_input = prompt.to_vec();
        for _ in 0..max_tokens {
            if cache.len() + next_input.len() > self.cfg.max_seq_len {
                break;
            }
            let ids = Tensor::from_slice(&next_input, (1, next_input.len()), &self.device)
                .ctx("token ids")?;
            let h = self.hidden(&ids, Some(&mut cache))?;
            let last = h
                .narrow(1, next_input.len() - 1, 1)
                .and_then(|h| h.reshape((1, self.cfg.hidden_size)))
                .ctx("last position")?;
            let logits: Vec<f32> = self
                .project(&last)?
                .flatten_all()
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1())
                .ctx("reading logits")?;
            let ctx = StepContext {
                prompt,
                generated: &generated,
            };
            let tok = sampler.sample(&logits, &ctx, 0).token;
            generated.push(tok);
            if stop.contains(&tok) {
                break;
            }
            next_input = vec![tok];
        }
        Ok(generated)
    }
}

/// `x @ w^T` for `x` of shape `[.., in]` and `w` of shape `[out, in]`.
fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner;
    let out = w.dim(0)?;
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("non-empty dims") = out;
    x.reshape((rows, inner))?.matmul(&w.t()?)?.reshape(shape)
}

fn meta_u64(ct: &gguf_file::Content, key: &str) -> std::result::Result<u64, String> {
    use gguf_file::Value::*;
    match ct.metadata.get(key) {
        Some(U8(v)) => Ok(u64::from(*v)),
        Some(U16(v)) => Ok(u64::from(*v)),
        Some(U32(v)) => Ok(u64::from(*v)),
        Some(U64(v)) => Ok(*v),
        Some(I32(v)) if *v >= 0 => Ok(*v as u64),
        Some(I64(v)) if *v >= 0 => Ok(*v as u64),
        Some(other) => Err(format!(
            "metadata `{key}` is not an unsigned integer: {other:?}"
        )),
        None => Err(format!("missing metadata `{key}`")),
    }
}

fn meta_f64(ct: &gguf_file::Content, key: &str) -> Option<f64> {
    match ct.metadata.get(key)? {
        gguf_file::Value::F32(v) => Some(f64::from(*v)),
        gguf_file::Value::F64(v) => Some(*v),
        _ => None,
    }
}

/// The student configuration a llama GGUF describes.
fn config_from_gguf(ct: &gguf_file::Content) -> std::result::Result<StudentConfig, String> {
    let arch = match ct.metadata.get("general.architecture") {
        Some(gguf_file::Value::String(s)) => s.clone(),
        _ => return Err("missing `general.architecture`".into()),
    };
    if arch != "llama" {
        return Err(format!("architecture `{arch}` is not llama"));
    }
    let embd = ct
        .tensor_infos
        .get("token_embd.weight")
        .ok_or("missing tensor `token_embd.weight`")?;
    let dims = embd.shape.dims();
    let vocab = dims[0];
    let hidden = meta_u64(ct, "llama.embedding_length")? as usize;
    let heads = meta_u64(ct, "llama.attention.head_count")? as usize;
    let cfg = StudentConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        num_layers: meta_u64(ct, "llama.block_count")? as usize,
        num_heads: heads,
        num_kv_heads: meta_u64(ct, "llama.attention.head_count_kv").unwrap_or(heads as u64)
            as usize,
        intermediate_size: meta_u64(ct, "llama.feed_forward_length")? as usize,
        rope_theta: meta_f64(ct, "llama.rope.freq_base").unwrap_or(10_000.0) as f32,
        max_seq_len: meta_u64(ct, "llama.context_length").unwrap_or(2048) as usize,
        tie_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        rms_norm_eps: meta_f64(ct, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
    };
    if dims != [vocab, hidden] {
        return Err(format!(
            "token_embd.weight has shape {dims:?}, expected [vocab, {hidden}]"
        ));
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}
