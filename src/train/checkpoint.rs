//! Training checkpoints: `checkpoint-STEP/` folders under the output folder, each holding named
//! tensor groups (UNet or LoRA weights, optimizer moments, EMA shadow: whatever the training loop
//! hands over) as safetensors files, the loop's own `state.json` (step, epoch, data position, RNG
//! state...) and a `checkpoint.json` manifest.
//!
//! Crash safety: a checkpoint is written into a hidden temporary folder beside the others, every
//! file is flushed to disk (`fsync`), the manifest is written last, and only then is the folder
//! renamed to `checkpoint-STEP` (one atomic rename; the parent folder is synced after it). A kill
//! at any moment therefore leaves either the complete new checkpoint or none, and never touches
//! the older ones. Leftover temporary folders are ignored by [`resolve_resume`] and removed by the
//! next [`save_checkpoint`]. The manifest records each file's size and the CRC-32 of its bytes as
//! read back from disk; a checkpoint whose files do not match (truncated or changed after the
//! fact) is named as damaged, and `latest` passes over it to an older one, saying so.
//!
//! `checkpoints_total_limit` keeps at most that many checkpoints, as diffusers' training scripts
//! do, but removes the oldest *after* the new one is complete, so there is never a moment with
//! fewer than one complete checkpoint.
//!
//! The small safetensors writer here ([`write_safetensors`]) is shared by the LoRA and final-model
//! writers: it stores string metadata (peft's adapter config) and syncs the file.

use crate::model::files::{FileError, io_err};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

/// The folder-name prefix of checkpoints (`checkpoint-500`), as in diffusers' scripts.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// The loop's own state inside a checkpoint.
pub const STATE_FILE: &str = "state.json";
/// The manifest, written last: its presence and the file sizes and checksums it lists mark a
/// complete checkpoint.
pub const MANIFEST_FILE: &str = "checkpoint.json";
/// Prefix of the temporary folders checkpoints are written into (hidden, never `checkpoint-*`).
const TEMP_PREFIX: &str = ".tmp-checkpoint-";
/// Prefix of a checkpoint folder moved aside while a checkpoint of the same step replaces it.
const REPLACED_PREFIX: &str = ".replaced-checkpoint-";

/// What went wrong reading or writing a checkpoint or a safetensors file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file-system operation failed on a path.
    #[error(transparent)]
    Io(#[from] FileError),
    /// A tensor could not be read from or converted for `path`.
    #[error("tensor {name:?} in {path}: {source}")]
    Tensor {
        path: PathBuf,
        name: String,
        source: Box<candle_core::Error>,
    },
    /// The tensors of a safetensors file could not be read.
    #[error("reading tensors from {path}: {source}")]
    Read {
        path: PathBuf,
        source: Box<candle_core::Error>,
    },
    /// A group or tensor name is not usable (empty, a path, or given twice).
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    /// A tensor's dtype has no safetensors code here.
    #[error("tensor {name:?} has dtype {dtype:?}, which this writer does not store")]
    UnsupportedDType { name: String, dtype: DType },
    /// A safetensors file or the manifest is malformed.
    #[error("{path} is not a valid {what}: {reason}")]
    Malformed {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    /// `--resume_from_checkpoint` names a checkpoint that does not exist or is incomplete.
    #[error("checkpoint {path} {reason}")]
    NotFound { path: PathBuf, reason: String },
    /// `--resume_from_checkpoint latest` found checkpoints, none of them complete: starting over
    /// would overwrite them, so the run is refused.
    #[error(
        "cannot resume from the latest checkpoint in {output_dir}: every checkpoint there is damaged ({damaged}); \
         starting over would overwrite them, so nothing was done (remove them, or leave out --resume_from_checkpoint)"
    )]
    AllDamaged {
        output_dir: PathBuf,
        damaged: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Safetensors
// ---------------------------------------------------------------------------------------------

fn safetensors_dtype(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::F64 => "F64",
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        _ => return None,
    })
}

/// The little-endian bytes of `tensor` (any device, any layout).
fn tensor_bytes(tensor: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flat = tensor.to_device(&Device::Cpu)?.flatten_all()?;
    // Every element type has its own `to_le_bytes` (no trait to be generic over).
    macro_rules! le_bytes {
        ($element:ty) => {
            flat.to_vec1::<$element>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        };
    }
    Ok(match flat.dtype() {
        DType::F32 => le_bytes!(f32),
        DType::F16 => le_bytes!(half::f16),
        DType::BF16 => le_bytes!(half::bf16),
        DType::F64 => le_bytes!(f64),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => le_bytes!(u32),
        DType::I64 => le_bytes!(i64),
        other => candle_core::bail!("no byte conversion for {other:?}"),
    })
}

