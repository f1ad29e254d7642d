//! Widening a trained autoencoder's full-resolution level without changing what it computes (Net2Net,
//! Chen et al. 2016): each channel of the level is duplicated and every weight that reads the level is
//! split between the two copies. The encoder's latents stay what the U-Nets learnt, so a decoder with
//! twice the channels where small shapes are drawn can be tuned under finished U-Nets, where training a
//! wider autoencoder from scratch would mean training the U-Nets again.
//!
//! The encoder's splits are halves, exact in f16. The decoder's are drawn per weight (a share in
//! [0.25, 0.75] and the rest): the copies start equal, but their gradients differ, so training can pull
//! them apart; equal halves would keep the two copies identical forever.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{save_f16, write_json};
use crate::error::{Result, TinyError};
use crate::rng::Rng;

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// How the widened level's channels map back to the old ones. GroupNorm must see the same statistics,
/// so each new group holds one old group twice over: new group `g` is old group `g`'s channels, then
/// the same again.
struct Duplication {
    /// The old channel each new channel copies.
    source: Vec<u32>,
    /// Whether a new channel is the first of its pair (the one a split's drawn share goes to).
    first: Vec<bool>,
}

impl Duplication {
    fn new(old: usize, groups: usize) -> Self {
        let size = old / groups;
        let (source, first) = (0..2 * old)
            .map(|n| {
                let (group, r) = (n / (2 * size), n % (2 * size));
                ((group * size + r % size) as u32, r < size)
            })
            .unzip();
        Self { source, first }
    }

    fn index(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::new(self.source.as_slice(), device)?)
    }
}

/// The tensors of a `vae/` folder in f32, taken out by name as they are rewritten.
struct Tensors {
    map: HashMap<String, Tensor>,
    path: std::path::PathBuf,
    dup: Duplication,
    index: Tensor,
    rng: Rng,
}

impl Tensors {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        let t = self.map.remove(name).ok_or_else(|| TinyError::Invalid(format!("{}: no tensor {name}", self.path.display())))?;
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Duplicates the output channels (dimension 0) of `name`'s weight, bias, or norm scale and shift.
    fn widen_out(&mut self, name: &str) -> Result<()> {
        let t = self.take(name)?.index_select(&self.index, 0)?;
        self.map.insert(name.to_string(), t);
        Ok(())
    }

    /// Splits the input channels (dimension 1) of the weight `name` between the copies: halves, or for
    /// `drawn` a random share per weight to the first copy and the rest to the second.
    fn widen_in(&mut self, name: &str, drawn: bool) -> Result<()> {
        let t = self.take(name)?;
        let share = if drawn {
            let v: Vec<f32> = (0..t.elem_count()).map(|_| self.rng.range(0.25, 0.75) as f32).collect();
            Tensor::from_vec(v, t.dims(), t.device())?
        } else {
            t.ones_like()?.affine(0.5, 0.0)?
        };
        let (a, b) = (share.index_select(&self.index, 1)?, share.affine(-1.0, 1.0)?.index_select(&self.index, 1)?);
        let mut shape = vec![1; t.rank()];
        shape[1] = self.dup.first.len();
        let first: Vec<f32> = self.dup.first.iter().map(|&f| f32::from(u8::from(f))).collect();
        let first = Tensor::from_vec(first, shape, t.device())?;
        let share = (a.broadcast_mul(&first)? + b.broadcast_mul(&first.affine(-1.0, 1.0)?)?)?;
        let t = (t.index_select(&self.index, 1)? * share)?;
        self.map.insert(name.to_string(), t);
        Ok(())
    }

    /// A resnet's conv and norms inside the widened level (input and output both in it).
    fn widen_resnet(&mut self, prefix: &str, drawn: bool) -> Result<()> {
        for norm in ["norm1", "norm2"] {
            self.widen_out(&format!("{prefix}.{norm}.weight"))?;
            self.widen_out(&format!("{prefix}.{norm}.bias"))?;
        }
        for conv in ["conv1", "conv2"] {
            self.widen_conv(&format!("{prefix}.{conv}"), drawn)?;
        }
        Ok(())
    }

    fn widen_conv(&mut self, prefix: &str, drawn: bool) -> Result<()> {
        self.widen_out(&format!("{prefix}.weight"))?;
        self.widen_out(&format!("{prefix}.bias"))?;
        self.widen_in(&format!("{prefix}.weight"), drawn)
    }

