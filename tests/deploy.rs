//! What can be checked of the deployment here, without Docker or a cluster: every manifest parses; the
//! kustomize overlays render (resources, images, JSON patches applied by a small renderer); the objects
//! reference each other consistently; flags, environment variables and metric names used in manifests and
//! the dashboard are ones fresco actually has. The compose topology's processes (PostgreSQL, an S3 server,
//! coordinators, workers) run together in the other end-to-end tests.
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use fresco_e2e::{fresco_bin, repo_root};
use serde_yaml::Value;

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::with::singleton_map_recursive::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[*k],
    })
}

/// Renders a kustomization the way `kustomize build` does for the features used here: resources
/// (recursively), namespace, image overrides and JSON 6902 `replace` patches.
fn render(dir: &Path) -> Vec<Value> {
    let k = &docs(&dir.join("kustomization.yaml"))[0];
    let mut objects = Vec::new();
    for r in k["resources"].as_sequence().unwrap() {
        let p = dir.join(r.as_str().unwrap());
        assert!(p.exists(), "{}: resource {} is missing", dir.display(), p.display());
        if p.is_dir() {
            objects.extend(render(&p));
        } else {
            objects.extend(docs(&p));
        }
    }
    if let Some(ns) = k["namespace"].as_str() {
        for o in objects.iter_mut().filter(|o| o["kind"] != "Namespace") {
            o["metadata"]["namespace"] = Value::from(ns);
        }
    }
    if let Some(images) = k["images"].as_sequence() {
        for img in images {
            let (name, new) =
                (img["name"].as_str().unwrap(), format!("{}:{}", img["newName"].as_str().unwrap(), img["newTag"].as_str().unwrap()));
            for o in &mut objects {
                for c in containers_mut(o) {
                    if c["image"].as_str() == Some(name) || c["image"].as_str().is_some_and(|i| i.split(':').next() == Some(name)) {
                        c["image"] = Value::from(new.clone());
                    }
                }
            }
        }
    }
    if let Some(patches) = k["patches"].as_sequence() {
        for p in patches {
            let (kind, name) = (p["target"]["kind"].as_str().unwrap(), p["target"]["name"].as_str().unwrap());
            let target = objects
                .iter_mut()
                .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("patch target {kind}/{name} not found"));
            let ops: Vec<Value> = serde_yaml::from_str(p["patch"].as_str().unwrap()).unwrap();
            for op in ops {
                assert_eq!(op["op"], "replace", "only replace patches are rendered here");
                let path: Vec<&str> = op["path"].as_str().unwrap().trim_start_matches('/').split('/').collect();
                let (last, parents) = path.split_last().unwrap();
                let mut cur = &mut *target;
                for seg in parents {
                    cur = match seg.parse::<usize>() {
                        Ok(i) => cur.get_mut(i).unwrap_or_else(|| panic!("patch path {path:?} does not exist")),
                        Err(_) => cur.get_mut(*seg).unwrap_or_else(|| panic!("patch path {path:?} does not exist")),
                    };
                }
                let slot = match last.parse::<usize>() {
                    Ok(i) => cur.get_mut(i),
                    Err(_) => cur.get_mut(*last),
                };
                *slot.unwrap_or_else(|| panic!("replace of missing {path:?}")) = op["value"].clone();
            }
        }
    }
    objects
}

fn containers_mut(o: &mut Value) -> Vec<&mut Value> {
    let spec = if o["kind"] == "Job" || o["kind"] == "Deployment" {
        o.get_mut("spec").and_then(|s| s.get_mut("template")).and_then(|t| t.get_mut("spec"))
    } else {
        None
    };
    match spec.and_then(|s| s.get_mut("containers")).and_then(Value::as_sequence_mut) {
        Some(c) => c.iter_mut().collect(),
        None => Vec::new(),
    }
}