/// Writes `tensors` to the safetensors file `path` (tensor data in the given order, header keys
/// sorted as JSON objects are), with `metadata` as the header's `__metadata__` when given, and
/// syncs it to disk. Names must be unique.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(), CheckpointError> {
    let mut header = serde_json::Map::new();
    if let Some(metadata) = metadata {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for (name, tensor) in tensors {
        if name.is_empty() || name == "__metadata__" {
            return Err(CheckpointError::BadName {
                name: name.clone(),
                reason: "not a usable tensor name",
            });
        }
        let dtype =
            safetensors_dtype(tensor.dtype()).ok_or_else(|| CheckpointError::UnsupportedDType {
                name: name.clone(),
                dtype: tensor.dtype(),
            })?;
        let bytes = tensor.elem_count() * tensor.dtype().size_in_bytes();
        let entry = json!({
            "dtype": dtype,
            "shape": tensor.dims(),
            "data_offsets": [offset, offset + bytes],
        });
        if header.insert(name.clone(), entry).is_some() {
            return Err(CheckpointError::BadName {
                name: name.clone(),
                reason: "given twice",
            });
        }
        offset += bytes;
    }
    let mut header =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| CheckpointError::Malformed {
            path: path.to_path_buf(),
            what: "safetensors header",
            reason: e.to_string(),
        })?;
    // The data must start 8-byte aligned: pad the header with spaces, as the reference writer does.
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = File::create(path).map_err(io_err("creating", path))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&header))
        .map_err(io_err("writing", path))?;
    for (name, tensor) in tensors {
        let bytes = tensor_bytes(tensor).map_err(|source| CheckpointError::Tensor {
            path: path.to_path_buf(),
            name: name.clone(),
            source: Box::new(source),
        })?;
        out.write_all(&bytes).map_err(io_err("writing", path))?;
    }
    let file = out
        .into_inner()
        .map_err(|e| io_err("writing", path)(e.into_error()))?;
    Ok(file.sync_all().map_err(io_err("syncing", path))?)
}

