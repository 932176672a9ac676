//! Training data for fine-tuning, as `train_instruct_pix2pix.py` reads and prepares it: where the
//! examples come from, checking them, the epoch sampler and the preprocessing into tensors.
//!
//! # Sources
//! Every source gives the same [`Example`] (input image, edited image, instruction, a name for
//! messages). Opening a dataset lists its examples without decoding any image; each is read and
//! decoded when [`Dataset::load`] asks for it. Images are decoded as the `datasets` `Image`
//! feature does (EXIF orientation applied, then `convert("RGB")`), by
//! [`crate::pipeline::image`]'s decoder.
//!
//! - **imagefolder** ([`Dataset::open_image_folder`]): a folder with `metadata.jsonl` (or
//!   `train/metadata.jsonl`, a split folder as Hugging Face `datasets` finds it), one JSON object
//!   per line. The columns named by [`Columns`] (default `input_image`, `edit_prompt`,
//!   `edited_image`, the script's `--original_image_column`, `--edit_prompt_column`,
//!   `--edited_image_column`) hold the two image file names, relative to the folder of
//!   `metadata.jsonl`, and the instruction. An image column may also be spelled
//!   `<column>_file_name`, as newer `datasets` write it. Other columns are ignored. A column missing
//!   from every row is an error at open; a missing value in some rows, a line that is not a JSON
//!   object, or a value of the wrong type makes that row a bad example (see [`Dataset::check`]).
//!   Blank lines are skipped.
//! - **Parquet** ([`Dataset::open_parquet_folder`]): the `.parquet` files of a downloaded Hugging
//!   Face dataset, anywhere under the folder (symbolic links followed, as in a Hub cache snapshot).
//!   Image columns are `struct<bytes: binary, path: string>` (the `datasets` `Image` feature) or
//!   plain binary; the instruction is a string column. When some file paths name a split (a path
//!   word — split at `/ - _ .`, spaces and digits — equal to `train`, `test`, `validation`,
//!   `valid`, `val`, `dev` or `eval`), only the `train` files are used, as `dataset["train"]`;
//!   otherwise all. Files are taken in path order, rows in file order. Codecs: uncompressed,
//!   snappy and gzip (others give an error naming the file). Writers put a whole row group in one
//!   compressed page, so a row is read with its group; recently read groups stay in memory within
//!   a budget ([`Dataset::set_row_group_cache_bytes`], 1 GiB by default), so an epoch over a
//!   dataset that fits reads each group once (and [`Dataset::check`] leaves them ready).
//! - **Hub dataset id** ([`Dataset::open_dataset_name`] with `owner/name`): downloaded with hf-hub
//!   into the Hugging Face cache (`datasets--owner--name/snapshots/<commit>/` and
//!   `refs/<revision>`, as `huggingface-cli download --repo-type dataset owner/name` leaves it;
//!   what is already there is not fetched again), only the files training reads: the Parquet
//!   files (the train split's, when their names say splits), else every file of an imagefolder
//!   or pairs repo. The snapshot is then read as a local folder. Offline (`HF_HUB_OFFLINE`) or
//!   when the Hub cannot be reached, the cached snapshot is used, and a dataset not in the cache
//!   is an error saying so.
//! - **Pairs made by hand** ([`Dataset::open_pairs`]): in one folder (sub-folders are not read),
//!   - `NAME.txt` holds the instruction (UTF-8; leading and trailing white space removed);
//!   - `NAME.EXT` is the input image and `NAME_edited.EXT` the edited one, where each `EXT` is
//!     independently one of `png`, `jpg`, `jpeg`, `webp` (any letter case);
//!   - so every `NAME.txt` makes one example, listed in file-name order;
//!   - an image named `NAME_edited.EXT` is the edited image of `NAME` when a `NAME.txt` or an
//!     image `NAME.EXT` is beside it; any other image is the input image of its own name;
//!   - bad examples (listed by [`Dataset::check`], not errors at open): a `NAME.txt` without its
//!     input or edited image, two input (or two edited) images for one name (`a.png` and
//!     `a.jpg`), an image with no `.txt` for its name, a file name that is not UTF-8;
//!   - ignored: hidden files (starting with `.`), files with other extensions, sub-folders;
//!   - a folder with no `.txt` and no image at all is an error at open.
//!
//! `--train_data_dir` ([`Dataset::open_train_data_dir`]) is an imagefolder when it has a
//! `metadata.jsonl` (or `train/metadata.jsonl`), else a folder of pairs. `--dataset_name`
//! ([`Dataset::open_dataset_name`]) is a local folder (Parquet files under it, else as
//! `--train_data_dir`; a `datasets--owner--name` cache folder resolves its `refs/main`) or a Hub id.
//!
//! `--max_train_samples` ([`DatasetOptions::max_train_samples`]) keeps the first N examples after
//! a shuffle seeded by `--seed`, as the script's `shuffle(seed).select(range(N))`: deterministic
//! from the seed, not the same order as Hugging Face's shuffle. N larger than the dataset keeps
//! all (where `datasets` would raise).
//!
//! # Checking
//! [`Dataset::check`] visits every example and reports counts and each bad example by name with
//! the reason; [`CheckReport::good`] lists the good indices for [`Dataset::subset`], to train on
//! those only. A bad example met during training is a [`DataError::BadExample`] naming it, never
//! a panic.
//!
//! # Batches and preprocessing
//! [`EpochSampler`] shuffles the indices per epoch (the script's `DataLoader(shuffle=True)`,
//! partial last batch kept), and its [`SamplerPosition`] restarts a resumed run at the same next
//! batch. [`prepare_batch`] is the script's `preprocess_train` + `collate_fn`: each image
//! `convert("RGB").resize((R, R))` (Pillow's BICUBIC, [`super::resize::resize_bicubic`]), the crop
//! to R (a no-op after that resize), the horizontal flip applied to input and edited image
//! together, `2 * (x / 255) - 1`, `[N, 3, R, R]` float32.
//!
//! In the script the flip is drawn once per *batch*: torch's `DataLoader` fetches a batch through
//! `datasets`' `__getitems__`, so the transform sees all the batch's images concatenated and
//! `RandomHorizontalFlip` makes one draw for them. [`FlipMode::PerBatch`] does the same;
//! [`FlipMode::PerExample`] draws one per example.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use image::RgbImage;
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::{Deserialize, Serialize};

