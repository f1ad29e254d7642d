//! 2-D convolution for inference in f32 on the CPU: column tiles, one matrix multiply each.
//!
//! candle 0.11's CPU convolution builds its columns value by value, each write a tile's width away
//! from the last (a cache miss per value at SD's 320–1280 channels), reorders the whole kernel on every
//! call (25 MB per call for a 1280-channel 3×3 convolution), and copies the product back channel by
//! channel. Here the columns follow the weight's own `(channel, ky, kx)` order, so the weight is used as
//! stored; each column row is a shifted copy of one input plane, read and written in runs; and the
//! matrix multiply writes straight into the output through its strides, onto the bias already there.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::broadcast::{contiguous_f32, with_held};
use super::im2col::Geometry;
use super::matmul::{multiply, Strided};

/// Column entries per tile: 4 MiB of f32, a few rows of output at SD's sizes. Small enough that a
/// tile stays in cache while the multiply reads it, large enough that the multiply runs at full speed.
const TILE_ELEMENTS: usize = 1 << 20;

/// The inference kernel's view of the training im2col's geometry: its columns follow the weight.
impl Geometry {
    /// A 1×1 kernel without stride or padding reads the input planes as they are: no columns to build.
    fn pointwise(&self) -> bool {
        self.kernel == (1, 1) && self.stride == 1 && self.padding == 0
    }

    /// The columns of output rows `y0..y1` of batch element `b`: `[depth, (y1 - y0)·OW]`, row
    /// `(c, ky, kx)` holding input plane `c` shifted by `(ky, kx)`, zero where it reads padding.
    fn columns(&self, x: &[f32], b: usize, (y0, y1): (usize, usize), parallel: bool) -> Vec<f32> {
        let (_, ow) = self.out();
        let (kh, kw) = self.kernel;
        let (s, p) = (self.stride, self.padding);
        let n = (y1 - y0) * ow;
        let mut cols = vec![0f32; self.depth() * n];
        let fill = |(r, row): (usize, &mut [f32])| {
            let (c, ky, kx) = (r / (kh * kw), (r / kw) % kh, r % kw);
            let plane = &x[(b * self.channels + c) * self.h * self.w..][..self.h * self.w];
            let (lo, hi) = self.inside(kx);
            for oy in y0..y1 {
                let Some(iy) = (oy * s + ky).checked_sub(p).filter(|&iy| iy < self.h) else { continue };
                let line = &plane[iy * self.w..][..self.w];
                let out = &mut row[(oy - y0) * ow..][..ow];
                if s == 1 {
                    if lo < hi {
                        out[lo..hi].copy_from_slice(&line[lo + kx - p..hi + kx - p]);
                    }
                } else {
                    for (ox, v) in out.iter_mut().enumerate() {
                        if let Some(&value) = (ox * s + kx).checked_sub(p).and_then(|ix| line.get(ix)) {
                            *v = value;
                        }
                    }
                }
            }
        };
        if parallel {
            cols.par_chunks_mut(n.max(1)).enumerate().for_each(fill);
        } else {
            cols.chunks_mut(n.max(1)).enumerate().for_each(fill);
        }
        cols
    }
}

/// `conv2d(x, weight) + bias` for `x` `[B, C, H, W]` and `weight` `[O, C, KH, KW]`, f32 on the CPU,
/// without a backward pass (training keeps the differentiable path in [`super::blocks::Conv2d`]).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_plus(x, weight, bias, stride, padding, None)
}

/// [`conv2d`] with `residual` (the output's shape) added to each tile of the output as soon as its
/// multiply is done, while the tile is still in cache: a ResNet block's skip connection without a
/// pass and an allocation of its own. Each value is `(conv + bias) + residual`, rounded as the two
/// separate additions round.
pub fn conv2d_plus(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (out_channels, weight_channels, kh, kw) = weight.dims4()?;
    let geometry = Geometry::of(x, (kh, kw), stride, padding).map_err(|e| e.context("conv2d"))?;
    if weight_channels != geometry.channels {
        candle_core::bail!("conv2d: a {:?} weight does not fit a {:?} input", weight.dims(), x.dims())
    }
    let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
    if let Some(b) = bias.as_ref().filter(|b| b.len() != out_channels) {
        candle_core::bail!("conv2d: a bias of {} values for {out_channels} output channels", b.len())
    }
    let (oh, ow) = geometry.out();
    let residual = match residual {
        Some(r) if r.dims() != [geometry.batch, out_channels, oh, ow] => {
            candle_core::bail!("conv2d: a {:?} residual for a {:?} output", r.dims(), [geometry.batch, out_channels, oh, ow])
        }
        Some(r) if !super::fused::cpu_f32(&[r]) => candle_core::bail!("conv2d: the residual is not f32 on the CPU"),
        r => r.map(Tensor::contiguous).transpose()?,
    };
    let op = Conv { geometry, out_channels, bias, residual, tile_elements: TILE_ELEMENTS };
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op)
}

