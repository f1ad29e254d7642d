//! One conformance suite, run against both backends: PostgreSQL (a fresh schema per test on
//! `DATABASE_URL`, default the local server) and SQLite (in memory).
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use fresco_core::{derive_seed, GenerationParams, JobState, LeaseToken, ParamOverrides};
use fresco_store::postgres::PgStore;
use fresco_store::sqlite::SqliteStore;
use fresco_store::*;

fn policy() -> QueuePolicy {
    QueuePolicy { max_lost: 3, backoff_base: Duration::from_secs(60), backoff_cap: Duration::from_secs(60) }
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A PostgreSQL store in a schema of its own; returns the schema name so a second replica can share it.
async fn pg_in(schema: &str) -> PgStore {
    let opts: sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
    let admin = sqlx::PgPool::connect_with(opts.clone()).await.expect("PostgreSQL is needed for the conformance suite (DATABASE_URL)");
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).execute(&admin).await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(8).connect_with(opts.options([("search_path", schema)])).await.unwrap();
    let store = PgStore::from_pool(pool, policy());
    store.migrate().await.unwrap();
    store
}

async fn pg() -> Arc<dyn JobStore> {
    Arc::new(pg_in(&format!("fresco_t_{}", uuid::Uuid::new_v4().simple())).await)
}

async fn sqlite() -> Arc<dyn JobStore> {
    let s = SqliteStore::memory(policy()).await.unwrap();
    s.migrate().await.unwrap();
    Arc::new(s)
}

fn job(model: &str, batch: u32) -> NewJob {
    NewJob {
        model: model.into(),
        params: GenerationParams { steps: Some(4), ..Default::default() },
        output_url: "file:///tmp/out".into(),
        batch_size: batch,
        priority: 0,
        seed: 7,
        client_request_id: None,
        max_attempts: 3,
    }
}

fn prompts(n: usize) -> Vec<NewPrompt> {
    (0..n).map(|i| NewPrompt { prompt: format!("prompt {i}"), overrides: ParamOverrides::default() }).collect()
}

async fn submit(store: &dyn JobStore, j: NewJob, n: usize) -> fresco_core::JobId {
    match store.begin_job(j).await.unwrap() {
        BeginJob::New(mut ingest) => {
            ingest.append(prompts(n)).await.unwrap();
            ingest.commit().await.unwrap()
        }
        BeginJob::Existing(id) => id,
    }
}

fn lease_req(worker: &str, models: &[&str]) -> LeaseRequest {
    LeaseRequest {
        worker: worker.into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        loaded_model: None,
        max_batch: 8,
        ttl: Duration::from_secs(30),
    }
}

fn outputs_for(t: &LeasedTask) -> Vec<NewOutput> {
    t.prompts
        .iter()
        .map(|p| NewOutput {
            index: p.index,
            object_key: format!("{}/{:08}.png", t.job_id, p.index),
            url: format!("file:///tmp/out/{}/{:08}.png", t.job_id, p.index),
            sha256: "00".repeat(32),
            bytes: 10,
            worker: "w".into(),
            metadata: serde_json::json!({"seed": p.seed}),
        })
        .collect()
}

async fn submit_creates_batched_tasks(store: Arc<dyn JobStore>) {
    let id = submit(&*store, job("m", 4), 10).await;
    let j = store.get_job(id).await.unwrap();
    assert_eq!(j.total, 10);
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.counts, Counts { pending: 10, ..Default::default() });
    let depth = store.queue_depth().await.unwrap();
    assert_eq!(depth, vec![ModelDepth { model: "m".into(), pending_tasks: 3, pending_prompts: 10, leased_tasks: 0 }]);
}

async fn failed_or_aborted_submission_leaves_nothing(store: Arc<dyn JobStore>) {
    // Aborted mid-stream.
    let BeginJob::New(mut ingest) = store.begin_job(job("m", 4)).await.unwrap() else { panic!() };
    ingest.append(prompts(5)).await.unwrap();
    drop(ingest);
    // A bad prompt in the second chunk.
    let BeginJob::New(mut ingest) = store.begin_job(job("m", 4)).await.unwrap() else { panic!() };
    ingest.append(prompts(3)).await.unwrap();
    let err = ingest.append(vec![NewPrompt { prompt: "   ".into(), overrides: Default::default() }]).await.unwrap_err();
    assert!(matches!(&err, StoreError::Invalid(v) if v.field == "prompts[3].prompt"), "{err}");
    drop(ingest);
    // No prompts at all.
    let BeginJob::New(ingest) = store.begin_job(job("m", 4)).await.unwrap() else { panic!() };
    assert!(matches!(ingest.commit().await.unwrap_err(), StoreError::Invalid(v) if v.field == "prompts"));
    let all = store.list_jobs(&JobFilter { limit: 100, ..Default::default() }).await.unwrap();
    assert!(all.is_empty(), "left behind: {all:?}");
    assert!(store.queue_depth().await.unwrap().is_empty());
}

