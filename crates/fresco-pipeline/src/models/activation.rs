//! GEGLU for inference in f32 on the CPU, in one pass.
//!
//! Built from candle's ops, `a · gelu(g)` over the two halves of the feed-forward projection reads the
//! halves as strided views (candle's element-by-element strided path), computes the GELU with libm's
//! scalar `erf`, writes it out and reads it back for the product: at SD 1.5's full resolution a guided
//! image's 42 million gate values per transformer block. Here each row is read once and its product
//! written once, on vectors.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::broadcast::contiguous_f32;
use super::vector_math::{gelu_erf, vectorised};

/// Rows per parallel task: a few hundred kB of activations.
const ROWS_PER_TASK: usize = 32;

/// `a · gelu_erf(g)` where `a` and `g` are the first and second halves of `h`'s last dimension, f32 on
/// the CPU, without a backward pass.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1_no_bwd(&Geglu)
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "fresco-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = contiguous_f32(storage, layout)?;
        let dims = layout.dims();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || width % 2 != 0 {
            candle_core::bail!("geglu: the last dimension of {dims:?} is not two non-empty halves")
        }
        let half = width / 2;
        let mut out = vec![0f32; h.len() / 2];
        out.par_chunks_mut(half * ROWS_PER_TASK).zip(h.par_chunks(width * ROWS_PER_TASK)).for_each(|(out, h)| {
            vectorised(|| {
                for (out, row) in out.chunks_exact_mut(half).zip(h.chunks_exact(width)) {
                    let (a, g) = row.split_at(half);
                    for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
                        *o = a * gelu_erf(g);
                    }
                }
            })
        });
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = half; // dims is not empty: its last entry is `width`
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The same values as candle's chunk, erf GELU and product, on rows of odd and even width.
    #[test]
    fn matches_candles_ops() {
        for dims in [(3, 5, 8), (2, 70, 2 * 37), (1, 1, 2)] {
            let h = Tensor::randn(0f32, 2., dims, &Device::Cpu).expect("h");
            let halves = h.chunk(2, D::Minus1).expect("chunk");
            let want = (&halves[0] * halves[1].gelu_erf().expect("gelu")).expect("product");
            let got = geglu(&h).expect("geglu");
            assert_eq!(got.dims(), want.dims());
            let diff = (&got - &want).expect("diff").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
            assert!(diff < 1e-5, "{dims:?}: max |Δ| {diff}");
        }
    }

    #[test]
    fn an_odd_last_dimension_is_an_error() {
        let h = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).expect("h");
        assert!(geglu(&h).is_err());
    }
}
