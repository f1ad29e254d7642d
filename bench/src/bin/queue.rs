//! Queue throughput against a real database: enqueue rate (prompts/s) for a 1,000,000-prompt job, and
//! lease + complete rate (tasks/s, prompts/s) with 1, 16 and 64 simulated workers.
//!
//! `DATABASE_URL=postgres://… cargo run --release -p fresco-bench --bin queue [-- --sqlite]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use fresco_bench::rate;
use fresco_core::{GenerationParams, ParamOverrides};
use fresco_store::postgres::PgStore;
use fresco_store::sqlite::SqliteStore;
use fresco_store::*;

fn job(batch: u32) -> NewJob {
    NewJob {
        model: "bench".into(),
        params: GenerationParams::default(),
        output_url: "s3://bench/out".into(),
        batch_size: batch,
        priority: 0,
        seed: 1,
        client_request_id: None,
        max_attempts: 3,
    }
}

async fn enqueue(store: &dyn JobStore, prompts: usize, batch: u32) -> anyhow::Result<f64> {
    let started = Instant::now();
    let BeginJob::New(mut ingest) = store.begin_job(job(batch)).await? else { anyhow::bail!("unexpected existing job") };
    for start in (0..prompts).step_by(10_000) {
        let chunk = (start..(start + 10_000).min(prompts))
            .map(|i| NewPrompt {
                prompt: format!("a photograph of object number {i} on a table, studio light"),
                overrides: ParamOverrides::default(),
            })
            .collect();
        ingest.append(chunk).await?;
    }
    ingest.commit().await?;
    Ok(started.elapsed().as_secs_f64())
}

async fn drain(store: Arc<dyn JobStore>, workers: usize, window: Duration) -> anyhow::Result<(u64, u64, f64)> {
    let started = Instant::now();
    let deadline = started + window;
    let mut handles = Vec::new();
    for w in 0..workers {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            let req = LeaseRequest {
                worker: format!("bench-{w}"),
                models: vec!["bench".into()],
                loaded_model: Some("bench".into()),
                max_batch: 8,
                ttl: Duration::from_secs(60),
            };
            let (mut tasks, mut prompts) = (0u64, 0u64);
            while Instant::now() < deadline {
                let Some(t) = store.lease(&req).await? else { break };
                let outputs = t
                    .prompts
                    .iter()
                    .map(|p| NewOutput {
                        index: p.index,
                        object_key: format!("{}/{:08}.png", t.job_id, p.index),
                        url: format!("s3://bench/out/{}/{:08}.png", t.job_id, p.index),
                        sha256: "0".repeat(64),
                        bytes: 1000,
                        worker: req.worker.clone(),
                        metadata: serde_json::json!({}),
                    })
                    .collect();
                store.complete(t.task_id, t.token, outputs).await?;
                tasks += 1;
                prompts += t.prompts.len() as u64;
            }
            anyhow::Ok((tasks, prompts))
        }));
    }
    let (mut tasks, mut prompts) = (0, 0);
    for h in handles {
        let (t, p) = h.await??;
        tasks += t;
        prompts += p;
    }
    Ok((tasks, prompts, started.elapsed().as_secs_f64()))
}

async fn pg_store(schema: &str, connections: u32) -> anyhow::Result<Arc<dyn JobStore>> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let opts: sqlx::postgres::PgConnectOptions = url.parse()?;
    let admin = sqlx::PgPool::connect_with(opts.clone()).await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await?;
    let pool =
        sqlx::postgres::PgPoolOptions::new().max_connections(connections).connect_with(opts.options([("search_path", schema)])).await?;
    let store = PgStore::from_pool(pool, QueuePolicy::default());
    store.migrate().await?;
    Ok(Arc::new(store))
}

async fn drop_schema(schema: &str) -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = sqlx::PgPool::connect(&url).await?;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sqlite = std::env::args().any(|a| a == "--sqlite");
    let prompts: usize = std::env::var("FRESCO_BENCH_PROMPTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let backend = if sqlite { "sqlite" } else { "postgres" };
    println!("backend: {backend}");
    let tmp = std::env::temp_dir().join(format!("fresco-bench-{}.sqlite", uuid::Uuid::new_v4().simple()));
    let schema = format!("fresco_bench_{}", uuid::Uuid::new_v4().simple());
    let store: Arc<dyn JobStore> = if sqlite {
        let s = SqliteStore::open(&tmp, QueuePolicy::default()).await?;
        s.migrate().await?;
        Arc::new(s)
    } else {
        pg_store(&schema, 70).await?
    };

    let secs = enqueue(&*store, prompts, 8).await?;
    println!(
        "enqueue: {prompts} prompts in {secs:.2}s = {} prompts/s (batch 8 → {} tasks)",
        rate(prompts as f64, secs).trim(),
        prompts / 8
    );

    if std::env::var("FRESCO_BENCH_KEEP").is_ok() {
        println!("kept schema {schema}");
        return Ok(());
    }
    println!("{:>8} {:>10} {:>10} {:>8}", "workers", "tasks/s", "prompts/s", "seconds");
    for workers in [1usize, 16, 64] {
        let (tasks, done, secs) = drain(store.clone(), workers, Duration::from_secs(10)).await?;
        println!(
            "{workers:>8} {} {} {secs:>8.2}   ({tasks} tasks of 8 prompts, lease + complete each)",
            rate(tasks as f64, secs),
            rate(done as f64, secs)
        );
    }
    drop(store);
    if sqlite {
        let _ = std::fs::remove_file(&tmp);
    } else {
        drop_schema(&schema).await?;
    }
    Ok(())
}
