//! The models a worker serves: every diffusers-layout folder under its models directory, named by the
//! folder. One is kept loaded at a time; the coordinator prefers to send work for it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fresco_pipeline::{DeviceSpec, Pipeline, PipelineError};

pub struct ModelRegistry {
    dirs: BTreeMap<String, PathBuf>,
    device: DeviceSpec,
    loaded: Mutex<Option<(String, Arc<Pipeline>)>>,
}

impl ModelRegistry {
    pub fn scan(root: &Path, device: DeviceSpec) -> Result<Self, String> {
        let entries = std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let mut dirs = BTreeMap::new();
        for e in entries.flatten() {
            let path = e.path();
            if !path.join("model_index.json").is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            match fresco_core::validate_model_name(&name) {
                Ok(()) => {
                    dirs.insert(name, path);
                }
                Err(err) => tracing::warn!(path = %path.display(), error = %err, "skipping model folder"),
            }
        }
        if dirs.is_empty() {
            return Err(format!("{}: no model folders (each needs a model_index.json)", root.display()));
        }
        Ok(Self { dirs, device, loaded: Mutex::new(None) })
    }

    /// A registry serving exactly the given folders (for `fresco run --model DIR`).
    pub fn single(name: String, dir: PathBuf, device: DeviceSpec) -> Self {
        Self { dirs: BTreeMap::from([(name, dir)]), device, loaded: Mutex::new(None) }
    }

    pub fn names(&self) -> Vec<String> {
        self.dirs.keys().cloned().collect()
    }

    pub fn loaded_name(&self) -> Option<String> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(n, _)| n.clone())
    }

    /// The pipeline for `name`, loading it (and dropping the previous one) if needed. Blocking.
    pub fn get(&self, name: &str) -> Result<Arc<Pipeline>, PipelineError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, p)) = loaded.as_ref() {
            if n == name {
                return Ok(p.clone());
            }
        }
        let dir = self.dirs.get(name).ok_or_else(|| PipelineError::Unsupported(format!("this worker does not serve model {name:?}")))?;
        // Free the old model before loading the new one: accelerators rarely hold two.
        *loaded = None;
        let started = std::time::Instant::now();
        let p = Arc::new(Pipeline::load(dir, &self.device)?);
        tracing::info!(model = name, seconds = started.elapsed().as_secs_f64(), "model loaded");
        *loaded = Some((name.to_string(), p.clone()));
        Ok(p)
    }
}
