//! `fresco run`: the whole system in one process — SQLite store, the coordinator logic and in-process
//! workers — writing to a local folder. Re-running the same command continues where it stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fresco_coordinator::{run_sweeper, Coordinator, CoordinatorConfig, WorkerServiceImpl};
use fresco_core::{GenerationParams, JobState};
use fresco_pipeline::DeviceSpec;
use fresco_proto::v1;
use fresco_proto::v1::worker_service_server::WorkerService;
use fresco_store::{sqlite::SqliteStore, BeginJob, JobStore, NewJob, NewPrompt, QueuePolicy};
use fresco_worker::{CoordinatorLink, ModelRegistry, Worker, WorkerConfig};
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use super::common::shutdown_signals;
use super::GenOptions;
use crate::prompts::read_prompt_file;

/// The worker's link to a coordinator in the same process: the same service code as over gRPC, minus the
/// socket.
struct InProcess(WorkerServiceImpl);

#[tonic::async_trait]
impl CoordinatorLink for InProcess {
    async fn register(&self, req: v1::RegisterRequest) -> Result<v1::RegisterResponse, Status> {
        self.0.register(Request::new(req)).await.map(tonic::Response::into_inner)
    }
    async fn lease(&self, req: v1::LeaseRequest) -> Result<v1::LeaseResponse, Status> {
        self.0.lease(Request::new(req)).await.map(tonic::Response::into_inner)
    }
    async fn heartbeat(&self, req: v1::HeartbeatRequest) -> Result<v1::HeartbeatResponse, Status> {
        self.0.heartbeat(Request::new(req)).await.map(tonic::Response::into_inner)
    }
    async fn complete(&self, req: v1::CompleteRequest) -> Result<v1::CompleteResponse, Status> {
        self.0.complete(Request::new(req)).await.map(tonic::Response::into_inner)
    }
    async fn fail(&self, req: v1::FailRequest) -> Result<v1::FailResponse, Status> {
        self.0.fail(Request::new(req)).await.map(tonic::Response::into_inner)
    }
}

