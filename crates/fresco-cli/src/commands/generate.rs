//! `fresco generate`: the pipeline on its own, for trying a model or reproducing an image.

use std::path::PathBuf;

use anyhow::{bail, Context};
use fresco_pipeline::{DeviceSpec, ParametersText, Pipeline, Request};

#[derive(clap::Args)]
pub struct Args {
    /// Model folder in the diffusers layout.
    #[arg(long)]
    model: PathBuf,
    /// A prompt; repeat for a batch (one image each, in order).
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    guidance: Option<f64>,
    /// ddim, pndm, euler, euler-ancestral, dpmpp-2m, dpmpp-2m-karras, lcm; flow-euler or flow-euler-ancestral for
    /// flow-matching models (default: the model's own).
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Seed of the first image; image i uses fresco's derived seed (seed, i). Random when omitted.
    #[arg(long, conflicts_with = "latents")]
    seed: Option<u64>,
    /// safetensors file with `latents` [B, C, H/8, W/8]: initial noise used as diffusers' `latents=`.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long)]
    out_dir: PathBuf,
    /// png (default, with a `parameters` text chunk), jpeg or webp.
    #[arg(long, default_value = "png")]
    format: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.prompts.is_empty() {
        bail!("--prompt: at least one prompt is required");
    }
    let format: fresco_core::ImageFormat = args.format.parse().map_err(|e: String| anyhow::anyhow!("--format: {e}"))?;
    let pipe = Pipeline::load(&args.model, &args.device)?;
    let n = args.prompts.len();
    let base_seed = args.seed.unwrap_or_else(rand_seed);
    let seeds: Vec<u64> = (0..n as u64).map(|i| fresco_core::derive_seed(base_seed, i)).collect();
    let mut req = Request::new(args.prompts.clone(), seeds.clone());
    req.negative_prompts = vec![args.negative_prompt.clone(); n];
    req.steps = args.steps;
    req.guidance = args.guidance;
    req.width = args.width;
    req.height = args.height;
    req.scheduler = args.scheduler.clone();
    if let Some(path) = &args.latents {
        let mut tensors =
            candle_core::safetensors::load(path, pipe.device()).with_context(|| format!("{}: cannot read safetensors", path.display()))?;
        let latents = tensors.remove("latents").with_context(|| format!("{}: no tensor named \"latents\"", path.display()))?;
        if latents.dims().first() != Some(&n) {
            bail!("{}: latents hold {:?} images but {n} prompts were given", path.display(), latents.dims().first());
        }
        req.latents = Some(latents.to_dtype(candle_core::DType::F32)?);
    }
    let resolved = pipe.resolve(&req)?;
    let (images, timings) = pipe.generate_timed(&req)?;
    std::fs::create_dir_all(&args.out_dir).with_context(|| format!("{}: cannot create", args.out_dir.display()))?;
    for (i, img) in images.iter().enumerate() {
        let text = ParametersText {
            prompt: &args.prompts[i],
            negative_prompt: args.negative_prompt.as_deref(),
            steps: resolved.steps,
            scheduler: resolved.scheduler.name(),
            guidance: resolved.guidance,
            late_guidance: resolved.late_guidance,
            seed: args.latents.is_none().then_some(seeds[i]),
            width: resolved.width,
            height: resolved.height,
            model: &pipe.name,
        }
        .to_string();
        let path = args.out_dir.join(format!("{i:04}.{}", format.extension()));
        std::fs::write(&path, img.encode(format, Some(&text))?).with_context(|| format!("{}: cannot write", path.display()))?;
    }
    eprintln!(
        "{n} image(s) in {} ({} steps: encode {:.2}s, denoise {:.2}s, decode {:.2}s)",
        args.out_dir.display(),
        timings.steps,
        timings.encode.as_secs_f64(),
        timings.denoise.as_secs_f64(),
        timings.decode.as_secs_f64()
    );
    Ok(())
}

fn rand_seed() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    fresco_core::seed::mix64(nanos ^ std::process::id() as u64) >> 1
}
