//! Model families and the sampling loop: text encoders → initial noise → denoiser × steps under a
//! scheduler with classifier-free guidance → VAE decode.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::error::{PipelineError, Result};
use crate::image::GeneratedImage;
use crate::loader::{Config, ModelDir};
use crate::models::clip::ClipTextModel;
use crate::models::flux::{self, Flux};
use crate::models::mmdit::Mmdit;
use crate::models::t5::T5Encoder;
use crate::models::unet::{TextTimeCond, UNet};
use crate::models::vae::VaeDecoder;
use crate::noise::NoiseStreams;
use crate::schedulers::{FlowShift, SchedulerKind};
use crate::tokenizer::PromptTokenizer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (expected cpu, cuda or cuda:N)")),
        }
    }
}

/// The spelling [`FromStr`](std::str::FromStr) reads back.
impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    pub fn device(&self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(*n).map_err(|e| {
                PipelineError::param(
                    "device",
                    format!("cuda:{n} is not available ({e}); build with --features cuda on a machine with a GPU"),
                )
            }),
        }
    }
}

/// Process-wide defaults for the CPU kernels' threads and the GPU's arithmetic, for a binary's `main` to
/// call before it starts any thread (it sets environment variables, which other threads could be
/// reading). A value the environment already holds wins.
///
/// candle runs its element-wise ops on a pool of its own, whose workers spin 25,000 times after each op
/// before they sleep. With few cores they spin on the cores rayon's workers need for the next convolution
/// or attention: 27% of the samples of tiny-sd15's U-Net at batch 32 (a guided batch of 16), on 2 cores.
/// With a hundred spins that U-Net ran 0.046 s instead of 0.059 s, level with PyTorch's 0.046–0.049 s,
/// and an SD 1.5-sized U-Net at 512x512 was unchanged (11.7 s against 11.5 s).
///
/// In a build with the `cudnn` feature, cuDNN runs float32 convolutions in TF32 (10-bit mantissas) unless
/// `NVIDIA_TF32_OVERRIDE=0`, and candle offers no per-call switch (its cuBLAS products ask for float32
/// arithmetic themselves). On an H200, TF32 moved the DDIM cases that clip x₀ by up to 208 of 255 from
/// diffusers' float32 images; in float32 every reference case stays within the parity bound (max 2,
/// mean ≤ 0.20), so a seed makes the same image on a GPU as on a CPU. `NVIDIA_TF32_OVERRIDE=1` keeps
/// cuDNN's TF32 for speed (an SD 1.5-sized U-Net, guided batch of 16: 1.5 s against 3.0 s).
pub fn set_process_defaults() {
    for (name, value) in [("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100"), ("NVIDIA_TF32_OVERRIDE", "0")] {
        if std::env::var_os(name).is_none() {
            std::env::set_var(name, value);
        }
    }
}

/// Runs `f` on a thread of rayon's global pool (at once if already on one) and waits for it.
///
/// The CPU kernels (fresco's own, candle's and gemm's matrix multiplies) split their work with rayon.
/// From a thread outside the pool every such op hands its work over and sleeps until the pool wakes it,
/// one futex round trip per op; on a pool thread an op is a plain fork-join. With small models that hand
/// over costs as much as the ops: the tiny fixtures at batch 1 ran 1.3-1.9x faster on the pool, and a
/// fresco-tiny training step spent 5% of its time in the kernel's wake-up path.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// The families fresco serves, as recognised from `model_index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x / 2.x (and SD-Turbo): one CLIP encoder, U-Net.
    StableDiffusion,
    /// SDXL (and SDXL-Turbo): two CLIP encoders, pooled + size conditioning.
    StableDiffusionXl,
    /// SD3 / SD3.5: CLIP-L + CLIP-G + T5, MMDiT, flow matching.
    StableDiffusion3,
    /// FLUX.1 schnell / dev: CLIP (pooled) + T5, FLUX transformer on packed latents, flow matching.
    Flux,
}

