//! fresco-tiny: a miniature Stable Diffusion that fresco trains itself, so a fresh machine without
//! network access still makes meaningful images. This crate owns its world (a prompt grammar of flat
//! shapes and their renderer), the training of both variants with candle, and the evaluation of prompt
//! adherence by classical image analysis. The models it writes are ordinary diffusers folders that the
//! pipeline loads like any other.

pub mod analyze;
pub mod arch;
pub mod error;
pub mod eval;
pub mod grammar;
pub mod render;
pub mod rng;
pub mod train;

pub use arch::{Arch, Variant};
pub use error::{Result, TinyError};