fn collect_secret_refs(v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Mapping(m) => {
            for (k, child) in m {
                if k == "secretKeyRef" {
                    out.push((child["name"].as_str().unwrap().to_string(), child["key"].as_str().unwrap().to_string()));
                }
                collect_secret_refs(child, out);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|i| collect_secret_refs(i, out)),
        _ => {}
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects.iter().find(|o| o["kind"] == kind && o["metadata"]["name"] == name).unwrap_or_else(|| panic!("{kind}/{name} missing"))
}

fn help(cmd: &str) -> String {
    let out = Command::new(fresco_bin()).args([cmd, "--help"]).output().unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Every `--flag` and `FRESCO_*` variable a container uses must be one `fresco <cmd>` knows.
fn check_container(c: &Value, cmd: &str) {
    let h = help(cmd);
    for a in c["args"].as_sequence().into_iter().flatten().filter_map(Value::as_str).filter(|a| a.starts_with("--")) {
        assert!(h.contains(a), "fresco {cmd} has no flag {a}");
    }
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().unwrap();
        if name.starts_with("FRESCO_") && name != "FRESCO_LOG" {
            assert!(h.contains(&format!("env: {name}")), "fresco {cmd} reads no {name}");
        }
    }
}

#[test]
fn every_manifest_parses_and_kubernetes_objects_are_named() {
    let mut files = Vec::new();
    yaml_files(&deploy(), &mut files);
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        for d in docs(f) {
            if f.starts_with(deploy().join("k8s")) {
                assert!(d["apiVersion"].is_string() && d["kind"].is_string(), "{}: {d:?}", f.display());
                if d["kind"] != "Kustomization" {
                    assert!(d["metadata"]["name"].is_string(), "{}: unnamed object", f.display());
                }
            }
        }
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy().join("grafana/fresco-dashboard.json")).unwrap()).unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 6);
}

#[test]
fn overlays_render_a_consistent_deployment() {
    for overlay in ["gpu", "cpu"] {
        let objects = render(&deploy().join("k8s/overlays").join(overlay));
        let coordinator = find(&objects, "Deployment", "fresco-coordinator");
        assert_eq!(coordinator["spec"]["replicas"], 2);
        let labels = &coordinator["spec"]["template"]["metadata"]["labels"];
        let service = find(&objects, "Service", "fresco-coordinator");
        let pdb = find(&objects, "PodDisruptionBudget", "fresco-coordinator");
        for selector in [&service["spec"]["selector"], &pdb["spec"]["selector"]["matchLabels"]] {
            for (k, v) in selector.as_mapping().unwrap() {
                assert_eq!(&labels[k.as_str().unwrap()], v, "selector does not match the coordinator pods");
            }
        }
        check_container(s(coordinator, &["spec", "template", "spec", "containers", "0"]), "coordinator");
        assert!(find(&objects, "Job", "fresco-migrate")["spec"]["template"]["spec"]["containers"][0]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|c| c == "migrate"));
        let worker = find(&objects, "Deployment", "fresco-worker");
        let wc = s(worker, &["spec", "template", "spec", "containers", "0"]);
        check_container(wc, "worker");
        assert!(wc["lifecycle"]["preStop"]["exec"]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|c| c.as_str().unwrap().contains("kill -TERM")));
        assert!(worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64().unwrap() >= 300);
        let gpu = !wc["resources"]["limits"]["nvidia.com/gpu"].is_null();
        assert_eq!(gpu, overlay == "gpu", "{overlay}: GPU request");
        let device = wc["env"].as_sequence().unwrap().iter().find(|e| e["name"] == "FRESCO_DEVICE").unwrap();
        assert_eq!(device["value"], if overlay == "gpu" { "cuda" } else { "cpu" });
        assert!(wc["image"].as_str().unwrap().contains(if overlay == "gpu" { "cuda" } else { "cpu" }));
        let scaled = find(&objects, "ScaledObject", "fresco-worker");
        assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "fresco-worker");
        assert!(scaled["spec"]["triggers"][0]["metadata"]["query"].as_str().unwrap().contains("fresco_queue_depth_prompts"));
        // Secrets the pods read exist with those keys.
        let secrets: BTreeMap<String, &Value> =
            objects.iter().filter(|o| o["kind"] == "Secret").map(|o| (o["metadata"]["name"].as_str().unwrap().to_string(), o)).collect();
        let mut refs = Vec::new();
        collect_secret_refs(&Value::Sequence(objects.clone()), &mut refs);
        assert!(refs.len() >= 3, "{refs:?}");
        for (name, key) in refs {
            assert!(!secrets[&name]["stringData"][key.as_str()].is_null(), "secret {name} has no key {key}");
        }
        for o in &objects {
            if o["kind"] != "Namespace" {
                assert_eq!(o["metadata"]["namespace"], "fresco");
            }
        }
    }
}

