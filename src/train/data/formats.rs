//! The file-based dataset forms and the dataset arguments: an imagefolder (`metadata.jsonl`), a
//! folder of pairs made by hand, `--train_data_dir` (one of those) and `--dataset_name` (a local
//! folder, a Hub cache folder, or a Hub dataset id, downloaded by
//! [`crate::model::hub::fetch_dataset`] with the files [`dataset_files_to_fetch`] picks). The
//! rules each form follows are in the `train::data` module doc.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use super::parquet::{has_parquet, split_words};
use super::{
    DataError, Dataset, DatasetKind, DatasetOptions, FileRef, PromptRef, Record, check_folder,
    io_error, join,
};
use crate::model::hub::{
    DownloadProgress, HubSettings, check_repo_id, fetch_dataset, snapshot_in_cache_folder,
};

/// The metadata file of an imagefolder dataset.
pub const METADATA_FILE: &str = "metadata.jsonl";
/// The suffix of an edited image's name in a folder of pairs.
pub const EDITED_SUFFIX: &str = "_edited";
/// Image extensions of a folder of pairs (compared without letter case).
pub const PAIR_IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

impl Dataset {
    /// `--train_data_dir`: an imagefolder when `dir` has `metadata.jsonl` or
    /// `train/metadata.jsonl`, else a folder of pairs.
    pub fn open_train_data_dir(dir: &Path, options: &DatasetOptions) -> Result<Self, DataError> {
        check_folder(dir)?;
        if find_metadata(dir).is_some() {
            Self::open_image_folder(dir, options)
        } else {
            Self::open_pairs(dir, options)
        }
    }

    /// `--dataset_name`: an existing folder (Parquet files under it, else as
    /// [`Self::open_train_data_dir`]; a `datasets--owner--name` cache folder uses its snapshot of
    /// `revision`, default `main`) or a Hub id `owner/name` at `revision` taken from the cache
    /// described by `hub`, its snapshot read as a local folder (see the `train::data` module doc).
    pub fn open_dataset_name(
        spec: &str,
        revision: Option<&str>,
        hub: &HubSettings,
        options: &DatasetOptions,
    ) -> Result<Self, DataError> {
        Self::fetch_dataset_name(
            spec,
            revision,
            hub,
            options,
            &mut |_| {},
            &AtomicBool::new(false),
        )
    }

