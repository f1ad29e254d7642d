//! Activations in f32 on the CPU, each in one vectorised pass forward and one backward: GEGLU, and the
//! gated activations `x · σ(k(x))` (SiLU, tanh GELU, CLIP's quick GELU).
//!
//! candle's SiLU and GELU call libm's scalar `expf` and `tanhf` (which calls `expm1f`) per element: a
//! tenth of the tiny fixtures' time. In training their backward passes are several more graph nodes,
//! and libm's `erff` alone took 6% of a fresco-tiny denoiser step.
//!
//! Built from candle's ops, `a · gelu(g)` over the two halves of the feed-forward projection reads the
//! halves as strided views (candle's element-by-element strided path), computes the GELU with libm's
//! scalar `erf`, writes it out and reads it back for the product: at SD 1.5's full resolution a guided
//! image's 42 million gate values per transformer block. Here each row is read once and its product
//! written once, on vectors.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::broadcast::contiguous_f32;
use super::vector_math::{gelu_erf, gelu_erf_and_slope, gelu_tanh, gelu_tanh_arg, quick_gelu, sigmoid, silu, vectorised, QUICK_GELU_SCALE};

/// Rows per parallel task: a few hundred kB of activations.
const ROWS_PER_TASK: usize = 32;

/// `a · gelu_erf(g)` where `a` and `g` are the first and second halves of `h`'s last dimension, f32 on
/// the CPU; differentiable.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1(Geglu)
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

/// `gate` applied to every element of `x`, f32 on the CPU; differentiable.
pub fn gated(x: &Tensor, gate: Gate) -> Result<Tensor> {
    x.contiguous()?.apply_op1(gate)
}

impl Gate {
    /// The derivative of the activation at `x`: with `s = σ(k(x))`, `s + x·s·(1 − s)·k′(x)`.
    #[inline(always)]
    fn slope(self, x: f32) -> f32 {
        let (k, dk) = match self {
            Self::Silu => (x, 1.0),
            Self::GeluTanh => gelu_tanh_arg(x),
            Self::QuickGelu => (QUICK_GELU_SCALE * x, QUICK_GELU_SCALE),
        };
        let s = sigmoid(k);
        s + x * s * (1.0 - s) * dk
    }
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

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GateBackward(*self))?))
    }
}

/// Writes `g · slope(x)` for every `x` of `xs` and `g` of `gs` into `dx`, compiled for the CPU's widest
/// vectors.
#[inline(always)]
fn slopes_into(dx: &mut [f32], xs: &[f32], gs: &[f32], slope: impl Fn(f32) -> f32) {
    vectorised(
        #[inline(always)]
        move || {
            for ((d, &x), &g) in dx.iter_mut().zip(xs).zip(gs) {
                *d = g * slope(x);
            }
        },
    )
}

/// `dx = grad · gate′(x)`.
struct GateBackward(Gate);

impl CustomOp2 for GateBackward {
    fn name(&self) -> &'static str {
        "fresco-gate-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (xs, gs) = (contiguous_f32(xs, xl)?, contiguous_f32(gs, gl)?);
        let mut dx = vec![0f32; xs.len()];
        dx.par_chunks_mut(ELEMENTS_PER_TASK).zip(xs.par_chunks(ELEMENTS_PER_TASK).zip(gs.par_chunks(ELEMENTS_PER_TASK))).for_each(
            // The gate is chosen outside the loop, so each loop inlines one slope.
            |(dx, (xs, gs))| match self.0 {
                Gate::Silu => slopes_into(dx, xs, gs, |x| Gate::Silu.slope(x)),
                Gate::GeluTanh => slopes_into(dx, xs, gs, |x| Gate::GeluTanh.slope(x)),
                Gate::QuickGelu => slopes_into(dx, xs, gs, |x| Gate::QuickGelu.slope(x)),
            },
        );
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "fresco-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = contiguous_f32(storage, layout)?;
        let dims = layout.dims();
        let width = halves_width(dims)?;
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

