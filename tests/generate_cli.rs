//! `fresco generate` as a user runs it: reference cases reproduced from their initial latents through the
//! command line, and the files it writes.
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::process::Command;

use fresco_e2e::*;

fn pixels(path: &std::path::Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

#[test]
fn generate_reproduces_reference_cases_from_latents() {
    for name in ["sd15-euler-batch-96x64", "sdxl-euler-negative", "sd3-batch-negative-96x64", "flux-schnell-batch-96x64"] {
        let dir = repo_root().join("tests/fixtures/cases").join(name);
        let case: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(fresco_bin());
        cmd.arg("generate").arg("--model").arg(repo_root().join("tests/fixtures/models").join(case["model"].as_str().unwrap()));
        for p in case["prompts"].as_array().unwrap() {
            cmd.args(["--prompt", p.as_str().unwrap()]);
        }
        if let Some(n) = case["negative_prompt"].as_str() {
            cmd.args(["--negative-prompt", n]);
        }
        if let Some(s) = case["scheduler"].as_str() {
            cmd.args(["--scheduler", s]);
        }
        cmd.args(["--steps", &case["steps"].to_string(), "--guidance", &case["guidance"].to_string()])
            .args(["--width", &case["width"].to_string(), "--height", &case["height"].to_string()])
            .arg("--latents")
            .arg(dir.join("latents.safetensors"))
            .arg("--out-dir")
            .arg(out.path());
        let r = cmd.output().unwrap();
        assert!(r.status.success(), "{name}: {}", String::from_utf8_lossy(&r.stderr));
        for (i, expected) in case["outputs"].as_array().unwrap().iter().enumerate() {
            let got = pixels(&out.path().join(format!("{i:04}.png")));
            let want = pixels(&dir.join(expected.as_str().unwrap()));
            let max = got.iter().zip(&want).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
            assert!(max <= 2, "{name} image {i}: max |diff| {max}");
        }
    }
}

#[test]
fn generate_rejects_bad_input_with_the_parameter_named() {
    let out = tempfile::tempdir().unwrap();
    let model = repo_root().join("tests/fixtures/models/tiny-sd15");
    for (args, want) in [
        (vec!["--steps", "0"], "steps"),
        (vec!["--width", "60"], "width"),
        (vec!["--scheduler", "heun"], "scheduler"),
        (vec!["--format", "gif"], "format"),
        (vec!["--device", "tpu"], "device"),
    ] {
        let r = Command::new(fresco_bin())
            .arg("generate")
            .arg("--model")
            .arg(&model)
            .args(["--prompt", "x"])
            .args(&args)
            .arg("--out-dir")
            .arg(out.path())
            .output()
            .unwrap();
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let r = Command::new(fresco_bin()).arg("generate").arg("--model").arg(&model).arg("--out-dir").arg(out.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&r.stderr).contains("--prompt"));
}
