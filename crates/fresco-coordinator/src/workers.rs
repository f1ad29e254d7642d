//! The worker-facing WorkerService: registration, long-poll leasing, fenced heartbeats and reports.

use std::sync::Arc;
use std::time::Duration;

use fresco_core::{validate_model_name, ImageFormat, LeaseToken, ObjectKeys, TaskId};
use fresco_proto::params_to_proto;
use fresco_proto::v1;
use fresco_proto::v1::worker_service_server::WorkerService;
use fresco_store::{FailOutcome, Failure, LeaseRequest, LeaseStatus, LeasedTask, NewOutput, WorkerInfo};
use tonic::{Request, Response, Status};

use crate::auth::{Role, Tokens};
use crate::error::{status_from_store, status_from_validation};
use crate::Coordinator;

pub struct WorkerServiceImpl {
    c: Arc<Coordinator>,
    tokens: Tokens,
}

impl WorkerServiceImpl {
    pub fn new(c: Arc<Coordinator>, tokens: Tokens) -> Self {
        Self { c, tokens }
    }
}

fn worker_name(name: &str) -> Result<(), Status> {
    if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument("worker: must be 1-200 printable characters"));
    }
    Ok(())
}

fn token(s: &str) -> Result<LeaseToken, Status> {
    s.parse().map_err(|_| Status::invalid_argument("lease_token: malformed"))
}

fn models(list: &[String]) -> Result<(), Status> {
    if list.is_empty() || list.len() > 1000 {
        return Err(Status::invalid_argument("models: list 1-1000 served models"));
    }
    for m in list {
        validate_model_name(m).map_err(status_from_validation)?;
    }
    Ok(())
}

