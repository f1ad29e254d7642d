//! The networks of the supported families, each built from its diffusers / transformers config.

pub mod blocks;
pub mod clip;
pub mod flux;
pub mod mmdit;
pub mod t5;
pub mod unet;
pub mod vae;
