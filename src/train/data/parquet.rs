//! Parquet datasets: finding a downloaded dataset's train-split files, reading their schema, and
//! reading rows a row group at a time through a shared cache of recently read groups.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};

use super::{
    Columns, DataError, Dataset, DatasetKind, DatasetOptions, Record, check_folder, io_error, join,
};

/// Words in a Parquet file's path that name a split (see the `train::data` module doc).
const SPLIT_WORDS: [&str; 7] = ["train", "test", "validation", "valid", "val", "dev", "eval"];
/// How deep [`Dataset::open_parquet_folder`] looks for `.parquet` files.
const MAX_FOLDER_DEPTH: usize = 8;

/// One Parquet file: its reader and the leaf columns to read.
pub(super) struct ParquetFile {
    path: PathBuf,
    /// The path shown in example names (relative to the dataset folder).
    pub(super) shown: String,
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
pub(super) struct GroupCache {
    budget: usize,
    used: usize,
    /// (file, row group), its rows, their size in bytes.
    entries: VecDeque<(GroupKey, Arc<Vec<RawRow>>, usize)>,
}

/// A Parquet row group: (file index, row group index).
pub(super) type GroupKey = (usize, usize);

/// The rows of a row group, or why they could not be read.
pub(super) type GroupRows = Result<Arc<Vec<RawRow>>, String>;

impl GroupCache {
    pub(super) fn new(budget: usize) -> Self {
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

impl Dataset {
    /// The Parquet files of a downloaded dataset anywhere under `dir` (see the `train::data`
    /// module doc).
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

    /// The rows of one Parquet row group, from the cache or read now.
    pub(super) fn group_rows(&self, file: usize, group: usize) -> GroupRows {
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
}

/// One row's cells, not yet decoded.
#[derive(Debug, Clone)]
pub(super) struct RawRow {
    pub(super) original: Result<Vec<u8>, String>,
    pub(super) edited: Result<Vec<u8>, String>,
    pub(super) prompt: Result<String, String>,
    pub(super) original_column: String,
    pub(super) edited_column: String,
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
    let (file, _) = crate::model::files::open_regular(path).map_err(|e| io_error(path, e))?;
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

pub(super) fn has_parquet(dir: &Path) -> bool {
    let mut files = Vec::new();
    collect_parquet(dir, 0, &mut files).is_ok() && !files.is_empty()
}

/// The split words of a path relative to the dataset folder (see the `train::data` module
/// doc).
pub(super) fn split_words(relative: &str) -> Vec<&'static str> {
    let lower = relative.to_ascii_lowercase();
    let words: BTreeSet<&str> = lower
        .split(|c: char| matches!(c, '/' | '\\' | '-' | '_' | '.' | ' ') || c.is_ascii_digit())
        .collect();
    SPLIT_WORDS
        .into_iter()
        .filter(|w| words.contains(w))
        .collect()
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
}
