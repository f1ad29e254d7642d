//! Training both fresco-tiny variants with candle, on the CPU by default (a CUDA device where fresco is
//! built with `--features cuda`). Every random draw (initial weights, data, noise, timesteps) comes from
//! one seed through [`Rng`] on the host, so a run is repeatable on a machine with the same thread count
//! and device.
//!
//! Order: the autoencoder and the text encoder first (each shared by both variants), then per variant the
//! U-Net, on latents of a pool of rendered scenes encoded once by the frozen autoencoder and prompts
//! encoded once by the frozen text encoder; last, per variant, the decoder tuned on its U-Net's samples.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use fresco_pipeline::models::clip::ClipTextModel;
use fresco_pipeline::models::unet::{UNet, UNetConfig};
use fresco_pipeline::models::vae::{VaeConfig, VaeDecoder, VaeEncoder};
use fresco_pipeline::schedulers::static_shift;
use fresco_pipeline::tokenizer::PromptTokenizer;
use fresco_pipeline::{DeviceSpec, InitLatents, Pipeline, Request};

use crate::arch::{self, Arch, Variant};
use crate::error::{Result, TinyError};
use crate::render::{paint_scene, sample_layout, Image, Placed};
use crate::rng::Rng;

mod layout;
mod text;

use layout::{Auxiliary, Level, Target};
pub use text::train_text_encoder;

/// One optimisation run: steps, batch and peak learning rate (linear warm-up, cosine decay to a tenth).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
}

impl Schedule {
    fn lr_at(&self, step: usize) -> f64 {
        let warmup = (self.steps / 20).clamp(1, 200);
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let p = (step - warmup) as f64 / (self.steps - warmup).max(1) as f64;
        self.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub seed: u64,
    pub arch: Arch,
    /// The autoencoder, both halves together, on crops.
    pub vae: Schedule,
    /// The text encoder, before the denoisers ([`train_text_encoder`]).
    pub text: Schedule,
    /// The decoder alone afterwards, encoder frozen, on whole scenes ([`train_decoder`]).
    pub decoder: Schedule,
    pub denoiser: Schedule,
    /// Each model's decoder tuned on its own U-Net's samples, last ([`tune_decoder`]; 0 steps: not at
    /// all). 16,000 steps gave fresco-tiny 73.6% → 79.2% of one-object and 34.2% → 38.4% of two-object
    /// prompts right, fresco-tiny-flow 64.0% → 73.6% and 27.8% → 33.2%; 8,000 gave 76.8% / 39.0% and
    /// 73.4% / 32.0% (models/NOTEBOOK.md).
    pub tune: Schedule,
    /// Scenes sampled once for the decoder's tuning.
    pub tune_pool: usize,
    /// The largest share of its schedule a tuning sample runs (diffusers' img2img strength), in (0, 1].
    /// 0.6 starts at most from σ ≈ 0.67 (flow) or t = 600 (diffusion), below which a denoiser keeps the
    /// scene's layout (models/NOTEBOOK.md, "Where adherence is lost"): the sampled latent and the rendered
    /// scene show the same objects in the same places, and differ in the drawing. 0.8 gave fresco-tiny
    /// 77.2% / 36.6% at 8,000 steps, within the spread of 0.6's 76.8% / 39.0%; 0.75 at 16,000 steps lost
    /// 1.6 / 1.2 and 2.6 / 1.6 points against 0.6 on session 31's U-Nets.
    pub tune_strength: f64,
    /// Rendered scenes encoded once for denoiser training.
    pub pool: usize,
    /// Fraction of training prompts replaced by "" so classifier-free guidance has an unconditional model.
    pub uncond_fraction: f64,
    /// [`LATENT_NOISE`], or 0 to train the autoencoder on its posterior alone.
    pub latent_noise: f64,
    /// The flow variant's noise levels are drawn, then shifted by this toward noise
    /// ([`static_shift`]; 1 leaves them as drawn); its scheduler config states the same shift. The default,
    /// 2, trains on twice as many of the high noise levels where counts, shapes and places are settled:
    /// 36% → 46% of one-object prompts right in a full run (models/NOTEBOOK.md).
    pub flow_shift: f64,
    /// The diffusion variant's last beta (scaled-linear from [`arch::BETA_START`]); its scheduler config
    /// states the same. The default, 0.010, puts more of the training at the middle noise levels where
    /// shapes and counts are drawn than Stable Diffusion's 0.012 does: 62.0% → 66.6% of one-object prompts
    /// right at full length, where 0.02 and 0.03 gave 52% and 49%, and 0.008 and 0.006 64% and 58%
    /// (models/NOTEBOOK.md).
    pub beta_end: f64,
    /// Weight of the denoisers' auxiliary layout loss ([`layout`]), or 0 to train on denoising alone.
    /// The default, 0.25, gave fresco-tiny 66.6% → 73.6% of one-object and 18.2% → 34.2% of two-object
    /// prompts right at full length, fresco-tiny-flow 61.2% → 64.0% and 20.0% → 27.8%; weights of 0.1 and 1
    /// gave fresco-tiny 73.2% / 27.4% and 71.4% / 27.0% (models/NOTEBOOK.md).
    pub layout_weight: f64,
    /// The layout loss maps each latent cell as this many sub-cells a side (1, 2, 4 or 8: a latent cell is
    /// 8 pixels wide), fine enough to tell a small square's corners from a small circle's rim. 2 and 4
    /// gave fresco-tiny 74.0% / 37.0% and 72.0% / 35.6%, within the spread of 1's 73.6% / 34.2%
    /// (models/NOTEBOOK.md), so 1 stays.
    pub layout_subcells: usize,
    /// Weight of a second layout loss, on the U-Net's last up block (the latent's own cells), mapping
    /// each latent cell as [`TOP_SUBCELLS`]² sub-cells: where the mid block's map names what each cell
    /// holds, this one asks the level that draws for the outline (a square's corners, a circle's rim), at
    /// every noise level. 0 leaves it out. The default, 0.25, gave fresco-tiny 38.4% → 44.6% and
    /// fresco-tiny-flow 33.2% → 39.2% of two-object prompts right, one-object ones within the spread
    /// (79.2% → 78.0%, 73.6% → 75.0%; both with their decoders tuned; models/NOTEBOOK.md).
    pub layout_top_weight: f64,
    /// Weight of a third auxiliary loss, on the mid block beside the layout map: which latent cell each
    /// object is centred in ([`crate::render::centre_map`]), as CenterNet's heatmap counts objects.
    /// Coverage tells one large object from two small ones only through the area; a centre map names
    /// each object once, and wrong counts were, after wrong shapes, the largest failure left. 0 leaves it
    /// out. The default, 0.25, gave fresco-tiny 78.0% → 79.2% of one-object and 44.6% → 46.0% of
    /// two-object prompts right, fresco-tiny-flow 75.0% → 77.2% and 39.2% → 43.8%, wrong counts down by
    /// a sixth (both with their decoders tuned; models/NOTEBOOK.md). All three heads at 0.5 gave 76.4% /
    /// 43.4% and 76.6% / 45.2%.
    pub layout_centre_weight: f64,
    /// Start each U-Net from the weights already in its model folder (`unet/`) instead of a fresh
    /// initialisation, and train it for [`TrainOptions::denoiser`] more steps on a schedule of its own:
    /// a run that continues an earlier one, for as long again as a CPU hour allows. The committed U-Nets
    /// had a second, a third and a fourth hour this way, each worth less than the one before (models/NOTEBOOK.md).
    pub resume: bool,
    pub device: DeviceSpec,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            arch: Arch::default(),
            vae: Schedule { steps: 6000, batch: 8, lr: 2e-3 },
            text: Schedule { steps: 2000, batch: 64, lr: 1e-3 },
            decoder: Schedule { steps: 16000, batch: 2, lr: 1e-3 },
            denoiser: Schedule { steps: 17000, batch: 32, lr: 1e-3 },
            tune: Schedule { steps: 16000, batch: 2, lr: 5e-4 },
            tune_pool: 8192,
            tune_strength: 0.6,
            pool: 24576,
            uncond_fraction: 0.1,
            latent_noise: LATENT_NOISE,
            flow_shift: 2.0,
            beta_end: 0.010,
            layout_weight: 0.25,
            layout_subcells: 1,
            layout_top_weight: 0.25,
            layout_centre_weight: 0.25,
            resume: false,
            device: DeviceSpec::Cpu,
        }
    }
}

