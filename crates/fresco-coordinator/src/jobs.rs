//! The client-facing JobService.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use fresco_core::{validate_model_name, validate_output_url, JobId, ValidationError};
use fresco_proto::v1::job_service_server::JobService;
use fresco_proto::v1::{self, submit_job_request::Kind};
use fresco_proto::{job_state_from_proto, job_state_to_proto, overrides_from_proto, params_from_proto, params_to_proto};
use fresco_store::{BeginJob, JobFilter, JobSummary, NewJob, NewPrompt};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Role, Tokens};
use crate::error::{status_from_store, status_from_validation};
use crate::Coordinator;

pub struct JobServiceImpl {
    c: Arc<Coordinator>,
    tokens: Tokens,
}

impl JobServiceImpl {
    pub fn new(c: Arc<Coordinator>, tokens: Tokens) -> Self {
        Self { c, tokens }
    }

    async fn to_proto(&self, j: JobSummary) -> Result<v1::Job, Status> {
        Ok(self.to_protos(vec![j]).await?.remove(0))
    }

    /// Jobs as clients see them; the live workers are read once for the whole list.
    async fn to_protos(&self, jobs: Vec<JobSummary>) -> Result<Vec<v1::Job>, Status> {
        let live = self.c.store.live_workers(self.c.config.worker_live_window).await.map_err(status_from_store)?;
        Ok(jobs
            .into_iter()
            .map(|j| {
                let served = live.iter().any(|w| w.models.contains(&j.model));
                job_to_proto(j, !served)
            })
            .collect())
    }
}

fn parse_job_id(s: &str) -> Result<JobId, Status> {
    s.parse().map_err(|_| Status::invalid_argument(format!("job_id: {s:?} is not a job id")))
}