use super::resize::resize_bicubic;
use crate::model::hub::{DownloadProgress, HubError, HubSettings, fetch_dataset};
use crate::pipeline::image::{ImageError, MAX_IMAGE_PIXELS, decode_image, load_image};

/// The script's default `--original_image_column`.
pub const DEFAULT_ORIGINAL_IMAGE_COLUMN: &str = "input_image";
/// The script's default `--edit_prompt_column`.
pub const DEFAULT_EDIT_PROMPT_COLUMN: &str = "edit_prompt";
/// The script's default `--edited_image_column`.
pub const DEFAULT_EDITED_IMAGE_COLUMN: &str = "edited_image";
/// The metadata file of an imagefolder dataset.
pub const METADATA_FILE: &str = "metadata.jsonl";
/// The suffix of an edited image's name in a folder of pairs.
pub const EDITED_SUFFIX: &str = "_edited";
/// Image extensions of a folder of pairs (compared without letter case).
pub const PAIR_IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];
/// Words in a Parquet file's path that name a split (see the module doc).
const SPLIT_WORDS: [&str; 7] = ["train", "test", "validation", "valid", "val", "dev", "eval"];
/// How deep [`Dataset::open_parquet_folder`] looks for `.parquet` files.
const MAX_FOLDER_DEPTH: usize = 8;

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The input image.
    pub original: RgbImage,
    /// The edited image (the target).
    pub edited: RgbImage,
    /// The edit instruction.
    pub prompt: String,
    /// Which file or row it came from, for messages.
    pub name: String,
}

/// The dataset columns holding the input image, the instruction and the edited image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Columns {
    /// `--original_image_column`.
    pub original_image: String,
    /// `--edit_prompt_column`.
    pub edit_prompt: String,
    /// `--edited_image_column`.
    pub edited_image: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            original_image: DEFAULT_ORIGINAL_IMAGE_COLUMN.to_string(),
            edit_prompt: DEFAULT_EDIT_PROMPT_COLUMN.to_string(),
            edited_image: DEFAULT_EDITED_IMAGE_COLUMN.to_string(),
        }
    }
}

/// How a dataset is opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DatasetOptions {
    /// Column names (imagefolder and Parquet).
    pub columns: Columns,
    /// `--max_train_samples`: keep the first N after a shuffle seeded by [`Self::seed`].
    pub max_train_samples: Option<usize>,
    /// `--seed` (the script's default is none; the caller picks one then).
    pub seed: u64,
}

/// What can go wrong opening a dataset or reading an example. Messages name the file or row.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The dataset path does not exist.
    #[error("dataset folder {} does not exist", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The path exists but holds no dataset this crate reads.
    #[error("{} is not a training dataset: {reason}", path.display())]
    NotADataset {
        /// The path.
        path: PathBuf,
        /// What was looked for.
        reason: String,
    },
    /// Reading a file or folder failed.
    #[error("cannot read {}: {reason}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// A column (see [`Columns`]) is in no row of the dataset.
    #[error("{}: there is no column {column:?} (columns: {available})", path.display())]
    MissingColumn {
        /// `metadata.jsonl` or the Parquet file.
        path: PathBuf,
        /// The column looked for.
        column: String,
        /// The columns that are there, comma-separated.
        available: String,
    },
    /// A Parquet file could not be read (corrupt, unsupported codec or type).
    #[error("cannot read Parquet file {}: {reason}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The reader's error.
        reason: String,
    },
    /// `--dataset_name` is neither a folder nor `owner/name`.
    #[error("cannot use {spec:?} as a dataset: {reason}")]
    InvalidName {
        /// The argument as given.
        spec: String,
        /// Why.
        reason: String,
    },
    /// A Hub dataset could not be fetched (or, offline, is not in the Hugging Face cache).
    #[error(transparent)]
    Hub(Box<HubError>),
    /// One example cannot be used (missing or undecodable file, bad row).
    #[error("bad training example {name}: {reason}")]
    BadExample {
        /// Its index in the dataset.
        index: usize,
        /// The example's name (file or row).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An index past the end of the dataset.
    #[error("example index {index} is out of range (the dataset has {len} examples)")]
    OutOfRange {
        /// The index asked for.
        index: usize,
        /// The dataset's size.
        len: usize,
    },
    /// A setting that cannot work (batch size 0, resolution 0, mismatched lengths).
    #[error("invalid setting: {0}")]
    InvalidSetting(String),
    /// Building a tensor failed.
    #[error("cannot build the batch tensors: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Where a dataset came from, for messages and the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetKind {
    /// An imagefolder; the path of its `metadata.jsonl`.
    ImageFolder(PathBuf),
    /// Parquet files (the train split), in order.
    Parquet(Vec<PathBuf>),
    /// A folder of pairs.
    Pairs(PathBuf),
}

/// An image reference of a file-based example, or why there is none.
type FileRef = Result<PathBuf, String>;

/// The instruction of a file-based example.
#[derive(Debug, Clone)]
enum PromptRef {
    /// Read at open (imagefolder).
    Text(String),
    /// Read at load (`NAME.txt` of a pair).
    File(PathBuf),
}

/// One example before it is read.
#[derive(Debug, Clone)]
enum Record {
    Files {
        name: String,
        original: FileRef,
        edited: FileRef,
        prompt: Result<PromptRef, String>,
    },
    Row {
        file: usize,
        group: usize,
        row: usize,
        /// The row's index in its file.
        row_in_file: usize,
    },
    Invalid {
        name: String,
        reason: String,
    },
}

/// One Parquet file: its reader and the leaf columns to read.
struct ParquetFile {
    path: PathBuf,
    /// The path shown in example names (relative to the dataset folder).
    shown: String,
    reader: SerializedFileReader<File>,
    original: usize,
    edited: usize,
    prompt: usize,
}

impl fmt::Debug for ParquetFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParquetFile")
            .field("path", &self.path)
            .field("row_groups", &self.reader.num_row_groups())
            .finish()
    }
}

