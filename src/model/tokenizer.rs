//! The CLIP BPE tokenizer, giving the same ids as the `CLIPTokenizer` that diffusers loads from a
//! pipeline's `tokenizer/` folder (transformers 5: the `tokenizers`-backed class).
//!
//! What that class does, step by step, and what this file reproduces:
//! 1. Added tokens (`<|startoftext|>`, `<|endoftext|>`, SD2's pad `!`, ...) are cut out of the text
//!    first: those flagged `normalized: false` on the raw text, the others on the normalised text.
//! 2. Normalisation: NFC, every run of Unicode whitespace becomes one space, then lower-casing
//!    character by character (no Greek final-sigma rule, unlike Python's `str.lower`).
//! 3. Pre-tokenisation: CLIP's regex keeps `'s|'t|'re|'ve|'m|'ll|'d`, runs of letters, single
//!    digits and runs of other non-space characters and drops whitespace; then the byte-level step
//!    splits each piece again with GPT-2's regex (this is why a literal `<|endoftext|>` that was not
//!    matched as an added token falls apart into `<|`, `endoftext`, `|>`), and maps bytes to
//!    printable characters.
//! 4. BPE per piece, the last symbol carrying `</w>`, always merging the lowest-ranked pair first
//!    (leftmost on ties).
//! 5. `<|startoftext|> … <|endoftext|>` around the ids; for the model, truncation to
//!    `model_max_length` keeping the final `<|endoftext|>`, then right padding with the pad token.
//!
//! Two folder forms load: `vocab.json` + `merges.txt` (with `tokenizer_config.json` and
//! `special_tokens_map.json`), and `tokenizer.json`. For the latter transformers keeps only the
//! vocabulary, merges and added tokens of the file and builds CLIP's own pipeline around them; so
//! does this file.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

/// CLIP's pre-tokenizer pattern, as transformers' `CLIPTokenizer` sets it (leftmost-first
/// alternation, the same semantics in the `regex` crate as in Oniguruma).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2's pattern used by the byte-level pre-tokenizer. Its `\s+(?!\S)` alternative is left out:
/// the pieces it sees never contain whitespace (CLIP's split removed it), and the `regex` crate
/// has no look-ahead.
const BYTE_LEVEL_SPLIT_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// transformers' default when `model_max_length` is missing: CLIP's 77 positions.
const DEFAULT_MODEL_MAX_LENGTH: usize = 77;

/// What can go wrong loading a tokenizer folder.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read tokenizer file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("tokenizer file {path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The folder has neither `tokenizer.json` nor `vocab.json` + `merges.txt`.
    #[error(
        "tokenizer folder {dir} has neither tokenizer.json nor vocab.json + merges.txt (missing: {missing})"
    )]
    MissingFiles { dir: PathBuf, missing: String },
    /// A file is valid JSON/text but not what a CLIP tokenizer needs.
    #[error("tokenizer file {path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A merge line is not two space-separated symbols.
    #[error(
        "tokenizer file {path}, line {line}: merge {text:?} is not two space-separated symbols"
    )]
    BadMerge {
        path: PathBuf,
        line: usize,
        text: String,
    },
    /// A merge names a symbol (or yields a token) that the vocabulary lacks.
    #[error(
        "tokenizer file {path}: merge {merge:?} uses {token:?}, which is not in the vocabulary"
    )]
    MergeNotInVocab {
        path: PathBuf,
        merge: String,
        token: String,
    },
    /// One of the built-in patterns did not compile (a bug, not a data problem).
    #[error("internal tokenizer pattern failed to compile: {0}")]
    Pattern(#[from] regex::Error),
}

/// (left id, right id) → (rank, merged id).
type MergeMap = HashMap<(u32, u32), (u32, u32)>;

/// A token matched whole before normalisation/BPE (special tokens and user-added tokens).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    /// Matched on the normalised text when true, on the raw text when false.
    normalized: bool,
}

