//! GroupNorm, LayerNorm and softmax as single CPU kernels for training, each with a single-kernel backward.
//!
//! Composed from candle ops a GroupNorm with its scale and shift is about fifteen graph nodes, a softmax
//! five: each a pass over the activations and an allocation forward, and in the backward pass candle adds
//! every node's gradient into a freshly zeroed tensor of its size. In a profile of fresco-tiny's U-Net
//! training step that zeroing (memset and page faults) and candle's element-wise passes took more time
//! than the matrix multiplies. While a gradient is recorded for f32 on the CPU these run here in one pass
//! forward and one backward (statistics recomputed, not stored).
//!
//! Inference does not use these: their f64 statistics round differently from candle's ops, which moved
//! the one parity case that sits on a knife edge (`sd15-ddim-20`, DDIM clipping x₀ over 20 steps) over
//! the bound. Its GroupNorm is [`super::norm`], candle's values to the bit; its LayerNorm and softmax
//! are candle's kernels.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::broadcast::contiguous_f32;

/// Whether any of `xs` records a graph for a backward pass (training).
pub(super) fn recording(xs: &[&Tensor]) -> bool {
    xs.iter().any(|x| x.track_op())
}

/// Whether all of `xs` are f32 tensors on the CPU, the only kind fresco's own kernels take.
pub(super) fn cpu_f32(xs: &[&Tensor]) -> bool {
    xs.iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

/// GroupNorm of `x` (`[B, C, ...]`) with per-channel `weight` and `bias`, statistics in f32.
pub fn group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let inner = group_norm_inner(x, weight, groups)?;
    let args = [x, weight, bias];
    if recording(&args) && cpu_f32(&args) {
        return x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            Norm { groups, channels: weight.dim(0)?, inner, eps },
        );
    }
    composed_group_norm(x, weight, bias, groups, eps)
}

/// The values per channel of a GroupNorm's input `x` (`[B, C, ...]`), after checking that `x` has the
/// weight's channels and that they split into `groups`.
pub(super) fn group_norm_inner(x: &Tensor, weight: &Tensor, groups: usize) -> Result<usize> {
    let dims = x.dims();
    let channels = weight.dim(0)?;
    if dims.len() < 3 || dims[1] != channels || groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm of {channels} channels in {groups} groups applied to a {dims:?} tensor")
    }
    Ok(dims[2..].iter().product())
}

/// [`group_norm`] from candle's ops.
pub(super) fn composed_group_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> Result<Tensor> {
    let (dims, dtype) = (x.dims(), x.dtype());
    let n = x.elem_count() / (dims[0] * groups);
    let g = x.reshape((dims[0], groups, n))?.to_dtype(match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    })?;
    let centered = g.broadcast_sub(&(g.sum_keepdim(2)? / n as f64)?)?;
    let var = (centered.sqr()?.sum_keepdim(2)? / n as f64)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?.reshape(dims)?;
    let mut per_channel = vec![1; dims.len()];
    per_channel[1] = weight.dim(0)?;
    normed.broadcast_mul(&weight.reshape(per_channel.as_slice())?)?.broadcast_add(&bias.reshape(per_channel)?)
}

/// LayerNorm over the last axis with learned `weight` and `bias`, differentiable in all three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let channels = weight.dim(0)?;
    if x.dim(D::Minus1)? != channels {
        candle_core::bail!("LayerNorm of {channels} features applied to a {:?} tensor", x.dims())
    }
    let args = [x, weight, bias];
    if !recording(&args) {
        // candle's kernel, which records no backward op.
        candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32)
    } else if cpu_f32(&args) {
        x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, Norm { groups: 1, channels, inner: 1, eps })
    } else {
        composed_layer_norm(x, weight, bias, eps)
    }
}

/// [`layer_norm`] from candle's ops.
fn composed_layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    super::blocks::layer_norm_plain(x, eps)?.broadcast_mul(weight)?.broadcast_add(bias)
}

/// Softmax over the last axis, differentiable. Without a gradient to record it is candle's kernel, which
/// records no backward op.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        candle_nn::ops::softmax_last_dim(x)
    } else if cpu_f32(&[x]) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// A normalisation over rows of `channels / groups · inner` elements (`groups` rows per sample), with a
/// scale and shift per channel. GroupNorm: `inner` is the spatial size; LayerNorm: one group of every
/// feature, `inner` 1.
#[derive(Clone, Copy)]
struct Norm {
    groups: usize,
    channels: usize,
    inner: usize,
    eps: f64,
}

/// One row's mean and reciprocal standard deviation (f64 sums: rows run to 100,000 elements).
fn moments(row: &[f32], eps: f64) -> (f32, f32) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

impl Norm {
    fn row_len(&self) -> usize {
        self.channels / self.groups * self.inner
    }

    /// The first channel of row `r`; element `i` of it belongs to channel `first + i / inner`.
    fn first_channel(&self, r: usize) -> usize {
        (r % self.groups) * (self.channels / self.groups)
    }
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        "norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (contiguous_f32(xs, xl)?, contiguous_f32(ws, wl)?, contiguous_f32(bs, bl)?);
        let n = self.row_len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).enumerate().for_each(|(r, (y, x))| {
            let (mean, rstd) = moments(x, self.eps);
            let c0 = self.first_channel(r);
            for (i, (y, x)) in y.chunks_mut(self.inner).zip(x.chunks(self.inner)).enumerate() {
                let (scale, shift) = (rstd * w[c0 + i], b[c0 + i] - mean * rstd * w[c0 + i]);
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * scale + shift;
                }
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // One kernel computes all three gradients into one buffer: `[dx…, dweight…, dbias…]`.
        let all = x.apply_op2_no_bwd(&grad.contiguous()?, &NormBackward { norm: *self, weight: w.to_vec1()? })?;
        let (e, c) = (x.elem_count(), self.channels);
        Ok((Some(all.narrow(0, 0, e)?.reshape(x.shape())?), Some(all.narrow(0, e, c)?), Some(all.narrow(0, e + c, c)?)))
    }
}

