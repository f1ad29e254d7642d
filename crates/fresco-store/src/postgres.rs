//! The production store: PostgreSQL, shared by any number of coordinator replicas.
//!
//! Claims use `FOR UPDATE SKIP LOCKED` inside a materialized CTE, so concurrent lessees never block on or
//! double-claim a task; every later report is fenced by the lease token.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use fresco_core::batch::{PlannedTask, TaskPlanner};
use fresco_core::{JobId, JobState, LeaseToken, TaskId, TaskState};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::ingest::{prepare_prompts, PreparedPrompt};
use crate::rows::{leased_prompt, output_row, worker_row};
use crate::tx::{check_fence, empty_job, finish, rollback};
use crate::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    policy: QueuePolicy,
}

impl PgStore {
    pub async fn connect(url: &str, max_connections: u32, policy: QueuePolicy) -> StoreResult<Self> {
        let opts: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts.application_name("fresco"))
            .await?;
        Ok(Self { pool, policy })
    }

    pub fn from_pool(pool: PgPool, policy: QueuePolicy) -> Self {
        Self { pool, policy }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn finalize_job(&self, job: Uuid) -> StoreResult<()> {
        // Runs after the mutation committed: whichever report commits last sees every other one and ends
        // the job, so concurrent completions cannot leave it running forever.
        sqlx::query(
            "UPDATE jobs SET state = CASE WHEN EXISTS (SELECT 1 FROM tasks WHERE job_id = $1 AND state = 'failed') \
                 THEN 'failed' ELSE 'succeeded' END, finished_at = now() \
             WHERE id = $1 AND state IN ('queued', 'running') \
               AND NOT EXISTS (SELECT 1 FROM tasks WHERE job_id = $1 AND state IN ('pending', 'leased'))",
        )
        .bind(job)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn counts(&self, job: Uuid) -> StoreResult<Counts> {
        let rows = sqlx::query("SELECT state, SUM(count)::BIGINT AS n FROM tasks WHERE job_id = $1 GROUP BY state")
            .bind(job)
            .fetch_all(&self.pool)
            .await?;
        let mut counts = Counts::default();
        for r in rows {
            let state: String = r.try_get("state")?;
            let n: i64 = r.try_get("n")?;
            counts.add(parse_task_state(&state)?, n as u64);
        }
        Ok(counts)
    }

    async fn summary(&self, r: &sqlx::postgres::PgRow) -> StoreResult<JobSummary> {
        let id: Uuid = r.try_get("id")?;
        let Json(params) = r.try_get("params")?;
        let state: String = r.try_get("state")?;
        Ok(JobSummary {
            id: JobId(id),
            model: r.try_get("model")?,
            state: state.parse().map_err(StoreError::Corrupt)?,
            params,
            output_url: r.try_get("output_url")?,
            batch_size: r.try_get::<i32, _>("batch_size")? as u32,
            priority: r.try_get("priority")?,
            seed: r.try_get::<i64, _>("seed")? as u64,
            client_request_id: r.try_get("client_request_id")?,
            total: r.try_get::<i64, _>("total_prompts")? as u64,
            counts: self.counts(id).await?,
            last_error: r.try_get("last_error")?,
            created_at: r.try_get("created_at")?,
            started_at: r.try_get("started_at")?,
            finished_at: r.try_get("finished_at")?,
        })
    }
}

fn parse_task_state(s: &str) -> StoreResult<TaskState> {
    s.parse().map_err(StoreError::Corrupt)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A job's state, read under the transaction's lock (PostgreSQL: `FOR UPDATE`; SQLite: the write lock).
async fn locked_job_state(tx: &mut Transaction<'static, Postgres>, id: JobId) -> StoreResult<JobState> {
    let row = sqlx::query("SELECT state FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(id.0)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
    row.try_get::<String, _>("state")?.parse().map_err(StoreError::Corrupt)
}

/// A task row (with its job's max_attempts), locked for the rest of the transaction.
async fn locked_task(tx: &mut Transaction<'static, Postgres>, task: TaskId) -> StoreResult<sqlx::postgres::PgRow> {
    sqlx::query("SELECT t.*, j.max_attempts FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id = $1 FOR UPDATE OF t")
        .bind(task.0)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("task {task}")))
}

/// Checks a report's lease token against the locked row; `Ok(true)` means already recorded.
fn fence(row: &sqlx::postgres::PgRow, task: TaskId, token: LeaseToken, allow_done: bool) -> StoreResult<bool> {
    let state = parse_task_state(&row.try_get::<String, _>("state")?)?;
    let held: Option<Uuid> = row.try_get("lease_token")?;
    check_fence(task, state, held == Some(token.0), allow_done)
}

struct PgIngest {
    tx: Option<Transaction<'static, Postgres>>,
    pool: Option<PgPool>,
    job: NewJob,
    id: Uuid,
    planner: TaskPlanner,
}

impl PgIngest {
    async fn insert_tasks(&mut self, tasks: Vec<PlannedTask>) -> StoreResult<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        let firsts: Vec<i64> = tasks.iter().map(|t| t.first as i64).collect();
        let counts: Vec<i32> = tasks.iter().map(|t| t.count as i32).collect();
        let params: Vec<Json<fresco_core::GenerationParams>> = tasks.iter().map(|t| Json(t.key.params(&self.job.params))).collect();
        let tx = self.tx.as_mut().ok_or_else(|| StoreError::Conflict("submission already finished".into()))?;
        sqlx::query("INSERT INTO tasks (job_id, first_idx, count, params) SELECT $1, * FROM UNNEST($2::BIGINT[], $3::INT[], $4::JSONB[])")
            .bind(self.id)
            .bind(&firsts)
            .bind(&counts)
            .bind(&params)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl JobIngest for PgIngest {
    async fn append(&mut self, prompts: Vec<NewPrompt>) -> StoreResult<()> {
        let start = self.planner.next_index();
        let prepared: Vec<PreparedPrompt> = prepare_prompts(&self.job, start, prompts)?;
        let mut tasks = Vec::new();
        for p in &prepared {
            tasks.extend(self.planner.push(p.key.clone()));
        }
        let idx: Vec<i64> = prepared.iter().map(|p| p.index as i64).collect();
        let text: Vec<&str> = prepared.iter().map(|p| p.prompt.as_str()).collect();
        let neg: Vec<Option<&str>> = prepared.iter().map(|p| p.negative_prompt.as_deref()).collect();
        let seeds: Vec<i64> = prepared.iter().map(|p| p.seed as i64).collect();
        let extra: Vec<Option<Json<&BTreeMap<String, String>>>> =
            prepared.iter().map(|p| (!p.extra.is_empty()).then_some(Json(&p.extra))).collect();
        let tx = self.tx.as_mut().ok_or_else(|| StoreError::Conflict("submission already finished".into()))?;
        // UNNEST keeps a chunk to one round trip regardless of its size.
        sqlx::query(
            "INSERT INTO prompts (job_id, idx, prompt, negative_prompt, seed, extra) \
             SELECT $1, * FROM UNNEST($2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::JSONB[])",
        )
        .bind(self.id)
        .bind(&idx)
        .bind(&text)
        .bind(&neg)
        .bind(&seeds)
        .bind(&extra)
        .execute(&mut **tx)
        .await?;
        self.insert_tasks(tasks).await
    }

    fn appended(&self) -> u64 {
        self.planner.next_index()
    }

    async fn abort(mut self: Box<Self>) {
        if let Some(tx) = self.tx.take() {
            rollback(tx).await;
        }
    }

    async fn commit(mut self: Box<Self>) -> StoreResult<JobId> {
        let total = self.planner.next_index();
        if total == 0 {
            return Err(empty_job());
        }
        let last: Vec<PlannedTask> = self.planner.finish().into_iter().collect();
        self.insert_tasks(last).await?;
        let mut tx = self.tx.take().ok_or_else(|| StoreError::Conflict("submission already finished".into()))?;
        sqlx::query("UPDATE jobs SET total_prompts = $2 WHERE id = $1").bind(self.id).bind(total as i64).execute(&mut *tx).await?;
        tx.commit().await?;
        if total >= 10_000 {
            // Without fresh statistics the planner treats a table that just grew by a big job as small
            // and scans it on every lease; autovacuum would catch up only minutes later.
            if let Some(pool) = &self.pool {
                sqlx::query("ANALYZE tasks").execute(pool).await?;
            }
        }
        Ok(JobId(self.id))
    }
}

fn row_to_leased(r: &sqlx::postgres::PgRow, prompts: Vec<LeasedPrompt>) -> StoreResult<LeasedTask> {
    let Json(params) = r.try_get("params")?;
    Ok(LeasedTask {
        task_id: TaskId(r.try_get("id")?),
        job_id: JobId(r.try_get("job_id")?),
        token: LeaseToken(r.try_get("lease_token")?),
        attempt: r.try_get::<i32, _>("attempts")? as u32,
        model: r.try_get("model")?,
        params,
        output_url: r.try_get("output_url")?,
        prompts,
        expires_at: r.try_get("lease_expires_at")?,
    })
}

#[async_trait]
impl JobStore for PgStore {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn begin_job(&self, job: NewJob) -> StoreResult<BeginJob> {
        crate::ingest::validate_job(&job)?;
        if let Some(rid) = &job.client_request_id {
            if let Some(r) = sqlx::query("SELECT id FROM jobs WHERE client_request_id = $1").bind(rid).fetch_optional(&self.pool).await? {
                return Ok(BeginJob::Existing(JobId(r.try_get("id")?)));
            }
        }
        let id = Uuid::new_v4();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, client_request_id, model, params, output_url, batch_size, priority, seed, max_attempts, state, total_prompts) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'queued', 0)",
        )
        .bind(id)
        .bind(&job.client_request_id)
        .bind(&job.model)
        .bind(Json(&job.params))
        .bind(&job.output_url)
        .bind(job.batch_size as i32)
        .bind(job.priority)
        .bind(job.seed as i64)
        .bind(job.max_attempts as i32)
        .execute(&mut *tx)
        .await;
        if let Err(e) = inserted {
            // A concurrent submission with the same request id committed first.
            if e.as_database_error().is_some_and(|d| d.is_unique_violation()) {
                drop(tx);
                if let Some(rid) = &job.client_request_id {
                    let r = sqlx::query("SELECT id FROM jobs WHERE client_request_id = $1").bind(rid).fetch_one(&self.pool).await?;
                    return Ok(BeginJob::Existing(JobId(r.try_get("id")?)));
                }
            }
            return Err(e.into());
        }
        let planner = TaskPlanner::new(job.batch_size);
        Ok(BeginJob::New(Box::new(PgIngest { tx: Some(tx), pool: Some(self.pool.clone()), job, id, planner })))
    }

    async fn get_job(&self, id: JobId) -> StoreResult<JobSummary> {
        let r = sqlx::query("SELECT * FROM jobs WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
        self.summary(&r).await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobSummary>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE ($1::TEXT IS NULL OR state = $1) \
               AND ($2::UUID IS NULL OR (created_at, id) < (SELECT created_at, id FROM jobs WHERE id = $2)) \
             ORDER BY created_at DESC, id DESC LIMIT $3",
        )
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.before.map(|j| j.0))
        .bind(filter.limit.clamp(1, 1000) as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(self.summary(r).await?);
        }
        Ok(out)
    }

    async fn cancel_job(&self, id: JobId) -> StoreResult<JobState> {
        let mut tx = self.pool.begin().await?;
        let result: StoreResult<JobState> = async {
            let state = locked_job_state(&mut tx, id).await?;
            if state.is_terminal() {
                return Ok(state);
            }
            sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE id = $1").bind(id.0).execute(&mut *tx).await?;
            // Lease tokens stay, so a worker's next heartbeat learns "cancelled" rather than "lost".
            sqlx::query("UPDATE tasks SET state = 'cancelled', updated_at = now() WHERE job_id = $1 AND state IN ('pending', 'leased')")
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            Ok(JobState::Cancelled)
        }
        .await;
        finish(tx, result).await
    }

    async fn retry_failed(&self, id: JobId) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await?;
        let result: StoreResult<u64> = async {
            let state = locked_job_state(&mut tx, id).await?;
            if state == JobState::Cancelled {
                return Err(StoreError::Conflict(format!("job {id} was cancelled")));
            }
            let n = sqlx::query(
                "UPDATE tasks SET state = 'pending', failures = 0, lost = 0, available_at = now(), last_error = NULL, updated_at = now() \
                 WHERE job_id = $1 AND state = 'failed'",
            )
            .bind(id.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                sqlx::query(
                    "UPDATE jobs SET state = CASE WHEN started_at IS NULL THEN 'queued' ELSE 'running' END, finished_at = NULL, last_error = NULL \
                     WHERE id = $1",
                )
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
            }
            Ok(n)
        }
        .await;
        finish(tx, result).await
    }

    async fn list_outputs(&self, id: JobId, after: Option<u64>, limit: u32) -> StoreResult<Vec<OutputRow>> {
        let rows = sqlx::query(
            "SELECT o.*, p.prompt, p.negative_prompt, p.seed FROM outputs o JOIN prompts p ON p.job_id = o.job_id AND p.idx = o.idx \
             WHERE o.job_id = $1 AND o.idx > $2 ORDER BY o.idx LIMIT $3",
        )
        .bind(id.0)
        .bind(after.map(|a| a as i64).unwrap_or(-1))
        .bind(limit.clamp(1, 10_000) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(output_row).collect()
    }

    async fn register_worker(&self, w: &WorkerInfo) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO workers (name, models, device, max_batch, loaded_model) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (name) DO UPDATE SET models = EXCLUDED.models, device = EXCLUDED.device, max_batch = EXCLUDED.max_batch, \
               loaded_model = EXCLUDED.loaded_model, last_seen = now()",
        )
        .bind(&w.name)
        .bind(Json(&w.models))
        .bind(&w.device)
        .bind(w.max_batch as i32)
        .bind(&w.loaded_model)
        .execute(&self.pool)
        .await?;
        // A worker registering under its name again has restarted and holds nothing: expire its old
        // leases now so the next sweep requeues them instead of waiting out the TTL.
        sqlx::query("UPDATE tasks SET lease_expires_at = now() - interval '1 millisecond' WHERE state = 'leased' AND leased_by = $1")
            .bind(&w.name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn lease(&self, req: &LeaseRequest) -> StoreResult<Option<LeasedTask>> {
        let token = Uuid::new_v4();
        // Pick the job first (few active jobs), then lock its oldest available task: priority, then the
        // model the worker already has loaded, then fair share (fewest running tasks), then age.
        // One statement per lease (one commit): pick the job first (few active jobs), lock its oldest
        // available task — ordering by priority, then the model the worker already has loaded, then fair
        // share (fewest running tasks), then age — and mark the job running and the worker seen.
        let row = sqlx::query(
            "WITH ranked AS MATERIALIZED ( \
                 SELECT j.id, j.priority, j.created_at, (j.model = $2) AS loaded, \
                        (SELECT count(*) FROM tasks r WHERE r.job_id = j.id AND r.state = 'leased') AS running \
                 FROM jobs j WHERE j.state IN ('queued', 'running') AND j.model = ANY($1) \
             ), picked AS MATERIALIZED ( \
                 SELECT c.id FROM ranked r CROSS JOIN LATERAL ( \
                     SELECT t.id FROM tasks t WHERE t.job_id = r.id AND t.state = 'pending' AND t.available_at <= now() \
                     ORDER BY t.job_id, t.id LIMIT 1 FOR UPDATE SKIP LOCKED) c \
                 ORDER BY r.priority DESC, r.loaded DESC, r.running ASC, r.created_at ASC \
                 LIMIT 1 \
             ), leased AS ( \
                 UPDATE tasks t SET state = 'leased', attempts = t.attempts + 1, lease_token = $3, leased_by = $4, \
                        lease_expires_at = now() + make_interval(secs => $5), updated_at = now() \
                 FROM picked WHERE t.id = picked.id RETURNING t.* \
             ), started AS ( \
                 UPDATE jobs SET state = 'running', started_at = now() WHERE id = (SELECT job_id FROM leased) AND state = 'queued' \
             ), seen AS ( \
                 UPDATE workers SET last_seen = now(), \
                        loaded_model = COALESCE((SELECT j.model FROM leased l JOIN jobs j ON j.id = l.job_id), $2) \
                 WHERE name = $4 \
             ) \
             SELECT l.*, j.model, j.output_url, j.params AS job_params FROM leased l JOIN jobs j ON j.id = l.job_id",
        )
        .bind(&req.models)
        .bind(&req.loaded_model)
        .bind(token)
        .bind(&req.worker)
        .bind(secs(req.ttl))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let job: Uuid = row.try_get("job_id")?;
        let first: i64 = row.try_get("first_idx")?;
        let count: i32 = row.try_get("count")?;
        let Json(job_params): Json<fresco_core::GenerationParams> = row.try_get("job_params")?;
        let prompts = sqlx::query(
            "SELECT idx, prompt, negative_prompt, seed, extra FROM prompts WHERE job_id = $1 AND idx >= $2 AND idx < $3 ORDER BY idx",
        )
        .bind(job)
        .bind(first)
        .bind(first + count as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|p| leased_prompt(p, &job_params.negative_prompt))
        .collect::<StoreResult<Vec<_>>>()?;
        Ok(Some(row_to_leased(&row, prompts)?))
    }

    async fn heartbeat(&self, worker: &str, leases: &[(TaskId, LeaseToken)], ttl: Duration) -> StoreResult<Vec<LeaseStatus>> {
        sqlx::query("UPDATE workers SET last_seen = now() WHERE name = $1").bind(worker).execute(&self.pool).await?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = leases.iter().map(|(t, _)| t.0).collect();
        let tokens: Vec<Uuid> = leases.iter().map(|(_, k)| k.0).collect();
        let rows = sqlx::query(
            "WITH h AS (SELECT * FROM UNNEST($1::BIGINT[], $2::UUID[]) WITH ORDINALITY AS h(id, token, ord)), \
             extended AS ( \
                 UPDATE tasks t SET lease_expires_at = now() + make_interval(secs => $3) FROM h \
                 WHERE t.id = h.id AND t.lease_token = h.token AND t.state = 'leased' RETURNING t.id, t.lease_token) \
             SELECT h.id, CASE WHEN e.id IS NOT NULL THEN 'held' \
                               WHEN t.state = 'cancelled' AND t.lease_token = h.token THEN 'cancelled' ELSE 'lost' END AS status \
             FROM h LEFT JOIN extended e ON e.id = h.id AND e.lease_token = h.token LEFT JOIN tasks t ON t.id = h.id ORDER BY h.ord",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(secs(ttl))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let id = TaskId(r.try_get("id")?);
                Ok(match r.try_get::<String, _>("status")?.as_str() {
                    "held" => LeaseStatus::Held(id),
                    "cancelled" => LeaseStatus::Cancelled(id),
                    _ => LeaseStatus::Lost(id),
                })
            })
            .collect()
    }

    async fn complete(&self, task: TaskId, token: LeaseToken, outputs: Vec<NewOutput>) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let result: StoreResult<Option<Uuid>> = async {
            let row = locked_task(&mut tx, task).await?;
            let job: Uuid = row.try_get("job_id")?;
            let (first, count) = (row.try_get::<i64, _>("first_idx")? as u64, row.try_get::<i32, _>("count")? as u64);
            if fence(&row, task, token, true)? {
                return Ok(None);
            }
            crate::ingest::check_outputs(task, first, count, &outputs)?;
            let idx: Vec<i64> = outputs.iter().map(|o| o.index as i64).collect();
            let keys: Vec<&str> = outputs.iter().map(|o| o.object_key.as_str()).collect();
            let urls: Vec<&str> = outputs.iter().map(|o| o.url.as_str()).collect();
            let shas: Vec<&str> = outputs.iter().map(|o| o.sha256.as_str()).collect();
            let bytes: Vec<i64> = outputs.iter().map(|o| o.bytes as i64).collect();
            let workers: Vec<&str> = outputs.iter().map(|o| o.worker.as_str()).collect();
            let meta: Vec<Json<&serde_json::Value>> = outputs.iter().map(|o| Json(&o.metadata)).collect();
            // A retried prompt lands on the same key: overwrite its row rather than add one.
            sqlx::query(
                "INSERT INTO outputs (job_id, idx, task_id, object_key, url, sha256, bytes, worker, metadata) \
                 SELECT $1, u.idx, $2, u.key, u.url, u.sha, u.bytes, u.worker, u.meta \
                 FROM UNNEST($3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[], $8::TEXT[], $9::JSONB[]) AS u(idx, key, url, sha, bytes, worker, meta) \
                 ON CONFLICT (job_id, idx) DO UPDATE SET task_id = EXCLUDED.task_id, object_key = EXCLUDED.object_key, url = EXCLUDED.url, \
                   sha256 = EXCLUDED.sha256, bytes = EXCLUDED.bytes, worker = EXCLUDED.worker, metadata = EXCLUDED.metadata, created_at = now()",
            )
            .bind(job)
            .bind(task.0)
            .bind(&idx)
            .bind(&keys)
            .bind(&urls)
            .bind(&shas)
            .bind(&bytes)
            .bind(&workers)
            .bind(&meta)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE tasks SET state = 'succeeded', lease_expires_at = NULL, updated_at = now() WHERE id = $1")
                .bind(task.0)
                .execute(&mut *tx)
                .await?;
            Ok(Some(job))
        }
        .await;
        match finish(tx, result).await? {
            Some(job) => self.finalize_job(job).await,
            None => Ok(()),
        }
    }

    async fn fail(&self, task: TaskId, token: LeaseToken, failure: &Failure) -> StoreResult<FailOutcome> {
        let mut tx = self.pool.begin().await?;
        let result: StoreResult<(Uuid, FailOutcome)> = async {
            let row = locked_task(&mut tx, task).await?;
            let job: Uuid = row.try_get("job_id")?;
            fence(&row, task, token, false)?;
            let failures = row.try_get::<i32, _>("failures")? as u32 + 1;
            let max = row.try_get::<i32, _>("max_attempts")? as u32;
            let message: String = failure.message.chars().take(4000).collect();
            let outcome = if failure.retryable && failures < max {
                let backoff = retry_backoff(failures, self.policy.backoff_base, self.policy.backoff_cap);
                sqlx::query(
                    "UPDATE tasks SET state = 'pending', failures = $2, last_error = $3, lease_token = NULL, lease_expires_at = NULL, \
                       available_at = now() + make_interval(secs => $4), updated_at = now() WHERE id = $1",
                )
                .bind(task.0)
                .bind(failures as i32)
                .bind(&message)
                .bind(secs(backoff))
                .execute(&mut *tx)
                .await?;
                FailOutcome::Retrying { attempt: failures }
            } else {
                sqlx::query("UPDATE tasks SET state = 'failed', failures = $2, last_error = $3, lease_expires_at = NULL, updated_at = now() WHERE id = $1")
                    .bind(task.0)
                    .bind(failures as i32)
                    .bind(&message)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE jobs SET last_error = $2 WHERE id = $1").bind(job).bind(&message).execute(&mut *tx).await?;
                FailOutcome::Failed
            };
            Ok((job, outcome))
        }
        .await;
        let (job, outcome) = finish(tx, result).await?;
        self.finalize_job(job).await?;
        Ok(outcome)
    }

    async fn sweep_expired(&self) -> StoreResult<SweepOutcome> {
        // A single UPDATE: concurrent sweepers on other replicas re-check the WHERE clause after the row
        // lock, so each expired lease is handled exactly once.
        let rows = sqlx::query(
            "UPDATE tasks SET lost = lost + 1, lease_token = NULL, lease_expires_at = NULL, available_at = now(), updated_at = now(), \
               state = CASE WHEN lost + 1 >= $1 THEN 'failed' ELSE 'pending' END, \
               last_error = CASE WHEN lost + 1 >= $1 THEN 'quarantined: lease expired ' || (lost + 1) || ' times (worker crashed or hung)' ELSE last_error END \
             WHERE state = 'leased' AND lease_expires_at < now() RETURNING job_id, state",
        )
        .bind(self.policy.max_lost as i32)
        .fetch_all(&self.pool)
        .await?;
        let mut out = SweepOutcome::default();
        let mut jobs = std::collections::BTreeSet::new();
        for r in &rows {
            if r.try_get::<String, _>("state")? == "failed" {
                out.quarantined += 1;
                jobs.insert(r.try_get::<Uuid, _>("job_id")?);
            } else {
                out.requeued += 1;
            }
        }
        for j in jobs {
            self.finalize_job(j).await?;
        }
        Ok(out)
    }

    async fn queue_depth(&self) -> StoreResult<Vec<ModelDepth>> {
        let rows = sqlx::query(
            "SELECT j.model, count(*) FILTER (WHERE t.state = 'pending') AS pending_tasks, \
                    COALESCE(SUM(t.count) FILTER (WHERE t.state = 'pending'), 0)::BIGINT AS pending_prompts, \
                    count(*) FILTER (WHERE t.state = 'leased') AS leased_tasks \
             FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.state IN ('pending', 'leased') AND j.state IN ('queued', 'running') \
             GROUP BY j.model ORDER BY j.model",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ModelDepth {
                    model: r.try_get("model")?,
                    pending_tasks: r.try_get::<i64, _>("pending_tasks")? as u64,
                    pending_prompts: r.try_get::<i64, _>("pending_prompts")? as u64,
                    leased_tasks: r.try_get::<i64, _>("leased_tasks")? as u64,
                })
            })
            .collect()
    }

    async fn live_workers(&self, within: Duration) -> StoreResult<Vec<WorkerInfo>> {
        let rows = sqlx::query("SELECT * FROM workers WHERE last_seen > now() - make_interval(secs => $1) ORDER BY name")
            .bind(secs(within))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| worker_row(r, r.try_get::<i32, _>("max_batch")? as i64)).collect()
    }
}
