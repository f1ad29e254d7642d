//! The embedded store behind `fresco run`: one SQLite file (or memory), one process. Same semantics as
//! the PostgreSQL store; SQLite serialises writers, so claims need no row locks. Times are Unix ms.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use fresco_core::batch::{PlannedTask, TaskPlanner};
use fresco_core::{JobId, JobState, LeaseToken, TaskId, TaskState};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::types::Json;
use sqlx::{Row, Sqlite, SqlitePool, Transaction};
use uuid::Uuid;

use crate::ingest::{prepare_prompts, PreparedPrompt};
use crate::rows::{leased_prompt, output_row, worker_row};
use crate::tx::{check_fence, empty_job, finish, rollback};
use crate::*;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    policy: QueuePolicy,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn time(v: i64) -> StoreResult<DateTime<Utc>> {
    Utc.timestamp_millis_opt(v).single().ok_or_else(|| StoreError::Corrupt(format!("timestamp {v}")))
}

fn uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|e| StoreError::Corrupt(format!("uuid {s:?}: {e}")))
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path, policy: QueuePolicy) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        Self::with_options(opts, 4, policy).await
    }

    /// A private in-memory database (tests).
    pub async fn memory(policy: QueuePolicy) -> StoreResult<Self> {
        let opts = SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true);
        // One connection: every connection to ":memory:" would be a different database.
        Self::with_options(opts, 1, policy).await
    }

    async fn with_options(opts: SqliteConnectOptions, max: u32, policy: QueuePolicy) -> StoreResult<Self> {
        let pool = SqlitePoolOptions::new().max_connections(max).connect_with(opts).await?;
        Ok(Self { pool, policy })
    }

    async fn finalize_job(&self, job: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE jobs SET state = CASE WHEN EXISTS (SELECT 1 FROM tasks WHERE job_id = ?1 AND state = 'failed') \
                 THEN 'failed' ELSE 'succeeded' END, finished_at = ?2 \
             WHERE id = ?1 AND state IN ('queued', 'running') \
               AND NOT EXISTS (SELECT 1 FROM tasks WHERE job_id = ?1 AND state IN ('pending', 'leased'))",
        )
        .bind(job)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn summary(&self, r: &SqliteRow) -> StoreResult<JobSummary> {
        let id: String = r.try_get("id")?;
        let rows =
            sqlx::query("SELECT state, SUM(count) AS n FROM tasks WHERE job_id = ? GROUP BY state").bind(&id).fetch_all(&self.pool).await?;
        let mut counts = Counts::default();
        for c in rows {
            counts
                .add(c.try_get::<String, _>("state")?.parse::<TaskState>().map_err(StoreError::Corrupt)?, c.try_get::<i64, _>("n")? as u64);
        }
        let Json(params) = r.try_get("params")?;
        Ok(JobSummary {
            id: JobId(uuid(&id)?),
            model: r.try_get("model")?,
            state: r.try_get::<String, _>("state")?.parse().map_err(StoreError::Corrupt)?,
            params,
            output_url: r.try_get("output_url")?,
            batch_size: r.try_get::<i64, _>("batch_size")? as u32,
            priority: r.try_get::<i64, _>("priority")? as i32,
            seed: r.try_get::<i64, _>("seed")? as u64,
            client_request_id: r.try_get("client_request_id")?,
            total: r.try_get::<i64, _>("total_prompts")? as u64,
            counts,
            last_error: r.try_get("last_error")?,
            created_at: time(r.try_get("created_at")?)?,
            started_at: r.try_get::<Option<i64>, _>("started_at")?.map(time).transpose()?,
            finished_at: r.try_get::<Option<i64>, _>("finished_at")?.map(time).transpose()?,
        })
    }

    async fn locked_task(tx: &mut Transaction<'static, Sqlite>, task: TaskId) -> StoreResult<SqliteRow> {
        sqlx::query("SELECT t.*, j.max_attempts FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id = ?")
            .bind(task.0)
            .fetch_optional(&mut **tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("task {task}")))
    }
}

/// Checks a report's lease token against the task row; `Ok(true)` means already recorded (idempotent).
fn fence(row: &SqliteRow, task: TaskId, token: LeaseToken, allow_done: bool) -> StoreResult<bool> {
    let state: TaskState = row.try_get::<String, _>("state")?.parse().map_err(StoreError::Corrupt)?;
    let held = row.try_get::<Option<String>, _>("lease_token")?.map(|t| uuid(&t)).transpose()? == Some(token.0);
    check_fence(task, state, held, allow_done)
}

