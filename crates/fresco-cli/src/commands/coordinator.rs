//! `fresco coordinator`: the gRPC services over PostgreSQL (or SQLite for a single replica).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fresco_coordinator::auth::Tokens;
use fresco_coordinator::server::{serve_grpc, serve_metrics, ServeOptions, TlsFiles};
use fresco_coordinator::{run_sweeper, Coordinator, CoordinatorConfig};
use fresco_store::{postgres::PgStore, sqlite::SqliteStore, JobStore, QueuePolicy};

use super::common::shutdown_signals;

#[derive(clap::Args)]
pub struct Args {
    /// gRPC listen address. Off loopback, tokens are required.
    #[arg(long, env = "FRESCO_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Prometheus metrics listen address (GET /metrics).
    #[arg(long, env = "FRESCO_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// postgres://… (or sqlite://path for a single replica).
    #[arg(long, env = "FRESCO_DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "FRESCO_DATABASE_MAX_CONNECTIONS", default_value_t = 16)]
    database_max_connections: u32,
    /// File of `role token` lines (roles: client, worker, admin).
    #[arg(long, env = "FRESCO_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// Tokens as `role:token,role:token` (prefer a file: environments leak).
    #[arg(long, env = "FRESCO_TOKENS", hide_env_values = true)]
    tokens: Option<String>,
    #[arg(long, env = "FRESCO_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "FRESCO_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA.
    #[arg(long, env = "FRESCO_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    #[arg(long, env = "FRESCO_LEASE_TTL_SECS", default_value_t = 60.0)]
    lease_ttl_secs: f64,
    #[arg(long, env = "FRESCO_HEARTBEAT_SECS", default_value_t = 10.0)]
    heartbeat_secs: f64,
    #[arg(long, env = "FRESCO_SWEEP_SECS", default_value_t = 5.0)]
    sweep_secs: f64,
    #[arg(long, env = "FRESCO_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    #[arg(long, env = "FRESCO_MAX_LOST", default_value_t = 5)]
    max_lost: u32,
    /// Skip running migrations at start (when a separate job runs them).
    #[arg(long, env = "FRESCO_NO_MIGRATE")]
    no_migrate: bool,
}

fn secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        bail!("--{name}: must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

pub fn load_tokens(file: Option<&PathBuf>, env: Option<&str>) -> anyhow::Result<Tokens> {
    match (file, env) {
        (Some(f), _) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("{}: cannot read tokens", f.display()))?;
            Tokens::parse_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))
        }
        (None, Some(e)) => Tokens::parse_env(e).map_err(|e| anyhow::anyhow!("FRESCO_TOKENS: {e}")),
        (None, None) => Ok(Tokens::default()),
    }
}

pub async fn open_store(url: &str, max_connections: u32, policy: QueuePolicy) -> anyhow::Result<Arc<dyn JobStore>> {
    Ok(if let Some(path) = url.strip_prefix("sqlite://") {
        Arc::new(SqliteStore::open(path.as_ref(), policy).await.with_context(|| format!("cannot open SQLite database {path}"))?)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Arc::new(PgStore::connect(url, max_connections, policy).await.context("cannot connect to PostgreSQL")?)
    } else {
        bail!("--database-url: expected postgres://… or sqlite://path")
    })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = CoordinatorConfig {
        lease_ttl: secs("lease-ttl-secs", args.lease_ttl_secs)?,
        heartbeat_interval: secs("heartbeat-secs", args.heartbeat_secs)?,
        sweep_interval: secs("sweep-secs", args.sweep_secs)?,
        default_max_attempts: args.max_attempts.clamp(1, 100),
        ..Default::default()
    };
    if config.heartbeat_interval * 2 > config.lease_ttl {
        bail!("--heartbeat-secs must be at most half of --lease-ttl-secs");
    }
    let tokens = load_tokens(args.tokens_file.as_ref(), args.tokens.as_deref())?;
    if tokens.is_empty() && !args.listen.ip().is_loopback() {
        bail!("refusing to listen on {} without tokens: pass --tokens-file (roles client, worker, admin)", args.listen);
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(TlsFiles {
            cert_pem: std::fs::read(c).with_context(|| format!("{}: cannot read", c.display()))?,
            key_pem: std::fs::read(k).with_context(|| format!("{}: cannot read", k.display()))?,
            client_ca_pem: args
                .tls_client_ca
                .as_ref()
                .map(|p| std::fs::read(p).with_context(|| format!("{}: cannot read", p.display())))
                .transpose()?,
        }),
        _ => None,
    };
    let policy = QueuePolicy { max_lost: args.max_lost.max(1), ..Default::default() };
    let store = open_store(&args.database_url, args.database_max_connections, policy).await?;
    if !args.no_migrate {
        store.migrate().await.context("migrations failed")?;
    }
    let c = Coordinator::new(store, config);
    let (drain, _abort) = shutdown_signals();
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("cannot listen on {}", args.listen))?;
    // Print the bound address: with port 0 this is how tests and scripts learn it.
    eprintln!("fresco coordinator listening on {}", listener.local_addr()?);
    let sweeper = tokio::spawn(run_sweeper(c.clone(), drain.clone()));
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            eprintln!("fresco metrics listening on {}", l.local_addr()?);
            Some(tokio::spawn(serve_metrics(c.clone(), l, drain.clone())))
        }
        None => None,
    };
    serve_grpc(c, listener, ServeOptions { tokens, tls }, drain.clone()).await?;
    drain.cancel();
    let _ = sweeper.await;
    if let Some(m) = metrics {
        m.await??;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    #[arg(long, env = "FRESCO_DATABASE_URL")]
    database_url: String,
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let store = open_store(&args.database_url, 2, QueuePolicy::default()).await?;
    store.migrate().await.context("migrations failed")?;
    eprintln!("database is up to date");
    Ok(())
}