impl AddedToken {
    /// An added-token entry of `tokenizer.json` or `tokenizer_config.json`, whose content and
    /// id the caller has read; `normalized` is false when the entry lacks it.
    fn from_entry(content: &str, id: u32, entry: &Value) -> Self {
        Self {
            content: content.to_string(),
            id,
            normalized: entry
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }
    }
}

/// How a special token is given in the config files.
#[derive(Debug, Clone)]
struct SpecialTokenSpec {
    content: String,
    normalized: bool,
}

/// CLIP's byte-level BPE tokenizer with the behaviour of transformers' `CLIPTokenizer`.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    merges: MergeMap,
    end_of_word_suffix: String,
    unk_id: u32,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    added: Vec<AddedToken>,
    model_max_length: usize,
    byte_chars: [char; 256],
    clip_split: Regex,
    byte_level_split: Regex,
    whitespace: Regex,
}

impl ClipTokenizer {
    /// Loads a pipeline's `tokenizer/` folder: `tokenizer.json` when present, otherwise
    /// `vocab.json` + `merges.txt`; special tokens, pad token and `model_max_length` from
    /// `special_tokens_map.json` / `tokenizer_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let fast_path = dir.join("tokenizer.json");
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_optional_json(&dir.join("special_tokens_map.json"))?;

        // Present: anything but a folder, so that a FIFO or a device is refused by name when read.
        let present = |path: &Path| path.exists() && !path.is_dir();
        let files = if present(&fast_path) {
            load_fast(&fast_path)?
        } else if present(&vocab_path) && present(&merges_path) {
            BpeFiles {
                vocab: load_vocab_json(&vocab_path)?,
                merges: load_merges_txt(&merges_path)?,
                merges_path,
                unk_token: None,
                end_of_word_suffix: "</w>".to_string(),
                added: config_added_tokens(config.as_ref(), &dir.join("tokenizer_config.json"))?,
            }
        } else {
            let missing: Vec<&str> = [
                ("tokenizer.json", &fast_path),
                ("vocab.json", &vocab_path),
                ("merges.txt", &merges_path),
            ]
            .into_iter()
            .filter(|(_, p)| !present(p))
            .map(|(name, _)| name)
            .collect();
            return Err(TokenizerError::MissingFiles {
                dir: dir.to_path_buf(),
                missing: missing.join(", "),
            });
        };

        let BpeFiles {
            vocab,
            merges,
            merges_path,
            unk_token: unk_content,
            end_of_word_suffix: suffix,
            added: file_added,
        } = files;
        let merges = index_merges(&vocab, merges, &merges_path)?;

