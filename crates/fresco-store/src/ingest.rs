//! Validation and preparation shared by both backends, so a submission is judged identically whichever
//! store holds it.

use std::collections::BTreeMap;

use fresco_core::batch::BatchKey;
use fresco_core::{derive_seed, validate_model_name, validate_prompt, TaskId, ValidationError};

use crate::{NewJob, NewOutput, NewPrompt, StoreError, StoreResult};

pub const MAX_BATCH_SIZE: u32 = 256;
pub const MAX_ATTEMPTS: u32 = 100;

pub fn validate_job(job: &NewJob) -> Result<(), ValidationError> {
    validate_model_name(&job.model)?;
    job.params.validate()?;
    if job.batch_size == 0 || job.batch_size > MAX_BATCH_SIZE {
        return Err(ValidationError::new("batch_size", format!("must be 1..={MAX_BATCH_SIZE}, got {}", job.batch_size)));
    }
    if job.max_attempts == 0 || job.max_attempts > MAX_ATTEMPTS {
        return Err(ValidationError::new("max_attempts", format!("must be 1..={MAX_ATTEMPTS}, got {}", job.max_attempts)));
    }
    fresco_core::validate_output_url(&job.output_url)?;
    if let Some(r) = &job.client_request_id {
        if r.is_empty() || r.len() > 200 {
            return Err(ValidationError::new("client_request_id", "must be 1-200 characters"));
        }
    }
    Ok(())
}

/// A prompt ready to insert: index, seed and batch key resolved.
pub struct PreparedPrompt {
    pub index: u64,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub extra: BTreeMap<String, String>,
    pub key: BatchKey,
}

pub fn prepare_prompts(job: &NewJob, start: u64, prompts: Vec<NewPrompt>) -> StoreResult<Vec<PreparedPrompt>> {
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let index = start + i as u64;
            let field = format!("prompts[{index}]");
            validate_prompt(&format!("{field}.prompt"), &p.prompt)?;
            p.overrides.validate(&format!("{field}."))?;
            let key = BatchKey::of(&p.overrides, &job.params);
            Ok(PreparedPrompt {
                index,
                seed: p.overrides.seed.unwrap_or_else(|| derive_seed(job.seed, index)),
                negative_prompt: p.overrides.negative_prompt,
                extra: p.overrides.extra,
                prompt: p.prompt,
                key,
            })
        })
        .collect::<Result<Vec<_>, ValidationError>>()
        .map_err(StoreError::Invalid)
}

/// A completion must carry exactly one output per prompt of the task.
pub fn check_outputs(task: TaskId, first: u64, count: u64, outputs: &[NewOutput]) -> StoreResult<()> {
    let mut seen: Vec<u64> = outputs.iter().map(|o| o.index).collect();
    seen.sort_unstable();
    let want: Vec<u64> = (first..first + count).collect();
    if seen != want {
        return Err(StoreError::Invalid(ValidationError::new(
            "outputs",
            format!("task {task} covers prompts {first}..{} but the report lists {:?}", first + count, seen),
        )));
    }
    Ok(())
}