impl TrainOptions {
    /// Checks every option of a training run, naming the field at fault. Each phase calls it before it
    /// trains or writes anything, so a value only a later phase reads fails before the earlier phases'
    /// minutes of training, not after them.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, problem: String| Err(TinyError::option(field, problem));
        for (batch, lr, s) in [
            ("vae.batch", "vae.lr", self.vae),
            ("text.batch", "text.lr", self.text),
            ("decoder.batch", "decoder.lr", self.decoder),
            ("denoiser.batch", "denoiser.lr", self.denoiser),
            ("tune.batch", "tune.lr", self.tune),
        ] {
            if s.batch == 0 {
                return bad(batch, "must be positive".into());
            }
            if !(s.lr.is_finite() && s.lr > 0.0) {
                return bad(lr, format!("{} given, must be positive", s.lr));
            }
        }
        if self.denoiser.steps < MIN_DENOISER_STEPS {
            return bad(
                "denoiser.steps",
                format!(
                    "{} given, at least {MIN_DENOISER_STEPS} needed (every parameter's gradient is checked on the second step)",
                    self.denoiser.steps
                ),
            );
        }
        for (field, n) in [("pool", self.pool), ("tune_pool", self.tune_pool)] {
            if n == 0 {
                return bad(field, "must be positive".into());
            }
        }
        if !(self.tune_strength > 0.0 && self.tune_strength <= 1.0) {
            return bad("tune_strength", format!("{} given, must lie in (0, 1]", self.tune_strength));
        }
        if !(0.0..1.0).contains(&self.uncond_fraction) {
            return bad("uncond_fraction", format!("{} given, must lie in [0, 1)", self.uncond_fraction));
        }
        if !(self.latent_noise.is_finite() && self.latent_noise >= 0.0) {
            return bad("latent_noise", format!("{} given, must be zero or positive", self.latent_noise));
        }
        if !(self.flow_shift.is_finite() && self.flow_shift > 0.0) {
            return bad("flow_shift", format!("{} given, must be positive", self.flow_shift));
        }
        // Above 1 a beta would make ᾱ negative; at or below the first beta the schedule would not rise.
        if !(self.beta_end > arch::BETA_START && self.beta_end < 1.0) {
            return bad("beta_end", format!("{} given, must lie between {} and 1", self.beta_end, arch::BETA_START));
        }
        if !(self.layout_weight.is_finite() && self.layout_weight >= 0.0) {
            return bad("layout_weight", format!("{} given, must be zero or positive", self.layout_weight));
        }
        if !(self.layout_top_weight.is_finite() && self.layout_top_weight >= 0.0) {
            return bad("layout_top_weight", format!("{} given, must be zero or positive", self.layout_top_weight));
        }
        if !(self.layout_centre_weight.is_finite() && self.layout_centre_weight >= 0.0) {
            return bad("layout_centre_weight", format!("{} given, must be zero or positive", self.layout_centre_weight));
        }
        if !(self.layout_subcells.is_power_of_two() && self.layout_subcells <= 8) {
            return bad(
                "layout_subcells",
                format!("{} given, must be 1, 2, 4 or 8 (a latent cell is 8 pixels wide)", self.layout_subcells),
            );
        }
        self.arch.validate()
    }
}

/// Called after every optimiser step: phase, step (from 1), steps, loss.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize, f32);

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TinyError::io(dir, e))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| TinyError::Invalid(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| TinyError::io(path, e))
}

/// Copies a file, doing nothing when `to` is `from` however the two are spelt (`models` and
/// `m/../models`): `fs::copy` onto the file itself truncates it first, and `fresco train` is often pointed
/// back at the folder it reads from (`--out models --unet-from models`).
pub fn copy_file(from: &Path, to: &Path) -> Result<()> {
    if same_place(from, to) {
        return Ok(());
    }
    std::fs::copy(from, to).map(drop).map_err(|e| TinyError::io(from, e))
}

fn same_place(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Writes a model folder's configs and copies the CLIP tokenizer (vocab.json + merges.txt) into it;
/// weights come from training.
pub fn write_skeleton(dir: &Path, variant: Variant, opts: &TrainOptions, tokenizer: &Path, steps: usize, guidance: f64) -> Result<()> {
    write_json(&dir.join("model_index.json"), &arch::model_index(variant, steps, guidance))?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &arch::scheduler_config(variant, opts.flow_shift, opts.beta_end))?;
    write_json(&dir.join("text_encoder/config.json"), &opts.arch.text_config())?;
    write_json(&dir.join("unet/config.json"), &opts.arch.unet_config())?;
    write_tokenizer(dir, opts, tokenizer)
}

