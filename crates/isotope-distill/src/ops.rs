//! A fused log-softmax over the last dimension *with* a backward pass.
//!
//! Every loss takes a log-softmax over the 49152-wide vocabulary at each trained
//! position. Composed from plain tensor ops (`candle_nn::ops::log_softmax`) that is
//! about six full passes forward and a dozen backward — most of a small student's step
//! time, and many fresh 100 MB buffers. candle-nn's fused softmax has no backward
//! (it would cut gradients), so this one implements both directions as single row
//! passes on the CPU:
//!
//! - forward: `y = x − max − ln Σ exp(x − max)`;
//! - backward: `∂x = g − exp(y) · Σ g`.
//!
//! Other devices, and non-contiguous inputs, use the composed version. The
//! finite-difference test checks the gradient.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// Log-softmax over the last dimension, differentiable.
pub fn log_softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op1(LogSoftmax)
    } else {
        candle_nn::ops::log_softmax(x, D::Minus1)
    }
}

struct LogSoftmax;

use num_traits_like::Float;

/// The few float operations the kernels need, for f32 and f64.
mod num_traits_like {
    pub trait Float:
        Copy
        + Send
        + Sync
        + PartialOrd
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Add<Output = Self>
    {
        const NEG_INF: Self;
        const ZERO: Self;
        fn exp(self) -> Self;
        fn ln(self) -> Self;
    }
    impl Float for f32 {
        const NEG_INF: Self = f32::NEG_INFINITY;
        const ZERO: Self = 0.0;
        fn exp(self) -> Self {
            f32::exp(self)
        }
        fn ln(self) -> Self {
            f32::ln(self)
        }
    }
    impl Float for f64 {
        const NEG_INF: Self = f64::NEG_INFINITY;
        const ZERO: Self = 0.0;
        fn exp(self) -> Self {
            f64::exp(self)
        }
        fn ln(self) -> Self {
            f64::ln(self)
        }
    }
}

fn fwd_rows<T: Float>(src: &[T], cols: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; src.len()];
    out.par_chunks_mut(cols)
        .zip(src.par_chunks(cols))
        .for_each(|(o, x)| {
            let max = x.iter().fold(T::NEG_INF, |m, &v| if v > m { v } else { m });
            let mut sum = T::ZERO;
            for &v in x {
                sum = sum + (v - max).exp();
            }
            let shift = max + sum.ln();
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v - shift;
            }
        });
    out
}

fn bwd_rows<T: Float>(y: &[T], g: &[T], cols: usize) -> Vec<T> {
    let mut out = vec![T::ZERO; y.len()];
    out.par_chunks_mut(cols)
        .zip(y.par_chunks(cols).zip(g.par_chunks(cols)))
        .for_each(|(o, (y, g))| {
            let mut s = T::ZERO;
            for &v in g {
                s = s + v;
            }
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = g - y.exp() * s;
            }
        });
    out
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("log-softmax kernel needs a contiguous input"),
    }
}

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "isotope-log-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = l.dims().last().copied().unwrap_or(1).max(1);
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(fwd_rows(contiguous(v, l)?, cols)),
            CpuStorage::F64(v) => CpuStorage::F64(fwd_rows(contiguous(v, l)?, cols)),
            _ => candle_core::bail!("log-softmax kernel supports f32 and f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(&g, &LogSoftmaxBwd)?))
    }
}

struct LogSoftmaxBwd;

impl CustomOp2 for LogSoftmaxBwd {
    fn name(&self) -> &'static str {
        "isotope-log-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = l1.dims().last().copied().unwrap_or(1).max(1);
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => {
                CpuStorage::F32(bwd_rows(contiguous(y, l1)?, contiguous(g, l2)?, cols))
            }
            (CpuStorage::F64(y), CpuStorage::F64(g)) => {
                CpuStorage::F64(bwd_rows(contiguous(y, l1)?, contiguous(g, l2)?, cols))
            }
            _ => candle_core::bail!("log-softmax backward: mismatched or unsupported dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_composed_log_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(
            (0..24)
                .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.7)
                .collect::<Vec<_>>(),
            (4, 6),
            &dev,
        )
        .unwrap();
        let w = Tensor::from_vec(
            (0..24).map(|i| (i % 5) as f64 - 1.5).collect::<Vec<_>>(),
            (4, 6),
            &dev,
        )
        .unwrap();
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let a = log_softmax_last(var.as_tensor()).unwrap();
        let b = candle_nn::ops::log_softmax(var.as_tensor(), D::Minus1).unwrap();
        let diff = (&a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12);
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(var.as_tensor()).unwrap(),
            gb.get(var.as_tensor()).unwrap(),
        );
        let diff = (ga - gb)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-12, "{diff}");
    }
}
