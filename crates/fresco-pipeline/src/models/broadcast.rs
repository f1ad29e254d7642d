//! Broadcasting binary ops whose gradient sums back quickly on the CPU.
//!
//! candle's backward of a broadcast sums the gradient back to the small shape with one division-heavy
//! index computation per element unless the summed axes are the trailing ones — and those of a
//! per-channel scale `[1, C, 1, 1]`, a linear layer's bias or a position table shared by the batch never
//! are. Training fresco-tiny's U-Net on the CPU spent a quarter of every step there. While a gradient is
//! recorded for f32 on the CPU, [`expand`] materialises the broadcast in the forward pass (one cheap copy)
//! and its backward sums rows of the gradient instead; everywhere else these are candle's own ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

/// `x` broadcast to `shape`.
pub fn expand(x: &Tensor, shape: &Shape) -> Result<Tensor> {
    if x.shape() == shape {
        Ok(x.clone())
    } else if x.track_op() && x.device().is_cpu() && x.dtype() == DType::F32 {
        // The shapes must be compatible (candle's error if they are not) without building a view to check.
        if &x.shape().broadcast_shape_binary_op(shape, "expand")? != shape {
            candle_core::bail!("expand: cannot broadcast {:?} to {:?}", x.dims(), shape.dims())
        }
        x.contiguous()?.apply_op1(Expand { to: shape.clone() })
    } else {
        x.broadcast_as(shape)
    }
}

/// Both operands broadcast to their common shape.
fn both(a: &Tensor, b: &Tensor, op: &'static str) -> Result<(Tensor, Tensor)> {
    let shape = a.shape().broadcast_shape_binary_op(b.shape(), op)?;
    Ok((expand(a, &shape)?, expand(b, &shape)?))
}

/// `a.broadcast_add(b)`.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = both(a, b, "broadcast_add")?;
    a + b
}

/// `a.broadcast_mul(b)`.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a, b) = both(a, b, "broadcast_mul")?;
    a * b
}

/// A broadcast from a small shape to a full one, as rows: the full shape with adjacent axes merged
/// where both are broadcast or both are kept, and for each merged axis its stride in the (contiguous)
/// small tensor, 0 where it is broadcast. The last merged axis is the row.
struct Rows {
    dims: Vec<usize>,
    strides: Vec<usize>,
}

impl Rows {
    fn new(small: &[usize], full: &[usize]) -> Self {
        let pad = full.len() - small.len();
        let (mut dims, mut kept) = (Vec::<usize>::new(), Vec::<bool>::new());
        for (i, &f) in full.iter().enumerate() {
            if f == 1 {
                continue;
            }
            let k = i >= pad && small[i - pad] == f;
            match (dims.last_mut(), kept.last()) {
                (Some(d), Some(&last)) if last == k => *d *= f,
                _ => {
                    dims.push(f);
                    kept.push(k);
                }
            }
        }
        if dims.is_empty() {
            dims.push(1);
            kept.push(true);
        }
        let mut strides = vec![0; dims.len()];
        let mut acc = 1;
        for i in (0..dims.len()).rev() {
            if kept[i] {
                strides[i] = acc;
                acc *= dims[i];
            }
        }
        Self { dims, strides }
    }

    fn len(&self) -> usize {
        self.dims[self.dims.len() - 1]
    }

    /// Whether a row maps to a row of the small tensor (else to one element of it).
    fn kept(&self) -> bool {
        self.strides[self.strides.len() - 1] != 0
    }

    /// Calls `f(start of the row in the full tensor, offset in the small one)` for every row, in order.
    fn each(&self, mut f: impl FnMut(usize, usize)) {
        let outer = &self.dims[..self.dims.len() - 1];
        let mut index = vec![0; outer.len()];
        let mut offset = 0;
        for row in 0..outer.iter().product::<usize>() {
            f(row * self.len(), offset);
            for d in (0..outer.len()).rev() {
                index[d] += 1;
                offset += self.strides[d];
                if index[d] < outer[d] {
                    break;
                }
                offset -= self.strides[d] * outer[d];
                index[d] = 0;
            }
        }
    }
}

/// The f32 elements of a contiguous CPU tensor (the custom ops here and in `im2col` are applied to
/// contiguous tensors only).
pub(super) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("expected a contiguous tensor"),
    }
}

