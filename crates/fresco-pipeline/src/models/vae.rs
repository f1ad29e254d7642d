//! The decoder half of diffusers' `AutoencoderKL`, sized from `vae/config.json`.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{group_norm, linear, Conv2d, GroupNorm, Linear, VarBuilder};

use super::blocks::{attention, conv, merge_heads, split_heads, ResnetBlock, Upsample};
use crate::error::{PipelineError, Result};
use crate::loader::{Config, Weights};

#[derive(Debug, Clone)]
pub struct VaeConfig {
    pub latent_channels: usize,
    pub out_channels: usize,
    block_out: Vec<usize>,
    layers_per_block: usize,
    norm_groups: usize,
    use_post_quant_conv: bool,
    mid_attention: bool,
    pub scaling_factor: f64,
    pub shift_factor: f64,
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let c = Config::load(path)?;
        let block_out = c.usizes("block_out_channels")?;
        if block_out.is_empty() {
            return Err(PipelineError::config(path, "block_out_channels is empty"));
        }
        for t in c.strings("up_block_types")? {
            if t != "UpDecoderBlock2D" {
                return Err(PipelineError::config(path, format!("up block type {t:?} is not supported")));
            }
        }
        if c.raw("latents_mean").is_some() {
            return Err(PipelineError::config(path, "latents_mean/latents_std normalisation is not supported"));
        }
        Ok(Self {
            latent_channels: c.usize_or("latent_channels", 4)?,
            out_channels: c.usize_or("out_channels", 3)?,
            layers_per_block: c.usize_or("layers_per_block", 1)?,
            norm_groups: c.usize_or("norm_num_groups", 32)?,
            use_post_quant_conv: c.bool_or("use_post_quant_conv", true)?,
            mid_attention: c.bool_or("mid_block_add_attention", true)?,
            scaling_factor: c.f64_or("scaling_factor", 0.18215)?,
            shift_factor: c.opt_f64("shift_factor")?.unwrap_or(0.0),
            block_out,
        })
    }

    /// Spatial reduction between image and latent: 2^(blocks-1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out.len() - 1)
    }
}

/// Single-head self-attention over spatial positions, with its own GroupNorm and residual.
struct SpatialSelfAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SpatialSelfAttention {
    fn new(c: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: group_norm(groups, c, 1e-6, vb.pp("group_norm"))?,
            q: linear(c, c, vb.pp("to_q"))?,
            k: linear(c, c, vb.pp("to_k"))?,
            v: linear(c, c, vb.pp("to_v"))?,
            out: linear(c, c, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let s = self.norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = split_heads(&self.q.forward(&s)?, 1)?;
        let k = split_heads(&self.k.forward(&s)?, 1)?;
        let v = split_heads(&self.v.forward(&s)?, 1)?;
        let o = self.out.forward(&merge_heads(&attention(&q, &k, &v)?)?)?;
        o.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

pub struct VaeDecoder {
    pub config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: Option<SpatialSelfAttention>,
    up: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = VaeConfig::load(&dir.join("config.json"))?;
        let weights = Weights::load(dir, dtype, device)?;
        weights.context(Self::new(config, weights.vb.clone()))
    }

    fn new(cfg: VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let g = cfg.norm_groups;
        let lc = cfg.latent_channels;
        let post_quant_conv = if cfg.use_post_quant_conv { Some(conv(lc, lc, 1, 1, 0, vb.pp("post_quant_conv"))?) } else { None };
        let d = vb.pp("decoder");
        let top = *cfg.block_out.last().unwrap_or(&lc);
        let resnet = |i, o, vb| ResnetBlock::new(i, o, None, g, 1e-6, 1.0, vb);
        let conv_in = conv(lc, top, 3, 1, 1, d.pp("conv_in"))?;
        let mid_resnets = [resnet(top, top, d.pp("mid_block.resnets.0"))?, resnet(top, top, d.pp("mid_block.resnets.1"))?];
        let mid_attention = if cfg.mid_attention { Some(SpatialSelfAttention::new(top, g, d.pp("mid_block.attentions.0"))?) } else { None };
        let rev: Vec<usize> = cfg.block_out.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let b = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| resnet(if j == 0 { prev } else { out_c }, out_c, b.pp(format!("resnets.{j}"))))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() { Some(Upsample::new(out_c, b.pp("upsamplers.0"))?) } else { None };
            up.push((resnets, upsample));
        }
        let norm_out = group_norm(g, cfg.block_out[0], 1e-6, d.pp("conv_norm_out"))?;
        let conv_out = conv(cfg.block_out[0], cfg.out_channels, 3, 1, 1, d.pp("conv_out"))?;
        Ok(Self { config: cfg, post_quant_conv, conv_in, mid_resnets, mid_attention, up, norm_out, conv_out })
    }

    /// Latents (as the sampler produced them) to images in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = ((latents / self.config.scaling_factor)? + self.config.shift_factor)?;
        if let Some(p) = &self.post_quant_conv {
            x = p.forward(&x)?;
        }
        x = self.conv_in.forward(&x)?;
        x = self.mid_resnets[0].forward(&x, None)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x, None)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = upsample {
                x = u.forward(&x, None)?;
            }
        }
        let x = candle_nn::ops::silu(&self.norm_out.forward(&x)?)?;
        self.conv_out.forward(&x)
    }
}
