//! Wire ↔ core conversions. Decoding validates: a malformed value becomes a [`ValidationError`] naming the
//! field, which the services turn into `InvalidArgument`.

use fresco_core::{GenerationParams, ImageFormat, JobState, ParamOverrides, ValidationError};

use crate::v1;

pub fn params_from_proto(p: Option<v1::GenerationParams>) -> Result<GenerationParams, ValidationError> {
    let p = p.unwrap_or_default();
    let format = if p.format.is_empty() {
        ImageFormat::Png
    } else {
        p.format.parse().map_err(|e: String| ValidationError::new("params.format", e))?
    };
    let out = GenerationParams {
        steps: p.steps,
        guidance: p.guidance,
        width: p.width,
        height: p.height,
        scheduler: p.scheduler.filter(|s| !s.is_empty()),
        negative_prompt: p.negative_prompt,
        format,
    };
    out.validate().map_err(|e| ValidationError::new(format!("params.{}", e.field), e.message))?;
    Ok(out)
}

pub fn params_to_proto(p: &GenerationParams) -> v1::GenerationParams {
    v1::GenerationParams {
        steps: p.steps,
        guidance: p.guidance,
        width: p.width,
        height: p.height,
        scheduler: p.scheduler.clone(),
        negative_prompt: p.negative_prompt.clone(),
        format: p.format.to_string(),
    }
}

pub fn overrides_from_proto(o: Option<v1::PromptOverrides>) -> ParamOverrides {
    let o = o.unwrap_or_default();
    ParamOverrides {
        negative_prompt: o.negative_prompt,
        seed: o.seed,
        steps: o.steps,
        guidance: o.guidance,
        width: o.width,
        height: o.height,
        extra: o.extra.into_iter().collect(),
    }
}

pub fn overrides_to_proto(o: &ParamOverrides) -> v1::PromptOverrides {
    v1::PromptOverrides {
        negative_prompt: o.negative_prompt.clone(),
        seed: o.seed,
        steps: o.steps,
        guidance: o.guidance,
        width: o.width,
        height: o.height,
        extra: o.extra.clone().into_iter().collect(),
    }
}

pub fn job_state_to_proto(s: JobState) -> v1::JobState {
    match s {
        JobState::Queued => v1::JobState::Queued,
        JobState::Running => v1::JobState::Running,
        JobState::Succeeded => v1::JobState::Succeeded,
        JobState::Failed => v1::JobState::Failed,
        JobState::Cancelled => v1::JobState::Cancelled,
    }
}

pub fn job_state_from_proto(s: v1::JobState) -> Option<JobState> {
    match s {
        v1::JobState::Unspecified => None,
        v1::JobState::Queued => Some(JobState::Queued),
        v1::JobState::Running => Some(JobState::Running),
        v1::JobState::Succeeded => Some(JobState::Succeeded),
        v1::JobState::Failed => Some(JobState::Failed),
        v1::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_and_validate() {
        let p = GenerationParams { steps: Some(4), width: Some(64), format: ImageFormat::Webp, ..Default::default() };
        assert_eq!(params_from_proto(Some(params_to_proto(&p))).unwrap(), p);
        let bad = v1::GenerationParams { steps: Some(0), ..Default::default() };
        assert_eq!(params_from_proto(Some(bad)).unwrap_err().field, "params.steps");
        let bad = v1::GenerationParams { format: "gif".into(), ..Default::default() };
        assert_eq!(params_from_proto(Some(bad)).unwrap_err().field, "params.format");
    }

    #[test]
    fn states_map_both_ways() {
        for s in JobState::ALL {
            assert_eq!(job_state_from_proto(job_state_to_proto(s)), Some(s));
        }
    }
}
