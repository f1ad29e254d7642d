//! T5 encoder (SD3's third text encoder, FLUX's second), from the component's `config.json`. candle's
//! implementation reads transformers' layout and keys directly.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::t5;

use crate::error::{PipelineError, Result};
use crate::loader::{read_json, Weights};

pub struct T5Encoder {
    // candle's forward takes &mut self; a pipeline is shared between threads.
    model: Mutex<t5::T5EncoderModel>,
    pub d_model: usize,
    vocab_size: usize,
}

impl T5Encoder {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let path = dir.join("config.json");
        let config: t5::Config = read_json(&path)?;
        if config.d_model == 0 || config.num_heads == 0 {
            return Err(PipelineError::config(&path, "d_model and num_heads must be positive"));
        }
        let weights = Weights::load(dir, dtype, device)?;
        let model = weights.context(t5::T5EncoderModel::load(weights.vb.clone(), &config))?;
        Ok(Self { model: Mutex::new(model), d_model: config.d_model, vocab_size: config.vocab_size })
    }

    /// `[B, N]` token ids → last hidden states `[B, N, d_model]` (no attention mask, as diffusers runs it).
    pub fn forward(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let n = ids.first().map(Vec::len).unwrap_or(0);
        if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= self.vocab_size) {
            return Err(PipelineError::param("prompt", format!("token id {bad} is outside the T5 vocabulary")));
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (ids.len(), n), device)?;
        let mut model = self.model.lock().unwrap_or_else(|p| p.into_inner());
        Ok(model.forward(&input)?)
    }
}