        // Special tokens: special_tokens_map.json over tokenizer_config.json over CLIPTokenizer's
        // defaults, each added in the order bos, eos, unk, pad; a later one with the same content
        // replaces the earlier one's flags (as transformers' add_tokens does). Tokens listed in
        // tokenizer.json keep the flags written there.
        let from_file: Vec<String> = file_added.iter().map(|t| t.content.clone()).collect();
        let mut added = file_added;
        let mut next_id = vocab
            .values()
            .chain(added.iter().map(|t| &t.id))
            .max()
            .map_or(0, |m| m + 1);
        let mut resolve = |key: &str, default: &str| -> SpecialTokenSpec {
            let spec = special_spec(special_map.as_ref(), key)
                .or_else(|| special_spec(config.as_ref(), key))
                .unwrap_or_else(|| SpecialTokenSpec {
                    content: default.to_string(),
                    normalized: false,
                });
            if !from_file.contains(&spec.content) {
                if let Some(existing) = added.iter_mut().find(|t| t.content == spec.content) {
                    existing.normalized = spec.normalized;
                } else {
                    let id = vocab.get(&spec.content).copied().unwrap_or_else(|| {
                        next_id += 1;
                        next_id - 1
                    });
                    added.push(AddedToken {
                        content: spec.content.clone(),
                        id,
                        normalized: spec.normalized,
                    });
                }
            }
            spec
        };
        let bos = resolve("bos_token", "<|startoftext|>");
        let eos = resolve("eos_token", "<|endoftext|>");
        let unk = resolve("unk_token", "<|endoftext|>");
        let pad = resolve("pad_token", "<|endoftext|>");
        let id_of = |content: &str| -> Option<u32> {
            added
                .iter()
                .find(|t| t.content == content)
                .map(|t| t.id)
                .or_else(|| vocab.get(content).copied())
        };
        let config_path = dir.join("tokenizer_config.json");
        let lookup = |spec: &SpecialTokenSpec, what: &str| -> Result<u32, TokenizerError> {
            id_of(&spec.content).ok_or_else(|| TokenizerError::Format {
                path: config_path.clone(),
                message: format!("{what} {:?} has no id", spec.content),
            })
        };
        let bos_id = lookup(&bos, "bos_token")?;
        let eos_id = lookup(&eos, "eos_token")?;
        let pad_id = lookup(&pad, "pad_token")?;
        // The BPE model's own unk (tokenizer.json) wins over the config's, as in `tokenizers`.
        let unk_id = match unk_content {
            Some(content) => id_of(&content).ok_or_else(|| TokenizerError::Format {
                path: fast_path.clone(),
                message: format!("model.unk_token {content:?} is not in the vocabulary"),
            })?,
            None => lookup(&unk, "unk_token")?,
        };

