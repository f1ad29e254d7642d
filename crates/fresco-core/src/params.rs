//! Generation parameters as a job carries them, per-prompt overrides, and the validation every entry
//! point (gRPC, prompt files, `fresco generate`) shares. Validation errors name the offending field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ImageFormat;

pub const MAX_PROMPT_CHARS: usize = 4096;
pub const MAX_STEPS: u32 = 1000;
pub const MAX_SIDE: u32 = 4096;
pub const MAX_GUIDANCE: f32 = 100.0;
/// Scheduler names accepted on input; `None` means the model's own scheduler.
pub const SCHEDULERS: [&str; 9] =
    ["ddim", "pndm", "euler", "euler-ancestral", "dpmpp-2m", "dpmpp-2m-karras", "lcm", "flow-euler", "flow-euler-ancestral"];

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

/// Parameters shared by a job's prompts. `None` lets the model decide (its default steps, guidance and
/// native resolution), which is what users of mixed model families expect.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub format: ImageFormat,
}

/// What one prompt may change on top of its job's parameters. Extra columns of a prompt file travel in
/// `extra` into the image's metadata untouched.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

impl ParamOverrides {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The parameters a prompt is generated with. Prompts with equal results can share one batch.
    pub fn apply(&self, base: &GenerationParams) -> GenerationParams {
        GenerationParams {
            steps: self.steps.or(base.steps),
            guidance: self.guidance.or(base.guidance),
            width: self.width.or(base.width),
            height: self.height.or(base.height),
            scheduler: base.scheduler.clone(),
            negative_prompt: self.negative_prompt.clone().or_else(|| base.negative_prompt.clone()),
            format: base.format,
        }
    }

    pub fn validate(&self, prefix: &str) -> Result<(), ValidationError> {
        validate_numbers(prefix, self.steps, self.guidance, self.width, self.height)?;
        if self.seed.is_some_and(|s| s >= 1 << 63) {
            return Err(ValidationError::new(format!("{prefix}seed"), "must be below 2^63"));
        }
        if let Some(n) = &self.negative_prompt {
            validate_text(&format!("{prefix}negative_prompt"), n, true)?;
        }
        Ok(())
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate_numbers("", self.steps, self.guidance, self.width, self.height)?;
        if let Some(s) = &self.scheduler {
            if !SCHEDULERS.contains(&s.as_str()) {
                return Err(ValidationError::new(
                    "scheduler",
                    format!("unknown scheduler {s:?}; expected one of {}", SCHEDULERS.join(", ")),
                ));
            }
        }
        if let Some(n) = &self.negative_prompt {
            validate_text("negative_prompt", n, true)?;
        }
        Ok(())
    }
}

fn validate_numbers(
    prefix: &str,
    steps: Option<u32>,
    guidance: Option<f32>,
    width: Option<u32>,
    height: Option<u32>,
) -> Result<(), ValidationError> {
    if let Some(s) = steps {
        if s == 0 || s > MAX_STEPS {
            return Err(ValidationError::new(format!("{prefix}steps"), format!("must be 1..={MAX_STEPS}, got {s}")));
        }
    }
    if let Some(g) = guidance {
        if !g.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&g) {
            return Err(ValidationError::new(format!("{prefix}guidance"), format!("must be a number in 0..={MAX_GUIDANCE}, got {g}")));
        }
    }
    for (name, v) in [("width", width), ("height", height)] {
        if let Some(v) = v {
            if v == 0 || v > MAX_SIDE || v % 8 != 0 {
                return Err(ValidationError::new(format!("{prefix}{name}"), format!("must be a multiple of 8 in 8..={MAX_SIDE}, got {v}")));
            }
        }
    }
    Ok(())
}

fn validate_text(field: &str, text: &str, may_be_empty: bool) -> Result<(), ValidationError> {
    if !may_be_empty && text.trim().is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    let chars = text.chars().count();
    if chars > MAX_PROMPT_CHARS {
        return Err(ValidationError::new(field, format!("is {chars} characters long; the limit is {MAX_PROMPT_CHARS}")));
    }
    if text.contains('\0') {
        return Err(ValidationError::new(field, "contains a NUL character"));
    }
    Ok(())
}

/// A prompt must be non-empty, at most [`MAX_PROMPT_CHARS`] characters, and free of NUL bytes (which
/// PostgreSQL text cannot hold).
pub fn validate_prompt(field: &str, prompt: &str) -> Result<(), ValidationError> {
    validate_text(field, prompt, false)
}

/// Model names are folder names on workers and labels in metrics: a conservative charset keeps both safe.
pub fn validate_model_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "model",
            format!("{name:?} is not a model name (1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"),
        ))
    }
}

