pub mod client;
pub mod common;
pub mod coordinator;
pub mod eval;
pub mod export;
pub mod generate;
pub mod run;
pub mod train;
pub mod worker;

use fresco_core::{GenerationParams, ImageFormat};

/// Generation options shared by `fresco run` and `fresco submit`; unset ones take the model's defaults.
#[derive(clap::Args, Clone, Debug)]
pub struct GenOptions {
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    guidance: Option<f32>,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    /// ddim, pndm, euler, euler-ancestral, dpmpp-2m, dpmpp-2m-karras, lcm; flow-euler or flow-euler-ancestral for
    /// flow-matching models.
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// png, jpeg or webp.
    #[arg(long, default_value = "png")]
    format: String,
}

impl GenOptions {
    pub fn params(&self) -> anyhow::Result<GenerationParams> {
        let format: ImageFormat = self.format.parse().map_err(|e: String| anyhow::anyhow!("--format: {e}"))?;
        let p = GenerationParams {
            steps: self.steps,
            guidance: self.guidance,
            width: self.width,
            height: self.height,
            scheduler: self.scheduler.clone(),
            negative_prompt: self.negative_prompt.clone(),
            format,
        };
        p.validate().map_err(|e| anyhow::anyhow!("--{}: {}", e.field.replace('_', "-"), e.message))?;
        Ok(p)
    }
}
