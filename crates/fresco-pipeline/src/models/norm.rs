//! GroupNorm for inference in f32 on the CPU, optionally followed by its activation: one task per
//! group, each reading its values from cache after the first pass and writing them once.
//!
//! Composed from candle's ops a GroupNorm is eight passes over the activations, each allocating its
//! output, four of them broadcasts handed to candle's own thread pool; the SiLU after it is a ninth. In
//! tiny-sd15's VAE decode at batch 16 they took about a fifth of the time. Inside the denoising loop a
//! different rounding is not an option (the parity case `sd15-ddim-20` sits at the bound: the f64
//! statistics of the training kernel moved it from max |Δ| 2 to 3), so every value here is computed
//! by the composed version's own operations in its order: both sums by candle's own
//! `VecOps::vec_reduce_sum`, each division by the group's size as candle's affine multiply by `1/n`,
//! then `(x − mean) / √(var + eps) · weight + bias`. The result is the composed one to the bit (tested).

use candle_core::cpu::kernels::VecOps;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::activation::{apply_gate, Gate};
use super::broadcast::contiguous_f32;
use super::vector_math::vectorised;

/// GroupNorm of `x` (`[B, C, ...]`) with per-channel `weight` and `bias`, then `gate` if given, f32 on
/// the CPU, without a backward pass: the values of [`super::fused::group_norm`] (then the gate) exactly.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, gate: Option<Gate>) -> Result<Tensor> {
    let inner = super::fused::group_norm_inner(x, weight, groups)?;
    let op = GroupNorm { groups, inner, eps, gate, weight: weight.to_vec1()?, bias: bias.to_vec1()? };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

struct GroupNorm {
    groups: usize,
    /// Values per channel (the spatial size).
    inner: usize,
    eps: f64,
    gate: Option<Gate>,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// candle's sum of `xs`, as its `sum_keepdim` computes it over a contiguous last axis.
fn candle_sum(xs: &[f32]) -> f32 {
    let mut sum = 0f32;
    // SAFETY: `xs.len()` values are read from `xs`, and `sum` is a valid f32 to write.
    unsafe { f32::vec_reduce_sum(xs.as_ptr(), &mut sum, xs.len()) };
    sum
}

impl CustomOp1 for GroupNorm {
    fn name(&self) -> &'static str {
        "fresco-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let per_group = self.weight.len() / self.groups;
        let n = per_group * self.inner;
        // The composed version's constants: `sum / n` is candle's affine `v · f32(1/n) + 0`, and
        // `var + eps` its affine `v · 1 + f32(eps)`.
        let (inv_n, eps) = ((1.0 / n as f64) as f32, self.eps as f32);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n.max(1)).zip(x.par_chunks(n.max(1))).enumerate().for_each(|(r, (y, x))| {
            let mean = candle_sum(x) * inv_n + 0.0;
            // The squared deviations go through the output row, which the last pass overwrites.
            vectorised(
                #[inline(always)]
                || {
                    for (y, &x) in y.iter_mut().zip(x) {
                        let centered = x - mean;
                        *y = centered * centered;
                    }
                },
            );
            let std = (candle_sum(y) * inv_n + 0.0 + eps).sqrt();
            let c0 = (r % self.groups) * per_group;
            for (i, (y, x)) in y.chunks_mut(self.inner).zip(x.chunks(self.inner)).enumerate() {
                let (w, b) = (self.weight[c0 + i], self.bias[c0 + i]);
                let normed = move |x: f32| (x - mean) / std * w + b;
                match self.gate {
                    None => vectorised(
                        #[inline(always)]
                        || {
                            for (y, &x) in y.iter_mut().zip(x) {
                                *y = normed(x);
                            }
                        },
                    ),
                    Some(gate) => apply_gate(gate, y, x, normed),
                }
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values").into_iter().map(f32::to_bits).collect()
    }

    /// Bit for bit the composed GroupNorm, and that followed by the separate gate: group sizes that
    /// fill candle's vector sum exactly and ones that leave a tail, a channel per group and several.
    #[test]
    fn matches_the_composed_ops_to_the_bit() {
        let dev = Device::Cpu;
        for (shape, groups) in [((2, 32, 8, 8), 32), ((3, 64, 5, 7), 32), ((1, 6, 3, 11), 2), ((2, 4, 1, 1), 4)] {
            let x = (Tensor::randn(0.5f32, 3., shape, &dev).expect("x") * 1.7).expect("x");
            let c = shape.1;
            let w = Tensor::randn(1f32, 0.5, c, &dev).expect("weight");
            let b = Tensor::randn(0f32, 0.5, c, &dev).expect("bias");
            let reference = super::super::fused::composed_group_norm(&x, &w, &b, groups, 1e-6).expect("composed");
            let ours = group_norm(&x, &w, &b, groups, 1e-6, None).expect("ours");
            assert_eq!(bits(&ours), bits(&reference), "{shape:?} in {groups} groups");
            for gate in [Gate::Silu, Gate::GeluTanh] {
                let want = super::super::activation::gated(&reference, gate).expect("gated");
                let got = group_norm(&x, &w, &b, groups, 1e-6, Some(gate)).expect("ours, gated");
                assert_eq!(bits(&got), bits(&want), "{shape:?} in {groups} groups, then {gate:?}");
            }
        }
    }
}
