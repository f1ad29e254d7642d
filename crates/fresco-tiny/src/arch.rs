//! The shape of the fresco-tiny models, written out as the diffusers config files the pipeline reads.
//! One architecture serves both variants; only the scheduler (and so what the U-Net predicts) differs.

use serde_json::{json, Value};

use crate::error::{Result, TinyError};

/// The two training objectives over the same network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Epsilon-prediction diffusion (scaled-linear betas), sampled by the diffusion schedulers.
    Diffusion,
    /// Rectified flow: the U-Net predicts velocity `noise - data`, sampled by flow-matching Euler.
    Flow,
}

impl Variant {
    pub fn folder(self) -> &'static str {
        match self {
            Self::Diffusion => "fresco-tiny",
            Self::Flow => "fresco-tiny-flow",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Diffusion => "diffusion",
            Self::Flow => "flow",
        }
    }
}

/// Sizes of every part; `Arch::default()` is what ships, `Arch::test()` a miniature for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Arch {
    pub vae_channels: Vec<usize>,
    pub vae_groups: usize,
    pub latent_channels: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub max_tokens: usize,
    pub unet_channels: Vec<usize>,
    pub unet_layers: usize,
    pub unet_head_dim: usize,
    pub unet_groups: usize,
}

impl Default for Arch {
    fn default() -> Self {
        Self {
            vae_channels: vec![16, 16, 32, 32],
            vae_groups: 2,
            latent_channels: 8,
            text_hidden: 64,
            text_layers: 3,
            text_heads: 4,
            max_tokens: 32,
            unet_channels: vec![32, 64],
            unet_layers: 1,
            unet_head_dim: 16,
            unet_groups: 8,
        }
    }
}

impl Arch {
    /// Small enough that a training step takes milliseconds, for tests of the training code itself.
    pub fn test() -> Self {
        Self {
            vae_channels: vec![8, 8, 8, 8],
            vae_groups: 4,
            latent_channels: 4,
            text_hidden: 16,
            text_layers: 1,
            text_heads: 2,
            max_tokens: 32,
            unet_channels: vec![16, 16],
            unet_layers: 1,
            unet_head_dim: 8,
            unet_groups: 4,
        }
    }

    /// Checks that the sizes make a network the pipeline can build, naming the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, problem: String| Err(TinyError::option(field, problem));
        for (field, widths, groups) in
            [("arch.vae_channels", &self.vae_channels, self.vae_groups), ("arch.unet_channels", &self.unet_channels, self.unet_groups)]
        {
            if widths.is_empty() || groups == 0 || widths.iter().any(|&w| w == 0 || !w.is_multiple_of(groups)) {
                return bad(
                    field,
                    format!("{widths:?} given; every width must be a positive multiple of {groups} (the group-norm groups)"),
                );
            }
        }
        // The pipeline's autoencoder factor is 2^(blocks − 1), and fresco-tiny's is 8.
        if self.vae_channels.len() != 4 {
            return bad(
                "arch.vae_channels",
                format!("{} blocks given; fresco-tiny's autoencoder has 4 (8× downsampling)", self.vae_channels.len()),
            );
        }
        if self.unet_head_dim == 0 || self.unet_channels.iter().any(|w| !w.is_multiple_of(self.unet_head_dim)) {
            return bad(
                "arch.unet_channels",
                format!("{:?} given; every width must be a multiple of the attention head size {}", self.unet_channels, self.unet_head_dim),
            );
        }
        if self.latent_channels == 0 {
            return bad("arch.latent_channels", "must be positive".into());
        }
        if self.text_heads == 0 || !self.text_hidden.is_multiple_of(self.text_heads) {
            return bad(
                "arch.text_hidden",
                format!("{} given; must be a multiple of the {} attention heads", self.text_hidden, self.text_heads),
            );
        }
        Ok(())
    }

    pub fn vae_config(&self, scaling_factor: f64) -> Value {
        let n = self.vae_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": self.vae_channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "in_channels": 3,
            "out_channels": 3,
            "latent_channels": self.latent_channels,
            "layers_per_block": 1,
            "norm_num_groups": self.vae_groups,
            "sample_size": 64,
            "scaling_factor": scaling_factor,
            "mid_block_add_attention": true,
            "use_quant_conv": true,
            "use_post_quant_conv": true,
        })
    }

    pub fn text_config(&self) -> Value {
        json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_act": "quick_gelu",
            "hidden_size": self.text_hidden,
            "intermediate_size": 4 * self.text_hidden,
            "num_attention_heads": self.text_heads,
            "num_hidden_layers": self.text_layers,
            "max_position_embeddings": self.max_tokens,
            "layer_norm_eps": 1e-5,
            "vocab_size": 49408,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        })
    }

    pub fn unet_config(&self) -> Value {
        let n = self.unet_channels.len();
        json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "attention_head_dim": self.unet_channels.iter().map(|c| c / self.unet_head_dim).collect::<Vec<_>>(),
            "block_out_channels": self.unet_channels,
            "cross_attention_dim": self.text_hidden,
            "down_block_types": vec!["CrossAttnDownBlock2D"; n],
            "up_block_types": vec!["CrossAttnUpBlock2D"; n],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": self.latent_channels,
            "out_channels": self.latent_channels,
            "layers_per_block": self.unet_layers,
            "norm_eps": 1e-5,
            "norm_num_groups": self.unet_groups,
            "sample_size": 8,
            "use_linear_projection": true,
        })
    }
}