/// Copies the CLIP tokenizer (vocab.json + merges.txt) into the model folder `dir`, with its length set
/// to the text encoder's positions.
fn write_tokenizer(dir: &Path, opts: &TrainOptions, tokenizer: &Path) -> Result<()> {
    let tok = dir.join("tokenizer");
    std::fs::create_dir_all(&tok).map_err(|e| TinyError::io(&tok, e))?;
    for f in ["vocab.json", "merges.txt", "special_tokens_map.json"] {
        copy_file(&tokenizer.join(f), &tok.join(f))?;
    }
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tokenizer.join("tokenizer_config.json"))
            .map_err(|e| TinyError::io(&tokenizer.join("tokenizer_config.json"), e))?,
    )
    .map_err(|e| TinyError::Invalid(format!("{}: {e}", tokenizer.join("tokenizer_config.json").display())))?;
    config["model_max_length"] = opts.arch.max_tokens.into();
    write_json(&tok.join("tokenizer_config.json"), &config)
}

/// Overwrites every variable with a seeded draw: norms' scales 1, biases 0, embeddings N(0, 0.02²),
/// the weights `zeroed` names 0, other weights N(0, 1/fan_in).
fn init_vars(varmap: &VarMap, rng: &Rng, zeroed: fn(&str) -> bool) -> Result<()> {
    let vars = sorted_vars(varmap);
    for (i, (name, var)) in vars.iter().enumerate() {
        let mut r = rng.fork(i as u64);
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if name.ends_with("bias") || zeroed(name) {
            vec![0.0; n]
        } else if name.contains("norm") {
            vec![1.0; n]
        } else if name.contains("embedding") {
            (0..n).map(|_| (0.02 * r.normal()) as f32).collect()
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let std = (1.0 / fan_in as f64).sqrt();
            (0..n).map(|_| (std * r.normal()) as f32).collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

/// A denoiser's training checks every parameter's gradient on its second step (see [`unet_zeroed`]).
pub const MIN_DENOISER_STEPS: usize = 2;

/// The U-Net's residual branches end at zero, as in ADM (`zero_module`): each resnet's second
/// convolution and each transformer's output projection. The network starts as its skip connections
/// alone and grows each branch from there, instead of starting as the sum of a dozen random functions
/// whose noise training must first unlearn (a proxy run's loss came out an eighth lower; models/NOTEBOOK.md).
fn unet_zeroed(name: &str) -> bool {
    name.ends_with("conv2.weight") || name.ends_with("proj_out.weight")
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// candle's fused softmax/LayerNorm kernels record no backward op; a parameter behind one would silently
/// never train. Every parameter must receive a non-zero gradient.
fn check_gradients(maps: &[&VarMap], grads: &candle_core::backprop::GradStore) -> Result<()> {
    let mut missing = Vec::new();
    for map in maps {
        for (name, var) in sorted_vars(map) {
            let ok = match grads.get(var.as_tensor()) {
                Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
                None => false,
            };
            if !ok {
                missing.push(name);
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(TinyError::Invalid(format!("parameters without a gradient: {}", missing.join(", "))))
    }
}

/// Saves tensors as f16 safetensors (half the size; the pipeline computes in f32).
fn save_f16(tensors: Vec<(String, Tensor)>, path: &Path) -> Result<()> {
    let mut out = HashMap::new();
    for (name, t) in tensors {
        out.insert(name, t.to_dtype(DType::F16)?.to_device(&Device::Cpu)?);
    }
    candle_core::safetensors::save(&out, path).map_err(|e| TinyError::Invalid(format!("{}: {e}", path.display())))
}

fn var_tensors(varmap: &VarMap) -> Vec<(String, Tensor)> {
    sorted_vars(varmap).into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()
}

/// The prompts of this world use a few dozen of CLIP's 49,408 tokens. Training keeps a compact table of
/// just those (a full-vocabulary embedding and its optimizer state would dominate every step) and the
/// saved encoder gets the full table back: trained rows for the used tokens, the seeded initial draw
/// for the rest.
struct CompactVocab {
    used: Vec<u32>,
    index: HashMap<u32, u32>,
}

impl CompactVocab {
    fn new(rows: &[Vec<u32>]) -> Self {
        let mut used: Vec<u32> = rows.iter().flatten().copied().collect();
        used.sort_unstable();
        used.dedup();
        let index = used.iter().enumerate().map(|(i, &t)| (t, i as u32)).collect();
        Self { used, index }
    }

    fn map(&self, row: &[u32]) -> Vec<u32> {
        row.iter().map(|t| self.index[t]).collect()
    }

    fn expand(&self, table: &Tensor, vocab: usize, rng: &Rng) -> Result<Tensor> {
        let hidden = table.dim(1)?;
        let mut r = rng.clone();
        let mut full: Vec<f32> = (0..vocab * hidden).map(|_| (0.02 * r.normal()) as f32).collect();
        let trained: Vec<Vec<f32>> = table.to_vec2()?;
        for (row, &token) in trained.iter().zip(&self.used) {
            let at = token as usize * hidden;
            full[at..at + hidden].copy_from_slice(row);
        }
        Ok(Tensor::from_vec(full, (vocab, hidden), table.device())?)
    }
}

fn images_tensor(images: &[Image], device: &Device) -> Result<Tensor> {
    let side = images.first().map_or(0, |i| i.side);
    let mut data = Vec::with_capacity(images.len() * 3 * side * side);
    for img in images {
        for c in 0..3 {
            data.extend((0..side * side).map(|i| img.rgb[3 * i + c] as f32 / 127.5 - 1.0));
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, side, side), device)?)
}

fn normal_tensor(rng: &mut Rng, dims: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    Ok(Tensor::from_vec((0..n).map(|_| rng.normal() as f32).collect::<Vec<_>>(), dims, device)?)
}

/// Layouts with one or two object phrases, half each, never from the held-out prompts.
fn training_layouts(rng: &mut Rng, n: usize) -> Vec<(crate::grammar::Prompt, Vec<Placed>)> {
    (0..n)
        .map(|_| {
            let objects = 1 + rng.below(2);
            sample_layout(rng, objects, false)
        })
        .collect()
}

/// [`training_layouts`] painted.
fn training_images(rng: &mut Rng, n: usize) -> Vec<Image> {
    painted(&training_layouts(rng, n))
}

fn painted(scenes: &[(crate::grammar::Prompt, Vec<Placed>)]) -> Vec<Image> {
    scenes.iter().map(|(p, shapes)| paint_scene(p, shapes)).collect()
}

/// The images' posterior means, scaled as the denoisers learn and produce latents.
fn encoded(encoder: &VaeEncoder, images: &[Image], device: &Device) -> Result<Tensor> {
    let (mean, _) = encoder.encode(&images_tensor(images, device)?)?;
    Ok(encoder.scale(&mean)?)
}

fn adamw(vars: Vec<Var>, lr: f64) -> Result<AdamW> {
    Ok(AdamW::new(vars, ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() })?)
}

const VAE_CROP: usize = 32;

fn crop(img: &Image, x0: usize, y0: usize, side: usize) -> Image {
    let mut rgb = Vec::with_capacity(side * side * 3);
    for y in y0..y0 + side {
        let start = 3 * (y * img.side + x0);
        rgb.extend_from_slice(&img.rgb[start..start + 3 * side]);
    }
    Image { side, rgb }
}

/// A draw from the encoder's diagonal Gaussian posterior.
fn posterior_sample(mean: &Tensor, logvar: &Tensor, noise: &mut Rng) -> Result<Tensor> {
    let eps = normal_tensor(noise, mean.dims(), mean.device())?;
    Ok((mean + (logvar.affine(0.5, 0.0)?.exp()? * eps)?)?)
}

/// The largest noise the decoder learns to read latents through, relative to their RMS; each sample
/// draws its level uniformly from zero up to this.
///
/// The posterior alone (σ ≈ 0.02 after training) let the encoder keep a shape's identity in small,
/// precise latent differences, which the denoisers could not reproduce: every generated shape came out
/// as the same rounded blob. Noise the decoder must see through forces circles, squares and triangles
/// apart by more than a denoiser's error, and teaches the decoder to draw clean shapes from slightly-off
/// latents. Relative to the RMS, so the encoder cannot escape it by scaling its latents up.
pub const LATENT_NOISE: f64 = 0.4;

/// `z` plus per-sample Gaussian noise of a level drawn from `[0, max)`, relative to the batch's RMS.
fn perturb(z: &Tensor, max: f64, noise: &mut Rng) -> Result<Tensor> {
    if max == 0.0 {
        // Draws nothing, so `--latent-noise 0` repeats a run from before the noise bitwise.
        return Ok(z.clone());
    }
    let levels: Vec<f64> = (0..z.dim(0)?).map(|_| max * noise.f64()).collect();
    let rms = z.sqr()?.mean_all()?.sqrt()?;
    let eps = normal_tensor(noise, z.dims(), z.device())?.broadcast_mul(&per_sample(&levels, z.device())?)?;
    Ok((z + eps.broadcast_mul(&rms)?)?)
}

/// Pixel L1 + L2, plus L1 of the difference of horizontal and vertical gradients: edges are few pixels,
/// and a pixel loss alone rounds every corner.
fn reconstruction_loss(decoded: &Tensor, target: &Tensor) -> Result<Tensor> {
    let diff = (decoded - target)?;
    let (h, w) = (diff.dim(2)?, diff.dim(3)?);
    let dx = (diff.narrow(3, 1, w - 1)? - diff.narrow(3, 0, w - 1)?)?;
    let dy = (diff.narrow(2, 1, h - 1)? - diff.narrow(2, 0, h - 1)?)?;
    Ok((((diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)? + dx.abs()?.mean_all()?)? + dy.abs()?.mean_all()?)?)
}

/// Trains the autoencoder into `dir` (config + weights); returns the latent scaling factor it chose.
pub fn train_vae(dir: &Path, opts: &TrainOptions, progress: Progress) -> Result<f64> {
    opts.validate()?;
    let device = opts.device.device()?;
    let config_path = dir.join("config.json");
    write_json(&config_path, &opts.arch.vae_config(1.0))?;
    let cfg = VaeConfig::load(&config_path)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let encoder = VaeEncoder::new(cfg.clone(), vb.clone())?;
    let decoder = VaeDecoder::new(cfg, vb)?;
    let seed = Rng::new(opts.seed).fork(1);
    init_vars(&varmap, &seed.fork(0), |_| false)?;
    // Start with a narrow posterior (σ ≈ 0.02): at σ = 1 the decoder first sees mostly noise, and the
    // small KL weight takes hundreds of steps to teach the encoder otherwise.
    if let Some(bias) = varmap.data().lock().unwrap_or_else(|p| p.into_inner()).get("quant_conv.bias") {
        let lc = opts.arch.latent_channels;
        let v: Vec<f32> = (0..2 * lc).map(|i| if i < lc { 0.0 } else { -8.0 }).collect();
        bias.set(&Tensor::from_vec(v, 2 * lc, &device)?)?;
    }
    let mut data = seed.fork(1);
    let mut noise = seed.fork(2);
    let s = opts.vae;
    let mut opt = adamw(varmap.all_vars(), s.lr)?;
    for step in 0..s.steps {
        opt.set_learning_rate(s.lr_at(step));
        let images = training_images(&mut data, s.batch);
        // A convolutional autoencoder learns as well from quarter crops (aligned to the latent grid) at a
        // quarter of the cost.
        let crops = images.iter().map(|img| crop(img, 8 * data.below(5), 8 * data.below(5), VAE_CROP)).collect::<Vec<_>>();
        let x = images_tensor(&crops, &device)?;
        let (mean, logvar) = encoder.encode(&x)?;
        let logvar = logvar.clamp(-20f32, 10f32)?;
        let z = perturb(&posterior_sample(&mean, &logvar, &mut noise)?, opts.latent_noise, &mut noise)?;
        let recon = reconstruction_loss(&decoder.decode(&z)?, &x)?;
        let kl = (((mean.sqr()? + logvar.exp()?)? - 1.0)? - &logvar)?.mean_all()?.affine(0.5, 0.0)?;
        let loss = (recon + kl.affine(1e-4, 0.0)?)?;
        let grads = loss.backward()?;
        if step == 0 {
            check_gradients(&[&varmap], &grads)?;
        }
        opt.step(&grads)?;
        progress("vae", step + 1, s.steps, loss.to_scalar::<f32>()?);
    }
    // Scale latents to unit variance, as SD's 0.18215 does for its autoencoder.
    let images = training_images(&mut data, 64);
    let (mean, _) = encoder.encode(&images_tensor(&images, &device)?)?;
    let std = mean.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()? as f64;
    let scaling = if std.is_finite() && std > 1e-6 { 1.0 / std } else { 1.0 };
    save_f16(var_tensors(&varmap), &dir.join("diffusion_pytorch_model.safetensors"))?;
    write_json(&config_path, &opts.arch.vae_config(scaling))?;
    Ok(scaling)
}

/// Trains the decoder of the trained autoencoder in `vae_dir` further, with the encoder frozen, on
/// whole scenes, and saves it in place. The latents the denoisers learn depend on the encoder alone, so
/// this can run beside their training; and the decoder, which has to draw sharp edges and corners out of
/// an 8×8 latent, is the half that needs the longer training.
pub fn train_decoder(vae_dir: &Path, opts: &TrainOptions, progress: Progress) -> Result<()> {
    opts.validate()?;
    let device = opts.device.device()?;
    let encoder = VaeEncoder::load(vae_dir, DType::F32, &device)?;
    let (varmap, decoder, saved) = trainable_decoder(vae_dir, &device)?;
    let seed = Rng::new(opts.seed).fork(4);
    let (mut data, mut noise) = (seed.fork(1), seed.fork(2));
    let s = opts.decoder;
    let mut opt = adamw(varmap.all_vars(), s.lr)?;
    for step in 0..s.steps {
        opt.set_learning_rate(s.lr_at(step));
        let images = training_images(&mut data, s.batch);
        let x = images_tensor(&images, &device)?;
        let (mean, logvar) = encoder.encode(&x)?;
        // The decoder reads scaled latents, as the denoisers produce them.
        let z = encoder.scale(&posterior_sample(&mean, &logvar.clamp(-20f32, 10f32)?, &mut noise)?)?;
        let z = perturb(&z, opts.latent_noise, &mut noise)?;
        let loss = reconstruction_loss(&decoder.decode(&z)?, &x)?;
        opt.step(&loss.backward()?)?;
        progress("decoder", step + 1, s.steps, loss.to_scalar::<f32>()?);
    }
    save_decoder(vae_dir, &varmap, saved)
}

/// The trainable decoder of the autoencoder in `vae_dir`, started from its saved weights, and the
/// folder's other tensors (the encoder's), which the save writes back unchanged.
fn trainable_decoder(vae_dir: &Path, device: &Device) -> Result<(VarMap, VaeDecoder, HashMap<String, Tensor>)> {
    let varmap = VarMap::new();
    let decoder = VaeDecoder::new(VaeConfig::load(&vae_dir.join("config.json"))?, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let saved = load_vars(&varmap, &vae_dir.join("diffusion_pytorch_model.safetensors"), device)?;
    Ok((varmap, decoder, saved))
}

/// Sets every variable of `varmap` from the safetensors file at `path` (saved in f16 or f32), and returns
/// the file's tensors no variable took.
fn load_vars(varmap: &VarMap, path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let invalid = |e: String| TinyError::Invalid(format!("{}: {e}", path.display()));
    let mut saved = candle_core::safetensors::load(path, device).map_err(|e| invalid(e.to_string()))?;
    for (name, var) in sorted_vars(varmap) {
        let t = saved.remove(&name).ok_or_else(|| invalid(format!("no tensor {name}")))?;
        var.set(&t.to_dtype(DType::F32)?).map_err(|e| invalid(format!("{name}: {e}")))?;
    }
    Ok(saved)
}

/// Saves a decoder with the tensors [`trainable_decoder`] left aside (the encoder's), unchanged.
fn save_decoder(vae_dir: &Path, varmap: &VarMap, saved: HashMap<String, Tensor>) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = saved.into_iter().collect();
    tensors.extend(var_tensors(varmap));
    save_f16(tensors, &vae_dir.join("diffusion_pytorch_model.safetensors"))
}

/// Tunes the decoder of the finished model folder `dir` on its own denoiser's latents: training scenes
/// are encoded, noised part of the way up the model's schedule and sampled back down by the model (its
/// default steps, guidance and scheduler), and the decoder learns to draw the scene from where the
/// sampler ends. The denoiser's errors are not the isotropic noise the decoder was trained through
/// (squares come back as squircles), and this teaches it those. The encoder is left alone, so the
/// U-Net's latents stay what it learnt; each variant's folder gets a decoder of its own.
///
/// Scenes, sampling seeds and noise levels all come from `opts.seed`, so a tuning repeated with the same
/// seed trains on the same pairs again: a fourth tuning of the committed decoders gained 0 and 0.85 points
/// on the same pool, 2.75 and 1.8 on a fresh one (models/NOTEBOOK.md, session 37).
pub fn tune_decoder(dir: &Path, opts: &TrainOptions, progress: Progress) -> Result<()> {
    opts.validate()?;
    let device = opts.device.device()?;
    let vae_dir = dir.join("vae");
    let pipeline = Pipeline::load(dir, &opts.device)?;
    let encoder = VaeEncoder::load(&vae_dir, DType::F32, &device)?;
    let (varmap, decoder, saved) = trainable_decoder(&vae_dir, &device)?;
    let seed = Rng::new(opts.seed).fork(6);
    let mut data = seed.fork(1);
    let steps = pipeline.defaults().steps;
    let s = opts.tune;
    let n = opts.tune_pool;
    let mut latents = Vec::with_capacity(n);
    let mut images = Vec::with_capacity(n);
    while images.len() < n {
        let scenes = training_layouts(&mut data, 16.min(n - images.len()));
        let batch = painted(&scenes);
        // The steps this batch's sampling runs: at least one, at most the strength's share of them.
        let run = 1 + data.below(((opts.tune_strength * steps as f64) as usize).max(1));
        let seeds = (0..batch.len()).map(|_| data.next_u64()).collect();
        let mut req = Request::new(scenes.iter().map(|(p, _)| p.text()).collect(), seeds);
        req.init = Some(InitLatents { latents: encoded(&encoder, &batch, &device)?, strength: run as f64 / steps as f64 });
        let sampled = pipeline.denoise(&req)?;
        for i in 0..batch.len() {
            latents.push(sampled.get(i)?);
        }
        images.extend(batch);
        progress("sample", images.len(), n, 0.0);
    }
    let mut opt = adamw(varmap.all_vars(), s.lr)?;
    for step in 0..s.steps {
        opt.set_learning_rate(s.lr_at(step));
        let picks: Vec<usize> = (0..s.batch).map(|_| data.below(n)).collect();
        let z = Tensor::stack(&picks.iter().map(|&i| latents[i].clone()).collect::<Vec<_>>(), 0)?;
        let x = images_tensor(&picks.iter().map(|&i| images[i].clone()).collect::<Vec<_>>(), &device)?;
        let loss = reconstruction_loss(&decoder.decode(&z)?, &x)?;
        opt.step(&loss.backward()?)?;
        progress("tune", step + 1, s.steps, loss.to_scalar::<f32>()?);
    }
    save_decoder(&vae_dir, &varmap, saved)
}

/// How an autoencoder's round trip (encode, take the mean, decode) fares on held-out scenes.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundTrip {
    /// The scenes that still pass the adherence check, split as `fresco eval` splits generated images:
    /// the ceiling any denoiser trained on these latents can reach, per kind of prompt.
    pub adherence: crate::eval::Adherence,
    /// What the analysis found wrong, for the first few failing scenes.
    pub problems: Vec<String>,
    /// The first ten scenes: rendered, then after the round trip.
    pub samples: [Vec<Image>; 2],
}

/// Runs `n` rendered held-out scenes (one and two object phrases alternately) through the autoencoder
/// in `vae_dir` and checks each result.
pub fn reconstruction_adherence(vae_dir: &Path, n: usize, seed: u64, device: &DeviceSpec) -> Result<RoundTrip> {
    let device = device.device()?;
    let encoder = VaeEncoder::load(vae_dir, DType::F32, &device)?;
    let decoder = VaeDecoder::load(vae_dir, DType::F32, &device)?;
    let mut rng = Rng::new(seed).fork(9);
    let scenes: Vec<_> = (0..n).map(|i| crate::render::sample_scene(&mut rng, 1 + i % 2, true)).collect();
    let mut verdicts = Vec::with_capacity(n);
    let mut problems = Vec::new();
    let mut samples = [Vec::new(), Vec::new()];
    for chunk in scenes.chunks(32) {
        let images: Vec<Image> = chunk.iter().map(|(_, img)| img.clone()).collect();
        let decoded = fresco_pipeline::GeneratedImage::from_decoded(&decoder.decode(&encoded(&encoder, &images, &device)?)?)?;
        for ((prompt, rendered), img) in chunk.iter().zip(decoded) {
            let img = Image { side: img.width as usize, rgb: img.rgb };
            let verdict = crate::analyze::check(prompt, &img);
            if samples[0].len() < 10 {
                samples[0].push(rendered.clone());
                samples[1].push(img);
            }
            if let Some(p) = verdict.problem.as_ref().filter(|_| problems.len() < 8) {
                problems.push(format!("{}: {p}", prompt.text()));
            }
            verdicts.push(verdict);
        }
    }
    let prompts: Vec<_> = scenes.into_iter().map(|(p, _)| p).collect();
    Ok(RoundTrip { adherence: crate::eval::Adherence::of(&prompts, &verdicts), problems, samples })
}

/// An exponential moving average of a model's weights, which is what gets saved: images from the
/// averaged weights are cleaner than from the last step's, whose noise the learning rate still stirs.
struct Ema {
    vars: Vec<(String, Var)>,
    average: Vec<Tensor>,
}

/// The averaging horizon, in steps (decay 1 − 1/1000); shorter early on ((1 + n) / (10 + n), the lower
/// of the two until step 8,990) so the average does not hold on to the random initialisation. Averages
/// of about 500 and 1,900 steps of the same full run measured within the spread of this one (models/NOTEBOOK.md).
const EMA_DECAY: f64 = 0.999;

impl Ema {
    fn new(map: &VarMap) -> Result<Self> {
        let vars = sorted_vars(map);
        // A detached copy: a view would share the variable's storage, which the optimiser updates in
        // place, and an attached one would chain every step's average into one ever-growing graph.
        let average = vars.iter().map(|(_, v)| Ok(v.as_tensor().copy()?.detach())).collect::<candle_core::Result<_>>()?;
        Ok(Self { vars, average })
    }

    fn update(&mut self, step: usize) -> Result<()> {
        let d = EMA_DECAY.min((1 + step) as f64 / (10 + step) as f64);
        for ((_, var), avg) in self.vars.iter().zip(&mut self.average) {
            *avg = ((&*avg * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.vars.iter().map(|(n, _)| n.clone()).zip(self.average.iter().cloned()).collect()
    }
}

/// `alphas_cumprod` of the scaled-linear schedule the diffusion variant's scheduler states.
fn alphas_cumprod(beta_end: f64) -> Vec<f64> {
    let n = arch::TRAIN_TIMESTEPS;
    let (a, b) = (arch::BETA_START.sqrt(), beta_end.sqrt());
    let mut acc = 1.0;
    (0..n)
        .map(|i| {
            let beta = (a + (b - a) * i as f64 / (n - 1) as f64).powi(2);
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

const MIN_SNR_GAMMA: f64 = 5.0;

/// Sub-cells a side per latent cell in the top layout map ([`TrainOptions::layout_top_weight`]): 2-pixel
/// cells, where a small square's corners and a small circle's rim cover different cells.
const TOP_SUBCELLS: usize = 4;

/// Per-sample scalars as a `[B, 1, 1, 1]` tensor.
fn per_sample(values: &[f64], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(values.iter().map(|&v| v as f32).collect::<Vec<_>>(), (values.len(), 1, 1, 1), device)?)
}

/// Trains the U-Net of the model folder `dir` (which already holds its configs, tokenizer, trained
/// autoencoder and trained text encoder) for `variant`.
pub fn train_denoiser(dir: &Path, variant: Variant, opts: &TrainOptions, progress: Progress) -> Result<()> {
    opts.validate()?;
    let device = opts.device.device()?;
    let tokenizer = PromptTokenizer::clip(&dir.join("tokenizer"))?;
    let vae = VaeEncoder::load(&dir.join("vae"), DType::F32, &device)?;
    let seed = Rng::new(opts.seed).fork(match variant {
        Variant::Diffusion => 2,
        Variant::Flow => 3,
    });

    let unet_map = VarMap::new();
    let unet = UNet::new(UNetConfig::load(&dir.join("unet/config.json"))?, VarBuilder::from_varmap(&unet_map, DType::F32, &device))?;
    // Before the pool's minute of encoding, so that weights which do not fit fail at once.
    if opts.resume {
        let path = dir.join("unet/diffusion_pytorch_model.safetensors");
        let unused = load_vars(&unet_map, &path, &device)?;
        if !unused.is_empty() {
            let mut names: Vec<&String> = unused.keys().collect();
            names.sort();
            return Err(TinyError::Invalid(format!("{}: tensors this U-Net has no place for: {names:?}", path.display())));
        }
    } else {
        init_vars(&unet_map, &seed.fork(3), unet_zeroed)?;
    }

    // The pool: prompts and latents (the posterior means, scaled) of rendered training scenes, and their
    // layouts on the latent grid when the layout loss is on.
    let mut data = seed.fork(1);
    let mut prompts = Vec::with_capacity(opts.pool);
    let mut latents = Vec::with_capacity(opts.pool);
    // The auxiliary losses in the order they add to the denoising loss, each with its own seed stream.
    let mut auxiliaries = Vec::new();
    for (level, target, cells, weight, fork) in [
        (Level::Mid, Target::Coverage, opts.layout_subcells, opts.layout_weight, 5),
        (Level::Top, Target::Coverage, TOP_SUBCELLS, opts.layout_top_weight, 6),
        (Level::Mid, Target::Centres, 1, opts.layout_centre_weight, 7),
    ] {
        auxiliaries.extend(Auxiliary::new(level, target, cells, weight, &opts.arch.unet_channels, &seed.fork(fork), &device)?);
    }
    while prompts.len() < opts.pool {
        let scenes = training_layouts(&mut data, 32.min(opts.pool - prompts.len()));
        let scaled = encoded(&vae, &painted(&scenes), &device)?;
        let latent_side = scaled.dim(3)?;
        for (i, (p, shapes)) in scenes.iter().enumerate() {
            latents.push(scaled.get(i)?);
            for aux in &mut auxiliaries {
                aux.push(shapes, latent_side, &device)?;
            }
            prompts.push(p.text());
        }
        progress("encode", prompts.len(), opts.pool, 0.0);
    }

    // The text encoder is frozen, as Stable Diffusion's CLIP is: each prompt is encoded once.
    let text = ClipTextModel::load(&dir.join("text_encoder"), false, DType::F32, &device)?;
    let mut contexts = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(256) {
        let ids = chunk.iter().map(|p| tokenizer.encode(p)).collect::<fresco_pipeline::Result<Vec<_>>>()?;
        let states = text.forward(&ids)?.last_hidden_state;
        for i in 0..chunk.len() {
            contexts.push(states.get(i)?);
        }
    }
    let empty = text.forward(&[tokenizer.encode("")?])?.last_hidden_state.get(0)?;

    let trained: Vec<&VarMap> = std::iter::once(&unet_map).chain(auxiliaries.iter().map(|a| &a.vars)).collect();
    let s = opts.denoiser;
    let mut opt = adamw(trained.iter().flat_map(|m| m.all_vars()).collect(), s.lr)?;
    let mut ema = Ema::new(&unet_map)?;
    let mut draw = seed.fork(4);
    let ac = alphas_cumprod(opts.beta_end);
    for step in 0..s.steps {
        opt.set_learning_rate(s.lr_at(step));
        let picks: Vec<usize> = (0..s.batch).map(|_| draw.below(prompts.len())).collect();
        let context = Tensor::stack(
            &picks.iter().map(|&i| if draw.chance(opts.uncond_fraction) { empty.clone() } else { contexts[i].clone() }).collect::<Vec<_>>(),
            0,
        )?;
        let x0 = Tensor::stack(&picks.iter().map(|&i| latents[i].clone()).collect::<Vec<_>>(), 0)?;
        let eps = normal_tensor(&mut draw, x0.dims(), &device)?;
        let (xt, t, target, weights) = match variant {
            Variant::Diffusion => {
                let ts: Vec<usize> = (0..s.batch).map(|_| draw.below(ac.len())).collect();
                let a: Vec<f64> = ts.iter().map(|&t| ac[t].sqrt()).collect();
                let b: Vec<f64> = ts.iter().map(|&t| (1.0 - ac[t]).sqrt()).collect();
                let xt = (x0.broadcast_mul(&per_sample(&a, &device)?)? + eps.broadcast_mul(&per_sample(&b, &device)?)?)?;
                let t = Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), s.batch, &device)?;
                // Min-SNR-5 weighting (Hang et al. 2023): the nearly clean timesteps, easy and many, stop
                // dominating the loss; it converges several times faster.
                let w: Vec<f32> =
                    ts.iter().map(|&t| (ac[t] / (1.0 - ac[t])).min(MIN_SNR_GAMMA) / (ac[t] / (1.0 - ac[t]))).map(|w| w as f32).collect();
                (xt, t, eps, Tensor::from_vec(w, s.batch, &device)?)
            }
            Variant::Flow => {
                // Half uniform, half logit-normal (SD3's density): few-step sampling needs the ends too.
                // Then shifted toward noise by `flow_shift`, as the model's scheduler will shift its steps.
                let sig: Vec<f64> = (0..s.batch)
                    .map(|_| if draw.chance(0.5) { draw.f64() } else { 1.0 / (1.0 + (-draw.normal()).exp()) })
                    .map(|v| static_shift(v, opts.flow_shift).clamp(1e-3, 1.0))
                    .collect();
                let keep: Vec<f64> = sig.iter().map(|s| 1.0 - s).collect();
                let xt = (x0.broadcast_mul(&per_sample(&keep, &device)?)? + eps.broadcast_mul(&per_sample(&sig, &device)?)?)?;
                let t =
                    Tensor::from_vec(sig.iter().map(|&s| (s * arch::TRAIN_TIMESTEPS as f64) as f32).collect::<Vec<_>>(), s.batch, &device)?;
                (xt, t, (&eps - &x0)?, Tensor::ones(s.batch, DType::F32, &device)?)
            }
        };
        let features = unet.forward_features(&xt, &t, &context, None)?;
        let per_sample_loss = (&features.out - target)?.sqr()?.flatten_from(1)?.mean(1)?;
        let loss = (per_sample_loss * weights)?.mean_all()?;
        let mut total = loss.clone();
        for aux in &auxiliaries {
            total = (&total + aux.loss(&features, &picks)?)?;
        }
        let grads = total.backward()?;
        // On the second step: on the first, the zeroed weights (`unet_zeroed`) still block every
        // gradient upstream of them.
        if step == 1 {
            check_gradients(&trained, &grads)?;
        }
        opt.step(&grads)?;
        ema.update(step)?;
        // The denoising loss alone, comparable across runs with and without the layout loss.
        progress(variant.name(), step + 1, s.steps, loss.to_scalar::<f32>()?);
    }
    save_f16(ema.tensors(), &dir.join("unet/diffusion_pytorch_model.safetensors"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Init;

    #[test]
    fn a_path_spelt_another_way_is_the_same_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("w"), b"weights").expect("write");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        assert!(same_place(&dir.path().join("w"), &dir.path().join("sub/../w")));
        assert!(!same_place(&dir.path().join("w"), &dir.path().join("v")));
        copy_file(&dir.path().join("w"), &dir.path().join("sub/../w")).expect("copy onto itself");
        assert_eq!(std::fs::read(dir.path().join("w")).expect("read"), b"weights");
    }

    /// The check catches exactly the failure candle's fused kernels cause, and passes fresco's own ops.
    #[test]
    fn parameters_behind_fused_kernels_are_reported() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let a = vb.get_with_hints((2, 3), "behind_fused", Init::Const(0.5)).expect("a");
        let b = vb.get_with_hints((2, 3), "behind_ours", Init::Const(0.5)).expect("b");
        let x = Tensor::new(&[[1f32, 2., 3.], [0., 1., 5.]], &Device::Cpu).expect("x");
        let fused = candle_nn::ops::softmax_last_dim(&(&x * &a).expect("mul")).expect("softmax");
        let ours = fresco_pipeline::models::blocks::softmax_last_dim(&(&x * &b).expect("mul")).expect("softmax");
        let loss = (fused.sqr().expect("sq").sum_all().expect("sum") + ours.sqr().expect("sq").sum_all().expect("sum")).expect("loss");
        let grads = loss.backward().expect("backward");
        let err = check_gradients(&[&map], &grads).expect_err("fused softmax gives no gradient");
        assert!(err.to_string().contains("behind_fused") && !err.to_string().contains("behind_ours"), "{err}");
    }

    #[test]
    fn the_average_follows_the_weights_with_a_decay_that_warms_up() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let w = vb.get_with_hints(1, "w", Init::Const(0.0)).expect("w");
        let mut ema = Ema::new(&map).expect("ema");
        let value = |ema: &Ema| ema.tensors()[0].1.to_vec1::<f32>().expect("vec")[0];
        let var = sorted_vars(&map).remove(0).1;
        var.set(&Tensor::new(&[1f32], &Device::Cpu).expect("one")).expect("set");
        // Step 0 keeps a tenth of the old average; late steps keep 0.999 of it.
        ema.update(0).expect("update");
        assert!((value(&ema) - 0.9).abs() < 1e-6, "{}", value(&ema));
        ema.update(1_000_000).expect("update");
        assert!((value(&ema) - (0.9 * 0.999 + 0.001)).abs() < 1e-6, "{}", value(&ema));
        assert_eq!(w.to_vec1::<f32>().expect("w"), [1.0], "the weights themselves are untouched");
        // Nothing is recorded for a backward pass: otherwise each step's average would keep the previous
        // one alive, and a long run would run out of memory.
        assert!(ema.average.iter().all(|a| !a.track_op()));
    }

    /// The noise scales with the latents, so an encoder cannot outgrow it, and averages the level the
    /// uniform draw gives (RMS of U[0, max) is max/√3).
    #[test]
    fn latent_noise_is_relative_to_the_latents_scale() {
        let z = normal_tensor(&mut Rng::new(1), &[256, 4, 2, 2], &Device::Cpu).expect("z");
        let noise_of = |z: &Tensor, max: f64| (perturb(z, max, &mut Rng::new(3)).expect("perturb") - z).expect("diff");
        let rms = |t: &Tensor| t.sqr().and_then(|t| t.mean_all()).and_then(|t| t.to_scalar::<f32>()).expect("rms").sqrt();
        let big = noise_of(&z, 0.4);
        let small = noise_of(&(&z * 0.01).expect("scale"), 0.4);
        assert!((rms(&big) / rms(&small) - 100.0).abs() < 1e-2, "{} vs {}", rms(&big), rms(&small));
        let relative = rms(&big) / rms(&z);
        assert!((relative - 0.4 / 3f32.sqrt()).abs() < 0.03, "relative noise {relative}");
        assert_eq!(rms(&noise_of(&z, 0.0)), 0.0);
    }

    /// Exactly the last layer of every residual branch starts at zero, and nothing else: a renamed layer
    /// would otherwise silently fall back to a random start.
    #[test]
    fn a_fresh_unet_has_its_residual_branches_at_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        write_json(&path, &Arch::test().unet_config()).expect("config");
        let map = VarMap::new();
        UNet::new(UNetConfig::load(&path).expect("load"), VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu)).expect("unet");
        init_vars(&map, &Rng::new(1), unet_zeroed).expect("init");
        let vars = sorted_vars(&map);
        let zero = |name: &str| {
            let v = &vars.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1;
            v.as_tensor().abs().and_then(|t| t.sum_all()).and_then(|t| t.to_scalar::<f32>()).expect("sum") == 0.0
        };
        let mut branches = 0;
        for (name, _) in &vars {
            let ends = [("conv1.weight", "conv2.weight"), ("proj_in.weight", "proj_out.weight")];
            if let Some((start, end)) = ends.iter().find(|(start, _)| name.ends_with(start)) {
                let last = format!("{}{end}", &name[..name.len() - start.len()]);
                assert!(!zero(name) && zero(&last), "{name} should be random, {last} zero");
                branches += 1;
            }
        }
        let zeroed = vars.iter().filter(|(n, v)| !n.ends_with("bias") && zero(n) && v.elem_count() > 0).count();
        assert!(branches >= 4 && zeroed == branches, "{zeroed} zeroed weights, {branches} residual branches");
        assert!(!zero("conv_out.weight") && !zero("conv_in.weight"));
    }

    /// Each phase refuses options out of range, naming the field, before it trains anything; the shipped
    /// and the test options pass.
    #[test]
    fn options_out_of_range_are_named() {
        let ok = TrainOptions::default();
        ok.validate().expect("the defaults");
        TrainOptions { arch: Arch::test(), ..ok.clone() }.validate().expect("the test architecture");
        let cases: [(&str, TrainOptions); 8] = [
            ("uncond_fraction", TrainOptions { uncond_fraction: 1.0, ..ok.clone() }),
            ("text.lr", TrainOptions { text: Schedule { lr: 0.0, ..ok.text }, ..ok.clone() }),
            ("decoder.lr", TrainOptions { decoder: Schedule { lr: f64::INFINITY, ..ok.decoder }, ..ok.clone() }),
            ("beta_end", TrainOptions { beta_end: f64::NAN, ..ok.clone() }),
            ("tune.batch", TrainOptions { tune: Schedule { batch: 0, ..ok.tune }, ..ok.clone() }),
            ("tune_strength", TrainOptions { tune_strength: f64::NAN, ..ok.clone() }),
            ("arch.text_hidden", TrainOptions { arch: Arch { text_hidden: 66, ..Arch::default() }, ..ok.clone() }),
            ("arch.unet_channels", TrainOptions { arch: Arch { unet_channels: vec![], ..Arch::default() }, ..ok.clone() }),
        ];
        for (want, opts) in cases {
            match opts.validate() {
                Err(TinyError::Option { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: {other:?}"),
            }
        }
        // A phase checks before it writes anything.
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = TrainOptions { beta_end: 2.0, ..ok };
        assert!(matches!(train_vae(dir.path(), &bad, &mut |_, _, _, _| {}), Err(TinyError::Option { field: "beta_end", .. })));
        assert!(std::fs::read_dir(dir.path()).expect("dir").next().is_none());
    }

    #[test]
    fn learning_rate_warms_up_and_decays() {
        let s = Schedule { steps: 1000, batch: 1, lr: 1.0 };
        assert!(s.lr_at(0) < 0.05);
        assert!((s.lr_at(50) - 1.0).abs() < 1e-9);
        assert!((s.lr_at(999) - 0.1).abs() < 0.01);
    }
}
