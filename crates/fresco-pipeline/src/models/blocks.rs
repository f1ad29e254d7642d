//! Building blocks the U-Net and the VAE share, named as diffusers names their weights.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{conv2d, Conv2dConfig, RmsNorm, VarBuilder};

use super::activation::Gate;
use super::broadcast;
use super::conv;
use super::fused;
use super::im2col::im2col;
use super::linear;

pub fn conv(in_c: usize, out_c: usize, kernel: usize, stride: usize, padding: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    Ok(Conv2d(conv2d(in_c, out_c, kernel, Conv2dConfig { padding, stride, ..Default::default() }, vb)?))
}

/// A 2-D convolution. In f32 on the CPU it is fresco's own: for inference [`conv::conv2d`] (column tiles
/// in the weight's order, several times faster than candle's kernel at SD's sizes); while a graph is
/// recorded (training) [`im2col`] and one matmul, because candle's conv backward goes through a direct
/// `conv_transpose2d` loop that is some fifty times slower on the CPU than the matmul's backward. GPUs
/// and other dtypes keep candle's kernels.
pub struct Conv2d(candle_nn::Conv2d);

impl Conv2d {
    /// Whether fresco's inference kernel ([`conv::conv2d_plus`]) computes this convolution of the
    /// `operands`: all f32 on the CPU, no gradient recorded, neither dilated nor grouped.
    fn on_inference_kernel(&self, operands: &[&Tensor]) -> bool {
        let cfg = self.0.config();
        let mut all = operands.to_vec();
        all.push(self.0.weight());
        all.extend(self.0.bias());
        fused::cpu_f32(&all) && !fused::recording(&all) && cfg.dilation == 1 && cfg.groups == 1
    }

    /// `residual + conv(x)`: for inference in f32 on the CPU with the residual added to each output tile
    /// as it is finished ([`conv::conv2d_plus`]), elsewhere as a separate addition.
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        if self.on_inference_kernel(&[x, residual]) {
            let cfg = self.0.config();
            return conv::conv2d_plus(x, self.0.weight(), self.0.bias(), cfg.stride, cfg.padding, Some(residual));
        }
        residual + self.forward(x)?
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let cfg = self.0.config();
        let weight = self.0.weight();
        if self.on_inference_kernel(&[x]) {
            return conv::conv2d(x, weight, self.0.bias(), cfg.stride, cfg.padding);
        }
        if !x.device().is_cpu() || x.dtype() != DType::F32 || cfg.dilation != 1 || cfg.groups != 1 {
            return self.0.forward(x);
        }
        let (b, _, h, w) = x.dims4()?;
        let (o, _, kh, kw) = weight.dims4()?;
        let span = |n: usize, k: usize| (n + 2 * cfg.padding - k) / cfg.stride + 1;
        // The columns of the whole batch are one `[k·k·C, B·OH·OW]` matrix and the convolution one matmul,
        // whose weight gradient is one matmul too (a matmul broadcast over the batch would leave a sum
        // over it to candle's slow reduction). Column order is (dy, dx) major, channel minor; the weight
        // is laid out to match.
        let cols = im2col(x, (kh, kw), cfg.stride, cfg.padding)?;
        let wm = weight.permute((0, 2, 3, 1))?.reshape((o, cols.dim(0)?))?;
        let mut out = wm.matmul(&cols)?;
        if let Some(bias) = self.0.bias() {
            // Summed over the trailing axis in the backward pass: candle's fast reduction.
            out = out.broadcast_add(&bias.reshape((o, 1))?)?;
        }
        out.reshape((o, b, span(h, kh), span(w, kw)))?.transpose(0, 1)?.contiguous()
    }
}

/// A linear layer. For inference in f32 on the CPU it is fresco's own ([`linear::linear`]: one matrix
/// multiply onto the bias); while a gradient is recorded it is candle's, with the bias added through
/// [`broadcast::add`], whose backward is fast on the CPU; GPUs and other dtypes keep candle's.
pub struct Linear(candle_nn::Linear);

pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Ok(Linear(candle_nn::linear(in_dim, out_dim, vb)?))
}

pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    Ok(Linear(candle_nn::linear_no_bias(in_dim, out_dim, vb)?))
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (weight, bias) = (self.0.weight(), self.0.bias());
        let mut args = vec![x, weight];
        args.extend(bias);
        if fused::cpu_f32(&args) && !fused::recording(&args) {
            return linear::linear(x, weight, bias);
        }
        match bias {
            Some(bias) if bias.track_op() => broadcast::add(&candle_nn::Linear::new(weight.clone(), None).forward(x)?, bias),
            _ => self.0.forward(x),
        }
    }
}

