//! Client commands against a running coordinator: submit, status, watch, cancel, jobs, outputs.

use std::path::PathBuf;

use anyhow::Context;
use fresco_proto::v1;
use fresco_proto::{overrides_to_proto, params_to_proto};

use super::common::{connect, status, ClientArgs};
use super::GenOptions;
use crate::prompts::read_prompt_file;

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// Prompt file: .txt, .jsonl or .csv.
    prompts: PathBuf,
    #[arg(long)]
    model: String,
    /// Where workers write images (s3://bucket/prefix, gs://, az://, file:///path or a path on the workers).
    #[arg(long, default_value = "out")]
    output: String,
    #[command(flatten)]
    gen: GenOptions,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 8)]
    batch_size: u32,
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Makes the submission idempotent: the same id returns the first job.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let rows = read_prompt_file(&args.prompts)?;
    let params = args.gen.params()?;
    let mut client = connect(&args.client).await?;
    let header = v1::SubmitJobHeader {
        model: args.model,
        params: Some(params_to_proto(&params)),
        output_url: args.output,
        batch_size: args.batch_size,
        priority: args.priority,
        seed: args.seed.unwrap_or(0),
        client_request_id: args.request_id.unwrap_or_default(),
        max_attempts: 0,
    };
    let mut messages = vec![v1::SubmitJobRequest { kind: Some(v1::submit_job_request::Kind::Header(header)) }];
    for chunk in rows.chunks(2000) {
        let prompts =
            chunk.iter().map(|r| v1::Prompt { text: r.prompt.clone(), overrides: Some(overrides_to_proto(&r.overrides)) }).collect();
        messages.push(v1::SubmitJobRequest { kind: Some(v1::submit_job_request::Kind::Chunk(v1::PromptChunk { prompts })) });
    }
    let resp = client.submit_job(futures::stream::iter(messages)).await.map_err(status)?.into_inner();
    println!("{}", resp.job_id);
    Ok(())
}

#[derive(clap::Args)]
pub struct JobArgs {
    job: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

fn state_name(s: i32) -> &'static str {
    match v1::JobState::try_from(s).ok().and_then(fresco_proto::job_state_from_proto) {
        Some(s) => s.as_str(),
        None => "unknown",
    }
}

fn job_json(j: &v1::Job) -> serde_json::Value {
    let c = j.counts.unwrap_or_default();
    serde_json::json!({
        "id": j.id, "state": state_name(j.state), "model": j.model, "total": j.total,
        "pending": c.pending, "running": c.running, "succeeded": c.succeeded, "failed": c.failed, "cancelled": c.cancelled,
        "progress": j.progress, "images_per_second": j.images_per_second, "eta_seconds": j.eta_seconds,
        "waiting_for_worker": j.waiting_for_worker, "output_url": j.output_url, "last_error": j.last_error,
        "created_at_ms": j.created_at_ms, "started_at_ms": j.started_at_ms, "finished_at_ms": j.finished_at_ms,
    })
}

fn job_line(j: &v1::Job) -> String {
    let c = j.counts.unwrap_or_default();
    let mut s = format!(
        "{}  {:<9}  {}  {}/{} done ({} running, {} failed)",
        j.id,
        state_name(j.state),
        j.model,
        c.succeeded,
        j.total,
        c.running,
        c.failed
    );
    if j.waiting_for_worker {
        s.push_str("  [waiting for a worker serving this model]");
    }
    s
}

pub async fn status_cmd(args: JobArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let j = client.get_job(v1::GetJobRequest { job_id: args.job }).await.map_err(status)?.into_inner();
    if args.json {
        println!("{}", job_json(&j));
    } else {
        println!("{}", job_line(&j));
        if !j.last_error.is_empty() {
            println!("last error: {}", j.last_error);
        }
    }
    Ok(())
}

pub async fn watch(args: JobArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let mut stream = client.watch_job(v1::WatchJobRequest { job_id: args.job, interval_ms: 500 }).await.map_err(status)?.into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len}  {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last = None;
    while let Some(j) = stream.message().await.map_err(status)? {
        let c = j.counts.unwrap_or_default();
        bar.set_length(j.total);
        bar.set_position(c.succeeded + c.failed + c.cancelled);
        let eta = j.eta_seconds.map(|e| format!("ETA {e:.0}s")).unwrap_or_default();
        bar.set_message(format!(
            "{}  {:.2} images/s  {eta}{}",
            state_name(j.state),
            j.images_per_second,
            if j.waiting_for_worker { "  waiting for a worker" } else { "" }
        ));
        if args.json {
            println!("{}", job_json(&j));
        }
        last = Some(j);
    }
    bar.finish_and_clear();
    if let Some(j) = last {
        println!("{}", job_line(&j));
    }
    Ok(())
}

pub async fn cancel(args: JobArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let j = client.cancel_job(v1::CancelJobRequest { job_id: args.job }).await.map_err(status)?.into_inner();
    println!("{}", if args.json { job_json(&j).to_string() } else { job_line(&j) });
    Ok(())
}

#[derive(clap::Args)]
pub struct JobsArgs {
    /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
    #[arg(long)]
    state: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: u32,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    client: ClientArgs,
}

pub async fn jobs(args: JobsArgs) -> anyhow::Result<()> {
    let state = match &args.state {
        Some(s) => fresco_proto::job_state_to_proto(s.parse().map_err(|e: String| anyhow::anyhow!("--state: {e}"))?) as i32,
        None => 0,
    };
    let mut client = connect(&args.client).await?;
    let r = client
        .list_jobs(v1::ListJobsRequest { state, page_size: args.limit, page_token: String::new() })
        .await
        .map_err(status)?
        .into_inner();
    for j in &r.jobs {
        println!("{}", if args.json { job_json(j).to_string() } else { job_line(j) });
    }
    Ok(())
}

pub async fn outputs(args: JobArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.client).await?;
    let mut token = String::new();
    loop {
        let r = client
            .list_outputs(v1::ListOutputsRequest { job_id: args.job.clone(), page_size: 1000, page_token: token })
            .await
            .map_err(status)?
            .into_inner();
        for o in &r.outputs {
            if args.json {
                let metadata: serde_json::Value = serde_json::from_str(&o.metadata_json).context("coordinator sent malformed metadata")?;
                println!(
                    "{}",
                    serde_json::json!({"index": o.index, "prompt": o.prompt, "negative_prompt": o.negative_prompt, "seed": o.seed, "key": o.object_key, "url": o.url, "sha256": o.sha256, "bytes": o.bytes, "worker": o.worker, "metadata": metadata})
                );
            } else {
                println!("{:>8}  {}  {}", o.index, o.url, o.prompt);
            }
        }
        if r.next_page_token.is_empty() {
            return Ok(());
        }
        token = r.next_page_token;
    }
}
