//! diffusers' `UNet2DConditionModel` for SD 1.x/2.x and SDXL, built from `unet/config.json`: per-block head
//! counts, transformer depths and cross-attention widths, linear or convolutional projections, and SDXL's
//! `text_time` additional embedding (pooled text + size/crop conditioning), which candle's own U-Net lacks.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{
    attention, conv, geglu, group_norm, linear, linear_no_bias, merge_heads, silu, split_heads, timestep_embedding, Conv2d, Downsample,
    GroupNorm, LayerNorm, Linear, ResnetBlock, Upsample,
};
use crate::error::{PipelineError, Result};
use crate::loader::{Config, Weights};

#[derive(Debug, Clone, Copy, PartialEq)]
enum BlockKind {
    Plain,
    CrossAttn,
}

#[derive(Debug, Clone)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub sample_size: usize,
    block_out: Vec<usize>,
    down: Vec<BlockKind>,
    up: Vec<BlockKind>,
    layers_per_block: Vec<usize>,
    heads: Vec<usize>,
    transformer_depth: Vec<usize>,
    reverse_transformer_depth: Option<Vec<usize>>,
    cross_attention_dim: Vec<usize>,
    use_linear_projection: bool,
    norm_groups: usize,
    norm_eps: f64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    downsample_padding: usize,
    mid_scale: f64,
    conv_in_kernel: usize,
    conv_out_kernel: usize,
    /// SDXL: (addition_time_embed_dim, projection_class_embeddings_input_dim).
    pub text_time: Option<(usize, usize)>,
    pub time_cond_proj_dim: Option<usize>,
}

impl UNetConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let c = Config::load(path)?;
        let err = |m: String| PipelineError::config(path, m);
        let block_out = c.usizes("block_out_channels")?;
        let n = block_out.len();
        let kind = |name: &str, plain: &str, cross: &str| -> Result<BlockKind> {
            if name == plain {
                Ok(BlockKind::Plain)
            } else if name == cross {
                Ok(BlockKind::CrossAttn)
            } else {
                Err(err(format!("block type {name:?} is not supported")))
            }
        };
        let down =
            c.strings("down_block_types")?.iter().map(|s| kind(s, "DownBlock2D", "CrossAttnDownBlock2D")).collect::<Result<Vec<_>>>()?;
        let up = c.strings("up_block_types")?.iter().map(|s| kind(s, "UpBlock2D", "CrossAttnUpBlock2D")).collect::<Result<Vec<_>>>()?;
        if down.len() != n || up.len() != n {
            return Err(err("down_block_types, up_block_types and block_out_channels must have the same length".into()));
        }
        match c.opt_str("mid_block_type")? {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(other) => return Err(err(format!("mid_block_type {other:?} is not supported"))),
        }
        for key in ["class_embed_type", "encoder_hid_dim_type"] {
            if c.raw(key).is_some() {
                return Err(err(format!("{key} is not supported")));
            }
        }
        if c.bool_or("dual_cross_attention", false)? || c.bool_or("only_cross_attention", false)? {
            return Err(err("dual or cross-only attention is not supported".into()));
        }
        // diffusers' long-standing naming quirk: `attention_head_dim` holds the number of heads unless
        // `num_attention_heads` is given.
        let heads = match c.raw("num_attention_heads") {
            Some(_) => c.per_block("num_attention_heads", n, None)?,
            None => c.per_block("attention_head_dim", n, Some(8))?,
        };
        let text_time = match c.opt_str("addition_embed_type")? {
            None => None,
            Some("text_time") => Some((c.usize("addition_time_embed_dim")?, c.usize("projection_class_embeddings_input_dim")?)),
            Some(other) => return Err(err(format!("addition_embed_type {other:?} is not supported"))),
        };
        match c.str_or("time_embedding_type", "positional")? {
            "positional" => {}
            other => return Err(err(format!("time_embedding_type {other:?} is not supported"))),
        }
        if c.str_or("resnet_time_scale_shift", "default")? != "default" {
            return Err(err("resnet_time_scale_shift other than \"default\" is not supported".into()));
        }
        let reverse_transformer_depth = match c.raw("reverse_transformer_layers_per_block") {
            None => None,
            Some(_) => return Err(err("reverse_transformer_layers_per_block is not supported".into())),
        };
        Ok(Self {
            in_channels: c.usize_or("in_channels", 4)?,
            out_channels: c.usize_or("out_channels", 4)?,
            sample_size: c.usize_or("sample_size", 64)?,
            layers_per_block: c.per_block("layers_per_block", n, Some(2))?,
            heads,
            transformer_depth: c.per_block("transformer_layers_per_block", n, Some(1))?,
            reverse_transformer_depth,
            cross_attention_dim: c.per_block("cross_attention_dim", n, Some(1280))?,
            use_linear_projection: c.bool_or("use_linear_projection", false)?,
            norm_groups: c.usize_or("norm_num_groups", 32)?,
            norm_eps: c.f64_or("norm_eps", 1e-5)?,
            flip_sin_to_cos: c.bool_or("flip_sin_to_cos", true)?,
            freq_shift: c.f64_or("freq_shift", 0.0)?,
            downsample_padding: c.usize_or("downsample_padding", 1)?,
            mid_scale: c.f64_or("mid_block_scale_factor", 1.0)?,
            conv_in_kernel: c.usize_or("conv_in_kernel", 3)?,
            conv_out_kernel: c.usize_or("conv_out_kernel", 3)?,
            time_cond_proj_dim: c.opt_usize("time_cond_proj_dim")?,
            text_time,
            block_out,
            down,
            up,
        })
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

