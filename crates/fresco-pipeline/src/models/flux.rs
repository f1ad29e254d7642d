//! diffusers' `FluxTransformer2DModel` (FLUX.1 schnell and dev), sized from `transformer/config.json`:
//! double-stream blocks over [text; image] tokens with RMS-normed q/k and 3-axis rotary embeddings, then
//! single-stream blocks, on 2×2-packed latents; dev adds a guidance embedding.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{
    attention, gelu_tanh, layer_norm_plain, linear, merge_heads, modulate, qk_heads, silu, split_heads, timestep_embedding, FeedForward,
    Linear, Mlp, QkNorm,
};
use super::rope::rope;
use crate::error::{PipelineError, Result};
use crate::loader::{Config, Weights};

#[derive(Debug, Clone)]
pub struct FluxConfig {
    /// Channels of the packed latent (4 × the VAE's latent channels).
    pub in_channels: usize,
    pub out_channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub single_layers: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    pub guidance_embeds: bool,
    pub axes_dims: Vec<usize>,
}

impl FluxConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let c = Config::load(path)?;
        if c.usize_or("patch_size", 1)? != 1 {
            return Err(PipelineError::config(path, "only patch_size 1 is supported"));
        }
        let heads = c.usize("num_attention_heads")?;
        let head_dim = c.usize("attention_head_dim")?;
        let axes_dims = c.usizes("axes_dims_rope")?;
        if axes_dims.iter().sum::<usize>() != head_dim || axes_dims.iter().any(|d| d % 2 == 1) || axes_dims.len() != 3 {
            return Err(PipelineError::config(path, "axes_dims_rope must be three even numbers summing to attention_head_dim"));
        }
        let in_channels = c.usize_or("in_channels", 64)?;
        Ok(Self {
            in_channels,
            out_channels: c.opt_usize("out_channels")?.unwrap_or(in_channels),
            heads,
            head_dim,
            layers: c.usize("num_layers")?,
            single_layers: c.usize("num_single_layers")?,
            joint_attention_dim: c.usize("joint_attention_dim")?,
            pooled_projection_dim: c.usize("pooled_projection_dim")?,
            guidance_embeds: c.bool_or("guidance_embeds", false)?,
            axes_dims,
        })
    }

    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
}

struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    q: Linear,
    k: Linear,
    v: Linear,
    add_q: Linear,
    add_k: Linear,
    add_v: Linear,
    norm: QkNorm,
    norm_added: QkNorm,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl DoubleBlock {
    fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let a = vb.pp("attn");
        Ok(Self {
            norm1: linear(dim, 6 * dim, vb.pp("norm1.linear"))?,
            norm1_context: linear(dim, 6 * dim, vb.pp("norm1_context.linear"))?,
            q: linear(dim, dim, a.pp("to_q"))?,
            k: linear(dim, dim, a.pp("to_k"))?,
            v: linear(dim, dim, a.pp("to_v"))?,
            add_q: linear(dim, dim, a.pp("add_q_proj"))?,
            add_k: linear(dim, dim, a.pp("add_k_proj"))?,
            add_v: linear(dim, dim, a.pp("add_v_proj"))?,
            norm: QkNorm::new(head_dim, a.clone(), "norm_q", "norm_k")?,
            norm_added: QkNorm::new(head_dim, a.clone(), "norm_added_q", "norm_added_k")?,
            to_out: linear(dim, dim, a.pp("to_out.0"))?,
            to_add_out: linear(dim, dim, a.pp("to_add_out"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: FeedForward::new(dim, vb.pp("ff_context"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, temb: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let t = silu(temb)?;
        let m = self.norm1.forward(&t)?.chunk(6, 1)?;
        let c = self.norm1_context.forward(&t)?.chunk(6, 1)?;
        let nx = modulate(&layer_norm_plain(x, 1e-6)?, &m[0], &m[1])?;
        let nc = modulate(&layer_norm_plain(ctx, 1e-6)?, &c[0], &c[1])?;
        let (qc, kc) = qk_heads(&self.add_q, &self.add_k, Some(&self.norm_added), &nc, self.heads)?;
        let (qx, kx) = qk_heads(&self.q, &self.k, Some(&self.norm), &nx, self.heads)?;
        // Text tokens first, then image tokens, as the rotary ids are laid out.
        let q = Tensor::cat(&[qc, qx], 2)?;
        let k = Tensor::cat(&[kc, kx], 2)?;
        let v = Tensor::cat(&[split_heads(&self.add_v.forward(&nc)?, self.heads)?, split_heads(&self.v.forward(&nx)?, self.heads)?], 2)?;
        let joint = merge_heads(&attention(&rope(&q, cos, sin)?, &rope(&k, cos, sin)?, &v)?)?;
        let n_txt = ctx.dim(1)?;
        let attn_ctx = self.to_add_out.forward(&joint.narrow(1, 0, n_txt)?)?;
        let attn_x = self.to_out.forward(&joint.narrow(1, n_txt, x.dim(1)?)?)?;
        let x = (x + attn_x.broadcast_mul(&m[2].unsqueeze(1)?)?)?;
        let x = (&x + self.ff.forward(&modulate(&layer_norm_plain(&x, 1e-6)?, &m[3], &m[4])?)?.broadcast_mul(&m[5].unsqueeze(1)?)?)?;
        let ctx = (ctx + attn_ctx.broadcast_mul(&c[2].unsqueeze(1)?)?)?;
        let ctx = (&ctx
            + self.ff_context.forward(&modulate(&layer_norm_plain(&ctx, 1e-6)?, &c[3], &c[4])?)?.broadcast_mul(&c[5].unsqueeze(1)?)?)?;
        Ok((x, ctx))
    }
}

struct SingleBlock {
    norm: Linear,
    q: Linear,
    k: Linear,
    v: Linear,
    qk: QkNorm,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let a = vb.pp("attn");
        Ok(Self {
            norm: linear(dim, 3 * dim, vb.pp("norm.linear"))?,
            q: linear(dim, dim, a.pp("to_q"))?,
            k: linear(dim, dim, a.pp("to_k"))?,
            v: linear(dim, dim, a.pp("to_v"))?,
            qk: QkNorm::new(head_dim, a.clone(), "norm_q", "norm_k")?,
            proj_mlp: linear(dim, 4 * dim, vb.pp("proj_mlp"))?,
            proj_out: linear(5 * dim, dim, vb.pp("proj_out"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, temb: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let m = self.norm.forward(&silu(temb)?)?.chunk(3, 1)?;
        let nx = modulate(&layer_norm_plain(x, 1e-6)?, &m[0], &m[1])?;
        let mlp = gelu_tanh(&self.proj_mlp.forward(&nx)?)?;
        let (q, k) = qk_heads(&self.q, &self.k, Some(&self.qk), &nx, self.heads)?;
        let (q, k) = (rope(&q, cos, sin)?, rope(&k, cos, sin)?);
        let v = split_heads(&self.v.forward(&nx)?, self.heads)?;
        let attn = merge_heads(&attention(&q, &k, &v)?)?;
        let out = self.proj_out.forward(&Tensor::cat(&[&attn, &mlp], 2)?)?;
        x + out.broadcast_mul(&m[2].unsqueeze(1)?)?
    }
}

pub struct Flux {
    pub config: FluxConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    time: Mlp,
    guidance: Option<Mlp>,
    text: Mlp,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl Flux {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = FluxConfig::load(&dir.join("config.json"))?;
        let weights = Weights::load(dir, dtype, device)?;
        weights.context(Self::new(config, weights.vb.clone()))
    }

    fn new(cfg: FluxConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner();
        let t = vb.pp("time_text_embed");
        Ok(Self {
            x_embedder: linear(cfg.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(cfg.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            time: Mlp::new(256, dim, t.pp("timestep_embedder"))?,
            guidance: if cfg.guidance_embeds { Some(Mlp::new(256, dim, t.pp("guidance_embedder"))?) } else { None },
            text: Mlp::new(cfg.pooled_projection_dim, dim, t.pp("text_embedder"))?,
            double: (0..cfg.layers)
                .map(|i| DoubleBlock::new(dim, cfg.heads, cfg.head_dim, vb.pp(format!("transformer_blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            single: (0..cfg.single_layers)
                .map(|i| SingleBlock::new(dim, cfg.heads, cfg.head_dim, vb.pp(format!("single_transformer_blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            proj_out: linear(dim, cfg.out_channels, vb.pp("proj_out"))?,
            config: cfg,
        })
    }

    /// cos/sin `[1, 1, N, head_dim]` for text positions (all zero ids) followed by the image grid.
    fn rotary(&self, n_txt: usize, gh: usize, gw: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let ids: Vec<[f64; 3]> =
            (0..n_txt).map(|_| [0.0; 3]).chain((0..gh).flat_map(|r| (0..gw).map(move |c| [0.0, r as f64, c as f64]))).collect();
        let d = self.config.head_dim;
        let (mut cos, mut sin) = (Vec::with_capacity(ids.len() * d), Vec::with_capacity(ids.len() * d));
        for id in &ids {
            for (axis, &dim) in self.config.axes_dims.iter().enumerate() {
                for i in 0..dim / 2 {
                    let freq = 1.0 / 10000f64.powf((2 * i) as f64 / dim as f64);
                    let angle = id[axis] * freq;
                    // repeat_interleave(2): each frequency covers one (re, im) pair.
                    for _ in 0..2 {
                        cos.push(angle.cos() as f32);
                        sin.push(angle.sin() as f32);
                    }
                }
            }
        }
        let n = ids.len();
        Ok((Tensor::from_vec(cos, (1, 1, n, d), device)?, Tensor::from_vec(sin, (1, 1, n, d), device)?))
    }

    /// Velocity for packed latents `[B, (H/2)(W/2), 4C]` on a `gh × gw` grid at `timestep` (sigma × 1000).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &Tensor,
        gh: usize,
        gw: usize,
        timestep: f64,
        context: &Tensor,
        pooled: &Tensor,
        guidance: Option<f64>,
    ) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let device = x.device();
        let dtype = x.dtype();
        let t = Tensor::full(timestep as f32, b, device)?;
        let mut temb = self.time.forward(&timestep_embedding(&t, 256, true, 0.0)?.to_dtype(dtype)?)?;
        if let Some(g_mlp) = &self.guidance {
            let g = Tensor::full((guidance.unwrap_or(3.5) * 1000.0) as f32, b, device)?;
            temb = (temb + g_mlp.forward(&timestep_embedding(&g, 256, true, 0.0)?.to_dtype(dtype)?)?)?;
        }
        let temb = (temb + self.text.forward(pooled)?)?;
        let mut x = self.x_embedder.forward(x)?;
        let mut ctx = self.context_embedder.forward(context)?;
        let n_txt = ctx.dim(1)?;
        let (cos, sin) = self.rotary(n_txt, gh, gw, device)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        for block in &self.double {
            (x, ctx) = block.forward(&x, &ctx, &temb, &cos, &sin)?;
        }
        let mut joint = Tensor::cat(&[&ctx, &x], 1)?;
        for block in &self.single {
            joint = block.forward(&joint, &temb, &cos, &sin)?;
        }
        let x = joint.narrow(1, n_txt, joint.dim(1)? - n_txt)?;
        let m = self.norm_out.forward(&silu(&temb)?)?.chunk(2, 1)?;
        self.proj_out.forward(&modulate(&layer_norm_plain(&x, 1e-6)?, &m[1], &m[0])?)
    }
}

/// diffusers' `_pack_latents`: `[B, C, H, W]` → `[B, (H/2)(W/2), 4C]`.
pub fn pack(latents: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    latents.reshape((b, c, h / 2, 2, w / 2, 2))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack`].
pub fn unpack(x: &Tensor, c: usize, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let b = x.dim(0)?;
    x.reshape((b, h / 2, w / 2, c, 2, 2))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))
}