async fn invalid_job_fields_are_named(store: Arc<dyn JobStore>) {
    let mut j = job("bad model!", 4);
    assert!(matches!(store.begin_job(j.clone()).await.err().unwrap(), StoreError::Invalid(v) if v.field == "model"));
    j.model = "m".into();
    j.batch_size = 0;
    assert!(matches!(store.begin_job(j.clone()).await.err().unwrap(), StoreError::Invalid(v) if v.field == "batch_size"));
    j.batch_size = 1;
    j.params.width = Some(13);
    assert!(matches!(store.begin_job(j).await.err().unwrap(), StoreError::Invalid(v) if v.field == "width"));
}

async fn client_request_id_returns_the_first_job(store: Arc<dyn JobStore>) {
    let mut j = job("m", 4);
    j.client_request_id = Some("req-1".into());
    let a = submit(&*store, j.clone(), 3).await;
    let b = submit(&*store, j, 5).await;
    assert_eq!(a, b);
    assert_eq!(store.get_job(a).await.unwrap().total, 3);
}

async fn lease_complete_finishes_the_job(store: Arc<dyn JobStore>) {
    let id = submit(&*store, job("m", 2), 3).await;
    store
        .register_worker(&WorkerInfo { name: "w".into(), models: vec!["m".into()], device: "cpu".into(), max_batch: 8, loaded_model: None })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(t) = store.lease(&lease_req("w", &["m"])).await.unwrap() {
        assert_eq!(t.job_id, id);
        assert_eq!(t.attempt, 1);
        assert_eq!(t.params.steps, Some(4));
        for p in &t.prompts {
            assert_eq!(p.seed, derive_seed(7, p.index));
            assert_eq!(p.prompt, format!("prompt {}", p.index));
            seen.push(p.index);
        }
        assert_eq!(store.get_job(id).await.unwrap().state, JobState::Running);
        store.complete(t.task_id, t.token, outputs_for(&t)).await.unwrap();
        // Repeating the same report is harmless.
        store.complete(t.task_id, t.token, outputs_for(&t)).await.unwrap();
    }
    assert_eq!(seen, vec![0, 1, 2]);
    let j = store.get_job(id).await.unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.counts.succeeded, 3);
    assert!(j.finished_at.is_some());
    let outs = store.list_outputs(id, None, 2).await.unwrap();
    assert_eq!(outs.iter().map(|o| o.index).collect::<Vec<_>>(), vec![0, 1]);
    let rest = store.list_outputs(id, Some(1), 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].prompt, "prompt 2");
    let live = store.live_workers(Duration::from_secs(60)).await.unwrap();
    assert_eq!(live.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), vec!["w"]);
}

async fn completion_must_cover_the_task(store: Arc<dyn JobStore>) {
    submit(&*store, job("m", 2), 2).await;
    let t = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    let mut outs = outputs_for(&t);
    outs.pop();
    assert!(matches!(store.complete(t.task_id, t.token, outs).await.unwrap_err(), StoreError::Invalid(v) if v.field == "outputs"));
}

async fn stale_token_changes_nothing(store: Arc<dyn JobStore>) {
    let id = submit(&*store, job("m", 4), 4).await;
    let t = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    let stale = LeaseToken::new();
    assert!(matches!(store.complete(t.task_id, stale, outputs_for(&t)).await.unwrap_err(), StoreError::LeaseLost(_)));
    let f = Failure { message: "x".into(), retryable: false };
    assert!(matches!(store.fail(t.task_id, stale, &f).await.unwrap_err(), StoreError::LeaseLost(_)));
    let hb = store.heartbeat("w", &[(t.task_id, stale), (t.task_id, t.token)], Duration::from_secs(30)).await.unwrap();
    assert_eq!(hb, vec![LeaseStatus::Lost(t.task_id), LeaseStatus::Held(t.task_id)]);
    assert_eq!(store.get_job(id).await.unwrap().counts.running, 4);
}

