//! im2col with a direct backward, for convolutions while a gradient is recorded on the CPU.
//!
//! Built from candle ops (nine shifted slices, concatenated), every slice's backward pads its gradient
//! back to the full input with a fresh zero tensor and adds it to the sum: nine allocations and passes
//! over the input per convolution, plus the concatenation's copies both ways. Here the forward gathers
//! the columns in one pass and the backward scatters them back in one.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::broadcast::contiguous_f32;

/// The geometry of one convolution's columns (here and in the inference kernel, `super::conv`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) batch: usize,
    pub(super) channels: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) kernel: (usize, usize),
    pub(super) stride: usize,
    pub(super) padding: usize,
}

impl Geometry {
    /// The geometry of a `kernel` convolution of `x` (`[B, C, H, W]`); an error when it does not fit.
    pub(super) fn of(x: &Tensor, kernel: (usize, usize), stride: usize, padding: usize) -> Result<Self> {
        let (batch, channels, h, w) = x.dims4()?;
        if h + 2 * padding < kernel.0 || w + 2 * padding < kernel.1 || stride == 0 {
            candle_core::bail!("a {kernel:?} kernel with padding {padding} and stride {stride} does not fit a {:?} input", x.dims())
        }
        Ok(Self { batch, channels, h, w, kernel, stride, padding })
    }

    pub(super) fn out(&self) -> (usize, usize) {
        let span = |n: usize, k: usize| (n + 2 * self.padding - k) / self.stride + 1;
        (span(self.h, self.kernel.0), span(self.w, self.kernel.1))
    }

    /// For stride 1: the output columns `lo..hi` whose input column `ox + kx − padding` lies inside an
    /// input row (the rest read padding); the input column of `lo` is `lo + kx − padding`.
    pub(super) fn inside(&self, kx: usize) -> (usize, usize) {
        let (_, ow) = self.out();
        let lo = self.padding.saturating_sub(kx).min(ow);
        (lo, (self.w + self.padding).saturating_sub(kx).min(ow).max(lo))
    }

    /// Rows of the column matrix: one per weight of an output channel.
    pub(super) fn depth(&self) -> usize {
        self.channels * self.kernel.0 * self.kernel.1
    }

    fn cols_shape(&self) -> Shape {
        let (oh, ow) = self.out();
        Shape::from((self.depth(), self.batch * oh * ow))
    }

    /// Calls `f(start in the columns, start in the input, n)` for every run of `n` column entries that
    /// read `n` consecutive input elements (the other entries read padding), in the order of the column
    /// entries. Rows are (kernel y, kernel x, channel); columns (batch, out y, out x).
    fn runs(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (oh, ow) = self.out();
        let (kh, kw) = self.kernel;
        let n_cols = self.batch * oh * ow;
        let (s, p) = (self.stride, self.padding);
        // Which output rows read inside the input, and which stretches of an output row do, depend on the
        // kernel offset alone: worked out once per offset, not once per row (the divisions in `out` and
        // the bounds were about an eighth of a small U-Net's training step).
        for ky in 0..kh {
            let rows: Vec<(usize, usize)> =
                (0..oh).filter_map(|oy| (oy * s + ky).checked_sub(p).filter(|&iy| iy < self.h).map(|iy| (oy * ow, iy * self.w))).collect();
            for kx in 0..kw {
                // (start in the output row, start in the input row, n)
                let stretches: Vec<(usize, usize, usize)> = if s == 1 {
                    let (lo, hi) = self.inside(kx);
                    if lo < hi {
                        vec![(lo, lo + kx - p, hi - lo)]
                    } else {
                        Vec::new()
                    }
                } else {
                    (0..ow).filter_map(|ox| (ox * s + kx).checked_sub(p).filter(|&ix| ix < self.w).map(|ix| (ox, ix, 1))).collect()
                };
                for c in 0..self.channels {
                    let row = ((ky * kw + kx) * self.channels + c) * n_cols;
                    for b in 0..self.batch {
                        let plane = (b * self.channels + c) * self.h * self.w;
                        let col = row + b * oh * ow;
                        for &(out_row, in_row) in &rows {
                            for &(o, i, n) in &stretches {
                                f(col + out_row + o, plane + in_row + i, n);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The `[kh·kw·C, B·OH·OW]` column matrix of `x` (`[B, C, H, W]`, f32 on the CPU), differentiable.
pub fn im2col(x: &Tensor, kernel: (usize, usize), stride: usize, padding: usize) -> Result<Tensor> {
    let geometry = Geometry::of(x, kernel, stride, padding).map_err(|e| e.context("im2col"))?;
    x.contiguous()?.apply_op1(Im2col(geometry))
}

struct Im2col(Geometry);

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout)?;
        let shape = self.0.cols_shape();
        let mut cols = vec![0f32; shape.elem_count()];
        self.0.runs(|c, i, n| cols[c..c + n].copy_from_slice(&x[i..i + n]));
        Ok((CpuStorage::F32(cols), shape))
    }

    fn bwd(&self, _x: &Tensor, _cols: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Col2im(self.0))?))
    }
}

/// The backward of [`Im2col`]: each column entry's gradient added to the input element it read.
struct Col2im(Geometry);

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(storage, layout)?;
        let s = self.0;
        let mut x = vec![0f32; s.batch * s.channels * s.h * s.w];
        s.runs(|c, i, n| x[i..i + n].iter_mut().zip(&g[c..c + n]).for_each(|(x, g)| *x += g));
        Ok((CpuStorage::F32(x), Shape::from((s.batch, s.channels, s.h, s.w))))
    }
}
