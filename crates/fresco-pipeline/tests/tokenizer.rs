//! Token ids against the reference tokenizers' output (`tests/fixtures/cases/tokenizer-cases.json`).
#![allow(clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::path::{Path, PathBuf};

use fresco_pipeline::tokenizer::PromptTokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn cases() -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases/tokenizer-cases.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn clip_tokenizer_matches_reference() {
    let tok = PromptTokenizer::clip(&fixtures().join("models/tiny-sd15/tokenizer")).unwrap();
    for case in cases() {
        assert_eq!(tok.encode(case["prompt"].as_str().unwrap()).unwrap(), ids(&case["clip"]), "prompt {:?}", case["prompt"]);
    }
}

#[test]
fn sdxl_second_tokenizer_pads_with_bang() {
    let tok = PromptTokenizer::clip(&fixtures().join("models/tiny-sdxl/tokenizer_2")).unwrap();
    for case in cases() {
        assert_eq!(tok.encode(case["prompt"].as_str().unwrap()).unwrap(), ids(&case["clip_pad_bang"]), "prompt {:?}", case["prompt"]);
    }
}

#[test]
fn t5_tokenizer_matches_reference() {
    let tok = PromptTokenizer::t5(&fixtures().join("models/tiny-flux/tokenizer_2"), 64).unwrap();
    for case in cases() {
        assert_eq!(tok.encode(case["prompt"].as_str().unwrap()).unwrap(), ids(&case["t5"]), "prompt {:?}", case["prompt"]);
    }
}

#[test]
fn clip_truncates_long_prompts_to_77_tokens() {
    let tok = PromptTokenizer::clip(&fixtures().join("models/tiny-sd15/tokenizer")).unwrap();
    let ids = tok.encode(&"red circle ".repeat(100)).unwrap();
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], 49407);
}
