//! Prompt files: `.txt` (one prompt per line), `.jsonl`, `.csv` (columns `prompt`, `negative_prompt`,
//! `seed`, `steps`, `guidance`, `width`, `height`; other columns travel into the image metadata). The whole
//! file is read and validated before anything is submitted; errors name the file and line.

use std::collections::BTreeMap;
use std::path::Path;

use fresco_core::{validate_prompt, ParamOverrides};

#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    pub prompt: String,
    pub overrides: ParamOverrides,
}

/// A prompt-file problem; `line` is 1-based, 0 when it concerns the whole file.
#[derive(Debug)]
pub struct PromptFileError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for PromptFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file, self.message),
            n => write!(f, "{}:{n}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for PromptFileError {}

const KNOWN: [&str; 7] = ["prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height"];

pub fn read_prompt_file(path: &Path) -> Result<Vec<PromptRow>, PromptFileError> {
    let file = path.display().to_string();
    let err = |line: usize, message: String| PromptFileError { file: file.clone(), line, message };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "parquet" {
        let rows = parse_parquet(path).map_err(|(line, m)| err(line, m))?;
        if rows.is_empty() {
            return Err(err(0, "contains no prompts".into()));
        }
        return Ok(rows);
    }
    let bytes = std::fs::read(path).map_err(|e| err(0, format!("cannot read: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|b| **b == b'\n').count();
        err(line, "not valid UTF-8".into())
    })?;
    let rows = match ext.as_str() {
        "txt" | "" => parse_txt(&text),
        "jsonl" | "ndjson" => parse_jsonl(&text),
        "csv" => parse_csv(&text),
        other => Err((0, format!("unknown prompt file type .{other} (use .txt, .jsonl, .csv or .parquet)"))),
    }
    .map_err(|(line, m)| err(line, m))?;
    if rows.is_empty() {
        return Err(err(0, "contains no prompts".into()));
    }
    Ok(rows)
}

type ParseResult = Result<Vec<PromptRow>, (usize, String)>;

fn checked(line: usize, prompt: String, overrides: ParamOverrides) -> Result<PromptRow, (usize, String)> {
    validate_prompt("prompt", &prompt).map_err(|e| (line, e.to_string()))?;
    overrides.validate("").map_err(|e| (line, e.to_string()))?;
    Ok(PromptRow { prompt, overrides })
}

pub fn parse_txt(text: &str) -> ParseResult {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| checked(i + 1, l.trim().to_string(), ParamOverrides::default()))
        .collect()
}

/// Sets one known column from its text form (CSV) or JSON value.
fn set_field(o: &mut ParamOverrides, key: &str, raw: &str) -> Result<(), String> {
    let num = |what: &str| format!("{key}: {raw:?} is not {what}");
    match key {
        "negative_prompt" => o.negative_prompt = (!raw.is_empty()).then(|| raw.to_string()),
        "seed" => o.seed = Some(raw.parse().map_err(|_| num("a non-negative integer"))?),
        "steps" => o.steps = Some(raw.parse().map_err(|_| num("a positive integer"))?),
        "guidance" => o.guidance = Some(raw.parse().map_err(|_| num("a number"))?),
        "width" => o.width = Some(raw.parse().map_err(|_| num("a positive integer"))?),
        "height" => o.height = Some(raw.parse().map_err(|_| num("a positive integer"))?),
        _ => {
            o.extra.insert(key.to_string(), raw.to_string());
        }
    }
    Ok(())
}

pub fn parse_jsonl(text: &str) -> ParseResult {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| (n, format!("invalid JSON: {e}")))?;
        let obj = v.as_object().ok_or((n, "expected a JSON object".to_string()))?;
        let prompt = obj.get("prompt").and_then(|p| p.as_str()).ok_or((n, "missing string field \"prompt\"".to_string()))?.to_string();
        let mut o = ParamOverrides::default();
        for (k, v) in obj {
            if k == "prompt" || v.is_null() {
                continue;
            }
            let raw = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if KNOWN.contains(&k.as_str()) && k != "negative_prompt" && v.is_string() {
                return Err((n, format!("{k}: expected a number, got a string")));
            }
            set_field(&mut o, k, &raw).map_err(|m| (n, m))?;
        }
        rows.push(checked(n, prompt, o)?);
    }
    Ok(rows)
}

