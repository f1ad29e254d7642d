//! Prometheus metrics: queue depth per model (what autoscalers read), leased tasks, completions, failures,
//! lease expirations, live workers and per-job progress. Gauges that mirror the database are refreshed on
//! each scrape, so every coordinator replica reports the same queue.

use prometheus::{Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::Coordinator;

pub struct Metrics {
    registry: Registry,
    queue_tasks: IntGaugeVec,
    queue_prompts: IntGaugeVec,
    leased_tasks: IntGaugeVec,
    live_workers: IntGauge,
    live_workers_by_model: IntGaugeVec,
    job_progress: GaugeVec,
    pub completed_tasks: IntCounter,
    pub completed_prompts: IntCounter,
    pub failures: IntCounterVec,
    pub leases: IntCounter,
    pub lease_expirations: IntCounter,
    pub quarantined: IntCounter,
    pub submitted_prompts: IntCounter,
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[allow(clippy::expect_used)] // static metric definitions: a failure is a programming error
    pub fn new() -> Self {
        let r = Registry::new();
        let live_workers = IntGauge::new("fresco_live_workers", "Workers seen within the liveness window").expect("valid metric");
        r.register(Box::new(live_workers.clone())).expect("unique metric");
        let job_progress =
            GaugeVec::new(Opts::new("fresco_job_progress", "Fraction of an active job's prompts that ended"), &["job_id", "model"])
                .expect("valid metric");
        r.register(Box::new(job_progress.clone())).expect("unique metric");
        let failures = IntCounterVec::new(Opts::new("fresco_task_failures_total", "Task failures reported by workers"), &["retryable"])
            .expect("valid metric");
        r.register(Box::new(failures.clone())).expect("unique metric");
        Self {
            queue_tasks: gauge_vec(&r, "fresco_queue_depth_tasks", "Pending tasks (batches) per model", &["model"]),
            queue_prompts: gauge_vec(&r, "fresco_queue_depth_prompts", "Pending prompts per model", &["model"]),
            leased_tasks: gauge_vec(&r, "fresco_leased_tasks", "Tasks currently leased per model", &["model"]),
            live_workers_by_model: gauge_vec(&r, "fresco_live_workers_by_model", "Live workers serving each model", &["model"]),
            completed_tasks: counter(&r, "fresco_completed_tasks_total", "Tasks completed (this replica)"),
            completed_prompts: counter(&r, "fresco_completed_prompts_total", "Images completed (this replica)"),
            leases: counter(&r, "fresco_leases_total", "Tasks leased (this replica)"),
            lease_expirations: counter(
                &r,
                "fresco_lease_expirations_total",
                "Leases that expired and were requeued (this replica's sweeps)",
            ),
            quarantined: counter(&r, "fresco_quarantined_tasks_total", "Tasks failed after losing too many leases"),
            submitted_prompts: counter(&r, "fresco_submitted_prompts_total", "Prompts accepted (this replica)"),
            live_workers,
            job_progress,
            failures,
            registry: r,
        }
    }

    /// Refreshes database-backed gauges and renders the text exposition format.
    pub async fn render(&self, c: &Coordinator) -> String {
        if let Err(e) = self.refresh(c).await {
            tracing::warn!(error = %e, "metrics refresh failed");
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    async fn refresh(&self, c: &Coordinator) -> fresco_store::StoreResult<()> {
        let depth = c.store.queue_depth().await?;
        for g in [&self.queue_tasks, &self.queue_prompts, &self.leased_tasks, &self.live_workers_by_model] {
            g.reset();
        }
        for d in &depth {
            self.queue_tasks.with_label_values(&[&d.model]).set(d.pending_tasks as i64);
            self.queue_prompts.with_label_values(&[&d.model]).set(d.pending_prompts as i64);
            self.leased_tasks.with_label_values(&[&d.model]).set(d.leased_tasks as i64);
        }
        let workers = c.store.live_workers(c.config.worker_live_window).await?;
        self.live_workers.set(workers.len() as i64);
        for w in &workers {
            for m in &w.models {
                self.live_workers_by_model.with_label_values(&[m]).inc();
            }
        }
        self.job_progress.reset();
        for state in [fresco_core::JobState::Queued, fresco_core::JobState::Running] {
            let jobs = c.store.list_jobs(&fresco_store::JobFilter { state: Some(state), limit: 200, ..Default::default() }).await?;
            for j in jobs {
                let done = j.counts.succeeded + j.counts.failed + j.counts.cancelled;
                let p = if j.total == 0 { 0.0 } else { done as f64 / j.total as f64 };
                self.job_progress.with_label_values(&[&j.id.to_string(), &j.model]).set(p);
            }
        }
        Ok(())
    }
}