/// The `__metadata__` of a safetensors file (empty when it has none).
pub fn read_safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>, CheckpointError> {
    let malformed = |reason: String| CheckpointError::Malformed {
        path: path.to_path_buf(),
        what: "safetensors file",
        reason,
    };
    let (mut file, file_len) =
        crate::model::files::open_regular(path).map_err(io_err("opening", path))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| malformed(format!("no header length ({e})")))?;
    let len = u64::from_le_bytes(len);
    // Checked against the file before the header buffer is allocated.
    if len > 100_000_000 || len > file_len.saturating_sub(8) {
        return Err(malformed(format!(
            "a header of {len} bytes in a file of {file_len}"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| malformed(format!("header cut short ({e})")))?;
    let header: Value =
        serde_json::from_slice(&header).map_err(|e| malformed(format!("header JSON: {e}")))?;
    let mut out = BTreeMap::new();
    if let Some(Value::Object(metadata)) = header.get("__metadata__") {
        for (key, value) in metadata {
            if let Value::String(value) = value {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(out)
}

/// Reads every tensor of the safetensors file `path` onto `device`, sorted by name.
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    crate::model::weights::check_safetensors(path).map_err(|e| CheckpointError::Malformed {
        path: path.to_path_buf(),
        what: "safetensors file",
        reason: e.to_string(),
    })?;
    let tensors =
        candle_core::safetensors::load(path, device).map_err(|source| CheckpointError::Read {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
    let mut tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

/// One named group of tensors of a checkpoint, stored as `NAME.safetensors`.
#[derive(Debug, Clone)]
pub struct TensorGroup {
    /// The file stem: letters, digits, `_`, `-` and `.` (not starting with `.`).
    pub name: String,
    /// The tensors, by name.
    pub tensors: Vec<(String, Tensor)>,
}

impl TensorGroup {
    /// A group named `name` holding `tensors`.
    pub fn new(name: impl Into<String>, tensors: Vec<(String, Tensor)>) -> Self {
        Self {
            name: name.into(),
            tensors,
        }
    }
}

/// A checkpoint read back by [`load_checkpoint`].
#[derive(Debug)]
pub struct LoadedCheckpoint {
    /// The checkpoint folder.
    pub path: PathBuf,
    /// The step in its name.
    pub step: u64,
    /// The groups by name, each with its tensors sorted by name.
    pub groups: BTreeMap<String, Vec<(String, Tensor)>>,
    /// The caller's `state.json`.
    pub state: Value,
}

impl LoadedCheckpoint {
    /// The tensors of group `name`, or an error naming the checkpoint when it has no such group.
    pub fn group(&self, name: &str) -> Result<&[(String, Tensor)], CheckpointError> {
        self.groups
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| CheckpointError::NotFound {
                path: self.path.clone(),
                reason: format!(
                    "has no tensor group {name:?} (it has {:?})",
                    self.groups.keys().collect::<Vec<_>>()
                ),
            })
    }
}

fn check_group_name(name: &str) -> Result<(), CheckpointError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok && name != "state" && name != "checkpoint" {
        Ok(())
    } else {
        Err(CheckpointError::BadName {
            name: name.to_string(),
            reason: "group names are file stems: letters, digits, '_', '-', '.', not 'state' or 'checkpoint'",
        })
    }
}

/// The step of a folder named `checkpoint-STEP`.
pub fn checkpoint_step(folder_name: &str) -> Option<u64> {
    folder_name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()
}

/// The entries of `output_dir`, read as the caller goes; none when it does not exist.
fn output_dir_entries(
    output_dir: &Path,
) -> Result<impl Iterator<Item = Result<fs::DirEntry, CheckpointError>> + '_, CheckpointError> {
    let entries = match fs::read_dir(output_dir) {
        Ok(entries) => Some(entries),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("listing", output_dir)(e).into()),
    };
    Ok(entries
        .into_iter()
        .flatten()
        .map(move |entry| Ok(entry.map_err(io_err("listing", output_dir))?)))
}

/// The `checkpoint-STEP` folders under `output_dir` (complete or not), oldest step first. A
/// missing `output_dir` has none.
pub fn list_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut out = Vec::new();
    for entry in output_dir_entries(output_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(checkpoint_step)
            && entry.path().is_dir()
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Why the checkpoint folder `dir` is not complete, or `None` when it is: its manifest exists and
/// every file it lists is there with the listed size and CRC-32 (read in full: a checkpoint is
/// checked this way once, before it is loaded).
pub fn checkpoint_problem(dir: &Path) -> Option<String> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = match crate::model::files::read_to_string_limited(
        &manifest_path,
        crate::model::files::MAX_CONFIG_BYTES,
    ) {
        Ok(text) => text,
        Err(e) => return Some(format!("has no readable {MANIFEST_FILE} ({e})")),
    };
    let manifest: Value = match serde_json::from_str(&text) {
        Ok(value) => value,
        Err(e) => return Some(format!("has a malformed {MANIFEST_FILE} ({e})")),
    };
    let Some(files) = manifest.get("files").and_then(Value::as_object) else {
        return Some(format!("{MANIFEST_FILE} lists no files"));
    };
    for (file, record) in files {
        // A record is `{"bytes": N, "crc32": "8 hex digits"}`; checkpoints of earlier versions
        // give the size alone.
        let (size, crc) = match record {
            Value::Object(fields) => (
                fields.get("bytes").and_then(Value::as_u64),
                fields.get("crc32").and_then(Value::as_str),
            ),
            other => (other.as_u64(), None),
        };
        let Some(expected) = size else {
            return Some(format!(
                "{MANIFEST_FILE} gives {file} the record {record}, not a byte count"
            ));
        };
        let path = dir.join(file);
        match fs::metadata(&path) {
            Ok(meta) if meta.len() == expected => {}
            Ok(meta) => {
                return Some(format!(
                    "has {file} of {} bytes where {expected} were written",
                    meta.len()
                ));
            }
            Err(e) => return Some(format!("lacks {file} ({e})")),
        }
        if let Some(crc) = crc {
            match file_crc32(&path) {
                Ok(actual) if format!("{actual:08x}") == crc => {}
                Ok(actual) => {
                    return Some(format!(
                        "has {file} whose CRC-32 is {actual:08x} where {crc} was written: its bytes changed since"
                    ));
                }
                Err(e) => return Some(format!("cannot read {file} ({e})")),
            }
        }
    }
    None
}

/// A written file's manifest record: its size and the CRC-32 of the bytes on disk (read back
/// after the write, so damage between the write and a resume is found, not only truncation).
fn file_record(path: &Path) -> Result<Value, CheckpointError> {
    let bytes = fs::metadata(path).map_err(io_err("reading", path))?.len();
    let crc = file_crc32(path).map_err(io_err("reading", path))?;
    Ok(json!({ "bytes": bytes, "crc32": format!("{crc:08x}") }))
}

/// The CRC-32 (IEEE) of a file's contents, read in blocks.
fn file_crc32(path: &Path) -> std::io::Result<u32> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            return Ok(hasher.finalize());
        }
        hasher.update(&block[..n]);
    }
}

