use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fresco_core::{GenerationParams, JobId, JobState, LeaseToken, ParamOverrides, TaskId};
use serde::{Deserialize, Serialize};

/// A job as submitted, before its prompts.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub model: String,
    pub params: GenerationParams,
    pub output_url: String,
    pub batch_size: u32,
    pub priority: i32,
    pub seed: u64,
    pub client_request_id: Option<String>,
    pub max_attempts: u32,
}

#[derive(Clone, Debug)]
pub struct NewPrompt {
    pub prompt: String,
    pub overrides: ParamOverrides,
}

pub enum BeginJob {
    New(Box<dyn crate::JobIngest>),
    /// A job with this client request id already exists.
    Existing(JobId),
}

/// Prompt counts by state (a prompt's state is its task's).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pending: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl Counts {
    pub fn add(&mut self, state: fresco_core::TaskState, n: u64) {
        use fresco_core::TaskState::*;
        match state {
            Pending => self.pending += n,
            Leased => self.running += n,
            Succeeded => self.succeeded += n,
            Failed => self.failed += n,
            Cancelled => self.cancelled += n,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct JobSummary {
    pub id: JobId,
    pub model: String,
    pub state: JobState,
    pub params: GenerationParams,
    pub output_url: String,
    pub batch_size: u32,
    pub priority: i32,
    pub seed: u64,
    pub client_request_id: Option<String>,
    pub total: u64,
    pub counts: Counts,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub state: Option<JobState>,
    /// Jobs created strictly before this one (paging from newest to oldest).
    pub before: Option<JobId>,
    pub limit: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub models: Vec<String>,
    pub device: String,
    pub max_batch: u32,
    pub loaded_model: Option<String>,
}

#[derive(Clone, Debug)]
pub struct LeaseRequest {
    pub worker: String,
    pub models: Vec<String>,
    /// Preferred when it has work: the model already in the worker's memory.
    pub loaded_model: Option<String>,
    pub max_batch: u32,
    pub ttl: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeasedPrompt {
    pub index: u64,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub extra: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LeasedTask {
    pub task_id: TaskId,
    pub job_id: JobId,
    pub token: LeaseToken,
    pub attempt: u32,
    pub model: String,
    pub params: GenerationParams,
    pub output_url: String,
    pub prompts: Vec<LeasedPrompt>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseStatus {
    Held(TaskId),
    Cancelled(TaskId),
    Lost(TaskId),
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewOutput {
    pub index: u64,
    pub object_key: String,
    pub url: String,
    pub sha256: String,
    pub bytes: u64,
    pub worker: String,
    pub metadata: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutputRow {
    pub index: u64,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub object_key: String,
    pub url: String,
    pub sha256: String,
    pub bytes: u64,
    pub worker: String,
    pub metadata: serde_json::Value,
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub message: String,
    pub retryable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back in the queue after the backoff.
    Retrying { attempt: u32 },
    /// Failed for good (permanent error, or attempts exhausted).
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    pub requeued: u64,
    pub quarantined: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelDepth {
    pub model: String,
    pub pending_tasks: u64,
    pub pending_prompts: u64,
    pub leased_tasks: u64,
}

/// Queue policy both backends apply.
#[derive(Clone, Debug)]
pub struct QueuePolicy {
    /// A task whose lease expired this many times is quarantined as failed (a poison batch that kills
    /// its workers must not take the fleet down one worker at a time).
    pub max_lost: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        Self { max_lost: 5, backoff_base: Duration::from_secs(2), backoff_cap: Duration::from_secs(300) }
    }
}

/// Exponential backoff with ±25% jitter: base × 2^(failures−1), capped.
pub fn retry_backoff(failures: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let d = exp.min(cap);
    let jitter = 0.75 + rand::random::<f64>() * 0.5;
    d.mul_f64(jitter)
}