/// A training dataset: the list of its examples, each read on demand.
#[derive(Debug, Clone)]
pub struct Dataset {
    kind: DatasetKind,
    records: Vec<Record>,
    parquet: Arc<Vec<ParquetFile>>,
    /// Recently read Parquet row groups, shared by the subsets of this dataset.
    group_cache: Arc<Mutex<GroupCache>>,
}

/// How many bytes of Parquet rows [`Dataset`] keeps in memory by default
/// ([`Dataset::set_row_group_cache_bytes`]).
pub const DEFAULT_ROW_GROUP_CACHE_BYTES: usize = 1 << 30;

/// Parquet row groups already read, least recently used first, within a byte budget.
///
/// Why: writers put a whole row group's images in one compressed page (pyarrow checks the page
/// size only every 1024 values, and `datasets` writes 100-row groups for images), so reading one
/// row means reading and decompressing its whole row group. Keeping groups lets an epoch over a
/// dataset that fits in the budget read every group once (and a [`Dataset::check`] before
/// training leaves them ready).
#[derive(Debug)]
struct GroupCache {
    budget: usize,
    used: usize,
    /// (file, row group), its rows, their size in bytes.
    entries: VecDeque<(GroupKey, Arc<Vec<RawRow>>, usize)>,
}

/// A Parquet row group: (file index, row group index).
type GroupKey = (usize, usize);

/// The rows of a row group, or why they could not be read.
type GroupRows = Result<Arc<Vec<RawRow>>, String>;

impl GroupCache {
    fn new(budget: usize) -> Self {
        GroupCache {
            budget,
            used: 0,
            entries: VecDeque::new(),
        }
    }

    fn get(&mut self, key: GroupKey) -> Option<Arc<Vec<RawRow>>> {
        let at = self.entries.iter().position(|(k, _, _)| *k == key)?;
        let entry = self.entries.remove(at)?;
        let rows = Arc::clone(&entry.1);
        self.entries.push_back(entry);
        Some(rows)
    }

    fn insert(&mut self, key: GroupKey, rows: Arc<Vec<RawRow>>) {
        let size: usize = rows.iter().map(RawRow::size).sum();
        if size > self.budget {
            return;
        }
        while self.used + size > self.budget {
            match self.entries.pop_front() {
                Some((_, _, freed)) => self.used -= freed,
                None => break,
            }
        }
        self.used += size;
        self.entries.push_back((key, rows, size));
    }

    fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        while self.used > self.budget {
            match self.entries.pop_front() {
                Some((_, _, freed)) => self.used -= freed,
                None => break,
            }
        }
    }
}

/// How thoroughly [`Dataset::check`] looks at the images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckLevel {
    /// Files exist and their headers name a supported format and a usable size (fast; a file
    /// damaged after its header is found only when it is decoded).
    Headers,
    /// Decode every image, as training will.
    Decode,
}

/// A bad example found by [`Dataset::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Its index in the dataset.
    pub index: usize,
    /// Its name (file or row).
    pub name: String,
    /// What is wrong.
    pub reason: String,
}

