//! Worker metrics: duty cycle (time inside the model / wall time), per-stage timings, outcomes.

use std::time::Instant;

use prometheus::{Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};

pub struct WorkerMetrics {
    registry: Registry,
    started: Instant,
    model_seconds: Gauge,
    duty_cycle: Gauge,
    pub stage_seconds: HistogramVec,
    pub tasks: IntCounterVec,
    pub images: prometheus::IntCounter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    #[allow(clippy::expect_used)] // static metric definitions: a failure is a programming error
    pub fn new() -> Self {
        let registry = Registry::new();
        let model_seconds =
            Gauge::new("fresco_worker_model_seconds_total", "Seconds spent inside the model (encode, denoise, decode)").expect("metric");
        let duty_cycle = Gauge::new("fresco_worker_duty_cycle", "Time inside the model divided by wall time since start").expect("metric");
        let buckets = vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
        let stage_seconds = HistogramVec::new(
            HistogramOpts::new("fresco_worker_stage_seconds", "Seconds per batch in each stage").buckets(buckets),
            &["stage"],
        )
        .expect("metric");
        let tasks = IntCounterVec::new(Opts::new("fresco_worker_tasks_total", "Tasks by outcome"), &["outcome"]).expect("metric");
        let images = prometheus::IntCounter::new("fresco_worker_images_total", "Images uploaded and reported").expect("metric");
        for m in [
            Box::new(model_seconds.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duty_cycle.clone()),
            Box::new(stage_seconds.clone()),
            Box::new(tasks.clone()),
            Box::new(images.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        Self { registry, started: Instant::now(), model_seconds, duty_cycle, stage_seconds, tasks, images }
    }

    pub fn add_model_time(&self, seconds: f64) {
        self.model_seconds.add(seconds);
    }

    pub fn duty_cycle(&self) -> f64 {
        let wall = self.started.elapsed().as_secs_f64();
        if wall > 0.0 {
            (self.model_seconds.get() / wall).min(1.0)
        } else {
            0.0
        }
    }

    pub fn render(&self) -> String {
        self.duty_cycle.set(self.duty_cycle());
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