/// Syncs a folder's entry list (so a rename or a new file in it survives a power cut).
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    // Opening a directory read-only and calling fsync is the POSIX way; other systems may
    // refuse, which costs only durability, not consistency.
    match File::open(dir) {
        Ok(file) => {
            let _ = file.sync_all();
            Ok(())
        }
        Err(e) => Err(io_err("opening", dir)(e).into()),
    }
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), CheckpointError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", dir)(e).into()),
    }
}

/// Removes what interrupted checkpoint writes left under `output_dir` (hidden temporary and
/// moved-aside folders). Returns the folders removed.
pub fn clean_leftovers(output_dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    for entry in output_dir_entries(output_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMP_PREFIX) || name.starts_with(REPLACED_PREFIX) {
            remove_dir_if_exists(&entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// What [`save_checkpoint`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedCheckpoint {
    /// The new `checkpoint-STEP` folder.
    pub path: PathBuf,
    /// Older checkpoints removed to respect the total limit, oldest first.
    pub removed: Vec<PathBuf>,
}

/// Writes `output_dir/checkpoint-STEP/` (replacing one of the same step) holding each group as
/// `NAME.safetensors` and `state` as `state.json`, crash-safely (see the module doc). Then, when
/// `total_limit` is set, removes the oldest checkpoints so that at most `total_limit` remain
/// (the new one always stays; a limit of 0 is taken as 1).
pub fn save_checkpoint(
    output_dir: &Path,
    step: u64,
    groups: &[TensorGroup],
    state: &Value,
    total_limit: Option<usize>,
) -> Result<SavedCheckpoint, CheckpointError> {
    for (i, group) in groups.iter().enumerate() {
        check_group_name(&group.name)?;
        if groups[..i].iter().any(|g| g.name == group.name) {
            return Err(CheckpointError::BadName {
                name: group.name.clone(),
                reason: "group given twice",
            });
        }
    }
    fs::create_dir_all(output_dir).map_err(io_err("creating", output_dir))?;
    clean_leftovers(output_dir)?;

    let final_dir = output_dir.join(format!("{CHECKPOINT_PREFIX}{step}"));
    let temp_dir = output_dir.join(format!("{TEMP_PREFIX}{step}-{}", std::process::id()));
    remove_dir_if_exists(&temp_dir)?;
    fs::create_dir(&temp_dir).map_err(io_err("creating", &temp_dir))?;

    let mut files = serde_json::Map::new();
    for group in groups {
        let file_name = format!("{}.safetensors", group.name);
        let path = temp_dir.join(&file_name);
        write_safetensors(&path, &group.tensors, None)?;
        files.insert(file_name, file_record(&path)?);
    }
    let state_path = temp_dir.join(STATE_FILE);
    let state_text = serde_json::to_vec_pretty(state).map_err(|e| CheckpointError::Malformed {
        path: state_path.clone(),
        what: "JSON state",
        reason: e.to_string(),
    })?;
    write_synced(&state_path, &state_text)?;
    files.insert(STATE_FILE.into(), file_record(&state_path)?);
    let manifest = json!({ "step": step, "files": files });
    let manifest_text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    write_synced(&temp_dir.join(MANIFEST_FILE), &manifest_text)?;
    sync_dir(&temp_dir)?;

    // A checkpoint of the same step (a resumed run saving again) is moved aside first, and
    // removed only once the new one is in place.
    let replaced = output_dir.join(format!("{REPLACED_PREFIX}{step}-{}", std::process::id()));
    let had_old = final_dir.exists();
    if had_old {
        fs::rename(&final_dir, &replaced).map_err(io_err("moving aside", &final_dir))?;
    }
    fs::rename(&temp_dir, &final_dir).map_err(io_err("renaming into place", &final_dir))?;
    sync_dir(output_dir)?;
    if had_old {
        remove_dir_if_exists(&replaced)?;
    }

    let mut removed = Vec::new();
    if let Some(limit) = total_limit {
        let limit = limit.max(1);
        let existing = list_checkpoints(output_dir)?;
        let excess = existing.len().saturating_sub(limit);
        for (_, dir) in existing
            .into_iter()
            .filter(|(_, dir)| *dir != final_dir)
            .take(excess)
        {
            remove_dir_if_exists(&dir)?;
            removed.push(dir);
        }
    }
    Ok(SavedCheckpoint {
        path: final_dir,
        removed,
    })
}

/// Writes `bytes` to `path` and syncs the file.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut file = File::create(path).map_err(io_err("creating", path))?;
    file.write_all(bytes).map_err(io_err("writing", path))?;
    Ok(file.sync_all().map_err(io_err("syncing", path))?)
}

/// The newest complete checkpoint under `output_dir`, if any (incomplete or damaged ones are
/// skipped).
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    Ok(list_checkpoints(output_dir)?
        .into_iter()
        .rev()
        .map(|(_, dir)| dir)
        .find(|dir| checkpoint_problem(dir).is_none()))
}