async fn expired_leases_are_requeued_then_quarantined(store: Arc<dyn JobStore>) {
    let id = submit(&*store, job("m", 4), 4).await;
    let mut req = lease_req("w", &["m"]);
    req.ttl = Duration::from_millis(200);
    let first = store.lease(&req).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.sweep_expired().await.unwrap(), SweepOutcome { requeued: 1, quarantined: 0 });
    assert_eq!(store.sweep_expired().await.unwrap(), SweepOutcome::default());
    // The crashed worker's late report is fenced off.
    assert!(matches!(store.complete(first.task_id, first.token, outputs_for(&first)).await.unwrap_err(), StoreError::LeaseLost(_)));
    let second = store.lease(&req).await.unwrap().unwrap();
    assert_eq!(second.task_id, first.task_id);
    assert_eq!(second.attempt, 2);
    assert_ne!(second.token, first.token);
    // max_lost = 3: the third expiry quarantines the task.
    tokio::time::sleep(Duration::from_millis(400)).await;
    store.sweep_expired().await.unwrap();
    store.lease(&req).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.sweep_expired().await.unwrap(), SweepOutcome { requeued: 0, quarantined: 1 });
    let j = store.get_job(id).await.unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.counts.failed, 4);
    assert!(store.lease(&req).await.unwrap().is_none());
}

async fn failures_retry_with_backoff_then_fail(store: Arc<dyn JobStore>) {
    let id = submit(&*store, job("m", 1), 2).await;
    let t = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    let retryable = Failure { message: "GPU out of memory".into(), retryable: true };
    assert_eq!(store.fail(t.task_id, t.token, &retryable).await.unwrap(), FailOutcome::Retrying { attempt: 1 });
    // Backing off (60 s in this policy): the other task comes first, then nothing.
    let u = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    assert_ne!(u.task_id, t.task_id);
    assert!(store.lease(&lease_req("w", &["m"])).await.unwrap().is_none());
    let permanent = Failure { message: "prompt rejected".into(), retryable: false };
    assert_eq!(store.fail(u.task_id, u.token, &permanent).await.unwrap(), FailOutcome::Failed);
    let j = store.get_job(id).await.unwrap();
    assert_eq!(j.counts.failed, 1);
    assert_eq!(j.counts.pending, 1);
    assert_eq!(j.state, JobState::Running);
    assert_eq!(j.last_error.as_deref(), Some("prompt rejected"));
    assert_eq!(store.retry_failed(id).await.unwrap(), 1);
    let v = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    assert_eq!(v.task_id, u.task_id);
}

async fn cancellation_reaches_heartbeats(store: Arc<dyn JobStore>) {
    let id = submit(&*store, job("m", 1), 3).await;
    let t = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    assert_eq!(store.cancel_job(id).await.unwrap(), JobState::Cancelled);
    assert_eq!(store.cancel_job(id).await.unwrap(), JobState::Cancelled);
    let hb = store.heartbeat("w", &[(t.task_id, t.token)], Duration::from_secs(30)).await.unwrap();
    assert_eq!(hb, vec![LeaseStatus::Cancelled(t.task_id)]);
    assert!(matches!(store.complete(t.task_id, t.token, outputs_for(&t)).await.unwrap_err(), StoreError::Cancelled(_)));
    assert!(store.lease(&lease_req("w", &["m"])).await.unwrap().is_none());
    assert_eq!(store.get_job(id).await.unwrap().counts.cancelled, 3);
    assert!(matches!(store.cancel_job(fresco_core::JobId::new()).await.unwrap_err(), StoreError::NotFound(_)));
}

async fn routing_follows_models_priority_and_fair_share(store: Arc<dyn JobStore>) {
    let a = submit(&*store, job("a", 1), 4).await;
    let b = submit(&*store, job("a", 1), 4).await;
    let mut urgent = job("b", 1);
    urgent.priority = 10;
    let c = submit(&*store, urgent, 2).await;
    // A worker serving only "a" never sees "b".
    let t = store.lease(&lease_req("w1", &["a"])).await.unwrap().unwrap();
    assert_ne!(t.job_id, c);
    // Higher priority first for a worker serving both.
    let u = store.lease(&lease_req("w2", &["a", "b"])).await.unwrap().unwrap();
    assert_eq!(u.job_id, c);
    // Fair share: the next "a" lease goes to the job with fewer running tasks.
    let v = store.lease(&lease_req("w3", &["a"])).await.unwrap().unwrap();
    assert_ne!(v.job_id, t.job_id);
    assert!([a, b].contains(&v.job_id));
    // Loaded model preferred among equal priorities.
    let mut req = lease_req("w4", &["a", "b"]);
    req.loaded_model = Some("a".into());
    let mut low = job("b", 1);
    low.priority = 10;
    submit(&*store, low, 1).await;
    let w = store.lease(&req).await.unwrap().unwrap();
    assert_eq!(w.model, "b", "priority wins over the loaded model");
    let x = store.lease(&req).await.unwrap().unwrap();
    assert_eq!(x.model, "b");
    let y = store.lease(&req).await.unwrap().unwrap();
    assert_eq!(y.model, "a");
}