struct CrossAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl CrossAttention {
    fn new(dim: usize, context_dim: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            k: linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            v: linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            out: linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = split_heads(&self.q.forward(x)?, self.heads)?;
        let k = split_heads(&self.k.forward(ctx)?, self.heads)?;
        let v = split_heads(&self.v.forward(ctx)?, self.heads)?;
        self.out.forward(&merge_heads(&attention(&q, &k, &v)?)?)
    }
}

impl BasicTransformerBlock {
    fn new(dim: usize, heads: usize, context_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: CrossAttention::new(dim, dim, heads, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: CrossAttention::new(dim, context_dim, heads, vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff_in: linear(dim, inner * 2, vb.pp("ff.net.0.proj"))?,
            ff_out: linear(inner, dim, vb.pp("ff.net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        // GEGLU: the projection's second half gates the first through an exact GELU.
        let h = geglu(&self.ff_in.forward(&self.norm3.forward(&x)?)?)?;
        self.ff_out.forward(&h)? + x
    }
}

enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

/// `Transformer2DModel`: GroupNorm, projection in, transformer blocks, projection out, residual.
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn new(channels: usize, heads: usize, depth: usize, context_dim: usize, cfg: &UNetConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let proj = |name: &str| -> candle_core::Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(channels, channels, vb.pp(name))?)
            } else {
                Projection::Conv(conv(channels, channels, 1, 1, 0, vb.pp(name))?)
            })
        };
        let blocks = (0..depth)
            .map(|i| BasicTransformerBlock::new(channels, heads, context_dim, vb.pp(format!("transformer_blocks.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.norm_groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let to_seq = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let mut s = match &self.proj_in {
            Projection::Conv(p) => to_seq(&p.forward(&x)?)?,
            Projection::Linear(p) => p.forward(&to_seq(&x)?)?,
        };
        for block in &self.blocks {
            s = block.forward(&s, context)?;
        }
        let to_img = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
        let out = match &self.proj_out {
            Projection::Conv(p) => p.forward(&to_img(&s)?)?,
            Projection::Linear(p) => to_img(&p.forward(&s)?)?,
        };
        out + residual
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsample: Option<Downsample>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsample: Option<Upsample>,
}

struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attention: SpatialTransformer,
}

struct TimestepMlp {
    l1: Linear,
    l2: Linear,
}

impl TimestepMlp {
    fn new(inp: usize, out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { l1: linear(inp, out, vb.pp("linear_1"))?, l2: linear(out, out, vb.pp("linear_2"))? })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.l2.forward(&silu(&self.l1.forward(x)?)?)
    }
}

pub struct UNet {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepMlp,
    add_embedding: Option<TimestepMlp>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// SDXL's extra conditioning: pooled text embeddings `[B, P]` and time ids `[B, 6]`.
pub struct TextTimeCond<'a> {
    pub text_embeds: &'a Tensor,
    pub time_ids: &'a Tensor,
}

/// What [`UNet::forward_features`] returns.
pub struct UNetFeatures {
    /// The denoising prediction, as [`UNet::forward_t`] gives it.
    pub out: Tensor,
    /// The mid block's output, `[B, C, h, w]` at the coarsest level.
    pub mid: Tensor,
    /// The last up block's output, `[B, C, H, W]` at the latent's own size, before the output norm.
    pub top: Tensor,
}

impl UNet {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = UNetConfig::load(&dir.join("config.json"))?;
        let weights = Weights::load(dir, dtype, device)?;
        weights.context(Self::new(config, weights.vb.clone()))
    }

