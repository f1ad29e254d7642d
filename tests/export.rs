//! `fresco export` read back by the Python tools dataset builders use: pyarrow and webdataset.

use std::process::Command;
use std::time::Duration;

use fresco_e2e::*;

#[test]
fn exports_read_back_with_pyarrow_and_webdataset() {
    let c = Cluster::start(&[]);
    let prompts = c.write_prompts(5);
    let _w = c.worker("exporter");
    let job = c.submit(&prompts, "export", 3);
    assert_eq!(c.wait_done(&job, Duration::from_secs(120))["state"], "succeeded");
    let manifest_dir = c.tmp.path().join("manifest");
    let wds_dir = c.tmp.path().join("wds");
    let export = |format: &str, out: &std::path::Path, extra: &[&str]| {
        let r = Command::new(fresco_bin())
            .args(["export", &job, "--format", format, "--out", out.to_str().unwrap(), "--coordinator", &c.url()])
            .args(extra)
            .envs(c.s3.env())
            .output()
            .unwrap();
        assert!(r.status.success(), "export {format}: {}", String::from_utf8_lossy(&r.stderr));
    };
    export("parquet", &manifest_dir, &[]);
    export("webdataset", &wds_dir, &["--shard-size", "2"]);
    let mut shards: Vec<String> =
        std::fs::read_dir(&wds_dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    shards.sort();
    assert_eq!(shards, ["00000.parquet", "00000.tar", "00001.parquet", "00001.tar", "00002.parquet", "00002.tar"]);
    let check = Command::new("python3")
        .arg(repo_root().join("tests/python/check_export.py"))
        .arg(manifest_dir.join(format!("{job}.parquet")))
        .arg(&wds_dir)
        .arg("5")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "pyarrow/webdataset could not read the export (scripts/test installs them):\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}