/// GroupNorm with a learned per-channel scale and shift, statistics in f32 ([`fused::group_norm`]).
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {channels} channels do not split into {groups} groups")
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
        bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
        groups,
        eps,
    })
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_gated(x, None)
    }
}

impl GroupNorm {
    /// `silu(self.forward(x))`, for inference in f32 on the CPU in the normalisation's own pass.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_gated(x, Some(Gate::Silu))
    }

    /// The normalisation then `then`: for inference in f32 on the CPU in one pass with candle's values
    /// ([`super::norm`]), elsewhere [`fused::group_norm`] (training's kernel, or candle's ops) and the gate.
    fn forward_gated(&self, x: &Tensor, then: Option<Gate>) -> candle_core::Result<Tensor> {
        let args = [x, &self.weight, &self.bias];
        if !fused::recording(&args) && fused::cpu_f32(&args) {
            return super::norm::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, then);
        }
        let normed = fused::group_norm(x, &self.weight, &self.bias, self.groups, self.eps)?;
        match then {
            Some(g) => gate(&normed, g),
            None => Ok(normed),
        }
    }
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
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&silu(t)?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.norm2.forward_silu(&h)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        let out = self.conv2.forward_plus(&h, &skip)?;
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
        let (b, c, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = if x.track_op() && (th, tw) == (2 * h, 2 * w) {
            // Training: a broadcast, whose backward is a sum (candle's runs a grouped convolution).
            broadcast::expand(&x.reshape((b, c, h, 1, w, 1))?, &(b, c, h, 2, w, 2).into())?.reshape((b, c, th, tw))?
        } else {
            x.upsample_nearest2d(th, tw)?
        };
        self.conv.forward(&up)
    }
}

/// Where candle's ops compute attention on the CPU (other dtypes, training), score matrices above this
/// many elements (16 MiB of f32) are computed a block of queries at a time. Measured when f32 inference
/// still took this path: an SD 1.5 U-Net evaluation at 512×512 took 74 s whole, 64 s in 128 MiB blocks,
/// 60 s in 16 MiB and 61 s in 4 MiB ones.
const CPU_ATTENTION_BLOCK_ELEMENTS: usize = 1 << 22;

/// The same on a GPU: 1 GiB of f32 scores, a few percent of a GPU's memory. Blocks of 16 MiB cut the
/// self-attentions of an SD 1.5 U-Net's guided batch of 16 at 512×512 (256 rows of 4096 keys a query)
/// into 1,024 blocks of 4 queries each, whose skinny products ran on cuBLAS's matrix-vector kernels
/// (with their softmaxes, 59% of the GPU time of the first 2,000 kernels Nsight Compute timed). On an
/// H200 that U-Net's evaluation went from 0.11 / 0.49 / 2.68 s to 0.05 / 0.17 / 0.75 s at batch 1 / 4 / 16.
const GPU_ATTENTION_BLOCK_ELEMENTS: usize = 1 << 28;

/// Scaled dot-product attention over `[B, heads, N, d]` tensors: for inference in f32 on the CPU
/// fresco's kernel ([`super::attention`]), elsewhere candle's ops.
///
/// Softmax runs along each query's row, so queries can be taken in blocks with the same result: an
/// SD 1.5 U-Net at 512×512 would otherwise hold `[2B, 8, 4096, 4096]` scores (1 GiB per guided image)
/// two or three times over at each full-resolution attention.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    if !fused::recording(&[q, k, v]) && fused::cpu_f32(&[q, k, v]) {
        return super::attention::attention(q, k, v);
    }
    // candle's matmul takes heads split off a projection ([`split_heads`]) only as copies.
    let max_elements = if q.device().is_cpu() { CPU_ATTENTION_BLOCK_ELEMENTS } else { GPU_ATTENTION_BLOCK_ELEMENTS };
    attention_in_blocks(&q.contiguous()?, &k.contiguous()?, &v.contiguous()?, max_elements)
}

/// `softmax(scale · q kᵀ + bias) v` with an additive `[heads, N, M]` bias shared by the batch (T5's
/// relative positions): for inference in f32 on the CPU fresco's kernel, elsewhere candle's ops.
pub fn biased_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: &Tensor) -> candle_core::Result<Tensor> {
    if !fused::recording(&[q, k, v, bias]) && fused::cpu_f32(&[q, k, v, bias]) {
        return super::attention::biased_attention(q, k, v, scale, bias);
    }
    let scores = (q.contiguous()?.matmul(&k.contiguous()?.t()?)? * scale)?.broadcast_add(&bias.unsqueeze(0)?)?;
    softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
}

