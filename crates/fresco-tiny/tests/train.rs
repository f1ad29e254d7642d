//! The training code end to end at miniature size: both variants train, every parameter gets a gradient
//! (training refuses to continue otherwise), the same seed gives the same bytes, and the folders it
//! writes load and sample through the ordinary pipeline.

use std::path::{Path, PathBuf};

use fresco_pipeline::{DeviceSpec, Pipeline, Request};
use fresco_tiny::eval::{self, EvalOptions};
use fresco_tiny::train::{self, Schedule, TrainOptions};
use fresco_tiny::{Arch, Variant};

fn tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-sd15/tokenizer")
}

fn options(seed: u64) -> TrainOptions {
    TrainOptions {
        seed,
        arch: Arch::test(),
        vae: Schedule { steps: 2, batch: 2, lr: 1e-3 },
        text: Schedule { steps: 2, batch: 4, lr: 1e-3 },
        denoiser: Schedule { steps: 2, batch: 4, lr: 1e-3 },
        pool: 8,
        uncond_fraction: 0.25,
        ..Default::default()
    }
}

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for f in std::fs::read_dir(from).expect("read_dir") {
        let path = f.expect("entry").path();
        std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
    }
}

/// A model folder of `variant` with its configs, a freshly trained autoencoder and text encoder, ready
/// for its U-Net's training.
fn prepare(dir: &Path, variant: Variant, opts: &TrainOptions) {
    let parts = dir.join(".parts");
    train::train_vae(&parts.join("vae"), opts, &mut |_, _, _, _| {}).expect("vae");
    train::train_text_encoder(&parts, &tokenizer(), opts, &mut |_, _, _, _| {}).expect("text encoder");
    train::write_skeleton(dir, variant, opts, &tokenizer(), 3, 2.0).expect("skeleton");
    copy_files(&parts.join("vae"), &dir.join("vae"));
    copy_files(&parts.join("text_encoder"), &dir.join("text_encoder"));
}

/// Trains both variants into `root`; returns the model folders.
fn train_all(root: &Path, seed: u64) -> Vec<PathBuf> {
    let opts = options(seed);
    [Variant::Diffusion, Variant::Flow]
        .into_iter()
        .map(|v| {
            let dir = root.join(v.folder());
            prepare(&dir, v, &opts);
            let text_encoder = std::fs::read(dir.join("text_encoder/model.safetensors")).expect("text encoder");
            let mut losses = Vec::new();
            train::train_denoiser(&dir, v, &opts, &mut |phase, _, _, loss| {
                if phase == v.name() {
                    losses.push(loss)
                }
            })
            .expect("train");
            assert_eq!(losses.len(), 2);
            assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
            // Frozen while the U-Net trains, as Stable Diffusion's CLIP is.
            assert!(std::fs::read(dir.join("text_encoder/model.safetensors")).expect("text encoder") == text_encoder);
            dir
        })
        .collect()
}

