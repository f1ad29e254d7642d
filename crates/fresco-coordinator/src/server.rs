//! Serving: the two gRPC services plus health and reflection on one listener, metrics over HTTP on
//! another, TLS (optionally with client certificates), and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use fresco_proto::v1::job_service_server::JobServiceServer;
use fresco_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::auth::Tokens;
use crate::{Coordinator, JobServiceImpl, WorkerServiceImpl};

#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate signed by this CA.
    pub client_ca_pem: Option<Vec<u8>>,
}

pub struct ServeOptions {
    pub tokens: Tokens,
    pub tls: Option<TlsFiles>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("refusing to listen on non-loopback address {0} without tokens: configure tokens (client, worker, admin)")]
    NoTokens(SocketAddr),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(String),
    #[error("metrics server: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the gRPC API on `listener` until `shutdown` fires.
pub async fn serve_grpc(
    c: Arc<Coordinator>,
    listener: TcpListener,
    opts: ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    if opts.tokens.is_empty() && !addr.ip().is_loopback() {
        return Err(ServeError::NoTokens(addr));
    }
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<JobServiceServer<JobServiceImpl>>().await;
    health_reporter.set_serving::<WorkerServiceServer<WorkerServiceImpl>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fresco_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    let mut builder = Server::builder();
    if let Some(tls) = &opts.tls {
        let mut cfg = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem));
        if let Some(ca) = &tls.client_ca_pem {
            cfg = cfg.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(cfg).map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    tracing::info!(%addr, tls = opts.tls.is_some(), auth = !opts.tokens.is_empty(), "coordinator gRPC listening");
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(JobServiceServer::new(JobServiceImpl::new(c.clone(), opts.tokens.clone())).max_decoding_message_size(64 << 20))
        .add_service(WorkerServiceServer::new(WorkerServiceImpl::new(c, opts.tokens)).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Serves `GET /metrics` (Prometheus text format) until `shutdown` fires.
pub async fn serve_metrics(c: Arc<Coordinator>, listener: TcpListener, shutdown: CancellationToken) -> Result<(), ServeError> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let c = c.clone();
            async move { c.metrics.render(&c).await }
        }),
    );
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}