struct Conv {
    geometry: Geometry,
    out_channels: usize,
    bias: Option<Vec<f32>>,
    /// `[B, O, OH, OW]`, contiguous f32 on the CPU, added to the output.
    residual: Option<Tensor>,
    tile_elements: usize,
}

/// An output buffer shared by parallel tasks that each write their own rows of it.
pub(super) struct Out(pub(super) *mut f32);

// SAFETY: the tasks write disjoint parts of the buffer (here a tile's output rows), and the buffer
// outlives them: they all finish before the kernel returns it.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    pub(super) fn at(&self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer (offsets of output rows).
        unsafe { self.0.add(offset) }
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "fresco-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, weight) = (contiguous_f32(s1, l1)?, contiguous_f32(s2, l2)?);
        with_held(self.residual.as_ref(), "conv2d: the residual", |residual| self.run(x, weight, residual))
    }
}

impl Conv {
    /// The convolution of the contiguous `x` by `weight`, plus the bias and the `residual`.
    fn run(&self, x: &[f32], weight: &[f32], residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let (oh, ow) = g.out();
        let (plane, depth, o) = (oh * ow, g.depth(), self.out_channels);
        let mut out = vec![0f32; g.batch * o * plane];
        if let Some(bias) = &self.bias {
            for (i, row) in out.chunks_mut(plane).enumerate() {
                row.fill(bias[i % o]);
            }
        }
        // Output rows per tile; a pointwise convolution multiplies whole planes in place.
        let rows = if g.pointwise() { oh } else { (self.tile_elements / (depth * ow).max(1)).clamp(1, oh) };
        let tiles: Vec<(usize, usize)> = (0..g.batch).flat_map(|b| (0..oh).step_by(rows).map(move |y0| (b, y0))).collect();
        let threads = rayon::current_num_threads();
        // Many tiles run side by side, one thread each; a few run one after another, each multiply and
        // column build spread over the threads.
        let side_by_side = tiles.len() >= 2 * threads;
        let dst = Out(out.as_mut_ptr());
        let run = |&(b, y0): &(usize, usize)| {
            let y1 = (y0 + rows).min(oh);
            let n = (y1 - y0) * ow;
            let cols;
            let (rhs, rhs_rs) = if g.pointwise() {
                (&x[b * g.channels * plane + y0 * ow..], plane)
            } else {
                cols = g.columns(x, b, (y0, y1), !side_by_side);
                (&cols[..], n)
            };
            let parallelism = if side_by_side || threads == 1 { Parallelism::None } else { Parallelism::Rayon(threads) };
            // SAFETY: dst is `O` rows of `n` values, `plane` apart, inside batch element `b`'s output;
            // lhs is the `[O, depth]` weight and rhs a `[depth, n]` matrix `rhs_rs` apart, both in bounds.
            unsafe {
                multiply(
                    (o, n, depth),
                    Strided::rows(dst.at(b * o * plane + y0 * ow), plane),
                    Strided::rows(weight.as_ptr(), depth),
                    Strided::rows(rhs.as_ptr(), rhs_rs),
                    self.bias.is_some(),
                    1.0,
                    parallelism,
                )
            }
            if let Some(residual) = residual {
                for c in 0..o {
                    let first = b * o * plane + c * plane + y0 * ow;
                    // SAFETY: row c of this tile, `n` values inside batch element `b`'s output; this task
                    // alone writes it, and the multiply above has finished with it.
                    let row = unsafe { std::slice::from_raw_parts_mut(dst.at(first), n) };
                    row.iter_mut().zip(&residual[first..first + n]).for_each(|(v, r)| *v += r);
                }
            }
        };
        if side_by_side {
            tiles.par_iter().for_each(run);
        } else {
            tiles.iter().for_each(run);
        }
        Ok((CpuStorage::F32(out), Shape::from((g.batch, o, oh, ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The tiles, strides, paddings and the pointwise path all give candle's convolution.
    #[test]
    fn matches_candles_convolution() {
        let dev = Device::Cpu;
        // (batch, channels, h, w, out channels, kernel, stride, padding, bias)
        let cases = [
            (2, 3, 9, 7, 5, 3, 1, 1, true),
            (1, 4, 8, 8, 6, 3, 2, 1, false),
            (3, 2, 7, 10, 4, 3, 2, 0, true),
            (2, 5, 6, 6, 3, 1, 1, 0, true),
            (1, 3, 5, 5, 2, 1, 2, 0, false),
            (2, 2, 4, 6, 3, 2, 1, 0, true),
            (1, 2, 3, 3, 2, 3, 1, 2, false),
        ];
        for (i, &(b, c, h, w, o, k, stride, padding, with_bias)) in cases.iter().enumerate() {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev).expect("x");
            let weight = Tensor::randn(0f32, 1., (o, c, k, k), &dev).expect("weight");
            let bias = Tensor::randn(0f32, 1., o, &dev).expect("bias");
            let bias = with_bias.then_some(&bias);
            let mut want = x.conv2d(&weight, padding, stride, 1, 1).expect("candle");
            if let Some(bias) = bias {
                want = want.broadcast_add(&bias.reshape((1, o, 1, 1)).expect("reshape")).expect("add");
            }
            // A tile budget of one output row at a time, and one of the whole image at once.
            for tile_elements in [1, usize::MAX / 2] {
                let geometry = Geometry { batch: b, channels: c, h, w, kernel: (k, k), stride, padding };
                let op = Conv { geometry, out_channels: o, bias: bias.map(|b| b.to_vec1().expect("bias")), residual: None, tile_elements };
                let got = x.apply_op2_no_bwd(&weight, &op).expect("fresco");
                assert_eq!(got.dims(), want.dims(), "case {i}");
                let diff = (&got - &want).expect("diff").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
                assert!(diff < 1e-4, "case {i}, tiles of {tile_elements}: max |Δ| {diff}");
            }
        }
    }

    /// A residual is added as a separate addition after the convolution would add it: to the bit, for
    /// one-row tiles, whole-image tiles and the pointwise path.
    #[test]
    fn a_residual_is_added_as_a_separate_addition_would() {
        let dev = Device::Cpu;
        for (i, &(c, h, w, o, k, padding)) in [(3, 9, 7, 5, 3, 1), (4, 6, 6, 3, 1, 0)].iter().enumerate() {
            let x = Tensor::randn(0f32, 1., (2, c, h, w), &dev).expect("x");
            let weight = Tensor::randn(0f32, 1., (o, c, k, k), &dev).expect("weight");
            let bias = Tensor::randn(0f32, 1., o, &dev).expect("bias").to_vec1::<f32>().expect("bias");
            for tile_elements in [1, usize::MAX / 2] {
                let geometry = Geometry { batch: 2, channels: c, h, w, kernel: (k, k), stride: 1, padding };
                let (oh, ow) = geometry.out();
                let residual = Tensor::randn(0f32, 1., (2, o, oh, ow), &dev).expect("residual");
                let op = |residual: Option<Tensor>| Conv { geometry, out_channels: o, bias: Some(bias.clone()), residual, tile_elements };
                let plain = x.apply_op2_no_bwd(&weight, &op(None)).expect("conv");
                let want = (&plain + &residual).expect("sum").flatten_all().expect("f").to_vec1::<f32>().expect("v");
                let got = x
                    .apply_op2_no_bwd(&weight, &op(Some(residual)))
                    .expect("conv plus")
                    .flatten_all()
                    .expect("f")
                    .to_vec1::<f32>()
                    .expect("v");
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "case {i}, tiles of {tile_elements}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &dev).expect("x");
        let weight = Tensor::zeros((2, 4, 3, 3), candle_core::DType::F32, &dev).expect("weight");
        assert!(conv2d(&x, &weight, None, 1, 1).is_err(), "channels differ");
        let weight = Tensor::zeros((2, 3, 7, 7), candle_core::DType::F32, &dev).expect("weight");
        assert!(conv2d(&x, &weight, None, 1, 1).is_err(), "kernel larger than the padded input");
        let weight = Tensor::zeros((2, 3, 3, 3), candle_core::DType::F32, &dev).expect("weight");
        let bias = Tensor::zeros(3, candle_core::DType::F32, &dev).expect("bias");
        assert!(conv2d(&x, &weight, Some(&bias), 1, 1).is_err(), "bias of the wrong length");
        assert!(conv2d(&x, &weight, None, 0, 1).is_err(), "stride 0");
        let residual = Tensor::zeros((1, 2, 3, 4), candle_core::DType::F32, &dev).expect("residual");
        assert!(conv2d_plus(&x, &weight, None, 1, 1, Some(&residual)).is_err(), "residual of the wrong shape");
    }
}
