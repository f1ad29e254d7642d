//! The two stages of a task's life on a worker: generation and upload + report.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use fresco_core::ImageFormat;
use fresco_pipeline::{GeneratedImage, ParametersText, PipelineError, Request};
use fresco_proto::{params_from_proto, v1};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::link::is_retryable;
use crate::{Backoff, Held, Worker};

/// A generated batch on its way to the uploader.
pub(crate) struct Generated {
    task: v1::Task,
    stop: CancellationToken,
    images: Vec<GeneratedImage>,
    resolved: fresco_pipeline::Resolved,
    timings: serde_json::Value,
}

enum Outcome {
    Fail { message: String, retryable: bool },
    Dropped,
}

impl Worker {
    pub(crate) async fn generate_loop(self: Arc<Self>, tx: mpsc::Sender<Generated>, shutdown: CancellationToken, abort: CancellationToken) {
        let mut backoff = Backoff::new();
        while !shutdown.is_cancelled() {
            let req = v1::LeaseRequest {
                worker: self.config.name.clone(),
                models: self.models.names(),
                loaded_model: self.models.loaded_name().unwrap_or_default(),
                max_batch: self.config.max_batch,
                wait_ms: self.config.lease_wait.as_millis() as u32,
            };
            let leased = tokio::select! {
                r = self.link.lease(req) => r,
                _ = shutdown.cancelled() => break,
            };
            let task = match leased {
                Ok(v1::LeaseResponse { task: Some(t) }) => t,
                Ok(_) => continue,
                Err(s) => {
                    tracing::warn!(error = %s.message(), "lease failed; retrying");
                    if !backoff.wait(&shutdown).await {
                        break;
                    }
                    continue;
                }
            };
            backoff = Backoff::new();
            // A drain (shutdown) finishes this batch; only abort or the coordinator stops it.
            let stop = abort.child_token();
            self.held().insert(task.task_id, Held { token: task.lease_token.clone(), stop: stop.clone() });
            tracing::info!(task = task.task_id, job = %task.job_id, prompts = task.prompts.len(), attempt = task.attempt, "generating");
            match self.clone().generate(task.clone(), stop.clone()).await {
                Ok(g) => {
                    if tx.send(g).await.is_err() {
                        break;
                    }
                }
                Err(Outcome::Dropped) => {
                    self.held().remove(&task.task_id);
                    self.metrics.tasks.with_label_values(&["dropped"]).inc();
                }
                Err(Outcome::Fail { message, retryable }) => self.report_failure(&task, message, retryable, &abort).await,
            }
        }
    }

    async fn generate(self: Arc<Self>, task: v1::Task, stop: CancellationToken) -> Result<Generated, Outcome> {
        let worker = self.clone();
        let stop2 = stop.clone();
        let t = task.clone();
        let result = tokio::task::spawn_blocking(move || worker.generate_blocking(&t, &stop2)).await;
        match result {
            Ok(Ok((images, resolved, timings))) => Ok(Generated { task, stop, images, resolved, timings }),
            Ok(Err(PipelineError::Cancelled)) => Err(Outcome::Dropped),
            Ok(Err(e)) => Err(Outcome::Fail { retryable: !e.is_permanent(), message: e.to_string() }),
            Err(e) => Err(Outcome::Fail { retryable: true, message: format!("generation crashed: {e}") }),
        }
    }