pub fn parse_csv(text: &str) -> ParseResult {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(text.as_bytes());
    let headers: Vec<String> =
        reader.headers().map_err(|e| (1, format!("invalid CSV header: {e}")))?.iter().map(|h| h.trim().to_string()).collect();
    if !headers.iter().any(|h| h == "prompt") {
        return Err((1, "no \"prompt\" column".into()));
    }
    let mut rows = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(|e| (e.position().map(|p| p.line() as usize).unwrap_or(0), format!("invalid CSV row: {e}")))?;
        let n = rec.position().map(|p| p.line() as usize).unwrap_or(0);
        let mut prompt = None;
        let mut o = ParamOverrides::default();
        let mut extra = BTreeMap::new();
        for (h, v) in headers.iter().zip(rec.iter()) {
            match h.as_str() {
                "prompt" => prompt = Some(v.to_string()),
                k if KNOWN.contains(&k) => {
                    if !v.trim().is_empty() || k == "negative_prompt" {
                        set_field(&mut o, k, v.trim()).map_err(|m| (n, m))?;
                    }
                }
                k => {
                    extra.insert(k.to_string(), v.to_string());
                }
            }
        }
        o.extra = extra;
        rows.push(checked(n, prompt.unwrap_or_default(), o)?);
    }
    Ok(rows)
}

