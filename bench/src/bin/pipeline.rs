//! Sampler speed: seconds per denoising step and images/s at batch 1, 4 and 16 for the reference
//! fixtures, and seconds per U-Net evaluation for an SD 1.5-sized U-Net (block_out_channels
//! 320/640/1280/1280) with random weights at 512×512. `bench/torch_unet.py` times PyTorch on the same
//! shapes for comparison.
//!
//! `cargo run --release -p fresco-bench --bin pipeline [-- [--device cpu|cuda[:N]] [--sd15 BATCH...]]`
//! (`--features cuda` for a GPU).

// The library holds the benchmarks' global allocator (mimalloc, as in the `fresco` binary); rustc
// links a crate only when something names it, so without this line the numbers are glibc malloc's.
use fresco_bench as _;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use fresco_pipeline::models::unet::{UNet, UNetConfig};
use fresco_pipeline::{DeviceSpec, Pipeline, Request};

const SD15_UNET: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
  "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 64
}"#;

fn fixtures(spec: &DeviceSpec, batches: &[usize]) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    println!("{:<10} {:>5} {:>6} {:>12} {:>10} {:>10} {:>10}", "fixture", "batch", "steps", "s/step", "images/s", "s encode", "s decode");
    for model in ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux"] {
        if !root.join(model).is_dir() {
            println!("{model:<10} not present, skipped"); // a partial copy of the fixtures (a GPU machine's)
            continue;
        }
        let pipe = Pipeline::load(&root.join(model), spec)?;
        for &b in batches {
            let prompts: Vec<String> = (0..b).map(|i| format!("a red circle number {i}")).collect();
            let mut req = Request::new(prompts, (0..b as u64).collect());
            req.steps = Some(8);
            req.width = Some(64);
            req.height = Some(64);
            pipe.generate(&req)?; // warm-up
            let started = Instant::now();
            let (_, t) = pipe.generate_timed(&req)?;
            let total = started.elapsed().as_secs_f64();
            println!(
                "{model:<10} {b:>5} {:>6} {:>12.4} {:>10.2} {:>10.4} {:>10.4}",
                t.steps,
                t.denoise.as_secs_f64() / t.steps as f64,
                b as f64 / total,
                t.encode.as_secs_f64(),
                t.decode.as_secs_f64()
            );
        }
    }
    Ok(())
}

fn sd15_unet(spec: &DeviceSpec, batches: &[usize]) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join("fresco-bench-sd15");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("config.json"), SD15_UNET)?;
    let cfg = UNetConfig::load(&dir.join("config.json"))?;
    let device = spec.device()?;
    let varmap = candle_nn::VarMap::new();
    // Drawing the weights through a VarMap, then running on plain tensors, as loaded weights are:
    // variables would select the training code paths and keep every intermediate for a backward pass.
    UNet::new(cfg.clone(), VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    let weights: std::collections::HashMap<String, Tensor> =
        varmap.data().lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
    let unet = UNet::new(cfg, VarBuilder::from_tensors(weights, DType::F32, &device))?;
    println!("SD 1.5-sized U-Net (random weights), 512×512 (64×64 latents), CFG doubles the batch:");
    println!("{:>5} {:>14} {:>12}", "batch", "s/evaluation", "s/step (cfg)");
    for &b in batches {
        let rows = 2 * b;
        let x = Tensor::randn(0f32, 1f32, (rows, 4, 64, 64), &device)?;
        let ctx = Tensor::randn(0f32, 1f32, (rows, 77, 768), &device)?;
        if !device.is_cpu() {
            unet.forward(&x, 500.0, &ctx, None)?; // warm-up: kernel loading and cuBLAS plans
            device.synchronize()?;
        }
        let started = Instant::now();
        // On a pool thread, as `Pipeline::generate` runs it.
        fresco_pipeline::on_compute_pool(|| unet.forward(&x, 500.0, &ctx, None))?;
        device.synchronize()?;
        let secs = started.elapsed().as_secs_f64();
        println!("{b:>5} {:>14.2} {:>12.2}", secs, secs);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    fresco_pipeline::set_process_defaults(); // as the `fresco` binary does
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut spec = DeviceSpec::Cpu;
    if let Some(i) = args.iter().position(|a| a == "--device") {
        let value = args.get(i + 1).ok_or_else(|| anyhow::anyhow!("--device needs a value"))?;
        spec = value.parse().map_err(anyhow::Error::msg)?;
        args.drain(i..i + 2);
    }
    println!("device: {spec:?}");
    if args.first().map(String::as_str) == Some("--sd15") {
        let batches: Vec<usize> = args[1..].iter().filter_map(|a| a.parse().ok()).collect();
        return sd15_unet(&spec, if batches.is_empty() { &[1] } else { &batches });
    }
    fixtures(&spec, &[1, 4, 16])
}
