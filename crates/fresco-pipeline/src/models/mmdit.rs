//! diffusers' `SD3Transformer2DModel` (MMDiT, SD3 / SD3.5 medium-style without dual attention), sized from
//! `transformer/config.json`: joint attention over image and text tokens with adaptive LayerNorm
//! conditioning on timestep + pooled text.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

use super::blocks::{Conv2d, attention, conv, layer_norm_plain, merge_heads, modulate, split_heads, timestep_embedding, FeedForward, Mlp};
use crate::error::{PipelineError, Result};
use crate::loader::{Config, Weights};

#[derive(Debug, Clone)]
pub struct MmditConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub patch_size: usize,
    pub sample_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub pos_embed_max_size: usize,
}

impl MmditConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let c = Config::load(path)?;
        if c.raw("dual_attention_layers").and_then(|v| v.as_array()).is_some_and(|a| !a.is_empty()) {
            return Err(PipelineError::config(path, "dual attention layers (SD3.5 medium) are not supported yet"));
        }
        if c.raw("qk_norm").is_some() {
            return Err(PipelineError::config(path, "qk_norm (SD3.5) is not supported yet"));
        }
        let heads = c.usize("num_attention_heads")?;
        let head_dim = c.usize("attention_head_dim")?;
        let in_channels = c.usize_or("in_channels", 16)?;
        Ok(Self {
            in_channels,
            out_channels: c.usize_or("out_channels", in_channels)?,
            patch_size: c.usize_or("patch_size", 2)?,
            sample_size: c.usize_or("sample_size", 128)?,
            layers: c.usize("num_layers")?,
            heads,
            head_dim,
            joint_attention_dim: c.usize("joint_attention_dim")?,
            caption_projection_dim: c.usize_or("caption_projection_dim", heads * head_dim)?,
            pooled_projection_dim: c.usize("pooled_projection_dim")?,
            pos_embed_max_size: c.usize_or("pos_embed_max_size", 96)?,
        })
    }

    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
}

struct JointBlock {
    norm1: Linear,
    norm1_context: Linear,
    context_pre_only: bool,
    q: Linear,
    k: Linear,
    v: Linear,
    add_q: Linear,
    add_k: Linear,
    add_v: Linear,
    to_out: Linear,
    to_add_out: Option<Linear>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
    heads: usize,
}

