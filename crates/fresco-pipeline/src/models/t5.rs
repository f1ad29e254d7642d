//! T5 encoder (SD3's third text encoder, FLUX's second): transformers' `T5EncoderModel`, sized from the
//! component's `config.json` and read from its layout and keys.
//!
//! fresco's own rather than candle-transformers': there the softmax and the GELU call libm's scalar
//! functions over every padded token (256 for SD3, 512 for FLUX, whatever the prompt), a third of a
//! tiny FLUX batch on the CPU. Here the attention is fresco's kernel, with the relative-position bias
//! added in its first product, and the activations are fresco's.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, rms_norm, Embedding, RmsNorm, VarBuilder};

use super::blocks::{biased_attention, gelu_tanh, linear_no_bias, merge_heads, silu, split_heads, Linear};
use crate::error::{PipelineError, Result};
use crate::loader::{Config, Weights};

/// The feed-forward's activation (`dense_act_fn`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Activation {
    Relu,
    /// `gelu_new`: the tanh approximation, which T5 v1.1 (SD3's and FLUX's) uses.
    GeluTanh,
    Silu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::GeluTanh => gelu_tanh(x),
            Self::Silu => silu(x),
        }
    }
}

#[derive(Debug, Clone)]
struct T5Config {
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    num_heads: usize,
    num_buckets: usize,
    max_distance: usize,
    eps: f64,
    gated: bool,
    activation: Activation,
}

impl T5Config {
    fn load(path: &Path) -> Result<Self> {
        let c = Config::load(path)?;
        // transformers: `feed_forward_proj` is "ACT" or "gated-ACT"; "gated-gelu" means `gelu_new`.
        let proj = c.str_or("feed_forward_proj", "relu")?;
        let (gated, act) = match proj.strip_prefix("gated-") {
            Some(act) => (true, act),
            None => (false, proj),
        };
        let default_act = if proj == "gated-gelu" { "gelu_new" } else { act };
        let activation = match c.str_or("dense_act_fn", default_act)? {
            "relu" => Activation::Relu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            other => return Err(PipelineError::config(path, format!("dense_act_fn {other:?} is not supported (relu, gelu_new, silu)"))),
        };
        let config = Self {
            vocab_size: c.usize("vocab_size")?,
            d_model: c.usize("d_model")?,
            d_kv: c.usize("d_kv")?,
            d_ff: c.usize("d_ff")?,
            num_layers: c.usize("num_layers")?,
            num_heads: c.usize("num_heads")?,
            num_buckets: c.usize_or("relative_attention_num_buckets", 32)?,
            max_distance: c.usize_or("relative_attention_max_distance", 128)?,
            eps: c.f64_or("layer_norm_epsilon", 1e-6)?,
            gated,
            activation,
        };
        if config.d_model == 0 || config.d_kv == 0 || config.num_heads == 0 {
            return Err(PipelineError::config(path, "d_model, d_kv and num_heads must be positive"));
        }
        // Half the buckets per direction, half of those exact: the log-spaced rest needs at least one.
        if config.num_buckets < 4 || config.max_distance <= config.num_buckets / 4 {
            return Err(PipelineError::config(
                path,
                "relative_attention_num_buckets must be at least 4 and relative_attention_max_distance above a quarter of it",
            ));
        }
        Ok(config)
    }

    /// transformers' `_relative_position_bucket` for an encoder (bidirectional): `[N, N]` bucket indices,
    /// key position minus query position, with the logarithm in f32 and truncation as it computes them.
    fn buckets(&self, n: usize) -> Vec<u32> {
        let half = self.num_buckets / 2;
        let exact = half / 2;
        let log_span = (self.max_distance as f32 / exact as f32).ln();
        let bucket = |rel: i64| {
            let side = if rel > 0 { half } else { 0 };
            let distance = rel.unsigned_abs() as usize;
            let within = if distance < exact {
                distance
            } else {
                let log = ((distance as f32 / exact as f32).ln() / log_span * (half - exact) as f32) as usize;
                (exact + log).min(half - 1)
            };
            (side + within) as u32
        };
        (0..n).flat_map(|q| (0..n).map(move |k| bucket(k as i64 - q as i64))).collect()
    }
}

enum FeedForward {
    Plain { wi: Linear, wo: Linear },
    Gated { wi_0: Linear, wi_1: Linear, wo: Linear },
}

struct Block {
    attention_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ff_norm: RmsNorm,
    ff: FeedForward,
    heads: usize,
    activation: Activation,
}

impl Block {
    fn new(c: &T5Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (attention, ff) = (vb.pp("layer.0"), vb.pp("layer.1"));
        let sa = attention.pp("SelfAttention");
        let inner = c.num_heads * c.d_kv;
        let dense = ff.pp("DenseReluDense");
        Ok(Self {
            // T5's layer norm is an RMS norm: a scale, no shift, no mean subtracted, statistics in f32.
            attention_norm: rms_norm(c.d_model, c.eps, attention.pp("layer_norm"))?,
            q: linear_no_bias(c.d_model, inner, sa.pp("q"))?,
            k: linear_no_bias(c.d_model, inner, sa.pp("k"))?,
            v: linear_no_bias(c.d_model, inner, sa.pp("v"))?,
            o: linear_no_bias(inner, c.d_model, sa.pp("o"))?,
            ff_norm: rms_norm(c.d_model, c.eps, ff.pp("layer_norm"))?,
            ff: if c.gated {
                FeedForward::Gated {
                    wi_0: linear_no_bias(c.d_model, c.d_ff, dense.pp("wi_0"))?,
                    wi_1: linear_no_bias(c.d_model, c.d_ff, dense.pp("wi_1"))?,
                    wo: linear_no_bias(c.d_ff, c.d_model, dense.pp("wo"))?,
                }
            } else {
                FeedForward::Plain {
                    wi: linear_no_bias(c.d_model, c.d_ff, dense.pp("wi"))?,
                    wo: linear_no_bias(c.d_ff, c.d_model, dense.pp("wo"))?,
                }
            },
            heads: c.num_heads,
            activation: c.activation,
        })
    }