    /// Builds the network from any weight source (benchmarks use random weights).
    pub fn new(cfg: UNetConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let bo = &cfg.block_out;
        let n = bo.len();
        let temb = bo[0] * 4;
        let conv_in = conv(cfg.in_channels, bo[0], cfg.conv_in_kernel, 1, (cfg.conv_in_kernel - 1) / 2, vb.pp("conv_in"))?;
        let time_embedding = TimestepMlp::new(bo[0], temb, vb.pp("time_embedding"))?;
        let add_embedding = match cfg.text_time {
            Some((_, input)) => Some(TimestepMlp::new(input, temb, vb.pp("add_embedding"))?),
            None => None,
        };
        let resnet =
            |i: usize, o: usize, scale: f64, vb: VarBuilder| ResnetBlock::new(i, o, Some(temb), cfg.norm_groups, cfg.norm_eps, scale, vb);

        let mut down = Vec::with_capacity(n);
        let mut out_c = bo[0];
        for (i, &width) in bo.iter().enumerate() {
            let in_c = out_c;
            out_c = width;
            let vb = vb.pp(format!("down_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block[i] {
                resnets.push(resnet(if j == 0 { in_c } else { out_c }, out_c, 1.0, vb.pp(format!("resnets.{j}")))?);
                if cfg.down[i] == BlockKind::CrossAttn {
                    attentions.push(SpatialTransformer::new(
                        out_c,
                        cfg.heads[i],
                        cfg.transformer_depth[i],
                        cfg.cross_attention_dim[i],
                        &cfg,
                        vb.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let downsample = if i + 1 < n { Some(Downsample::new(out_c, cfg.downsample_padding, vb.pp("downsamplers.0"))?) } else { None };
            down.push(DownBlock { resnets, attentions, downsample });
        }

        let mvb = vb.pp("mid_block");
        let last = bo[n - 1];
        let mid = MidBlock {
            resnets: vec![resnet(last, last, cfg.mid_scale, mvb.pp("resnets.0"))?, resnet(last, last, cfg.mid_scale, mvb.pp("resnets.1"))?],
            attention: SpatialTransformer::new(
                last,
                cfg.heads[n - 1],
                cfg.transformer_depth[n - 1],
                cfg.cross_attention_dim[n - 1],
                &cfg,
                mvb.pp("attentions.0"),
            )?,
        };

        let rev = |v: &Vec<usize>| v.iter().rev().copied().collect::<Vec<_>>();
        let (rbo, rheads, rlayers, rcross) = (rev(bo), rev(&cfg.heads), rev(&cfg.layers_per_block), rev(&cfg.cross_attention_dim));
        let rdepth = cfg.reverse_transformer_depth.clone().unwrap_or_else(|| rev(&cfg.transformer_depth));
        let mut up = Vec::with_capacity(n);
        let mut out_c = rbo[0];
        for (i, &width) in rbo.iter().enumerate() {
            let prev_out = out_c;
            out_c = width;
            let in_c = rbo[(i + 1).min(n - 1)];
            let vb = vb.pp(format!("up_blocks.{i}"));
            let layers = rlayers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j + 1 == layers { in_c } else { out_c };
                let res_in = if j == 0 { prev_out } else { out_c };
                resnets.push(resnet(res_in + skip, out_c, 1.0, vb.pp(format!("resnets.{j}")))?);
                if cfg.up[i] == BlockKind::CrossAttn {
                    attentions.push(SpatialTransformer::new(
                        out_c,
                        rheads[i],
                        rdepth[i],
                        rcross[i],
                        &cfg,
                        vb.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let upsample = if i + 1 < n { Some(Upsample::new(out_c, vb.pp("upsamplers.0"))?) } else { None };
            up.push(UpBlock { resnets, attentions, upsample });
        }
        let norm_out = group_norm(cfg.norm_groups, bo[0], cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv(bo[0], cfg.out_channels, cfg.conv_out_kernel, 1, (cfg.conv_out_kernel - 1) / 2, vb.pp("conv_out"))?;
        Ok(Self { config: cfg, conv_in, time_embedding, add_embedding, down, mid, up, norm_out, conv_out })
    }

    /// One denoiser evaluation. `timestep` is a scalar shared by the batch (possibly fractional).
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor, extra: Option<TextTimeCond>) -> candle_core::Result<Tensor> {
        let t = Tensor::full(timestep as f32, sample.dim(0)?, sample.device())?;
        self.forward_t(sample, &t, context, extra)
    }

    /// One denoiser evaluation with a timestep per sample (`[B]`, f32), as training draws them.
    pub fn forward_t(&self, sample: &Tensor, t: &Tensor, context: &Tensor, extra: Option<TextTimeCond>) -> candle_core::Result<Tensor> {
        Ok(self.forward_features(sample, t, context, extra)?.out)
    }

    /// [`Self::forward_t`], also returning hidden features: training can ask the network for more than
    /// the denoising target alone.
    pub fn forward_features(
        &self,
        sample: &Tensor,
        t: &Tensor,
        context: &Tensor,
        extra: Option<TextTimeCond>,
    ) -> candle_core::Result<UNetFeatures> {
        let cfg = &self.config;
        let b = sample.dim(0)?;
        let t_emb = timestep_embedding(t, cfg.block_out[0], cfg.flip_sin_to_cos, cfg.freq_shift)?.to_dtype(sample.dtype())?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let (Some(add), Some((time_dim, _)), Some(extra)) = (&self.add_embedding, cfg.text_time, extra) {
            let ids = extra.time_ids.flatten_all()?;
            let time =
                timestep_embedding(&ids, time_dim, cfg.flip_sin_to_cos, cfg.freq_shift)?.reshape((b, ()))?.to_dtype(sample.dtype())?;
            let add_in = Tensor::cat(&[extra.text_embeds, &time], 1)?;
            emb = (emb + add.forward(&add_in)?)?;
        }

        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for (j, r) in block.resnets.iter().enumerate() {
                x = r.forward(&x, Some(&emb))?;
                if let Some(a) = block.attentions.get(j) {
                    x = a.forward(&x, context)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &block.downsample {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }
        x = self.mid.resnets[0].forward(&x, Some(&emb))?;
        x = self.mid.attention.forward(&x, context)?;
        x = self.mid.resnets[1].forward(&x, Some(&emb))?;
        let mid = x.clone();

        for block in &self.up {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("U-Net skip connections exhausted".into()))?;
                x = r.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&emb))?;
                if let Some(a) = block.attentions.get(j) {
                    x = a.forward(&x, context)?;
                }
            }
            if let Some(u) = &block.upsample {
                // Odd feature sizes: upsample to the size of the next skip connection, as diffusers does.
                let size = skips.last().map(|s| s.dims4()).transpose()?.map(|(_, _, h, w)| (h, w));
                x = u.forward(&x, size)?;
            }
        }
        let top = x.clone();
        let x = self.norm_out.forward_silu(&x)?;
        Ok(UNetFeatures { out: self.conv_out.forward(&x)?, mid, top })
    }
}
