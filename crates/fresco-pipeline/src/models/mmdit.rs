//! diffusers' `SD3Transformer2DModel` (MMDiT), sized from `transformer/config.json`: joint attention over
//! image and text tokens with adaptive LayerNorm conditioning on timestep + pooled text. SD3.5 adds two
//! options: `qk_norm: "rms_norm"` (per-head RMSNorm of queries and keys, Large and Medium) and
//! `dual_attention_layers` (MMDiT-X, Medium: those blocks also run a self-attention over the image tokens
//! alone, with its own modulation).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{
    attention, conv, layer_norm_plain, linear, merge_heads, modulate, qk_heads, silu, split_heads, timestep_embedding, Conv2d, FeedForward,
    Linear, Mlp, QkNorm,
};
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
    /// Per-head RMSNorm on queries and keys (`qk_norm: "rms_norm"`).
    pub qk_norm: bool,
    /// Blocks with the MMDiT-X second, image-only attention.
    pub dual_attention_layers: Vec<usize>,
}

impl MmditConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let c = Config::load(path)?;
        let qk_norm = match c.opt_str("qk_norm")? {
            None => false,
            Some("rms_norm") => true,
            Some(other) => {
                return Err(PipelineError::config(
                    path,
                    format!("field \"qk_norm\": {other:?} is not supported (SD3.5 uses \"rms_norm\")"),
                ));
            }
        };
        let layers = c.usize("num_layers")?;
        let dual_attention_layers = if c.raw("dual_attention_layers").is_some() { c.usizes("dual_attention_layers")? } else { Vec::new() };
        if let Some(bad) = dual_attention_layers.iter().find(|&&i| i >= layers) {
            return Err(PipelineError::config(
                path,
                format!("field \"dual_attention_layers\": block {bad} does not exist (num_layers is {layers})"),
            ));
        }
        let heads = c.usize("num_attention_heads")?;
        let head_dim = c.usize("attention_head_dim")?;
        let in_channels = c.usize_or("in_channels", 16)?;
        Ok(Self {
            in_channels,
            out_channels: c.usize_or("out_channels", in_channels)?,
            patch_size: c.usize_or("patch_size", 2)?,
            sample_size: c.usize_or("sample_size", 128)?,
            layers,
            heads,
            head_dim,
            joint_attention_dim: c.usize("joint_attention_dim")?,
            caption_projection_dim: c.usize_or("caption_projection_dim", heads * head_dim)?,
            pooled_projection_dim: c.usize("pooled_projection_dim")?,
            pos_embed_max_size: c.usize_or("pos_embed_max_size", 96)?,
            qk_norm,
            dual_attention_layers,
        })
    }

    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// The MMDiT-X self-attention over image tokens only, with its own shift, scale and gate.
struct ImageAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    norm: Option<QkNorm>,
    to_out: Linear,
}

