//! Pieces several commands share: signals, tokens, and the client connection.

use std::time::Duration;

use anyhow::Context;
use fresco_proto::v1::job_service_client::JobServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// First SIGINT/SIGTERM: `drain` (finish what is in hand). Second: `abort`.
pub fn shutdown_signals() -> (CancellationToken, CancellationToken) {
    let drain = CancellationToken::new();
    let abort = CancellationToken::new();
    let (d, a) = (drain.clone(), abort.clone());
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        for n in 0.. {
            #[cfg(unix)]
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            if n == 0 {
                eprintln!("stopping: finishing the batch in hand (signal again to abort)");
                d.cancel();
            } else {
                a.cancel();
                return;
            }
        }
    });
    (drain, abort)
}

#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

pub type Client = JobServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(clap::Args, Clone)]
pub struct ClientArgs {
    /// Coordinator URL (http:// or https://).
    #[arg(long, env = "FRESCO_COORDINATOR", default_value = "http://127.0.0.1:50051", global = true)]
    pub coordinator: String,
    /// Bearer token with the client role.
    #[arg(long, env = "FRESCO_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

pub async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let mut endpoint = Endpoint::from_shared(args.coordinator.clone())
        .with_context(|| format!("--coordinator {:?} is not a URL", args.coordinator))?
        .connect_timeout(Duration::from_secs(10));
    if args.coordinator.starts_with("https://") {
        endpoint = endpoint.tls_config(ClientTlsConfig::new().with_enabled_roots())?;
    }
    let channel = endpoint.connect().await.with_context(|| format!("cannot reach the coordinator at {}", args.coordinator))?;
    let token = match &args.token {
        Some(t) => Some(format!("Bearer {t}").parse().context("--token contains characters not allowed in a header")?),
        None => None,
    };
    Ok(JobServiceClient::with_interceptor(channel, Bearer(token)).max_decoding_message_size(64 << 20))
}

/// A gRPC error as a person reads it.
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}
