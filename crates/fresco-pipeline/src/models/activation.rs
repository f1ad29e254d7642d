//! Activations for inference in f32 on the CPU, each in one vectorised pass: GEGLU, and the gated
//! activations `x · σ(k(x))` (SiLU, tanh GELU, CLIP's quick GELU).
//!
//! candle's SiLU and GELU call libm's scalar `expf` and `tanhf` (which calls `expm1f`) per element: a
//! tenth of the tiny fixtures' time.
//!
//! Built from candle's ops, `a · gelu(g)` over the two halves of the feed-forward projection reads the
//! halves as strided views (candle's element-by-element strided path), computes the GELU with libm's
//! scalar `erf`, writes it out and reads it back for the product: at SD 1.5's full resolution a guided
//! image's 42 million gate values per transformer block. Here each row is read once and its product
//! written once, on vectors.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::broadcast::contiguous_f32;
use super::vector_math::{gelu_erf, gelu_tanh, quick_gelu, silu, vectorised};

/// Rows per parallel task: a few hundred kB of activations.
const ROWS_PER_TASK: usize = 32;

/// `a · gelu_erf(g)` where `a` and `g` are the first and second halves of `h`'s last dimension, f32 on
/// the CPU, without a backward pass.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1_no_bwd(&Geglu)
}

struct Geglu;

/// An activation of the form `x · σ(k(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// `x · σ(x)`.
    Silu,
    /// The tanh-approximate GELU, `x · σ(2·√(2/π)·(x + 0.044715 x³))`.
    GeluTanh,
    /// CLIP's `x · σ(1.702 x)`.
    QuickGelu,
}

/// Elements per parallel task: a few hundred kB.
const ELEMENTS_PER_TASK: usize = 1 << 16;

/// `gate` applied to every element of `x`, f32 on the CPU, without a backward pass.
pub fn gated(x: &Tensor, gate: Gate) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&gate)
}

/// Writes `f(x)` for every `x` into `out`, compiled for the CPU's widest vectors.
#[inline(always)]
fn map_into(out: &mut [f32], xs: &[f32], f: impl Fn(f32) -> f32) {
    vectorised(
        #[inline(always)]
        || {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = f(x);
            }
        },
    )
}

/// Writes `gate(f(x))` for every `x` of `xs` into `out`, compiled for the CPU's widest vectors.
#[inline(always)]
pub(super) fn apply_gate(gate: Gate, out: &mut [f32], xs: &[f32], f: impl Fn(f32) -> f32) {
    // The gate is chosen outside the loop, so each loop inlines one function.
    match gate {
        Gate::Silu => map_into(out, xs, move |x| silu(f(x))),
        Gate::GeluTanh => map_into(out, xs, move |x| gelu_tanh(f(x))),
        Gate::QuickGelu => map_into(out, xs, move |x| quick_gelu(f(x))),
    }
}

impl CustomOp1 for Gate {
    fn name(&self) -> &'static str {
        match self {
            Self::Silu => "fresco-silu",
            Self::GeluTanh => "fresco-gelu-tanh",
            Self::QuickGelu => "fresco-quick-gelu",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = contiguous_f32(storage, layout)?;
        let mut out = vec![0f32; xs.len()];
        out.par_chunks_mut(ELEMENTS_PER_TASK).zip(xs.par_chunks(ELEMENTS_PER_TASK)).for_each(|(out, xs)| apply_gate(*self, out, xs, |x| x));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

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
            vectorised(
                #[inline(always)]
                || {
                    for (out, row) in out.chunks_exact_mut(half).zip(h.chunks_exact(width)) {
                        let (a, g) = row.split_at(half);
                        for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
                            *o = a * gelu_erf(g);
                        }
                    }
                },
            )
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

    /// Each gate reads a strided (transposed) input in its logical order and keeps its shape.
    #[test]
    fn gates_read_strided_input_in_order() {
        let x = Tensor::randn(0f32, 3., (2, 37, 70), &Device::Cpu).expect("x").transpose(1, 2).expect("transpose");
        let values = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values");
        for (gate, f) in [(Gate::Silu, silu as fn(f32) -> f32), (Gate::GeluTanh, gelu_tanh), (Gate::QuickGelu, quick_gelu)] {
            let got = gated(&x, gate).expect("gated");
            assert_eq!(got.dims(), x.dims());
            let got = got.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("got");
            assert!(got.iter().zip(&values).all(|(&g, &v)| g == f(v)), "{gate:?}");
        }
    }

    #[test]
    fn an_odd_last_dimension_is_an_error() {
        let h = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).expect("h");
        assert!(geglu(&h).is_err());
    }
}