/// The diffusion variant's betas start where Stable Diffusion's do (scaled-linear from 0.00085); where
/// they end is a training option (`TrainOptions::beta_end`). The scheduler config the model ships states
/// the same ones.
pub const BETA_START: f64 = 0.00085;
pub const TRAIN_TIMESTEPS: usize = 1000;

/// How the diffusion variant's Euler ancestral renoises: it forgets the sample's noise twice as fast as
/// Euler ancestral (each step keeps (σ_next / σ)², not σ_next / σ, of it) while noise outweighs signal,
/// and draws none from σ = 1 down. The fresher noise lets more of the early steps revise a wrong layout;
/// the steps below σ = 1 only sharpen what is laid out, and noise drawn there is left for the last few to
/// clean up. On held-out prompts the pair added about two points, most of them two-object ones
/// (models/NOTEBOOK.md, session 48).
pub const DIFFUSION_ANCESTRAL_ETA: f64 = 2.0;
/// The σ below which the diffusion variant's steps draw no noise (see [`DIFFUSION_ANCESTRAL_ETA`]).
pub const DIFFUSION_NOISE_FLOOR: f64 = 1.0;

/// The diffusion variant's guidance on the steps about its noise floor and below ([`DIFFUSION_NOISE_FLOOR`];
/// σ = 1 falls between timesteps 372 and 373 of its training schedule), which only sharpen the layout the
/// steps above settled: half its scale there drew fewer wrong shapes and counts (models/NOTEBOOK.md, session 50).
pub const DIFFUSION_LATE_GUIDANCE: f64 = 2.0;
/// The timestep below which [`DIFFUSION_LATE_GUIDANCE`] applies.
pub const DIFFUSION_LATE_GUIDANCE_BELOW_TIMESTEP: f64 = 375.0;

/// How the flow variant's `flow-euler-ancestral` renoises: half again as fast as Euler ancestral while
/// noise outweighs signal, none from σ = ½ down (where they weigh the same on the flow's line). At its
/// default steps the fresher noise added about a third of a point on held-out prompts; without the floor
/// it cost five at 8 steps, whose last noisy step leaves too few to clean what it draws. The floor alone,
/// at Euler ancestral's rate, lost counts (models/NOTEBOOK.md, sessions 48 and 50).
pub const FLOW_ANCESTRAL_ETA: f64 = 1.5;
/// The σ below which the flow variant's steps draw no noise (see [`FLOW_ANCESTRAL_ETA`]).
pub const FLOW_NOISE_FLOOR: f64 = 0.5;