    fn bwd(&self, h: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(h.apply_op2_no_bwd(&grad.contiguous()?, &GegluBackward)?))
    }
}

/// The width of `dims`' last axis, which must split into two non-empty halves.
fn halves_width(dims: &[usize]) -> Result<usize> {
    match dims.last() {
        Some(&width) if width > 0 && width % 2 == 0 => Ok(width),
        _ => candle_core::bail!("geglu: the last dimension of {dims:?} is not two non-empty halves"),
    }
}

/// For `out = a · gelu(g)`: `da = grad · gelu(g)` and `dg = grad · a · gelu′(g)`, side by side as `h` is.
struct GegluBackward;

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "fresco-geglu-backward"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, hl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (h, grad) = (contiguous_f32(hs, hl)?, contiguous_f32(gs, gl)?);
        let width = halves_width(hl.dims())?;
        let half = width / 2;
        let mut dh = vec![0f32; h.len()];
        dh.par_chunks_mut(width * ROWS_PER_TASK)
            .zip(h.par_chunks(width * ROWS_PER_TASK).zip(grad.par_chunks(half * ROWS_PER_TASK)))
            .for_each(|(dh, (h, grad))| {
                vectorised(
                    #[inline(always)]
                    || {
                        for ((dh, h), grad) in dh.chunks_exact_mut(width).zip(h.chunks_exact(width)).zip(grad.chunks_exact(half)) {
                            let (da, dg) = dh.split_at_mut(half);
                            let (a, g) = h.split_at(half);
                            for ((((da, dg), &a), &g), &o) in da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g).zip(grad) {
                                let (gelu, slope) = gelu_erf_and_slope(g);
                                *da = o * gelu;
                                *dg = o * a * slope;
                            }
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(dh), hl.shape().clone()))
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

    /// Gradients through GEGLU and each gate against candle's composed ops, under a loss that weights
    /// every output differently.
    #[test]
    fn backward_passes_match_candles_ops() {
        use candle_core::Var;
        let grad_of = |x: &Var, y: Tensor, probe: &Tensor| {
            let grads = (y * probe).and_then(|p| p.sum_all()).and_then(|l| l.backward()).expect("backward");
            grads.get(x.as_tensor()).expect("a gradient").clone()
        };
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>()).expect("diff")
        };
        let h = Var::randn(0f32, 2., (3, 5, 2 * 37), &Device::Cpu).expect("h");
        let probe = Tensor::randn(0f32, 1., (3, 5, 37), &Device::Cpu).expect("probe");
        let halves = h.as_tensor().chunk(2, D::Minus1).expect("chunk");
        let want = grad_of(&h, (&halves[0] * halves[1].gelu_erf().expect("gelu")).expect("product"), &probe);
        let got = grad_of(&h, geglu(h.as_tensor()).expect("geglu"), &probe);
        assert!(max_diff(&got, &want) < 1e-5, "geglu: {}", max_diff(&got, &want));

        let x = Var::randn(0f32, 3., (4, 300), &Device::Cpu).expect("x");
        let probe = Tensor::randn(0f32, 1., (4, 300), &Device::Cpu).expect("probe");
        let t = x.as_tensor();
        let sigmoid = candle_nn::ops::sigmoid;
        let composed = [
            (Gate::Silu, (t * sigmoid(t).expect("σ")).expect("silu")),
            (Gate::GeluTanh, t.gelu().expect("gelu")),
            (Gate::QuickGelu, (t * sigmoid(&(t * 1.702).expect("k")).expect("σ")).expect("quick gelu")),
        ];
        for (gate, reference) in composed {
            let (got, want) = (grad_of(&x, gated(t, gate).expect("gated"), &probe), grad_of(&x, reference, &probe));
            assert!(max_diff(&got, &want) < 1e-5, "{gate:?}: {}", max_diff(&got, &want));
        }
    }

    #[test]
    fn an_odd_last_dimension_is_an_error() {
        let h = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).expect("h");
        assert!(geglu(&h).is_err());
    }
}