/// Where `--resume_from_checkpoint` leads: the checkpoint to load (`None`: a new run) and the
/// newer checkpoints `latest` passed over because they are damaged, with why, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeChoice {
    pub dir: Option<PathBuf>,
    pub skipped: Vec<(PathBuf, String)>,
}

impl ResumeChoice {
    /// One line per skipped checkpoint for the run's log: which one is damaged, why, and which
    /// one is used instead.
    pub fn notices(&self) -> Vec<String> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        self.skipped
            .iter()
            .map(|(skipped, reason)| {
                format!(
                    "checkpoint {} is damaged ({reason}); resuming from the older {} instead",
                    skipped.display(),
                    dir.display()
                )
            })
            .collect()
    }
}

/// The checkpoint folder `--resume_from_checkpoint VALUE` means: `latest` is the newest complete
/// checkpoint under `output_dir` (`None` when there is none at all: a new run, as diffusers'
/// script starts one; an error when there are checkpoints but every one is damaged); otherwise an
/// existing folder path, or a folder name under `output_dir` (`checkpoint-500`). A named
/// checkpoint that is missing or incomplete is an error. See [`resolve_resume_choice`] for the
/// damaged checkpoints `latest` passed over.
pub fn resolve_resume(output_dir: &Path, value: &str) -> Result<Option<PathBuf>, CheckpointError> {
    resolve_resume_choice(output_dir, value).map(|choice| choice.dir)
}

