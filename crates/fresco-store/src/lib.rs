//! The durable job queue behind the coordinator: a [`JobStore`] trait with a PostgreSQL implementation
//! (production, several coordinator replicas on one database) and an embedded SQLite one (`fresco run`).
//! Both pass one conformance suite (`tests/conformance.rs`).
//!
//! Queue semantics, as in River and underway: a task is a batch of consecutive prompts; a lease hands one
//! task to one worker with a fresh lease token; every heartbeat, completion and failure is fenced by that
//! token, so a worker that lost its lease changes nothing; expired leases go back to the queue (counted as
//! lost, apart from failures) and a task lost too often is quarantined as failed.

mod error;
pub mod ingest;
pub mod postgres;
mod rows;
pub mod sqlite;
mod tx;
mod types;

use std::time::Duration;

use async_trait::async_trait;
use fresco_core::{JobId, LeaseToken, TaskId};

pub use error::{StoreError, StoreResult};
pub use types::*;

/// A job submission in progress. Prompts are appended in chunks inside one transaction; dropping it
/// without `commit` leaves nothing behind.
#[async_trait]
pub trait JobIngest: Send {
    /// Appends prompts in order; they get the next indices.
    async fn append(&mut self, prompts: Vec<NewPrompt>) -> StoreResult<()>;
    /// Number of prompts appended so far.
    fn appended(&self) -> u64;
    async fn commit(self: Box<Self>) -> StoreResult<JobId>;
    /// Discards everything appended, releasing the transaction at once (dropping does it lazily).
    async fn abort(self: Box<Self>);
}

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Applies pending migrations.
    async fn migrate(&self) -> StoreResult<()>;

    /// Starts a submission. When `client_request_id` names an existing job, returns that job instead.
    async fn begin_job(&self, job: NewJob) -> StoreResult<BeginJob>;
    async fn get_job(&self, id: JobId) -> StoreResult<JobSummary>;
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobSummary>>;
    /// Cancels a job that has not ended; returns its state afterwards.
    async fn cancel_job(&self, id: JobId) -> StoreResult<fresco_core::JobState>;
    /// Puts the failed tasks of a job back into the queue; returns how many.
    async fn retry_failed(&self, id: JobId) -> StoreResult<u64>;
    /// Outputs of a job ordered by prompt index, starting after `after`.
    async fn list_outputs(&self, id: JobId, after: Option<u64>, limit: u32) -> StoreResult<Vec<OutputRow>>;

    /// Records a worker. Re-registering a name expires the leases it held (the process restarted).
    async fn register_worker(&self, worker: &WorkerInfo) -> StoreResult<()>;
    /// Leases the best pending task for this worker, if any.
    async fn lease(&self, req: &LeaseRequest) -> StoreResult<Option<LeasedTask>>;
    /// Extends the given leases; reports which are still held, cancelled, or lost.
    async fn heartbeat(&self, worker: &str, leases: &[(TaskId, LeaseToken)], ttl: Duration) -> StoreResult<Vec<LeaseStatus>>;
    /// Records a task's outputs (one per prompt) and marks it succeeded.
    async fn complete(&self, task: TaskId, token: LeaseToken, outputs: Vec<NewOutput>) -> StoreResult<()>;
    /// Records a failure; a retryable one is re-queued with backoff until `max_attempts`.
    async fn fail(&self, task: TaskId, token: LeaseToken, failure: &Failure) -> StoreResult<FailOutcome>;
    /// Returns expired leases to the queue (or quarantines them); safe to run on every replica at once.
    async fn sweep_expired(&self) -> StoreResult<SweepOutcome>;

    /// Pending and leased work per model, for routing status and autoscaling metrics.
    async fn queue_depth(&self) -> StoreResult<Vec<ModelDepth>>;
    /// Workers seen within `within`.
    async fn live_workers(&self, within: Duration) -> StoreResult<Vec<WorkerInfo>>;
}
