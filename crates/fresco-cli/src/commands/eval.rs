//! `fresco eval`: prompt adherence of fresco-tiny models on held-out prompts, by step count.

use std::path::PathBuf;

use anyhow::Context;
use fresco_tiny::eval::{self, EvalOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Model folders to evaluate (fresco-tiny world models).
    #[arg(long = "model", default_values = ["models/fresco-tiny", "models/fresco-tiny-flow"])]
    models: Vec<PathBuf>,
    /// Held-out prompts of each kind (one object phrase, two object phrases).
    #[arg(long, default_value_t = EvalOptions::default().prompts)]
    prompts: usize,
    /// Step counts to compare (comma-separated); each model's default is added.
    #[arg(long, value_delimiter = ',', default_values_t = EvalOptions::default().steps)]
    steps: Vec<usize>,
    #[arg(long, default_value_t = EvalOptions::default().seed)]
    seed: u64,
    /// Guidance scale (default: each model's own).
    #[arg(long)]
    guidance: Option<f64>,
    /// Sample grid: a row of images per model and step count.
    #[arg(long, default_value = "eval-grid.png")]
    grid: PathBuf,
    /// Images per grid row.
    #[arg(long, default_value_t = 10)]
    columns: usize,
    /// cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: fresco_pipeline::DeviceSpec,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.prompts > 0, "--prompts must be positive");
    anyhow::ensure!(args.steps.iter().all(|&s| s > 0), "--steps: every step count must be positive");
    let opts = EvalOptions {
        prompts: args.prompts,
        steps: args.steps,
        seed: args.seed,
        guidance: args.guidance,
        device: args.device,
        ..Default::default()
    };
    let mut rows = Vec::new();
    let mut grid_rows = Vec::new();
    for model in &args.models {
        let (r, samples) = eval::evaluate(model, &opts, args.columns).with_context(|| format!("evaluating {}", model.display()))?;
        eprint!("{}", eval::table(&r));
        rows.extend(r);
        grid_rows.extend(samples);
    }
    println!("{}", eval::table(&rows));
    println!("{}", eval::failure_table(&rows, 2 * args.prompts));
    if let Some(grid) = eval::grid(&grid_rows) {
        let png = grid.encode_png(None)?;
        std::fs::write(&args.grid, png).with_context(|| format!("writing {}", args.grid.display()))?;
        println!("sample grid: {} (rows: each model at each step count, in the table's order)", args.grid.display());
    }
    Ok(())
}
