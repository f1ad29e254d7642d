//! The one matrix product the CPU kernels (convolution, linear, attention) call: gemm's, on matrices
//! given by pointer and strides, so that operands are read where they lie (a weight as stored, a head
//! of a `[B, N, heads·d]` projection, a tile of columns) and results land in place.
//!
//! Its rounding is the same on every CPU: each output is summed over k in blocks of [`DEPTH_BLOCK`],
//! in order, by fused multiply-adds from zero, and each block's sum is added to the output with one
//! more fused multiply-add. That is what gemm's packed kernels do within one of their depth blocks,
//! but gemm sizes those blocks from the CPU's cache sizes, and sends small products and
//! matrix-vector products to kernels that sum across SIMD lanes, 8 under AVX2 and 16 under AVX-512.
//! Either made images differ by machine: the parity case `sd15-ddim-20`, which amplifies rounding
//! over 20 DDIM steps, went from max |Δ| 2 on AVX-512 machines to 3 on AVX2 ones.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::vector_math::vectorised;

/// The depth of one block of the sum: gemm's smallest, so that gemm never splits a block further.
const DEPTH_BLOCK: usize = 512;

/// An f32 matrix in memory: its first element, and the distance in elements between consecutive rows
/// and between consecutive columns.
#[derive(Clone, Copy)]
pub(super) struct Strided<P> {
    pub ptr: P,
    pub row: isize,
    pub col: isize,
}

impl<P> Strided<P> {
    /// A row-major matrix whose rows are `row_stride` apart.
    pub fn rows(ptr: P, row_stride: usize) -> Self {
        Self { ptr, row: row_stride as isize, col: 1 }
    }

    /// A matrix stored column by column, columns `col_stride` apart: the transpose of a row-major one.
    pub fn columns(ptr: P, col_stride: usize) -> Self {
        Self { ptr, row: 1, col: col_stride as isize }
    }

    /// The transpose: the same elements, rows and columns swapped.
    pub fn t(self) -> Self {
        Self { ptr: self.ptr, row: self.col, col: self.row }
    }
}

impl Strided<*const f32> {
    /// The submatrix from row `row` and column `col` on.
    fn offset(self, row: usize, col: usize) -> Self {
        Self { ptr: self.ptr.wrapping_offset(row as isize * self.row + col as isize * self.col), ..self }
    }
}

/// The three matrices of one product, shared by tasks that each write their own columns of `dst`.
struct Operands {
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
}

// SAFETY: the tasks only read lhs and rhs and write disjoint columns of dst, and all of them finish
// before the product returns to its caller, who keeps the matrices alive meanwhile.
unsafe impl Sync for Operands {}

/// `dst ← scale · lhs · rhs`, or `dst ← dst + scale · lhs · rhs` when `accumulate`, for an `m × k`
/// `lhs` and a `k × n` `rhs`.
///
/// # Safety
/// Every element of the three matrices, at their strides, lies inside a live allocation; nothing else
/// reads or writes `dst`'s elements meanwhile.
pub(super) unsafe fn multiply(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    accumulate: bool,
    scale: f32,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    // gemm's lane-summing kernels: depth ≤ 2, a single row or column, or a small product whose
    // operands both run along k.
    let lane_sums = k <= 2 || m == 1 || n == 1 || (lhs.col == 1 && rhs.row == 1 && m * n <= 256);
    let mut depth = 0;
    loop {
        let block = DEPTH_BLOCK.min(k - depth);
        let read_dst = accumulate || depth > 0;
        let (lhs, rhs) = (lhs.offset(0, depth), rhs.offset(depth, 0));
        // SAFETY: the caller's promise, passed on: these blocks lie inside the caller's matrices.
        unsafe {
            if lane_sums {
                in_order((m, n, block), Operands { dst, lhs, rhs }, read_dst, scale, parallelism);
            } else {
                gemm(
                    m,
                    n,
                    block,
                    dst.ptr,
                    dst.col,
                    dst.row,
                    read_dst,
                    lhs.ptr,
                    lhs.col,
                    lhs.row,
                    rhs.ptr,
                    rhs.col,
                    rhs.row,
                    if read_dst { 1.0 } else { 0.0 },
                    scale,
                    false,
                    false,
                    false,
                    parallelism,
                )
            }
        }
        depth += block;
        if depth >= k {
            break;
        }
    }
}

