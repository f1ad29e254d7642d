//! Scaled dot-product attention for inference in f32 on the CPU, one small block of queries at a time.
//!
//! Built from candle ops, attention writes the whole score matrix of a block of queries to memory
//! (16 MiB per block at SD 1.5's 4096 tokens), reads and writes it again for the softmax — whose `exp` is
//! libm's, one value at a time — and reads it once more for the product with the values: at 512×512
//! that is some 270 million scores per attention layer, three trips through memory each. Here each task
//! takes a few queries of one head, so their scores (256 KiB) stay in the core's cache from the first
//! multiply to the second, and the softmax runs on vectors. The softmax divides the output rows, not the
//! scores: `d` values a query instead of `M`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::broadcast::with_held;
use super::conv::Out;
use super::matmul::{multiply, Strided};
use super::vector_math::{exp_nonpositive, vectorised};

/// Scores per task: 256 KiB of f32, which an L2 cache holds beside the task's queries and values.
const TASK_SCORES: usize = 1 << 16;

/// `softmax(q kᵀ / √d) v` over `[B, heads, N, d]` queries and `[B, heads, M, d]` keys and values, of
/// any strides (heads split off a `[B, N, heads·d]` projection are read in place), f32 on the CPU,
/// without a backward pass. The `[B, heads, N, d]` result is a view of `[B, N, heads, d]` storage, so
/// that merging the heads back ([`super::blocks::merge_heads`]) is a reshape, not a copy.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let [_, _, _, _, d] = fit(q, k, v)?;
    q.apply_op3_no_bwd(k, v, &Attention { scale: (d as f32).powf(-0.5), bias: None, task_scores: TASK_SCORES })?.transpose(1, 2)
}

/// `softmax(scale · q kᵀ + bias) v`, as [`attention`], with an additive `[heads, N, M]` bias that every
/// batch element shares (T5's relative positions).
pub fn biased_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: &Tensor) -> Result<Tensor> {
    let [_, h, n, m, _] = fit(q, k, v)?;
    if bias.dims() != [h, n, m] {
        candle_core::bail!("attention: a bias of {:?} does not fit {h} heads of {n} queries and {m} keys", bias.dims())
    }
    // Read in place by the kernel: T5 passes the same bias to every layer.
    q.apply_op3_no_bwd(k, v, &Attention { scale: scale as f32, bias: Some(bias.contiguous()?), task_scores: TASK_SCORES })?.transpose(1, 2)
}

/// `[B, heads, N, M, d]` of operands that fit together: queries `[B, heads, N, d]`, keys and values
/// `[B, heads, M, d]` with at least one key.
fn fit(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<[usize; 5]> {
    let (b, h, n, d) = q.dims4()?;
    let (kb, kh, m, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims() != k.dims() || m == 0 {
        candle_core::bail!("attention: queries {:?}, keys {:?} and values {:?} do not fit", q.dims(), k.dims(), v.dims())
    }
    Ok([b, h, n, m, d])
}

struct Attention {
    scale: f32,
    /// `[heads, N, M]`, contiguous f32 on the CPU, added to the scaled scores.
    bias: Option<Tensor>,
    task_scores: usize,
}

/// A `[B, heads, rows, d]` operand: its storage from the first element, and its strides.
struct Operand<'a> {
    data: &'a [f32],
    strides: [usize; 4],
}

impl<'a> Operand<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let data = &storage.as_slice::<f32>()?[layout.start_offset()..];
        let s = layout.stride();
        Ok(Self { data, strides: [s[0], s[1], s[2], s[3]] })
    }

    /// Head `head` of batch element `b` from position `row` on, as a matrix: a row per position, a
    /// column per feature, at the operand's own strides.
    fn head(&self, b: usize, head: usize, row: usize) -> Strided<*const f32> {
        let ptr = self.data[b * self.strides[0] + head * self.strides[1] + row * self.strides[2]..].as_ptr();
        Strided { ptr, row: self.strides[2] as isize, col: self.strides[3] as isize }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fresco-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (Operand::new(qs, ql)?, Operand::new(ks, kl)?, Operand::new(vs, vl)?);
        let [b, h, n, d] = ql.shape().dims4()?.into();
        let m = kl.shape().dims()[2];
        with_held(self.bias.as_ref(), "attention: the bias", |bias| Ok(self.run([b, h, n, m, d], (&q, &k, &v), bias)))
    }
}

