//! FLUX's rotary position embedding for inference in f32 on the CPU, in one pass.
//!
//! Built from candle's ops (pairs split off, one half negated, both concatenated, two broadcast
//! products and a sum) it is seven passes and allocations over every block's queries and keys. Here
//! each value is read once and computed with the same two products and one sum, so the result is the
//! same to the bit.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::broadcast::contiguous_f32;
use super::fused::{cpu_f32, recording};
use super::vector_math::vectorised;

/// Rotary embedding as diffusers applies it with `use_real_unbind_dim=-1`: `x · cos + rotate(x) · sin`,
/// where `rotate` turns each consecutive pair `(a, b)` of the last axis into `(−b, a)`, for `x`
/// `[B, heads, N, d]` and per-position tables `cos`, `sin` `[1, 1, N, d]`. For inference in f32 on the
/// CPU in one pass, elsewhere candle's ops.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, n, d) = x.dims4()?;
    if cos.dims() != [1, 1, n, d] || sin.dims() != [1, 1, n, d] || d % 2 == 1 {
        candle_core::bail!("rope: tables {:?} and {:?} do not fit {:?}", cos.dims(), sin.dims(), x.dims())
    }
    let args = [x, cos, sin];
    if cpu_f32(&args) && !recording(&args) {
        return x.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &Rope);
    }
    composed(x, cos, sin)
}

/// [`rope`] from candle's ops.
fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    let pairs = x.reshape((b, h, n, d / 2, 2))?;
    let (re, im) = (pairs.narrow(4, 0, 1)?, pairs.narrow(4, 1, 1)?);
    let rotated = Tensor::cat(&[&im.neg()?, &re], 4)?.reshape((b, h, n, d))?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fresco-rope"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        cs: &CpuStorage,
        cl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (contiguous_f32(xs, xl)?, contiguous_f32(cs, cl)?, contiguous_f32(ss, sl)?);
        let mut out = vec![0f32; x.len()];
        // One task per head: every head rotates by the same tables.
        out.par_chunks_mut(cos.len().max(1)).zip(x.par_chunks(cos.len().max(1))).for_each(|(out, x)| {
            vectorised(
                #[inline(always)]
                || {
                    for (((o, x), c), s) in out.chunks_exact_mut(2).zip(x.chunks_exact(2)).zip(cos.chunks_exact(2)).zip(sin.chunks_exact(2))
                    {
                        o[0] = x[0] * c[0] + -x[1] * s[0];
                        o[1] = x[1] * c[1] + x[0] * s[1];
                    }
                },
            )
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The same values to the bit, for a contiguous and for a strided (transposed) input.
    #[test]
    fn matches_candles_composition_exactly() {
        let dev = Device::Cpu;
        let (b, h, n, d) = (2, 3, 5, 8);
        let cos = Tensor::randn(0f32, 1., (1, 1, n, d), &dev).expect("cos");
        let sin = Tensor::randn(0f32, 1., (1, 1, n, d), &dev).expect("sin");
        let x = Tensor::randn(0f32, 3., (b, h, n, d), &dev).expect("x");
        let strided = Tensor::randn(0f32, 3., (b, n, h, d), &dev).expect("x").transpose(1, 2).expect("t");
        for x in [x, strided] {
            let (got, want) = (rope(&x, &cos, &sin).expect("rope"), composed(&x, &cos, &sin).expect("composed"));
            let (got, want) =
                (got.flatten_all().expect("f").to_vec1::<f32>().expect("v"), want.flatten_all().expect("f").to_vec1::<f32>().expect("v"));
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "not bit-identical");
        }
    }

    #[test]
    fn tables_of_the_wrong_shape_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 4), candle_core::DType::F32, &dev).expect("x");
        let table = Tensor::zeros((1, 1, 3, 2), candle_core::DType::F32, &dev).expect("table");
        assert!(rope(&x, &table, &table).is_err());
    }
}
