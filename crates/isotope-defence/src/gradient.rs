//! The proxy student's gradient on a held-out task set: the direction `g` along which
//! antidistillation sampling differentiates the proxy (see [`crate::antidistill`]).
//!
//! `g = ∇_θ ℓ(θ)` with `ℓ` the proxy's mean cross-entropy per response token on the
//! held-out set (prompt tokens carry no loss, as in training). It is computed once,
//! offline, and stored as safetensors under the proxy's GGUF llama parameter names, so
//! a server loads it next to the proxy instead of running a backward pass at start.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use isotope_distill::{cross_entropy_sum, Dataset, Student};
use serde::Serialize;

use crate::error::{Ctx, DefenceError, Result};

/// The gradient and what it was computed on.
pub struct ProxyGradient {
    /// `∂ℓ/∂w` per parameter name (f32).
    pub tensors: BTreeMap<String, Tensor>,
    /// Summary (absent for a gradient loaded from a file).
    pub report: Option<GradientReport>,
}

/// What `isotope defence gradient` prints.
#[derive(Clone, Debug, Serialize)]
pub struct GradientReport {
    /// Held-out examples used.
    pub examples: usize,
    /// Response tokens that carried the loss.
    pub positions: usize,
    /// The proxy's mean held-out loss, nats per response token.
    pub loss: f64,
    /// Global L2 norm of `g`.
    pub norm: f64,
    /// Parameters (scalars) the gradient covers.
    pub params: usize,
}

/// Compute `g` for `proxy` on `data` (examples longer than the proxy's context are cut
/// to it). `progress(done, total)` is called after each example.
pub fn proxy_gradient(
    proxy: &Student,
    data: &Dataset,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ProxyGradient> {
    let device = proxy.device();
    let max_len = proxy.config().max_seq_len;
    let mut sum: BTreeMap<String, Tensor> = BTreeMap::new();
    let (mut positions, mut loss_sum, mut examples) = (0usize, 0f64, 0usize);
    let total = data.examples.len();
    for (i, ex) in data.examples.iter().enumerate() {
        // Inputs are every token but the last; position j predicts tokens[j + 1].
        let len = ex.tokens.len().min(max_len + 1);
        let first = ex.prompt_len.max(1) - 1;
        if len < 2 || first >= len - 1 {
            progress(i + 1, total);
            continue;
        }
        let inputs = &ex.tokens[..len - 1];
        let rows: Vec<u32> = (first as u32..(len - 1) as u32).collect();
        let targets: Vec<u32> = ex.tokens[first + 1..len].to_vec();
        let n = rows.len();
        let ids = Tensor::from_slice(inputs, (1, inputs.len()), device).ctx("ids")?;
        let h = proxy.hidden(&ids, None)?;
        let h = h
            .reshape((inputs.len(), proxy.config().hidden_size))
            .and_then(|h| h.index_select(&Tensor::from_vec(rows, n, device)?, 0))
            .ctx("response rows")?;
        let logits = proxy.project(&h)?;
        let tgt = Tensor::from_vec(targets, n, device).ctx("targets")?;
        let loss = cross_entropy_sum(&logits, &tgt)?;
        loss_sum += loss
            .to_dtype(DType::F64)
            .and_then(|l| l.to_scalar::<f64>())
            .ctx("loss")?;
        let grads = loss.backward().ctx("backward pass")?;
        for (name, var) in proxy.vars() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32).ctx("gradient")?;
            let acc = match sum.remove(name) {
                Some(s) => (s + g).ctx("accumulating")?,
                None => g,
            };
            sum.insert(name.clone(), acc);
        }
        positions += n;
        examples += 1;
        progress(i + 1, total);
    }
    if positions == 0 {
        return Err(DefenceError::Config(
            "the held-out set has no response tokens to compute a loss on".into(),
        ));
    }
    let scale = 1.0 / positions as f64;
    let tensors = sum
        .into_iter()
        .map(|(k, v)| Ok((k, (v * scale).ctx("mean")?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    let mut g = ProxyGradient {
        tensors,
        report: None,
    };
    g.report = Some(GradientReport {
        examples,
        positions,
        loss: loss_sum / positions as f64,
        norm: g.norm()?,
        params: g.tensors.values().map(|t| t.elem_count()).sum(),
    });
    Ok(g)
}

impl ProxyGradient {
    /// Global L2 norm.
    pub fn norm(&self) -> Result<f64> {
        let mut sq = 0f64;
        for t in self.tensors.values() {
            sq += t
                .to_dtype(DType::F64)
                .and_then(|t| t.sqr())
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f64>())
                .ctx("norm")?;
        }
        Ok(sq.sqrt())
    }

    /// `g / |g|`: the finite-difference step ε is then a distance in weight space, and
    /// λ multiplies a directional derivative along a unit vector, so neither depends on
    /// the size of the held-out set or on the proxy's loss scale.
    pub fn unit_direction(&self) -> Result<BTreeMap<String, Tensor>> {
        let norm = self.norm()?;
        if !(norm.is_finite() && norm > 0.0) {
            return Err(DefenceError::Config(format!(
                "the gradient has norm {norm}: nothing to differentiate along"
            )));
        }
        self.tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), (v / norm).ctx("normalising")?)))
            .collect()
    }

    /// Write as safetensors (parameter names as in the proxy).
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).ctx(format!("writing {}", path.display()))
    }

    /// Read a gradient written by [`ProxyGradient::save`] and check that it fits
    /// `proxy`: every tensor names one of its parameters with the same shape, and it
    /// covers at least one.
    pub fn load(path: &Path, proxy: &Student) -> Result<Self> {
        let err = |message: String| DefenceError::Gradient {
            path: path.to_path_buf(),
            message,
        };
        let tensors =
            candle_core::safetensors::load(path, proxy.device()).map_err(|e| err(e.to_string()))?;
        let vars = proxy.vars();
        for (name, t) in &tensors {
            match vars.get(name) {
                None => {
                    return Err(err(format!(
                        "tensor `{name}` is not a parameter of this proxy (computed for \
                         another proxy? run `isotope defence gradient` for it)"
                    )))
                }
                Some(v) if v.dims() != t.dims() => {
                    return Err(err(format!(
                        "tensor `{name}` has shape {:?}, the proxy's {:?} (computed for \
                         another proxy?)",
                        t.dims(),
                        v.dims()
                    )))
                }
                Some(_) => {}
            }
        }
        if tensors.is_empty() {
            return Err(err("holds no tensors".into()));
        }
        Ok(Self {
            tensors: tensors.into_iter().collect(),
            report: None,
        })
    }
}