impl Attention {
    /// The attention of `[B, heads, N, d]` queries over `[B, heads, M, d]` keys and values (`dims`
    /// `[B, heads, N, M, d]`), with the `bias` added to the scores.
    fn run(&self, [b, h, n, m, d]: [usize; 5], (q, k, v): (&Operand, &Operand, &Operand), bias: Option<&[f32]>) -> (CpuStorage, Shape) {
        let rows = (self.task_scores / m.max(1)).clamp(1, n.max(1));
        let mut out = vec![0f32; b * h * n * d];
        let dst = Out(out.as_mut_ptr());
        let tasks: Vec<(usize, usize, usize)> =
            (0..b).flat_map(|bi| (0..h).flat_map(move |hi| (0..n).step_by(rows).map(move |r0| (bi, hi, r0)))).collect();
        tasks.par_iter().for_each_init(Vec::new, |scores: &mut Vec<f32>, &(bi, hi, r0)| {
            let r = rows.min(n - r0);
            scores.resize(r * m, 0.0);
            // A bias goes into the scores first; the product then adds onto it (`read_dst`, alpha 1).
            if let Some(bias) = bias {
                scores.copy_from_slice(&bias[(hi * n + r0) * m..][..r * m]);
            }
            // SAFETY: the scores are `r × m`, contiguous; q's rows r0.. and k's m rows of this head lie
            // inside their storages at the layouts' strides.
            unsafe {
                multiply(
                    (r, m, d),
                    Strided::rows(scores.as_mut_ptr(), m),
                    q.head(bi, hi, r0),
                    k.head(bi, hi, 0).t(),
                    bias.is_some(),
                    self.scale,
                    Parallelism::None,
                )
            };
            let sums = exp_shifted_rows(scores, m);
            // Output rows are `[B, N, heads, d]`: this head's rows are heads·d apart.
            let (first, row_stride) = (((bi * n + r0) * h + hi) * d, h * d);
            // SAFETY: this task's output rows (r rows of d, row_stride apart) are its own; v's m rows of
            // this head lie inside its storage.
            unsafe {
                multiply(
                    (r, d, m),
                    Strided::rows(dst.at(first), row_stride),
                    Strided::rows(scores.as_ptr(), m),
                    v.head(bi, hi, 0),
                    false,
                    1.0,
                    Parallelism::None,
                )
            };
            for (i, sum) in sums.iter().enumerate() {
                // SAFETY: row i of this task's output, as above.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.at(first + i * row_stride), d) };
                row.iter_mut().for_each(|x| *x /= sum);
            }
        });
        (CpuStorage::F32(out), Shape::from((b, n, h, d)))
    }
}

/// Replaces each row (`m` scores) by `exp(score − max)` and returns the rows' sums: the softmax's
/// numerators and denominators.
fn exp_shifted_rows(scores: &mut [f32], m: usize) -> Vec<f32> {
    let mut sums = Vec::with_capacity(scores.len() / m.max(1));
    // A plain loop: an iterator chain (`map(..).collect()`) ends in library functions that are not
    // inlined, so the exponentials would run on the build's baseline vectors (SSE), not the CPU's.
    vectorised(
        #[inline(always)]
        || {
            for row in scores.chunks_mut(m) {
                sums.push(exp_shifted(row));
            }
        },
    );
    sums
}

/// Lanes of the running max and sum: independent accumulators the compiler can keep in one vector.
const LANES: usize = 16;

