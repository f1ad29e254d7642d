//! `fresco worker`: serve every model folder under --models to a coordinator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fresco_pipeline::DeviceSpec;
use fresco_worker::{GrpcLink, ModelRegistry, Worker, WorkerConfig};

use super::common::shutdown_signals;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, env = "FRESCO_COORDINATOR")]
    coordinator: String,
    /// Folder whose subfolders are diffusers-layout models; each is served under its folder name.
    #[arg(long, env = "FRESCO_MODELS")]
    models: PathBuf,
    #[arg(long, env = "FRESCO_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Largest batch per forward pass.
    #[arg(long, env = "FRESCO_MAX_BATCH", default_value_t = 8)]
    max_batch: u32,
    /// Unique worker name (default: host-pid).
    #[arg(long, env = "FRESCO_WORKER_NAME")]
    name: Option<String>,
    /// Bearer token with the worker role.
    #[arg(long, env = "FRESCO_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// coordinator.
    #[arg(long, env = "FRESCO_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[arg(long, env = "FRESCO_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Longest an upload is retried before the batch is reported as failed (seconds).
    #[arg(long, env = "FRESCO_UPLOAD_DEADLINE_SECS", default_value_t = 600)]
    upload_deadline_secs: u64,
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let models = Arc::new(ModelRegistry::scan(&args.models, args.device.clone()).map_err(anyhow::Error::msg)?);
    let ca = args.tls_ca.as_ref().map(|p| std::fs::read(p).with_context(|| format!("{}: cannot read", p.display()))).transpose()?;
    let link = Arc::new(GrpcLink::new(&args.coordinator, args.token.as_deref(), ca).map_err(anyhow::Error::msg)?);
    let config = WorkerConfig {
        name: args.name.unwrap_or_else(default_name),
        device: format!("{:?}", args.device).to_lowercase(),
        max_batch: args.max_batch.clamp(1, 1024),
        upload_deadline: Duration::from_secs(args.upload_deadline_secs),
        ..Default::default()
    };
    let worker = Worker::new(config, link, models);
    let (drain, abort) = shutdown_signals();
    if let Some(addr) = args.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let metrics = worker.metrics.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        );
        let stop = abort.clone();
        tokio::spawn(async move { axum::serve(l, app).with_graceful_shutdown(stop.cancelled_owned()).await });
    }
    worker.run(drain, abort).await?;
    Ok(())
}