    fn generate_blocking(
        &self,
        task: &v1::Task,
        stop: &CancellationToken,
    ) -> Result<(Vec<GeneratedImage>, fresco_pipeline::Resolved, serde_json::Value), PipelineError> {
        let started = Instant::now();
        let pipe = self.models.get(&task.model)?;
        let load = started.elapsed();
        let params = params_from_proto(task.params.clone()).map_err(|e| PipelineError::param(&e.field, e.message))?;
        let mut images = Vec::with_capacity(task.prompts.len());
        let (mut encode, mut denoise, mut decode) = (0.0, 0.0, 0.0);
        let mut resolved = None;
        for chunk in task.prompts.chunks(self.config.max_batch.max(1) as usize) {
            let mut req = Request::new(chunk.iter().map(|p| p.prompt.clone()).collect(), chunk.iter().map(|p| p.seed).collect());
            req.negative_prompts = chunk.iter().map(|p| p.negative_prompt.clone()).collect();
            req.steps = params.steps.map(|s| s as usize);
            req.guidance = params.guidance.map(f64::from);
            req.width = params.width.map(|w| w as usize);
            req.height = params.height.map(|h| h as usize);
            req.scheduler = params.scheduler.clone();
            resolved = Some(pipe.resolve(&req)?);
            let (imgs, t) = pipe.generate_cancellable(&req, &|| stop.is_cancelled())?;
            encode += t.encode.as_secs_f64();
            denoise += t.denoise.as_secs_f64();
            decode += t.decode.as_secs_f64();
            images.extend(imgs);
        }
        let m = &self.metrics;
        m.stage_seconds.with_label_values(&["load"]).observe(load.as_secs_f64());
        m.stage_seconds.with_label_values(&["encode_text"]).observe(encode);
        m.stage_seconds.with_label_values(&["denoise"]).observe(denoise);
        m.stage_seconds.with_label_values(&["decode"]).observe(decode);
        m.add_model_time(encode + denoise + decode);
        let resolved = resolved.ok_or_else(|| PipelineError::param("prompts", "task has no prompts"))?;
        let timings = json!({"load_s": load.as_secs_f64(), "encode_text_s": encode, "denoise_s": denoise, "decode_s": decode});
        Ok((images, resolved, timings))
    }

    pub(crate) async fn upload_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Generated>, abort: CancellationToken) {
        while let Some(g) = rx.recv().await {
            let task = g.task.clone();
            match self.upload_and_complete(g, &abort).await {
                Ok(()) => {}
                Err(Outcome::Dropped) => self.metrics.tasks.with_label_values(&["dropped"]).inc(),
                Err(Outcome::Fail { message, retryable }) => {
                    self.report_failure(&task, message, retryable, &abort).await;
                    continue;
                }
            }
            self.held().remove(&task.task_id);
        }
    }

    async fn upload_and_complete(&self, g: Generated, abort: &CancellationToken) -> Result<(), Outcome> {
        let started = Instant::now();
        let task = &g.task;
        let params = params_from_proto(task.params.clone()).map_err(|e| Outcome::Fail { message: e.to_string(), retryable: false })?;
        let location =
            self.outputs.get(&task.output_url).map_err(|e| Outcome::Fail { retryable: !e.is_permanent(), message: e.to_string() })?;
        let format = params.format;
        let r = g.resolved;
        // Encoding is CPU work: keep it off the async threads, and it overlaps the next batch's denoising.
        let encoded = {
            let (task, images, timings, worker) = (task.clone(), g.images, g.timings.clone(), self.config.name.clone());
            tokio::task::spawn_blocking(move || encode_all(&task, &images, format, &r, &timings, &worker))
                .await
                .map_err(|e| Outcome::Fail { message: format!("encoding crashed: {e}"), retryable: true })?
                .map_err(|e| Outcome::Fail { message: e.to_string(), retryable: false })?
        };
        let encode_s = started.elapsed().as_secs_f64();
        let deadline = Instant::now() + self.config.upload_deadline;
        let mut results = Vec::with_capacity(encoded.len());
        for e in encoded {
            for (key, bytes) in [(&e.prompt.image_key, e.image.clone()), (&e.prompt.sidecar_key, e.sidecar.clone())] {
                let mut backoff = Backoff::new();
                loop {
                    if g.stop.is_cancelled() {
                        return Err(Outcome::Dropped);
                    }
                    match location.put(key, bytes.clone()).await {
                        Ok(()) => break,
                        Err(err) if Instant::now() < deadline => {
                            tracing::warn!(task = task.task_id, key = %key, error = %err, "upload failed; retrying");
                            if !backoff.wait(&g.stop).await {
                                return Err(Outcome::Dropped);
                            }
                        }
                        Err(err) => return Err(Outcome::Fail { message: err.to_string(), retryable: true }),
                    }
                }
            }
            results.push(v1::PromptResult {
                index: e.prompt.index,
                object_key: e.prompt.image_key.clone(),
                url: location.url_of(&e.prompt.image_key),
                sha256: e.sha256,
                bytes: e.image.len() as u64,
                metadata_json: e.metadata.to_string(),
            });
        }
        self.metrics.stage_seconds.with_label_values(&["encode_image"]).observe(encode_s);
        self.metrics.stage_seconds.with_label_values(&["upload"]).observe(started.elapsed().as_secs_f64() - encode_s);
        let n = results.len() as u64;
        let req =
            v1::CompleteRequest { worker: self.config.name.clone(), task_id: task.task_id, lease_token: task.lease_token.clone(), results };
        let mut backoff = Backoff::new();
        loop {
            match self.link.complete(req.clone()).await {
                Ok(_) => {
                    self.metrics.images.inc_by(n);
                    self.metrics.tasks.with_label_values(&["succeeded"]).inc();
                    tracing::info!(task = task.task_id, job = %task.job_id, images = n, "task complete");
                    return Ok(());
                }
                Err(s) if is_retryable(&s) => {
                    tracing::warn!(task = task.task_id, error = %s.message(), "complete failed; retrying");
                    if !backoff.wait(abort).await {
                        return Err(Outcome::Dropped);
                    }
                }
                Err(s) => {
                    // Lease lost or job cancelled: someone else owns the task now; the objects we wrote
                    // are byte-identical to theirs, so nothing needs cleaning up.
                    tracing::info!(task = task.task_id, error = %s.message(), "completion refused; dropping");
                    return Err(Outcome::Dropped);
                }
            }
        }
    }

    async fn report_failure(&self, task: &v1::Task, message: String, retryable: bool, abort: &CancellationToken) {
        tracing::warn!(task = task.task_id, retryable, %message, "task failed");
        self.metrics.tasks.with_label_values(&[if retryable { "failed_retryable" } else { "failed_permanent" }]).inc();
        let req = v1::FailRequest {
            worker: self.config.name.clone(),
            task_id: task.task_id,
            lease_token: task.lease_token.clone(),
            message,
            retryable,
        };
        let mut backoff = Backoff::new();
        loop {
            match self.link.fail(req.clone()).await {
                Err(s) if is_retryable(&s) => {
                    if !backoff.wait(abort).await {
                        break;
                    }
                }
                _ => break,
            }
        }
        self.held().remove(&task.task_id);
    }
}