/// The scheduler the model ships: for the flow variant with the timestep shift it was trained with, for
/// the diffusion variant with the betas it was trained with. The diffusion variant samples with Euler
/// ancestral: the noise it adds back each step undoes some of the layout the U-Net commits to wrongly at
/// high noise, and on 3 × 1,000 held-out prompts it drew a third fewer wrong counts than DDIM
/// (models/NOTEBOOK.md, session 47).
pub fn scheduler_config(variant: Variant, flow_shift: f64, beta_end: f64) -> Value {
    match variant {
        Variant::Diffusion => json!({
            "_class_name": scheduler_class(variant),
            "beta_schedule": "scaled_linear",
            "beta_start": BETA_START,
            "beta_end": beta_end,
            "num_train_timesteps": TRAIN_TIMESTEPS,
            "prediction_type": "epsilon",
            "steps_offset": 1,
            "timestep_spacing": "trailing",
            (fresco_pipeline::schedulers::ANCESTRAL_ETA): DIFFUSION_ANCESTRAL_ETA,
            (fresco_pipeline::schedulers::ANCESTRAL_SIGMA_MIN): DIFFUSION_NOISE_FLOOR,
        }),
        Variant::Flow => json!({
            "_class_name": scheduler_class(variant),
            "num_train_timesteps": TRAIN_TIMESTEPS,
            "shift": flow_shift,
            (fresco_pipeline::schedulers::ANCESTRAL_ETA): FLOW_ANCESTRAL_ETA,
            (fresco_pipeline::schedulers::ANCESTRAL_SIGMA_MIN): FLOW_NOISE_FLOOR,
        }),
    }
}

fn scheduler_class(variant: Variant) -> &'static str {
    match variant {
        Variant::Diffusion => "EulerAncestralDiscreteScheduler",
        Variant::Flow => "FlowMatchEulerDiscreteScheduler",
    }
}

/// `model_index.json`, with the sampling recipe fresco reads from `_fresco_defaults`. The flow variant
/// samples with fresco's ancestral flow Euler, for the reason the diffusion variant samples with Euler
/// ancestral (`scheduler_config`); no diffusers class does that, so it is named there, and diffusers
/// samples the folder with the ODE of its scheduler class.
pub fn model_index(variant: Variant, steps: usize, guidance: f64) -> Value {
    let scheduler = scheduler_class(variant);
    let mut defaults = json!({ "steps": steps, "guidance": guidance });
    match variant {
        Variant::Diffusion => {
            defaults["late_guidance"] = json!(DIFFUSION_LATE_GUIDANCE);
            defaults["late_guidance_below_timestep"] = json!(DIFFUSION_LATE_GUIDANCE_BELOW_TIMESTEP);
        }
        Variant::Flow => defaults["scheduler"] = json!(fresco_pipeline::SchedulerKind::FlowEulerAncestral.name()),
    }
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_fresco_defaults": defaults,
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "feature_extractor": [null, null],
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed model folders sample with the scheduler configs training writes by default, so a
    /// retrained model samples as the shipped one does (the noise floor included).
    #[test]
    fn the_shipped_scheduler_configs_are_the_ones_training_writes() {
        let defaults = crate::train::TrainOptions::default();
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        for (variant, folder) in [(Variant::Diffusion, "fresco-tiny"), (Variant::Flow, "fresco-tiny-flow")] {
            let path = models.join(folder).join("scheduler/scheduler_config.json");
            let shipped: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("scheduler config")).expect("json");
            assert_eq!(shipped, scheduler_config(variant, defaults.flow_shift, defaults.beta_end), "{}", path.display());
        }
    }
}
