//! Reading a model folder in the diffusers layout: `model_index.json`, each component's config, and its
//! safetensors weights (single file, `*.fp16.safetensors` variants, or shards listed in
//! `*.safetensors.index.json`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{PipelineError, Result};

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| PipelineError::config(path, format!("invalid JSON: {e}")))
}

/// A model folder and its parsed `model_index.json`.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub root: PathBuf,
    pub index: Value,
}

impl ModelDir {
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(PipelineError::config(root, "model folder does not exist"));
        }
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(PipelineError::config(
                &index_path,
                "missing: a model folder must be in the diffusers layout (model_index.json plus component folders)",
            ));
        }
        let index: Value = read_json(&index_path)?;
        if !index.is_object() {
            return Err(PipelineError::config(&index_path, "expected a JSON object"));
        }
        Ok(Self { root: root.to_path_buf(), index })
    }

    pub fn class_name(&self) -> Option<&str> {
        self.index.get("_class_name").and_then(Value::as_str)
    }

    /// The class a component is declared as in `model_index.json` (`["diffusers", "UNet2DConditionModel"]`).
    pub fn component_class(&self, name: &str) -> Option<&str> {
        self.index.get(name)?.as_array()?.get(1)?.as_str()
    }

    pub fn has_component(&self, name: &str) -> bool {
        self.component_class(name).is_some() && self.root.join(name).is_dir()
    }

    pub fn component(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        if self.component_class(name).is_none() {
            return Err(PipelineError::config(&self.root.join("model_index.json"), format!("no component {name:?} declared")));
        }
        if !dir.is_dir() {
            return Err(PipelineError::config(&dir, "component folder is missing"));
        }
        Ok(dir)
    }

    pub fn flag(&self, key: &str) -> Option<bool> {
        self.index.get(key).and_then(Value::as_bool)
    }
}

/// The weight files of one component, preferring full precision and falling back to the `fp16` variant.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|source| PipelineError::Io { path: dir.to_path_buf(), source })?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    // Sharded weights: the index maps every tensor to its shard.
    for variant in ["", ".fp16"] {
        let index = names
            .iter()
            .find(|n| n.ends_with(&format!("{variant}.safetensors.index.json")) && (variant.is_empty() != n.contains(".fp16.")));
        if let Some(index) = index {
            let path = dir.join(index);
            let json: Value = read_json(&path)?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| PipelineError::config(&path, "no \"weight_map\" object"))?;
            let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
            let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
            for f in &files {
                if !f.is_file() {
                    return Err(PipelineError::weights(f, format!("shard listed in {index} is missing")));
                }
            }
            return Ok(files);
        }
    }
    let single = names
        .iter()
        .find(|n| n.ends_with(".safetensors") && !n.ends_with(".fp16.safetensors"))
        .or_else(|| names.iter().find(|n| n.ends_with(".fp16.safetensors")));
    match single {
        Some(n) => Ok(vec![dir.join(n)]),
        None => Err(PipelineError::weights(dir, "no *.safetensors weights found")),
    }
}

/// Weights of one component, converted to `dtype` on `device` as they are read.
pub struct Weights {
    pub vb: VarBuilder<'static>,
    pub files: Vec<PathBuf>,
}

impl Weights {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = weight_files(dir)?;
        // Check each header up front so a truncated or corrupt file is reported by name instead of
        // surfacing later as a missing tensor.
        for f in &files {
            check_safetensors_header(f)?;
        }
        // SAFETY: the memory map is read-only and model files are not rewritten while a worker serves
        // them; this is the loading path candle itself recommends for large checkpoints.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }.map_err(|e| PipelineError::weights(&files[0], e))?;
        Ok(Self { vb, files })
    }

    /// Names the component's weight file when a tensor is missing or has the wrong shape.
    pub fn context<T>(&self, r: candle_core::Result<T>) -> Result<T> {
        r.map_err(|e| {
            let path = if self.files.len() == 1 {
                self.files[0].clone()
            } else {
                self.files[0].parent().map(Path::to_path_buf).unwrap_or_default()
            };
            PipelineError::weights(&path, format!("does not match its config: {e}"))
        })
    }
}

/// Config values as diffusers' `from_config` reads them: the file's keys over the class's own defaults.
pub struct Config {
    pub path: PathBuf,
    pub value: Value,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self> {
        let value: Value = read_json(path)?;
        if !value.is_object() {
            return Err(PipelineError::config(path, "expected a JSON object"));
        }
        Ok(Self { path: path.to_path_buf(), value })
    }

    pub fn from_value(path: &Path, value: Value) -> Self {
        Self { path: path.to_path_buf(), value }
    }

    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, want: &str) -> PipelineError {
        PipelineError::config(&self.path, format!("field {key:?} must be {want}"))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.raw(key).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| self.bad(key, "a non-negative integer"))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| self.bad(key, "a non-negative integer")),
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| self.bad(key, "a non-negative integer")),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "a number")),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(key, "a number")),
        }
    }

    /// A number that must be finite and at least 0 (a rate, a level), `default` when absent.
    pub fn non_negative_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        let v = self.f64_or(key, default)?;
        if !v.is_finite() || v < 0.0 {
            return Err(self.bad(key, "a non-negative number"));
        }
        Ok(v)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(key, "a string")),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.bad(key, "a string")),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.raw(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|v| v.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.bad(key, "a list of strings"))
    }

    pub fn usizes(&self, key: &str) -> Result<Vec<usize>> {
        self.raw(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|v| v.as_u64().map(|v| v as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.bad(key, "a list of non-negative integers"))
    }

    /// A value diffusers accepts either as one integer or as a per-block list.
    pub fn per_block(&self, key: &str, blocks: usize, default: Option<usize>) -> Result<Vec<usize>> {
        match self.raw(key) {
            None => default.map(|d| vec![d; blocks]).ok_or_else(|| self.bad(key, "present")),
            Some(Value::Number(n)) => {
                let v = n.as_u64().ok_or_else(|| self.bad(key, "a non-negative integer"))?;
                Ok(vec![v as usize; blocks])
            }
            Some(Value::Array(_)) => {
                let v = self.usizes(key)?;
                if v.len() != blocks {
                    return Err(self.bad(key, &format!("a list of {blocks} entries (one per block)")));
                }
                Ok(v)
            }
            Some(_) => Err(self.bad(key, "an integer or a list of integers")),
        }
    }
}

/// Validates a safetensors file's header and that the file holds every byte the header promises,
/// reading only the header (weights can be tens of gigabytes).
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let io = |source| PipelineError::Io { path: path.to_path_buf(), source };
    let corrupt = |m: String| PipelineError::weights(path, format!("not a valid safetensors file: {m}"));
    let mut file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| corrupt("shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100_000_000 || 8 + header_len > size {
        return Err(corrupt(format!("header length {header_len} does not fit a {size}-byte file")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: Value = serde_json::from_slice(&header).map_err(|e| corrupt(format!("header is not JSON: {e}")))?;
    let entries = header.as_object().ok_or_else(|| corrupt("header is not an object".into()))?;
    let mut end = 0u64;
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry.get("data_offsets").and_then(Value::as_array);
        let stop = offsets
            .and_then(|o| o.get(1))
            .and_then(Value::as_u64)
            .ok_or_else(|| corrupt(format!("tensor {name:?} has no data_offsets")))?;
        end = end.max(stop);
    }
    if 8 + header_len + end > size {
        return Err(corrupt(format!("truncated: the header describes {} bytes of data but the file has {}", end, size - 8 - header_len)));
    }
    Ok(())
}