fn encode_all(
    task: &v1::Task,
    images: &[GeneratedImage],
    format: ImageFormat,
    r: &fresco_pipeline::Resolved,
    timings: &serde_json::Value,
    worker: &str,
) -> Result<Vec<Encoded>, fresco_pipeline::PipelineError> {
    task.prompts
        .iter()
        .zip(images)
        .map(|(p, img)| {
            // The image bytes depend only on the prompt's parameters, never on the worker or the attempt,
            // so a retry rewrites identical objects.
            let text = ParametersText {
                prompt: &p.prompt,
                negative_prompt: p.negative_prompt.as_deref(),
                steps: r.steps,
                scheduler: r.scheduler.name(),
                guidance: r.guidance,
                late_guidance: r.late_guidance,
                seed: Some(p.seed),
                width: r.width,
                height: r.height,
                model: &task.model,
            }
            .to_string();
            let image = Bytes::from(img.encode(format, Some(&text))?);
            let sha256 = hex::encode(Sha256::digest(&image));
            let metadata = json!({
                "job_id": task.job_id,
                "index": p.index,
                "prompt": p.prompt,
                "negative_prompt": p.negative_prompt,
                "seed": p.seed,
                "model": task.model,
                "scheduler": r.scheduler.name(),
                "steps": r.steps,
                "guidance": r.guidance,
                "late_guidance": r.late_guidance.map(|l| json!({ "scale": l.scale, "below_timestep": l.below_timestep })),
                "width": r.width,
                "height": r.height,
                "format": format.to_string(),
                "sha256": sha256,
                "worker": worker,
                "attempt": task.attempt,
                "timings": timings,
                "extra": p.extra,
            });
            let sidecar = Bytes::from(serde_json::to_vec_pretty(&metadata).unwrap_or_default());
            Ok(Encoded { prompt: p.clone(), image, sidecar, sha256, metadata })
        })
        .collect()
}

struct Encoded {
    prompt: v1::LeasedPrompt,
    image: Bytes,
    sidecar: Bytes,
    sha256: String,
    metadata: serde_json::Value,
}