/// [`resolve_resume`], with the newer damaged checkpoints that `latest` passed over.
pub fn resolve_resume_choice(
    output_dir: &Path,
    value: &str,
) -> Result<ResumeChoice, CheckpointError> {
    if value == "latest" {
        let mut skipped = Vec::new();
        for (_, dir) in list_checkpoints(output_dir)?.into_iter().rev() {
            match checkpoint_problem(&dir) {
                None => {
                    return Ok(ResumeChoice {
                        dir: Some(dir),
                        skipped,
                    });
                }
                Some(reason) => skipped.push((dir, reason)),
            }
        }
        if !skipped.is_empty() {
            let damaged = skipped
                .iter()
                .map(|(dir, reason)| {
                    let name = dir.file_name().unwrap_or_default().to_string_lossy();
                    format!("{name} {reason}")
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(CheckpointError::AllDamaged {
                output_dir: output_dir.to_path_buf(),
                damaged,
            });
        }
        return Ok(ResumeChoice { dir: None, skipped });
    }
    resolve_named(output_dir, value).map(|dir| ResumeChoice {
        dir: Some(dir),
        skipped: Vec::new(),
    })
}

/// A checkpoint given by path or by name under `output_dir`, which must be complete.
fn resolve_named(output_dir: &Path, value: &str) -> Result<PathBuf, CheckpointError> {
    let given = Path::new(value);
    let dir = if given.is_dir() {
        given.to_path_buf()
    } else {
        output_dir.join(given)
    };
    if !dir.is_dir() {
        return Err(CheckpointError::NotFound {
            path: dir,
            reason: "does not exist".into(),
        });
    }
    if let Some(reason) = checkpoint_problem(&dir) {
        return Err(CheckpointError::NotFound { path: dir, reason });
    }
    Ok(dir)
}

/// Reads the complete checkpoint `dir`: every group listed in its manifest onto `device`, and
/// `state.json`.
pub fn load_checkpoint(dir: &Path, device: &Device) -> Result<LoadedCheckpoint, CheckpointError> {
    if let Some(reason) = checkpoint_problem(dir) {
        return Err(CheckpointError::NotFound {
            path: dir.to_path_buf(),
            reason,
        });
    }
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest: Value = serde_json::from_str(
        &fs::read_to_string(&manifest_path).map_err(io_err("reading", &manifest_path))?,
    )
    .map_err(|e| CheckpointError::Malformed {
        path: manifest_path.clone(),
        what: "checkpoint manifest",
        reason: e.to_string(),
    })?;
    let step = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(checkpoint_step)
        .or_else(|| manifest.get("step").and_then(Value::as_u64))
        .unwrap_or(0);
    let mut groups = BTreeMap::new();
    if let Some(files) = manifest.get("files").and_then(Value::as_object) {
        for file in files.keys() {
            if let Some(group) = file.strip_suffix(".safetensors") {
                let tensors = read_safetensors(&dir.join(file), device)?;
                groups.insert(group.to_string(), tensors);
            }
        }
    }
    let state_path = dir.join(STATE_FILE);
    let state = serde_json::from_str(
        &fs::read_to_string(&state_path).map_err(io_err("reading", &state_path))?,
    )
    .map_err(|e| CheckpointError::Malformed {
        path: state_path,
        what: "JSON state",
        reason: e.to_string(),
    })?;
    Ok(LoadedCheckpoint {
        path: dir.to_path_buf(),
        step,
        groups,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16 item 4: a header length beyond the file is refused before the buffer is made.
    #[test]
    fn a_header_longer_than_the_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter.safetensors");
        let mut bytes = 90_000_000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        fs::write(&path, &bytes).unwrap();
        let err = read_safetensors_metadata(&path).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("adapter.safetensors") && message.contains("in a file of 10"),
            "{message}"
        );
        // A well-formed file still reads.
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        fs::write(&path, &bytes).unwrap();
        assert!(read_safetensors_metadata(&path).unwrap().is_empty());
    }

    /// Issue 16 item 2: a byte changed after the write (same size) is found by the checksum,
    /// named, and `latest` falls back to the older checkpoint.
    #[test]
    fn a_changed_byte_is_found_by_the_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let weights = |v: f32| {
            let t = Tensor::full(v, (4, 4), &Device::Cpu).unwrap();
            [TensorGroup::new("unet", vec![("w".to_string(), t)])]
        };
        let state = json!({ "global_step": 1 });
        save_checkpoint(dir.path(), 1, &weights(1.0), &state, None).unwrap();
        let newest = save_checkpoint(dir.path(), 2, &weights(2.0), &state, None)
            .unwrap()
            .path;
        assert_eq!(checkpoint_problem(&newest), None);
        let file = newest.join("unet.safetensors");
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&file, &bytes).unwrap();
        let problem = checkpoint_problem(&newest).expect("the change is found");
        assert!(
            problem.contains("unet.safetensors") && problem.contains("CRC-32"),
            "{problem}"
        );
        assert!(load_checkpoint(&newest, &Device::Cpu).is_err());
        assert_eq!(
            latest_checkpoint(dir.path()).unwrap(),
            Some(dir.path().join("checkpoint-1"))
        );
        // A manifest of an earlier version (sizes only) is still read.
        let older = dir.path().join("checkpoint-1");
        let manifest_path = older.join(MANIFEST_FILE);
        let mut manifest: Value =
            serde_json::from_str(&fs::read_to_string(&manifest_path).unwrap()).unwrap();
        for record in manifest["files"].as_object_mut().unwrap().values_mut() {
            *record = record["bytes"].clone();
        }
        fs::write(&manifest_path, manifest.to_string()).unwrap();
        assert_eq!(checkpoint_problem(&older), None);
        load_checkpoint(&older, &Device::Cpu).unwrap();
    }
}
