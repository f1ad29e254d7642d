//! diffusers' `AutoencoderKL`, sized from `vae/config.json`: the decoder every pipeline runs, and the
//! encoder that training (and image-to-image) needs.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{
    attention, conv, group_norm, linear, merge_heads, split_heads, Conv2d, Downsample, GroupNorm, Linear, ResnetBlock, Upsample,
};
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
    use_quant_conv: bool,
    in_channels: usize,
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
        for (key, want) in [("up_block_types", "UpDecoderBlock2D"), ("down_block_types", "DownEncoderBlock2D")] {
            if let Some(t) = c.strings(key)?.into_iter().find(|t| t != want) {
                return Err(PipelineError::config(path, format!("{key}: block type {t:?} is not supported")));
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
            use_quant_conv: c.bool_or("use_quant_conv", true)?,
            in_channels: c.usize_or("in_channels", 3)?,
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

/// Either half of the autoencoder from a `vae/` folder.
fn load_half<T>(dir: &Path, dtype: DType, device: &Device, build: fn(VaeConfig, VarBuilder) -> candle_core::Result<T>) -> Result<T> {
    let config = VaeConfig::load(&dir.join("config.json"))?;
    let weights = Weights::load(dir, dtype, device)?;
    weights.context(build(config, weights.vb.clone()))
}

impl VaeDecoder {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        load_half(dir, dtype, device, Self::new)
    }

    /// Builds the decoder from any weight source (training builds it over fresh variables).
    pub fn new(cfg: VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let g = cfg.norm_groups;
        let lc = cfg.latent_channels;
        let post_quant_conv = if cfg.use_post_quant_conv { Some(conv(lc, lc, 1, 1, 0, vb.pp("post_quant_conv"))?) } else { None };
        let d = vb.pp("decoder");
        let top = *cfg.block_out.last().unwrap_or(&lc);
        let conv_in = conv(lc, top, 3, 1, 1, d.pp("conv_in"))?;
        let (mid_resnets, mid_attention) = mid_block(&cfg, top, &d)?;
        let resnet = |i, o, vb| ResnetBlock::new(i, o, None, g, 1e-6, 1.0, vb);
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
        x = run_mid(&self.mid_resnets, self.mid_attention.as_ref(), x)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = upsample {
                x = u.forward(&x, None)?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

type MidBlock = ([ResnetBlock; 2], Option<SpatialSelfAttention>);

/// `UNetMidBlock2D` as both halves of the autoencoder use it: resnet, optional attention, resnet.
fn mid_block(cfg: &VaeConfig, c: usize, vb: &VarBuilder) -> candle_core::Result<MidBlock> {
    let resnet = |vb| ResnetBlock::new(c, c, None, cfg.norm_groups, 1e-6, 1.0, vb);
    let resnets = [resnet(vb.pp("mid_block.resnets.0"))?, resnet(vb.pp("mid_block.resnets.1"))?];
    let attention =
        if cfg.mid_attention { Some(SpatialSelfAttention::new(c, cfg.norm_groups, vb.pp("mid_block.attentions.0"))?) } else { None };
    Ok((resnets, attention))
}

fn run_mid(resnets: &[ResnetBlock; 2], attention: Option<&SpatialSelfAttention>, x: Tensor) -> candle_core::Result<Tensor> {
    let mut x = resnets[0].forward(&x, None)?;
    if let Some(a) = attention {
        x = a.forward(&x)?;
    }
    resnets[1].forward(&x, None)
}

/// The encoder half: images in [-1, 1] to the diagonal Gaussian over latents (`latent_dist`).
pub struct VaeEncoder {
    pub config: VaeConfig,
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: Option<SpatialSelfAttention>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        load_half(dir, dtype, device, Self::new)
    }

    pub fn new(cfg: VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let e = vb.pp("encoder");
        let bo = &cfg.block_out;
        let conv_in = conv(cfg.in_channels, bo[0], 3, 1, 1, e.pp("conv_in"))?;
        let mut down = Vec::new();
        let mut out_c = bo[0];
        for (i, &c) in bo.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let b = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        if j == 0 { prev } else { out_c },
                        out_c,
                        None,
                        cfg.norm_groups,
                        1e-6,
                        1.0,
                        b.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            // The encoder's downsamplers pad right/bottom by one (downsample_padding=0).
            let downsample = if i + 1 < bo.len() { Some(Downsample::new(out_c, 0, b.pp("downsamplers.0"))?) } else { None };
            down.push((resnets, downsample));
        }
        let (mid_resnets, mid_attention) = mid_block(&cfg, out_c, &e)?;
        let lc2 = 2 * cfg.latent_channels;
        let norm_out = group_norm(cfg.norm_groups, out_c, 1e-6, e.pp("conv_norm_out"))?;
        let conv_out = conv(out_c, lc2, 3, 1, 1, e.pp("conv_out"))?;
        let quant_conv = if cfg.use_quant_conv { Some(conv(lc2, lc2, 1, 1, 0, vb.pp("quant_conv"))?) } else { None };
        Ok(Self { config: cfg, conv_in, down, mid_resnets, mid_attention, norm_out, conv_out, quant_conv })
    }

    /// Mean and log-variance of the latent distribution, unscaled (as `latent_dist` has them).
    pub fn encode(&self, images: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let mut x = self.conv_in.forward(images)?;
        for (resnets, downsample) in &self.down {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = downsample {
                x = d.forward(&x)?;
            }
        }
        x = run_mid(&self.mid_resnets, self.mid_attention.as_ref(), x)?;
        let mut x = self.conv_out.forward(&self.norm_out.forward_silu(&x)?)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(&x)?;
        }
        let halves = x.chunk(2, 1)?;
        Ok((halves[0].clone(), halves[1].clone()))
    }

    /// Latents as the denoiser sees them: `(mean - shift_factor) * scaling_factor`.
    pub fn scale(&self, mean: &Tensor) -> candle_core::Result<Tensor> {
        (mean - self.config.shift_factor)? * self.config.scaling_factor
    }
}