    /// The 1×1 shortcut of a resnet whose input (`into` false) or output (`into` true) is the widened
    /// level and whose other side is `other` channels wide. Before widening, the two sides were equal and
    /// the shortcut an identity, which diffusers leaves out; now the sides differ, so it is written as
    /// the identity it was: each copy from its source channel, or into it at half weight each.
    fn shortcut(&mut self, prefix: &str, other: usize, into: bool) -> Result<()> {
        let (weight, bias) = (format!("{prefix}.conv_shortcut.weight"), format!("{prefix}.conv_shortcut.bias"));
        let wide = self.dup.source.len();
        let (rows, cols) = if into { (wide, other) } else { (other, wide) };
        let mut w = vec![0f32; rows * cols];
        for (n, &c) in self.dup.source.iter().enumerate() {
            let (row, col, value) = if into { (n, c as usize, 1.0) } else { (c as usize, n, 0.5) };
            w[row * cols + col] = value;
        }
        let device = self.index.device().clone();
        self.map.insert(weight, Tensor::from_vec(w, (rows, cols, 1, 1), &device)?);
        self.map.insert(bias, Tensor::zeros(rows, DType::F32, &device)?);
        Ok(())
    }
}

fn config_usizes(config: &Value, key: &str, path: &Path) -> Result<Vec<usize>> {
    let bad = || TinyError::Invalid(format!("{}: {key} missing or not a list of counts", path.display()));
    match &config[key] {
        Value::Array(items) => items.iter().map(|v| v.as_u64().map(|n| n as usize).ok_or_else(bad)).collect(),
        Value::Number(n) => n.as_u64().map(|n| vec![n as usize]).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// Doubles the channels of the full-resolution level of the autoencoder in `vae_dir`, both halves, in
/// place: the config's first block width and every tensor that reads or writes that level. Encoding is
/// unchanged and decoding too, up to the f16 rounding of the decoder's drawn splits. The level must be
/// as wide as the next one (as fresco-tiny's 16, 16, 32, 32), so that its resnets had no shortcuts.
pub fn widen_full_resolution(vae_dir: &Path, seed: u64) -> Result<()> {
    let config_path = vae_dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| TinyError::io(&config_path, e))?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| TinyError::Invalid(format!("{}: {e}", config_path.display())))?;
    let widths = config_usizes(&config, "block_out_channels", &config_path)?;
    let groups = config_usizes(&config, "norm_num_groups", &config_path)?[0];
    let layers = config_usizes(&config, "layers_per_block", &config_path)?[0];
    let (old, next) = match widths.as_slice() {
        [old, next, ..] if groups > 0 && old % groups == 0 && old == next => (*old, *next),
        _ => {
            return Err(TinyError::Invalid(format!(
                "{}: block_out_channels {widths:?} with {groups} groups: widening needs the first level as wide as the second \
                 (so that neither half has a shortcut between them yet) and a multiple of the groups",
                config_path.display()
            )))
        }
    };
    let path = vae_dir.join(WEIGHTS);
    let device = Device::Cpu;
    let map = candle_core::safetensors::load(&path, &device).map_err(|e| TinyError::Invalid(format!("{}: {e}", path.display())))?;
    let dup = Duplication::new(old, groups);
    let index = dup.index(&device)?;
    let mut t = Tensors { map, path: path.clone(), dup, index, rng: Rng::new(seed).fork(11) };

    // Encoder: conv_in writes the level, its block's resnets and downsampler stay in it, and the next
    // block's first resnet reads it.
    t.widen_out("encoder.conv_in.weight")?;
    t.widen_out("encoder.conv_in.bias")?;
    for j in 0..layers {
        t.widen_resnet(&format!("encoder.down_blocks.0.resnets.{j}"), false)?;
    }
    t.widen_conv("encoder.down_blocks.0.downsamplers.0.conv", false)?;
    let reader = "encoder.down_blocks.1.resnets.0";
    t.widen_out(&format!("{reader}.norm1.weight"))?;
    t.widen_out(&format!("{reader}.norm1.bias"))?;
    t.widen_in(&format!("{reader}.conv1.weight"), false)?;
    t.shortcut(reader, next, false)?;

    // Decoder: the last up block's first resnet writes the level, the rest of it and the output norm
    // stay in it, and conv_out reads it.
    let last = format!("decoder.up_blocks.{}", widths.len() - 1);
    let writer = format!("{last}.resnets.0");
    t.widen_out(&format!("{writer}.conv1.weight"))?;
    t.widen_out(&format!("{writer}.conv1.bias"))?;
    t.widen_out(&format!("{writer}.norm2.weight"))?;
    t.widen_out(&format!("{writer}.norm2.bias"))?;
    t.widen_conv(&format!("{writer}.conv2"), true)?;
    t.shortcut(&writer, next, true)?;
    for j in 1..=layers {
        t.widen_resnet(&format!("{last}.resnets.{j}"), true)?;
    }
    t.widen_out("decoder.conv_norm_out.weight")?;
    t.widen_out("decoder.conv_norm_out.bias")?;
    t.widen_in("decoder.conv_out.weight", true)?;

    save_f16(t.map.into_iter().collect(), &path)?;
    config["block_out_channels"][0] = Value::from(2 * old);
    write_json(&config_path, &config)
}

