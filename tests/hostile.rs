//! 10,000 malformed, oversized and out-of-range gRPC requests against a live coordinator: no crash,
//! bounded memory, the right status code for each, and nothing written.
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use fresco_e2e::*;
use fresco_proto::v1;
use fresco_proto::v1::job_service_client::JobServiceClient;
use fresco_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::Channel;
use tonic::Code;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

/// A small deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn junk(&mut self, max: usize) -> String {
        let n = self.below(max as u64 + 1) as usize;
        (0..n).map(|_| char::from_u32(self.below(0x2FFF) as u32 + 1).unwrap_or('?')).collect()
    }
}

fn header(model: String, output: String, params: v1::GenerationParams) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        kind: Some(v1::submit_job_request::Kind::Header(v1::SubmitJobHeader {
            model,
            output_url: output,
            params: Some(params),
            ..Default::default()
        })),
    }
}

fn chunk(prompts: Vec<String>) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        kind: Some(v1::submit_job_request::Kind::Chunk(v1::PromptChunk {
            prompts: prompts.into_iter().map(|text| v1::Prompt { text, overrides: None }).collect(),
        })),
    }
}

/// One hostile request; returns (what it was, the code it got, the code it should get).
async fn one(
    i: u64,
    rng: &mut Rng,
    jobs: &mut JobServiceClient<Channel>,
    workers: &mut WorkerServiceClient<Channel>,
) -> (String, Code, Code) {
    let ok_header = || header("tiny-sd15".into(), "s3://b/p".into(), v1::GenerationParams::default());
    let code = |r: Result<tonic::Code, tonic::Status>| match r {
        Ok(c) => c,
        Err(s) => s.code(),
    };
    match i % 14 {
        0 => {
            let id = rng.junk(40);
            (format!("GetJob({id:?})"), code(jobs.get_job(v1::GetJobRequest { job_id: id }).await.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        1 => {
            let id = uuid::Uuid::new_v4().to_string();
            ("GetJob(unknown)".into(), code(jobs.get_job(v1::GetJobRequest { job_id: id }).await.map(|_| Code::Ok)), Code::NotFound)
        }
        2 => {
            let model = format!("{} {}", rng.junk(10), "!");
            let r = jobs
                .submit_job(futures::stream::iter(vec![header(model, "s3://b/p".into(), Default::default()), chunk(vec!["a".into()])]))
                .await;
            ("SubmitJob(bad model)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        3 => {
            let url = format!("{}://{}", ["ftp", "", "http", "s3"][rng.below(4) as usize], if rng.below(2) == 0 { "" } else { "/x" });
            let r = jobs
                .submit_job(futures::stream::iter(vec![header("m".into(), url.clone(), Default::default()), chunk(vec!["a".into()])]))
                .await;
            (format!("SubmitJob(output {url:?})"), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        4 => {
            let p = match rng.below(5) {
                0 => v1::GenerationParams { steps: Some([0, 1001, u32::MAX][rng.below(3) as usize]), ..Default::default() },
                1 => v1::GenerationParams { width: Some([0, 13, 4104, u32::MAX][rng.below(4) as usize]), ..Default::default() },
                2 => v1::GenerationParams {
                    guidance: Some([f32::NAN, -1.0, 1e9, f32::INFINITY][rng.below(4) as usize]),
                    ..Default::default()
                },
                3 => v1::GenerationParams { scheduler: Some(rng.junk(12) + "x"), ..Default::default() },
                _ => v1::GenerationParams { format: "gif".into(), ..Default::default() },
            };
            let r = jobs
                .submit_job(futures::stream::iter(vec![header("m".into(), "s3://b/p".into(), p.clone()), chunk(vec!["a".into()])]))
                .await;
            (format!("SubmitJob({p:?})"), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        5 => {
            // Oversized or empty prompts after valid ones: the whole submission is refused.
            let bad = if rng.below(2) == 0 { "x".repeat(5000 + rng.below(100_000) as usize) } else { " \t ".into() };
            let r = jobs.submit_job(futures::stream::iter(vec![ok_header(), chunk(vec!["fine".into(), bad])])).await;
            ("SubmitJob(oversized/empty prompt)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        6 => {
            let r = jobs.submit_job(futures::stream::iter(vec![chunk(vec!["a".into()])])).await;
            ("SubmitJob(no header)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        7 => {
            let r =
                jobs.list_jobs(v1::ListJobsRequest { state: 50 + rng.below(1000) as i32, page_size: 0, page_token: String::new() }).await;
            ("ListJobs(bad state)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        8 => {
            let r = jobs
                .list_outputs(v1::ListOutputsRequest {
                    job_id: uuid::Uuid::new_v4().to_string(),
                    page_size: rng.below(100_000) as u32,
                    page_token: "x".repeat(rng.below(20) as usize + 1),
                })
                .await;
            ("ListOutputs(bad page token)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        9 => {
            let r = workers.lease(v1::LeaseRequest { worker: rng.junk(3), models: vec![], ..Default::default() }).await;
            ("Lease(no models)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        10 => {
            let r = workers
                .lease(v1::LeaseRequest { worker: "w".into(), models: vec![format!("../{}", rng.junk(5))], ..Default::default() })
                .await;
            ("Lease(bad model name)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        11 => {
            let lease = v1::HeldLease { task_id: rng.next() as i64, lease_token: rng.junk(30) + "-" };
            let r = workers.heartbeat(v1::HeartbeatRequest { worker: "w".into(), leases: vec![lease] }).await;
            ("Heartbeat(bad token)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        12 => {
            let result = v1::PromptResult {
                index: 0,
                object_key: "k".into(),
                url: "u".into(),
                sha256: rng.junk(64),
                bytes: 1,
                metadata_json: "{".into(),
            };
            let r = workers
                .complete(v1::CompleteRequest {
                    worker: "w".into(),
                    task_id: rng.next() as i64,
                    lease_token: uuid::Uuid::new_v4().to_string(),
                    results: vec![result],
                })
                .await;
            ("Complete(malformed result)".into(), code(r.map(|_| Code::Ok)), Code::InvalidArgument)
        }
        _ => {
            let r = workers
                .fail(v1::FailRequest {
                    worker: "w".into(),
                    task_id: rng.next() as i64,
                    lease_token: uuid::Uuid::new_v4().to_string(),
                    message: rng.junk(10_000),
                    retryable: true,
                })
                .await;
            ("Fail(unknown task)".into(), code(r.map(|_| Code::Ok)), Code::NotFound)
        }
    }
}

#[test]
fn ten_thousand_hostile_requests() {
    let c = Cluster::start(&[]);
    let pid = c.coordinator.as_ref().unwrap().child.id();
    runtime().block_on(async {
        let channel = Channel::from_shared(c.url()).unwrap().connect().await.unwrap();
        // Warm up, then measure memory growth across the storm.
        let mut rng = Rng(7);
        let (mut jobs, mut workers) = (JobServiceClient::new(channel.clone()), WorkerServiceClient::new(channel.clone()));
        for i in 0..200 {
            one(i, &mut rng, &mut jobs, &mut workers).await;
        }
        let before = rss_kib(pid);
        let mut tasks = Vec::new();
        for lane in 0..16u64 {
            let channel = channel.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(lane * 1000 + 1);
                let (mut jobs, mut workers) = (JobServiceClient::new(channel.clone()), WorkerServiceClient::new(channel));
                let mut wrong = Vec::new();
                for k in 0..625u64 {
                    let (what, got, want) = one(lane + 16 * k, &mut rng, &mut jobs, &mut workers).await;
                    if got != want {
                        wrong.push(format!("{what}: got {got:?}, want {want:?}"));
                    }
                }
                wrong
            }));
        }
        let mut wrong = Vec::new();
        for t in tasks {
            wrong.extend(t.await.unwrap());
        }
        assert!(wrong.is_empty(), "{} of 10000 answers had the wrong code, e.g. {:?}", wrong.len(), &wrong[..wrong.len().min(5)]);
        let after = rss_kib(pid);
        println!("coordinator RSS: {before} KiB before, {after} KiB after 10,000 hostile requests");
        assert!(after < before + 100 * 1024, "memory grew from {before} KiB to {after} KiB");
        // Still serving, and nothing was written.
        let list = JobServiceClient::new(channel).list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner();
        assert!(list.jobs.is_empty());
    });
}
