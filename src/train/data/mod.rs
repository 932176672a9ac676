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
//! - **Hub dataset id** ([`Dataset::open_dataset_name`] with `owner/name`): downloaded
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
//! `convert("RGB").resize((R, R))` (Pillow's BICUBIC, [`crate::train::resize::resize_bicubic`]), the crop
//! to R (a no-op after that resize), the horizontal flip applied to input and edited image
//! together, `2 * (x / 255) - 1`, `[N, 3, R, R]` float32.
//!
//! In the script the flip is drawn once per *batch*: torch's `DataLoader` fetches a batch through
//! `datasets`' `__getitems__`, so the transform sees all the batch's images concatenated and
//! `RandomHorizontalFlip` makes one draw for them. [`FlipMode::PerBatch`] does the same;
//! [`FlipMode::PerExample`] draws one per example.
//!
//! # Layout
//! The dataset model (an [`Example`], the list of records a [`Dataset`] holds, reading one) is
//! here; `formats` opens imagefolders, folders of pairs and `--dataset_name` (a Hub dataset's
//! download is [`crate::model::hub::fetch_dataset`]; which of its files training reads is
//! decided in `formats`), `parquet` reads Parquet files, `check` checks examples, `sampler`
//! shuffles and batches indices, and `batch` turns examples into tensors.

mod batch;
mod check;
mod formats;
mod parquet;
mod sampler;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::RgbImage;
use serde::{Deserialize, Serialize};

pub use self::batch::{CropMode, TrainBatch, crop_to, prepare_batch, resize_to_square};
pub use self::check::{CheckLevel, CheckReport, Problem};
use self::formats::read_prompt;
pub use self::formats::{EDITED_SUFFIX, METADATA_FILE, PAIR_IMAGE_EXTENSIONS};
pub use self::parquet::DEFAULT_ROW_GROUP_CACHE_BYTES;
use self::parquet::{GroupCache, ParquetFile};
pub use self::sampler::{Batch, EpochSampler, FlipMode, SamplerPosition, shuffled_indices};
use crate::model::hub::HubError;
use crate::pipeline::image::{decode_image, load_image};

/// The script's default `--original_image_column`.
pub const DEFAULT_ORIGINAL_IMAGE_COLUMN: &str = "input_image";
/// The script's default `--edit_prompt_column`.
pub const DEFAULT_EDIT_PROMPT_COLUMN: &str = "edit_prompt";
/// The script's default `--edited_image_column`.
pub const DEFAULT_EDITED_IMAGE_COLUMN: &str = "edited_image";

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

/// A training dataset: the list of its examples, each read on demand.
#[derive(Debug, Clone)]
pub struct Dataset {
    kind: DatasetKind,
    records: Vec<Record>,
    parquet: Arc<Vec<ParquetFile>>,
    /// Recently read Parquet row groups, shared by the subsets of this dataset.
    group_cache: Arc<Mutex<GroupCache>>,
}

impl Dataset {
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

    /// Loads the examples at `indices`, in order (the first bad one is the error).
    pub fn load_batch(&self, indices: &[usize]) -> Result<Vec<Example>, DataError> {
        indices.iter().map(|&i| self.load(i)).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Dataset>();
    }
}