/// Output locations workers can write to: `s3://`, `gs://`, `az://` (also `azure://`, `abfs://`),
/// `file://` URLs, or a plain filesystem path.
pub fn validate_output_url(url: &str) -> Result<(), ValidationError> {
    let bad = |m: &str| Err(ValidationError::new("output_url", format!("{url:?}: {m}")));
    if url.trim().is_empty() {
        return bad("must not be empty");
    }
    if url.len() > 2048 || url.chars().any(|c| c.is_control()) {
        return bad("is too long or contains control characters");
    }
    match url.split_once("://") {
        None => Ok(()),
        Some((scheme, rest)) => match scheme {
            "s3" | "gs" | "az" | "azure" | "abfs" | "abfss" => {
                let bucket = rest.split('/').next().unwrap_or("");
                if bucket.is_empty() {
                    bad("names no bucket")
                } else {
                    Ok(())
                }
            }
            "file" if rest.starts_with('/') => Ok(()),
            "file" => bad("file:// URLs need an absolute path"),
            _ => bad("unsupported scheme (use s3://, gs://, az://, file:// or a path)"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_urls() {
        for ok in ["s3://bucket/prefix", "gs://b", "file:///tmp/x", "out/images", "/abs/path"] {
            assert!(validate_output_url(ok).is_ok(), "{ok}");
        }
        for bad in ["", "s3://", "s3:///x", "ftp://host/x", "file://relative", "a\nb"] {
            let bad = bad.replace("\\n", "\n");
            assert_eq!(validate_output_url(&bad).unwrap_err().field, "output_url", "{bad}");
        }
    }

    #[test]
    fn out_of_range_numbers_name_their_field() {
        let p = GenerationParams { steps: Some(0), ..Default::default() };
        assert_eq!(p.validate().unwrap_err().field, "steps");
        let p = GenerationParams { width: Some(100), ..Default::default() };
        assert_eq!(p.validate().unwrap_err().field, "width");
        let p = GenerationParams { guidance: Some(f32::NAN), ..Default::default() };
        assert_eq!(p.validate().unwrap_err().field, "guidance");
        let p = GenerationParams { scheduler: Some("magic".into()), ..Default::default() };
        assert_eq!(p.validate().unwrap_err().field, "scheduler");
        let o = ParamOverrides { height: Some(5000), ..Default::default() };
        assert_eq!(o.validate("prompts[3].").unwrap_err().field, "prompts[3].height");
    }

    #[test]
    fn prompts_and_model_names() {
        assert!(validate_prompt("prompt", "  ").is_err());
        assert!(validate_prompt("prompt", &"x".repeat(MAX_PROMPT_CHARS + 1)).is_err());
        assert!(validate_prompt("prompt", "a\0b").is_err());
        assert!(validate_prompt("prompt", "a red circle").is_ok());
        assert!(validate_model_name("fresco-tiny").is_ok());
        assert!(validate_model_name("../etc").is_err());
        assert!(validate_model_name("").is_err());
    }

    #[test]
    fn overrides_win_over_job_defaults() {
        let base = GenerationParams { steps: Some(20), guidance: Some(7.5), ..Default::default() };
        let o = ParamOverrides { steps: Some(4), ..Default::default() };
        let p = o.apply(&base);
        assert_eq!(p.steps, Some(4));
        assert_eq!(p.guidance, Some(7.5));
        assert!(ParamOverrides::default().is_empty());
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Validation never panics, and whatever it accepts is within the documented bounds.
        #[test]
        fn validation_accepts_only_bounded_values(
            steps in proptest::option::of(any::<u32>()),
            guidance in proptest::option::of(any::<f32>()),
            width in proptest::option::of(any::<u32>()),
            height in proptest::option::of(any::<u32>()),
            scheduler in proptest::option::of(".{0,20}"),
            negative in proptest::option::of("(?s).{0,64}"),
        ) {
            let p = GenerationParams { steps, guidance, width, height, scheduler, negative_prompt: negative, format: ImageFormat::Png };
            if p.validate().is_ok() {
                prop_assert!(p.steps.is_none_or(|s| (1..=MAX_STEPS).contains(&s)));
                prop_assert!(p.guidance.is_none_or(|g| g.is_finite() && (0.0..=MAX_GUIDANCE).contains(&g)));
                prop_assert!(p.width.is_none_or(|w| w % 8 == 0 && w > 0 && w <= MAX_SIDE));
                prop_assert!(p.height.is_none_or(|h| h % 8 == 0 && h > 0 && h <= MAX_SIDE));
                prop_assert!(p.scheduler.as_deref().is_none_or(|s| SCHEDULERS.contains(&s)));
            }
        }

        #[test]
        fn prompts_and_model_names_never_panic(s in "(?s).{0,300}") {
            let _ = validate_prompt("prompt", &s);
            let _ = validate_model_name(&s);
            let _ = validate_output_url(&s);
        }
    }
}