/// GEGLU, `a · gelu_erf(g)` over the halves `[a, g]` of `h`'s last dimension: in f32 on the CPU
/// fresco's one-pass kernel ([`super::activation`]), elsewhere candle's ops.
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    if fused::cpu_f32(&[h]) {
        return super::activation::geglu(h);
    }
    let halves = h.chunk(2, D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// SiLU, `x · σ(x)`.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    gate(x, Gate::Silu)
}

/// The tanh-approximate GELU ("gelu-approximate", "gelu_pytorch_tanh").
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    gate(x, Gate::GeluTanh)
}

/// CLIP's quick GELU, `x · σ(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    gate(x, Gate::QuickGelu)
}

/// In f32 on the CPU fresco's one-pass kernel ([`super::activation`]), elsewhere candle's ops.
fn gate(x: &Tensor, gate: Gate) -> candle_core::Result<Tensor> {
    if fused::cpu_f32(&[x]) {
        return super::activation::gated(x, gate);
    }
    match gate {
        Gate::Silu => candle_nn::ops::silu(x),
        Gate::GeluTanh => x.gelu(),
        Gate::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
    }
}

fn attention_in_blocks(q: &Tensor, k: &Tensor, v: &Tensor, max_elements: usize) -> candle_core::Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let kt = k.t()?;
    // The scale goes on the queries ([N, d]) rather than on the scores ([N, M]): one pass over d values
    // per query instead of over M.
    let q = (q * (d as f64).powf(-0.5))?;
    let block = |q: &Tensor| softmax_last_dim(&q.matmul(&kt)?)?.matmul(v);
    let per_query = b * h * k.dim(2)?;
    // Training keeps one graph (the blocks would only add bookkeeping to the backward pass).
    if q.track_op() || n * per_query <= max_elements {
        return block(&q);
    }
    let rows = (max_elements / per_query).max(1);
    let blocks = (0..n)
        .step_by(rows)
        .map(|start| block(&q.narrow(2, start, rows.min(n - start))?.contiguous()?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&blocks, 2)
}

pub use fused::softmax_last_dim;

