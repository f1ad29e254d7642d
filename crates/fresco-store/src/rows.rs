//! Row decoding both backends share: the columns hold the same values, only the driver differs.

use sqlx::types::Json;
use sqlx::{ColumnIndex, Decode, Row, Type};

use std::collections::BTreeMap;

use crate::{LeasedPrompt, OutputRow, StoreResult, WorkerInfo};

/// An `outputs` row joined with its prompt.
pub(crate) fn output_row<'r, R>(r: &'r R) -> StoreResult<OutputRow>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    Json<serde_json::Value>: Decode<'r, R::Database> + Type<R::Database>,
{
    let Json(metadata) = r.try_get("metadata")?;
    Ok(OutputRow {
        index: r.try_get::<i64, _>("idx")? as u64,
        prompt: r.try_get("prompt")?,
        negative_prompt: r.try_get("negative_prompt")?,
        seed: r.try_get::<i64, _>("seed")? as u64,
        object_key: r.try_get("object_key")?,
        url: r.try_get("url")?,
        sha256: r.try_get("sha256")?,
        bytes: r.try_get::<i64, _>("bytes")? as u64,
        worker: r.try_get("worker")?,
        metadata,
    })
}

/// A `workers` row. `max_batch` is read as i64 on both backends (PostgreSQL's INTEGER widens).
pub(crate) fn worker_row<'r, R>(r: &'r R, max_batch: i64) -> StoreResult<WorkerInfo>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    Json<Vec<String>>: Decode<'r, R::Database> + Type<R::Database>,
{
    let Json(models) = r.try_get("models")?;
    Ok(WorkerInfo {
        name: r.try_get("name")?,
        models,
        device: r.try_get("device")?,
        max_batch: max_batch as u32,
        loaded_model: r.try_get("loaded_model")?,
    })
}

/// A `prompts` row as a worker receives it; a prompt without a negative prompt of its own takes the job's.
pub(crate) fn leased_prompt<'r, R>(r: &'r R, job_negative: &Option<String>) -> StoreResult<LeasedPrompt>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    Option<Json<BTreeMap<String, String>>>: Decode<'r, R::Database> + Type<R::Database>,
{
    let extra: Option<Json<BTreeMap<String, String>>> = r.try_get("extra")?;
    Ok(LeasedPrompt {
        index: r.try_get::<i64, _>("idx")? as u64,
        prompt: r.try_get("prompt")?,
        negative_prompt: r.try_get::<Option<String>, _>("negative_prompt")?.or_else(|| job_negative.clone()),
        seed: r.try_get::<i64, _>("seed")? as u64,
        extra: extra.map(|e| e.0).unwrap_or_default(),
    })
}