#[inline(always)]
fn exp_shifted(row: &mut [f32]) -> f32 {
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in max.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&max).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    for x in row.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let mut sum = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (s, &x) in sum.iter_mut().zip(c) {
            *s += x;
        }
    }
    chunks.remainder().iter().chain(&sum).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Tensor {
        let mut scores = (q.matmul(&k.t().expect("t")).expect("qk") * scale).expect("scale");
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias).expect("bias");
        }
        candle_nn::ops::softmax_last_dim(&scores).expect("softmax").matmul(v).expect("pv")
    }

    /// The result is candle's softmax attention, for one task and for many, for self- and
    /// cross-attention, and for queries, keys and values given as strided views.
    #[test]
    fn matches_candles_attention() {
        let dev = Device::Cpu;
        for (b, h, n, m, d) in [(2, 3, 17, 17, 8), (1, 2, 40, 7, 16), (2, 1, 5, 33, 4)] {
            let q = Tensor::randn(0f32, 2., (b, h, n, d), &dev).expect("q");
            let k = Tensor::randn(0f32, 2., (b, h, m, d), &dev).expect("k");
            let v = Tensor::randn(0f32, 1., (b, h, m, d), &dev).expect("v");
            let scale = (d as f64).powf(-0.5);
            let want = reference(&q, &k, &v, scale, None);
            // A per-head bias, unscaled scores (T5's attention).
            let bias = Tensor::randn(0f32, 3., (h, n, m), &dev).expect("bias");
            let want_biased = reference(&q, &k, &v, 1.0, Some(&bias));
            for task_scores in [1, 3 * m, usize::MAX / 2] {
                let plain = Attention { scale: scale as f32, bias: None, task_scores };
                let biased = Attention { scale: 1.0, bias: Some(bias.clone()), task_scores };
                for (op, want) in [(plain, &want), (biased, &want_biased)] {
                    let got = q.apply_op3_no_bwd(&k, &v, &op).expect("attention").transpose(1, 2).expect("heads");
                    let diff = (&got - want).expect("diff").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
                    let what = if op.bias.is_some() { "biased" } else { "plain" };
                    assert!(diff < 1e-5, "{what} {b}×{h}×{n}×{m}×{d}, tasks of {task_scores} scores: max |Δ| {diff}");
                }
            }
            // Heads split from `[B, N, heads·d]` without a copy: strides of a transposed view.
            let strided = |t: &Tensor| {
                let (b, h, n, d) = t.dims4().expect("dims");
                t.transpose(1, 2)
                    .expect("t")
                    .contiguous()
                    .expect("c")
                    .reshape((b, n, h * d))
                    .expect("r")
                    .reshape((b, n, h, d))
                    .expect("r")
                    .transpose(1, 2)
                    .expect("t")
            };
            let (qs, ks, vs) = (strided(&q), strided(&k), strided(&v));
            assert!(h == 1 || !qs.is_contiguous(), "a strided view");
            let got = attention(&qs, &ks, &vs).expect("strided");
            let diff = (&got - &want).expect("diff").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
            assert!(diff < 1e-5, "strided {b}×{h}×{n}×{m}×{d}: max |Δ| {diff}");
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let dev = Device::Cpu;
        let t = |dims: (usize, usize, usize, usize)| Tensor::zeros(dims, candle_core::DType::F32, &dev).expect("t");
        assert!(attention(&t((1, 2, 3, 4)), &t((1, 2, 5, 8)), &t((1, 2, 5, 8))).is_err(), "head sizes differ");
        assert!(attention(&t((1, 2, 3, 4)), &t((1, 2, 5, 4)), &t((1, 2, 6, 4))).is_err(), "keys and values differ");
        let bias = Tensor::zeros((2, 3, 4), candle_core::DType::F32, &dev).expect("bias");
        assert!(biased_attention(&t((1, 2, 3, 4)), &t((1, 2, 5, 4)), &t((1, 2, 5, 4)), 1.0, &bias).is_err(), "bias for 4 keys, not 5");
    }
}