        let model_max_length = match config.as_ref().and_then(|c| c.get("model_max_length")) {
            None | Some(Value::Null) => DEFAULT_MODEL_MAX_LENGTH,
            // transformers writes 1e30 for "no limit": the text encoder still has 77 positions.
            Some(Value::Number(n)) if n.as_f64().is_some_and(|v| v > 1e6) => {
                DEFAULT_MODEL_MAX_LENGTH
            }
            Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v >= 2) => {
                n.as_u64().unwrap_or_default() as usize
            }
            Some(other) => {
                return Err(TokenizerError::Format {
                    path: config_path,
                    message: format!(
                        "`model_max_length` is {other}: it must be a whole number of at least 2"
                    ),
                });
            }
        };

        Ok(Self {
            vocab,
            merges,
            end_of_word_suffix: suffix,
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            added,
            model_max_length,
            byte_chars: bytes_to_unicode(),
            clip_split: Regex::new(CLIP_SPLIT_PATTERN)?,
            byte_level_split: Regex::new(BYTE_LEVEL_SPLIT_PATTERN)?,
            whitespace: Regex::new(r"\s+")?,
        })
    }

    /// Ids with <|startoftext|> … <|endoftext|>, no padding/truncation.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode_prefix(text, usize::MAX);
        ids.push(self.eos_id);
        ids
    }

    /// As diffusers calls it: padding="max_length", max_length=model_max_length, truncation=True
    /// (truncated sequences keep the final <|endoftext|>).
    pub fn encode_for_model(&self, text: &str) -> Vec<u32> {
        let max = self.model_max_length;
        // Only the first `max - 1` ids survive truncation, so the text is cut before BPE once
        // `max` ids exist (see `encode_prefix`): one id more than kept tells `encode` that the
        // sequence is truncated, exactly as the full encoding would be.
        let mut ids = self.encode_prefix(text, max);
        ids.push(self.eos_id);
        if ids.len() > max {
            ids.truncate(max - 1);
            ids.push(self.eos_id);
        }
        ids.resize(max, self.pad_id);
        ids
    }

    /// `<|startoftext|>` and the text's ids, without the final `<|endoftext|>`, stopping before
    /// the first piece that would start once `limit` ids exist.
    ///
    /// Why the cut cannot change the first `limit` ids: pre-tokenisation splits the text into
    /// pieces (added tokens, then CLIP's and the byte-level regex pieces) and BPE runs on each
    /// piece alone, appending its ids after those of the pieces before it; every piece gives at
    /// least one id. So the ids of the pieces already encoded are final, and once there are
    /// `limit` of them nothing later in the text can reach the first `limit` positions. The cut
    /// is on piece boundaries, never inside a word: BPE of a word depends on all of it (the last
    /// symbol carries `</w>`, and a merge near the end can block or free a merge next to it, and
    /// so on leftwards through a chain of merges of falling rank), so no prefix length of a word
    /// is safe in general. A long word instead costs O(n log n) in `bpe`, not O(n²).
    fn encode_prefix(&self, text: &str, limit: usize) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        for segment in self.split_raw(text) {
            if ids.len() >= limit {
                break;
            }
            match segment {
                Segment::Added(id) => ids.push(id),
                Segment::Text(raw) => {
                    let normalized = self.normalize(raw);
                    for segment in self.split_normalized(&normalized) {
                        if ids.len() >= limit {
                            break;
                        }
                        match segment {
                            Segment::Added(id) => ids.push(id),
                            Segment::Text(piece) => self.encode_normalized(piece, &mut ids, limit),
                        }
                    }
                }
            }
        }
        ids
    }

    /// The token with the largest id (vocabulary and added tokens): what the text encoder's
    /// embedding must have a row for.
    pub fn largest_id(&self) -> Option<(&str, u32)> {
        self.vocab
            .iter()
            .map(|(token, &id)| (token.as_str(), id))
            .chain(self.added.iter().map(|t| (t.content.as_str(), t.id)))
            .max_by_key(|&(_, id)| id)
    }

    /// The sequence length the text encoder takes (77 for CLIP).
    pub fn model_max_length(&self) -> usize {
        self.model_max_length
    }

    /// The id padding uses: `<|endoftext|>` (49407) for SD1.x, `!` (0) for SD2.x.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_id
    }

    /// How many prompt tokens were dropped by truncation (diffusers logs a warning): for the CLI to warn.
    pub fn truncated_tokens(&self, text: &str) -> usize {
        self.encode(text)
            .len()
            .saturating_sub(self.model_max_length)
    }

    /// NFC, whitespace runs to one space, then per-character lower-casing (as `tokenizers`'
    /// `Lowercase` does it, without context rules).
    fn normalize(&self, text: &str) -> String {
        let composed: String = text.nfc().collect();
        let spaced = self.whitespace.replace_all(&composed, " ");
        spaced.chars().flat_map(char::to_lowercase).collect()
    }

    /// Cuts out the added tokens matched on raw text.
    fn split_raw<'a>(&self, text: &'a str) -> Vec<Segment<'a>> {
        split_on_added(
            text,
            self.added
                .iter()
                .filter(|t| !t.normalized)
                .map(|t| (t.content.as_str(), t.id)),
        )
    }

    /// Cuts out the added tokens matched on normalised text (their content normalised too).
    fn split_normalized<'a>(&self, text: &'a str) -> Vec<Segment<'a>> {
        let tokens: Vec<(String, u32)> = self
            .added
            .iter()
            .filter(|t| t.normalized)
            .map(|t| (self.normalize(&t.content), t.id))
            .collect();
        split_on_added(text, tokens.iter().map(|(c, id)| (c.as_str(), *id)))
    }

    /// Pre-tokenises normalised text and appends the BPE ids of every piece, stopping before a
    /// piece once `ids` holds `limit` ids (see `encode_prefix`).
    fn encode_normalized(&self, text: &str, ids: &mut Vec<u32>, limit: usize) {
        for clip_piece in self.clip_split.find_iter(text) {
            for piece in self.byte_level_split.find_iter(clip_piece.as_str()) {
                if ids.len() >= limit {
                    return;
                }
                let mapped: String = piece
                    .as_str()
                    .bytes()
                    .map(|b| self.byte_chars[b as usize])
                    .collect();
                self.bpe(&mapped, ids);
            }
        }
    }

    /// BPE of one byte-level word: start from its characters (the last with `</w>`), then merge
    /// the lowest-ranked adjacent pair, leftmost first, until no pair has a merge.
    ///
    /// The candidate pairs wait in a min-heap ordered by (rank, position of the left symbol), the
    /// symbols in a linked list, so a word of n characters costs O(n log n) (rescanning every pair
    /// after each merge costs O(n²): 57 s for a 50 KB word). A popped pair is stale when its left
    /// symbol has been merged away or either side has changed since it was pushed; ranks are
    /// unique per pair, so "the pair there now has this rank" is the whole check. Positions keep
    /// their order as symbols merge, so the smallest position is the leftmost pair, and the
    /// result is the one the rescanning loop gives.
    fn bpe(&self, word: &str, ids: &mut Vec<u32>) {
        let chars: Vec<char> = word.chars().collect();
        let mut symbols: Vec<u32> = Vec::with_capacity(chars.len());
        let mut buf = String::new();
        for (i, c) in chars.iter().enumerate() {
            buf.clear();
            buf.push(*c);
            if i + 1 == chars.len() {
                buf.push_str(&self.end_of_word_suffix);
            }
            symbols.push(self.vocab.get(&buf).copied().unwrap_or(self.unk_id));
        }
        let n = symbols.len();
        // next[i] / prev[i]: the neighbours of symbol i in the list (n / usize::MAX for none);
        // alive[i]: false once i has been merged into its left neighbour.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let rank_at = |symbols: &[u32], next: &[usize], pos: usize| -> Option<(u32, u32)> {
            let right = *next.get(pos)?;
            let pair = (symbols[pos], *symbols.get(right)?);
            self.merges.get(&pair).copied()
        };
        let mut heap = BinaryHeap::new();
        for pos in 0..n.saturating_sub(1) {
            if let Some((rank, _)) = rank_at(&symbols, &next, pos) {
                heap.push(Reverse((rank, pos)));
            }
        }
        while let Some(Reverse((rank, pos))) = heap.pop() {
            if !alive[pos] {
                continue;
            }
            let Some((current, merged)) = rank_at(&symbols, &next, pos) else {
                continue;
            };
            if current != rank {
                continue;
            }
            let right = next[pos];
            symbols[pos] = merged;
            alive[right] = false;
            next[pos] = next[right];
            if next[pos] < n {
                prev[next[pos]] = pos;
            }
            if let Some((rank, _)) = rank_at(&symbols, &next, pos) {
                heap.push(Reverse((rank, pos)));
            }
            let left = prev[pos];
            if left < n
                && let Some((rank, _)) = rank_at(&symbols, &next, left)
            {
                heap.push(Reverse((rank, left)));
            }
        }
        ids.extend((0..n).filter(|&i| alive[i]).map(|i| symbols[i]));
    }
}

