//! The coordinator: gRPC services for clients and workers over any [`JobStore`], the lease sweeper, bearer
//! token auth, and the Prometheus metrics operators autoscale on. It knows nothing about SQL.

pub mod auth;
mod error;
mod jobs;
pub mod metrics;
pub mod server;
mod sweeper;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use fresco_store::JobStore;
use tokio::sync::Notify;

pub use error::status_from_store;
pub use jobs::JobServiceImpl;
pub use metrics::Metrics;
pub use sweeper::run_sweeper;
pub use workers::WorkerServiceImpl;

/// Queue timings and limits. Defaults suit GPU batches of seconds to minutes.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// How long a lease lasts without a heartbeat.
    pub lease_ttl: Duration,
    /// How often workers are told to heartbeat (well under the TTL).
    pub heartbeat_interval: Duration,
    /// How often expired leases are swept.
    pub sweep_interval: Duration,
    /// Longest a Lease long-poll waits for work.
    pub max_lease_wait: Duration,
    pub default_batch_size: u32,
    pub default_max_attempts: u32,
    /// A worker counts as live if seen within this window.
    pub worker_live_window: Duration,
    /// Upper bound on prompts in one job.
    pub max_prompts_per_job: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(10),
            sweep_interval: Duration::from_secs(5),
            max_lease_wait: Duration::from_secs(20),
            default_batch_size: 8,
            default_max_attempts: 5,
            worker_live_window: Duration::from_secs(60),
            max_prompts_per_job: 50_000_000,
        }
    }
}

/// State shared by the services: the store, config, metrics, and a wake-up for long-polling lessees.
pub struct Coordinator {
    pub store: Arc<dyn JobStore>,
    pub config: CoordinatorConfig,
    pub metrics: Metrics,
    /// Signalled when new work may be available (submission, retry, requeue).
    pub work_available: Notify,
}

impl Coordinator {
    pub fn new(store: Arc<dyn JobStore>, config: CoordinatorConfig) -> Arc<Self> {
        Arc::new(Self { store, config, metrics: Metrics::new(), work_available: Notify::new() })
    }
}