/// Parquet: the same columns as CSV, read through Arrow; numbers may be any integer or float type, and
/// other columns are rendered as text into `extra`. Errors name the row (1-based).
pub fn parse_parquet(path: &Path) -> ParseResult {
    use arrow_array::Array;
    use arrow_cast::display::{ArrayFormatter, FormatOptions};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let file = std::fs::File::open(path).map_err(|e| (0, format!("cannot read: {e}")))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| (0, format!("not a Parquet file: {e}")))?
        .with_batch_size(8192)
        .build()
        .map_err(|e| (0, format!("cannot read Parquet: {e}")))?;
    let mut rows = Vec::new();
    let mut row = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| (row + 1, format!("cannot decode Parquet: {e}")))?;
        let schema = batch.schema();
        let prompt_col = schema.index_of("prompt").map_err(|_| (0, "no \"prompt\" column".to_string()))?;
        let opts = FormatOptions::default().with_null("");
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (0, format!("unsupported column type: {e}")))?;
        for i in 0..batch.num_rows() {
            row += 1;
            if batch.column(prompt_col).is_null(i) {
                return Err((row, "prompt is null".into()));
            }
            let mut prompt = String::new();
            let mut o = ParamOverrides::default();
            for (c, field) in schema.fields().iter().enumerate() {
                let name = field.name().as_str();
                if batch.column(c).is_null(i) {
                    continue;
                }
                let text = formatters[c].value(i).to_string();
                match name {
                    "prompt" => prompt = text,
                    k if KNOWN.contains(&k) => set_field(&mut o, k, text.trim()).map_err(|m| (row, m))?,
                    k => {
                        o.extra.insert(k.to_string(), text);
                    }
                }
            }
            rows.push(checked(row, prompt, o)?);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_skips_blank_lines_and_names_bad_ones() {
        let rows = parse_txt("a red circle\n\n  two blue squares  \n").unwrap();
        assert_eq!(rows.iter().map(|r| r.prompt.as_str()).collect::<Vec<_>>(), vec!["a red circle", "two blue squares"]);
        let long = format!("ok\n{}\n", "x".repeat(fresco_core::MAX_PROMPT_CHARS + 1));
        assert_eq!(parse_txt(&long).unwrap_err().0, 2);
    }

    #[test]
    fn jsonl_reads_overrides_and_extra_columns() {
        let rows = parse_jsonl("{\"prompt\": \"a\", \"seed\": 5, \"steps\": 4, \"source\": \"web\", \"score\": 0.5}\n").unwrap();
        assert_eq!(rows[0].overrides.seed, Some(5));
        assert_eq!(rows[0].overrides.steps, Some(4));
        assert_eq!(rows[0].overrides.extra.get("source").unwrap(), "web");
        assert_eq!(rows[0].overrides.extra.get("score").unwrap(), "0.5");
        assert_eq!(parse_jsonl("{\"prompt\": \"a\"}\n{\"prompt\": 3}\n").unwrap_err().0, 2);
        assert_eq!(parse_jsonl("{\"prompt\": \"a\", \"steps\": 0}").unwrap_err().0, 1);
        assert!(parse_jsonl("{\"prompt\": \"a\", \"width\": \"64\"}").unwrap_err().1.contains("width"));
        assert_eq!(parse_jsonl("not json").unwrap_err().0, 1);
    }

    #[test]
    fn parquet_reads_typed_columns_and_reports_rows() {
        use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, prompts: Vec<Option<&str>>, steps: Vec<Option<i64>>| {
            let path = dir.path().join(name);
            let n = prompts.len();
            let batch = RecordBatch::try_from_iter(vec![
                ("prompt", Arc::new(StringArray::from(prompts)) as ArrayRef),
                ("steps", Arc::new(Int64Array::from(steps)) as ArrayRef),
                ("guidance", Arc::new(Float64Array::from(vec![Some(5.5); n])) as ArrayRef),
                ("aesthetic", Arc::new(Float64Array::from(vec![Some(6.25); n])) as ArrayRef),
            ])
            .unwrap();
            let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), batch.schema(), None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            path
        };
        let ok = parse_parquet(&write("ok.parquet", vec![Some("a cat"), Some("a dog")], vec![Some(4), None])).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[0].overrides.steps, Some(4));
        assert_eq!(ok[1].overrides.steps, None);
        assert_eq!(ok[0].overrides.guidance, Some(5.5));
        assert_eq!(ok[0].overrides.extra.get("aesthetic").unwrap(), "6.25");
        let bad = parse_parquet(&write("bad.parquet", vec![Some("a"), Some("b"), Some("c")], vec![None, None, Some(0)])).unwrap_err();
        assert_eq!(bad.0, 3);
        assert!(bad.1.contains("steps"));
        assert_eq!(parse_parquet(&write("null.parquet", vec![Some("a"), None], vec![None, None])).unwrap_err().0, 2);
    }

    #[test]
    fn csv_reads_columns_and_reports_rows() {
        let rows = parse_csv("prompt,negative_prompt,seed,width,source\n\"a, b\",blurry,3,64,x\nc,,,,y\n").unwrap();
        assert_eq!(rows[0].prompt, "a, b");
        assert_eq!(rows[0].overrides.negative_prompt.as_deref(), Some("blurry"));
        assert_eq!(rows[0].overrides.width, Some(64));
        assert_eq!(rows[1].overrides.seed, None);
        assert_eq!(rows[1].overrides.extra.get("source").unwrap(), "y");
        let e = parse_csv("prompt,steps\na,4\nb,many\n").unwrap_err();
        assert_eq!(e.0, 3);
        assert!(e.1.contains("steps"));
        assert_eq!(parse_csv("text\na\n").unwrap_err().0, 1);
        assert_eq!(parse_csv("prompt,seed\na,1\nb\n").unwrap_err().0, 3);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary text never panics a reader, and an error always points at a line of the input.
        #[test]
        fn readers_never_panic(text in "(?s).{0,400}") {
            let lines = text.lines().count().max(1) + 1;
            for r in [parse_txt(&text), parse_jsonl(&text), parse_csv(&text)] {
                if let Err((line, msg)) = r {
                    prop_assert!(line <= lines, "line {} of {} for {:?}", line, lines, msg);
                    prop_assert!(!msg.is_empty());
                }
            }
        }

        /// Structured-looking JSON lines with wild values: accepted rows always pass validation.
        #[test]
        fn accepted_jsonl_rows_are_valid(prompt in ".{0,50}", steps in proptest::option::of(-5i64..2000), width in proptest::option::of(-8i64..5000), guidance in proptest::option::of(-10.0f64..200.0)) {
            let mut obj = serde_json::json!({"prompt": prompt});
            if let Some(s) = steps { obj["steps"] = s.into(); }
            if let Some(w) = width { obj["width"] = w.into(); }
            if let Some(g) = guidance { obj["guidance"] = g.into(); }
            if let Ok(rows) = parse_jsonl(&obj.to_string()) {
                prop_assert_eq!(rows.len(), 1);
                prop_assert!(validate_prompt("prompt", &rows[0].prompt).is_ok());
                prop_assert!(rows[0].overrides.validate("").is_ok());
            }
        }
    }
}
