//! Pipeline behaviour beyond parity: batches equal single runs, seeds reproduce, and bad input gives a clear
//! error naming the file or parameter — never a panic.
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::path::{Path, PathBuf};

use fresco_pipeline::{DeviceSpec, Pipeline, PipelineError, Request};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn request(prompts: &[&str], seeds: &[u64]) -> Request {
    let mut r = Request::new(prompts.iter().map(|p| p.to_string()).collect(), seeds.to_vec());
    r.steps = Some(4);
    // FLUX defaults to 1024 px; the tiny fixtures are made for 64.
    r.width = Some(64);
    r.height = Some(64);
    r
}

#[test]
fn a_batch_equals_its_single_runs_and_seeds_reproduce() {
    for model in ["tiny-sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux"] {
        let pipe = Pipeline::load(&fixture(model), &DeviceSpec::Cpu).unwrap();
        let mut batch = request(&["a red circle", "a blue square", "two green triangles"], &[11, 22, 33]);
        batch.negative_prompts = vec![None, Some("blurry".into()), None];
        let together = pipe.generate(&batch).unwrap();
        assert_eq!(together.len(), 3, "{model}: one image per prompt");
        for (i, image) in together.iter().enumerate() {
            let mut single = request(&[batch.prompts[i].as_str()], &[batch.seeds[i]]);
            single.negative_prompts = vec![batch.negative_prompts[i].clone()];
            let alone = pipe.generate(&single).unwrap();
            // Bit for bit: a matrix product's rounding does not depend on its row count (models/matmul.rs).
            assert!(image == &alone[0], "{model}: image {i} differs between batch and single run");
        }
        let again = pipe.generate(&batch).unwrap();
        assert_eq!(together, again, "{model}: same seeds, different images");
        let other = pipe.generate(&request(&["a red circle"], &[12])).unwrap();
        assert_ne!(other[0], together[0], "{model}: the seed does not matter");
    }
}

fn load_err(dir: &Path) -> String {
    match Pipeline::load(dir, &DeviceSpec::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn broken_model_folders_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_dir(&fixture("tiny-sd15"), &model);

    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&model);
    assert!(e.contains("unet/diffusion_pytorch_model.safetensors") && e.contains("truncated"), "{e}");
    std::fs::write(&weights, b"not safetensors at all").unwrap();
    assert!(load_err(&model).contains("unet/diffusion_pytorch_model.safetensors"));
    std::fs::write(&weights, &bytes).unwrap();

    std::fs::rename(model.join("vae"), tmp.path().join("vae-away")).unwrap();
    assert!(load_err(&model).contains("vae"), "missing component");
    std::fs::rename(tmp.path().join("vae-away"), model.join("vae")).unwrap();

    let index = model.join("model_index.json");
    let original = std::fs::read_to_string(&index).unwrap();
    std::fs::write(&index, original.replace("StableDiffusionPipeline", "KandinskyPipeline")).unwrap();
    let e = load_err(&model);
    assert!(e.contains("model_index.json") && e.contains("KandinskyPipeline"), "{e}");
    std::fs::write(&index, "{ not json").unwrap();
    assert!(load_err(&model).contains("model_index.json"));
    std::fs::write(&index, &original).unwrap();

    let unet_config = model.join("unet/config.json");
    let cfg = std::fs::read_to_string(&unet_config).unwrap();
    std::fs::write(&unet_config, cfg.replace("\"CrossAttnDownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"")).unwrap();
    let e = load_err(&model);
    assert!(e.contains("unet/config.json") && e.contains("SimpleCrossAttnDownBlock2D"), "{e}");
    std::fs::write(&unet_config, cfg.replace("\"cross_attention_dim\": 32", "\"cross_attention_dim\": 48")).unwrap();
    assert!(load_err(&model).contains("unet"), "weights that do not match the config");
    std::fs::write(&unet_config, &cfg).unwrap();

    std::fs::remove_file(model.join("tokenizer/merges.txt")).unwrap();
    assert!(load_err(&model).contains("merges.txt"));
    assert!(load_err(&tmp.path().join("nowhere")).contains("nowhere"));
}

/// SD3.5's transformer options are read from its config; values no published model uses are refused by
/// name rather than run as something else.
#[test]
fn sd35_transformer_options_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("sd35");
    copy_dir(&fixture("tiny-sd35"), &model);
    Pipeline::load(&model, &DeviceSpec::Cpu).unwrap();
    let config = model.join("transformer/config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, original.replace("\"rms_norm\"", "\"layer_norm_across_heads\"")).unwrap();
    let e = load_err(&model);
    assert!(e.contains("transformer/config.json") && e.contains("qk_norm") && e.contains("layer_norm_across_heads"), "{e}");
    std::fs::write(&config, original.replace("\"dual_attention_layers\": [\n    0\n  ]", "\"dual_attention_layers\": [3]")).unwrap();
    let e = load_err(&model);
    assert!(e.contains("dual_attention_layers") && e.contains("num_layers is 3"), "{e}");
    // Without the dual-attention weights' block marked, the checkpoint no longer matches the config.
    std::fs::write(&config, original.replace("\"dual_attention_layers\": [\n    0\n  ]", "\"dual_attention_layers\": []")).unwrap();
    assert!(load_err(&model).contains("transformer"));
}

