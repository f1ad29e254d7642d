//! `fresco export`: a finished job as a dataset — a Parquet manifest, or WebDataset shards in the
//! img2dataset layout (`{shard:05}.tar` with `{key}.png/.json/.txt`, and `{shard:05}.parquet` beside each).

use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array, UInt64Array};
use bytes::Bytes;
use fresco_proto::v1;
use fresco_worker::OutputLocation;
use sha2::{Digest, Sha256};

use super::common::{connect, status, ClientArgs};

#[derive(clap::Args)]
pub struct Args {
    job: String,
    /// parquet (a manifest) or webdataset (tar shards with images).
    #[arg(long, default_value = "parquet")]
    format: String,
    /// Folder or object-store URL to write to.
    #[arg(long)]
    out: String,
    /// Samples per WebDataset shard.
    #[arg(long, default_value_t = 1000)]
    shard_size: usize,
    #[command(flatten)]
    client: ClientArgs,
}

struct Row {
    key: String,
    output: v1::Output,
    metadata: serde_json::Value,
}

async fn fetch_outputs(args: &Args) -> anyhow::Result<(v1::Job, Vec<v1::Output>)> {
    let mut client = connect(&args.client).await?;
    let job = client.get_job(v1::GetJobRequest { job_id: args.job.clone() }).await.map_err(status)?.into_inner();
    let mut outputs = Vec::new();
    let mut token = String::new();
    loop {
        let r = client
            .list_outputs(v1::ListOutputsRequest { job_id: args.job.clone(), page_size: 5000, page_token: token })
            .await
            .map_err(status)?
            .into_inner();
        outputs.extend(r.outputs);
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    Ok((job, outputs))
}

fn manifest(rows: &[Row]) -> anyhow::Result<Vec<u8>> {
    let text = |f: &dyn Fn(&Row) -> String| Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>())) as ArrayRef;
    let meta_u32 = |r: &Row, k: &str| r.metadata[k].as_u64().unwrap_or(0) as u32;
    let params = |r: &Row| {
        let m = &r.metadata;
        serde_json::json!({"model": m["model"], "scheduler": m["scheduler"], "steps": m["steps"], "guidance": m["guidance"], "format": m["format"], "extra": m["extra"]}).to_string()
    };
    let batch = RecordBatch::try_from_iter(vec![
        ("key", text(&|r| r.key.clone())),
        ("index", Arc::new(UInt64Array::from(rows.iter().map(|r| r.output.index).collect::<Vec<_>>())) as ArrayRef),
        ("prompt", text(&|r| r.output.prompt.clone())),
        ("negative_prompt", text(&|r| r.output.negative_prompt.clone())),
        ("seed", Arc::new(UInt64Array::from(rows.iter().map(|r| r.output.seed).collect::<Vec<_>>())) as ArrayRef),
        ("parameters", text(&params)),
        ("sha256", text(&|r| r.output.sha256.clone())),
        ("width", Arc::new(UInt32Array::from(rows.iter().map(|r| meta_u32(r, "width")).collect::<Vec<_>>())) as ArrayRef),
        ("height", Arc::new(UInt32Array::from(rows.iter().map(|r| meta_u32(r, "height")).collect::<Vec<_>>())) as ArrayRef),
        ("url", text(&|r| r.output.url.clone())),
    ])?;
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(buf)
}

fn tar_entry(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) -> anyhow::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    builder.append_data(&mut header, name, data)?;
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if !(1..=10_000).contains(&args.shard_size) {
        bail!("--shard-size: must be 1..=10000");
    }
    let (job, outputs) = fetch_outputs(&args).await?;
    if outputs.is_empty() {
        bail!("job {} has no outputs yet", job.id);
    }
    let out = OutputLocation::open(&args.out)?;
    match args.format.as_str() {
        "parquet" => {
            let rows = outputs
                .into_iter()
                .map(|o| Ok(Row { key: format!("{:09}", o.index), metadata: serde_json::from_str(&o.metadata_json)?, output: o }))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let name = format!("{}.parquet", job.id);
            out.put(&name, Bytes::from(manifest(&rows)?)).await?;
            eprintln!("{} rows in {}", rows.len(), out.url_of(&name));
        }
        "webdataset" => {
            let source =
                OutputLocation::open(&job.output_url).with_context(|| format!("cannot open the job's output {}", job.output_url))?;
            let shards = outputs.len().div_ceil(args.shard_size);
            for (shard, chunk) in outputs.chunks(args.shard_size).enumerate() {
                let mut tarball = tar::Builder::new(Vec::new());
                let mut rows = Vec::with_capacity(chunk.len());
                for (i, o) in chunk.iter().enumerate() {
                    // img2dataset keys: shard number then position in the shard.
                    let key = format!("{shard:05}{i:04}");
                    let image = source.get(&o.object_key).await?;
                    let sha = hex::encode(Sha256::digest(&image));
                    if sha != o.sha256 {
                        bail!("{}: sha256 {sha} differs from the recorded {}", o.url, o.sha256);
                    }
                    let ext = o.object_key.rsplit('.').next().unwrap_or("png");
                    let metadata: serde_json::Value = serde_json::from_str(&o.metadata_json)?;
                    tar_entry(&mut tarball, &format!("{key}.{ext}"), &image)?;
                    tar_entry(
                        &mut tarball,
                        &format!("{key}.json"),
                        &serde_json::to_vec(
                            &serde_json::json!({"key": key, "caption": o.prompt, "index": o.index, "seed": o.seed, "sha256": o.sha256, "url": o.url, "parameters": metadata}),
                        )?,
                    )?;
                    tar_entry(&mut tarball, &format!("{key}.txt"), o.prompt.as_bytes())?;
                    rows.push(Row { key, output: o.clone(), metadata });
                }
                out.put(&format!("{shard:05}.tar"), Bytes::from(tarball.into_inner()?)).await?;
                out.put(&format!("{shard:05}.parquet"), Bytes::from(manifest(&rows)?)).await?;
            }
            eprintln!("{} samples in {shards} shard(s) at {}", outputs.len(), out.url_of(""));
        }
        other => bail!("--format: {other:?} is not parquet or webdataset"),
    }
    Ok(())
}
