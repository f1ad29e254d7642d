//! Building blocks the U-Net and the VAE share, named as diffusers names their weights.

use candle_core::{Module, Tensor, D};
use candle_nn::{conv2d, group_norm, linear, Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

pub fn conv(in_c: usize, out_c: usize, kernel: usize, stride: usize, padding: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    conv2d(in_c, out_c, kernel, Conv2dConfig { padding, stride, ..Default::default() }, vb)
}

/// diffusers' `ResnetBlock2D` (default time-embedding handling, optional 1×1 shortcut).
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    output_scale: f64,
}

impl ResnetBlock {
    pub fn new(
        in_c: usize,
        out_c: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: group_norm(groups, in_c, eps, vb.pp("norm1"))?,
            conv1: conv(in_c, out_c, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: match temb {
                Some(t) => Some(linear(t, out_c, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: group_norm(groups, out_c, eps, vb.pp("norm2"))?,
            conv2: conv(out_c, out_c, 3, 1, 1, vb.pp("conv2"))?,
            shortcut: if in_c != out_c { Some(conv(in_c, out_c, 1, 1, 0, vb.pp("conv_shortcut"))?) } else { None },
            output_scale,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let mut h = self.conv1.forward(&candle_nn::ops::silu(&self.norm1.forward(x)?)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&candle_nn::ops::silu(t)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&candle_nn::ops::silu(&self.norm2.forward(&h)?)?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        let out = (skip + h)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }
}

/// A stride-2 convolution (`Downsample2D` with `use_conv=True`). With padding 0 diffusers pads
/// right/bottom by one first.
pub struct Downsample {
    conv: Conv2d,
    pad_first: bool,
}

impl Downsample {
    pub fn new(c: usize, padding: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { conv: conv(c, c, 3, 2, padding, vb.pp("conv"))?, pad_first: padding == 0 })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_first {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour ×2 (or to an explicit size) followed by a 3×3 convolution (`Upsample2D`).
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(c: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { conv: conv(c, c, 3, 1, 1, vb.pp("conv"))? })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}

/// Scaled dot-product attention over `[B, heads, N, d]` tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let d = q.dim(candle_core::D::Minus1)?;
    let w = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
    candle_nn::ops::softmax_last_dim(&w)?.matmul(v)
}

/// Splits `[B, N, heads*d]` into `[B, heads, N, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))?.transpose(1, 2)?.contiguous()
}

/// Inverse of [`split_heads`].
pub fn merge_heads(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, n, h * d))
}

/// Sinusoidal timestep embedding exactly as diffusers' `get_timestep_embedding`.
pub fn timestep_embedding(t: &Tensor, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let device = t.device();
    let exponent: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(exponent, (1, half), device)?;
    let args = t.to_dtype(candle_core::DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// LayerNorm without learned affine parameters (`elementwise_affine=False`).
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `x * (1 + scale) + shift` with per-sample `[B, C]` modulation.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?.broadcast_add(&shift.unsqueeze(1)?)
}

/// Linear → SiLU → Linear (diffusers' `TimestepEmbedding` / `PixArtAlphaTextProjection`).
pub struct Mlp {
    l1: Linear,
    l2: Linear,
}

impl Mlp {
    pub fn new(inp: usize, out: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { l1: linear(inp, out, vb.pp("linear_1"))?, l2: linear(out, out, vb.pp("linear_2"))? })
    }
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.l2.forward(&candle_nn::ops::silu(&self.l1.forward(x)?)?)
    }
}

/// The transformers' MLP: Linear ×4 → tanh-approximate GELU → Linear.
pub struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { up: linear(dim, 4 * dim, vb.pp("net.0.proj"))?, down: linear(4 * dim, dim, vb.pp("net.2"))? })
    }
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // GELU with the tanh approximation ("gelu-approximate").
        self.down.forward(&self.up.forward(x)?.gelu()?)
    }
}