fn weights(dir: &Path) -> Vec<Vec<u8>> {
    ["vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("weights"))
        .collect()
}

#[test]
fn trained_models_load_and_sample_through_the_pipeline() {
    let root = tempfile::tempdir().expect("tempdir");
    for dir in train_all(root.path(), 1) {
        let pipe = Pipeline::load(&dir, &DeviceSpec::Cpu).expect("load");
        // The model's own recipe from `_fresco_defaults`.
        assert_eq!((pipe.defaults().steps, pipe.defaults().guidance), (3, 2.0));
        assert_eq!((pipe.defaults().width, pipe.defaults().height), (64, 64));
        let ancestral = if dir.ends_with("fresco-tiny-flow") { "flow-euler-ancestral" } else { "euler-ancestral" };
        assert_eq!(pipe.default_scheduler().name(), ancestral, "{}", dir.display());
        let images =
            pipe.generate(&Request::new(vec!["a red circle".into(), "two blue squares on the left".into()], vec![1, 2])).expect("generate");
        assert_eq!(images.len(), 2);
        assert_eq!((images[0].width, images[0].height), (64, 64));
        // The full CLIP vocabulary is stored, so any prompt tokenizes and encodes.
        pipe.generate(&Request::new(vec!["an unrelated prompt about zebras".into()], vec![3])).expect("any prompt");

        // The evaluation runs each step count plus the model's default (3), and keeps sample images.
        let opts = EvalOptions { prompts: 2, steps: vec![1, 2], batch: 3, ..Default::default() };
        let (rows, samples) = eval::evaluate(&dir, &opts, 2).expect("evaluate");
        assert_eq!(rows.iter().map(|r| (r.steps, r.default_steps)).collect::<Vec<_>>(), [(1, false), (2, false), (3, true)]);
        assert!(rows
            .iter()
            .all(|r| (0.0..=1.0).contains(&r.adherence.one) && (0.0..=1.0).contains(&r.adherence.two) && r.seconds_per_image > 0.0));
        assert!(samples.iter().all(|s| s.len() == 2));
        assert_eq!(eval::table(&rows).lines().count(), 5);
    }
}

#[test]
fn training_is_a_pure_function_of_the_seed() {
    let (a, b, c) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"), tempfile::tempdir().expect("c"));
    let (da, db, dc) = (train_all(a.path(), 5), train_all(b.path(), 5), train_all(c.path(), 6));
    for ((x, y), z) in da.iter().zip(&db).zip(&dc) {
        assert!(weights(x) == weights(y), "same seed, different weights in {}", x.display());
        assert!(weights(x) != weights(z), "different seeds, same weights in {}", x.display());
    }
}

/// Names and bytes of every tensor in a safetensors file.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<(String, Vec<u8>)> = file.tensors().into_iter().map(|(n, t)| (n, t.data().to_vec())).collect();
    out.sort();
    out
}

/// The same tensors, the encoder's unchanged (so the latents the U-Nets learnt stay valid), the decoder's
/// trained.
fn assert_only_the_decoder_changed(before: &[(String, Vec<u8>)], after: &[(String, Vec<u8>)]) {
    assert_eq!(before.iter().map(|t| &t.0).collect::<Vec<_>>(), after.iter().map(|t| &t.0).collect::<Vec<_>>(), "same tensors");
    for ((name, a), (_, b)) in before.iter().zip(after) {
        let encoder_side = name.starts_with("encoder.") || name.starts_with("quant_conv.");
        if encoder_side {
            assert!(a == b, "{name} changed");
        }
    }
    let changed = |prefix: &str| before.iter().zip(after).any(|((n, a), (_, b))| n.starts_with(prefix) && a != b);
    assert!(changed("decoder.") && changed("post_quant_conv."), "the decoder was not trained");
}

#[test]
fn decoder_training_leaves_the_encoder_and_so_the_latents_alone() {
    let root = tempfile::tempdir().expect("tempdir");
    let mut opts = options(3);
    opts.decoder = Schedule { steps: 3, batch: 2, lr: 1e-2 };
    let vae = root.path().join("vae");
    train::train_vae(&vae, &opts, &mut |_, _, _, _| {}).expect("vae");
    let file = vae.join("diffusion_pytorch_model.safetensors");
    let before = tensors(&file);
    let mut steps = 0;
    train::train_decoder(&vae, &opts, &mut |phase, _, _, loss| {
        assert_eq!(phase, "decoder");
        assert!(loss.is_finite());
        steps += 1;
    })
    .expect("decoder");
    assert_eq!(steps, 3);
    assert_only_the_decoder_changed(&before, &tensors(&file));
    // What the round trip reads back is still a whole autoencoder.
    let rt = train::reconstruction_adherence(&vae, 4, 1, &DeviceSpec::Cpu).expect("round trip");
    assert_eq!(rt.samples.iter().map(Vec::len).collect::<Vec<_>>(), [4, 4]);
}

