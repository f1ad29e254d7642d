//! `fresco train`: trains the bundled fresco-tiny models (both variants) from the procedural shapes world.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use fresco_tiny::train::{self, Schedule, TrainOptions};
use fresco_tiny::{Arch, Variant};

#[derive(clap::Args)]
pub struct Args {
    /// Folder that receives `fresco-tiny/` and `fresco-tiny-flow/`.
    #[arg(long, default_value = "models")]
    out: PathBuf,
    /// Seed of every random draw: initial weights, scenes, noise, timesteps.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// CLIP tokenizer folder (vocab.json + merges.txt) the models are built on.
    #[arg(long, default_value = "tests/fixtures/models/tiny-sd15/tokenizer")]
    tokenizer: PathBuf,
    /// Which variants to train.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    variant: Which,
    /// Reuse the autoencoder of an existing model folder instead of training one.
    #[arg(long)]
    vae_from: Option<PathBuf>,
    #[arg(long, default_value_t = TrainOptions::default().vae.steps)]
    vae_steps: usize,
    #[arg(long, default_value_t = TrainOptions::default().vae.batch)]
    vae_batch: usize,
    #[arg(long, default_value_t = TrainOptions::default().denoiser.steps)]
    steps: usize,
    #[arg(long, default_value_t = TrainOptions::default().denoiser.batch)]
    batch: usize,
    #[arg(long, default_value_t = TrainOptions::default().denoiser.lr)]
    lr: f64,
    /// Rendered scenes encoded once for denoiser training.
    #[arg(long, default_value_t = TrainOptions::default().pool)]
    pool: usize,
    /// Autoencoder block widths, full resolution first (default: the shipped architecture's).
    #[arg(long, value_delimiter = ',')]
    vae_channels: Option<Vec<usize>>,
    /// Channels of the latent the U-Net works in.
    #[arg(long)]
    latent_channels: Option<usize>,
    /// U-Net block widths, full latent resolution first.
    #[arg(long, value_delimiter = ',')]
    unet_channels: Option<Vec<usize>>,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: fresco_pipeline::DeviceSpec,
    /// Train the miniature test architecture (seconds, not minutes; for trying the command out).
    #[arg(long)]
    test_arch: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Both,
    Diffusion,
    Flow,
}

/// Sampling recipe written into each model's `_fresco_defaults` (steps, guidance).
fn recipe(variant: Variant) -> (usize, f64) {
    match variant {
        Variant::Diffusion => (20, 4.0),
        Variant::Flow => (8, 3.0),
    }
}

/// The architecture to train: the shipped one or the test miniature, with any sizes the flags override.
fn arch(args: &Args) -> anyhow::Result<Arch> {
    let mut arch = if args.test_arch { Arch::test() } else { Arch::default() };
    if let Some(c) = &args.vae_channels {
        arch.vae_channels = c.clone();
    }
    if let Some(c) = args.latent_channels {
        arch.latent_channels = c;
    }
    if let Some(c) = &args.unet_channels {
        arch.unet_channels = c.clone();
    }
    for (flag, widths, groups) in [("--vae-channels", &arch.vae_channels, arch.vae_groups), ("--unet-channels", &arch.unet_channels, arch.unet_groups)] {
        anyhow::ensure!(
            !widths.is_empty() && widths.iter().all(|&w| w > 0 && w % groups == 0),
            "{flag}: every width must be a positive multiple of {groups} (the group-norm groups)"
        );
    }
    anyhow::ensure!(
        arch.unet_channels.iter().all(|w| w % arch.unet_head_dim == 0),
        "--unet-channels: every width must be a multiple of the attention head size {}",
        arch.unet_head_dim
    );
    // The pipeline's 8× autoencoder factor is 2^(blocks − 1).
    anyhow::ensure!(arch.vae_channels.len() == 4, "--vae-channels: fresco-tiny's autoencoder has 4 blocks (8× downsampling)");
    anyhow::ensure!(arch.latent_channels > 0, "--latent-channels must be positive");
    Ok(arch)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let defaults = TrainOptions::default();
    let opts = TrainOptions {
        seed: args.seed,
        arch: arch(&args)?,
        vae: Schedule { steps: args.vae_steps, batch: args.vae_batch, ..defaults.vae },
        denoiser: Schedule { steps: args.steps, batch: args.batch, lr: args.lr },
        pool: args.pool,
        device: args.device.clone(),
        ..defaults
    };
    anyhow::ensure!(opts.vae.batch > 0 && opts.denoiser.batch > 0 && opts.pool > 0, "--vae-batch, --batch and --pool must be positive");
    let variants: Vec<Variant> = match args.variant {
        Which::Both => vec![Variant::Diffusion, Variant::Flow],
        Which::Diffusion => vec![Variant::Diffusion],
        Which::Flow => vec![Variant::Flow],
    };
    let started = Instant::now();
    let mut last_print = (Instant::now(), 0usize);
    let mut progress = |phase: &str, step: usize, total: usize, loss: f32| {
        if step < last_print.1 {
            last_print = (Instant::now(), 0);
        }
        let since = last_print.0.elapsed().as_secs_f64();
        if step == total || since > 10.0 {
            let per = since / (step - last_print.1).max(1) as f64;
            last_print = (Instant::now(), step);
            eprintln!("[{:>6.0} s] {phase:<9} {step:>6}/{total} loss {loss:.5} ({per:.3} s/step)", started.elapsed().as_secs_f64());
        }
    };

    let vae_dir = match &args.vae_from {
        Some(dir) => dir.join("vae"),
        None => {
            let dir = args.out.join(".vae");
            let scale = train::train_vae(&dir, &opts, &mut progress).context("training the autoencoder")?;
            eprintln!("autoencoder trained: latent scaling factor {scale:.4}");
            dir
        }
    };
    let round_trip = train::reconstruction_adherence(&vae_dir, 200, opts.seed, &opts.device).context("checking the autoencoder")?;
    eprintln!("autoencoder round trip keeps {:.1}% of held-out scenes adherent", 100.0 * round_trip);
    for variant in variants {
        let dir = args.out.join(variant.folder());
        let (steps, guidance) = recipe(variant);
        train::write_skeleton(&dir, variant, &opts.arch, &args.tokenizer, steps, guidance).with_context(|| format!("writing {}", dir.display()))?;
        copy_dir(&vae_dir, &dir.join("vae"))?;
        train::train_denoiser(&dir, variant, &opts, &mut progress).with_context(|| format!("training {}", dir.display()))?;
        eprintln!("{} written ({:.0} s so far)", dir.display(), started.elapsed().as_secs_f64());
    }
    if args.vae_from.is_none() {
        let dir = args.out.join(".vae");
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    if from == to {
        return Ok(());
    }
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for name in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(from.join(name), to.join(name)).with_context(|| format!("copying {}", from.join(name).display()))?;
    }
    Ok(())
}
