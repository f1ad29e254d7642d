//! The worker loop against an in-memory coordinator (a fake `CoordinatorLink`) and a local output folder:
//! report only after upload, drop cancelled work, report permanent failures as such, retry registration.
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fresco_pipeline::DeviceSpec;
use fresco_proto::v1;
use fresco_worker::{CoordinatorLink, ModelRegistry, Worker, WorkerConfig};
use sha2::Digest;
use tokio_util::sync::CancellationToken;
use tonic::Status;

#[derive(Default)]
struct Fake {
    out: PathBuf,
    register_failures: Mutex<u32>,
    tasks: Mutex<VecDeque<v1::Task>>,
    cancel: Mutex<Vec<i64>>,
    completes: Mutex<Vec<v1::CompleteRequest>>,
    fails: Mutex<Vec<v1::FailRequest>>,
    /// Objects present on disk at the moment each completion arrived.
    durable_at_complete: Mutex<Vec<bool>>,
}

#[tonic::async_trait]
impl CoordinatorLink for Fake {
    async fn register(&self, _: v1::RegisterRequest) -> Result<v1::RegisterResponse, Status> {
        let mut f = self.register_failures.lock().unwrap();
        if *f > 0 {
            *f -= 1;
            return Err(Status::unavailable("coordinator restarting"));
        }
        Ok(v1::RegisterResponse { lease_ttl_ms: 10_000, heartbeat_interval_ms: 50 })
    }
    async fn lease(&self, _: v1::LeaseRequest) -> Result<v1::LeaseResponse, Status> {
        let task = self.tasks.lock().unwrap().pop_front();
        if task.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(v1::LeaseResponse { task })
    }
    async fn heartbeat(&self, req: v1::HeartbeatRequest) -> Result<v1::HeartbeatResponse, Status> {
        let cancel = self.cancel.lock().unwrap();
        Ok(v1::HeartbeatResponse { cancelled: req.leases.iter().map(|l| l.task_id).filter(|t| cancel.contains(t)).collect(), lost: vec![] })
    }
    async fn complete(&self, req: v1::CompleteRequest) -> Result<v1::CompleteResponse, Status> {
        let durable = req.results.iter().all(|r| {
            let image = self.out.join(&r.object_key);
            let sidecar = image.with_extension("json");
            std::fs::read(&image).map(|b| hex::encode(sha2::Sha256::digest(&b)) == r.sha256).unwrap_or(false) && sidecar.is_file()
        });
        self.durable_at_complete.lock().unwrap().push(durable);
        self.completes.lock().unwrap().push(req);
        Ok(v1::CompleteResponse {})
    }
    async fn fail(&self, req: v1::FailRequest) -> Result<v1::FailResponse, Status> {
        self.fails.lock().unwrap().push(req);
        Ok(v1::FailResponse { will_retry: false })
    }
}

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-sd15")
}

fn task(id: i64, out: &Path, n: u64, steps: u32, scheduler: Option<&str>) -> v1::Task {
    let job = uuid::Uuid::new_v4().to_string();
    v1::Task {
        task_id: id,
        job_id: job.clone(),
        lease_token: uuid::Uuid::new_v4().to_string(),
        attempt: 1,
        model: "tiny-sd15".into(),
        params: Some(v1::GenerationParams {
            steps: Some(steps),
            scheduler: scheduler.map(str::to_string),
            format: "png".into(),
            ..Default::default()
        }),
        output_url: out.to_str().unwrap().to_string(),
        prompts: (0..n)
            .map(|i| v1::LeasedPrompt {
                index: i,
                prompt: format!("prompt {i}"),
                negative_prompt: None,
                seed: i + 1,
                extra: Default::default(),
                image_key: format!("{job}/{i:08}.png"),
                sidecar_key: format!("{job}/{i:08}.json"),
            })
            .collect(),
        lease_expires_at_ms: 0,
    }
}

/// Runs a worker until `done` says so (or 60 s pass), then drains it.
async fn run_until(fake: Arc<Fake>, done: impl Fn(&Fake) -> bool) {
    let registry = Arc::new(ModelRegistry::single("tiny-sd15".into(), model_dir(), DeviceSpec::Cpu));
    let config = WorkerConfig { name: "test".into(), lease_wait: Duration::from_millis(50), max_batch: 2, ..Default::default() };
    let worker = Worker::new(config, fake.clone(), registry);
    let (drain, abort) = (CancellationToken::new(), CancellationToken::new());
    let handle = tokio::spawn(worker.run(drain.clone(), abort.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&fake) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drain.cancel();
    tokio::time::timeout(Duration::from_secs(60), handle).await.expect("worker drained").unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_complete_only_after_objects_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake { out: dir.path().to_path_buf(), register_failures: Mutex::new(2), ..Default::default() });
    fake.tasks.lock().unwrap().extend([task(1, dir.path(), 3, 3, None), task(2, dir.path(), 1, 3, None)]);
    run_until(fake.clone(), |f| f.completes.lock().unwrap().len() == 2).await;
    let completes = fake.completes.lock().unwrap();
    assert_eq!(completes.iter().map(|c| c.task_id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(completes[0].results.len(), 3, "a 3-prompt task split into forwards of 2 still reports every prompt");
    assert_eq!(*fake.durable_at_complete.lock().unwrap(), vec![true, true]);
    let meta: serde_json::Value = serde_json::from_str(&completes[0].results[1].metadata_json).unwrap();
    assert_eq!(meta["seed"], 2);
    assert_eq!(meta["worker"], "test");
    assert!(fake.fails.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_work_is_dropped_unreported() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake { out: dir.path().to_path_buf(), ..Default::default() });
    // Long enough to be mid-generation when the heartbeat answers "cancelled".
    fake.tasks.lock().unwrap().extend([task(7, dir.path(), 2, 1000, Some("ddim")), task(8, dir.path(), 1, 2, None)]);
    fake.cancel.lock().unwrap().push(7);
    run_until(fake.clone(), |f| !f.completes.lock().unwrap().is_empty()).await;
    let completes = fake.completes.lock().unwrap();
    assert_eq!(completes.iter().map(|c| c.task_id).collect::<Vec<_>>(), vec![8], "the cancelled task must not be reported");
    assert!(fake.fails.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_a_permanent_failure() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(Fake { out: dir.path().to_path_buf(), ..Default::default() });
    // flow-euler is for flow-matching models; an SD U-Net can never run it.
    fake.tasks.lock().unwrap().push_back(task(3, dir.path(), 1, 2, Some("flow-euler")));
    run_until(fake.clone(), |f| !f.fails.lock().unwrap().is_empty()).await;
    let fails = fake.fails.lock().unwrap();
    assert_eq!(fails.len(), 1);
    assert!(!fails[0].retryable);
    assert!(fails[0].message.contains("scheduler"), "{}", fails[0].message);
    assert!(fake.completes.lock().unwrap().is_empty());
}
