//! `fresco worker`: lease a batch, run the sampler pipeline, upload images and sidecars, report — crash-safe
//! and keeping the accelerator busy.
//!
//! Two stages run concurrently: the generator (lease → denoise, on a blocking thread) and the uploader
//! (encode → upload → complete). While one batch uploads, the next one denoises. A single heartbeat loop
//! extends every lease the worker holds in either stage and cancels work the coordinator says is
//! cancelled or lost. Completion is reported only after every object is durable in the store.

pub mod link;
pub mod metrics;
pub mod models;
pub mod output;
mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fresco_proto::v1;
use tokio_util::sync::CancellationToken;

pub use link::{CoordinatorLink, GrpcLink};
pub use metrics::WorkerMetrics;
pub use models::ModelRegistry;
pub use output::{OutputLocation, Outputs};

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub name: String,
    pub device: String,
    /// Largest batch one forward pass runs; bigger tasks are split.
    pub max_batch: u32,
    /// Long-poll wait per Lease call.
    pub lease_wait: Duration,
    /// Longest an upload is retried before the task is reported as a retryable failure.
    pub upload_deadline: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: "worker".into(),
            device: "cpu".into(),
            max_batch: 8,
            lease_wait: Duration::from_secs(10),
            upload_deadline: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("registration refused: {0}")]
    Register(tonic::Status),
}

/// A lease the worker holds, with the switch that stops its work.
#[derive(Clone)]
pub(crate) struct Held {
    pub token: String,
    pub stop: CancellationToken,
}

pub struct Worker {
    pub(crate) config: WorkerConfig,
    pub(crate) link: Arc<dyn CoordinatorLink>,
    pub(crate) models: Arc<ModelRegistry>,
    pub(crate) outputs: Outputs,
    pub metrics: Arc<WorkerMetrics>,
    pub(crate) held: Mutex<HashMap<i64, Held>>,
}

/// Exponential backoff for calls to the coordinator and the object store.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new() -> Self {
        Self { next: Duration::from_millis(200), max: Duration::from_secs(10) }
    }

    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let jitter = 0.75 + rand::random::<f64>() * 0.5;
        let d = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(self.max);
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop.cancelled() => false,
        }
    }
}

impl Worker {
    pub fn new(config: WorkerConfig, link: Arc<dyn CoordinatorLink>, models: Arc<ModelRegistry>) -> Arc<Self> {
        Arc::new(Self {
            config,
            link,
            models,
            outputs: Outputs::default(),
            metrics: Arc::new(WorkerMetrics::new()),
            held: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn held(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until `shutdown` fires, then drains: no new leases, the batch in hand is finished and reported.
    /// `abort` (a second signal) stops everything at once; unreported leases then expire and are redone.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, abort: CancellationToken) -> Result<(), WorkerError> {
        let register = v1::RegisterRequest {
            name: self.config.name.clone(),
            models: self.models.names(),
            device: self.config.device.clone(),
            max_batch: self.config.max_batch,
        };
        let mut backoff = Backoff::new();
        let reg = loop {
            match self.link.register(register.clone()).await {
                Ok(r) => break r,
                Err(s) if link::is_retryable(&s) => {
                    tracing::warn!(error = %s.message(), "coordinator unreachable; retrying registration");
                    if !backoff.wait(&shutdown).await {
                        return Ok(());
                    }
                }
                Err(s) => return Err(WorkerError::Register(s)),
            }
        };
        let heartbeat_every = Duration::from_millis(reg.heartbeat_interval_ms.max(100) as u64);
        tracing::info!(worker = %self.config.name, models = ?register.models, ?heartbeat_every, "worker registered");

        let beats = tokio::spawn(self.clone().heartbeat_loop(heartbeat_every, abort.clone()));
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let uploader = tokio::spawn(self.clone().upload_loop(rx, abort.clone()));
        self.clone().generate_loop(tx, shutdown.clone(), abort.clone()).await;
        // Generation stopped; let the uploader finish what it has, then stop heartbeats.
        let _ = uploader.await;
        abort.cancel();
        let _ = beats.await;
        tracing::info!(worker = %self.config.name, "worker stopped");
        Ok(())
    }

    async fn heartbeat_loop(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let leases: Vec<v1::HeldLease> =
                self.held().iter().map(|(id, h)| v1::HeldLease { task_id: *id, lease_token: h.token.clone() }).collect();
            match self.link.heartbeat(v1::HeartbeatRequest { worker: self.config.name.clone(), leases }).await {
                Ok(r) => {
                    let held = self.held();
                    for (id, why) in r.cancelled.iter().map(|i| (i, "cancelled")).chain(r.lost.iter().map(|i| (i, "lost"))) {
                        if let Some(h) = held.get(id) {
                            tracing::info!(task = id, why, "dropping task");
                            h.stop.cancel();
                        }
                    }
                }
                Err(s) => tracing::warn!(error = %s.message(), "heartbeat failed; will retry"),
            }
        }
    }
}