/// A job's state, read under the transaction's lock (PostgreSQL: `FOR UPDATE`; SQLite: the write lock).
async fn locked_job_state(tx: &mut Transaction<'static, Sqlite>, id: JobId) -> StoreResult<JobState> {
    let row = sqlx::query("SELECT state FROM jobs WHERE id = ?")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
    row.try_get::<String, _>("state")?.parse().map_err(StoreError::Corrupt)
}

struct SqliteIngest {
    tx: Option<Transaction<'static, Sqlite>>,
    job: NewJob,
    id: String,
    planner: TaskPlanner,
}

impl SqliteIngest {
    fn tx(&mut self) -> StoreResult<&mut Transaction<'static, Sqlite>> {
        self.tx.as_mut().ok_or_else(|| StoreError::Conflict("submission already finished".into()))
    }

    async fn insert_tasks(&mut self, tasks: Vec<PlannedTask>) -> StoreResult<()> {
        let now = now_ms();
        let (id, base) = (self.id.clone(), self.job.params.clone());
        let tx = self.tx()?;
        for t in tasks {
            sqlx::query("INSERT INTO tasks (job_id, first_idx, count, params, available_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)")
                .bind(&id)
                .bind(t.first as i64)
                .bind(t.count as i64)
                .bind(Json(t.key.params(&base)))
                .bind(now)
                .bind(now)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl JobIngest for SqliteIngest {
    async fn append(&mut self, prompts: Vec<NewPrompt>) -> StoreResult<()> {
        let start = self.planner.next_index();
        let prepared: Vec<PreparedPrompt> = prepare_prompts(&self.job, start, prompts)?;
        let mut tasks = Vec::new();
        for p in &prepared {
            tasks.extend(self.planner.push(p.key.clone()));
        }
        let id = self.id.clone();
        let tx = self.tx()?;
        for p in &prepared {
            sqlx::query("INSERT INTO prompts (job_id, idx, prompt, negative_prompt, seed, extra) VALUES (?, ?, ?, ?, ?, ?)")
                .bind(&id)
                .bind(p.index as i64)
                .bind(&p.prompt)
                .bind(&p.negative_prompt)
                .bind(p.seed as i64)
                .bind((!p.extra.is_empty()).then_some(Json(&p.extra)))
                .execute(&mut **tx)
                .await?;
        }
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
        let id = self.id.clone();
        let mut tx = self.tx.take().ok_or_else(|| StoreError::Conflict("submission already finished".into()))?;
        sqlx::query("UPDATE jobs SET total_prompts = ? WHERE id = ?").bind(total as i64).bind(&id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(JobId(uuid(&id)?))
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn begin_job(&self, job: NewJob) -> StoreResult<BeginJob> {
        crate::ingest::validate_job(&job)?;
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(rid) = &job.client_request_id {
            if let Some(r) = sqlx::query("SELECT id FROM jobs WHERE client_request_id = ?").bind(rid).fetch_optional(&mut *tx).await? {
                return Ok(BeginJob::Existing(JobId(uuid(&r.try_get::<String, _>("id")?)?)));
            }
        }
        let id = Uuid::new_v4().to_string();
        sqlx::query(
            "INSERT INTO jobs (id, client_request_id, model, params, output_url, batch_size, priority, seed, max_attempts, state, total_prompts, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?)",
        )
        .bind(&id)
        .bind(&job.client_request_id)
        .bind(&job.model)
        .bind(Json(&job.params))
        .bind(&job.output_url)
        .bind(job.batch_size as i64)
        .bind(job.priority as i64)
        .bind(job.seed as i64)
        .bind(job.max_attempts as i64)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        let planner = TaskPlanner::new(job.batch_size);
        Ok(BeginJob::New(Box::new(SqliteIngest { tx: Some(tx), job, id, planner })))
    }

    async fn get_job(&self, id: JobId) -> StoreResult<JobSummary> {
        let r = sqlx::query("SELECT * FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("job {id}")))?;
        self.summary(&r).await
    }

    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Vec<JobSummary>> {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE (?1 IS NULL OR state = ?1) \
               AND (?2 IS NULL OR (created_at, id) < (SELECT created_at, id FROM jobs WHERE id = ?2)) \
             ORDER BY created_at DESC, id DESC LIMIT ?3",
        )
        .bind(filter.state.map(|s| s.as_str()))
        .bind(filter.before.map(|j| j.to_string()))
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let result: StoreResult<JobState> = async {
            let state = locked_job_state(&mut tx, id).await?;
            if state.is_terminal() {
                return Ok(state);
            }
            let now = now_ms();
            sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?")
                .bind(now)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE tasks SET state = 'cancelled', updated_at = ? WHERE job_id = ? AND state IN ('pending', 'leased')")
                .bind(now)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            Ok(JobState::Cancelled)
        }
        .await;
        finish(tx, result).await
    }

    async fn retry_failed(&self, id: JobId) -> StoreResult<u64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let result: StoreResult<u64> = async {
            if locked_job_state(&mut tx, id).await? == JobState::Cancelled {
                return Err(StoreError::Conflict(format!("job {id} was cancelled")));
            }
            let now = now_ms();
            let n = sqlx::query(
                "UPDATE tasks SET state = 'pending', failures = 0, lost = 0, available_at = ?, last_error = NULL, updated_at = ? \
                 WHERE job_id = ? AND state = 'failed'",
            )
            .bind(now)
            .bind(now)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if n > 0 {
                sqlx::query("UPDATE jobs SET state = CASE WHEN started_at IS NULL THEN 'queued' ELSE 'running' END, finished_at = NULL, last_error = NULL WHERE id = ?")
                    .bind(id.to_string())
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
             WHERE o.job_id = ? AND o.idx > ? ORDER BY o.idx LIMIT ?",
        )
        .bind(id.to_string())
        .bind(after.map(|a| a as i64).unwrap_or(-1))
        .bind(limit.clamp(1, 10_000) as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(output_row).collect()
    }

    async fn register_worker(&self, w: &WorkerInfo) -> StoreResult<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO workers (name, models, device, max_batch, loaded_model, registered_at, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) \
             ON CONFLICT (name) DO UPDATE SET models = excluded.models, device = excluded.device, max_batch = excluded.max_batch, \
               loaded_model = excluded.loaded_model, last_seen = excluded.last_seen",
        )
        .bind(&w.name)
        .bind(Json(&w.models))
        .bind(&w.device)
        .bind(w.max_batch as i64)
        .bind(&w.loaded_model)
        .bind(now)
        .execute(&self.pool)
        .await?;
        // See the PostgreSQL store: a re-registration means the old leases are dead.
        sqlx::query("UPDATE tasks SET lease_expires_at = ? WHERE state = 'leased' AND leased_by = ?")
            .bind(now - 1)
            .bind(&w.name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn lease(&self, req: &LeaseRequest) -> StoreResult<Option<LeasedTask>> {
        let now = now_ms();
        let token = Uuid::new_v4();
        let models = serde_json::to_string(&req.models).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let row = sqlx::query(
            "UPDATE tasks SET state = 'leased', attempts = attempts + 1, lease_token = ?3, leased_by = ?4, lease_expires_at = ?1 + ?5, updated_at = ?1 \
             WHERE id = ( \
                 SELECT (SELECT t.id FROM tasks t WHERE t.job_id = j.id AND t.state = 'pending' AND t.available_at <= ?1 ORDER BY t.id LIMIT 1) \
                 FROM jobs j \
                 WHERE j.state IN ('queued', 'running') AND j.model IN (SELECT value FROM json_each(?2)) \
                   AND EXISTS (SELECT 1 FROM tasks p WHERE p.job_id = j.id AND p.state = 'pending' AND p.available_at <= ?1) \
                 ORDER BY j.priority DESC, (j.model = ?6) DESC, \
                          (SELECT count(*) FROM tasks r WHERE r.job_id = j.id AND r.state = 'leased') ASC, j.created_at ASC \
                 LIMIT 1) \
             RETURNING *",
        )
        .bind(now)
        .bind(&models)
        .bind(token.to_string())
        .bind(&req.worker)
        .bind(ms(req.ttl))
        .bind(&req.loaded_model)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            sqlx::query("UPDATE workers SET last_seen = ?, loaded_model = ? WHERE name = ?")
                .bind(now)
                .bind(&req.loaded_model)
                .bind(&req.worker)
                .execute(&self.pool)
                .await?;
            return Ok(None);
        };
        let job: String = row.try_get("job_id")?;
        let job_row = sqlx::query("SELECT model, output_url, params FROM jobs WHERE id = ?").bind(&job).fetch_one(&self.pool).await?;
        let Json(job_params): Json<fresco_core::GenerationParams> = job_row.try_get("params")?;
        let model: String = job_row.try_get("model")?;
        let first: i64 = row.try_get("first_idx")?;
        let count: i64 = row.try_get("count")?;
        let prompts = sqlx::query(
            "SELECT idx, prompt, negative_prompt, seed, extra FROM prompts WHERE job_id = ? AND idx >= ? AND idx < ? ORDER BY idx",
        )
        .bind(&job)
        .bind(first)
        .bind(first + count)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|p| leased_prompt(p, &job_params.negative_prompt))
        .collect::<StoreResult<Vec<_>>>()?;
        sqlx::query("UPDATE jobs SET state = 'running', started_at = ? WHERE id = ? AND state = 'queued'")
            .bind(now)
            .bind(&job)
            .execute(&self.pool)
            .await?;
        sqlx::query("UPDATE workers SET last_seen = ?, loaded_model = ? WHERE name = ?")
            .bind(now)
            .bind(&model)
            .bind(&req.worker)
            .execute(&self.pool)
            .await?;
        let Json(params) = row.try_get("params")?;
        Ok(Some(LeasedTask {
            task_id: TaskId(row.try_get("id")?),
            job_id: JobId(uuid(&job)?),
            token: LeaseToken(token),
            attempt: row.try_get::<i64, _>("attempts")? as u32,
            model,
            params,
            output_url: job_row.try_get("output_url")?,
            prompts,
            expires_at: time(row.try_get("lease_expires_at")?)?,
        }))
    }

    async fn heartbeat(&self, worker: &str, leases: &[(TaskId, LeaseToken)], ttl: Duration) -> StoreResult<Vec<LeaseStatus>> {
        let now = now_ms();
        sqlx::query("UPDATE workers SET last_seen = ? WHERE name = ?").bind(now).bind(worker).execute(&self.pool).await?;
        let mut out = Vec::with_capacity(leases.len());
        for (task, token) in leases {
            let extended = sqlx::query("UPDATE tasks SET lease_expires_at = ? WHERE id = ? AND lease_token = ? AND state = 'leased'")
                .bind(now + ms(ttl))
                .bind(task.0)
                .bind(token.to_string())
                .execute(&self.pool)
                .await?
                .rows_affected();
            if extended == 1 {
                out.push(LeaseStatus::Held(*task));
                continue;
            }
            let cancelled = sqlx::query("SELECT 1 FROM tasks WHERE id = ? AND lease_token = ? AND state = 'cancelled'")
                .bind(task.0)
                .bind(token.to_string())
                .fetch_optional(&self.pool)
                .await?
                .is_some();
            out.push(if cancelled { LeaseStatus::Cancelled(*task) } else { LeaseStatus::Lost(*task) });
        }
        Ok(out)
    }

    async fn complete(&self, task: TaskId, token: LeaseToken, outputs: Vec<NewOutput>) -> StoreResult<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let result: StoreResult<Option<String>> = async {
            let row = Self::locked_task(&mut tx, task).await?;
            if fence(&row, task, token, true)? {
                return Ok(None);
            }
            let job: String = row.try_get("job_id")?;
            let (first, count) = (row.try_get::<i64, _>("first_idx")? as u64, row.try_get::<i64, _>("count")? as u64);
            crate::ingest::check_outputs(task, first, count, &outputs)?;
            let now = now_ms();
            for o in &outputs {
                sqlx::query(
                    "INSERT INTO outputs (job_id, idx, task_id, object_key, url, sha256, bytes, worker, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                     ON CONFLICT (job_id, idx) DO UPDATE SET task_id = excluded.task_id, object_key = excluded.object_key, url = excluded.url, \
                       sha256 = excluded.sha256, bytes = excluded.bytes, worker = excluded.worker, metadata = excluded.metadata, created_at = excluded.created_at",
                )
                .bind(&job)
                .bind(o.index as i64)
                .bind(task.0)
                .bind(&o.object_key)
                .bind(&o.url)
                .bind(&o.sha256)
                .bind(o.bytes as i64)
                .bind(&o.worker)
                .bind(Json(&o.metadata))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query("UPDATE tasks SET state = 'succeeded', lease_expires_at = NULL, updated_at = ? WHERE id = ?").bind(now).bind(task.0).execute(&mut *tx).await?;
            Ok(Some(job))
        }
        .await;
        match finish(tx, result).await? {
            Some(job) => self.finalize_job(&job).await,
            None => Ok(()),
        }
    }

    async fn fail(&self, task: TaskId, token: LeaseToken, failure: &Failure) -> StoreResult<FailOutcome> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let result: StoreResult<(String, FailOutcome)> = async {
            let row = Self::locked_task(&mut tx, task).await?;
            fence(&row, task, token, false)?;
            let job: String = row.try_get("job_id")?;
            let failures = row.try_get::<i64, _>("failures")? as u32 + 1;
            let max = row.try_get::<i64, _>("max_attempts")? as u32;
            let message: String = failure.message.chars().take(4000).collect();
            let now = now_ms();
            let outcome = if failure.retryable && failures < max {
                let backoff = retry_backoff(failures, self.policy.backoff_base, self.policy.backoff_cap);
                sqlx::query(
                    "UPDATE tasks SET state = 'pending', failures = ?, last_error = ?, lease_token = NULL, lease_expires_at = NULL, available_at = ?, updated_at = ? WHERE id = ?",
                )
                .bind(failures as i64)
                .bind(&message)
                .bind(now + ms(backoff))
                .bind(now)
                .bind(task.0)
                .execute(&mut *tx)
                .await?;
                FailOutcome::Retrying { attempt: failures }
            } else {
                sqlx::query("UPDATE tasks SET state = 'failed', failures = ?, last_error = ?, lease_expires_at = NULL, updated_at = ? WHERE id = ?")
                    .bind(failures as i64)
                    .bind(&message)
                    .bind(now)
                    .bind(task.0)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE jobs SET last_error = ? WHERE id = ?").bind(&message).bind(&job).execute(&mut *tx).await?;
                FailOutcome::Failed
            };
            Ok((job, outcome))
        }
        .await;
        let (job, outcome) = finish(tx, result).await?;
        self.finalize_job(&job).await?;
        Ok(outcome)
    }

    async fn sweep_expired(&self) -> StoreResult<SweepOutcome> {
        let now = now_ms();
        let rows = sqlx::query(
            "UPDATE tasks SET lost = lost + 1, lease_token = NULL, lease_expires_at = NULL, available_at = ?1, updated_at = ?1, \
               state = CASE WHEN lost + 1 >= ?2 THEN 'failed' ELSE 'pending' END, \
               last_error = CASE WHEN lost + 1 >= ?2 THEN 'quarantined: lease expired ' || (lost + 1) || ' times (worker crashed or hung)' ELSE last_error END \
             WHERE state = 'leased' AND lease_expires_at < ?1 RETURNING job_id, state",
        )
        .bind(now)
        .bind(self.policy.max_lost as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut out = SweepOutcome::default();
        let mut jobs = std::collections::BTreeSet::new();
        for r in &rows {
            if r.try_get::<String, _>("state")? == "failed" {
                out.quarantined += 1;
                jobs.insert(r.try_get::<String, _>("job_id")?);
            } else {
                out.requeued += 1;
            }
        }
        for j in jobs {
            self.finalize_job(&j).await?;
        }
        Ok(out)
    }

    async fn queue_depth(&self) -> StoreResult<Vec<ModelDepth>> {
        let rows = sqlx::query(
            "SELECT j.model, SUM(t.state = 'pending') AS pending_tasks, COALESCE(SUM(CASE WHEN t.state = 'pending' THEN t.count END), 0) AS pending_prompts, \
                    SUM(t.state = 'leased') AS leased_tasks \
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
        let rows = sqlx::query("SELECT * FROM workers WHERE last_seen > ? ORDER BY name")
            .bind(now_ms() - ms(within))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| worker_row(r, r.try_get::<i64, _>("max_batch")?)).collect()
    }
}
