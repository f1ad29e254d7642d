//! `fresco run`: the whole system in one process on SQLite and a local folder; a re-run continues.

use std::process::Command;

use fresco_e2e::*;

#[test]
fn fresco_run_makes_every_image_once_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"a red circle\", \"seed\": 1}\n{\"prompt\": \"a blue square\", \"source\": \"unit\"}\n{\"prompt\": \"two green triangles\"}\n").unwrap();
    let out = tmp.path().join("out");
    let run = || {
        Command::new(fresco_bin())
            .args(["run", prompts.to_str().unwrap(), "--model"])
            .arg(repo_root().join("tests/fixtures/models/tiny-sd15"))
            .args(["--out", out.to_str().unwrap(), "--steps", "3", "--batch-size", "2", "--quiet"])
            .output()
            .unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let jobs: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().filter(|e| e.path().is_dir()).collect();
    assert_eq!(jobs.len(), 1);
    let job_dir = jobs[0].path();
    let mut names: Vec<String> =
        std::fs::read_dir(&job_dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["00000000.json", "00000000.png", "00000001.json", "00000001.png", "00000002.json", "00000002.png"]);
    let sidecar: serde_json::Value = serde_json::from_slice(&std::fs::read(job_dir.join("00000001.json")).unwrap()).unwrap();
    assert_eq!(sidecar["prompt"], "a blue square");
    assert_eq!(sidecar["extra"]["source"], "unit");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&std::fs::read(job_dir.join("00000000.json")).unwrap()).unwrap()["seed"], 1);
    let before = std::fs::metadata(job_dir.join("00000000.png")).unwrap().modified().unwrap();

    let second = run();
    assert!(second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("continuing job"), "{stderr}");
    assert!(stderr.contains("0 new"), "{stderr}");
    assert_eq!(std::fs::metadata(job_dir.join("00000000.png")).unwrap().modified().unwrap(), before, "nothing is made again");
}

#[test]
fn fresco_run_rejects_a_bad_prompt_file_and_submits_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.csv");
    std::fs::write(&prompts, "prompt,steps\na cat,4\na dog,lots\n").unwrap();
    let out = tmp.path().join("out");
    let r = Command::new(fresco_bin())
        .args(["run", prompts.to_str().unwrap(), "--model"])
        .arg(repo_root().join("tests/fixtures/models/tiny-sd15"))
        .args(["--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!r.status.success());
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("p.csv:3") && stderr.contains("steps"), "{stderr}");
    assert!(!out.exists(), "nothing is written for an invalid file");
}

/// The README's first command: no --model means the bundled fresco-tiny, from the repository root.
#[test]
fn fresco_run_uses_the_bundled_model_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = Command::new(fresco_bin())
        .current_dir(repo_root())
        .args(["run", "examples/prompts.txt", "--out", out.to_str().unwrap(), "--quiet"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prompts = std::fs::read_to_string(repo_root().join("examples/prompts.txt")).unwrap();
    let jobs: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().filter(|e| e.path().is_dir()).collect();
    assert_eq!(jobs.len(), 1);
    for (i, prompt) in prompts.lines().enumerate() {
        let sidecar: serde_json::Value =
            serde_json::from_slice(&std::fs::read(jobs[0].path().join(format!("{i:08}.json"))).unwrap()).unwrap();
        assert_eq!(sidecar["model"], "fresco-tiny");
        assert_eq!(sidecar["prompt"], prompt);
        assert_eq!((sidecar["width"].as_u64(), sidecar["height"].as_u64()), (Some(64), Some(64)));
        assert!(jobs[0].path().join(format!("{i:08}.png")).is_file());
    }
}