/// LayerNorm with learned scale and shift ([`fused::layer_norm`]: candle's `ops::layer_norm` records no
/// backward op and would silently leave the parameters untrained).
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        fused::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Per-head RMS normalisation of queries and keys with learned scales (diffusers' `qk_norm="rms_norm"`,
/// eps 1e-6), as FLUX and SD3.5 apply it after splitting heads.
pub struct QkNorm {
    pub q: RmsNorm,
    pub k: RmsNorm,
}

impl QkNorm {
    pub fn new(head_dim: usize, vb: VarBuilder, q: &str, k: &str) -> candle_core::Result<Self> {
        Ok(Self { q: candle_nn::rms_norm(head_dim, 1e-6, vb.pp(q))?, k: candle_nn::rms_norm(head_dim, 1e-6, vb.pp(k))? })
    }
}

/// Queries and keys of `x` split into heads, RMS-normalised per head where the model has a [`QkNorm`].
pub fn qk_heads(q: &Linear, k: &Linear, norm: Option<&QkNorm>, x: &Tensor, heads: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let (q, k) = (split_heads(&q.forward(x)?, heads)?, split_heads(&k.forward(x)?, heads)?);
    match norm {
        // candle-nn's RMS norm takes its one-pass kernel only for contiguous input.
        Some(n) => Ok((n.q.forward(&q.contiguous()?)?, n.k.forward(&k.contiguous()?)?)),
        None => Ok((q, k)),
    }
}

/// Splits `[B, N, heads*d]` into `[B, heads, N, d]`: a view, which fresco's attention kernel reads in
/// place (a copy per head row, `d` floats, was a twentieth of tiny-sd15's U-Net step).
pub fn split_heads(x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))?.transpose(1, 2)
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
    // diffusers computes the exponents in float32, a multiplication and a division rounded each, and a
    // timestep of up to 999 turns one unit in the last place of a frequency into 10⁻⁴ of a phase:
    // exponents computed exactly put `sd15-ddim-20` further from diffusers' images (mean |Δ| 0.37 / 0.27
    // against 0.25 / 0.23 of 255).
    let (scale, divisor) = (-(10000f64.ln()) as f32, (half as f64 - freq_shift) as f32);
    let exponent: Vec<f32> = (0..half).map(|i| f64::from(scale * i as f32 / divisor).exp() as f32).collect();
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
        self.l2.forward(&silu(&self.l1.forward(x)?)?)
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
        self.down.forward(&gelu_tanh(&self.up.forward(x)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Each activation gives the same values with and without a gradient recorded (fresco's kernel and
    /// candle's ops), and while one is recorded it reaches the input.
    #[test]
    fn activations_match_and_pass_gradients_while_recording() {
        let x = candle_core::Var::randn(0f32, 3., (4, 33), &Device::Cpu).expect("x");
        for (name, f) in
            [("silu", silu as fn(&Tensor) -> candle_core::Result<Tensor>), ("gelu_tanh", gelu_tanh), ("quick_gelu", quick_gelu)]
        {
            let recorded = f(x.as_tensor()).expect("recorded");
            let inference = f(&x.as_tensor().detach()).expect("inference");
            let diff =
                (&recorded - &inference).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
            assert!(diff < 1e-5, "{name}: max difference {diff}");
            let grads = recorded.sum_all().expect("sum").backward().expect("backward");
            assert!(grads.get(x.as_tensor()).is_some(), "{name}: no gradient");
        }
    }

    /// The training path (im2col) computes exactly what candle's kernel computes at inference.
    #[test]
    fn training_convolution_matches_the_inference_kernel() {
        let dev = Device::Cpu;
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0)] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let c = conv(5, 7, k, stride, padding, vb).expect("conv");
            let x = Tensor::randn(0f32, 1., (2, 5, 9, 8), &dev).expect("x");
            let trained = c.forward(&x).expect("im2col");
            let frozen = candle_nn::Conv2d::new(c.0.weight().detach(), c.0.bias().map(Tensor::detach), *c.0.config());
            let reference = frozen.forward(&x).expect("kernel");
            assert_eq!(trained.dims(), reference.dims(), "k{k} s{stride} p{padding}");
            let diff = (trained - reference).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
            assert!(diff < 1e-4, "k{k} s{stride} p{padding}: max difference {diff}");
        }
    }

    /// And its backward (im2col's scatter, the single matmul, the bias) gives candle's gradients for the
    /// input, the weight and the bias.
    #[test]
    fn training_convolution_gradients_match_candles() {
        let dev = Device::Cpu;
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0)] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let c = conv(4, 6, k, stride, padding, vb).expect("conv");
            let x = candle_core::Var::randn(0f32, 1., (3, 4, 7, 6), &dev).expect("x");
            // candle's strided backward takes its output padding from the height alone (a wrong width
            // when height and width differ in parity, as here), so the reference is its stride-1
            // convolution, subsampled.
            let dense = candle_nn::Conv2d::new(c.0.weight().clone(), c.0.bias().cloned(), Conv2dConfig { stride: 1, ..*c.0.config() });
            let full = dense.forward(x.as_tensor()).expect("dense");
            let pick = |n: usize| Tensor::arange_step(0u32, n as u32, stride as u32, &dev).expect("pick");
            let reference = full
                .index_select(&pick(full.dim(2).expect("h")), 2)
                .expect("rows")
                .index_select(&pick(full.dim(3).expect("w")), 3)
                .expect("cols");
            let ours = c.forward(x.as_tensor()).expect("ours");
            assert_eq!(ours.dims(), reference.dims());
            let ours = ours.sqr().expect("sq").sum_all().expect("sum").backward().expect("bwd");
            let theirs = reference.sqr().expect("sq").sum_all().expect("sum").backward().expect("bwd");
            let bias = c.0.bias().expect("bias");
            for (name, t) in [("input", x.as_tensor()), ("weight", c.0.weight()), ("bias", bias)] {
                let (a, b) = (ours.get(t).expect("ours"), theirs.get(t).expect("theirs"));
                let diff = (a - b).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
                assert!(diff < 1e-3, "k{k} s{stride} p{padding}: {name} gradients differ by {diff}");
            }
        }
    }

    #[test]
    fn attention_in_query_blocks_equals_the_whole() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev).expect("q");
        let k = Tensor::randn(0f32, 1., (2, 3, 29, 8), &dev).expect("k");
        let v = Tensor::randn(0f32, 1., (2, 3, 29, 8), &dev).expect("v");
        let whole = attention_in_blocks(&q, &k, &v, usize::MAX).expect("whole");
        // 2·3·29 scores per query: blocks of 5 queries, the last one short.
        let blocked = attention_in_blocks(&q, &k, &v, 5 * 2 * 3 * 29).expect("blocks");
        assert_eq!(whole.dims(), blocked.dims());
        let diff = (whole - blocked).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn training_upsample_matches_nearest() {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let up = Upsample::new(3, vb).expect("upsample");
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 5), &dev).expect("x");
        let trained = up.forward(&x, None).expect("broadcast path");
        let frozen = candle_nn::Conv2d::new(up.conv.0.weight().detach(), up.conv.0.bias().map(Tensor::detach), *up.conv.0.config());
        let reference = frozen.forward(&x.upsample_nearest2d(8, 10).expect("up")).expect("conv");
        let diff = (trained - reference).expect("sub").abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar");
        assert!(diff < 1e-4, "max difference {diff}");
    }
}