/// Part of a text after cutting out added tokens.
enum Segment<'a> {
    Text(&'a str),
    Added(u32),
}

/// Splits `text` on the given tokens, leftmost-longest (as `tokenizers`' Aho-Corasick matcher).
fn split_on_added<'a, 't>(
    text: &'a str,
    tokens: impl Iterator<Item = (&'t str, u32)> + Clone,
) -> Vec<Segment<'a>> {
    let mut segments = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let best = tokens
            .clone()
            .filter(|(content, _)| !content.is_empty() && rest.starts_with(content))
            .max_by_key(|(content, _)| content.len());
        if let Some((content, id)) = best {
            if start < pos {
                segments.push(Segment::Text(&text[start..pos]));
            }
            segments.push(Segment::Added(id));
            pos += content.len();
            start = pos;
        } else {
            pos += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < text.len() {
        segments.push(Segment::Text(&text[start..]));
    }
    segments
}

/// GPT-2/CLIP's reversible map from bytes to printable characters: printable Latin-1 bytes map
/// to themselves, the others to U+0100 onwards in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\u{FFFD}')
        };
    }
    table
}

fn read_text(path: &Path) -> Result<String, TokenizerError> {
    super::files::read_to_string_limited(path, super::files::MAX_TOKENIZER_BYTES).map_err(
        |source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        },
    )
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    serde_json::from_str(&read_text(path)?).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn read_optional_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    // A path that exists but is no regular file (a FIFO, a folder) is read, to be refused by name.
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

