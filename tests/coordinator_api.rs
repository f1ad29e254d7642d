//! The coordinator's gRPC API over a real socket: authentication and roles, bad input with the right
//! status codes and nothing written, and the client CLI's view of a job.
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::time::Duration;

use fresco_e2e::*;
use fresco_proto::v1;
use fresco_proto::v1::job_service_client::JobServiceClient;
use fresco_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;

const CLIENT: &str = "client-token-123";
const WORKER: &str = "worker-token-456";

fn with_token<T>(msg: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn header(model: &str) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        kind: Some(v1::submit_job_request::Kind::Header(v1::SubmitJobHeader {
            model: model.into(),
            output_url: "s3://b/p".into(),
            ..Default::default()
        })),
    }
}

fn chunk(prompts: &[&str]) -> v1::SubmitJobRequest {
    v1::SubmitJobRequest {
        kind: Some(v1::submit_job_request::Kind::Chunk(v1::PromptChunk {
            prompts: prompts.iter().map(|p| v1::Prompt { text: p.to_string(), overrides: None }).collect(),
        })),
    }
}

#[test]
fn tokens_roles_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let tokens = tmp.path().join("tokens");
    std::fs::write(&tokens, format!("client {CLIENT}\nworker {WORKER}\n")).unwrap();
    let c = Cluster::start(&["--tokens-file", tokens.to_str().unwrap()]);
    runtime().block_on(async {
        let mut jobs = JobServiceClient::connect(c.url()).await.unwrap();
        let mut workers = WorkerServiceClient::connect(c.url()).await.unwrap();
        let get = |t| with_token(v1::GetJobRequest { job_id: uuid::Uuid::new_v4().to_string() }, t);
        assert_eq!(jobs.get_job(get(None)).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(jobs.get_job(get(Some("wrong-token"))).await.unwrap_err().code(), Code::Unauthenticated);
        assert_eq!(jobs.get_job(get(Some(WORKER))).await.unwrap_err().code(), Code::PermissionDenied);
        assert_eq!(jobs.get_job(get(Some(CLIENT))).await.unwrap_err().code(), Code::NotFound);
        let lease = |t| with_token(v1::LeaseRequest { worker: "w".into(), models: vec!["m".into()], ..Default::default() }, t);
        assert_eq!(workers.lease(lease(Some(CLIENT))).await.unwrap_err().code(), Code::PermissionDenied);
        assert_eq!(workers.lease(lease(None)).await.unwrap_err().code(), Code::Unauthenticated);
        assert!(workers.lease(lease(Some(WORKER))).await.unwrap().into_inner().task.is_none());

        // Bad submissions: InvalidArgument naming the field, and nothing stored.
        let submit = |msgs: Vec<v1::SubmitJobRequest>| with_token(futures::stream::iter(msgs), Some(CLIENT));
        let cases: Vec<(Vec<v1::SubmitJobRequest>, &str)> = vec![
            (vec![header("tiny-sd15")], "prompts"),
            (vec![header("tiny-sd15"), chunk(&["ok", "   "])], "prompts[1].prompt"),
            (vec![header("bad model!"), chunk(&["ok"])], "model"),
            (vec![chunk(&["ok"])], "header"),
            (
                vec![
                    v1::SubmitJobRequest {
                        kind: Some(v1::submit_job_request::Kind::Header(v1::SubmitJobHeader {
                            model: "m".into(),
                            output_url: "ftp://x/y".into(),
                            ..Default::default()
                        })),
                    },
                    chunk(&["ok"]),
                ],
                "output_url",
            ),
            (
                vec![
                    v1::SubmitJobRequest {
                        kind: Some(v1::submit_job_request::Kind::Header(v1::SubmitJobHeader {
                            model: "m".into(),
                            output_url: "s3://b".into(),
                            params: Some(v1::GenerationParams { steps: Some(0), ..Default::default() }),
                            ..Default::default()
                        })),
                    },
                    chunk(&["ok"]),
                ],
                "params.steps",
            ),
        ];
        for (msgs, field) in cases {
            let err = jobs.submit_job(submit(msgs)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
            assert!(err.message().starts_with(field), "expected {field:?} in {:?}", err.message());
        }
        let list = jobs.list_jobs(with_token(v1::ListJobsRequest::default(), Some(CLIENT))).await.unwrap().into_inner();
        assert!(list.jobs.is_empty(), "a rejected submission left a job behind");
        let bad_id = with_token(v1::GetJobRequest { job_id: "not-a-job".into() }, Some(CLIENT));
        assert_eq!(jobs.get_job(bad_id).await.unwrap_err().code(), Code::InvalidArgument);
    });
}

#[test]
fn refuses_a_public_address_without_tokens() {
    let db = Database::create();
    let out = std::process::Command::new(fresco_bin())
        .args(["coordinator", "--listen", "0.0.0.0:0", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without tokens"));
}

#[test]
fn client_cli_reports_a_job_waiting_for_workers_then_cancels_it() {
    let c = Cluster::start(&[]);
    let prompts = c.write_prompts(3);
    let job = c.submit(&prompts, "nobody", 4);
    let s = c.status(&job);
    for key in ["id", "state", "total", "pending", "running", "succeeded", "failed"] {
        assert!(s.get(key).is_some(), "status --json lacks {key}: {s}");
    }
    assert_eq!(s["state"], "queued");
    assert_eq!(s["total"], 3);
    assert_eq!(s["waiting_for_worker"], true);
    let listed = c.client(&["jobs"]);
    assert!(listed.contains(&job));
    c.client(&["cancel", &job]);
    assert_eq!(c.wait_done(&job, Duration::from_secs(10))["state"], "cancelled");
    // WatchJob streams until the job ends: for an ended job, one event and done.
    let watched = c.client(&["watch", &job, "--json"]);
    let last: serde_json::Value = serde_json::from_str(watched.lines().next().unwrap()).unwrap();
    assert_eq!(last["state"], "cancelled");
    assert_eq!(last["cancelled"], 3);
}

#[test]
fn config_file_sits_between_defaults_and_the_environment() {
    let c = Cluster::start(&[]);
    let job = c.submit(&c.write_prompts(2), "config", 4);
    let conf = c.tmp.path().join("fresco.conf");
    std::fs::write(&conf, format!("# client settings\ncoordinator = \"{}\"\n", c.url())).unwrap();
    let status = |env: Option<&str>| {
        let mut cmd = std::process::Command::new(fresco_bin());
        cmd.args(["status", &job, "--json", "--config", conf.to_str().unwrap()]).env_remove("FRESCO_COORDINATOR");
        if let Some(url) = env {
            cmd.env("FRESCO_COORDINATOR", url);
        }
        cmd.output().unwrap()
    };
    let from_file = status(None);
    assert!(from_file.status.success(), "{}", String::from_utf8_lossy(&from_file.stderr));
    // The environment wins over the file.
    let from_env = status(Some("http://127.0.0.1:9"));
    assert!(!from_env.status.success());
    assert!(String::from_utf8_lossy(&from_env.stderr).contains("127.0.0.1:9"));
    std::fs::write(&conf, "coordinator\n").unwrap();
    let bad = status(None);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("line 1"));
}
