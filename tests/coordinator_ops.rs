//! Operating the coordinator: the standard gRPC health service, server reflection, the Prometheus metrics
//! endpoint, and TLS with client certificates.
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use fresco_e2e::*;
use fresco_proto::v1;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn health_reflection_and_metrics() {
    let metrics_port = free_port();
    let c = Cluster::start(&["--metrics-listen", &format!("127.0.0.1:{metrics_port}")]);
    wait_for_port(metrics_port, Duration::from_secs(10));
    let prompts = c.write_prompts(5);
    let job = c.submit(&prompts, "metrics", 4);

    runtime().block_on(async {
        let channel = Channel::from_shared(c.url()).unwrap().connect().await.unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: "fresco.v1.JobService".into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);

        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
            server_reflection_response::MessageResponse, ServerReflectionRequest,
        };
        let mut refl = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
        let mut stream = refl.server_reflection_info(futures::stream::iter(vec![req])).await.unwrap().into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("unexpected reflection answer") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in ["fresco.v1.JobService", "fresco.v1.WorkerService", "grpc.health.v1.Health"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    });

    // 5 prompts in batches of 2 = 3 pending tasks, nobody leasing yet.
    let text = http_get(metrics_port, "/metrics");
    assert!(text.contains("fresco_queue_depth_tasks{model=\"tiny-sd15\"} 3"), "{text}");
    assert!(text.contains("fresco_queue_depth_prompts{model=\"tiny-sd15\"} 5"), "{text}");
    assert!(text.contains(&format!("fresco_job_progress{{job_id=\"{job}\",model=\"tiny-sd15\"}} 0")), "{text}");
    assert!(text.contains("fresco_live_workers 0"), "{text}");

    let worker_metrics = free_port();
    let _w = c.worker_with("metered", &["--metrics-listen", &format!("127.0.0.1:{worker_metrics}")]);
    let done = c.wait_done(&job, Duration::from_secs(120));
    assert_eq!(done["state"], "succeeded");
    let w = http_get(worker_metrics, "/metrics");
    assert!(w.contains("fresco_worker_images_total 5"), "{w}");
    assert!(w.contains("fresco_worker_duty_cycle"), "{w}");
    for stage in ["encode_text", "denoise", "decode", "encode_image", "upload"] {
        assert!(w.contains(&format!("fresco_worker_stage_seconds_count{{stage=\"{stage}\"}}")), "{stage} missing: {w}");
    }
    let text = http_get(metrics_port, "/metrics");
    assert!(text.contains("fresco_completed_prompts_total 5"), "{text}");
    assert!(text.contains("fresco_live_workers 1"), "{text}");
    assert!(!text.contains("fresco_queue_depth_tasks{model=\"tiny-sd15\"}"), "drained queue still reported: {text}");
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&server_key, &issuer).unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["fresco-client".to_string()]).unwrap().signed_by(&client_key, &issuer).unwrap();
    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

#[test]
fn tls_with_client_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pki();
    let file = |name: &str, text: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (ca, cert, key) = (file("ca.pem", &p.ca), file("server.pem", &p.server_cert), file("server.key", &p.server_key));
    let db = Database::create();
    let port = free_port();
    let mut cmd = Command::new(fresco_bin());
    cmd.args([
        "coordinator",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--database-url",
        &db.url,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ]);
    let _coordinator = Proc::spawn("coordinator-tls", cmd, tmp.path());
    wait_for_port(port, Duration::from_secs(30));

    runtime().block_on(async {
        let url = format!("https://localhost:{port}");
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&p.ca)).domain_name("localhost");
        // With a client certificate: served.
        let channel = Channel::from_shared(url.clone())
            .unwrap()
            .tls_config(tls.clone().identity(Identity::from_pem(&p.client_cert, &p.client_key)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut jobs = v1::job_service_client::JobServiceClient::new(channel);
        let list = jobs.list_jobs(v1::ListJobsRequest::default()).await.unwrap().into_inner();
        assert!(list.jobs.is_empty());
        // Without one: the handshake (or the first call) fails.
        let refused = match Channel::from_shared(url).unwrap().tls_config(tls).unwrap().connect().await {
            Err(_) => true,
            Ok(ch) => v1::job_service_client::JobServiceClient::new(ch).list_jobs(v1::ListJobsRequest::default()).await.is_err(),
        };
        assert!(refused, "a client without a certificate was served");
    });
}