/// One depth block of [`multiply`] for the shapes gemm would sum across SIMD lanes: each output's
/// products added in order by fused multiply-adds, eight outputs of a row at a time so that the
/// additions overlap. A large one (a wide layer applied to one row, as SD3's and FLUX's modulations
/// at batch 1) is split by columns over the thread pool, as gemm's kernels would split it.
///
/// # Safety
/// As for [`multiply`].
unsafe fn in_order((m, n, k): (usize, usize, usize), operands: Operands, read_dst: bool, scale: f32, parallelism: Parallelism) {
    const LANES: usize = 8;
    const COLUMNS_PER_TASK: usize = 64;
    if matches!(parallelism, Parallelism::Rayon(_)) && n > COLUMNS_PER_TASK && m * n * k >= 1 << 20 {
        (0..n.div_ceil(COLUMNS_PER_TASK)).into_par_iter().for_each(|task| {
            let j0 = task * COLUMNS_PER_TASK;
            let Operands { dst, lhs, rhs } = &operands;
            let dst = Strided { ptr: dst.ptr.wrapping_offset(j0 as isize * dst.col), ..*dst };
            let part = Operands { dst, lhs: *lhs, rhs: rhs.offset(0, j0) };
            // SAFETY: columns j0.. of dst and rhs, inside them; no other task writes these columns.
            unsafe { in_order((m, COLUMNS_PER_TASK.min(n - j0), k), part, read_dst, scale, Parallelism::None) }
        });
        return;
    }
    let Operands { dst, lhs, rhs } = operands;
    vectorised(
        #[inline(always)]
        || {
            for i in 0..m {
                for j0 in (0..n).step_by(LANES) {
                    let width = LANES.min(n - j0);
                    let mut sums = [0f32; LANES];
                    for d in 0..k {
                        // SAFETY: row i and column d of lhs, rows d and columns j0.. of rhs: in bounds
                        // by the caller's promise.
                        let a = unsafe { *lhs.ptr.offset(i as isize * lhs.row + d as isize * lhs.col) };
                        for (t, sum) in sums[..width].iter_mut().enumerate() {
                            let b = unsafe { *rhs.ptr.offset(d as isize * rhs.row + (j0 + t) as isize * rhs.col) };
                            *sum = a.mul_add(b, *sum);
                        }
                    }
                    for (t, sum) in sums[..width].iter().enumerate() {
                        // SAFETY: dst's element (i, j0 + t), in bounds and this call's alone.
                        let out = unsafe { &mut *dst.ptr.offset(i as isize * dst.row + (j0 + t) as isize * dst.col) };
                        *out = if read_dst { scale.mul_add(*sum, *out) } else { scale * sum };
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`multiply`]'s rounding written out one output at a time, for row-major matrices.
    fn reference((m, n, k): (usize, usize, usize), dst: &mut [f32], lhs: &[f32], rhs: &[f32], accumulate: bool, scale: f32) {
        for i in 0..m {
            for j in 0..n {
                let out = &mut dst[i * n + j];
                for first in (0..k.max(1)).step_by(DEPTH_BLOCK) {
                    let sum = (first..k.min(first + DEPTH_BLOCK)).fold(0f32, |sum, d| lhs[i * k + d].mul_add(rhs[d * n + j], sum));
                    *out = if accumulate || first > 0 { scale.mul_add(sum, *out) } else { scale * sum };
                }
            }
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        // Values of mixed magnitude and sign, so that the order of additions shows in the roundings.
        (0..len).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / 65_536.0 - 128.0).collect()
    }

    /// Each shape reaches a different kernel: a depth of 2, a row or a column alone (and a long row,
    /// split over threads), a small product of operands laid out along k, gemm's packed kernels within
    /// one block and over several.
    #[test]
    fn every_shape_rounds_as_blocks_of_ordered_fused_sums() {
        for (m, n, k) in [(3, 5, 2), (1, 300, 700), (1, 2000, 600), (300, 1, 700), (7, 9, 40), (9, 7, 1100), (80, 96, 1300), (130, 70, 512)]
        {
            let (lhs, rhs) = (values(m * k, 1), values(k * n, 2));
            // rhs as the transpose of an `n × k` matrix: gemm's dot-product layout, as linear layers and
            // attention scores pass their weights and keys.
            let rhs_t: Vec<f32> = (0..n * k).map(|x| rhs[(x % k) * n + x / k]).collect();
            for (accumulate, scale) in [(false, 1.0), (true, 0.125)] {
                let start = values(m * n, 3);
                let mut want = start.clone();
                reference((m, n, k), &mut want, &lhs, &rhs, accumulate, scale);
                for (name, rhs) in [("rows", Strided::rows(rhs.as_ptr(), n)), ("columns", Strided::columns(rhs_t.as_ptr(), k))] {
                    let mut got = start.clone();
                    // SAFETY: all three matrices are row-major in their vectors (rhs_t column-major).
                    unsafe {
                        multiply(
                            (m, n, k),
                            Strided::rows(got.as_mut_ptr(), n),
                            Strided::rows(lhs.as_ptr(), k),
                            rhs,
                            accumulate,
                            scale,
                            Parallelism::Rayon(2),
                        );
                    }
                    let first_diff = got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits());
                    assert_eq!(first_diff, None, "{m}×{n}×{k}, rhs by {name}, accumulate {accumulate}");
                }
            }
        }
    }
}