async fn explicit_seeds_and_overrides_are_kept(store: Arc<dyn JobStore>) {
    let BeginJob::New(mut ingest) = store.begin_job(job("m", 8)).await.unwrap() else { panic!() };
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("source".to_string(), "laion".to_string());
    ingest
        .append(vec![
            NewPrompt {
                prompt: "a".into(),
                overrides: ParamOverrides { seed: Some(123), negative_prompt: Some("blurry".into()), extra, ..Default::default() },
            },
            NewPrompt { prompt: "b".into(), overrides: ParamOverrides { steps: Some(8), ..Default::default() } },
        ])
        .await
        .unwrap();
    ingest.commit().await.unwrap();
    let t = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    assert_eq!(t.prompts.len(), 1, "different steps split the batch");
    assert_eq!(t.prompts[0].seed, 123);
    assert_eq!(t.prompts[0].negative_prompt.as_deref(), Some("blurry"));
    assert_eq!(t.prompts[0].extra.get("source").map(String::as_str), Some("laion"));
    let u = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    assert_eq!(u.params.steps, Some(8));
}

async fn concurrent_lessees_never_share_a_task(store: Arc<dyn JobStore>) {
    submit(&*store, job("m", 1), 40).await;
    let mut handles = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(t) = store.lease(&lease_req(&format!("w{w}"), &["m"])).await.unwrap() {
                got.push(t.task_id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let unique: BTreeSet<_> = all.iter().collect();
    assert_eq!(all.len(), 40);
    assert_eq!(unique.len(), 40);
}

async fn job_listing_pages_and_filters(store: Arc<dyn JobStore>) {
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(submit(&*store, job("m", 1), 1).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.cancel_job(ids[0]).await.unwrap();
    let page = store.list_jobs(&JobFilter { limit: 2, ..Default::default() }).await.unwrap();
    assert_eq!(page.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[4], ids[3]]);
    let next = store.list_jobs(&JobFilter { limit: 2, before: Some(ids[3]), ..Default::default() }).await.unwrap();
    assert_eq!(next.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ids[2], ids[1]]);
    let cancelled = store.list_jobs(&JobFilter { limit: 10, state: Some(JobState::Cancelled), ..Default::default() }).await.unwrap();
    assert_eq!(cancelled.len(), 1);
}

async fn reregistering_a_worker_releases_its_leases(store: Arc<dyn JobStore>) {
    submit(&*store, job("m", 1), 2).await;
    let w = WorkerInfo { name: "w".into(), models: vec!["m".into()], device: "cpu".into(), max_batch: 1, loaded_model: None };
    store.register_worker(&w).await.unwrap();
    let t = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    store.lease(&lease_req("other", &["m"])).await.unwrap().unwrap();
    store.register_worker(&w).await.unwrap();
    assert_eq!(store.sweep_expired().await.unwrap(), SweepOutcome { requeued: 1, quarantined: 0 });
    let again = store.lease(&lease_req("w", &["m"])).await.unwrap().unwrap();
    assert_eq!(again.task_id, t.task_id);
}

async fn migrations_are_idempotent(store: Arc<dyn JobStore>) {
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::pg().await).await } )*
        }
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(super::sqlite().await).await } )*
        }
    };
}

suite!(
    submit_creates_batched_tasks,
    failed_or_aborted_submission_leaves_nothing,
    invalid_job_fields_are_named,
    client_request_id_returns_the_first_job,
    lease_complete_finishes_the_job,
    completion_must_cover_the_task,
    stale_token_changes_nothing,
    expired_leases_are_requeued_then_quarantined,
    failures_retry_with_backoff_then_fail,
    cancellation_reaches_heartbeats,
    routing_follows_models_priority_and_fair_share,
    explicit_seeds_and_overrides_are_kept,
    concurrent_lessees_never_share_a_task,
    job_listing_pages_and_filters,
    reregistering_a_worker_releases_its_leases,
    migrations_are_idempotent,
);

/// Two coordinator replicas sweeping the same database at once handle each expired lease exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sweeper_is_safe_on_two_replicas() {
    let schema = format!("fresco_t_{}", uuid::Uuid::new_v4().simple());
    let one = pg_in(&schema).await;
    let two = pg_in(&schema).await;
    submit(&one, job("m", 1), 30).await;
    let mut req = lease_req("w", &["m"]);
    req.ttl = Duration::from_millis(100);
    for _ in 0..30 {
        one.lease(&req).await.unwrap().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a, b) = tokio::join!(one.sweep_expired(), two.sweep_expired());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.requeued + b.requeued, 30, "{a:?} {b:?}");
    assert_eq!(one.queue_depth().await.unwrap()[0].pending_tasks, 30);
}
