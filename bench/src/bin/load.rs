//! Load: 100 simulated workers leasing and completing concurrently for 60 s against one coordinator over
//! gRPC on loopback (PostgreSQL from DATABASE_URL). Prints throughput and p50/p99 Lease latency.
//!
//! `cargo run --release -p fresco-bench --bin load [-- WORKERS SECONDS]`

// The library holds the benchmarks' global allocator (mimalloc, as in the `fresco` binary); rustc
// links a crate only when something names it, so without this line the numbers are glibc malloc's.
use fresco_bench as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fresco_coordinator::auth::Tokens;
use fresco_coordinator::server::{serve_grpc, ServeOptions};
use fresco_coordinator::{Coordinator, CoordinatorConfig};
use fresco_proto::v1;
use fresco_proto::v1::worker_service_client::WorkerServiceClient;
use fresco_store::postgres::PgStore;
use fresco_store::{BeginJob, JobStore, NewJob, NewPrompt, QueuePolicy};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let workers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(60);
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = format!("fresco_load_{}", uuid::Uuid::new_v4().simple());
    let opts: sqlx::postgres::PgConnectOptions = url.parse()?;
    let admin = sqlx::PgPool::connect_with(opts.clone()).await?;
    sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&admin).await?;
    let pool =
        sqlx::postgres::PgPoolOptions::new().max_connections(32).connect_with(opts.options([("search_path", schema.as_str())])).await?;
    let store = PgStore::from_pool(pool, QueuePolicy::default());
    store.migrate().await?;
    let store: Arc<dyn JobStore> = Arc::new(store);

    let BeginJob::New(mut ingest) = store
        .begin_job(NewJob {
            model: "load".into(),
            params: Default::default(),
            output_url: "s3://load/out".into(),
            batch_size: 8,
            priority: 0,
            seed: 1,
            client_request_id: None,
            max_attempts: 3,
        })
        .await?
    else {
        anyhow::bail!("unexpected existing job")
    };
    for start in (0..800_000).step_by(10_000) {
        ingest
            .append((start..start + 10_000).map(|i| NewPrompt { prompt: format!("prompt {i}"), overrides: Default::default() }).collect())
            .await?;
    }
    ingest.commit().await?;

    let c = Coordinator::new(store, CoordinatorConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_grpc(c, listener, ServeOptions { tokens: Tokens::default(), tls: None }, stop.clone()));

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut handles = Vec::new();
    for w in 0..workers {
        let url = format!("http://{addr}");
        handles.push(tokio::spawn(async move {
            let mut client = WorkerServiceClient::connect(url).await?;
            let name = format!("load-{w}");
            client
                .register(v1::RegisterRequest { name: name.clone(), models: vec!["load".into()], device: "none".into(), max_batch: 8 })
                .await?;
            let mut latencies = Vec::new();
            let mut prompts = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let task = client
                    .lease(v1::LeaseRequest {
                        worker: name.clone(),
                        models: vec!["load".into()],
                        loaded_model: "load".into(),
                        max_batch: 8,
                        wait_ms: 0,
                    })
                    .await?
                    .into_inner()
                    .task;
                latencies.push(t.elapsed());
                let Some(task) = task else { break };
                let results = task
                    .prompts
                    .iter()
                    .map(|p| v1::PromptResult {
                        index: p.index,
                        object_key: p.image_key.clone(),
                        url: String::new(),
                        sha256: "0".repeat(64),
                        bytes: 1,
                        metadata_json: "{}".into(),
                    })
                    .collect();
                prompts += task.prompts.len() as u64;
                client
                    .complete(v1::CompleteRequest { worker: name.clone(), task_id: task.task_id, lease_token: task.lease_token, results })
                    .await?;
            }
            anyhow::Ok((latencies, prompts))
        }));
    }
    let started = Instant::now();
    let (mut latencies, mut prompts) = (Vec::new(), 0);
    for h in handles {
        let (l, p) = h.await??;
        latencies.extend(l);
        prompts += p;
    }
    let secs = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1000.0;
    println!(
        "{workers} workers over gRPC for {secs:.1}s: {} leases ({:.0}/s), {prompts} prompts completed ({:.0}/s)",
        latencies.len(),
        latencies.len() as f64 / secs,
        prompts as f64 / secs
    );
    println!("Lease latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", pct(0.5), pct(0.99), pct(1.0));
    stop.cancel();
    server.await??;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE")).execute(&admin).await?;
    Ok(())
}
