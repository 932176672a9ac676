//! The CLIP tokenizer against transformers 5.24.0's `CLIPTokenizer` (the class diffusers loads):
//! ids must be identical, for both folder forms (legacy vocab.json + merges.txt with SD1.x's pad,
//! tokenizer.json with SD2's pad "!"). References: tests/fixtures/scripts/tokenizer_refs.py.

use std::path::{Path, PathBuf};

use instruct_pix2pix::model::tokenizer::{ClipTokenizer, TokenizerError};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn references() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference_ids.json"))
        .expect("reference_ids.json is committed");
    serde_json::from_str(&text).expect("reference_ids.json is valid JSON")
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an id list")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}

/// Every reference prompt, unpadded and as diffusers feeds the text encoder, for one folder.
fn check_folder(folder: &str, key: &str) {
    let refs = references();
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join(folder)).expect("fixture loads");
    assert_eq!(
        tokenizer.model_max_length() as u64,
        refs[key]["model_max_length"].as_u64().unwrap()
    );
    assert_eq!(
        tokenizer.pad_token_id() as u64,
        refs[key]["pad_token_id"].as_u64().unwrap()
    );
    let cases = refs["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "expected at least 40 reference prompts");
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = ids(&case[key]["ids"]);
        let expected_model = ids(&case[key]["model_ids"]);
        let got = tokenizer.encode(prompt);
        let got_model = tokenizer.encode_for_model(prompt);
        if got != expected || got_model != expected_model {
            failures.push(format!(
                "{prompt:?}\n  expected {expected:?}\n  got      {got:?}\n  model expected {expected_model:?}\n  model got      {got_model:?}"
            ));
        }
        assert_eq!(
            tokenizer.truncated_tokens(prompt),
            expected.len().saturating_sub(expected_model.len()),
            "{prompt:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} prompts differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn legacy_folder_matches_transformers() {
    check_folder("clip-vit-l", "legacy");
}

#[test]
fn tokenizer_json_folder_matches_transformers() {
    check_folder("sd2", "fast");
}

#[test]
fn long_prompt_is_truncated_keeping_the_final_end_token() {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("clip-vit-l")).unwrap();
    let prompt = "a ".repeat(100);
    let ids = tokenizer.encode_for_model(&prompt);
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[0], 49406);
    assert_eq!(ids[76], 49407);
    assert_eq!(tokenizer.truncated_tokens(&prompt), 100 + 2 - 77);
    assert_eq!(tokenizer.truncated_tokens("make it snowy"), 0);
}

/// Issue 16 item 6: a 50 KB one-word prompt (57 s with the quadratic BPE) gives the model the
/// same 77 ids as encoding the whole text and truncating; the ids themselves are checked against
/// the textbook BPE loop on shorter words in the tokenizer's unit tests.
#[test]
fn a_fifty_kilobyte_word_gives_the_first_ids_of_the_whole_text() {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("clip-vit-l")).unwrap();
    let word: String = "snowymountainlake".chars().cycle().take(50_000).collect();
    let full = tokenizer.encode(&word);
    assert!(
        full.len() > 77,
        "a 50 KB word is many tokens: {}",
        full.len()
    );
    let model = tokenizer.encode_for_model(&word);
    assert_eq!(model.len(), 77);
    assert_eq!(model[..76], full[..76]);
    assert_eq!(model[76], 49407);
    assert_eq!(tokenizer.truncated_tokens(&word), full.len() - 77);
    // BPE did merge the word into multi-letter tokens, not letters one by one.
    assert!(full.len() < 50_000 / 3, "{} tokens", full.len());
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::MissingFiles { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("tokenizer.json") && message.contains("merges.txt"),
        "{message}"
    );
}

#[test]
fn malformed_merges_are_reported_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vocab.json"), r#"{"a":0,"b":1,"ab":2}"#).unwrap();
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b\nabc\n").unwrap();
    match ClipTokenizer::from_dir(dir.path()) {
        Err(TokenizerError::BadMerge { line, text, .. }) => {
            assert_eq!(line, 3);
            assert_eq!(text, "abc");
        }
        other => panic!("expected BadMerge, got {other:?}"),
    }
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na c\n").unwrap();
    match ClipTokenizer::from_dir(dir.path()) {
        Err(TokenizerError::MergeNotInVocab { token, .. }) => assert_eq!(token, "c"),
        other => panic!("expected MergeNotInVocab, got {other:?}"),
    }
}

#[test]
fn bad_json_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Json { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.json"));
}