/// Calls `f` with the values of `held` (if any), read in place from its CPU storage: a kernel's extra
/// operand that it holds beside candle's two or three (an attention bias, a convolution's residual).
/// `what` names it in the error when it is not on the CPU.
pub(super) fn with_held<R>(held: Option<&Tensor>, what: &str, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
    let Some(held) = held else { return f(None) };
    let (storage, layout) = held.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => f(Some(contiguous_f32(cpu, layout)?)),
        _ => candle_core::bail!("{what} is not on the CPU"),
    }
}

struct Expand {
    to: Shape,
}

impl CustomOp1 for Expand {
    fn name(&self) -> &'static str {
        "expand"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let small = contiguous_f32(storage, layout)?;
        let rows = Rows::new(layout.dims(), self.to.dims());
        let (n, kept) = (rows.len(), rows.kept());
        let mut out = vec![0f32; self.to.elem_count()];
        rows.each(|start, offset| {
            let row = &mut out[start..start + n];
            if kept {
                row.copy_from_slice(&small[offset..offset + n]);
            } else {
                row.fill(small[offset]);
            }
        });
        Ok((CpuStorage::F32(out), self.to.clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&SumTo { to: arg.shape().clone() })?))
    }
}

/// The backward of [`Expand`]: the gradient summed back to the small shape, a row at a time.
struct SumTo {
    to: Shape,
}

impl CustomOp1 for SumTo {
    fn name(&self) -> &'static str {
        "sum-to"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let full = contiguous_f32(storage, layout)?;
        let rows = Rows::new(self.to.dims(), layout.dims());
        let (n, kept) = (rows.len(), rows.kept());
        let mut out = vec![0f32; self.to.elem_count()];
        rows.each(|start, offset| {
            let row = &full[start..start + n];
            if kept {
                out[offset..offset + n].iter_mut().zip(row).for_each(|(o, g)| *o += g);
            } else {
                out[offset] += row.iter().sum::<f32>();
            }
        });
        Ok((CpuStorage::F32(out), self.to.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar")
    }

    /// Values and gradients equal candle's broadcasts for every kind of broadcast the models use: a
    /// per-channel scale, a bias over rows, a shared leading axis, a scalar, a strided input.
    #[test]
    fn expand_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        let cases: [(&[usize], &[usize]); 6] = [
            (&[1, 5, 1, 1], &[3, 5, 4, 2]),
            (&[7], &[3, 6, 7]),
            (&[1, 6, 7], &[3, 6, 7]),
            (&[3, 1, 4, 1], &[3, 5, 4, 2]),
            (&[1], &[2, 3]),
            (&[2, 3], &[2, 3]),
        ];
        for (small, full) in cases {
            let v = Var::randn(0f32, 1., small, &dev).expect("var");
            let other = Tensor::randn(0f32, 1., full, &dev).expect("other");
            let ours = mul(&other, v.as_tensor()).expect("ours");
            let theirs = other.broadcast_mul(v.as_tensor()).expect("candle");
            assert!(max_diff(&ours, &theirs) < 1e-6, "{small:?} → {full:?}: values");
            let g_ours = ours.sqr().expect("sq").sum_all().expect("sum").backward().expect("bwd");
            let g_theirs = theirs.sqr().expect("sq").sum_all().expect("sum").backward().expect("bwd");
            let (a, b) = (g_ours.get(v.as_tensor()).expect("ours"), g_theirs.get(v.as_tensor()).expect("theirs"));
            assert_eq!(a.dims(), small);
            assert!(max_diff(a, b) < 1e-4, "{small:?} → {full:?}: gradients differ by {}", max_diff(a, b));
        }
        // A transposed (strided) variable input.
        let v = Var::randn(0f32, 1., (4, 3), &dev).expect("var");
        let t = v.as_tensor().t().expect("t");
        let got = expand(&t, &Shape::from((2, 3, 4))).expect("expand");
        assert!(max_diff(&got, &t.broadcast_as((2, 3, 4)).expect("b")) == 0.0);
        assert!(expand(v.as_tensor(), &Shape::from((2, 5))).is_err(), "incompatible shapes are an error");
    }
}
