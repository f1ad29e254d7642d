//! Parity with diffusers: every reference case in `tests/fixtures/cases` is regenerated from the same
//! initial latents and compared per image (max |Δ| ≤ 2, mean |Δ| ≤ 0.75 on the 0–255 scale).

use std::path::{Path, PathBuf};

use candle_core::Device;
use fresco_pipeline::{DeviceSpec, Pipeline, Request};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn read_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

fn run_case(name: &str) {
    let dir = fixtures().join("cases").join(name);
    let case: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let model = fixtures().join("models").join(case["model"].as_str().unwrap());
    let pipe = Pipeline::load(&model, &DeviceSpec::Cpu).unwrap();
    let prompts: Vec<String> = case["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let latents = candle_core::safetensors::load(dir.join("latents.safetensors"), &Device::Cpu).unwrap().remove("latents").unwrap();
    let mut req = Request::new(prompts.clone(), vec![0; prompts.len()]);
    req.negative_prompts = vec![case["negative_prompt"].as_str().map(str::to_string); prompts.len()];
    req.steps = Some(case["steps"].as_u64().unwrap() as usize);
    req.guidance = Some(case["guidance"].as_f64().unwrap());
    req.width = Some(case["width"].as_u64().unwrap() as usize);
    req.height = Some(case["height"].as_u64().unwrap() as usize);
    req.scheduler = case["scheduler"].as_str().map(str::to_string);
    req.latents = Some(latents);
    let images = pipe.generate(&req).unwrap();
    for (i, out) in case["outputs"].as_array().unwrap().iter().enumerate() {
        let (w, h, want) = read_png(&dir.join(out.as_str().unwrap()));
        assert_eq!((images[i].width, images[i].height), (w, h));
        let diffs: Vec<f64> = want.iter().zip(&images[i].rgb).map(|(a, b)| (*a as f64 - *b as f64).abs()).collect();
        let max = diffs.iter().copied().fold(0.0, f64::max);
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        eprintln!("{name} image {i}: max |diff| {max}, mean |diff| {mean:.4}");
        assert!(max <= 2.0 && mean <= 0.75, "{name} image {i}: max {max} mean {mean}");
    }
}

#[test]
fn sd15_ddim() {
    run_case("sd15-ddim");
}

#[test]
fn sd15_euler_negative() {
    run_case("sd15-euler-negative");
}

#[test]
fn sdxl_euler_negative() {
    run_case("sdxl-euler-negative");
}

#[test]
fn sd3_euler_cfg() {
    run_case("sd3-euler-cfg");
}

#[test]
fn flux_schnell_4step() {
    run_case("flux-schnell-4step");
}
