//! The networks of the supported families, each built from its diffusers / transformers config.

pub mod blocks;
pub mod broadcast;
pub mod clip;
pub mod flux;
mod fused;
mod im2col;
pub mod mmdit;
pub mod t5;
pub mod unet;
pub mod vae;
