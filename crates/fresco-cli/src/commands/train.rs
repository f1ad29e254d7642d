//! `fresco train`: trains the bundled fresco-tiny models (both variants) from the procedural shapes world.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use fresco_pipeline::DeviceSpec;
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
    /// Reuse the text encoder of an existing model folder instead of training one.
    #[arg(long)]
    text_from: Option<PathBuf>,
    /// Continue the U-Nets of an earlier run instead of starting fresh ones: the folder that holds its
    /// `fresco-tiny/` and `fresco-tiny-flow/`, as `--out` lays them out. Each trains `--steps` more, on a
    /// schedule of its own (warm-up and cosine decay again, from `--lr`), on the autoencoder and text
    /// encoder it learnt, which `--vae-from` and `--text-from` must name.
    #[arg(long)]
    unet_from: Option<PathBuf>,
    /// Steps of the text encoder's training (before the denoisers; text only, minutes).
    #[arg(long, default_value_t = TrainOptions::default().text.steps)]
    text_steps: usize,
    #[arg(long, default_value_t = TrainOptions::default().text.batch)]
    text_batch: usize,
    #[arg(long, default_value_t = TrainOptions::default().vae.steps)]
    vae_steps: usize,
    #[arg(long, default_value_t = TrainOptions::default().vae.batch)]
    vae_batch: usize,
    #[arg(long, default_value_t = TrainOptions::default().vae.lr)]
    vae_lr: f64,
    /// Steps of the decoder's further training (encoder frozen; beside the denoisers' on the CPU).
    #[arg(long, default_value_t = TrainOptions::default().decoder.steps)]
    decoder_steps: usize,
    #[arg(long, default_value_t = TrainOptions::default().decoder.batch)]
    decoder_batch: usize,
    /// Largest noise, relative to the latents' RMS, the decoder learns to read latents through (0: none).
    #[arg(long, default_value_t = TrainOptions::default().latent_noise)]
    latent_noise: f64,
    /// Shift of the flow variant's training noise levels toward noise, σ ↦ sσ / (1 + (s − 1)σ) as SD3 and
    /// FLUX shift theirs; its scheduler samples with the same shift (1: none).
    #[arg(long, default_value_t = TrainOptions::default().flow_shift)]
    flow_shift: f64,
    /// The diffusion variant's last beta (scaled-linear from 0.00085, as Stable Diffusion's, which end at
    /// 0.012); its scheduler samples with the same betas.
    #[arg(long, default_value_t = TrainOptions::default().beta_end)]
    beta_end: f64,
    /// Weight of the denoisers' auxiliary loss: predicting the clean scene's layout from the U-Net's mid
    /// block, through a head that is not saved (0: denoising alone).
    #[arg(long, default_value_t = TrainOptions::default().layout_weight)]
    layout_weight: f64,
    /// Sub-cells a side the layout loss maps each latent cell as (1, 2, 4 or 8).
    #[arg(long, default_value_t = TrainOptions::default().layout_subcells)]
    layout_subcells: usize,
    /// Weight of a second layout loss, on the U-Net's last up block at 2-pixel cells (0: none).
    #[arg(long, default_value_t = TrainOptions::default().layout_top_weight)]
    layout_top_weight: f64,
    /// Weight of a third, on the mid block: which latent cell each object is centred in (0: none).
    #[arg(long, default_value_t = TrainOptions::default().layout_centre_weight)]
    layout_centre_weight: f64,
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
    /// Skip the closing check of how much of the held-out scenes the autoencoder keeps.
    #[arg(long)]
    no_round_trip: bool,
    /// Child process: only train the decoder of this autoencoder folder further.
    #[arg(long, hide = true)]
    decoder_of: Option<PathBuf>,
    /// Child process: only train the U-Net (`--variant`) of this model folder, which the parent prepared.
    #[arg(long, hide = true)]
    denoiser_of: Option<PathBuf>,
    /// Only tune the decoder of this finished model folder on its own denoiser's samples (in place). The
    /// samples come from `--seed`: tuning a decoder again wants a seed of its own, since the same one
    /// samples the same scenes again.
    #[arg(long)]
    tune_decoder_of: Option<PathBuf>,
    /// Steps of that tuning.
    #[arg(long, default_value_t = TrainOptions::default().tune.steps)]
    tune_steps: usize,
    /// Training scenes the model samples once for it.
    #[arg(long, default_value_t = TrainOptions::default().tune_pool)]
    tune_pool: usize,
    /// The largest share of the model's schedule a tuning sample runs, from the scene's latents noised to
    /// its level (image-to-image strength).
    #[arg(long, default_value_t = TrainOptions::default().tune_strength)]
    tune_strength: f64,
    #[arg(long, default_value_t = TrainOptions::default().tune.lr)]
    tune_lr: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Which {
    Both,
    Diffusion,
    Flow,
}