impl Family {
    fn detect(dir: &ModelDir) -> Result<Self> {
        let index = dir.root.join("model_index.json");
        match dir.class_name() {
            Some("StableDiffusionPipeline") => Ok(Self::StableDiffusion),
            Some("StableDiffusionXLPipeline") => Ok(Self::StableDiffusionXl),
            Some("StableDiffusion3Pipeline") => Ok(Self::StableDiffusion3),
            Some("FluxPipeline") => Ok(Self::Flux),
            Some(other) => Err(PipelineError::Unsupported(format!(
                "{}: pipeline class {other:?} is not a supported family (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline)",
                index.display()
            ))),
            None => Err(PipelineError::config(&index, "no \"_class_name\"")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::StableDiffusion => "stable-diffusion",
            Self::StableDiffusionXl => "stable-diffusion-xl",
            Self::StableDiffusion3 => "stable-diffusion-3",
            Self::Flux => "flux",
        }
    }
}

/// What a model runs with when a request leaves a parameter out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    pub steps: usize,
    pub guidance: f64,
    /// A second, lower scale for the last steps, part of the model's own guidance (never of a scale the
    /// request names).
    pub late_guidance: Option<LateGuidance>,
    pub width: usize,
    pub height: usize,
}

/// Classifier-free guidance of `scale` on the steps evaluated below `below_timestep`, where a model's
/// recipe asks for it (`_fresco_defaults.late_guidance`). Those steps only sharpen a layout the earlier
/// ones settled; on fresco-tiny half its scale there drew fewer wrong shapes and counts than the full one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LateGuidance {
    pub scale: f64,
    pub below_timestep: f64,
}

/// One batched generation. Every vector has one entry per prompt.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompts: Vec<String>,
    pub negative_prompts: Vec<Option<String>>,
    pub seeds: Vec<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: Option<String>,
    /// Initial noise `[B, C, H/8, W/8]` used instead of the seeds' noise (diffusers' `latents=`); with
    /// `init`, the noise added to its latents.
    pub latents: Option<Tensor>,
    /// Image-to-image: start from these latents instead of from pure noise.
    pub init: Option<InitLatents>,
}

/// Where an image-to-image generation starts (diffusers' img2img `image` and `strength`).
#[derive(Debug, Clone)]
pub struct InitLatents {
    /// Clean latents `[B, C, H/8, W/8]`, scaled as the denoiser's (the autoencoder's scaling applied).
    pub latents: Tensor,
    /// Share of the schedule to run, in (0, 1]: only the last `round(strength × steps)` steps run, from
    /// the latents noised to the level the first of them starts at. At 1 the whole schedule runs, and
    /// the latents survive only as far as its first level keeps any signal.
    pub strength: f64,
}

impl Request {
    pub fn new(prompts: Vec<String>, seeds: Vec<u64>) -> Self {
        let n = prompts.len();
        Self {
            prompts,
            negative_prompts: vec![None; n],
            seeds,
            steps: None,
            guidance: None,
            width: None,
            height: None,
            scheduler: None,
            latents: None,
            init: None,
        }
    }
}

/// Wall time per stage of one `generate` call, for worker metrics and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimings {
    pub encode: Duration,
    pub denoise: Duration,
    pub decode: Duration,
    pub steps: usize,
}

struct TextEncoder {
    tokenizer: PromptTokenizer,
    model: ClipTextModel,
}

/// The network that predicts noise (U-Net) or velocity (MMDiT) at each step.
// A pipeline holds exactly one, so the variants' size difference costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Denoiser {
    UNet(UNet),
    Mmdit(Mmdit),
    Flux(Flux),
}

impl Denoiser {
    /// Channels of the (unpacked) latent the denoiser works on.
    fn in_channels(&self) -> usize {
        match self {
            Self::UNet(u) => u.config.in_channels,
            Self::Mmdit(m) => m.config.in_channels,
            Self::Flux(f) => f.config.in_channels / 4,
        }
    }
}

pub struct Pipeline {
    pub family: Family,
    pub name: String,
    device: Device,
    dtype: DType,
    encoders: Vec<TextEncoder>,
    t5: Option<(PromptTokenizer, T5Encoder)>,
    denoiser: Denoiser,
    vae: VaeDecoder,
    scheduler_config: Config,
    default_scheduler: SchedulerKind,
    force_zeros_for_empty_prompt: bool,
    defaults: ModelDefaults,
}

