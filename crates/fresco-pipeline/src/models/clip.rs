//! CLIP's text transformer (`CLIPTextModel` / `CLIPTextModelWithProjection` of transformers), sized
//! entirely from the component's `config.json`. Returns every hidden state, because SDXL and SD3 read the
//! penultimate layer, SD 1.x the final one, and FLUX/SDXL/SD3 the pooled end-of-text vector.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

use super::blocks::{linear, linear_no_bias, quick_gelu, softmax_last_dim, LayerNorm, Linear};
use crate::error::{PipelineError, Result};
use crate::loader::{Config, Weights};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Activation {
    QuickGelu,
    Gelu,
}

#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub max_positions: usize,
    pub layer_norm_eps: f64,
    pub projection_dim: Option<usize>,
    pub eos_token_id: u32,
    activation: Activation,
}

impl ClipConfig {
    pub fn load(dir: &Path, with_projection: bool) -> Result<Self> {
        let c = Config::load(&dir.join("config.json"))?;
        let activation = match c.str_or("hidden_act", "quick_gelu")? {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            other => return Err(PipelineError::config(&c.path, format!("hidden_act {other:?} is not supported (quick_gelu, gelu)"))),
        };
        let hidden_size = c.usize("hidden_size")?;
        let num_heads = c.usize("num_attention_heads")?;
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(PipelineError::config(&c.path, "hidden_size must be a multiple of num_attention_heads"));
        }
        Ok(Self {
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            num_layers: c.usize("num_hidden_layers")?,
            num_heads,
            max_positions: c.usize_or("max_position_embeddings", 77)?,
            layer_norm_eps: c.f64_or("layer_norm_eps", 1e-5)?,
            projection_dim: if with_projection { Some(c.usize_or("projection_dim", hidden_size)?) } else { None },
            eos_token_id: c.usize_or("eos_token_id", 49407)? as u32,
            activation,
        })
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let shape = |t: Tensor| t.reshape((b, n, self.heads, hd))?.transpose(1, 2)?.contiguous();
        let q = shape((self.q.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = shape(self.k.forward(x)?)?;
        let v = shape(self.v.forward(x)?)?;
        let w = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let w = softmax_last_dim(&w)?;
        let o = w.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out.forward(&o)
    }
}

struct Layer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl Layer {
    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = match self.act {
            Activation::QuickGelu => quick_gelu(&h)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        x + self.fc2.forward(&h)?
    }
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    projection: Option<Linear>,
    pub config: ClipConfig,
}

/// What the pipelines read from a CLIP forward pass.
pub struct ClipOutput {
    /// `hidden_states` as transformers returns them: the embeddings, then each layer's output.
    pub hidden_states: Vec<Tensor>,
    /// The final layer after the final LayerNorm.
    pub last_hidden_state: Tensor,
    /// Final-normed state at each prompt's first end-of-text token (`pooler_output`).
    pub pooled: Tensor,
    /// `text_projection(pooled)` for models with a projection (`text_embeds`).
    pub text_embeds: Option<Tensor>,
}

impl ClipTextModel {
    pub fn load(dir: &Path, with_projection: bool, dtype: DType, device: &Device) -> Result<Self> {
        let config = ClipConfig::load(dir, with_projection)?;
        let weights = Weights::load(dir, dtype, device)?;
        let model = weights.context(Self::new(config, weights.vb.clone()))?;
        Ok(model)
    }

    /// Builds the encoder from any weight source (training builds it over fresh variables).
    pub fn new(config: ClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        // transformers 4 saves CLIPTextModel weights under `text_model.`; transformers 5 drops the prefix.
        let t = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb.clone() };
        let e = t.pp("embeddings");
        let h = config.hidden_size;
        let token_embedding = embedding(config.vocab_size, h, e.pp("token_embedding"))?;
        let position_embedding = embedding(config.max_positions, h, e.pp("position_embedding"))?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let l = t.pp(format!("encoder.layers.{i}"));
            let a = l.pp("self_attn");
            layers.push(Layer {
                ln1: LayerNorm::new(h, config.layer_norm_eps, l.pp("layer_norm1"))?,
                attn: Attention {
                    q: linear(h, h, a.pp("q_proj"))?,
                    k: linear(h, h, a.pp("k_proj"))?,
                    v: linear(h, h, a.pp("v_proj"))?,
                    out: linear(h, h, a.pp("out_proj"))?,
                    heads: config.num_heads,
                },
                ln2: LayerNorm::new(h, config.layer_norm_eps, l.pp("layer_norm2"))?,
                fc1: linear(h, config.intermediate_size, l.pp("mlp.fc1"))?,
                fc2: linear(config.intermediate_size, h, l.pp("mlp.fc2"))?,
                act: config.activation,
            });
        }
        let final_norm = LayerNorm::new(h, config.layer_norm_eps, t.pp("final_layer_norm"))?;
        let projection = match config.projection_dim {
            Some(p) => Some(linear_no_bias(h, p, vb.pp("text_projection"))?),
            None => None,
        };
        Ok(Self { token_embedding, position_embedding, layers, final_norm, projection, config })
    }

    /// Encodes a batch of token-id rows of equal length.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<ClipOutput> {
        let device = self.token_embedding.embeddings().device();
        let b = ids.len();
        let n = ids.first().map(Vec::len).unwrap_or(0);
        if n == 0 || n > self.config.max_positions {
            return Err(PipelineError::param(
                "prompt",
                format!("token sequence length {n} exceeds the text encoder's {}", self.config.max_positions),
            ));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        if let Some(bad) = flat.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(PipelineError::param("prompt", format!("token id {bad} is outside the text encoder's vocabulary")));
        }
        let input = Tensor::from_vec(flat, (b, n), device)?;
        let positions = Tensor::arange(0u32, n as u32, device)?;
        let mut x = super::broadcast::add(&self.token_embedding.forward(&input)?, &self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(n, x.dtype(), device)?;
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
            hidden_states.push(x.clone());
        }
        let last_hidden_state = self.final_norm.forward(&x)?;
        // transformers pools at the first occurrence of eos_token_id.
        let mut rows = Vec::with_capacity(b);
        for (i, row) in ids.iter().enumerate() {
            let pos = row.iter().position(|&t| t == self.config.eos_token_id).unwrap_or(n - 1);
            rows.push(last_hidden_state.i((i, pos))?);
        }
        let pooled = Tensor::stack(&rows, 0)?;
        let text_embeds = match &self.projection {
            Some(p) => Some(p.forward(&pooled)?),
            None => None,
        };
        Ok(ClipOutput { hidden_states, last_hidden_state, pooled, text_embeds })
    }
}

fn causal_mask(n: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..n).flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)?.unsqueeze(0)?.unsqueeze(0)
}