/// Tuning a finished model's decoder on its own samples: the model samples the pool, then only the
/// decoder trains, and the folder still samples through the pipeline. The strength reaches the sampling.
#[test]
fn decoder_tuning_on_the_models_samples_trains_the_decoder_alone() {
    let root = tempfile::tempdir().expect("tempdir");
    let models = train_all(root.path(), 5);
    for dir in &models {
        let file = dir.join("vae/diffusion_pytorch_model.safetensors");
        let before = tensors(&file);
        let mut tuned = Vec::new();
        for (i, strength) in [0.34, 1.0].into_iter().enumerate() {
            let copy = root.path().join(format!("tuned-{i}"));
            for part in ["scheduler", "text_encoder", "tokenizer", "unet", "vae"] {
                copy_files(&dir.join(part), &copy.join(part));
            }
            std::fs::copy(dir.join("model_index.json"), copy.join("model_index.json")).expect("model index");
            let opts =
                TrainOptions { tune: Schedule { steps: 3, batch: 2, lr: 1e-2 }, tune_pool: 4, tune_strength: strength, ..options(5) };
            let mut phases = Vec::new();
            train::tune_decoder(&copy, &opts, &mut |phase, step, _, loss| {
                assert!(loss.is_finite());
                phases.push((phase.to_string(), step));
            })
            .expect("tune");
            assert_eq!(phases.last(), Some(&("tune".to_string(), 3)), "{phases:?}");
            assert!(phases.iter().any(|(p, n)| p == "sample" && *n == 4), "{phases:?}");
            let after = tensors(&copy.join("vae/diffusion_pytorch_model.safetensors"));
            assert_only_the_decoder_changed(&before, &after);
            let pipeline = Pipeline::load(&copy, &DeviceSpec::Cpu).expect("load");
            assert_eq!(pipeline.generate(&Request::new(vec!["a red circle".into()], vec![1])).expect("generate").len(), 1);
            tuned.push(after);
            std::fs::remove_dir_all(&copy).expect("clean up");
        }
        assert!(tuned[0] != tuned[1], "{}: the strength does not reach the sampling", dir.display());
    }
}

/// The noise options reach both ends: a variant trains on the noise levels they give (other weights from
/// the same seed and autoencoder), and its scheduler samples with the same ones.
#[test]
fn noise_options_reach_training_and_the_scheduler() {
    let root = tempfile::tempdir().expect("tempdir");
    let train = |name: &str, variant: Variant, opts: &TrainOptions| {
        let dir = root.path().join(name);
        prepare(&dir, variant, opts);
        train::train_denoiser(&dir, variant, opts, &mut |_, _, _, _| {}).expect("train");
        dir
    };
    let stated = |dir: &Path, key: &str| {
        let text = std::fs::read_to_string(dir.join("scheduler/scheduler_config.json")).expect("scheduler config");
        serde_json::from_str::<serde_json::Value>(&text).expect("json")[key].as_f64().expect(key)
    };
    let base = options(4);
    let cases = [
        (Variant::Flow, "shift", TrainOptions { flow_shift: 3.0, ..base.clone() }),
        (Variant::Diffusion, "beta_end", TrainOptions { beta_end: 0.03, ..base.clone() }),
    ];
    for (variant, key, changed_opts) in cases {
        let option = |o: &TrainOptions| if variant == Variant::Flow { o.flow_shift } else { o.beta_end };
        let plain = train(&format!("{key}-plain"), variant, &base);
        let changed = train(&format!("{key}-changed"), variant, &changed_opts);
        assert_eq!((stated(&plain, key), stated(&changed, key)), (option(&base), option(&changed_opts)));
        assert!(weights(&plain)[0] == weights(&changed)[0], "the autoencoder does not depend on {key}");
        assert!(weights(&plain)[1] == weights(&changed)[1], "nor does the text encoder");
        assert!(weights(&plain)[2] != weights(&changed)[2], "the U-Net trained on the same noise levels ({key})");
        Pipeline::load(&changed, &DeviceSpec::Cpu).expect("a model with other noise loads");
    }
}

