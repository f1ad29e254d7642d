//! The networks of the supported families, each built from its diffusers / transformers config.

// The CPU kernels call gemm through raw pointers (`matmul`) and write one output buffer from parallel tasks,
// vector_math runs loops compiled for the CPU's vector units after checking that it has them, and the
// GroupNorm calls candle's own (pointer-taking) vector sum so that its sums round as candle's do: with
// the weights' memory map, the crate's only unsafe code, each block under a SAFETY note.
mod activation;
#[allow(unsafe_code)]
mod attention;
pub mod blocks;
pub mod broadcast;
pub mod clip;
#[allow(unsafe_code)]
mod conv;
pub mod flux;
mod fused;
mod im2col;
#[allow(unsafe_code)]
mod linear;
#[allow(unsafe_code)]
mod matmul;
pub mod mmdit;
#[allow(unsafe_code)]
mod norm;
mod rope;
pub mod t5;
pub mod unet;
pub mod vae;
#[allow(unsafe_code)]
mod vector_math;