    /// `bias`: the `[heads, N, N]` position bias, which T5 adds to unscaled scores.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.attention_norm.forward(x)?;
        let heads = |proj: &Linear| split_heads(&proj.forward(&h)?, self.heads);
        let a = biased_attention(&heads(&self.q)?, &heads(&self.k)?, &heads(&self.v)?, 1.0, bias)?;
        let x = (x + self.o.forward(&merge_heads(&a)?)?)?;
        let h = self.ff_norm.forward(&x)?;
        let ff = match &self.ff {
            FeedForward::Plain { wi, wo } => wo.forward(&self.activation.apply(&wi.forward(&h)?)?)?,
            FeedForward::Gated { wi_0, wi_1, wo } => wo.forward(&(self.activation.apply(&wi_0.forward(&h)?)? * wi_1.forward(&h)?)?)?,
        };
        x + ff
    }
}

pub struct T5Encoder {
    config: T5Config,
    embed: Embedding,
    /// `[buckets, heads]`: block 0's relative-attention table, which every block uses.
    position_table: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    pub d_model: usize,
}

impl T5Encoder {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = T5Config::load(&dir.join("config.json"))?;
        let weights = Weights::load(dir, dtype, device)?;
        let vb = &weights.vb;
        let c = &config;
        // The token table is `shared` (tied with the decoder's); encoder-only exports may name it
        // `encoder.embed_tokens` instead.
        let table = if vb.contains_tensor("shared.weight") { vb.pp("shared") } else { vb.pp("encoder.embed_tokens") };
        let embed = weights.context(embedding(c.vocab_size, c.d_model, table))?;
        let enc = vb.pp("encoder");
        let position_table =
            weights.context(enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias").get((c.num_buckets, c.num_heads), "weight"))?;
        let blocks = (0..c.num_layers).map(|i| weights.context(Block::new(c, enc.pp(format!("block.{i}"))))).collect::<Result<_>>()?;
        let final_norm = weights.context(rms_norm(c.d_model, c.eps, enc.pp("final_layer_norm")))?;
        Ok(Self { d_model: c.d_model, config, embed, position_table, blocks, final_norm })
    }

    /// `[B, N]` token ids → last hidden states `[B, N, d_model]` (no attention mask, as diffusers runs it).
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let n = ids.first().map(Vec::len).unwrap_or(0);
        if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(PipelineError::param("prompt", format!("token id {bad} is outside the T5 vocabulary")));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (ids.len(), n), device)?;
        let mut x = self.embed.forward(&input)?;
        let buckets = Tensor::from_vec(self.config.buckets(n), n * n, device)?;
        // `[N·N, heads]` rows of the table → `[heads, N, N]`.
        let bias = self
            .position_table
            .index_select(&buckets, 0)?
            .t()?
            .contiguous()?
            .reshape((self.config.num_heads, n, n))?
            .to_dtype(x.dtype())?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        Ok(self.final_norm.forward(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(num_buckets: usize, max_distance: usize) -> T5Config {
        T5Config {
            vocab_size: 1,
            d_model: 1,
            d_kv: 1,
            d_ff: 1,
            num_layers: 0,
            num_heads: 1,
            num_buckets,
            max_distance,
            eps: 1e-6,
            gated: false,
            activation: Activation::Relu,
        }
    }

    #[test]
    fn unsupported_configs_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        let base = r#""vocab_size": 10, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2"#;
        for (extra, what) in [
            (r#", "feed_forward_proj": "gated-gelu""#, None),
            (r#", "dense_act_fn": "gelu_fast""#, Some("dense_act_fn")),
            (r#", "relative_attention_num_buckets": 2"#, Some("num_buckets")),
        ] {
            std::fs::write(&path, format!("{{{base}{extra}}}")).expect("write");
            match (T5Config::load(&path), what) {
                (Ok(c), None) => assert!(c.gated && c.activation == Activation::GeluTanh),
                (Err(e), Some(what)) => assert!(e.to_string().contains(what) && e.to_string().contains("config.json"), "{e}"),
                (r, _) => panic!("{extra}: {:?}", r.map(|c| c.activation)),
            }
        }
    }

    /// transformers' buckets for 32 buckets and distance 128 (values from its `_relative_position_bucket`):
    /// keys behind the query in 0..16, ahead in 16..32; exact up to 7 positions, log-spaced beyond.
    #[test]
    fn buckets_follow_transformers() {
        let c = config(32, 128);
        let row = |q: usize, n: usize| c.buckets(n)[q * n..(q + 1) * n].to_vec();
        assert_eq!(row(0, 8), [0, 17, 18, 19, 20, 21, 22, 23]);
        assert_eq!(row(7, 8), [7, 6, 5, 4, 3, 2, 1, 0]);
        let far = row(0, 300);
        assert_eq!(&far[8..12], [24, 24, 24, 24], "distance 8-11: log2(d/8)·8/4 < 1");
        assert_eq!(far[16], 26);
        assert_eq!(far[127], 31);
        assert_eq!(far[299], 31, "capped");
        assert_eq!(row(299, 300)[0], 15, "capped behind");
    }
}