/// The result of [`Dataset::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// How many examples the dataset lists.
    pub total: usize,
    /// The indices of the good examples, ascending.
    pub good: Vec<usize>,
    /// Every bad example, in index order.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when every example is good.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// One line: "12 examples: 10 good, 2 bad".
    pub fn summary(&self) -> String {
        format!(
            "{} examples: {} good, {} bad",
            self.total,
            self.good.len(),
            self.problems.len()
        )
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.summary())?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.name, p.reason)?;
        }
        Ok(())
    }
}

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
    /// described by `hub`, its snapshot read as a local folder (see the module doc).
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
    /// stopping it (with [`HubError::Cancelled`]) once `cancel` is set.
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
            let root = match resolve_cache_folder(&path, revision.unwrap_or("main")) {
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
        crate::model::hub::check_repo_id(trimmed).map_err(|reason| DataError::InvalidName {
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

    /// An imagefolder dataset (see the module doc).
    pub fn open_image_folder(dir: &Path, options: &DatasetOptions) -> Result<Self, DataError> {
        check_folder(dir)?;
        let metadata = find_metadata(dir).ok_or_else(|| DataError::NotADataset {
            path: dir.to_path_buf(),
            reason: format!("it has no {METADATA_FILE} (nor train/{METADATA_FILE})"),
        })?;
        let base = metadata.parent().unwrap_or(dir).to_path_buf();
        let file = File::open(&metadata).map_err(|e| io_error(&metadata, e))?;
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
    /// module doc).
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
            if !path.is_file() {
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

    /// The Parquet files of a downloaded dataset anywhere under `dir` (see the module doc).
    pub fn open_parquet_folder(dir: &Path, options: &DatasetOptions) -> Result<Self, DataError> {
        check_folder(dir)?;
        let mut files = Vec::new();
        collect_parquet(dir, 0, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(DataError::NotADataset {
                path: dir.to_path_buf(),
                reason: "it has no .parquet files".to_string(),
            });
        }
        let relative = |p: &PathBuf| {
            p.strip_prefix(dir)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        };
        let split_of = |p: &PathBuf| split_words(&relative(p));
        let any_split = files.iter().any(|p| !split_of(p).is_empty());
        if any_split {
            files.retain(|p| split_of(p).contains(&"train"));
            if files.is_empty() {
                return Err(DataError::NotADataset {
                    path: dir.to_path_buf(),
                    reason: "its .parquet files name splits, but none is the train split"
                        .to_string(),
                });
            }
        }
        let shown: Vec<String> = files.iter().map(relative).collect();
        Self::open_parquet_files_named(dir, &files, &shown, options)
    }

    /// These Parquet files, in this order (all of them, whatever their names).
    pub fn open_parquet_files(
        files: &[PathBuf],
        options: &DatasetOptions,
    ) -> Result<Self, DataError> {
        let shown: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        Self::open_parquet_files_named(Path::new("."), files, &shown, options)
    }

    fn open_parquet_files_named(
        dir: &Path,
        files: &[PathBuf],
        shown: &[String],
        options: &DatasetOptions,
    ) -> Result<Self, DataError> {
        if files.is_empty() {
            return Err(DataError::NotADataset {
                path: dir.to_path_buf(),
                reason: "no .parquet files were given".to_string(),
            });
        }
        let mut opened = Vec::with_capacity(files.len());
        let mut records = Vec::new();
        for (file_index, (path, shown)) in files.iter().zip(shown).enumerate() {
            let parquet = open_parquet_file(path, shown.clone(), &options.columns)?;
            let mut row_in_file = 0;
            for group in 0..parquet.reader.num_row_groups() {
                let rows = parquet.reader.metadata().row_group(group).num_rows().max(0) as usize;
                for row in 0..rows {
                    records.push(Record::Row {
                        file: file_index,
                        group,
                        row,
                        row_in_file,
                    });
                    row_in_file += 1;
                }
            }
            opened.push(parquet);
        }
        Ok(Self::finish(
            DatasetKind::Parquet(files.to_vec()),
            records,
            opened,
            options,
        ))
    }

    fn finish(
        kind: DatasetKind,
        mut records: Vec<Record>,
        parquet: Vec<ParquetFile>,
        options: &DatasetOptions,
    ) -> Self {
        if let Some(n) = options.max_train_samples {
            let order = shuffled_indices(records.len(), options.seed);
            let mut taken: Vec<Option<Record>> = records.into_iter().map(Some).collect();
            records = order
                .into_iter()
                .take(n)
                .filter_map(|i| taken[i].take())
                .collect();
        }
        Dataset {
            kind,
            records,
            parquet: Arc::new(parquet),
            group_cache: Arc::new(Mutex::new(GroupCache::new(DEFAULT_ROW_GROUP_CACHE_BYTES))),
        }
    }

    /// Where the examples come from.
    pub fn kind(&self) -> &DatasetKind {
        &self.kind
    }

    /// How many examples the dataset lists (good and bad).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when it lists no example.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The name of example `index` (file or row), for messages.
    pub fn name(&self, index: usize) -> Option<String> {
        self.records.get(index).map(|r| self.record_name(r))
    }

    fn record_name(&self, record: &Record) -> String {
        match record {
            Record::Files { name, .. } | Record::Invalid { name, .. } => name.clone(),
            Record::Row {
                file, row_in_file, ..
            } => match self.parquet.get(*file) {
                Some(f) => format!("{} row {row_in_file}", f.shown),
                None => format!("row {row_in_file}"),
            },
        }
    }

    /// The dataset restricted to these indices, in this order (e.g. [`CheckReport::good`]).
    /// Indices out of range are errors.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        let records = indices
            .iter()
            .map(|&i| {
                self.records.get(i).cloned().ok_or(DataError::OutOfRange {
                    index: i,
                    len: self.len(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Dataset {
            kind: self.kind.clone(),
            records,
            parquet: Arc::clone(&self.parquet),
            group_cache: Arc::clone(&self.group_cache),
        })
    }

    /// Reads and decodes example `index`. A missing, unreadable or undecodable file, or a bad
    /// row, is a [`DataError::BadExample`] naming it.
    pub fn load(&self, index: usize) -> Result<Example, DataError> {
        let record = self.records.get(index).ok_or(DataError::OutOfRange {
            index,
            len: self.len(),
        })?;
        let name = self.record_name(record);
        let bad = |reason: String| DataError::BadExample {
            index,
            name: name.clone(),
            reason,
        };
        match record {
            Record::Invalid { reason, .. } => Err(bad(reason.clone())),
            Record::Files {
                original,
                edited,
                prompt,
                ..
            } => {
                let original = original.as_ref().map_err(|r| bad(r.clone()))?;
                let edited = edited.as_ref().map_err(|r| bad(r.clone()))?;
                let prompt = read_prompt(prompt).map_err(&bad)?;
                let original = load_image(original).map_err(|e| bad(e.to_string()))?;
                let edited = load_image(edited).map_err(|e| bad(e.to_string()))?;
                Ok(Example {
                    original,
                    edited,
                    prompt,
                    name,
                })
            }
            Record::Row {
                file, group, row, ..
            } => {
                let rows = self.group_rows(*file, *group).map_err(&bad)?;
                let raw = rows
                    .get(*row)
                    .ok_or_else(|| bad("the row is missing from its row group".to_string()))?;
                let cell = |cell: &Result<Vec<u8>, String>, column: &str| {
                    let bytes = cell.as_ref().map_err(|r| bad(r.clone()))?;
                    decode_image(bytes, &format!("{name} {column}")).map_err(|e| bad(e.to_string()))
                };
                let original = cell(&raw.original, &raw.original_column)?;
                let edited = cell(&raw.edited, &raw.edited_column)?;
                let prompt = raw.prompt.clone().map_err(&bad)?;
                Ok(Example {
                    original,
                    edited,
                    prompt,
                    name,
                })
            }
        }
    }

    /// The rows of one Parquet row group, from the cache or read now.
    fn group_rows(&self, file: usize, group: usize) -> GroupRows {
        let lock = || self.group_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rows) = lock().get((file, group)) {
            return Ok(rows);
        }
        let parquet = self
            .parquet
            .get(file)
            .ok_or_else(|| "no such Parquet file".to_string())?;
        // Read without holding the lock: other threads may use other groups meanwhile.
        let rows = Arc::new(read_group(parquet, group)?);
        lock().insert((file, group), Arc::clone(&rows));
        Ok(rows)
    }

    /// How many bytes of Parquet rows (encoded images and prompts) to keep in memory between
    /// reads (default [`DEFAULT_ROW_GROUP_CACHE_BYTES`]; 0 keeps none). Shared with the datasets
    /// made from this one by [`Self::subset`].
    pub fn set_row_group_cache_bytes(&self, bytes: usize) {
        self.group_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_budget(bytes);
    }

    /// Loads the examples at `indices`, in order (the first bad one is the error).
    pub fn load_batch(&self, indices: &[usize]) -> Result<Vec<Example>, DataError> {
        indices.iter().map(|&i| self.load(i)).collect()
    }

    /// Visits every example and reports which are bad and why (see [`CheckLevel`]).
    pub fn check(&self, level: CheckLevel) -> CheckReport {
        self.check_with_progress(level, |_, _| {})
    }

    /// [`Self::check`], calling `progress(done, total)` after each example.
    pub fn check_with_progress(
        &self,
        level: CheckLevel,
        mut progress: impl FnMut(usize, usize),
    ) -> CheckReport {
        let total = self.len();
        let mut good = Vec::new();
        let mut problems = Vec::new();
        // The row group read last, so a group is read once even with no cache budget.
        let mut last_group: Option<(GroupKey, GroupRows)> = None;
        for (index, record) in self.records.iter().enumerate() {
            let outcome = match record {
                Record::Row {
                    file, group, row, ..
                } => {
                    let key = (*file, *group);
                    if last_group.as_ref().map(|(k, _)| *k) != Some(key) {
                        last_group = Some((key, self.group_rows(*file, *group)));
                    }
                    let name = self.record_name(record);
                    match last_group.as_ref().map(|(_, rows)| rows) {
                        Some(Ok(rows)) => match rows.get(*row) {
                            Some(raw) => check_raw_row(raw, &name, level),
                            None => Err("the row is missing from its row group".to_string()),
                        },
                        Some(Err(reason)) => Err(reason.clone()),
                        None => Err("cannot read this row".to_string()),
                    }
                }
                Record::Invalid { reason, .. } => Err(reason.clone()),
                Record::Files {
                    original,
                    edited,
                    prompt,
                    ..
                } => check_files(original, edited, prompt, level),
            };
            match outcome {
                Ok(()) => good.push(index),
                Err(reason) => problems.push(Problem {
                    index,
                    name: self.record_name(record),
                    reason,
                }),
            }
            progress(index + 1, total);
        }
        CheckReport {
            total,
            good,
            problems,
        }
    }
}

fn io_error(path: &Path, e: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn join<'a>(items: impl Iterator<Item = &'a String>) -> String {
    items.map(String::as_str).collect::<Vec<_>>().join(", ")
}

fn check_folder(dir: &Path) -> Result<(), DataError> {
    if dir.is_dir() {
        Ok(())
    } else if dir.exists() {
        Err(DataError::NotADataset {
            path: dir.to_path_buf(),
            reason: "it is a file, not a folder".to_string(),
        })
    } else {
        Err(DataError::NotFound {
            path: dir.to_path_buf(),
        })
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

fn read_prompt(prompt: &Result<PromptRef, String>) -> Result<String, String> {
    match prompt {
        Err(reason) => Err(reason.clone()),
        Ok(PromptRef::Text(text)) => Ok(text.clone()),
        Ok(PromptRef::File(path)) => match std::fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes)
                .map(|text| text.trim().to_string())
                .map_err(|_| format!("{} is not UTF-8 text", path.display())),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        },
    }
}

fn check_files(
    original: &FileRef,
    edited: &FileRef,
    prompt: &Result<PromptRef, String>,
    level: CheckLevel,
) -> Result<(), String> {
    let original = original.as_ref().map_err(Clone::clone)?;
    let edited = edited.as_ref().map_err(Clone::clone)?;
    read_prompt(prompt)?;
    for path in [original, edited] {
        match level {
            CheckLevel::Decode => load_image(path).map(drop).map_err(|e| e.to_string())?,
            CheckLevel::Headers => {
                let file = open_image_file(path)?;
                probe_image(BufReader::new(file), &path.display().to_string())?
            }
        }
    }
    Ok(())
}

/// Opens an image file; a missing one says "not found" as the edit path does.
fn open_image_file(path: &Path) -> Result<File, String> {
    File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::NotFound {
            path: path.to_path_buf(),
        }
        .to_string(),
        _ => format!("cannot read image {}: {e}", path.display()),
    })
}

/// A supported format with a non-empty size within [`MAX_IMAGE_PIXELS`], reading only as far as
/// the headers.
fn probe_image<R: BufRead + std::io::Seek>(input: R, name: &str) -> Result<(), String> {
    let reader = image::ImageReader::new(input)
        .with_guessed_format()
        .map_err(|e| format!("cannot read image {name}: {e}"))?;
    match reader.format() {
        Some(
            image::ImageFormat::Png
            | image::ImageFormat::Jpeg
            | image::ImageFormat::WebP
            | image::ImageFormat::Bmp
            | image::ImageFormat::Tiff,
        ) => {}
        _ => {
            return Err(format!(
                "{name} is not a supported image (PNG, JPEG, WebP, BMP or TIFF expected)"
            ));
        }
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("cannot read image {name}: {e}"))?;
    if w == 0 || h == 0 {
        return Err(format!("image {name} is empty ({w}x{h} pixels)"));
    }
    if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(format!(
            "image {name} is too large: {w}x{h} pixels, more than {MAX_IMAGE_PIXELS}"
        ));
    }
    Ok(())
}

fn check_raw_row(raw: &RawRow, name: &str, level: CheckLevel) -> Result<(), String> {
    let original = raw.original.as_ref().map_err(Clone::clone)?;
    let edited = raw.edited.as_ref().map_err(Clone::clone)?;
    raw.prompt.as_ref().map_err(Clone::clone)?;
    for (bytes, column) in [
        (original, &raw.original_column),
        (edited, &raw.edited_column),
    ] {
        let shown = format!("{name} {column}");
        match level {
            CheckLevel::Decode => decode_image(bytes, &shown)
                .map(drop)
                .map_err(|e| e.to_string())?,
            CheckLevel::Headers => probe_image(Cursor::new(bytes), &shown)?,
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parquet

/// One row's cells, not yet decoded.
#[derive(Debug, Clone)]
struct RawRow {
    original: Result<Vec<u8>, String>,
    edited: Result<Vec<u8>, String>,
    prompt: Result<String, String>,
    original_column: String,
    edited_column: String,
}

impl RawRow {
    /// Bytes held (for the cache budget).
    fn size(&self) -> usize {
        let len = |cell: &Result<Vec<u8>, String>| cell.as_ref().map_or(0, Vec::len);
        len(&self.original) + len(&self.edited) + self.prompt.as_ref().map_or(0, String::len) + 64
    }
}

fn open_parquet_file(
    path: &Path,
    shown: String,
    columns: &Columns,
) -> Result<ParquetFile, DataError> {
    let parquet_error = |reason: String| DataError::Parquet {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| parquet_error(e.to_string()))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let leaves: Vec<(Vec<String>, PhysicalType)> = (0..schema.num_columns())
        .map(|i| {
            let column = schema.column(i);
            (column.path().parts().to_vec(), column.physical_type())
        })
        .collect();
    let find = |parts: &[&str]| {
        leaves.iter().position(|(p, t)| {
            *t == PhysicalType::BYTE_ARRAY
                && p.len() == parts.len()
                && p.iter().zip(parts).all(|(a, b)| a == b)
        })
    };
    let top_level: BTreeSet<String> = leaves
        .iter()
        .filter_map(|(p, _)| p.first().cloned())
        .collect();
    let missing = |column: &str| DataError::MissingColumn {
        path: path.to_path_buf(),
        column: column.to_string(),
        available: join(top_level.iter()),
    };
    let image_column = |column: &str| {
        find(&[column, "bytes"])
            .or_else(|| find(&[column]))
            .ok_or_else(|| missing(column))
    };
    let original = image_column(&columns.original_image)?;
    let edited = image_column(&columns.edited_image)?;
    let prompt = find(&[&columns.edit_prompt]).ok_or_else(|| missing(&columns.edit_prompt))?;
    Ok(ParquetFile {
        path: path.to_path_buf(),
        shown,
        reader,
        original,
        edited,
        prompt,
    })
}

/// All the rows of one row group.
fn read_group(parquet: &ParquetFile, group: usize) -> Result<Vec<RawRow>, String> {
    let fail = |e: parquet::errors::ParquetError| {
        format!("cannot read Parquet file {}: {e}", parquet.path.display())
    };
    let group_reader = parquet.reader.get_row_group(group).map_err(fail)?;
    let rows_in_group = group_reader.metadata().num_rows().max(0) as usize;
    let take = rows_in_group;
    let schema = parquet.reader.metadata().file_metadata().schema_descr_ptr();
    let read_column = |leaf: usize| -> Result<Vec<Option<Vec<u8>>>, String> {
        let max_def = schema.column(leaf).max_def_level();
        let ColumnReader::ByteArrayColumnReader(mut reader) =
            group_reader.get_column_reader(leaf).map_err(fail)?
        else {
            return Err(format!(
                "{}: column {} is not binary",
                parquet.path.display(),
                schema.column(leaf).path()
            ));
        };
        let mut defs = Vec::new();
        let mut values = Vec::new();
        let mut records = 0;
        while records < take {
            let (got, _, _) = reader
                .read_records(take - records, Some(&mut defs), None, &mut values)
                .map_err(fail)?;
            if got == 0 {
                break;
            }
            records += got;
        }
        let mut values = values.into_iter();
        let cells = if max_def == 0 {
            values.map(|v| Some(v.data().to_vec())).collect()
        } else {
            defs.iter()
                .map(|&d| {
                    if d == max_def {
                        values.next().map(|v| v.data().to_vec())
                    } else {
                        None
                    }
                })
                .collect()
        };
        Ok(cells)
    };
    let originals = read_column(parquet.original)?;
    let editeds = read_column(parquet.edited)?;
    let prompts = read_column(parquet.prompt)?;
    let column_name = |leaf: usize| {
        schema
            .column(leaf)
            .path()
            .parts()
            .first()
            .cloned()
            .unwrap_or_default()
    };
    let (original_column, edited_column, prompt_column) = (
        column_name(parquet.original),
        column_name(parquet.edited),
        column_name(parquet.prompt),
    );
    let n = originals.len().min(editeds.len()).min(prompts.len());
    let null = |column: &str| format!("column {column:?} is empty (null) in this row");
    Ok((0..n)
        .map(|i| RawRow {
            original: originals[i].clone().ok_or_else(|| null(&original_column)),
            edited: editeds[i].clone().ok_or_else(|| null(&edited_column)),
            prompt: match &prompts[i] {
                Some(bytes) => String::from_utf8(bytes.clone())
                    .map_err(|_| format!("column {prompt_column:?} is not UTF-8 text")),
                None => Err(null(&prompt_column)),
            },
            original_column: original_column.clone(),
            edited_column: edited_column.clone(),
        })
        .collect())
}

fn collect_parquet(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    if depth > MAX_FOLDER_DEPTH {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_parquet(&path, depth + 1, out)?;
        } else if path.is_file()
            && path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
        {
            out.push(path);
        }
    }
    Ok(())
}

fn has_parquet(dir: &Path) -> bool {
    let mut files = Vec::new();
    collect_parquet(dir, 0, &mut files).is_ok() && !files.is_empty()
}

/// The split words of a path relative to the dataset folder (see the module doc).
fn split_words(relative: &str) -> Vec<&'static str> {
    let lower = relative.to_ascii_lowercase();
    let words: BTreeSet<&str> = lower
        .split(|c: char| matches!(c, '/' | '\\' | '-' | '_' | '.' | ' ') || c.is_ascii_digit())
        .collect();
    SPLIT_WORDS
        .into_iter()
        .filter(|w| words.contains(w))
        .collect()
}

/// A `datasets--owner--name` (or `models--…`) cache folder given as a path: its snapshot for
/// `revision`, when it has one.
fn resolve_cache_folder(dir: &Path, revision: &str) -> Option<PathBuf> {
    if !dir.join("snapshots").is_dir() {
        return None;
    }
    resolve_revision(dir, revision).ok()
}

fn resolve_revision(repo_dir: &Path, revision: &str) -> Result<PathBuf, String> {
    let snapshots = repo_dir.join("snapshots");
    let is_hash = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    if is_hash && snapshots.join(revision).is_dir() {
        return Ok(snapshots.join(revision));
    }
    if revision
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(format!("{revision:?} is not a branch, tag or commit name"));
    }
    let ref_path = repo_dir.join("refs").join(revision);
    let commit = std::fs::read_to_string(&ref_path)
        .map_err(|_| format!("no ref for revision {revision} ({})", ref_path.display()))?;
    let commit = commit.trim();
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.starts_with('.') {
        return Err(format!("{} holds no commit hash", ref_path.display()));
    }
    let snapshot = snapshots.join(commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(format!(
            "{} points to commit {commit} but {} is missing",
            ref_path.display(),
            snapshot.display()
        ))
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

// ---------------------------------------------------------------------------------------------
// Deterministic shuffling

/// SplitMix64: a small generator whose output is fixed forever (unlike `rand`'s `StdRng`), so a
/// resumed run shuffles exactly as the first one did.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), without modulo bias.
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }
}

/// A generator for one purpose (`stream`) and position, independent of the others.
fn stream(seed: u64, stream: u64, a: u64, b: u64) -> SplitMix64 {
    let mut mix = SplitMix64::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let x = mix.next_u64() ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut mix = SplitMix64::new(x);
    let y = mix.next_u64() ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    SplitMix64::new(y)
}

const STREAM_SELECT: u64 = 1;
const STREAM_EPOCH: u64 = 2;
const STREAM_FLIP: u64 = 3;

fn permutation(len: usize, mut rng: SplitMix64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    // Fisher–Yates.
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// `0..len` shuffled by `seed`: the order `--max_train_samples` takes its first N from.
pub fn shuffled_indices(len: usize, seed: u64) -> Vec<usize> {
    permutation(len, stream(seed, STREAM_SELECT, 0, 0))
}

// ---------------------------------------------------------------------------------------------
// Sampler

/// Where the sampler is: the epoch, and how many batches of it were already given out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerPosition {
    /// The epoch (0-based).
    pub epoch: u64,
    /// Batches of this epoch already given out (0-based index of the next one).
    pub batch: usize,
}

/// How images are flipped (the script's `--random_flip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlipMode {
    /// No flips (no `--random_flip`).
    Never,
    /// One draw per batch, as the script does (see the module doc).
    PerBatch,
    /// One draw per example.
    PerExample,
}

/// One batch from [`EpochSampler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The position this batch was taken at (resuming there gives this batch again).
    pub position: SamplerPosition,
    /// Dataset indices, `batch_size` of them (fewer in an epoch's last batch).
    pub indices: Vec<usize>,
    /// Whether to flip each example (input and edited together), one per index.
    pub flips: Vec<bool>,
}

/// The script's `DataLoader(shuffle=True, batch_size)`: every epoch a new order of the dataset
/// drawn from `(seed, epoch)`, cut into batches (the last one may be short). Everything follows
/// from `(seed, position)`, so a sampler rebuilt at a saved [`SamplerPosition`] gives the same
/// batches as the one that saved it. Endless: the caller stops after the steps it wants.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    len: usize,
    batch_size: usize,
    seed: u64,
    flip: FlipMode,
    position: SamplerPosition,
    /// The order of `position.epoch`.
    order: Vec<usize>,
}

