//! How a worker reaches its coordinator: a trait mirroring the gRPC client, so the worker loop runs the
//! same against a remote coordinator (gRPC over a socket) and an in-process one (`fresco run`), and is
//! testable without a network.

use async_trait::async_trait;
use fresco_proto::v1;
use fresco_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

#[async_trait]
pub trait CoordinatorLink: Send + Sync + 'static {
    async fn register(&self, req: v1::RegisterRequest) -> Result<v1::RegisterResponse, Status>;
    async fn lease(&self, req: v1::LeaseRequest) -> Result<v1::LeaseResponse, Status>;
    async fn heartbeat(&self, req: v1::HeartbeatRequest) -> Result<v1::HeartbeatResponse, Status>;
    async fn complete(&self, req: v1::CompleteRequest) -> Result<v1::CompleteResponse, Status>;
    async fn fail(&self, req: v1::FailRequest) -> Result<v1::FailResponse, Status>;
}

#[derive(Clone)]
struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// The production link: tonic over TCP (TLS for `https://` URLs), with a bearer token.
#[derive(Clone)]
pub struct GrpcLink {
    client: WorkerServiceClient<InterceptedService<Channel, BearerToken>>,
}

impl GrpcLink {
    /// Connects lazily: the first call dials, and a coordinator that is down now is retried by the caller.
    pub fn new(url: &str, token: Option<&str>, ca_pem: Option<Vec<u8>>) -> Result<Self, String> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("coordinator URL {url:?}: {e}"))?
            .connect_timeout(std::time::Duration::from_secs(5))
            .tcp_keepalive(Some(std::time::Duration::from_secs(30)));
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = ca_pem {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
        }
        let token = match token {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| "token contains characters not allowed in a header".to_string())?),
            None => None,
        };
        let channel = endpoint.connect_lazy();
        Ok(Self { client: WorkerServiceClient::with_interceptor(channel, BearerToken(token)) })
    }
}

#[async_trait]
impl CoordinatorLink for GrpcLink {
    async fn register(&self, req: v1::RegisterRequest) -> Result<v1::RegisterResponse, Status> {
        self.client.clone().register(req).await.map(tonic::Response::into_inner)
    }
    async fn lease(&self, req: v1::LeaseRequest) -> Result<v1::LeaseResponse, Status> {
        self.client.clone().lease(req).await.map(tonic::Response::into_inner)
    }
    async fn heartbeat(&self, req: v1::HeartbeatRequest) -> Result<v1::HeartbeatResponse, Status> {
        self.client.clone().heartbeat(req).await.map(tonic::Response::into_inner)
    }
    async fn complete(&self, req: v1::CompleteRequest) -> Result<v1::CompleteResponse, Status> {
        self.client.clone().complete(req).await.map(tonic::Response::into_inner)
    }
    async fn fail(&self, req: v1::FailRequest) -> Result<v1::FailResponse, Status> {
        self.client.clone().fail(req).await.map(tonic::Response::into_inner)
    }
}

/// Whether a failed call is worth repeating: the coordinator (or its database) is unreachable or busy.
pub fn is_retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Internal
    )
}