impl Pipeline {
    pub fn load(root: &Path, device: &DeviceSpec) -> Result<Self> {
        let dir = ModelDir::open(root)?;
        let family = Family::detect(&dir)?;
        let device = device.device()?;
        let dtype = DType::F32;
        let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());

        let mut encoders = Vec::new();
        let pairs: &[(&str, &str)] = match family {
            Family::StableDiffusion | Family::Flux => &[("tokenizer", "text_encoder")],
            Family::StableDiffusionXl | Family::StableDiffusion3 => &[("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
        };
        for (tok, enc) in pairs {
            let tokenizer = PromptTokenizer::clip(&dir.component(tok)?)?;
            let with_projection = dir.component_class(enc) == Some("CLIPTextModelWithProjection");
            let model = ClipTextModel::load(&dir.component(enc)?, with_projection, dtype, &device)?;
            encoders.push(TextEncoder { tokenizer, model });
        }
        let index_path = dir.root.join("model_index.json");
        if matches!(family, Family::StableDiffusionXl | Family::StableDiffusion3) && encoders[1].model.config.projection_dim.is_none() {
            return Err(PipelineError::config(&index_path, "text_encoder_2 must be a CLIPTextModelWithProjection"));
        }
        if family == Family::StableDiffusion3 && encoders[0].model.config.projection_dim.is_none() {
            return Err(PipelineError::config(&index_path, "SD3's text_encoder must be a CLIPTextModelWithProjection"));
        }
        // SD3's T5 is optional (diffusers runs with zeros in its place when it is absent).
        let t5 = match family {
            Family::StableDiffusion3 if dir.has_component("text_encoder_3") => {
                let tokenizer = PromptTokenizer::t5(&dir.component("tokenizer_3")?, 256)?;
                Some((tokenizer, T5Encoder::load(&dir.component("text_encoder_3")?, dtype, &device)?))
            }
            Family::Flux => {
                let tokenizer = PromptTokenizer::t5(&dir.component("tokenizer_2")?, 512)?;
                Some((tokenizer, T5Encoder::load(&dir.component("text_encoder_2")?, dtype, &device)?))
            }
            _ => None,
        };
        let denoiser = match family {
            Family::StableDiffusion3 => Denoiser::Mmdit(Mmdit::load(&dir.component("transformer")?, dtype, &device)?),
            Family::Flux => Denoiser::Flux(Flux::load(&dir.component("transformer")?, dtype, &device)?),
            _ => {
                let unet = UNet::load(&dir.component("unet")?, dtype, &device)?;
                let unet_config = dir.component("unet")?.join("config.json");
                match (family, unet.config.text_time) {
                    (Family::StableDiffusionXl, None) => {
                        return Err(PipelineError::config(&unet_config, "SDXL needs addition_embed_type \"text_time\""))
                    }
                    (Family::StableDiffusion, Some(_)) => {
                        return Err(PipelineError::config(&unet_config, "addition_embed_type \"text_time\" needs an SDXL pipeline"))
                    }
                    _ => {}
                }
                if unet.config.time_cond_proj_dim.is_some() {
                    return Err(PipelineError::config(&unet_config, "guidance-distilled U-Nets (time_cond_proj_dim) are not supported"));
                }
                Denoiser::UNet(unet)
            }
        };
        let vae = VaeDecoder::load(&dir.component("vae")?, dtype, &device)?;
        if vae.config.latent_channels != denoiser.in_channels() {
            return Err(PipelineError::config(
                &dir.root.join("vae/config.json"),
                "latent_channels differs from the denoiser's in_channels",
            ));
        }
        let scheduler_dir = dir.component("scheduler")?;
        let scheduler_config = Config::load(&scheduler_dir.join("scheduler_config.json"))?;
        let class = scheduler_config.opt_str("_class_name")?.or(dir.component_class("scheduler")).unwrap_or("PNDMScheduler").to_string();
        let class_scheduler = SchedulerKind::from_class(&class, &scheduler_config.path)?;
        // Transformer families are flow models only. A U-Net may be either: with a flow-matching scheduler
        // it is read as a rectified flow predicting velocity (fresco-tiny-flow is one).
        if !class_scheduler.is_flow() && matches!(family, Family::StableDiffusion3 | Family::Flux) {
            return Err(PipelineError::config(&scheduler_config.path, format!("scheduler {class} does not fit a {} model", family.name())));
        }
        let force_zeros_for_empty_prompt = dir.flag("force_zeros_for_empty_prompt").unwrap_or(family == Family::StableDiffusionXl);

        let sample_size = match &denoiser {
            Denoiser::UNet(u) => u.config.sample_size,
            Denoiser::Mmdit(m) => m.config.sample_size,
            // FLUX configs carry no sample size; its pipeline defaults to 1024 px.
            Denoiser::Flux(_) => 1024 / vae.config.scale_factor(),
        };
        let side = sample_size * vae.config.scale_factor();
        // Turbo checkpoints share their architecture with the base models; only their name tells them
        // apart, and their published recipe is one step without guidance.
        let turbo = name.to_ascii_lowercase().contains("turbo");
        // FLUX schnell (no guidance embedding) is distilled for 4 steps; dev runs 28 at guidance 3.5.
        let flux_dev = matches!(&denoiser, Denoiser::Flux(f) if f.config.guidance_embeds);
        let flow_unet = class_scheduler.is_flow() && matches!(family, Family::StableDiffusion | Family::StableDiffusionXl);
        let defaults = ModelDefaults {
            steps: match (turbo, family) {
                (true, _) => 1,
                (false, Family::StableDiffusion3) => 28,
                (false, _) if flow_unet => 28,
                (false, Family::Flux) => {
                    if flux_dev {
                        28
                    } else {
                        4
                    }
                }
                _ => 50,
            },
            guidance: match (turbo, family) {
                (true, _) => 0.0,
                (false, Family::StableDiffusion) => 7.5,
                (false, Family::StableDiffusionXl) => 5.0,
                (false, Family::StableDiffusion3) => 7.0,
                (false, Family::Flux) => {
                    if flux_dev {
                        3.5
                    } else {
                        0.0
                    }
                }
            },
            late_guidance: None,
            width: side,
            height: side,
        };
        let (defaults, default_scheduler) = model_defaults(&dir, defaults, class_scheduler)?;
        tracing::info!(model = %name, family = family.name(), scheduler = default_scheduler.name(), "model loaded");
        Ok(Self {
            family,
            name,
            device,
            dtype,
            encoders,
            t5,
            denoiser,
            vae,
            scheduler_config,
            default_scheduler,
            force_zeros_for_empty_prompt,
            defaults,
        })
    }

    pub fn defaults(&self) -> ModelDefaults {
        self.defaults
    }

    pub fn default_scheduler(&self) -> SchedulerKind {
        self.default_scheduler
    }

    /// Spatial factor between image and latent; width and height must be multiples of it.
    pub fn size_factor(&self) -> usize {
        match &self.denoiser {
            Denoiser::UNet(_) => self.vae.config.scale_factor(),
            Denoiser::Mmdit(m) => self.vae.config.scale_factor() * m.config.patch_size,
            Denoiser::Flux(_) => self.vae.config.scale_factor() * 2,
        }
    }

    pub fn latent_channels(&self) -> usize {
        self.denoiser.in_channels()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Checks a request without running it; every error names the parameter.
    pub fn resolve(&self, req: &Request) -> Result<Resolved> {
        let b = req.prompts.len();
        if b == 0 {
            return Err(PipelineError::param("prompt", "at least one prompt is required"));
        }
        if req.negative_prompts.len() != b || (req.latents.is_none() && req.seeds.len() != b) {
            return Err(PipelineError::param("seed", "one seed and one negative prompt entry per prompt are required"));
        }
        for (i, p) in req.prompts.iter().enumerate() {
            fresco_core::validate_prompt(&format!("prompt[{i}]"), p).map_err(|e| PipelineError::param(&e.field, e.message))?;
        }
        let steps = req.steps.unwrap_or(self.defaults.steps);
        if steps == 0 || steps > 1000 {
            return Err(PipelineError::param("steps", format!("must be 1..=1000, got {steps}")));
        }
        let guidance = req.guidance.unwrap_or(self.defaults.guidance);
        if !guidance.is_finite() || guidance < 0.0 {
            return Err(PipelineError::param("guidance", format!("must be a non-negative number, got {guidance}")));
        }
        // A scale the request names holds for every step, so that naming the model's own scale still
        // reproduces a constant-guidance image.
        let late_guidance = if req.guidance.is_none() { self.defaults.late_guidance } else { None };
        let f = self.size_factor();
        let width = req.width.unwrap_or(self.defaults.width);
        let height = req.height.unwrap_or(self.defaults.height);
        for (name, v) in [("width", width), ("height", height)] {
            if v == 0 || v % f != 0 || v > 4096 {
                return Err(PipelineError::param(name, format!("must be a positive multiple of {f} up to 4096 for this model, got {v}")));
            }
        }
        let scheduler = match &req.scheduler {
            Some(s) => SchedulerKind::from_name(s)?,
            None => self.default_scheduler,
        };
        if scheduler.is_flow() != self.default_scheduler.is_flow() {
            return Err(PipelineError::param(
                "scheduler",
                if scheduler.is_flow() {
                    "flow-euler and flow-euler-ancestral are for flow-matching models (SD3, FLUX)"
                } else {
                    "flow-matching models (SD3, FLUX) sample with flow-euler or flow-euler-ancestral"
                },
            ));
        }
        let vf = self.vae.config.scale_factor();
        let want = (b, self.latent_channels(), height / vf, width / vf);
        if let Some(l) = &req.latents {
            if l.dims4().ok() != Some(want) {
                return Err(PipelineError::param("latents", format!("expected shape {want:?}, got {:?}", l.dims())));
            }
        }
        let start = match &req.init {
            None => 0,
            Some(init) => {
                if init.latents.dims4().ok() != Some(want) {
                    return Err(PipelineError::param("init.latents", format!("expected shape {want:?}, got {:?}", init.latents.dims())));
                }
                let run = (init.strength * steps as f64).round();
                if !(init.strength > 0.0 && init.strength <= 1.0) || run < 1.0 {
                    return Err(PipelineError::param(
                        "init.strength",
                        format!("must be in (0, 1] and leave at least one of the {steps} steps to run, got {}", init.strength),
                    ));
                }
                steps - run as usize
            }
        };
        Ok(Resolved { steps, start, guidance, late_guidance, width, height, scheduler })
    }

    /// Generates one image per prompt as a single batched forward per step.
    pub fn generate(&self, req: &Request) -> Result<Vec<GeneratedImage>> {
        self.generate_timed(req).map(|(images, _)| images)
    }

    pub fn generate_timed(&self, req: &Request) -> Result<(Vec<GeneratedImage>, StageTimings)> {
        self.generate_cancellable(req, &|| false)
    }

    /// Like [`generate_timed`](Self::generate_timed), checking `should_stop` before every denoising step so
    /// a worker can drop a cancelled batch without finishing it.
    pub fn generate_cancellable(
        &self,
        req: &Request,
        should_stop: &(dyn Fn() -> bool + Sync),
    ) -> Result<(Vec<GeneratedImage>, StageTimings)> {
        on_compute_pool(|| self.generate_on_pool(req, should_stop))
    }

    /// The latents sampling ends at, before the autoencoder decodes them (scaled, as the denoiser works
    /// on them).
    pub fn denoise(&self, req: &Request) -> Result<Tensor> {
        on_compute_pool(|| self.denoise_on_pool(req, &|| false, &mut StageTimings::default()))
    }

    fn generate_on_pool(&self, req: &Request, should_stop: &(dyn Fn() -> bool + Sync)) -> Result<(Vec<GeneratedImage>, StageTimings)> {
        let mut timings = StageTimings::default();
        let latents = self.denoise_on_pool(req, should_stop, &mut timings)?;
        let t2 = Instant::now();
        let decoded = self.vae.decode(&latents)?;
        let images = GeneratedImage::from_decoded(&decoded)?;
        timings.decode = t2.elapsed();
        Ok((images, timings))
    }

    fn denoise_on_pool(&self, req: &Request, should_stop: &(dyn Fn() -> bool + Sync), timings: &mut StageTimings) -> Result<Tensor> {
        let r = self.resolve(req)?;
        let b = req.prompts.len();
        // FLUX's guidance is an embedding (dev) or nothing (schnell), never classifier-free guidance.
        let cfg = (r.guidance > 1.0 || r.late_guidance.is_some_and(|l| l.scale > 1.0)) && self.family != Family::Flux;

        let t0 = Instant::now();
        let cond = self.encode(&req.prompts)?;
        let (context, extra) = if cfg {
            let uncond = self.encode_negative(&req.negative_prompts)?;
            (
                Tensor::cat(&[&uncond.context, &cond.context], 0)?,
                match (uncond.pooled, cond.pooled) {
                    (Some(u), Some(c)) => Some(Tensor::cat(&[&u, &c], 0)?),
                    _ => None,
                },
            )
        } else {
            (cond.context, cond.pooled)
        };
        let rows = if cfg { 2 * b } else { b };
        let time_ids = match self.family {
            Family::StableDiffusionXl => {
                // (original size, crop top-left, target size) = ((h, w), (0, 0), (h, w)).
                let (h, w) = (r.height as f32, r.width as f32);
                let one = [h, w, 0.0, 0.0, h, w];
                Some(Tensor::from_vec(one.repeat(rows), (rows, 6), &self.device)?.to_dtype(self.dtype)?)
            }
            _ => None,
        };
        timings.encode = t0.elapsed();

        let t1 = Instant::now();
        let shift = self.flow_shift(r.width, r.height, r.steps)?;
        let mut scheduler = r.scheduler.build(&self.scheduler_config, r.steps, shift.as_ref())?;
        let f = self.vae.config.scale_factor();
        let shape = (b, self.latent_channels(), r.height / f, r.width / f);
        let mut noise = NoiseStreams::new(&req.seeds);
        let initial = match &req.latents {
            Some(l) => l.to_device(&self.device)?.to_dtype(self.dtype)?,
            None => noise.next(&[shape.0, shape.1, shape.2, shape.3], &self.device)?.to_dtype(self.dtype)?,
        };
        let mut latents = match &req.init {
            Some(init) => scheduler.add_noise(&init.latents.to_device(&self.device)?.to_dtype(self.dtype)?, &initial, r.start)?,
            None => (initial * scheduler.init_noise_sigma())?,
        };
        let timesteps = scheduler.timesteps().to_vec();
        for (i, t) in timesteps.iter().enumerate().skip(r.start) {
            if should_stop() {
                return Err(PipelineError::Cancelled);
            }
            let input = if cfg { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let input = scheduler.scale_model_input(input, i)?;
            let out = match &self.denoiser {
                Denoiser::UNet(unet) => {
                    let extra = match (&extra, &time_ids) {
                        (Some(text_embeds), Some(time_ids)) => Some(TextTimeCond { text_embeds, time_ids }),
                        _ => None,
                    };
                    unet.forward(&input, *t, &context, extra)?
                }
                Denoiser::Mmdit(mmdit) => {
                    let pooled = extra.as_ref().ok_or_else(|| PipelineError::Unsupported("MMDiT needs pooled text embeddings".into()))?;
                    mmdit.forward(&input, *t, &context, pooled)?
                }
                Denoiser::Flux(model) => {
                    let pooled = extra.as_ref().ok_or_else(|| PipelineError::Unsupported("FLUX needs pooled text embeddings".into()))?;
                    let (_, c, h, w) = input.dims4()?;
                    let v = model.forward(&flux::pack(&input)?, h / 2, w / 2, *t, &context, pooled, Some(r.guidance))?;
                    flux::unpack(&v, c, h, w)?
                }
            };
            let guided = if cfg {
                let (u, c) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                // As for the whole request, a step's scale of 1 or less means no guidance: the conditional
                // prediction alone.
                match r.guidance_at(*t) {
                    g if g > 1.0 => (&u + ((&c - &u)? * g)?)?,
                    _ => c,
                }
            } else {
                out
            };
            latents = scheduler.step(&guided, i, &latents, &mut noise)?;
        }
        timings.steps = timesteps.len() - r.start;
        // GPU kernels run asynchronously: wait for them so the stage timings measure the work, not its launch.
        self.device.synchronize()?;
        timings.denoise = t1.elapsed();
        Ok(latents)
    }

    fn encode(&self, prompts: &[String]) -> Result<Encoded> {
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        for enc in &self.encoders {
            let ids = prompts.iter().map(|p| enc.tokenizer.encode(p)).collect::<Result<Vec<_>>>()?;
            let out = enc.model.forward(&ids)?;
            match self.family {
                Family::StableDiffusion => contexts.push(out.last_hidden_state),
                // FLUX conditions on CLIP's pooled output only; T5 gives the token states.
                Family::Flux => pooled.push(out.pooled),
                Family::StableDiffusionXl | Family::StableDiffusion3 => {
                    // Both read the penultimate layer; SDXL pools the second encoder, SD3 both.
                    let n = out.hidden_states.len();
                    contexts.push(out.hidden_states[n - 2].clone());
                    pooled.extend(out.text_embeds);
                }
            }
        }
        if self.family == Family::StableDiffusionXl {
            pooled.drain(..pooled.len().saturating_sub(1));
        }
        let context = match self.family {
            Family::Flux => self.t5_states(prompts)?,
            Family::StableDiffusion3 => {
                let clip = Tensor::cat(&contexts, 2)?;
                self.append_t5(prompts, clip)?
            }
            _ if contexts.len() == 1 => contexts.remove(0),
            _ => Tensor::cat(&contexts, 2)?,
        };
        let pooled = if pooled.is_empty() { None } else { Some(Tensor::cat(&pooled, 1)?) };
        Ok(Encoded { context, pooled })
    }

    /// SD3: the CLIP states, padded (or cut, as `F.pad` with a negative width does) to T5's width,
    /// followed along the sequence by T5's states — or zeros where the model ships no T5.
    fn append_t5(&self, prompts: &[String], clip: Tensor) -> Result<Tensor> {
        let Denoiser::Mmdit(mmdit) = &self.denoiser else { return Ok(clip) };
        let t5 = match &self.t5 {
            Some(_) => self.t5_states(prompts)?,
            None => Tensor::zeros((prompts.len(), 256, mmdit.config.joint_attention_dim), self.dtype, &self.device)?,
        };
        let (width, clip_width) = (t5.dim(2)?, clip.dim(2)?);
        let clip = if clip_width >= width { clip.narrow(2, 0, width)? } else { clip.pad_with_zeros(2, 0, width - clip_width)? };
        Ok(Tensor::cat(&[&clip, &t5], 1)?)
    }

    fn t5_states(&self, prompts: &[String]) -> Result<Tensor> {
        let (tok, enc) = self.t5.as_ref().ok_or_else(|| PipelineError::Unsupported("this model has no T5 encoder".into()))?;
        let ids = prompts.iter().map(|p| tok.encode(p)).collect::<Result<Vec<_>>>()?;
        Ok(enc.forward(&ids, &self.device)?.to_dtype(self.dtype)?)
    }

    /// The resolution-dependent shift flow models with `use_dynamic_shifting` need (diffusers'
    /// `calculate_shift` over the image's token count).
    fn flow_shift(&self, width: usize, height: usize, steps: usize) -> Result<Option<FlowShift>> {
        let c = &self.scheduler_config;
        // FLUX's pipeline passes its own sigmas: linspace(1, 1/steps, steps).
        let sigmas = (self.family == Family::Flux)
            .then(|| (0..steps).map(|i| 1.0 - i as f64 * (1.0 - 1.0 / steps as f64) / (steps.max(2) - 1) as f64).collect::<Vec<_>>());
        if !self.default_scheduler.is_flow() || !c.bool_or("use_dynamic_shifting", false)? {
            return Ok(sigmas.map(|s| FlowShift { sigmas: Some(s), mu: None }));
        }
        let tokens = (width / self.size_factor()) * (height / self.size_factor());
        Ok(Some(FlowShift { sigmas, mu: Some(crate::schedulers::dynamic_shift_mu(c, tokens)?) }))
    }

    /// Unconditional embeddings per prompt: its negative prompt, or "" — or zeros for SDXL-style models
    /// when no negative prompt is given (`force_zeros_for_empty_prompt`).
    fn encode_negative(&self, negatives: &[Option<String>]) -> Result<Encoded> {
        let texts: Vec<String> = negatives.iter().map(|n| n.clone().unwrap_or_default()).collect();
        let encoded = self.encode(&texts)?;
        if !self.force_zeros_for_empty_prompt || negatives.iter().all(Option::is_some) {
            return Ok(encoded);
        }
        let mut ctx = Vec::new();
        let mut pooled = Vec::new();
        for (i, n) in negatives.iter().enumerate() {
            let zero = n.is_none();
            let c = encoded.context.narrow(0, i, 1)?;
            ctx.push(if zero { c.zeros_like()? } else { c });
            if let Some(p) = &encoded.pooled {
                let p = p.narrow(0, i, 1)?;
                pooled.push(if zero { p.zeros_like()? } else { p });
            }
        }
        Ok(Encoded { context: Tensor::cat(&ctx, 0)?, pooled: if pooled.is_empty() { None } else { Some(Tensor::cat(&pooled, 0)?) } })
    }
}

/// A model may state its own sampling recipe in `model_index.json` under `_fresco_defaults`
/// (`{"steps": 20, "guidance": 4.0}`); diffusers ignores keys that start with an underscore. Its
/// `scheduler`, one of `--scheduler`'s names, lets a model sample with one of fresco's own schedulers
/// (`flow-euler-ancestral`) that no diffusers class names; it must fit the folder's scheduler class, which
/// diffusers goes on using. `late_guidance` with `late_guidance_below_timestep` lowers the guidance of the
/// last steps ([`LateGuidance`]); diffusers guides every step with `guidance`.
fn model_defaults(dir: &ModelDir, family_defaults: ModelDefaults, class: SchedulerKind) -> Result<(ModelDefaults, SchedulerKind)> {
    let Some(own) = dir.index.get("_fresco_defaults") else { return Ok((family_defaults, class)) };
    let index = Config::from_value(&dir.root.join("model_index.json"), own.clone());
    let bad = |key: &str, v: String| PipelineError::config(&index.path, format!("_fresco_defaults.{key}: {v}"));
    let steps = index.usize_or("steps", family_defaults.steps)?;
    if steps == 0 || steps > 1000 {
        return Err(bad("steps", format!("must be 1..=1000, got {steps}")));
    }
    let non_negative = |key: &str, v: f64| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(bad(key, format!("must be a non-negative number, got {v}")))
        }
    };
    let guidance = non_negative("guidance", index.f64_or("guidance", family_defaults.guidance)?)?;
    let late_guidance = match (index.opt_f64("late_guidance")?, index.opt_f64("late_guidance_below_timestep")?) {
        (None, None) => None,
        (Some(late), Some(below_timestep)) => {
            let scale = non_negative("late_guidance", late)?;
            if !below_timestep.is_finite() || below_timestep <= 0.0 {
                return Err(bad("late_guidance_below_timestep", format!("must be a positive number, got {below_timestep}")));
            }
            Some(LateGuidance { scale, below_timestep })
        }
        (Some(_), None) => return Err(bad("late_guidance_below_timestep", "is required with late_guidance".into())),
        (None, Some(_)) => return Err(bad("late_guidance", "is required with late_guidance_below_timestep".into())),
    };
    let scheduler = match index.opt_str("scheduler")? {
        None => class,
        Some(name) => {
            let kind = SchedulerKind::from_name(name).map_err(|e| bad("scheduler", e.to_string()))?;
            if kind.is_flow() != class.is_flow() {
                return Err(bad("scheduler", format!("{name} does not fit the scheduler class {}", class.name())));
            }
            kind
        }
    };
    Ok((ModelDefaults { steps, guidance, late_guidance, ..family_defaults }, scheduler))
}

struct Encoded {
    context: Tensor,
    pooled: Option<Tensor>,
}

/// A request's parameters after model defaults are applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Resolved {
    pub steps: usize,
    /// The schedule step sampling starts at: 0, or later for image-to-image ([`InitLatents`]).
    pub start: usize,
    pub guidance: f64,
    pub late_guidance: Option<LateGuidance>,
    pub width: usize,
    pub height: usize,
    pub scheduler: SchedulerKind,
}

impl Resolved {
    /// The guidance scale of the step that evaluates the denoiser at timestep `t`.
    pub fn guidance_at(&self, t: f64) -> f64 {
        match self.late_guidance {
            Some(late) if t < late.below_timestep => late.scale,
            _ => self.guidance,
        }
    }
}