impl EpochSampler {
    /// A sampler at the start of epoch 0. `len` and `batch_size` must be at least 1.
    pub fn new(
        len: usize,
        batch_size: usize,
        seed: u64,
        flip: FlipMode,
    ) -> Result<Self, DataError> {
        Self::resume(len, batch_size, seed, flip, SamplerPosition::default())
    }

    /// A sampler continuing at `position` (from [`Self::position`] of an earlier run with the
    /// same dataset, batch size, seed and flip mode).
    pub fn resume(
        len: usize,
        batch_size: usize,
        seed: u64,
        flip: FlipMode,
        position: SamplerPosition,
    ) -> Result<Self, DataError> {
        if len == 0 {
            return Err(DataError::InvalidSetting(
                "the dataset has no examples to train on".to_string(),
            ));
        }
        if batch_size == 0 {
            return Err(DataError::InvalidSetting(
                "the batch size must be at least 1".to_string(),
            ));
        }
        let batches = len.div_ceil(batch_size);
        if position.batch > batches {
            return Err(DataError::InvalidSetting(format!(
                "cannot resume at batch {} of epoch {}: an epoch has {batches} batches",
                position.batch, position.epoch
            )));
        }
        Ok(EpochSampler {
            len,
            batch_size,
            seed,
            flip,
            position,
            order: Self::epoch_order(len, seed, position.epoch),
        })
    }