/// The layout loss trains the U-Net at every map resolution and level it offers: each setting gives other
/// weights from the same seed, and the shipped U-Net is the same model (the heads are not saved).
#[test]
fn layout_options_reach_the_unet() {
    let root = tempfile::tempdir().expect("tempdir");
    let base = options(7);
    let runs: Vec<Vec<(String, Vec<u8>)>> = [
        (0.0, 1, 0.0, 0.0),
        (0.25, 1, 0.0, 0.0),
        (0.25, 2, 0.0, 0.0),
        (0.25, 8, 0.0, 0.0),
        (0.25, 1, 0.25, 0.0),
        (0.0, 1, 0.25, 0.0),
        (0.0, 1, 0.0, 0.25),
    ]
    .into_iter()
    .map(|(layout_weight, layout_subcells, layout_top_weight, layout_centre_weight)| {
        let dir = root.path().join(format!("{layout_weight}-{layout_subcells}-{layout_top_weight}-{layout_centre_weight}"));
        let opts = TrainOptions { layout_weight, layout_subcells, layout_top_weight, layout_centre_weight, ..base.clone() };
        prepare(&dir, Variant::Diffusion, &opts);
        train::train_denoiser(&dir, Variant::Diffusion, &opts, &mut |_, _, _, _| {}).expect("train");
        Pipeline::load(&dir, &DeviceSpec::Cpu).expect("load");
        tensors(&dir.join("unet/diffusion_pytorch_model.safetensors"))
    })
    .collect();
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            assert!(a.iter().map(|t| &t.0).eq(b.iter().map(|t| &t.0)), "the same tensors");
            assert!(a != b, "two layout settings trained the same U-Net");
        }
    }
}

/// Untrained, the text encoder reads hardly any prompt right; trained, it reads held-out prompts (ones it
/// never saw) whole: every phrase's count, size, colour, shape and position and the background.
#[test]
fn the_text_encoder_learns_to_read_held_out_prompts() {
    let root = tempfile::tempdir().expect("tempdir");
    let read_after = |steps: usize| {
        let opts = TrainOptions { text: Schedule { steps, batch: 32, lr: 3e-3 }, ..options(2) };
        train::train_text_encoder(&root.path().join(steps.to_string()), &tokenizer(), &opts, &mut |_, _, _, _| {}).expect("train")
    };
    let (untrained, trained) = (read_after(1), read_after(1000));
    assert!(untrained < 0.02 && trained > 0.2, "read {untrained} untrained, {trained} trained");
}

/// Largest difference between two U-Nets' weights, tensor by tensor.
fn unet_distance(a: &Path, b: &Path) -> f32 {
    let load = |dir: &Path| {
        candle_core::safetensors::load(dir.join("unet/diffusion_pytorch_model.safetensors"), &candle_core::Device::Cpu).expect("weights")
    };
    let (a, b) = (load(a), load(b));
    assert_eq!(a.len(), b.len(), "the same tensors");
    a.iter()
        .map(|(name, t)| {
            let diff = (t.to_dtype(candle_core::DType::F32).expect("f32") - b[name].to_dtype(candle_core::DType::F32).expect("f32"))
                .expect("same shape");
            diff.abs().expect("abs").max_all().expect("max").to_scalar::<f32>().expect("scalar")
        })
        .fold(0.0, f32::max)
}

/// `resume` continues the U-Net in the folder: a few small steps from another seed move its weights a
/// little, where a fresh start from that seed lands far away; a folder without weights to continue is an
/// error that names the file.
#[test]
fn a_resumed_unet_continues_from_its_folders_weights() {
    let root = tempfile::tempdir().expect("tempdir");
    let first = root.path().join("first");
    let opts = options(8);
    prepare(&first, Variant::Flow, &opts);
    train::train_denoiser(&first, Variant::Flow, &opts, &mut |_, _, _, _| {}).expect("train");
    let again = |name: &str, resume: bool| {
        let dir = root.path().join(name);
        for part in ["tokenizer", "vae", "text_encoder", "unet"] {
            copy_files(&first.join(part), &dir.join(part));
        }
        let opts = TrainOptions { seed: 9, resume, denoiser: Schedule { lr: 1e-4, ..opts.denoiser }, ..opts.clone() };
        train::train_denoiser(&dir, Variant::Flow, &opts, &mut |_, _, _, _| {}).expect("train");
        dir
    };
    let (resumed, fresh) = (unet_distance(&first, &again("resumed", true)), unet_distance(&first, &again("fresh", false)));
    assert!(resumed > 0.0 && resumed < 0.01 && fresh > 0.1, "moved {resumed} resumed, {fresh} started afresh");

    std::fs::remove_file(first.join("unet/diffusion_pytorch_model.safetensors")).expect("remove");
    let err = train::train_denoiser(&first, Variant::Flow, &TrainOptions { resume: true, ..opts }, &mut |_, _, _, _| {})
        .expect_err("nothing to resume")
        .to_string();
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors"), "{err}");
}