/// Sampling recipe written into each model's `_fresco_defaults` (steps, guidance).
/// The values are what `fresco eval` sweeps on trained weights chose (models/NOTEBOOK.md: "Sampling
/// choices on today's weights", "The flow model's guidance on today's weights", "The flow model's
/// default steps", "Ancestral sampling").
fn recipe(variant: Variant) -> (usize, f64) {
    match variant {
        Variant::Diffusion => (20, 4.0),
        Variant::Flow => (16, 3.0),
    }
}

/// The architecture to train: the shipped one or the test miniature, with any sizes the flags override
/// (checked with the other options, by [`TrainOptions::validate`]).
fn arch(args: &Args) -> Arch {
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
    arch
}

/// The flag that sets a [`TrainOptions`] field, for errors in the terms the user typed: the field's path
/// in kebab case, the denoiser's schedule and the architecture unprefixed (`denoiser.batch` is
/// `--batch`, `arch.unet_channels` `--unet-channels`).
fn flag_of(field: &str) -> String {
    let name = field.strip_prefix("denoiser.").or_else(|| field.strip_prefix("arch.")).unwrap_or(field);
    format!("--{}", name.replace(['.', '_'], "-"))
}

/// [`TrainOptions::validate`], with the offending field named by its flag.
fn validate(opts: &TrainOptions) -> anyhow::Result<()> {
    opts.validate().map_err(|e| match e {
        fresco_tiny::TinyError::Option { field, problem } => anyhow::anyhow!("{}: {problem}", flag_of(field)),
        other => other.into(),
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    fresco_pipeline::on_compute_pool(|| run_on_pool(args))
}

/// The library's options as the flags set them.
fn options(args: &Args) -> TrainOptions {
    let defaults = TrainOptions::default();
    TrainOptions {
        seed: args.seed,
        arch: arch(args),
        vae: Schedule { steps: args.vae_steps, batch: args.vae_batch, lr: args.vae_lr },
        text: Schedule { steps: args.text_steps, batch: args.text_batch, ..defaults.text },
        decoder: Schedule { steps: args.decoder_steps, batch: args.decoder_batch, ..defaults.decoder },
        denoiser: Schedule { steps: args.steps, batch: args.batch, lr: args.lr },
        tune: Schedule { steps: args.tune_steps, lr: args.tune_lr, ..defaults.tune },
        tune_pool: args.tune_pool,
        tune_strength: args.tune_strength,
        pool: args.pool,
        latent_noise: args.latent_noise,
        flow_shift: args.flow_shift,
        beta_end: args.beta_end,
        layout_weight: args.layout_weight,
        layout_subcells: args.layout_subcells,
        layout_top_weight: args.layout_top_weight,
        layout_centre_weight: args.layout_centre_weight,
        resume: args.unet_from.is_some(),
        device: args.device.clone(),
        ..defaults
    }
}

fn run_on_pool(args: Args) -> anyhow::Result<()> {
    let opts = options(&args);
    // Checked here as well as in each phase, so that a bad value fails before the autoencoder's minutes of
    // training, not after.
    validate(&opts)?;
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

    if let Some(vae_dir) = &args.decoder_of {
        return Part::Decoder.train(vae_dir, &opts, &mut progress);
    }
    if let Some(dir) = &args.denoiser_of {
        let [variant] = variants[..] else {
            anyhow::bail!("--denoiser-of trains one U-Net: give --variant diffusion or flow");
        };
        return Part::Denoiser(variant).train(dir, &opts, &mut progress);
    }
    if let Some(dir) = &args.tune_decoder_of {
        return tune(dir, &opts, &mut progress);
    }
    check_continuation(&args)?;
    // `--vae-from` names a model folder; a freshly trained autoencoder goes into one of its own.
    let (vae_dir, fresh) = match &args.vae_from {
        Some(dir) => (dir.join("vae"), false),
        None => {
            let dir = args.out.join(".vae/vae");
            let scale = train::train_vae(&dir, &opts, &mut progress).context("training the autoencoder")?;
            eprintln!("autoencoder trained: latent scaling factor {scale:.4}");
            (dir, true)
        }
    };
    // Likewise `--text-from`; otherwise one text encoder is trained for both variants.
    let (text_dir, fresh_text) = match &args.text_from {
        Some(dir) => (dir.join("text_encoder"), false),
        None => {
            let dir = args.out.join(".text");
            let read = train::train_text_encoder(&dir, &args.tokenizer, &opts, &mut progress).context("training the text encoder")?;
            eprintln!("text encoder trained: reads {:.1}% of held-out prompts completely right", 100.0 * read);
            (dir.join("text_encoder"), true)
        }
    };
    let decoder = fresh && opts.decoder.steps > 0;
    let parts: Vec<Part> = variants.iter().map(|&v| Part::Denoiser(v)).chain(decoder.then_some(Part::Decoder)).collect();
    // Each denoiser gets its model folder with the autoencoder as it is now (its encoder is final); the
    // decoder's training rewrites only the shared copy, which the folders receive at the end.
    for &variant in &variants {
        prepare_model(&args, &opts, variant, &vae_dir, &text_dir)?;
    }
    run_parts(&args, &opts, &parts, &vae_dir, &mut progress)?;
    if !args.no_round_trip {
        report_round_trip(&args, &vae_dir, &opts)?;
    }
    if fresh_text {
        let dir = args.out.join(".text");
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if fresh {
        // The models get the autoencoder as it ended, decoder training included.
        for &variant in &variants {
            copy_dir(&vae_dir, &args.out.join(variant.folder()).join("vae"))?;
        }
        let dir = args.out.join(".vae");
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    // Last, each model's decoder learns its own U-Net's drawing: it needs both finished.
    if opts.tune.steps > 0 {
        let tunes: Vec<Part> = variants.iter().map(|&v| Part::Tune(v)).collect();
        run_parts(&args, &opts, &tunes, &vae_dir, &mut progress)?;
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A U-Net learnt one autoencoder's latents and one text encoder's states, so continuing it on freshly
/// trained ones (which a rerun does not reproduce to the bit) would spend an hour on a mismatch: with
/// `--unet-from`, both must come from existing folders.
fn check_continuation(args: &Args) -> anyhow::Result<()> {
    if args.unet_from.is_some() && (args.vae_from.is_none() || args.text_from.is_none()) {
        anyhow::bail!("--unet-from continues U-Nets on the autoencoder and text encoder they learnt: give --vae-from and --text-from too");
    }
    Ok(())
}

/// Trains `parts` of the run: on a multi-core CPU side by side, one process and thread each (candle's CPU
/// kernels gain little from a second thread at these sizes; one thread even ran a step faster than two),
/// otherwise one after another in this process.
fn run_parts(args: &Args, opts: &TrainOptions, parts: &[Part], vae_dir: &Path, progress: train::Progress) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if parts.len() > 1 && args.device == DeviceSpec::Cpu && cores > 1 {
        let threads = (cores / parts.len()).max(1).to_string();
        let exe = std::env::current_exe().context("finding the fresco executable")?;
        let children = parts
            .iter()
            .map(|part| {
                std::process::Command::new(&exe)
                    .args(child_args(args, *part, vae_dir))
                    .envs(child_env(&threads, std::env::var_os(PURGE_DELAY).is_some()))
                    .spawn()
                    .with_context(|| format!("starting the {} training", part.name()))
                    .map(|child| (part, child))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (part, mut child) in children {
            let status = child.wait().with_context(|| format!("waiting for the {} training", part.name()))?;
            anyhow::ensure!(status.success(), "training the {} failed ({status})", part.name());
        }
        return Ok(());
    }
    for part in parts {
        part.train(&part.dir(&args.out, vae_dir), opts, progress)?;
    }
    Ok(())
}

/// mimalloc's option for how long freed memory waits before it goes back to the operating system.
const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";

/// The environment of a child training process: its thread count, and mimalloc's purging off unless the
/// caller chose a delay (`caller_set_purge`). A training step frees and reallocates the same few hundred
/// MB of activations and gradients; with purging on, mimalloc returned pages to the kernel between steps
/// and every step faulted them back in, zeroed: 150 steps of a denoiser took 30.6–31.4 s with mimalloc's
/// default and 25.6 s with purging off (two runs each). mimalloc reads the variable when the process
/// starts, which is why only the children, not this process, can be given it.
fn child_env(threads: &str, caller_set_purge: bool) -> Vec<(&'static str, String)> {
    let mut env = vec![("RAYON_NUM_THREADS", threads.to_string())];
    if !caller_set_purge {
        env.push((PURGE_DELAY, "-1".to_string()));
    }
    env
}

/// What one training process works on.
#[derive(Clone, Copy)]
enum Part {
    Denoiser(Variant),
    Decoder,
    /// The variant's decoder, on its own samples.
    Tune(Variant),
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Self::Denoiser(v) => v.name(),
            Self::Decoder => "decoder",
            Self::Tune(v) => match v {
                Variant::Diffusion => "diffusion model's decoder",
                Variant::Flow => "flow model's decoder",
            },
        }
    }

    /// The folder the part trains in: the run's shared autoencoder for the decoder, else its variant's
    /// model folder under `out`.
    fn dir(self, out: &Path, vae_dir: &Path) -> PathBuf {
        match self {
            Self::Decoder => vae_dir.to_path_buf(),
            Self::Denoiser(v) | Self::Tune(v) => out.join(v.folder()),
        }
    }

    /// Trains the part in this process, in `dir` ([`Part::dir`], or the folder a child was given).
    fn train(self, dir: &Path, opts: &TrainOptions, progress: train::Progress) -> anyhow::Result<()> {
        match self {
            Self::Decoder => train::train_decoder(dir, opts, progress).context("training the decoder"),
            Self::Denoiser(v) => train::train_denoiser(dir, v, opts, progress).with_context(|| format!("training {}", dir.display())),
            Self::Tune(_) => tune(dir, opts, progress),
        }
    }
}

/// Tunes the decoder of the model folder `dir` on its own U-Net's samples, as the recipe's last part and
/// as `--tune-decoder-of` alike (the folder, not a variant, says which model).
fn tune(dir: &Path, opts: &TrainOptions, progress: train::Progress) -> anyhow::Result<()> {
    train::tune_decoder(dir, opts, progress).with_context(|| format!("tuning the decoder of {}", dir.display()))
}

/// A model folder's configs, tokenizer, autoencoder and text encoder, ready for its U-Net's training.
fn prepare_model(args: &Args, opts: &TrainOptions, variant: Variant, vae_dir: &Path, text_dir: &Path) -> anyhow::Result<()> {
    let dir = args.out.join(variant.folder());
    let (steps, guidance) = recipe(variant);
    train::write_skeleton(&dir, variant, opts, &args.tokenizer, steps, guidance).with_context(|| format!("writing {}", dir.display()))?;
    copy_dir(vae_dir, &dir.join("vae"))?;
    copy_dir(text_dir, &dir.join("text_encoder"))?;
    if let Some(from) = &args.unet_from {
        let weights = Path::new("unet/diffusion_pytorch_model.safetensors");
        let (src, dst) = (from.join(variant.folder()).join(weights), dir.join(weights));
        train::copy_file(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    }
    Ok(())
}

/// Prints how much of the scenes' content survives the autoencoder, and writes sample pairs.
fn report_round_trip(args: &Args, vae_dir: &Path, opts: &TrainOptions) -> anyhow::Result<()> {
    let round_trip = train::reconstruction_adherence(vae_dir, 200, opts.seed, &opts.device).context("checking the autoencoder")?;
    let a = &round_trip.adherence;
    eprintln!(
        "autoencoder round trip keeps held-out scenes adherent: {:.1}% of one-object ones (circle / square / triangle {}, \
         small / default / large {}), {:.1}% of two-object ones",
        100.0 * a.one,
        fresco_tiny::eval::percents(&a.one_by_shape),
        fresco_tiny::eval::percents(&a.one_by_size),
        100.0 * a.two
    );
    for problem in &round_trip.problems {
        eprintln!("  round trip: {problem}");
    }
    if let Some(grid) = fresco_tiny::eval::grid(&round_trip.samples) {
        let path = args.out.join("round-trip.png");
        std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
        std::fs::write(&path, grid.encode_png(None)?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("round trip samples (rendered above, decoded below): {}", path.display());
    }
    Ok(())
}

/// The arguments of a child `fresco train` that trains one part of this run on its autoencoder.
fn child_args(args: &Args, part: Part, vae_dir: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec!["train".into()];
    let mut flag = |name: &str, value: OsString| {
        out.push(format!("--{name}").into());
        out.push(value);
    };
    let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",").into();
    let dir = part.dir(&args.out, vae_dir).into();
    match part {
        Part::Denoiser(v) => {
            flag("variant", v.name().into());
            flag("denoiser-of", dir);
            flag("flow-shift", args.flow_shift.to_string().into());
            flag("beta-end", args.beta_end.to_string().into());
            flag("layout-weight", args.layout_weight.to_string().into());
            flag("layout-subcells", args.layout_subcells.to_string().into());
            flag("layout-top-weight", args.layout_top_weight.to_string().into());
            flag("layout-centre-weight", args.layout_centre_weight.to_string().into());
            if let Some(from) = &args.unet_from {
                flag("unet-from", from.clone().into());
            }
        }
        Part::Decoder => {
            flag("decoder-of", dir);
            flag("decoder-steps", args.decoder_steps.to_string().into());
            flag("decoder-batch", args.decoder_batch.to_string().into());
            flag("latent-noise", args.latent_noise.to_string().into());
        }
        Part::Tune(_) => {
            flag("tune-decoder-of", dir);
            flag("tune-steps", args.tune_steps.to_string().into());
            flag("tune-pool", args.tune_pool.to_string().into());
            flag("tune-strength", args.tune_strength.to_string().into());
            flag("tune-lr", args.tune_lr.to_string().into());
        }
    }
    flag("out", args.out.clone().into());
    flag("seed", args.seed.to_string().into());
    flag("tokenizer", args.tokenizer.clone().into());
    flag("steps", args.steps.to_string().into());
    flag("batch", args.batch.to_string().into());
    flag("lr", args.lr.to_string().into());
    flag("pool", args.pool.to_string().into());
    flag("device", args.device.to_string().into());
    if let Some(c) = &args.vae_channels {
        flag("vae-channels", list(c));
    }
    if let Some(c) = args.latent_channels {
        flag("latent-channels", c.to_string().into());
    }
    if let Some(c) = &args.unet_channels {
        flag("unet-channels", list(c));
    }
    if args.test_arch {
        out.push("--test-arch".into());
    }
    out
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let path = entry.with_context(|| format!("reading {}", from.display()))?.path();
        if path.is_file() {
            let name = path.file_name().unwrap_or_default();
            train::copy_file(&path, &to.join(name)).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The committed model folders sample with the recipe training writes, so a retrained model samples
    /// as the shipped one does (its late guidance included).
    #[test]
    fn the_shipped_model_indexes_are_the_ones_training_writes() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        for variant in [Variant::Diffusion, Variant::Flow] {
            let path = models.join(variant.folder()).join("model_index.json");
            let shipped: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("model index")).expect("json");
            let (steps, guidance) = recipe(variant);
            assert_eq!(shipped, fresco_tiny::arch::model_index(variant, steps, guidance), "{}", path.display());
        }
    }

    fn parse<I: IntoIterator<Item = OsString>>(args: I) -> Args {
        match crate::Cli::try_parse_from(std::iter::once(OsString::from("fresco")).chain(args)).expect("parses").command {
            crate::Command::Train(a) => a,
            _ => panic!("not a train command"),
        }
    }

    /// Every option the library rejects is reported by the flag that set it, before any training starts.
    #[test]
    fn bad_options_are_named_by_their_flags() {
        assert!(validate(&options(&parse(["train".into()]))).is_ok(), "the defaults are valid");
        let cases = [
            ("--vae-batch", "0"),
            ("--text-batch", "0"),
            ("--decoder-batch", "0"),
            ("--batch", "0"),
            ("--vae-lr", "0"),
            ("--lr", "NaN"),
            ("--steps", "1"),
            ("--pool", "0"),
            ("--tune-pool", "0"),
            ("--tune-strength", "0"),
            ("--tune-strength", "1.5"),
            ("--latent-noise", "-0.1"),
            ("--flow-shift", "0"),
            ("--beta-end", "1.5"),
            ("--beta-end", "0.0005"),
            ("--layout-weight", "-1"),
            ("--layout-top-weight", "-0.5"),
            ("--layout-centre-weight", "-0.5"),
            ("--layout-subcells", "3"),
            ("--layout-subcells", "16"),
            ("--vae-channels", "16,16,32"),
            ("--vae-channels", "16,16,31,32"),
            ("--unet-channels", "24,48"),
            ("--latent-channels", "0"),
        ];
        for (flag, value) in cases {
            let err = validate(&options(&parse(["train".into(), format!("{flag}={value}").into()]))).expect_err(flag).to_string();
            assert!(err.starts_with(&format!("{flag}: ")), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn continued_unets_need_the_parts_they_learnt() {
        let check = |line: &str| check_continuation(&parse(line.split(' ').map(OsString::from)));
        assert!(check("train").is_ok());
        assert!(check("train --unet-from m --vae-from m/fresco-tiny --text-from m/fresco-tiny").is_ok());
        for line in ["train --unet-from m", "train --unet-from m --vae-from m/fresco-tiny", "train --unet-from m --text-from m/fresco-tiny"]
        {
            assert!(check(line).expect_err(line).to_string().starts_with("--unet-from"), "{line}");
        }
    }

    #[test]
    fn children_keep_their_memory_unless_the_caller_chose_otherwise() {
        assert_eq!(child_env("1", false), [("RAYON_NUM_THREADS", "1".to_string()), (PURGE_DELAY, "-1".to_string())]);
        // A delay set by the caller is inherited as it is.
        assert_eq!(child_env("2", true), [("RAYON_NUM_THREADS", "2".to_string())]);
    }

    /// A child process trains exactly what its parent was asked to, plus its own part.
    #[test]
    fn child_processes_get_the_parents_settings() {
        let line = "train --out /tmp/m --seed 7 --tokenizer /tmp/tok --steps 9 --batch 3 --lr 0.002 --pool 5 \
                    --decoder-steps 11 --decoder-batch 4 --latent-noise 0.25 --tune-steps 12 --tune-pool 6 --tune-strength 0.5 --tune-lr 0.003 --flow-shift 2.5 --beta-end 0.03 --layout-weight 0.2 --layout-subcells 2 --layout-top-weight 0.4 --layout-centre-weight 0.3 --vae-channels 8,8,16,16 --latent-channels 4 --unet-channels 16,32 --unet-from /tmp/prev --test-arch";
        let parent = parse(line.split(' ').map(OsString::from));
        let vae = Path::new("/tmp/m/.vae/vae");
        let same = |c: &Args| {
            (c.out == parent.out && c.seed == 7 && c.tokenizer == parent.tokenizer && c.steps == 9 && c.batch == 3 && c.lr == 0.002)
                && (c.pool == 5
                    && c.vae_channels == parent.vae_channels
                    && c.latent_channels == Some(4)
                    && c.unet_channels == parent.unet_channels)
                && (c.test_arch && c.device == DeviceSpec::Cpu)
        };
        let flow = parse(child_args(&parent, Part::Denoiser(Variant::Flow), vae));
        assert!(same(&flow));
        assert!(
            flow.variant == Which::Flow
                && flow.denoiser_of.as_deref() == Some(Path::new("/tmp/m/fresco-tiny-flow"))
                && (flow.flow_shift, flow.beta_end, flow.layout_weight, flow.layout_subcells, flow.layout_top_weight)
                    == (2.5, 0.03, 0.2, 2, 0.4)
                && flow.layout_centre_weight == 0.3
                && options(&flow).resume
                && flow.unet_from.as_deref() == Some(Path::new("/tmp/prev"))
                && (flow.decoder_of.is_none() && flow.tune_decoder_of.is_none())
        );
        let decoder = parse(child_args(&parent, Part::Decoder, vae));
        assert!(same(&decoder));
        assert!(
            decoder.decoder_of.as_deref() == Some(vae)
                && (decoder.decoder_steps, decoder.decoder_batch, decoder.latent_noise) == (11, 4, 0.25)
        );
        let tune = parse(child_args(&parent, Part::Tune(Variant::Diffusion), vae));
        assert!(same(&tune));
        assert!(
            tune.tune_decoder_of.as_deref() == Some(Path::new("/tmp/m/fresco-tiny"))
                && (tune.tune_steps, tune.tune_pool, tune.tune_strength, tune.tune_lr) == (12, 6, 0.5, 0.003)
                && (tune.decoder_of.is_none() && tune.denoiser_of.is_none())
        );
    }
}