    /// [`Self::open_dataset_name`], reporting a Hub dataset's download through `progress` and
    /// stopping it (with [`crate::model::hub::HubError::Cancelled`]) once `cancel` is set.
    pub fn fetch_dataset_name(
        spec: &str,
        revision: Option<&str>,
        hub: &HubSettings,
        options: &DatasetOptions,
        progress: &mut dyn FnMut(&DownloadProgress),
        cancel: &AtomicBool,
    ) -> Result<Self, DataError> {
        let trimmed = spec.trim();
        let path = match (trimmed.strip_prefix("~/"), std::env::home_dir()) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => PathBuf::from(trimmed),
        };
        if path.is_dir() {
            let root = match snapshot_in_cache_folder(&path, revision.unwrap_or("main")) {
                Some(snapshot) => snapshot,
                None => path,
            };
            return Self::open_local_folder(&root, options);
        }
        if path.exists() {
            return Err(DataError::NotADataset {
                path,
                reason: "it is a file, not a folder".to_string(),
            });
        }
        check_repo_id(trimmed).map_err(|reason| DataError::InvalidName {
            spec: spec.to_string(),
            reason: format!(
                "it is neither an existing folder nor a Hub dataset id owner/name ({reason})"
            ),
        })?;
        let revision = revision.map(str::trim).unwrap_or("main");
        let snapshot = fetch_dataset(
            trimmed,
            revision,
            hub,
            &dataset_files_to_fetch,
            progress,
            cancel,
        )
        .map_err(|e| DataError::Hub(Box::new(e)))?;
        Self::open_local_folder(&snapshot, options)
    }

    /// Parquet files under `root` if there are any, else `root` as `--train_data_dir`.
    fn open_local_folder(root: &Path, options: &DatasetOptions) -> Result<Self, DataError> {
        if has_parquet(root) {
            Self::open_parquet_folder(root, options)
        } else {
            Self::open_train_data_dir(root, options)
        }
    }

    /// An imagefolder dataset (see the `train::data` module doc).
    pub fn open_image_folder(dir: &Path, options: &DatasetOptions) -> Result<Self, DataError> {
        check_folder(dir)?;
        let metadata = find_metadata(dir).ok_or_else(|| DataError::NotADataset {
            path: dir.to_path_buf(),
            reason: format!("it has no {METADATA_FILE} (nor train/{METADATA_FILE})"),
        })?;
        let base = metadata.parent().unwrap_or(dir).to_path_buf();
        let (file, _) =
            crate::model::files::open_regular(&metadata).map_err(|e| io_error(&metadata, e))?;
        let columns = &options.columns;
        let mut records = Vec::new();
        let mut seen_columns = BTreeSet::new();
        let mut found = [false; 3];
        for (number, line) in BufReader::new(file).lines().enumerate() {
            let number = number + 1;
            let line = line.map_err(|e| io_error(&metadata, e))?;
            if line.trim().is_empty() {
                continue;
            }
            let row: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(&line)
            {
                Ok(row) => row,
                Err(e) => {
                    records.push(Record::Invalid {
                        name: format!("{METADATA_FILE} line {number}"),
                        reason: format!("not a JSON object: {e}"),
                    });
                    continue;
                }
            };
            seen_columns.extend(row.keys().cloned());
            let image_value = |column: &str| {
                row.get(column)
                    .or_else(|| row.get(&format!("{column}_file_name")))
            };
            let original = image_value(&columns.original_image);
            let edited = image_value(&columns.edited_image);
            let prompt = row.get(&columns.edit_prompt);
            found[0] |= original.is_some();
            found[1] |= prompt.is_some();
            found[2] |= edited.is_some();
            let name = match original.and_then(|v| v.as_str()) {
                Some(file) => format!("{METADATA_FILE} line {number} ({file})"),
                None => format!("{METADATA_FILE} line {number}"),
            };
            let image_ref = |value: Option<&serde_json::Value>, column: &str| -> FileRef {
                match value {
                    Some(serde_json::Value::String(file)) if !file.is_empty() => {
                        Ok(base.join(file))
                    }
                    Some(serde_json::Value::String(_)) => {
                        Err(format!("column {column:?} is empty"))
                    }
                    Some(other) => Err(format!("column {column:?} holds {other}, not a file name")),
                    None => Err(format!("no column {column:?} in this row")),
                }
            };
            let prompt = match prompt {
                Some(serde_json::Value::String(text)) => Ok(PromptRef::Text(text.clone())),
                Some(other) => Err(format!(
                    "column {:?} holds {other}, not text",
                    columns.edit_prompt
                )),
                None => Err(format!("no column {:?} in this row", columns.edit_prompt)),
            };
            records.push(Record::Files {
                name,
                original: image_ref(original, &columns.original_image),
                edited: image_ref(edited, &columns.edited_image),
                prompt,
            });
        }
        if records.is_empty() {
            return Err(DataError::NotADataset {
                path: metadata,
                reason: "it lists no examples".to_string(),
            });
        }
        let wanted = [
            &columns.original_image,
            &columns.edit_prompt,
            &columns.edited_image,
        ];
        if !seen_columns.is_empty() {
            for (column, found) in wanted.into_iter().zip(found) {
                if !found {
                    return Err(DataError::MissingColumn {
                        path: metadata,
                        column: column.clone(),
                        available: join(seen_columns.iter()),
                    });
                }
            }
        }
        Ok(Self::finish(
            DatasetKind::ImageFolder(metadata),
            records,
            Vec::new(),
            options,
        ))
    }

    /// A folder of `NAME.png` + `NAME_edited.png` + `NAME.txt` pairs (the exact rule is in the
    /// `train::data` module doc).
    pub fn open_pairs(dir: &Path, options: &DatasetOptions) -> Result<Self, DataError> {
        check_folder(dir)?;
        let entries = std::fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
        let mut texts = BTreeSet::new();
        // (stem, extension) of every image; `stem` is the file name without the extension.
        let mut images = Vec::new();
        let mut invalid = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_error(dir, e))?;
            let path = entry.path();
            // Folders are skipped; special files (a FIFO) are kept, to be refused by name when
            // read rather than reported as missing.
            if !path.exists() || path.is_dir() {
                continue;
            }
            let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
                invalid.push(Record::Invalid {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    reason: "the file name is not valid UTF-8".to_string(),
                });
                continue;
            };
            if file_name.starts_with('.') {
                continue;
            }
            let Some((stem, ext)) = file_name.rsplit_once('.') else {
                continue;
            };
            let ext_lower = ext.to_ascii_lowercase();
            if ext_lower == "txt" {
                texts.insert(stem.to_string());
            } else if PAIR_IMAGE_EXTENSIONS.contains(&ext_lower.as_str()) {
                images.push((stem.to_string(), file_name.clone()));
            }
        }
        if texts.is_empty() && images.is_empty() {
            return Err(DataError::NotADataset {
                path: dir.to_path_buf(),
                reason: format!(
                    "it has no {METADATA_FILE}, no train/{METADATA_FILE} and no NAME.txt + \
                     NAME.png + NAME{EDITED_SUFFIX}.png pairs"
                ),
            });
        }
        #[derive(Default)]
        struct Pair {
            originals: Vec<String>,
            editeds: Vec<String>,
        }
        let stems: BTreeSet<String> = images.iter().map(|(stem, _)| stem.clone()).collect();
        let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
        for (stem, file_name) in images {
            match stem.strip_suffix(EDITED_SUFFIX) {
                Some(base) if texts.contains(base) || stems.contains(base) => pairs
                    .entry(base.to_string())
                    .or_default()
                    .editeds
                    .push(file_name),
                _ => pairs.entry(stem).or_default().originals.push(file_name),
            }
        }
        for text in &texts {
            pairs.entry(text.clone()).or_default();
        }
        let mut records = invalid;
        for (name, mut pair) in pairs {
            pair.originals.sort();
            pair.editeds.sort();
            let pick = |files: &[String], what: &str, stem: &str| -> FileRef {
                match files {
                    [one] => Ok(dir.join(one)),
                    [] => Err(format!(
                        "no {what} image ({stem}.png, .jpg, .jpeg or .webp)"
                    )),
                    many => Err(format!("more than one {what} image: {}", many.join(", "))),
                }
            };
            let prompt = if texts.contains(&name) {
                let file = text_file(dir, &name);
                Ok(PromptRef::File(file))
            } else {
                Err(format!("no {name}.txt with the instruction"))
            };
            records.push(Record::Files {
                original: pick(&pair.originals, "input", &name),
                edited: pick(&pair.editeds, "edited", &format!("{name}{EDITED_SUFFIX}")),
                prompt,
                name,
            });
        }
        Ok(Self::finish(
            DatasetKind::Pairs(dir.to_path_buf()),
            records,
            Vec::new(),
            options,
        ))
    }
}