fn task_to_proto(t: LeasedTask) -> v1::Task {
    let format: ImageFormat = t.params.format;
    v1::Task {
        task_id: t.task_id.0,
        job_id: t.job_id.to_string(),
        lease_token: t.token.to_string(),
        attempt: t.attempt,
        model: t.model,
        params: Some(params_to_proto(&t.params)),
        output_url: t.output_url,
        prompts: t
            .prompts
            .into_iter()
            .map(|p| {
                let keys = ObjectKeys::new(t.job_id, p.index, format);
                v1::LeasedPrompt {
                    index: p.index,
                    prompt: p.prompt,
                    negative_prompt: p.negative_prompt,
                    seed: p.seed,
                    extra: p.extra.into_iter().collect(),
                    image_key: keys.image,
                    sidecar_key: keys.sidecar,
                }
            })
            .collect(),
        lease_expires_at_ms: t.expires_at.timestamp_millis(),
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerServiceImpl {
    async fn register(&self, req: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        self.tokens.check(&req, Role::Worker)?;
        let r = req.into_inner();
        worker_name(&r.name)?;
        models(&r.models)?;
        let info = WorkerInfo {
            name: r.name.clone(),
            models: r.models,
            device: r.device.chars().take(100).collect(),
            max_batch: r.max_batch.max(1),
            loaded_model: None,
        };
        self.c.store.register_worker(&info).await.map_err(status_from_store)?;
        tracing::info!(worker = %r.name, models = ?info.models, device = %info.device, "worker registered");
        Ok(Response::new(v1::RegisterResponse {
            lease_ttl_ms: self.c.config.lease_ttl.as_millis() as u32,
            heartbeat_interval_ms: self.c.config.heartbeat_interval.as_millis() as u32,
        }))
    }

    async fn lease(&self, req: Request<v1::LeaseRequest>) -> Result<Response<v1::LeaseResponse>, Status> {
        self.tokens.check(&req, Role::Worker)?;
        let r = req.into_inner();
        worker_name(&r.worker)?;
        models(&r.models)?;
        let lease = LeaseRequest {
            worker: r.worker,
            loaded_model: (!r.loaded_model.is_empty()).then_some(r.loaded_model),
            models: r.models,
            max_batch: r.max_batch.max(1),
            ttl: self.c.config.lease_ttl,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(r.wait_ms as u64).min(self.c.config.max_lease_wait);
        loop {
            // Register interest before looking, so a submission between the look and the wait still wakes us.
            let notified = self.c.work_available.notified();
            if let Some(t) = self.c.store.lease(&lease).await.map_err(status_from_store)? {
                self.c.metrics.leases.inc();
                tracing::debug!(worker = %lease.worker, task = t.task_id.0, job = %t.job_id, attempt = t.attempt, "task leased");
                return Ok(Response::new(v1::LeaseResponse { task: Some(task_to_proto(t)) }));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Response::new(v1::LeaseResponse { task: None }));
            }
            // Tasks also become available by time (backoff ends), which no notification announces.
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_secs(1)), notified).await;
        }
    }

    async fn heartbeat(&self, req: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.tokens.check(&req, Role::Worker)?;
        let r = req.into_inner();
        worker_name(&r.worker)?;
        if r.leases.len() > 10_000 {
            return Err(Status::invalid_argument("leases: too many"));
        }
        let leases = r.leases.iter().map(|l| Ok((TaskId(l.task_id), token(&l.lease_token)?))).collect::<Result<Vec<_>, Status>>()?;
        let statuses = self.c.store.heartbeat(&r.worker, &leases, self.c.config.lease_ttl).await.map_err(status_from_store)?;
        let mut resp = v1::HeartbeatResponse::default();
        for s in statuses {
            match s {
                LeaseStatus::Held(_) => {}
                LeaseStatus::Cancelled(t) => resp.cancelled.push(t.0),
                LeaseStatus::Lost(t) => resp.lost.push(t.0),
            }
        }
        Ok(Response::new(resp))
    }

    async fn complete(&self, req: Request<v1::CompleteRequest>) -> Result<Response<v1::CompleteResponse>, Status> {
        self.tokens.check(&req, Role::Worker)?;
        let r = req.into_inner();
        worker_name(&r.worker)?;
        let lease = token(&r.lease_token)?;
        let n = r.results.len() as u64;
        let outputs = r
            .results
            .into_iter()
            .map(|p| {
                let metadata: serde_json::Value = serde_json::from_str(&p.metadata_json)
                    .map_err(|e| Status::invalid_argument(format!("results[{}].metadata_json: {e}", p.index)))?;
                if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Status::invalid_argument(format!("results[{}].sha256: expected 64 hex digits", p.index)));
                }
                Ok(NewOutput {
                    index: p.index,
                    object_key: p.object_key,
                    url: p.url,
                    sha256: p.sha256,
                    bytes: p.bytes,
                    worker: r.worker.clone(),
                    metadata,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        self.c.store.complete(TaskId(r.task_id), lease, outputs).await.map_err(status_from_store)?;
        self.c.metrics.completed_tasks.inc();
        self.c.metrics.completed_prompts.inc_by(n);
        Ok(Response::new(v1::CompleteResponse {}))
    }

    async fn fail(&self, req: Request<v1::FailRequest>) -> Result<Response<v1::FailResponse>, Status> {
        self.tokens.check(&req, Role::Worker)?;
        let r = req.into_inner();
        worker_name(&r.worker)?;
        let lease = token(&r.lease_token)?;
        let failure = Failure { message: r.message.chars().take(4000).collect(), retryable: r.retryable };
        let outcome = self.c.store.fail(TaskId(r.task_id), lease, &failure).await.map_err(status_from_store)?;
        self.c.metrics.failures.with_label_values(&[if r.retryable { "true" } else { "false" }]).inc();
        tracing::warn!(worker = %r.worker, task = r.task_id, retryable = r.retryable, message = %failure.message, ?outcome, "task failed");
        if matches!(outcome, FailOutcome::Retrying { .. }) {
            self.c.work_available.notify_waiters();
        }
        Ok(Response::new(v1::FailResponse { will_retry: matches!(outcome, FailOutcome::Retrying { .. }) }))
    }
}