#[test]
fn metric_names_in_dashboards_and_autoscaling_exist_in_the_code() {
    let mut code = String::new();
    for f in ["crates/fresco-coordinator/src/metrics.rs", "crates/fresco-worker/src/metrics.rs"] {
        code.push_str(&std::fs::read_to_string(repo_root().join(f)).unwrap());
    }
    let mut texts = vec![std::fs::read_to_string(deploy().join("grafana/fresco-dashboard.json")).unwrap()];
    texts.push(std::fs::read_to_string(deploy().join("k8s/base/worker-scaledobject.yaml")).unwrap());
    for t in texts {
        for word in t.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(|w| w.starts_with("fresco_")) {
            let base = word.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
            assert!(code.contains(&format!("\"{base}\"")), "metric {word} is not exported by fresco");
        }
    }
}

#[test]
fn compose_and_dockerfiles_fit_together() {
    let compose = &docs(&deploy().join("compose.yaml"))[0];
    let services = compose["services"].as_mapping().unwrap();
    for name in ["postgres", "minio", "minio-init", "coordinator", "worker"] {
        assert!(services.contains_key(name), "compose lacks {name}");
    }
    let worker = &compose["services"]["worker"];
    assert!(worker["container_name"].is_null() && worker["ports"].is_null(), "a scalable worker cannot pin a name or host port");
    let dockerfile = std::fs::read_to_string(deploy().join("docker/Dockerfile")).unwrap();
    for svc in ["coordinator", "worker"] {
        let target = compose["services"][svc]["build"]["target"].as_str().unwrap();
        assert!(dockerfile.contains(&format!(" AS {target}")), "Dockerfile has no stage {target}");
    }
    for f in ["docker/Dockerfile", "docker/Dockerfile.cuda"] {
        let text = std::fs::read_to_string(deploy().join(f)).unwrap();
        assert!(text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2, "{f}: not multi-stage");
        // The last stage runs as the unprivileged user.
        let last = text.rsplit("\nFROM ").next().unwrap();
        assert!(last.contains("USER 10001") || text.contains("FROM runtime AS"), "{f}: final stage runs as root");
        assert!(text.contains("USER 10001"), "{f}: no non-root user");
    }
    assert!(std::fs::read_to_string(deploy().join("docker/Dockerfile.cuda")).unwrap().contains("--features cuda"));
    // Every cargo feature an image builds with is one the fresco binary's crate declares (a missing one
    // fails the image build, which no other test runs).
    let manifest = std::fs::read_to_string(repo_root().join("crates/fresco-cli/Cargo.toml")).unwrap();
    let declared: Vec<&str> = manifest
        .split("[features]")
        .nth(1)
        .unwrap_or("")
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(name, _)| name.trim()))
        .collect();
    for f in ["docker/Dockerfile", "docker/Dockerfile.cuda"] {
        let text = std::fs::read_to_string(deploy().join(f)).unwrap();
        for list in text.split("--features ").skip(1) {
            for feature in list.split_whitespace().next().unwrap().split(',') {
                assert!(declared.contains(&feature), "{f}: fresco-cli has no feature {feature:?} (declared: {declared:?})");
            }
        }
    }
    let coord_env = compose["services"]["coordinator"]["environment"].as_mapping().unwrap();
    let h = help("coordinator");
    for k in coord_env.keys() {
        assert!(h.contains(&format!("env: {}", k.as_str().unwrap())), "coordinator reads no {k:?}");
    }
}