    /// The order of the dataset in `epoch`.
    pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
        permutation(len, stream(seed, STREAM_EPOCH, epoch, 0))
    }

    /// Batches per epoch: `ceil(len / batch_size)` (the script's `len(train_dataloader)`).
    pub fn batches_per_epoch(&self) -> usize {
        self.len.div_ceil(self.batch_size)
    }

    /// Where the next batch comes from (save it with a checkpoint).
    pub fn position(&self) -> SamplerPosition {
        self.position
    }

    /// The next batch; moves to the next epoch after its last batch.
    pub fn next_batch(&mut self) -> Batch {
        if self.position.batch >= self.batches_per_epoch() {
            self.position = SamplerPosition {
                epoch: self.position.epoch + 1,
                batch: 0,
            };
            self.order = Self::epoch_order(self.len, self.seed, self.position.epoch);
        }
        let position = self.position;
        let start = position.batch * self.batch_size;
        let end = (start + self.batch_size).min(self.len);
        let indices = self.order[start..end].to_vec();
        let flips = self.flips(position, indices.len());
        self.position.batch += 1;
        Batch {
            position,
            indices,
            flips,
        }
    }

    fn flips(&self, position: SamplerPosition, n: usize) -> Vec<bool> {
        let mut rng = stream(
            self.seed,
            STREAM_FLIP,
            position.epoch,
            position.batch as u64,
        );
        match self.flip {
            FlipMode::Never => vec![false; n],
            FlipMode::PerBatch => vec![rng.next_u64() >> 63 == 1; n],
            FlipMode::PerExample => (0..n).map(|_| rng.next_u64() >> 63 == 1).collect(),
        }
    }
}