fn vocab_from_value(value: &Value, path: &Path) -> Result<HashMap<String, u32>, TokenizerError> {
    let map = value.as_object().ok_or_else(|| TokenizerError::Format {
        path: path.to_path_buf(),
        message: "the vocabulary is not a JSON object of token → id".into(),
    })?;
    map.iter()
        .map(|(token, id)| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| (token.clone(), id))
                .ok_or_else(|| TokenizerError::Format {
                    path: path.to_path_buf(),
                    message: format!("vocabulary entry {token:?} has id {id}, not a u32"),
                })
        })
        .collect()
}

fn load_vocab_json(path: &Path) -> Result<HashMap<String, u32>, TokenizerError> {
    vocab_from_value(&read_json(path)?, path)
}

/// `merges.txt`: an optional `#version` header, then one `left right` pair per line.
fn load_merges_txt(path: &Path) -> Result<Vec<(String, String)>, TokenizerError> {
    let text = read_text(path)?;
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if (index == 0 && line.starts_with("#version")) || line.is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()));
            }
            _ => {
                return Err(TokenizerError::BadMerge {
                    path: path.to_path_buf(),
                    line: index + 1,
                    text: line.to_string(),
                });
            }
        }
    }
    no_merges_is_an_error(&merges, path)?;
    Ok(merges)
}

/// A CLIP tokenizer without merges would split every word into single letters, which the text
/// encoder never saw: an empty or cut file is refused instead.
fn no_merges_is_an_error(merges: &[(String, String)], path: &Path) -> Result<(), TokenizerError> {
    if merges.is_empty() {
        return Err(TokenizerError::Format {
            path: path.to_path_buf(),
            message: "it has no merges (an empty or cut file would split every word into letters)"
                .to_string(),
        });
    }
    Ok(())
}

/// What the vocabulary files give, in either folder form.
struct BpeFiles {
    vocab: HashMap<String, u32>,
    /// Merge pairs in rank order.
    merges: Vec<(String, String)>,
    /// The file the merges came from, for errors.
    merges_path: PathBuf,
    /// The BPE model's own unk token (tokenizer.json only).
    unk_token: Option<String>,
    end_of_word_suffix: String,
    /// Added tokens listed by the files, with their flags.
    added: Vec<AddedToken>,
}