fn ms(t: chrono::DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Progress, rate and ETA as clients see them.
pub fn job_to_proto(j: JobSummary, waiting_for_worker: bool) -> v1::Job {
    let c = &j.counts;
    let ended = c.succeeded + c.failed + c.cancelled;
    let progress = if j.total == 0 { 0.0 } else { ended as f64 / j.total as f64 };
    let elapsed = j.started_at.map(|s| (j.finished_at.unwrap_or_else(Utc::now) - s).num_milliseconds().max(1) as f64 / 1000.0);
    let rate = elapsed.map(|e| c.succeeded as f64 / e).unwrap_or(0.0);
    let remaining = c.pending + c.running;
    let eta_seconds = if j.state.is_terminal() {
        Some(0.0)
    } else if rate > 0.0 {
        Some(remaining as f64 / rate)
    } else {
        None
    };
    v1::Job {
        id: j.id.to_string(),
        model: j.model,
        state: job_state_to_proto(j.state) as i32,
        params: Some(params_to_proto(&j.params)),
        output_url: j.output_url,
        batch_size: j.batch_size,
        priority: j.priority,
        seed: j.seed,
        client_request_id: j.client_request_id.unwrap_or_default(),
        total: j.total,
        counts: Some(v1::Counts {
            pending: c.pending,
            running: c.running,
            succeeded: c.succeeded,
            failed: c.failed,
            cancelled: c.cancelled,
        }),
        progress,
        images_per_second: rate,
        eta_seconds,
        last_error: j.last_error.unwrap_or_default(),
        waiting_for_worker: waiting_for_worker && !j.state.is_terminal(),
        created_at_ms: ms(j.created_at),
        started_at_ms: j.started_at.map(ms),
        finished_at_ms: j.finished_at.map(ms),
    }
}

fn validate_header(h: &v1::SubmitJobHeader, c: &Coordinator) -> Result<NewJob, ValidationError> {
    validate_model_name(&h.model)?;
    validate_output_url(&h.output_url)?;
    let params = params_from_proto(h.params.clone())?;
    let seed = if h.seed == 0 { rand::random::<u64>() >> 1 } else { h.seed };
    if seed >= 1 << 63 {
        return Err(ValidationError::new("seed", "must be below 2^63"));
    }
    Ok(NewJob {
        model: h.model.clone(),
        params,
        output_url: h.output_url.clone(),
        batch_size: if h.batch_size == 0 { c.config.default_batch_size } else { h.batch_size },
        priority: h.priority,
        seed,
        client_request_id: (!h.client_request_id.is_empty()).then(|| h.client_request_id.clone()),
        max_attempts: if h.max_attempts == 0 { c.config.default_max_attempts } else { h.max_attempts },
    })
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::Job, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobServiceImpl {
    async fn submit_job(&self, req: Request<Streaming<v1::SubmitJobRequest>>) -> Result<Response<v1::SubmitJobResponse>, Status> {
        self.tokens.check(&req, Role::Client)?;
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(v1::SubmitJobRequest { kind: Some(Kind::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("header: the first message must be the job header")),
        };
        let job = validate_header(&header, &self.c).map_err(status_from_validation)?;
        let mut ingest = match self.c.store.begin_job(job).await.map_err(status_from_store)? {
            BeginJob::Existing(id) => {
                let total = self.c.store.get_job(id).await.map_err(status_from_store)?.total;
                return Ok(Response::new(v1::SubmitJobResponse { job_id: id.to_string(), prompts: total, existing: true }));
            }
            BeginJob::New(ingest) => ingest,
        };
        // Any error below rolls the whole submission back.
        let streamed: Result<(), Status> = async {
            while let Some(msg) = stream.message().await? {
                let chunk = match msg.kind {
                    Some(Kind::Chunk(c)) => c,
                    _ => return Err(Status::invalid_argument("chunk: only prompt chunks may follow the header")),
                };
                if ingest.appended() + chunk.prompts.len() as u64 > self.c.config.max_prompts_per_job {
                    return Err(Status::invalid_argument(format!(
                        "prompts: a job holds at most {} prompts",
                        self.c.config.max_prompts_per_job
                    )));
                }
                let prompts =
                    chunk.prompts.into_iter().map(|p| NewPrompt { prompt: p.text, overrides: overrides_from_proto(p.overrides) }).collect();
                ingest.append(prompts).await.map_err(status_from_store)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = streamed {
            ingest.abort().await;
            return Err(e);
        }
        let n = ingest.appended();
        let id = ingest.commit().await.map_err(status_from_store)?;
        self.c.metrics.submitted_prompts.inc_by(n);
        self.c.work_available.notify_waiters();
        tracing::info!(job = %id, prompts = n, "job submitted");
        Ok(Response::new(v1::SubmitJobResponse { job_id: id.to_string(), prompts: n, existing: false }))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        self.tokens.check(&req, Role::Client)?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        let j = self.c.store.get_job(id).await.map_err(status_from_store)?;
        Ok(Response::new(self.to_proto(j).await?))
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        self.tokens.check(&req, Role::Client)?;
        let r = req.into_inner();
        let state = v1::JobState::try_from(r.state).map_err(|_| Status::invalid_argument(format!("state: unknown value {}", r.state)))?;
        let before = if r.page_token.is_empty() {
            None
        } else {
            Some(r.page_token.parse().map_err(|_| Status::invalid_argument("page_token: malformed"))?)
        };
        let limit = if r.page_size == 0 { 50 } else { r.page_size.min(1000) };
        let jobs =
            self.c.store.list_jobs(&JobFilter { state: job_state_from_proto(state), before, limit }).await.map_err(status_from_store)?;
        let next_page_token =
            if jobs.len() == limit as usize { jobs.last().map(|j| j.id.to_string()).unwrap_or_default() } else { String::new() };
        Ok(Response::new(v1::ListJobsResponse { jobs: self.to_protos(jobs).await?, next_page_token }))
    }

    type WatchJobStream = WatchStream;

    async fn watch_job(&self, req: Request<v1::WatchJobRequest>) -> Result<Response<WatchStream>, Status> {
        self.tokens.check(&req, Role::Client)?;
        let r = req.into_inner();
        let id = parse_job_id(&r.job_id)?;
        let interval = Duration::from_millis(if r.interval_ms == 0 { 1000 } else { r.interval_ms.clamp(100, 60_000) } as u64);
        // Fail fast on an unknown job rather than streaming an error later.
        self.c.store.get_job(id).await.map_err(status_from_store)?;
        let c = self.c.clone();
        let tokens = self.tokens.clone();
        let stream = futures::stream::unfold(Some(()), move |state| {
            let c = c.clone();
            let svc = JobServiceImpl { c: c.clone(), tokens: tokens.clone() };
            async move {
                state?;
                let item = match c.store.get_job(id).await {
                    Ok(j) => svc.to_proto(j).await,
                    Err(e) => Err(status_from_store(e)),
                };
                let done = match &item {
                    Ok(j) => v1::JobState::try_from(j.state)
                        .map(|s| matches!(s, v1::JobState::Succeeded | v1::JobState::Failed | v1::JobState::Cancelled))
                        .unwrap_or(true),
                    Err(_) => true,
                };
                if !done {
                    tokio::time::sleep(interval).await;
                }
                Some((item, (!done).then_some(())))
            }
        });
        Ok(Response::new(stream.boxed()))
    }

    async fn cancel_job(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::Job>, Status> {
        self.tokens.check(&req, Role::Client)?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        self.c.store.cancel_job(id).await.map_err(status_from_store)?;
        tracing::info!(job = %id, "job cancelled");
        let j = self.c.store.get_job(id).await.map_err(status_from_store)?;
        Ok(Response::new(self.to_proto(j).await?))
    }

    async fn retry_failed(&self, req: Request<v1::RetryFailedRequest>) -> Result<Response<v1::RetryFailedResponse>, Status> {
        self.tokens.check(&req, Role::Client)?;
        let id = parse_job_id(&req.get_ref().job_id)?;
        let n = self.c.store.retry_failed(id).await.map_err(status_from_store)?;
        self.c.work_available.notify_waiters();
        Ok(Response::new(v1::RetryFailedResponse { requeued_tasks: n }))
    }

    async fn list_outputs(&self, req: Request<v1::ListOutputsRequest>) -> Result<Response<v1::ListOutputsResponse>, Status> {
        self.tokens.check(&req, Role::Client)?;
        let r = req.into_inner();
        let id = parse_job_id(&r.job_id)?;
        let after = if r.page_token.is_empty() {
            None
        } else {
            Some(r.page_token.parse::<u64>().map_err(|_| Status::invalid_argument("page_token: malformed"))?)
        };
        let limit = if r.page_size == 0 { 1000 } else { r.page_size.min(10_000) };
        // Distinguish "no outputs yet" from "no such job".
        self.c.store.get_job(id).await.map_err(status_from_store)?;
        let rows = self.c.store.list_outputs(id, after, limit).await.map_err(status_from_store)?;
        let next_page_token =
            if rows.len() == limit as usize { rows.last().map(|o| o.index.to_string()).unwrap_or_default() } else { String::new() };
        let outputs = rows
            .into_iter()
            .map(|o| v1::Output {
                index: o.index,
                prompt: o.prompt,
                negative_prompt: o.negative_prompt.unwrap_or_default(),
                seed: o.seed,
                object_key: o.object_key,
                url: o.url,
                sha256: o.sha256,
                bytes: o.bytes,
                worker: o.worker,
                metadata_json: o.metadata.to_string(),
            })
            .collect();
        Ok(Response::new(v1::ListOutputsResponse { outputs, next_page_token }))
    }
}