#[test]
fn bad_parameters_name_the_parameter() {
    let pipe = Pipeline::load(&fixture("tiny-sd15"), &DeviceSpec::Cpu).unwrap();
    let field = |r: Request| match pipe.generate(&r) {
        Err(PipelineError::InvalidParam { field, .. }) => field,
        other => panic!("expected a parameter error, got {other:?}"),
    };
    assert_eq!(field(Request::new(vec![], vec![])), "prompt");
    assert_eq!(field(Request { steps: Some(0), ..request(&["x"], &[1]) }), "steps");
    assert_eq!(field(Request { width: Some(60), ..request(&["x"], &[1]) }), "width");
    assert_eq!(field(Request { height: Some(0), ..request(&["x"], &[1]) }), "height");
    assert_eq!(field(Request { guidance: Some(f64::NAN), ..request(&["x"], &[1]) }), "guidance");
    assert_eq!(field(Request { scheduler: Some("flow-euler".into()), ..request(&["x"], &[1]) }), "scheduler");
    assert_eq!(field(Request { scheduler: Some("heun".into()), ..request(&["x"], &[1]) }), "scheduler");
    assert_eq!(field(request(&["  "], &[1])), "prompt[0]");
    let flux = Pipeline::load(&fixture("tiny-flux"), &DeviceSpec::Cpu).unwrap();
    // FLUX packs 2×2 latents: sizes must be multiples of 16.
    assert!(
        matches!(flux.generate(&Request { width: Some(72), ..request(&["x"], &[1]) }), Err(PipelineError::InvalidParam { field, .. }) if field == "width")
    );
    assert!(
        matches!(flux.generate(&Request { scheduler: Some("ddim".into()), ..request(&["x"], &[1]) }), Err(PipelineError::InvalidParam { field, .. }) if field == "scheduler")
    );
}

#[test]
fn every_scheduler_runs_on_diffusion_models() {
    let pipe = Pipeline::load(&fixture("tiny-sdxl"), &DeviceSpec::Cpu).unwrap();
    for s in ["ddim", "pndm", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras", "lcm"] {
        let r = Request { scheduler: Some(s.into()), steps: Some(6), ..request(&["a red circle"], &[5]) };
        let a = pipe.generate(&r).unwrap();
        assert_eq!(a, pipe.generate(&r).unwrap(), "{s} is not reproducible");
        assert!(a[0].rgb.iter().any(|v| *v != a[0].rgb[0]), "{s} produced a flat image");
    }
}