/// `tokenizer.json`: the BPE model's vocabulary, merges (either `"a b"` strings or `["a", "b"]`
/// pairs), unk token and word suffix, and the added tokens with their flags.
fn load_fast(path: &Path) -> Result<BpeFiles, TokenizerError> {
    let json = read_json(path)?;
    let format = |message: String| TokenizerError::Format {
        path: path.to_path_buf(),
        message,
    };
    let model = json
        .get("model")
        .ok_or_else(|| format("no \"model\" section".into()))?;
    match model.get("type").and_then(Value::as_str) {
        Some("BPE") | None => {}
        Some(other) => return Err(format(format!("model type {other:?}, expected \"BPE\""))),
    }
    let vocab = vocab_from_value(
        model
            .get("vocab")
            .ok_or_else(|| format("model has no \"vocab\"".into()))?,
        path,
    )?;
    let merge_values = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| format("model has no \"merges\" list".into()))?;
    let mut merges = Vec::with_capacity(merge_values.len());
    for (index, merge) in merge_values.iter().enumerate() {
        let pair = match merge {
            Value::String(s) => {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Some((a.to_string(), b.to_string())),
                    _ => None,
                }
            }
            Value::Array(items) => match items.as_slice() {
                [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| TokenizerError::BadMerge {
            path: path.to_path_buf(),
            line: index + 1,
            text: merge.to_string(),
        })?);
    }
    no_merges_is_an_error(&merges, path)?;
    let unk = model
        .get("unk_token")
        .and_then(Value::as_str)
        .map(str::to_string);
    let suffix = model
        .get("end_of_word_suffix")
        .and_then(Value::as_str)
        .unwrap_or("</w>")
        .to_string();
    let mut added = Vec::new();
    if let Some(list) = json.get("added_tokens").and_then(Value::as_array) {
        for entry in list {
            let content = entry.get("content").and_then(Value::as_str);
            let id = entry
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok());
            let (Some(content), Some(id)) = (content, id) else {
                return Err(format(format!(
                    "added token {entry} lacks a content or an id"
                )));
            };
            added.push(AddedToken::from_entry(content, id, entry));
        }
    }
    Ok(BpeFiles {
        vocab,
        merges,
        merges_path: path.to_path_buf(),
        unk_token: unk,
        end_of_word_suffix: suffix,
        added,
    })
}

/// `added_tokens_decoder` of a newer `tokenizer_config.json` (id → token dict), if any.
fn config_added_tokens(
    config: Option<&Value>,
    path: &Path,
) -> Result<Vec<AddedToken>, TokenizerError> {
    let Some(map) = config
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(Value::as_object)
    else {
        return Ok(Vec::new());
    };
    let mut added = Vec::new();
    for (id, entry) in map {
        let parsed_id = id.parse::<u32>().ok();
        let content = entry.get("content").and_then(Value::as_str);
        let (Some(id), Some(content)) = (parsed_id, content) else {
            return Err(TokenizerError::Format {
                path: path.to_path_buf(),
                message: format!("added_tokens_decoder entry {id:?} is not an id with a content"),
            });
        };
        added.push(AddedToken::from_entry(content, id, entry));
    }
    added.sort_by_key(|t| t.id);
    Ok(added)
}

/// A special token as a config file gives it: a plain string (matched on raw text) or an
/// `AddedToken` object with its own `normalized` flag (false when absent, as for special tokens).
fn special_spec(config: Option<&Value>, key: &str) -> Option<SpecialTokenSpec> {
    match config?.get(key)? {
        Value::String(content) => Some(SpecialTokenSpec {
            content: content.clone(),
            normalized: false,
        }),
        Value::Object(fields) => Some(SpecialTokenSpec {
            content: fields.get("content")?.as_str()?.to_string(),
            normalized: fields
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }),
        _ => None,
    }
}

