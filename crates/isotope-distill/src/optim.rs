//! AdamW, the learning-rate schedule and global-norm gradient clipping.
//!
//! AdamW is written here rather than taken from `candle_nn::AdamW` because a
//! checkpoint must hold the optimizer's moments: candle's keeps them private, and a
//! resumed run could then not continue exactly where the interrupted one stopped.
//! The update is the same (Loshchilov & Hutter, with bias correction).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{CandleContext, DistillError, Result};

/// AdamW hyper-parameters (learning rate comes per step from the schedule).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norm gains: decaying
    /// them towards 0 would fight the normalisation).
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over named variables, with moments that can be saved and restored.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates done so far (the bias-correction exponent).
    step: usize,
}

impl AdamW {
    /// A fresh optimizer for `vars` (moments at zero).
    pub fn new(vars: &BTreeMap<String, Var>, params: AdamWParams) -> Result<Self> {
        let vars: Vec<(String, Var)> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let zeros = |v: &Var| v.as_tensor().zeros_like().ctx("optimizer state");
        let m = vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        let v = vars.iter().map(|(_, v)| zeros(v)).collect::<Result<_>>()?;
        Ok(Self {
            params,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Updates done so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr`, every gradient multiplied by `grad_scale`
    /// (the clipping factor). Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let p = &self.params;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            (|| -> candle_core::Result<()> {
                let g = (g.detach() * grad_scale)?;
                let m = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
                let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
                let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
                let theta = var.as_tensor().detach();
                let decay = if var.rank() >= 2 {
                    1.0 - lr * p.weight_decay
                } else {
                    1.0
                };
                let new = ((theta * decay)? - (update * lr)?)?;
                var.set(&new)?;
                self.m[i] = m;
                self.v[i] = v;
                Ok(())
            })()
            .ctx(format!("optimizer update of {name}"))?;
        }
        Ok(())
    }

    /// Save the moments (`m.NAME`, `v.NAME`) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        candle_core::safetensors::save(&map, path).ctx(format!("writing {}", path.display()))
    }

    /// Restore moments saved by [`AdamW::save`] and the step count.
    pub fn load(&mut self, path: &Path, step: usize) -> Result<()> {
        let device = self.vars.first().map(|(_, v)| v.device().clone());
        let Some(device) = device else { return Ok(()) };
        let map = candle_core::safetensors::load(path, &device)
            .ctx(format!("reading {}", path.display()))?;
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = map.get(&key).ok_or_else(|| DistillError::Resume {
                    path: path.to_path_buf(),
                    message: format!("optimizer state lacks `{key}`"),
                })?;
                *slot = t.to_dtype(var.dtype()).ctx("optimizer state")?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of all gradients of `vars` (clipping treats the model as one vector,
/// so the update's direction is kept and only its length is capped).
pub fn grad_norm(grads: &GradStore, vars: &BTreeMap<String, Var>) -> Result<f64> {
    let mut sq = 0.0f64;
    for var in vars.values() {
        if let Some(g) = grads.get(var.as_tensor()) {
            let s = g
                .sqr()
                .and_then(|s| s.sum_all())
                .and_then(|s| s.to_dtype(candle_core::DType::F64))
                .and_then(|s| s.to_scalar::<f64>())
                .ctx("gradient norm")?;
            sq += s;
        }
    }
    Ok(sq.sqrt())
}

/// Multiplier that brings a gradient of norm `norm` within `max_norm` (1 when it is
/// already within, or when clipping is off with `max_norm <= 0`).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Linear warm-up from ~0 to `peak` over `warmup` steps, then cosine decay to
/// `peak * min_ratio` at `total`. `step` is 0-based (the learning rate of update
/// `step + 1`).
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
    let min = peak * min_ratio;
    min + (peak - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn schedule_shape() {
        let lr = |s| lr_at(s, 100, 10, 1.0, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(55) - 0.55).abs() < 1e-9);
        assert!((lr(100) - 0.1).abs() < 1e-12);
        assert!(lr(30) > lr(60));
    }

    #[test]
    fn clipping() {
        assert_eq!(clip_scale(0.5, 1.0), 1.0);
        assert!((clip_scale(4.0, 1.0) * 4.0 - 1.0).abs() < 1e-6);
        assert_eq!(clip_scale(4.0, 0.0), 1.0);
    }

    /// AdamW on f(x) = Σ (x − 3)² moves x to 3; grad_norm matches the analytic one.
    #[test]
    fn adamw_minimises_quadratic() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::zeros((2, 2), DType::F64, &dev).unwrap()).unwrap();
        let mut vars = BTreeMap::new();
        vars.insert("x".to_string(), x.clone());
        let mut opt = AdamW::new(
            &vars,
            AdamWParams {
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        for i in 0..300 {
            let loss = (x.as_tensor() - 3.0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            if i == 0 {
                // d/dx = 2 (x − 3) = −6 at each of 4 entries.
                assert!((grad_norm(&grads, &vars).unwrap() - 12.0).abs() < 1e-9);
            }
            opt.step(&grads, 0.1, 1.0).unwrap();
        }
        let v: Vec<f64> = x.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| (x - 3.0).abs() < 0.05), "{v:?}");
    }
}
