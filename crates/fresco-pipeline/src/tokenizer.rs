//! Prompt tokenisation as the published pipelines do it.
//!
//! CLIP: published Stable Diffusion repos ship only `vocab.json` + `merges.txt`, so the fast tokenizer is
//! assembled here the way `transformers` converts the slow CLIP tokenizer: NFC, whitespace runs collapsed,
//! lower-cased, CLIP's word regex, byte-level BPE with a `</w>` end-of-word suffix; then
//! `<|startoftext|> … <|endoftext|>` truncated and padded to `model_max_length` with the configured pad
//! token (`<|endoftext|>` for most, `!` for SDXL's second tokenizer).
//!
//! T5: loaded from `tokenizer.json`, `</s>` appended, padded with `<pad>`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{PipelineError, Result};
use crate::loader::read_json;

const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A tokenizer that turns prompts into fixed-length id sequences.
pub struct PromptTokenizer {
    inner: Tokenizer,
    kind: Kind,
    pub max_length: usize,
    pad_id: u32,
    dir: PathBuf,
}

enum Kind {
    Clip { bos: u32, eos: u32 },
    T5,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Tokenizer { path: path.to_path_buf(), message: e.to_string() }
}

/// A special token as written in `tokenizer_config.json`: either a bare string or `{"content": …}`.
fn special(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn tokenizer_config(dir: &Path) -> Result<Value> {
    let path = dir.join("tokenizer_config.json");
    if path.is_file() {
        read_json(&path)
    } else {
        Ok(Value::Object(Default::default()))
    }
}

impl PromptTokenizer {
    /// CLIP's BPE tokenizer from a folder holding `vocab.json` and `merges.txt`.
    pub fn clip(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(tok_err(f, "missing (a CLIP tokenizer needs vocab.json and merges.txt)"));
            }
        }
        let config = tokenizer_config(dir)?;
        let unk = special(&config, "unk_token").unwrap_or_else(|| "<|endoftext|>".into());
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .unk_token(unk)
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| tok_err(&vocab, e))?;
        let mut inner = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| tok_err(dir, e))?.into(),
            Lowercase.into(),
        ]);
        inner.with_normalizer(Some(normalizer));
        let split =
            Split::new(SplitPattern::Regex(CLIP_PATTERN.into()), SplitDelimiterBehavior::Removed, true).map_err(|e| tok_err(dir, e))?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()])));

        // transformers splits special tokens out of the text before BPE; with SDXL's `!` pad token this
        // turns "dusk!!" into "dusk", "!", "!" instead of the merged "!!".
        let specials: Vec<AddedToken> = ["bos_token", "eos_token", "unk_token", "pad_token"]
            .iter()
            .filter_map(|k| special(&config, k))
            .map(|t| AddedToken::from(t, true))
            .collect();
        inner.add_special_tokens(&specials);

        let id = |token: &str| inner.token_to_id(token).ok_or_else(|| tok_err(&vocab, format!("token {token:?} is not in the vocabulary")));
        let bos = id(&special(&config, "bos_token").unwrap_or_else(|| "<|startoftext|>".into()))?;
        let eos_token = special(&config, "eos_token").unwrap_or_else(|| "<|endoftext|>".into());
        let eos = id(&eos_token)?;
        let pad_id = id(&special(&config, "pad_token").unwrap_or(eos_token))?;
        let max_length = max_length(&config, 77);
        Ok(Self { inner, kind: Kind::Clip { bos, eos }, max_length, pad_id, dir: dir.to_path_buf() })
    }

    /// A T5 tokenizer from `tokenizer.json`, padded to `max_length` (the pipeline's max_sequence_length).
    pub fn t5(dir: &Path, max_length: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(tok_err(&path, "missing (a T5 tokenizer needs tokenizer.json)"));
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        let config = tokenizer_config(dir)?;
        let pad = special(&config, "pad_token").unwrap_or_else(|| "<pad>".into());
        let pad_id = inner.token_to_id(&pad).ok_or_else(|| tok_err(&path, format!("pad token {pad:?} is unknown")))?;
        Ok(Self { inner, kind: Kind::T5, max_length, pad_id, dir: dir.to_path_buf() })
    }

    /// Token ids padded (or truncated) to exactly `max_length`.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = match self.kind {
            Kind::Clip { bos, eos } => {
                let enc = self.inner.encode(prompt, false).map_err(|e| tok_err(&self.dir, e))?;
                let body = enc.get_ids();
                let keep = body.len().min(self.max_length.saturating_sub(2));
                let mut ids = Vec::with_capacity(self.max_length);
                ids.push(bos);
                ids.extend_from_slice(&body[..keep]);
                ids.push(eos);
                ids
            }
            Kind::T5 => {
                let enc = self.inner.encode(prompt, true).map_err(|e| tok_err(&self.dir, e))?;
                let mut ids = enc.get_ids().to_vec();
                if ids.len() > self.max_length {
                    // Truncation keeps the closing </s>, as transformers does.
                    let last = ids[ids.len() - 1];
                    ids.truncate(self.max_length - 1);
                    ids.push(last);
                }
                ids
            }
        };
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// The position of each prompt's end-of-text token, where CLIP reads its pooled output.
    pub fn eos_id(&self) -> Option<u32> {
        match self.kind {
            Kind::Clip { eos, .. } => Some(eos),
            Kind::T5 => None,
        }
    }
}

fn max_length(config: &Value, default: usize) -> usize {
    config.get("model_max_length").and_then(Value::as_u64).filter(|v| *v > 0 && *v < 100_000).map(|v| v as usize).unwrap_or(default)
}