impl Iterator for EpochSampler {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

// ---------------------------------------------------------------------------------------------
// Preprocessing

/// The script's crop (`--center_crop` or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CropMode {
    /// `transforms.CenterCrop(resolution)`.
    Center,
    /// `transforms.RandomCrop(resolution)` (the script's default).
    #[default]
    Random,
}

/// The script's `convert_to_np` without the transpose: `image.convert("RGB").resize((R, R))`
/// with Pillow's default BICUBIC filter.
pub fn resize_to_square(img: &RgbImage, resolution: u32) -> RgbImage {
    resize_bicubic(img, resolution, resolution)
}

/// The crop to `resolution`. After [`resize_to_square`] the image already has that size, and
/// both torchvision crops are then the identity (`RandomCrop` returns the whole image without a
/// random draw when the sizes match); other sizes are cropped at the centre for both modes
/// (torchvision's `CenterCrop` offsets, Python's `round((size - R) / 2)`, halves to even), padding with black where the
/// image is smaller.
pub fn crop_to(img: &RgbImage, resolution: u32, _mode: CropMode) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (resolution, resolution) {
        return img.clone();
    }
    let offset = |size: u32| -> i64 {
        ((i64::from(size) - i64::from(resolution)) as f64 / 2.0).round_ties_even() as i64
    };
    let (left, top) = (offset(w), offset(h));
    RgbImage::from_fn(resolution, resolution, |x, y| {
        let (sx, sy) = (i64::from(x) + left, i64::from(y) + top);
        if sx >= 0 && sy >= 0 && sx < i64::from(w) && sy < i64::from(h) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// A batch ready for a training step (the script's `collate_fn` output): what
/// [`super::step::TrainingModels::micro_batch_loss`] takes; it tokenizes the prompts itself.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// `original_pixel_values`: `[N, 3, R, R]` float32 in [-1, 1].
    pub original_pixel_values: Tensor,
    /// `edited_pixel_values`: `[N, 3, R, R]` float32 in [-1, 1].
    pub edited_pixel_values: Tensor,
    /// The instructions, in batch order (tokenize them for `input_ids`).
    pub prompts: Vec<String>,
    /// The examples' names, for messages.
    pub names: Vec<String>,
}

/// The script's `preprocess_train` + `collate_fn` for `examples` with one flip decision each:
/// resize to `resolution`² (BICUBIC), crop, flip input and edited image together when
/// `flips[i]`, `2 * (x / 255) - 1` in float32, CHW, stacked.
pub fn prepare_batch(
    examples: &[Example],
    flips: &[bool],
    resolution: u32,
    crop: CropMode,
    device: &Device,
) -> Result<TrainBatch, DataError> {
    if examples.is_empty() {
        return Err(DataError::InvalidSetting(
            "a batch needs at least one example".to_string(),
        ));
    }
    if flips.len() != examples.len() {
        return Err(DataError::InvalidSetting(format!(
            "{} flip decisions for {} examples",
            flips.len(),
            examples.len()
        )));
    }
    if resolution == 0 {
        return Err(DataError::InvalidSetting(
            "the resolution must be at least 1".to_string(),
        ));
    }
    let r = resolution as usize;
    let plane = r * r;
    let mut original = Vec::with_capacity(examples.len() * 3 * plane);
    let mut edited = Vec::with_capacity(examples.len() * 3 * plane);
    for (example, &flip) in examples.iter().zip(flips) {
        for (img, out) in [
            (&example.original, &mut original),
            (&example.edited, &mut edited),
        ] {
            let square = crop_to(&resize_to_square(img, resolution), resolution, crop);
            push_chw(&square, flip, out);
        }
    }
    let n = examples.len();
    Ok(TrainBatch {
        original_pixel_values: Tensor::from_vec(original, (n, 3, r, r), device)?,
        edited_pixel_values: Tensor::from_vec(edited, (n, 3, r, r), device)?,
        prompts: examples.iter().map(|e| e.prompt.clone()).collect(),
        names: examples.iter().map(|e| e.name.clone()).collect(),
    })
}

/// Appends `img` as CHW float32 `2 * (x / 255) - 1` (torch's float32 arithmetic), mirrored left
/// to right when `flip`.
fn push_chw(img: &RgbImage, flip: bool, out: &mut Vec<f32>) {
    let (w, h) = img.dimensions();
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let sx = if flip { w - 1 - x } else { x };
                let v = f32::from(img.get_pixel(sx, y).0[c]);
                out.push(2.0f32 * (v / 255.0f32) - 1.0f32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_words_find_train_files() {
        assert_eq!(split_words("data/train-00000-of-00002.parquet"), ["train"]);
        assert_eq!(split_words("train/0.parquet"), ["train"]);
        assert_eq!(split_words("data/test-00000-of-00001.parquet"), ["test"]);
        assert!(split_words("data/00000.parquet").is_empty());
        // Words, not substrings.
        assert!(split_words("trains/evaluation.parquet").is_empty());
    }

    #[test]
    fn permutations_are_permutations_and_depend_on_the_seed() {
        let a = shuffled_indices(50, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, shuffled_indices(50, 2));
        assert_eq!(a, shuffled_indices(50, 1));
        assert_ne!(
            EpochSampler::epoch_order(50, 1, 0),
            EpochSampler::epoch_order(50, 1, 1)
        );
    }

    fn rows(bytes: usize) -> Arc<Vec<RawRow>> {
        Arc::new(vec![RawRow {
            original: Ok(vec![0; bytes]),
            edited: Err("null".to_string()),
            prompt: Ok(String::new()),
            original_column: "input_image".to_string(),
            edited_column: "edited_image".to_string(),
        }])
    }

    #[test]
    fn group_cache_keeps_recent_groups_within_its_budget() {
        // Each entry is 1000 bytes + 64 of overhead.
        let mut cache = GroupCache::new(2200);
        cache.insert((0, 0), rows(1000));
        cache.insert((0, 1), rows(1000));
        assert!(cache.get((0, 0)).is_some());
        // (0, 1) is now the least recently used: the third group evicts it.
        cache.insert((1, 0), rows(1000));
        assert!(cache.get((0, 1)).is_none());
        assert!(cache.get((0, 0)).is_some());
        assert!(cache.get((1, 0)).is_some());
        assert_eq!(cache.used, 2128);
        // A group larger than the whole budget is not kept (and evicts nothing).
        cache.insert((2, 0), rows(5000));
        assert!(cache.get((2, 0)).is_none());
        assert_eq!(cache.entries.len(), 2);
        cache.set_budget(0);
        assert_eq!((cache.used, cache.entries.len()), (0, 0));
    }

    #[test]
    fn dataset_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Dataset>();
    }
}