fn find_metadata(dir: &Path) -> Option<PathBuf> {
    [
        dir.join(METADATA_FILE),
        dir.join("train").join(METADATA_FILE),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// `NAME.txt`, or the same name with another letter case of `txt` that exists.
fn text_file(dir: &Path, name: &str) -> PathBuf {
    let plain = dir.join(format!("{name}.txt"));
    if plain.is_file() {
        return plain;
    }
    ["TXT", "Txt"]
        .iter()
        .map(|ext| dir.join(format!("{name}.{ext}")))
        .find(|p| p.is_file())
        .unwrap_or(plain)
}

pub(super) fn read_prompt(prompt: &Result<PromptRef, String>) -> Result<String, String> {
    match prompt {
        Err(reason) => Err(reason.clone()),
        Ok(PromptRef::Text(text)) => Ok(text.clone()),
        // A prompt is a line of text; a larger file (or a FIFO, a device) is not one.
        Ok(PromptRef::File(path)) => match crate::model::files::read_limited(path, 1 << 20) {
            Ok(bytes) => String::from_utf8(bytes)
                .map(|text| text.trim().to_string())
                .map_err(|_| format!("{} is not UTF-8 text", path.display())),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        },
    }
}

/// The files of a Hub dataset repo that training reads, from the repo's file list: its Parquet
/// files (only the train split's when their names say splits, as for a local folder), else,
/// for an imagefolder or a folder of pairs, every file but hidden ones (`.gitattributes`).
fn dataset_files_to_fetch(files: &BTreeSet<String>) -> Result<Vec<String>, String> {
    let visible = |file: &&String| !file.split('/').any(|part| part.starts_with('.'));
    let parquet: Vec<&String> = files
        .iter()
        .filter(visible)
        .filter(|f| f.to_ascii_lowercase().ends_with(".parquet"))
        .collect();
    if !parquet.is_empty() {
        let any_split = parquet.iter().any(|f| !split_words(f).is_empty());
        let chosen: Vec<String> = parquet
            .into_iter()
            .filter(|f| !any_split || split_words(f).contains(&"train"))
            .cloned()
            .collect();
        if chosen.is_empty() {
            return Err("its .parquet files name splits, but none is the train split".to_string());
        }
        return Ok(chosen);
    }
    let all: Vec<String> = files.iter().filter(visible).cloned().collect();
    let readable = all.iter().any(|f| {
        let name = f.rsplit('/').next().unwrap_or(f);
        let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
        name == METADATA_FILE
            || extension.is_some_and(|e| PAIR_IMAGE_EXTENSIONS.contains(&e.as_str()))
    });
    if !readable {
        return Err(format!(
            "it has no .parquet files, no {METADATA_FILE} and no images"
        ));
    }
    Ok(all)
}