/// Turns merge pairs into id pairs with their rank and merged id; every symbol and every merged
/// token must be in the vocabulary (as `tokenizers` requires).
fn index_merges(
    vocab: &HashMap<String, u32>,
    pairs: Vec<(String, String)>,
    path: &Path,
) -> Result<MergeMap, TokenizerError> {
    let mut merges = HashMap::with_capacity(pairs.len());
    for (rank, (a, b)) in pairs.into_iter().enumerate() {
        let merged = format!("{a}{b}");
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| TokenizerError::MergeNotInVocab {
                    path: path.to_path_buf(),
                    merge: format!("{a} {b}"),
                    token: token.to_string(),
                })
        };
        let key = (id(&a)?, id(&b)?);
        let value = (rank as u32, id(&merged)?);
        // A repeated pair takes its last rank, as `tokenizers` builds its map.
        merges.insert(key, value);
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip_vit_l() -> ClipTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/clip-vit-l");
        ClipTokenizer::from_dir(&dir).expect("the committed CLIP tokenizer loads")
    }

    /// The textbook loop `bpe` replaces: rescan every pair, merge the lowest-ranked, leftmost.
    fn bpe_by_rescanning(tokenizer: &ClipTokenizer, word: &str) -> Vec<u32> {
        let chars: Vec<char> = word.chars().collect();
        let mut symbols: Vec<u32> = chars
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut s = c.to_string();
                if i + 1 == chars.len() {
                    s.push_str(&tokenizer.end_of_word_suffix);
                }
                tokenizer.vocab.get(&s).copied().unwrap_or(tokenizer.unk_id)
            })
            .collect();
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(pos, pair)| {
                    tokenizer
                        .merges
                        .get(&(pair[0], pair[1]))
                        .map(|&(rank, merged)| (rank, pos, merged))
                })
                .min_by_key(|&(rank, pos, _)| (rank, pos));
            let Some((_, pos, merged)) = best else { break };
            symbols[pos] = merged;
            symbols.remove(pos + 1);
        }
        symbols
    }

    /// A few hundred pseudo-random letters drawn from `alphabet` (a fixed LCG, so reproducible).
    fn word_from(alphabet: &[char], len: usize, seed: u64) -> String {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                alphabet[(state >> 33) as usize % alphabet.len()]
            })
            .collect()
    }

    #[test]
    fn heap_bpe_gives_the_ids_of_the_rescanning_loop_on_long_words() {
        let tokenizer = clip_vit_l();
        let letters: Vec<char> = "abcdefghijklmnopqrstuvwxyz".chars().collect();
        let vowels_heavy: Vec<char> = "aeiouaeiourstln".chars().collect();
        let mut words = vec![
            "a".repeat(700),
            "ab".repeat(350),
            "snowy".repeat(120),
            "mountainsnowylakeforest".repeat(30),
            "x".to_string(),
            "the".to_string(),
        ];
        for seed in 0..6 {
            words.push(word_from(&letters, 600, seed));
            words.push(word_from(&vowels_heavy, 600, seed + 100));
        }
        for word in &words {
            let mut got = Vec::new();
            tokenizer.bpe(word, &mut got);
            let expected = bpe_by_rescanning(&tokenizer, word);
            assert!(
                expected.len() > 1 || word.len() < 4,
                "{word:.30}: merged to one token?"
            );
            assert_eq!(got, expected, "word {word:.40}… ({} chars)", word.len());
        }
    }

    #[test]
    fn the_cut_before_bpe_keeps_the_ids_the_whole_text_gives() {
        let tokenizer = clip_vit_l();
        let max = tokenizer.model_max_length();
        let prompts = [
            // Many pieces: the cut stops after the first 77 ids' worth.
            "make the mountains snowy and the sky a deep evening blue ".repeat(40),
            // Pieces that give several ids each, straddling the cut.
            "unbelievably-overcomplicated, antidisestablishmentarianism! ".repeat(30),
            // Added tokens among the words.
            "a <|endoftext|> b <|startoftext|> ".repeat(60),
            // One word far past the cut, after a few short ones.
            format!("turn it into {}", "snow".repeat(500)),
            // Exactly at the limit and one past it.
            "a ".repeat(max - 2),
            "a ".repeat(max - 1),
        ];
        for prompt in &prompts {
            let full = tokenizer.encode(prompt);
            let mut expected = full.clone();
            if expected.len() > max {
                expected.truncate(max - 1);
                expected.push(tokenizer.eos_id);
            }
            expected.resize(max, tokenizer.pad_id);
            assert_eq!(tokenizer.encode_for_model(prompt), expected, "{prompt:.50}");
        }
        // The cut really stops early: far fewer pieces are encoded than the text has.
        let long = "snowy ".repeat(10_000);
        assert_eq!(tokenizer.encode_prefix(&long, max).len(), max);
        assert_eq!(tokenizer.encode(&long).len(), 10_002);
    }
}