/// Published checkpoints come sharded (`*.safetensors.index.json`) or as `*.fp16.safetensors` variants.
#[test]
fn sharded_and_fp16_weights_load() {
    use candle_core::{DType, Device};
    let tmp = tempfile::tempdir().unwrap();
    let original = Pipeline::load(&fixture("tiny-sd15"), &DeviceSpec::Cpu).unwrap();
    let reference = original.generate(&request(&["a red circle"], &[3])).unwrap();

    // Sharded U-Net: two files and an index mapping every tensor to its shard.
    let sharded = tmp.path().join("sharded");
    copy_dir(&fixture("tiny-sd15"), &sharded);
    let unet = sharded.join("unet");
    let tensors = candle_core::safetensors::load(unet.join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in
        [("diffusion_pytorch_model-00001-of-00002.safetensors", first), ("diffusion_pytorch_model-00002-of-00002.safetensors", second)]
    {
        let shard: std::collections::HashMap<String, candle_core::Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&shard, unet.join(file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.into());
        }
    }
    std::fs::write(
        unet.join("diffusion_pytorch_model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let from_shards = Pipeline::load(&sharded, &DeviceSpec::Cpu).unwrap().generate(&request(&["a red circle"], &[3])).unwrap();
    assert_eq!(from_shards, reference, "sharded weights must give the same image");

    // A missing shard is named.
    std::fs::remove_file(unet.join("diffusion_pytorch_model-00002-of-00002.safetensors")).unwrap();
    assert!(load_err(&sharded).contains("00002-of-00002"));

    // fp16 variant only: loads, converted to f32, and stays close.
    let half = tmp.path().join("fp16");
    copy_dir(&fixture("tiny-sd15"), &half);
    let unet = half.join("unet");
    let f16: std::collections::HashMap<String, candle_core::Tensor> =
        tensors.iter().map(|(n, t)| (n.clone(), t.to_dtype(DType::F16).unwrap())).collect();
    std::fs::remove_file(unet.join("diffusion_pytorch_model.safetensors")).unwrap();
    candle_core::safetensors::save(&f16, unet.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let from_half = Pipeline::load(&half, &DeviceSpec::Cpu).unwrap().generate(&request(&["a red circle"], &[3])).unwrap();
    let max = from_half[0].rgb.iter().zip(&reference[0].rgb).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(max <= 8, "fp16 weights moved a pixel by {max}");
}

/// A copy of the tiny SD 1.5 fixture to edit, in a directory that lives as long as the guard.
fn tiny_sd15_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    copy_dir(&fixture("tiny-sd15"), &model);
    (tmp, model)
}

/// Rewrites `model`'s `model_index.json` with `defaults` as its `_fresco_defaults` (replacing any before).
fn set_fresco_defaults(model: &Path, defaults: &str) {
    let index = model.join("model_index.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["_fresco_defaults"] = serde_json::from_str(defaults).unwrap();
    std::fs::write(&index, serde_json::to_string(&json).unwrap()).unwrap();
}

/// A model's late guidance lowers its own scale on the steps below its timestep, so the image differs
/// from constant guidance; a request that names a scale, even the model's, gets it on every step. Half
/// the pair of keys, or a bad value, is refused by name.
#[test]
fn late_guidance_lowers_only_the_models_own_scale() {
    let (_tmp, model) = tiny_sd15_copy();
    let with = |defaults: &str| set_fresco_defaults(&model, defaults);
    let r = request(&["a red circle"], &[5]);

    with(r#"{"guidance": 5.0}"#);
    let constant = Pipeline::load(&model, &DeviceSpec::Cpu).unwrap().generate(&r).unwrap();
    with(r#"{"guidance": 5.0, "late_guidance": 1.5, "late_guidance_below_timestep": 500}"#);
    let late = Pipeline::load(&model, &DeviceSpec::Cpu).unwrap();
    let resolved = late.resolve(&r).unwrap();
    assert_eq!((resolved.guidance_at(999.0), resolved.guidance_at(500.0), resolved.guidance_at(499.0)), (5.0, 5.0, 1.5));
    assert_ne!(late.generate(&r).unwrap(), constant, "the last steps' scale changes the image");
    let named = Request { guidance: Some(5.0), ..r.clone() };
    assert_eq!(late.resolve(&named).unwrap().late_guidance, None);
    assert_eq!(late.generate(&named).unwrap(), constant, "a named scale holds on every step");

    for (extra, key) in [
        (r#"{"late_guidance": 2.0}"#, "late_guidance_below_timestep"),
        (r#"{"late_guidance_below_timestep": 300}"#, "late_guidance"),
        (r#"{"late_guidance": -1.0, "late_guidance_below_timestep": 300}"#, "late_guidance"),
        (r#"{"late_guidance": 2.0, "late_guidance_below_timestep": 0}"#, "late_guidance_below_timestep"),
    ] {
        with(extra);
        let e = load_err(&model);
        assert!(e.contains("model_index.json") && e.contains(&format!("_fresco_defaults.{key}:")), "{extra}: {e}");
    }
}

/// A model may state its own recipe in `model_index.json`, its scheduler among it when that fits the
/// folder's scheduler class; a U-Net with a flow-matching scheduler is read as a rectified flow
/// (fresco-tiny-flow is one); transformer families stay flow-only.
#[test]
fn model_defaults_and_flow_unets() {
    let (tmp, model) = tiny_sd15_copy();
    let index = model.join("model_index.json");
    let original = std::fs::read_to_string(&index).unwrap();
    let with = |defaults: &str| set_fresco_defaults(&model, defaults);

    with(r#"{"steps": 7, "guidance": 2.5}"#);
    let pipe = Pipeline::load(&model, &DeviceSpec::Cpu).unwrap();
    assert_eq!((pipe.defaults().steps, pipe.defaults().guidance), (7, 2.5));
    with(r#"{"steps": 0}"#);
    let e = load_err(&model);
    assert!(e.contains("model_index.json") && e.contains("steps"), "{e}");
    with(r#"{"guidance": "lots"}"#);
    assert!(load_err(&model).contains("guidance"));
    with(r#"{"scheduler": "euler-ancestral"}"#);
    assert_eq!(Pipeline::load(&model, &DeviceSpec::Cpu).unwrap().default_scheduler().name(), "euler-ancestral");
    for wrong in ["flow-euler-ancestral", "warp"] {
        with(&format!(r#"{{"scheduler": "{wrong}"}}"#));
        let e = load_err(&model);
        assert!(e.contains("model_index.json") && e.contains("_fresco_defaults.scheduler") && e.contains(wrong), "{e}");
    }
    std::fs::write(&index, &original).unwrap();

    std::fs::write(
        model.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}"#,
    )
    .unwrap();
    let flow = Pipeline::load(&model, &DeviceSpec::Cpu).unwrap();
    assert_eq!(flow.default_scheduler().name(), "flow-euler");
    let r = Request { steps: Some(3), ..request(&["a red circle"], &[5]) };
    let a = flow.generate(&r).unwrap();
    assert_eq!(a, flow.generate(&r).unwrap());
    assert!(
        matches!(flow.generate(&Request { scheduler: Some("ddim".into()), ..r.clone() }), Err(PipelineError::InvalidParam { field, .. }) if field == "scheduler")
    );
    with(r#"{"scheduler": "flow-euler-ancestral"}"#);
    let ancestral = Pipeline::load(&model, &DeviceSpec::Cpu).unwrap();
    assert_eq!(ancestral.default_scheduler().name(), "flow-euler-ancestral");
    let b = ancestral.generate(&r).unwrap();
    assert_eq!(b, ancestral.generate(&r).unwrap(), "seeded noise makes the ancestral flow reproducible");
    assert_ne!(a, b, "the ancestral steps draw noise the ODE does not");
    assert_eq!(a, ancestral.generate(&Request { scheduler: Some("flow-euler".into()), ..r.clone() }).unwrap());

    let sd3 = tmp.path().join("sd3");
    copy_dir(&fixture("tiny-sd3"), &sd3);
    std::fs::write(sd3.join("scheduler/scheduler_config.json"), r#"{"_class_name": "DDIMScheduler"}"#).unwrap();
    assert!(load_err(&sd3).contains("scheduler_config.json"));
}

/// Image-to-image runs the last `strength` of the schedule from the latents it is given; a strength or a
/// shape it cannot use is named.
#[test]
fn image_to_image_runs_the_schedule_from_the_given_latents() {
    use candle_core::{Device, Tensor};
    use fresco_pipeline::InitLatents;
    for model in ["tiny-sd15", "tiny-sd3"] {
        let pipe = Pipeline::load(&fixture(model), &DeviceSpec::Cpu).unwrap();
        let base = request(&["a red circle"], &[3]);
        let dims = pipe.denoise(&base).unwrap().dims().to_vec();
        let from = |latents: Tensor, strength: f64| Request { init: Some(InitLatents { latents, strength }), ..base.clone() };
        let a = Tensor::ones(dims.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = a.affine(-1.0, 0.0).unwrap();
        // PNDM (tiny-sd15's scheduler) evaluates one step more than asked, as diffusers' does.
        let run = |strength| pipe.generate_timed(&from(a.clone(), strength)).unwrap().1.steps;
        assert_eq!(run(1.0) - run(0.5), 2, "{model}: half of 4 steps skipped");
        let out = |r: &Request| pipe.denoise(r).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(out(&from(a.clone(), 0.5)), out(&from(a.clone(), 0.5)), "{model}: not reproducible");
        assert_ne!(out(&from(a.clone(), 0.5)), out(&from(b, 0.5)), "{model}: the initial latents do not matter");
        assert_ne!(out(&from(a.clone(), 0.5)), out(&base), "{model}: the same as generating from noise");
        let field = |r: Request| match pipe.generate(&r) {
            Err(PipelineError::InvalidParam { field, .. }) => field,
            other => panic!("{model}: expected a parameter error, got {other:?}"),
        };
        assert_eq!(field(from(a.clone(), 0.0)), "init.strength");
        assert_eq!(field(from(a.clone(), 1.5)), "init.strength");
        // A tenth of 4 steps rounds to none.
        assert_eq!(field(from(a.clone(), 0.1)), "init.strength");
        assert_eq!(field(from(a.narrow(1, 0, 1).unwrap(), 0.5)), "init.latents");
    }
}
