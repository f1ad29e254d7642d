//! Linear layers for inference in f32 on the CPU: one matrix multiply, written onto the bias.
//!
//! candle's CPU matmul asks for its thread count on every call, and unless `RAYON_NUM_THREADS` is set
//! that reads and parses `/proc/cpuinfo`: 13,405 times in one run of the fixtures benchmark. It also
//! zero-fills its output, and candle-nn adds the bias in a second pass into a second fresh tensor.
//! tiny-sd15's denoising step at batch 1 went from 0.0072–0.0091 s to 0.0046 s with this kernel.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;

use super::broadcast::contiguous_f32;
use super::matmul::{multiply, Strided};

/// `x · weightᵀ + bias` for `x` `[..., in]` and `weight` `[out, in]`, f32 on the CPU, without a backward
/// pass (training keeps candle's differentiable matmul in [`super::blocks::Linear`]).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    if x.dims().last() != Some(&in_features) {
        candle_core::bail!("linear: a {:?} weight does not fit a {:?} input", weight.dims(), x.dims())
    }
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    if let Some(b) = bias.as_ref().filter(|b| b.len() != out_features) {
        candle_core::bail!("linear: a bias of {} values for {out_features} outputs", b.len())
    }
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &Linear { in_features, out_features, bias })
}

struct Linear {
    in_features: usize,
    out_features: usize,
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fresco-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, weight) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        let (k, n) = (self.in_features, self.out_features);
        let mut dims = l1.shape().dims().to_vec();
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let mut out = match &self.bias {
            Some(bias) => bias.repeat(rows),
            None => vec![0f32; rows * n],
        };
        let threads = rayon::current_num_threads();
        // gemm splits a product over the threads only above its own size threshold.
        let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
        if rows > 0 && n > 0 && k > 0 {
            // SAFETY: dst is `rows × n` row-major, lhs `rows × k` row-major (x), rhs `k × n` read from the
            // row-major `[n, k]` weight (column stride k, row stride 1); all three lie inside their buffers.
            unsafe {
                multiply(
                    (rows, n, k),
                    Strided::rows(out.as_mut_ptr(), n),
                    Strided::rows(x.as_ptr(), k),
                    Strided::columns(weight.as_ptr(), k),
                    self.bias.is_some(),
                    1.0,
                    parallelism,
                )
            }
        }
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// Matches candle-nn's linear layer, with and without a bias, for 2-, 3- and 4-D inputs and a
    /// strided (transposed) input.
    #[test]
    fn matches_candles_linear() {
        let dev = Device::Cpu;
        for (i, dims) in [vec![5, 7], vec![2, 3, 7], vec![2, 2, 3, 7], vec![1, 7]].into_iter().enumerate() {
            let x = Tensor::randn(0f32, 1., dims.as_slice(), &dev).expect("x");
            let weight = Tensor::randn(0f32, 1., (4, 7), &dev).expect("weight");
            let bias = Tensor::randn(0f32, 1., 4, &dev).expect("bias");
            for bias in [None, Some(bias)] {
                let want = candle_nn::Linear::new(weight.clone(), bias.clone()).forward(&x).expect("candle");
                let got = linear(&x, &weight, bias.as_ref()).expect("fresco");
                assert_eq!(got.dims(), want.dims(), "case {i}");
                let diff = (&got - &want).expect("diff").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
                assert!(diff < 1e-5, "case {i}, bias {}: max |Δ| {diff}", bias.is_some());
            }
        }
        let x = Tensor::randn(0f32, 1., (7, 6), &dev).expect("x").t().expect("t");
        let weight = Tensor::randn(0f32, 1., (3, 7), &dev).expect("weight");
        let want = x.matmul(&weight.t().expect("t")).expect("candle");
        let got = linear(&x, &weight, None).expect("fresco");
        let diff = (&got - &want).expect("diff").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
        assert!(diff < 1e-5, "strided input: max |Δ| {diff}");
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 5), candle_core::DType::F32, &dev).expect("x");
        let weight = Tensor::zeros((3, 4), candle_core::DType::F32, &dev).expect("weight");
        assert!(linear(&x, &weight, None).is_err(), "input width differs from the weight's");
        let weight = Tensor::zeros((3, 5), candle_core::DType::F32, &dev).expect("weight");
        let bias = Tensor::zeros(4, candle_core::DType::F32, &dev).expect("bias");
        assert!(linear(&x, &weight, Some(&bias)).is_err(), "bias of the wrong length");
    }
}