impl JointBlock {
    fn new(dim: usize, heads: usize, context_pre_only: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let a = vb.pp("attn");
        Ok(Self {
            norm1: linear(dim, 6 * dim, vb.pp("norm1.linear"))?,
            norm1_context: linear(dim, if context_pre_only { 2 * dim } else { 6 * dim }, vb.pp("norm1_context.linear"))?,
            context_pre_only,
            q: linear(dim, dim, a.pp("to_q"))?,
            k: linear(dim, dim, a.pp("to_k"))?,
            v: linear(dim, dim, a.pp("to_v"))?,
            add_q: linear(dim, dim, a.pp("add_q_proj"))?,
            add_k: linear(dim, dim, a.pp("add_k_proj"))?,
            add_v: linear(dim, dim, a.pp("add_v_proj"))?,
            to_out: linear(dim, dim, a.pp("to_out.0"))?,
            to_add_out: if context_pre_only { None } else { Some(linear(dim, dim, a.pp("to_add_out"))?) },
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: if context_pre_only { None } else { Some(FeedForward::new(dim, vb.pp("ff_context"))?) },
            heads,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, temb: &Tensor) -> candle_core::Result<(Option<Tensor>, Tensor)> {
        let t = candle_nn::ops::silu(temb)?;
        let m = self.norm1.forward(&t)?.chunk(6, 1)?;
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let nx = modulate(&layer_norm_plain(x, 1e-6)?, shift_msa, scale_msa)?;
        let mc = self.norm1_context.forward(&t)?.chunk(if self.context_pre_only { 2 } else { 6 }, 1)?;
        let nctx = if self.context_pre_only {
            // AdaLayerNormContinuous: (scale, shift), in that order.
            modulate(&layer_norm_plain(ctx, 1e-6)?, &mc[1], &mc[0])?
        } else {
            modulate(&layer_norm_plain(ctx, 1e-6)?, &mc[0], &mc[1])?
        };
        let n_img = nx.dim(1)?;
        let q = Tensor::cat(&[split_heads(&self.q.forward(&nx)?, self.heads)?, split_heads(&self.add_q.forward(&nctx)?, self.heads)?], 2)?;
        let k = Tensor::cat(&[split_heads(&self.k.forward(&nx)?, self.heads)?, split_heads(&self.add_k.forward(&nctx)?, self.heads)?], 2)?;
        let v = Tensor::cat(&[split_heads(&self.v.forward(&nx)?, self.heads)?, split_heads(&self.add_v.forward(&nctx)?, self.heads)?], 2)?;
        let joint = merge_heads(&attention(&q, &k, &v)?)?;
        let attn = self.to_out.forward(&joint.narrow(1, 0, n_img)?)?;
        let x = (x + attn.broadcast_mul(&gate_msa.unsqueeze(1)?)?)?;
        let nx2 = modulate(&layer_norm_plain(&x, 1e-6)?, shift_mlp, scale_mlp)?;
        let x = (&x + self.ff.forward(&nx2)?.broadcast_mul(&gate_mlp.unsqueeze(1)?)?)?;
        let (Some(to_add_out), Some(ff_context)) = (&self.to_add_out, &self.ff_context) else {
            return Ok((None, x));
        };
        let ctx_attn = to_add_out.forward(&joint.narrow(1, n_img, joint.dim(1)? - n_img)?)?;
        let ctx = (ctx + ctx_attn.broadcast_mul(&mc[2].unsqueeze(1)?)?)?;
        let nctx2 = modulate(&layer_norm_plain(&ctx, 1e-6)?, &mc[3], &mc[4])?;
        let ctx = (&ctx + ff_context.forward(&nctx2)?.broadcast_mul(&mc[5].unsqueeze(1)?)?)?;
        Ok((Some(ctx), x))
    }
}

pub struct Mmdit {
    pub config: MmditConfig,
    patch: Conv2d,
    pos_embed: Tensor,
    time: Mlp,
    text: Mlp,
    context_embedder: Linear,
    blocks: Vec<JointBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl Mmdit {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = MmditConfig::load(&dir.join("config.json"))?;
        let weights = Weights::load(dir, dtype, device)?;
        weights.context(Self::new(config, weights.vb.clone()))
    }

    fn new(cfg: MmditConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner();
        let p = cfg.patch_size;
        let n_pos = cfg.pos_embed_max_size * cfg.pos_embed_max_size;
        Ok(Self {
            patch: conv(cfg.in_channels, dim, p, p, 0, vb.pp("pos_embed.proj"))?,
            pos_embed: vb.get((1, n_pos, dim), "pos_embed.pos_embed")?,
            time: Mlp::new(256, dim, vb.pp("time_text_embed.timestep_embedder"))?,
            text: Mlp::new(cfg.pooled_projection_dim, dim, vb.pp("time_text_embed.text_embedder"))?,
            context_embedder: linear(cfg.joint_attention_dim, cfg.caption_projection_dim, vb.pp("context_embedder"))?,
            blocks: (0..cfg.layers)
                .map(|i| JointBlock::new(dim, cfg.heads, i + 1 == cfg.layers, vb.pp(format!("transformer_blocks.{i}"))))
                .collect::<candle_core::Result<Vec<_>>>()?,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            proj_out: linear(dim, p * p * cfg.out_channels, vb.pp("proj_out"))?,
            config: cfg,
        })
    }

    /// Velocity for latents `[B, C, H, W]` at `timestep` (sigma × 1000), text `[B, N, joint_dim]`, pooled `[B, P]`.
    pub fn forward(&self, latents: &Tensor, timestep: f64, context: &Tensor, pooled: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = &self.config;
        let (b, _, h, w) = latents.dims4()?;
        let p = cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let dim = cfg.inner();
        let max = cfg.pos_embed_max_size;
        if gh > max || gw > max {
            return Err(candle_core::Error::Msg(format!("image of {gh}x{gw} patches exceeds pos_embed_max_size {max}")));
        }
        let x = self.patch.forward(latents)?.flatten_from(2)?.transpose(1, 2)?;
        let (top, left) = ((max - gh) / 2, (max - gw) / 2);
        let pos = self.pos_embed.reshape((max, max, dim))?.narrow(0, top, gh)?.narrow(1, left, gw)?.reshape((1, gh * gw, dim))?;
        let mut x = x.broadcast_add(&pos)?;
        let t = Tensor::full(timestep as f32, b, latents.device())?;
        let temb = (self.time.forward(&timestep_embedding(&t, 256, true, 0.0)?.to_dtype(latents.dtype())?)? + self.text.forward(pooled)?)?;
        let mut ctx = Some(self.context_embedder.forward(context)?);
        for block in &self.blocks {
            let c = ctx.take().ok_or_else(|| candle_core::Error::Msg("text stream ended before the last block".into()))?;
            let (c, nx) = block.forward(&x, &c, &temb)?;
            ctx = c;
            x = nx;
        }
        let m = self.norm_out.forward(&candle_nn::ops::silu(&temb)?)?.chunk(2, 1)?;
        let x = modulate(&layer_norm_plain(&x, 1e-6)?, &m[1], &m[0])?;
        let x = self.proj_out.forward(&x)?;
        // Unpatchify: [B, gh*gw, p*p*C] → [B, C, gh*p, gw*p].
        let c = cfg.out_channels;
        x.reshape((b, gh, gw, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c, gh * p, gw * p))
    }
}