/// The backward of [`Norm`] from its input and the output's gradient (the weight is a few hundred values).
struct NormBackward {
    norm: Norm,
    weight: Vec<f32>,
}

impl CustomOp2 for NormBackward {
    fn name(&self) -> &'static str {
        "norm-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (contiguous_f32(xs, xl)?, &self.weight, contiguous_f32(gs, gl)?);
        let s = self.norm;
        let (n, c, inner) = (s.row_len(), s.channels, s.inner);
        let mut out = vec![0f32; x.len() + 2 * c];
        let (dx, dwb) = out.split_at_mut(x.len());
        let (dw, db) = dwb.split_at_mut(c);
        for (r, ((dx, x), g)) in dx.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)).enumerate() {
            let (mean, rstd) = moments(x, s.eps);
            let c0 = s.first_channel(r);
            // With x̂ the normalised input and ĝ = g·weight: dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ x̂)).
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for (i, (x, g)) in x.chunks(inner).zip(g.chunks(inner)).enumerate() {
                let (mut row_g, mut row_gx) = (0f32, 0f32);
                for (&x, &g) in x.iter().zip(g) {
                    let xh = (x - mean) * rstd;
                    row_g += g;
                    row_gx += g * xh;
                }
                db[c0 + i] += row_g;
                dw[c0 + i] += row_gx;
                sum_g += (row_g * w[c0 + i]) as f64;
                sum_gx += (row_gx * w[c0 + i]) as f64;
            }
            let (mean_g, mean_gx) = ((sum_g / n as f64) as f32, (sum_gx / n as f64) as f32);
            for (i, (dx, (x, g))) in dx.chunks_mut(inner).zip(x.chunks(inner).zip(g.chunks(inner))).enumerate() {
                let wc = w[c0 + i];
                for (dx, (&x, &g)) in dx.iter_mut().zip(x.iter().zip(g)) {
                    let xh = (x - mean) * rstd;
                    *dx = rstd * (g * wc - mean_g - xh * mean_gx);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let n = layout.dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward)?))
    }
}

/// `dx = y · (g − Σ g·y)` along each row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (contiguous_f32(ys, yl)?, contiguous_f32(gs, gl)?);
        let n = yl.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(g.par_chunks(n))).for_each(|(dx, (y, g))| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for (dx, (&y, &g)) in dx.iter_mut().zip(y.iter().zip(g)) {
                *dx = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// `ours` and `reference`, functions of `vars`, agree in value and in every variable's gradient under
    /// a loss that weights each output differently (a plain sum's gradient would hide errors in dx).
    fn assert_same(what: &str, vars: &[Var], ours: Tensor, reference: Tensor, tolerance: f32) {
        assert!(max_diff(&ours, &reference) < tolerance, "{what}: values differ by {}", max_diff(&ours, &reference));
        let probe = Tensor::randn(0f32, 1., ours.shape(), ours.device()).unwrap();
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, var) in vars.iter().enumerate() {
            let (a, b) = (g1.get(var.as_tensor()).unwrap(), g2.get(var.as_tensor()).unwrap());
            assert!(max_diff(a, b) < 10.0 * tolerance, "{what}, argument {i}: gradients differ by {}", max_diff(a, b));
        }
    }

    fn vars(dims: &[&[usize]]) -> Vec<Var> {
        dims.iter().map(|d| Var::randn(0.5f32, 1.5, d.to_vec(), &Device::Cpu).unwrap()).collect()
    }

    #[test]
    fn norms_match_candles_ops_forward_and_backward() {
        for (shape, groups) in [(vec![2, 6, 5, 3], 3), (vec![3, 4, 7], 1), (vec![1, 8, 4, 4], 8)] {
            let c = shape[1];
            let v = vars(&[&shape, &[c], &[c]]);
            let t: Vec<&Tensor> = v.iter().map(|v| v.as_tensor()).collect();
            let ours = group_norm(t[0], t[1], t[2], groups, 1e-5).unwrap();
            let reference = composed_group_norm(t[0], t[1], t[2], groups, 1e-5).unwrap();
            assert_same(&format!("GroupNorm {shape:?} / {groups}"), &v, ours, reference, 1e-4);
        }
        // LayerNorm over the last axis of a `[B, T, D]` tensor.
        let v = vars(&[&[2, 3, 10], &[10], &[10]]);
        let t: Vec<&Tensor> = v.iter().map(|v| v.as_tensor()).collect();
        let (ours, reference) = (layer_norm(t[0], t[1], t[2], 1e-5).unwrap(), composed_layer_norm(t[0], t[1], t[2], 1e-5).unwrap());
        assert_same("LayerNorm", &v, ours, reference, 1e-4);
    }

    #[test]
    fn softmax_matches_candles_ops_forward_and_backward() {
        let x = Var::randn(0f32, 3., (2, 3, 9), &Device::Cpu).unwrap();
        let ours = softmax_last_dim(x.as_tensor()).unwrap();
        let reference = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        assert_same("softmax", &[x], ours, reference, 1e-6);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 6, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones(6, DType::F32, &dev).unwrap();
        assert!(group_norm(&x, &w, &w, 4, 1e-5).is_err(), "6 channels do not split into 4 groups");
        assert!(layer_norm(&x, &w, &w, 1e-5).is_err(), "the last axis has 4 features, not 6");
    }
}