impl ImageAttention {
    fn new(dim: usize, head_dim: usize, qk_norm: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            q: linear(dim, dim, vb.pp("to_q"))?,
            k: linear(dim, dim, vb.pp("to_k"))?,
            v: linear(dim, dim, vb.pp("to_v"))?,
            norm: qk_norm.then(|| QkNorm::new(head_dim, vb.clone(), "norm_q", "norm_k")).transpose()?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let (q, k) = qk_heads(&self.q, &self.k, self.norm.as_ref(), x, heads)?;
        let v = split_heads(&self.v.forward(x)?, heads)?;
        self.to_out.forward(&merge_heads(&attention(&q, &k, &v)?)?)
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
    norm: Option<QkNorm>,
    norm_added: Option<QkNorm>,
    attn2: Option<ImageAttention>,
    to_out: Linear,
    to_add_out: Option<Linear>,
    ff: FeedForward,
    ff_context: Option<FeedForward>,
    heads: usize,
}

impl JointBlock {
    fn new(cfg: &MmditConfig, index: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let (dim, heads, head_dim) = (cfg.inner(), cfg.heads, cfg.head_dim);
        let context_pre_only = index + 1 == cfg.layers;
        let dual = cfg.dual_attention_layers.contains(&index);
        let a = vb.pp("attn");
        Ok(Self {
            norm1: linear(dim, if dual { 9 * dim } else { 6 * dim }, vb.pp("norm1.linear"))?,
            norm1_context: linear(dim, if context_pre_only { 2 * dim } else { 6 * dim }, vb.pp("norm1_context.linear"))?,
            context_pre_only,
            q: linear(dim, dim, a.pp("to_q"))?,
            k: linear(dim, dim, a.pp("to_k"))?,
            v: linear(dim, dim, a.pp("to_v"))?,
            add_q: linear(dim, dim, a.pp("add_q_proj"))?,
            add_k: linear(dim, dim, a.pp("add_k_proj"))?,
            add_v: linear(dim, dim, a.pp("add_v_proj"))?,
            norm: cfg.qk_norm.then(|| QkNorm::new(head_dim, a.clone(), "norm_q", "norm_k")).transpose()?,
            norm_added: cfg.qk_norm.then(|| QkNorm::new(head_dim, a.clone(), "norm_added_q", "norm_added_k")).transpose()?,
            attn2: dual.then(|| ImageAttention::new(dim, head_dim, cfg.qk_norm, vb.pp("attn2"))).transpose()?,
            to_out: linear(dim, dim, a.pp("to_out.0"))?,
            to_add_out: if context_pre_only { None } else { Some(linear(dim, dim, a.pp("to_add_out"))?) },
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: if context_pre_only { None } else { Some(FeedForward::new(dim, vb.pp("ff_context"))?) },
            heads,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, temb: &Tensor) -> candle_core::Result<(Option<Tensor>, Tensor)> {
        let t = silu(temb)?;
        let m = self.norm1.forward(&t)?.chunk(if self.attn2.is_some() { 9 } else { 6 }, 1)?;
        let (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (&m[0], &m[1], &m[2], &m[3], &m[4], &m[5]);
        let ln_x = layer_norm_plain(x, 1e-6)?;
        let nx = modulate(&ln_x, shift_msa, scale_msa)?;
        let mc = self.norm1_context.forward(&t)?.chunk(if self.context_pre_only { 2 } else { 6 }, 1)?;
        let nctx = if self.context_pre_only {
            // AdaLayerNormContinuous: (scale, shift), in that order.
            modulate(&layer_norm_plain(ctx, 1e-6)?, &mc[1], &mc[0])?
        } else {
            modulate(&layer_norm_plain(ctx, 1e-6)?, &mc[0], &mc[1])?
        };
        let n_img = nx.dim(1)?;
        let (qx, kx) = qk_heads(&self.q, &self.k, self.norm.as_ref(), &nx, self.heads)?;
        let (qc, kc) = qk_heads(&self.add_q, &self.add_k, self.norm_added.as_ref(), &nctx, self.heads)?;
        let q = Tensor::cat(&[qx, qc], 2)?;
        let k = Tensor::cat(&[kx, kc], 2)?;
        let v = Tensor::cat(&[split_heads(&self.v.forward(&nx)?, self.heads)?, split_heads(&self.add_v.forward(&nctx)?, self.heads)?], 2)?;
        let joint = merge_heads(&attention(&q, &k, &v)?)?;
        let attn = self.to_out.forward(&joint.narrow(1, 0, n_img)?)?;
        let mut x = (x + attn.broadcast_mul(&gate_msa.unsqueeze(1)?)?)?;
        if let Some(attn2) = &self.attn2 {
            // The second attention reads the same normalised input, modulated by its own shift and scale.
            let nx2 = modulate(&ln_x, &m[6], &m[7])?;
            x = (&x + attn2.forward(&nx2, self.heads)?.broadcast_mul(&m[8].unsqueeze(1)?)?)?;
        }
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
                .map(|i| JointBlock::new(&cfg, i, vb.pp(format!("transformer_blocks.{i}"))))
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
        let temb =
            (self.time.forward(&timestep_embedding(&t, 256, true, 0.0)?.to_dtype(latents.dtype())?)? + self.text.forward(pooled)?)?;
        let mut ctx = Some(self.context_embedder.forward(context)?);
        for block in &self.blocks {
            let c = ctx.take().ok_or_else(|| candle_core::Error::Msg("text stream ended before the last block".into()))?;
            let (c, nx) = block.forward(&x, &c, &temb)?;
            ctx = c;
            x = nx;
        }
        let m = self.norm_out.forward(&silu(&temb)?)?.chunk(2, 1)?;
        let x = modulate(&layer_norm_plain(&x, 1e-6)?, &m[1], &m[0])?;
        let x = self.proj_out.forward(&x)?;
        // Unpatchify: [B, gh*gw, p*p*C] → [B, C, gh*p, gw*p].
        let c = cfg.out_channels;
        x.reshape((b, gh, gw, p, p, c))?.permute((0, 5, 1, 3, 2, 4))?.reshape((b, c, gh * p, gw * p))
    }
}
