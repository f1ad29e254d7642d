//! The one matrix product the CPU kernels (convolution, linear, attention) call: gemm's, on matrices
//! given by pointer and strides, so that operands are read where they lie (a weight as stored, a head
//! of a `[B, N, heads·d]` projection, a tile of columns) and results land in place.

use gemm::{gemm, Parallelism};

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
    // SAFETY: the caller's promise, passed on.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col,
            dst.row,
            accumulate,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}