#[cfg(test)]
mod tests {
    use candle_nn::{VarBuilder, VarMap};
    use fresco_pipeline::models::vae::{VaeConfig, VaeDecoder, VaeEncoder};

    use super::*;
    use crate::arch::Arch;
    use crate::train::{sorted_vars, var_tensors};

    #[test]
    fn each_new_group_holds_one_old_group_twice() {
        let d = Duplication::new(8, 2);
        assert_eq!(d.source, [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]);
        assert_eq!(d.first, [[true; 4], [false; 4]].concat().repeat(2));
    }

    /// A test-architecture autoencoder with every weight drawn (norms and biases included, which a fresh
    /// initialisation leaves at one and zero and so would not tell a wrong duplication apart).
    fn random_vae(dir: &Path) -> Result<()> {
        let arch = Arch::test();
        write_json(&dir.join("config.json"), &arch.vae_config(1.3))?;
        let cfg = VaeConfig::load(&dir.join("config.json"))?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        VaeEncoder::new(cfg.clone(), vb.clone())?;
        VaeDecoder::new(cfg, vb)?;
        let mut rng = Rng::new(5);
        for (name, var) in sorted_vars(&varmap) {
            let fan_in: usize = var.dims().iter().skip(1).product::<usize>().max(1);
            let (base, std) = if name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name.contains("norm_out.weight") {
                (1.0, 0.3)
            } else {
                (0.0, (1.0 / fan_in as f64).sqrt())
            };
            let values: Vec<f32> = (0..var.elem_count()).map(|_| (base + std * rng.normal()) as f32).collect();
            var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu)?)?;
        }
        save_f16(var_tensors(&varmap), &dir.join(WEIGHTS))
    }

    fn round_trip(dir: &Path, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let encoder = VaeEncoder::load(dir, DType::F32, &Device::Cpu)?;
        let decoder = VaeDecoder::load(dir, DType::F32, &Device::Cpu)?;
        let (mean, _) = encoder.encode(images)?;
        let z = encoder.scale(&mean)?;
        let decoded = decoder.decode(&z)?;
        Ok((z, decoded))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn widening_keeps_the_latents_and_the_images() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| TinyError::io(Path::new("tempdir"), e))?;
        random_vae(dir.path())?;
        let mut rng = Rng::new(9);
        let images =
            Tensor::from_vec((0..2 * 3 * 32 * 32).map(|_| rng.range(-1.0, 1.0) as f32).collect::<Vec<_>>(), (2, 3, 32, 32), &Device::Cpu)?;
        let (z, decoded) = round_trip(dir.path(), &images)?;

        widen_full_resolution(dir.path(), 3)?;
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["block_out_channels"], serde_json::json!([16, 8, 8, 8]));
        let (z2, decoded2) = round_trip(dir.path(), &images)?;
        assert!(max_diff(&z, &z2) < 1e-4, "latents moved by {}", max_diff(&z, &z2));
        // The decoder's drawn splits are rounded to f16: a thousandth of each weight.
        assert!(max_diff(&decoded, &decoded2) < 2e-2, "images moved by {}", max_diff(&decoded, &decoded2));
        assert!(max_diff(&decoded, &Tensor::zeros_like(&decoded)?) > 0.1, "the decoder draws nothing to compare");

        // The two copies of a channel read the level with different weights, so training can part them.
        let weights = candle_core::safetensors::load(dir.path().join(WEIGHTS), &Device::Cpu).unwrap();
        let out = weights["decoder.conv_out.weight"].to_dtype(DType::F32)?;
        let (copy_a, copy_b) = (out.narrow(1, 0, 1)?, out.narrow(1, 2, 1)?);
        assert!(max_diff(&copy_a, &copy_b) > 1e-3);
        Ok(())
    }

    #[test]
    fn a_level_wider_than_the_next_is_refused_and_left_alone() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| TinyError::io(Path::new("tempdir"), e))?;
        random_vae(dir.path())?;
        widen_full_resolution(dir.path(), 3)?;
        let before = std::fs::read(dir.path().join(WEIGHTS)).unwrap();
        let err = widen_full_resolution(dir.path(), 3).unwrap_err().to_string();
        assert!(err.contains("block_out_channels [16, 8, 8, 8]") && err.contains("as wide as the second"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(WEIGHTS)).unwrap(), before);
        Ok(())
    }
}