#[derive(clap::Args)]
pub struct Args {
    /// Prompt file: .txt (one per line), .jsonl or .csv.
    prompts: PathBuf,
    /// Model folder (diffusers layout). Default: the bundled models/fresco-tiny.
    #[arg(long, env = "FRESCO_MODEL")]
    model: Option<PathBuf>,
    /// Output folder (or file:// URL). Images land in OUT/JOB_ID/00000000.png with a .json sidecar.
    #[arg(long, default_value = "out")]
    out: String,
    #[command(flatten)]
    gen: GenOptions,
    #[arg(long, default_value_t = 8)]
    batch_size: u32,
    /// Seed prompts without their own derive theirs from.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// In-process workers (each runs its own copy of the model).
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

const BUNDLED_MODEL: &str = "models/fresco-tiny";

fn resolve_model(arg: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match arg {
        Some(p) if p.join("model_index.json").is_file() => Ok(p.clone()),
        Some(p) => bail!("--model {}: not a model folder (no model_index.json)", p.display()),
        None if Path::new(BUNDLED_MODEL).join("model_index.json").is_file() => Ok(PathBuf::from(BUNDLED_MODEL)),
        None => bail!(
            "no bundled model at {BUNDLED_MODEL} (run from the repository root); pass --model DIR, e.g. --model tests/fixtures/models/tiny-sd15"
        ),
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let model_dir = resolve_model(args.model.as_ref())?;
    let model = model_dir.canonicalize()?.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    fresco_core::validate_model_name(&model).map_err(|e| anyhow::anyhow!("--model: folder name {e}"))?;
    let rows = read_prompt_file(&args.prompts)?;
    let params: GenerationParams = args.gen.params()?;
    let out_dir = PathBuf::from(args.out.strip_prefix("file://").unwrap_or(&args.out));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let out_url = format!("file://{}", out_dir.canonicalize()?.display());

    // The same command over the same prompts is the same job: its identity is a hash of everything that
    // determines the images, so a re-run finds it and continues.
    let mut h = Sha256::new();
    h.update(std::fs::read(&args.prompts)?);
    h.update(serde_json::to_vec(&(&model, &params, args.batch_size, args.seed, &out_url))?);
    let request_id = format!("run-{}", &hex::encode(h.finalize())[..32]);

    let store = Arc::new(SqliteStore::open(&out_dir.join(".fresco-run.sqlite"), QueuePolicy::default()).await?);
    store.migrate().await?;
    let config = CoordinatorConfig {
        lease_ttl: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(5),
        sweep_interval: Duration::from_secs(1),
        ..Default::default()
    };
    let c = Coordinator::new(store.clone(), config);
    let seed =
        if args.seed == 0 { fresco_core::derive_seed(u64::from_le_bytes(request_id.as_bytes()[4..12].try_into()?), 0) } else { args.seed };
    let job = NewJob {
        model: model.clone(),
        params,
        output_url: out_url,
        batch_size: args.batch_size.max(1),
        priority: 0,
        seed,
        client_request_id: Some(request_id),
        max_attempts: 3,
    };
    let job_id = match store.begin_job(job).await? {
        BeginJob::Existing(id) => {
            eprintln!("continuing job {id}");
            // Batches the previous run was in the middle of: its workers are gone.
            store.retry_failed(id).await.ok();
            id
        }
        BeginJob::New(mut ingest) => {
            for chunk in rows.chunks(10_000) {
                ingest
                    .append(chunk.iter().map(|r| NewPrompt { prompt: r.prompt.clone(), overrides: r.overrides.clone() }).collect())
                    .await?;
            }
            ingest.commit().await?
        }
    };

    let (drain, abort) = shutdown_signals();
    let sweeper = tokio::spawn(run_sweeper(c.clone(), abort.clone()));
    let mut workers = Vec::new();
    for i in 0..args.workers.max(1) {
        let registry = Arc::new(ModelRegistry::single(model.clone(), model_dir.clone(), args.device.clone()));
        let link = Arc::new(InProcess(WorkerServiceImpl::new(c.clone(), Default::default())));
        let config = WorkerConfig {
            name: format!("local-{i}"),
            device: format!("{:?}", args.device).to_lowercase(),
            lease_wait: Duration::from_millis(500),
            ..Default::default()
        };
        let w = Worker::new(config, link, registry);
        workers.push(tokio::spawn(w.run(drain.clone(), abort.clone())));
    }

    let started = Instant::now();
    let first = store.get_job(job_id).await?;
    let already = first.counts.succeeded;
    let bar = if args.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(first.total) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = loop {
        let j = store.get_job(job_id).await?;
        bar.set_position(j.counts.succeeded + j.counts.failed);
        if j.state.is_terminal() || drain.is_cancelled() {
            break j;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = drain.cancelled() => {}
        }
    };
    bar.finish_and_clear();
    drain.cancel();
    for w in workers {
        w.await??;
    }
    abort.cancel();
    let _ = sweeper.await;
    let summary = store.get_job(job_id).await.unwrap_or(summary);
    let made = summary.counts.succeeded - already.min(summary.counts.succeeded);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "job {}: {} — {}/{} images ({} new in {:.1}s, {:.2} images/s), {} failed, in {}/{}",
        job_id,
        summary.state,
        summary.counts.succeeded,
        summary.total,
        made,
        secs,
        made as f64 / secs.max(1e-9),
        summary.counts.failed,
        out_dir.display(),
        job_id
    );
    if let Some(e) = &summary.last_error {
        eprintln!("last error: {e}");
    }
    match summary.state {
        JobState::Succeeded => Ok(()),
        JobState::Failed => bail!("{} prompt(s) failed", summary.counts.failed),
        _ => {
            eprintln!("interrupted: run the same command again to continue");
            Ok(())
        }
    }
}
