//! Weight files of one pipeline component: which files to load for a [`Variant`] (diffusers'
//! choice: the variant's files when the component has them, otherwise the default ones;
//! safetensors before PyTorch `.bin`; single files or sharded `*.index.json`), checking
//! safetensors files before they are read (so a truncated download is reported as such),
//! and building a candle [`VarBuilder`] over them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

/// Weight base name of diffusers models (UNet, VAE).
pub const DIFFUSERS_WEIGHTS: &str = "diffusion_pytorch_model";
/// Weight base name of transformers models (the CLIP text encoder).
pub const TRANSFORMERS_WEIGHTS: &str = "model";

/// Safetensors headers larger than this are refused (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Which published copy of the weights to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Variant {
    /// The default files (`diffusion_pytorch_model.safetensors`), usually float32.
    #[default]
    Default,
    /// The `fp16` variant (`diffusion_pytorch_model.fp16.safetensors`): half the download.
    Fp16,
}

impl Variant {
    /// The variant tag inserted in file names, `None` for the default files.
    pub fn tag(self) -> Option<&'static str> {
        match self {
            Variant::Default => None,
            Variant::Fp16 => Some("fp16"),
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.tag().unwrap_or("default"))
    }
}

impl FromStr for Variant {
    type Err = WeightsError;

    /// Accepts `default` (also `none`, `fp32`) and `fp16`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "default" | "none" | "fp32" | "" => Ok(Variant::Default),
            "fp16" => Ok(Variant::Fp16),
            _ => Err(WeightsError::UnknownVariant {
                text: text.to_string(),
            }),
        }
    }
}

/// The serialisation of a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// `.safetensors`: read tensor by tensor.
    SafeTensors,
    /// PyTorch pickle `.bin`: read through candle's pickle reader.
    PyTorch,
}

/// Why weights could not be found or loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The variant name is not one this program knows.
    #[error("unknown weights variant {text:?}: use \"default\" or \"fp16\"")]
    UnknownVariant {
        /// What was given.
        text: String,
    },
    /// The component folder does not exist.
    #[error("component folder {dir} does not exist")]
    MissingFolder {
        /// The folder looked for.
        dir: PathBuf,
    },
    /// The component folder could not be listed.
    #[error("cannot list component folder {dir}: {source}")]
    ReadDir {
        /// The folder being listed.
        dir: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// No weight file with an expected name is in the folder.
    #[error("no weights in {dir}: expected {expected}")]
    NoWeights {
        /// The component folder.
        dir: PathBuf,
        /// The file names that were looked for.
        expected: String,
    },
    /// A sharded checkpoint's index file is unusable.
    #[error("weight index {path} is malformed: {reason}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A shard named by an index file is not present.
    #[error("weight shard {shard} named in {index} is missing")]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard's file name.
        shard: String,
    },
    /// `var_builder` was given no files.
    #[error("no weight files given")]
    NoFiles,
    /// `var_builder` was given both safetensors and `.bin` files.
    #[error("cannot mix safetensors and PyTorch .bin weight files ({first} and {second})")]
    MixedFormats {
        /// A safetensors file.
        first: PathBuf,
        /// A `.bin` file.
        second: PathBuf,
    },
    /// A file has an extension that is not a known weight format.
    #[error("{path} is not a weight file this program reads (.safetensors or .bin)")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// A weight file could not be opened or read.
    #[error("cannot read weight file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A safetensors file ends before the data its header describes.
    #[error("{path} is truncated: {reason} (an interrupted download? delete it and fetch again)")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was expected and what was found.
        reason: String,
    },
    /// A safetensors file's header is not valid.
    #[error("{path} is not a valid safetensors file: {reason}")]
    InvalidSafetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A PyTorch file could not be read (or would run code).
    #[error(transparent)]
    Torch(Box<super::torch_file::TorchFileError>),
    /// candle could not load the files.
    #[error("cannot load weights from {files}: {source}")]
    Load {
        /// The files, comma-separated.
        files: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// The weights chosen for one component, with what the choice was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentWeights {
    /// The files to load, in order (one file, or every shard of a sharded checkpoint).
    pub files: Vec<PathBuf>,
    /// Their serialisation.
    pub format: WeightFormat,
    /// The variant actually used.
    pub variant: Variant,
    /// Set when the requested variant was absent and the default weights were chosen instead
    /// (diffusers does the same with a warning): a sentence to show the user.
    pub fallback_note: Option<String>,
}

/// How a component's weights are stored: one file or an index naming shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightEntry {
    /// One file with every tensor.
    Single(String),
    /// A `*.index.json` whose `weight_map` names the shard files.
    Sharded {
        /// The index file's name.
        index: String,
    },
}

/// A choice among the file names of one component folder, made before any file is read (so it
/// can be made from a Hub listing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSelection {
    /// The file (or the index of the shards) to use.
    pub entry: WeightEntry,
    /// Their serialisation.
    pub format: WeightFormat,
    /// The variant actually chosen.
    pub variant: Variant,
}

/// PyTorch files of transformers models are `pytorch_model.bin`, not `model.bin`.
fn pytorch_base_name(base_name: &str) -> String {
    if base_name == TRANSFORMERS_WEIGHTS {
        "pytorch_model".to_string()
    } else {
        base_name.to_string()
    }
}

/// The candidate names for one variant, in order of preference: safetensors single, safetensors
/// sharded, `.bin` single, `.bin` sharded. Index names follow diffusers' `_add_variant`
/// (`x.safetensors.index.fp16.json`) and its legacy form (`x.safetensors.fp16.index.json`).
fn candidates(base_name: &str, variant: Variant) -> Vec<(WeightEntry, WeightFormat)> {
    let bin_base = pytorch_base_name(base_name);
    let mut out = Vec::new();
    for (base, ext, format) in [
        (base_name, "safetensors", WeightFormat::SafeTensors),
        (bin_base.as_str(), "bin", WeightFormat::PyTorch),
    ] {
        match variant.tag() {
            None => {
                out.push((WeightEntry::Single(format!("{base}.{ext}")), format));
                out.push((
                    WeightEntry::Sharded {
                        index: format!("{base}.{ext}.index.json"),
                    },
                    format,
                ));
            }
            Some(tag) => {
                out.push((WeightEntry::Single(format!("{base}.{tag}.{ext}")), format));
                for index in [
                    format!("{base}.{ext}.index.{tag}.json"),
                    format!("{base}.{ext}.{tag}.index.json"),
                ] {
                    out.push((WeightEntry::Sharded { index }, format));
                }
            }
        }
    }
    out
}

/// The file names that were looked for, for error messages.
pub(crate) fn expected_names(base_name: &str, variant: Variant) -> String {
    let mut names: Vec<String> = Vec::new();
    for v in [variant, Variant::Default] {
        for (entry, _) in candidates(base_name, v) {
            let name = match entry {
                WeightEntry::Single(name) => name,
                WeightEntry::Sharded { index } => index,
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.join(", ")
}

/// Chooses a component's weights among the file names present in its folder, as diffusers does:
/// the requested variant's files if there are any, else the default files; safetensors preferred
/// over `.bin`; a single file preferred over shards. `None` when nothing fits.
pub fn select_weights(
    names: &BTreeSet<String>,
    base_name: &str,
    variant: Variant,
) -> Option<WeightSelection> {
    let mut variants = vec![variant];
    if variant != Variant::Default {
        variants.push(Variant::Default);
    }
    for v in variants {
        for (entry, format) in candidates(base_name, v) {
            let name = match &entry {
                WeightEntry::Single(name) => name,
                WeightEntry::Sharded { index } => index,
            };
            if names.contains(name) {
                return Some(WeightSelection {
                    entry,
                    format,
                    variant: v,
                });
            }
        }
    }
    None
}

/// The shard file names listed in a sharded checkpoint's index (`weight_map` values), sorted and
/// without repeats. Names must be plain file names in the same folder.
pub fn shard_names(index_path: &Path) -> Result<Vec<String>, WeightsError> {
    let bad = |reason: String| WeightsError::BadIndex {
        path: index_path.to_path_buf(),
        reason,
    };
    let text = super::files::read_to_string_limited(index_path, super::files::MAX_CONFIG_BYTES)
        .map_err(|source| WeightsError::Read {
            path: index_path.to_path_buf(),
            source,
        })?;
    let index: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let Some(Value::Object(map)) = index.get("weight_map") else {
        return Err(bad("no `weight_map` object".to_string()));
    };
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let Value::String(file) = file else {
            return Err(bad(format!("the file of tensor {tensor} is not a string")));
        };
        if !is_plain_file_name(file) {
            return Err(bad(format!(
                "shard name {file:?} is not a file name in the same folder"
            )));
        }
        shards.insert(file.clone());
    }
    if shards.is_empty() {
        return Err(bad("`weight_map` is empty".to_string()));
    }
    Ok(shards.into_iter().collect())
}

/// A name with no directory part, safe to join to a folder (names come from downloaded files).
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// The names of the entries of a folder that are not folders (symlinks followed, as in the
/// Hugging Face cache). Special files (a FIFO, a link to `/dev/zero`) are listed too, so that
/// choosing one fails when it is opened, naming it, instead of "no weights".
fn file_names(dir: &Path) -> Result<BTreeSet<String>, WeightsError> {
    if !dir.is_dir() {
        return Err(WeightsError::MissingFolder {
            dir: dir.to_path_buf(),
        });
    }
    let read_err = |source| WeightsError::ReadDir {
        dir: dir.to_path_buf(),
        source,
    };
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let path = entry.path();
        if path.exists()
            && !path.is_dir()
            && let Some(name) = entry.file_name().to_str()
        {
            names.insert(name.to_string());
        }
    }
    Ok(names)
}

/// The weight files of one component folder for a variant, with a note when the variant was
/// absent and the default weights were chosen.
pub fn component_weights_detailed(
    component_dir: &Path,
    base_name: &str,
    variant: Variant,
) -> Result<ComponentWeights, WeightsError> {
    let names = file_names(component_dir)?;
    let selection =
        select_weights(&names, base_name, variant).ok_or_else(|| WeightsError::NoWeights {
            dir: component_dir.to_path_buf(),
            expected: expected_names(base_name, variant),
        })?;
    let files = match &selection.entry {
        WeightEntry::Single(name) => vec![component_dir.join(name)],
        WeightEntry::Sharded { index } => {
            let index_path = component_dir.join(index);
            let shards = shard_names(&index_path)?;
            let mut files = Vec::with_capacity(shards.len());
            for shard in shards {
                if !names.contains(&shard) {
                    return Err(WeightsError::MissingShard {
                        index: index_path,
                        shard,
                    });
                }
                files.push(component_dir.join(shard));
            }
            files
        }
    };
    let fallback_note = (selection.variant != variant).then(|| {
        format!(
            "{} has no {variant} weights; using the default weights instead",
            component_dir.display()
        )
    });
    Ok(ComponentWeights {
        files,
        format: selection.format,
        variant: selection.variant,
        fallback_note,
    })
}

/// The weight files of one component folder for a variant (fp16 variant falls back to default
/// weights with a note when absent, like diffusers), safetensors preferred over .bin.
/// Use [`component_weights_detailed`] to get the note.
pub fn component_weights(
    component_dir: &Path,
    base_name: &str,
    variant: Variant,
) -> Result<Vec<PathBuf>, WeightsError> {
    component_weights_detailed(component_dir, base_name, variant).map(|w| w.files)
}

/// Bits per element of the safetensors dtypes (`None` for names this check does not know: their
/// byte count is then not checked, only their offsets).
fn safetensors_dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Checks a safetensors file's header against its length: the header must be complete JSON,
/// every tensor's byte range must match its dtype and shape, and the data must end exactly where
/// the file ends. Reads only the header.
pub fn check_safetensors(path: &Path) -> Result<(), WeightsError> {
    read_checked_header(path).map(|_| ())
}

/// A checked safetensors header: tensor name → `{dtype, shape, data_offsets}` (plus
/// `__metadata__`), and the absolute offset where the data offsets start counting.
struct CheckedHeader {
    entries: serde_json::Map<String, Value>,
    data_start: u64,
}

/// Reads a safetensors header and checks it against the file's length (see [`check_safetensors`]).
fn read_checked_header(path: &Path) -> Result<CheckedHeader, WeightsError> {
    let read_err = |source| WeightsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let truncated = |reason: String| WeightsError::Truncated {
        path: path.to_path_buf(),
        reason,
    };
    let invalid = |reason: String| WeightsError::InvalidSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let (mut file, file_len) = super::files::open_regular(path).map_err(read_err)?;
    if file_len < 8 {
        return Err(truncated(format!(
            "it has {file_len} bytes, fewer than the 8-byte header length"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(read_err)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "header length {header_len} is implausible (over {MAX_HEADER_BYTES} bytes)"
        )));
    }
    if 8 + header_len > file_len {
        return Err(truncated(format!(
            "the header needs {} bytes but the file has {file_len}",
            8 + header_len
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(read_err)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| invalid(format!("header JSON: {e}")))?;

    let data_len = file_len - 8 - header_len;
    // (begin, end, name) of every tensor, to check that they tile the data without overlap.
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(header.len());
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let (Some(dtype), Some(shape), Some([begin, end])) = (
            info.get("dtype").and_then(Value::as_str),
            u64_list(info.get("shape")),
            u64_list(info.get("data_offsets")).and_then(|o| <[u64; 2]>::try_from(o).ok()),
        ) else {
            return Err(invalid(format!(
                "tensor {name} lacks a dtype, a shape or two data_offsets"
            )));
        };
        if end < begin {
            return Err(invalid(format!(
                "tensor {name} has data_offsets [{begin}, {end}] that run backwards"
            )));
        }
        if let Some(bits) = safetensors_dtype_bits(dtype) {
            let expected = shape
                .iter()
                .try_fold(bits, |acc, &d| acc.checked_mul(d))
                .map(|b| b.div_ceil(8));
            if expected != Some(end - begin) {
                let expected =
                    expected.map_or("an overflowing count".to_string(), |e| e.to_string());
                return Err(invalid(format!(
                    "tensor {name} ({dtype}, shape {shape:?}) spans {} bytes, expected {expected}",
                    end - begin
                )));
            }
        }
        ranges.push((begin, end, name));
    }
    // As the safetensors format requires: the tensors' byte ranges follow each other from 0 with
    // no overlap (two tensors sharing bytes) and no hole (bytes that belong to no tensor).
    ranges.sort_unstable();
    let mut data_end = 0u64;
    let mut last_tensor = "";
    for &(begin, end, name) in &ranges {
        if begin < data_end {
            return Err(invalid(format!(
                "tensor {name} has data_offsets [{begin}, {end}] overlapping tensor {last_tensor}, \
                 which ends at {data_end}"
            )));
        }
        if begin > data_end {
            return Err(invalid(format!(
                "bytes {data_end} to {begin} of the data belong to no tensor (before tensor {name})"
            )));
        }
        data_end = end;
        last_tensor = name;
    }
    if data_end > data_len {
        return Err(truncated(format!(
            "tensor {last_tensor} ends at byte {} but the file has {file_len} bytes ({} missing)",
            8 + header_len + data_end,
            data_end - data_len
        )));
    }
    if data_end < data_len {
        return Err(invalid(format!(
            "{} unexpected bytes after the last tensor",
            data_len - data_end
        )));
    }
    Ok(CheckedHeader {
        entries: header,
        data_start: 8 + header_len,
    })
}

/// A JSON array of unsigned integers, `None` for anything else.
fn u64_list(value: Option<&Value>) -> Option<Vec<u64>> {
    value?.as_array()?.iter().map(Value::as_u64).collect()
}

fn format_of(path: &Path) -> Result<WeightFormat, WeightsError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(WeightFormat::SafeTensors),
        Some("bin" | "pt" | "pth" | "ckpt") => Ok(WeightFormat::PyTorch),
        _ => Err(WeightsError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

impl From<super::torch_file::TorchFileError> for WeightsError {
    fn from(error: super::torch_file::TorchFileError) -> Self {
        Self::Torch(Box::new(error))
    }
}

/// A VarBuilder over those files in `dtype` on `device`: see [`weights_backend`].
///
/// Safetensors files stay open for the builder's life: they must not be modified meanwhile
/// (the Hugging Face cache never rewrites a blob in place).
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, WeightsError> {
    Ok(VarBuilder::from_backend(
        weights_backend(files)?,
        dtype,
        device.clone(),
    ))
}

/// The tensors of those files, read one at a time when asked for: safetensors files with their
/// headers checked against the files' lengths BEFORE anything is read (so a truncated file gives
/// "FILE is truncated: ..." rather than a panic or an obscure error), PyTorch `.bin` files through
/// the safe pickle reader of [`super::torch_file`] (which runs nothing and checks every size).
pub fn weights_backend(
    files: &[PathBuf],
) -> Result<Box<dyn candle_nn::var_builder::SimpleBackend>, WeightsError> {
    let Some(first) = files.first() else {
        return Err(WeightsError::NoFiles);
    };
    let format = format_of(first)?;
    for file in &files[1..] {
        if format_of(file)? != format {
            let (first, second) = match format {
                WeightFormat::SafeTensors => (first.clone(), file.clone()),
                WeightFormat::PyTorch => (file.clone(), first.clone()),
            };
            return Err(WeightsError::MixedFormats { first, second });
        }
    }
    match format {
        WeightFormat::SafeTensors => Ok(Box::new(StreamedSafetensors::open(files)?)),
        WeightFormat::PyTorch => {
            let mut parts = Vec::with_capacity(files.len());
            for file in files {
                parts.push(super::torch_file::TorchFile::open(file)?);
            }
            Ok(Box::new(TorchFiles(parts)))
        }
    }
}

/// Implements candle's `SimpleBackend` for a weight reader with `load(name, dtype, device)` and
/// `contains(name)`: `get` loads the tensor and refuses one of another shape than asked for.
macro_rules! reader_backend {
    ($reader:ty) => {
        impl candle_nn::var_builder::SimpleBackend for $reader {
            fn get(
                &self,
                shape: candle_core::Shape,
                name: &str,
                _: candle_nn::Init,
                dtype: candle_core::DType,
                device: &candle_core::Device,
            ) -> candle_core::Result<candle_core::Tensor> {
                let tensor = self.load(name, dtype, device)?;
                if tensor.shape() != &shape {
                    return Err(candle_core::Error::UnexpectedShape {
                        msg: format!("shape mismatch for {name}"),
                        expected: shape,
                        got: tensor.shape().clone(),
                    }
                    .bt());
                }
                Ok(tensor)
            }

            fn get_unchecked(
                &self,
                name: &str,
                dtype: candle_core::DType,
                device: &candle_core::Device,
            ) -> candle_core::Result<candle_core::Tensor> {
                self.load(name, dtype, device)
            }

            fn contains_tensor(&self, name: &str) -> bool {
                self.contains(name)
            }
        }
    };
}

pub(crate) use reader_backend;

reader_backend!(StreamedSafetensors);
reader_backend!(TorchFiles);
reader_backend!(super::torch_file::TorchFile);

/// The tensors of one or more PyTorch files (shards); a name in several files comes from the last.
struct TorchFiles(Vec<super::torch_file::TorchFile>);

impl TorchFiles {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let holder = self
            .0
            .iter()
            .rev()
            .find(|f| f.contains(name))
            .ok_or_else(|| {
                candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                }
                .bt()
            })?;
        holder.load(name, dtype, device)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|f| f.contains(name))
    }
}

/// One weight file opened as its extension says: its tensors, their shapes, and its metadata.
pub(crate) struct WeightFile {
    /// The tensors, read one at a time when asked for.
    pub(crate) source: std::sync::Arc<dyn candle_nn::var_builder::SimpleBackend>,
    /// Every tensor's name and shape.
    pub(crate) shapes: BTreeMap<String, Vec<usize>>,
    /// A safetensors file's `__metadata__` (empty for PyTorch files).
    pub(crate) metadata: BTreeMap<String, String>,
}

/// The format of a single weight file by its extension in any case: `.safetensors`, or PyTorch's
/// `.ckpt`, `.pt`, `.pth`, `.bin` (`None` for others).
pub(crate) fn single_file_format(path: &Path) -> Option<WeightFormat> {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("safetensors") => Some(WeightFormat::SafeTensors),
        Some("ckpt" | "pt" | "pth" | "bin") => Some(WeightFormat::PyTorch),
        _ => None,
    }
}

/// Opens a weight file in the format [`single_file_format`] gives; `None` for other extensions.
pub(crate) fn open_weight_file(path: &Path) -> Result<Option<WeightFile>, WeightsError> {
    fn shapes_of<'a>(
        shapes: impl Iterator<Item = (&'a str, &'a [usize])>,
    ) -> BTreeMap<String, Vec<usize>> {
        shapes.map(|(n, s)| (n.to_string(), s.to_vec())).collect()
    }
    Ok(Some(match single_file_format(path) {
        Some(WeightFormat::SafeTensors) => {
            let source = StreamedSafetensors::open(&[path.to_path_buf()])?;
            let metadata = safetensors_metadata(path)?;
            WeightFile {
                shapes: shapes_of(source.shapes()),
                source: std::sync::Arc::new(source),
                metadata,
            }
        }
        Some(WeightFormat::PyTorch) => {
            let source = super::torch_file::TorchFile::open(path)?;
            WeightFile {
                shapes: shapes_of(source.shapes()),
                source: std::sync::Arc::new(source),
                metadata: BTreeMap::new(),
            }
        }
        None => return Ok(None),
    }))
}

/// The tensor names and shapes of weight files (safetensors headers, or PyTorch files' pickles),
/// without reading any tensor.
pub fn weight_shapes(files: &[PathBuf]) -> Result<BTreeMap<String, Vec<usize>>, WeightsError> {
    let mut shapes = BTreeMap::new();
    for file in files {
        match format_of(file)? {
            WeightFormat::SafeTensors => {
                for (name, shape) in safetensors_shapes(std::slice::from_ref(file))? {
                    shapes.insert(name, shape.iter().map(|&d| d as usize).collect());
                }
            }
            WeightFormat::PyTorch => {
                let torch = super::torch_file::TorchFile::open(file)?;
                for (name, shape) in torch.shapes() {
                    shapes.insert(name.to_string(), shape.to_vec());
                }
            }
        }
    }
    Ok(shapes)
}

/// Safetensors files read one tensor at a time with plain reads.
///
/// Memory-mapping (candle's default) keeps every page of a file resident until the whole component
/// is built, so loading the 3.4 GB UNet peaked at twice its size; reading each tensor into its own
/// buffer keeps the peak at the weights themselves plus one tensor.
pub(crate) struct StreamedSafetensors {
    tensors: HashMap<String, StreamedTensor>,
}

struct StreamedTensor {
    file: std::sync::Arc<std::sync::Mutex<std::fs::File>>,
    path: PathBuf,
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte offset of the data and its length.
    start: u64,
    len: usize,
}

impl StreamedSafetensors {
    /// Checks and indexes the files' headers; a name in several files keeps the last.
    pub(crate) fn open(files: &[PathBuf]) -> Result<Self, WeightsError> {
        let mut tensors = HashMap::new();
        for path in files {
            let CheckedHeader {
                entries,
                data_start,
            } = read_checked_header(path)?;
            let (file, _) =
                super::files::open_regular(path).map_err(|source| WeightsError::Read {
                    path: path.clone(),
                    source,
                })?;
            let file = std::sync::Arc::new(std::sync::Mutex::new(file));
            for (name, info) in &entries {
                if name == "__metadata__" {
                    continue;
                }
                // read_checked_header verified these fields.
                let dtype = info
                    .get("dtype")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let shape = u64_list(info.get("shape")).unwrap_or_default();
                let offsets = u64_list(info.get("data_offsets")).unwrap_or_default();
                let [begin, end] = offsets[..] else { continue };
                tensors.insert(
                    name.clone(),
                    StreamedTensor {
                        file: file.clone(),
                        path: path.clone(),
                        dtype: dtype.to_string(),
                        shape: shape.iter().map(|&d| d as usize).collect(),
                        start: data_start + begin,
                        len: (end - begin) as usize,
                    },
                );
            }
        }
        Ok(Self { tensors })
    }

    /// Whether the files hold a tensor of this name.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor's name and shape.
    pub(crate) fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|(name, t)| (name.as_str(), t.shape.as_slice()))
    }

    pub(crate) fn load(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        use std::io::{Seek, SeekFrom};
        let entry = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let mut bytes = vec![0u8; entry.len];
        {
            let mut file = entry
                .file
                .lock()
                .map_err(|_| candle_core::Error::Msg("a weight reader panicked".into()))?;
            file.seek(SeekFrom::Start(entry.start))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "{}: reading {name}: {e}",
                        entry.path.display()
                    ))
                })?;
        }
        let stored = match entry.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "U32" => DType::U32,
            "U8" => DType::U8,
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor {name} has dtype {other}, which this program cannot load",
                    entry.path.display()
                )));
            }
        };
        tensor_from_le_bytes(&entry.path, name, stored, bytes, &entry.shape)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

/// The tensor of `shape` (on the CPU, in `stored`) whose values `bytes` hold little-endian, as
/// both weight readers read it: NaN or infinite floats are refused naming `path` and the tensor.
pub(crate) fn tensor_from_le_bytes(
    path: &Path,
    name: &str,
    stored: DType,
    bytes: Vec<u8>,
    shape: &[usize],
) -> candle_core::Result<Tensor> {
    let cpu = &Device::Cpu;
    // A weight of NaN or infinity turns every edit black (or every loss to NaN): refuse the
    // file naming the tensor, at the cost of one pass over values already in memory.
    let finite = |non_finite: usize, total: usize| -> candle_core::Result<()> {
        if non_finite == 0 {
            return Ok(());
        }
        Err(candle_core::Error::Msg(format!(
            "{}: tensor {name} has {non_finite} NaN or infinite values (of {total}): the weight file is damaged",
            path.display()
        )))
    };
    macro_rules! float_tensor {
        ($t:ty) => {{
            let values = le_values(&bytes, <$t>::from_le_bytes);
            finite(
                values.iter().filter(|v| !v.is_finite()).count(),
                values.len(),
            )?;
            Tensor::from_vec(values, shape, cpu)
        }};
    }
    match stored {
        DType::F32 => float_tensor!(f32),
        DType::F16 => float_tensor!(half::f16),
        DType::BF16 => float_tensor!(half::bf16),
        DType::F64 => float_tensor!(f64),
        DType::I64 => Tensor::from_vec(le_values(&bytes, i64::from_le_bytes), shape, cpu),
        DType::U32 => Tensor::from_vec(le_values(&bytes, u32::from_le_bytes), shape, cpu),
        DType::U8 => Tensor::from_vec(bytes, shape, cpu),
        other => Err(candle_core::Error::Msg(format!(
            "{}: tensor {name} has dtype {other:?}, which this program cannot load",
            path.display()
        ))),
    }
}

/// Little-endian values of `N` bytes each.
fn le_values<T, const N: usize>(bytes: &[u8], from_le: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|chunk| {
            let mut array = [0u8; N];
            array.copy_from_slice(chunk);
            from_le(array)
        })
        .collect()
}

/// The `__metadata__` of a safetensors file (string values only), from its checked header.
pub fn safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>, WeightsError> {
    let header = read_checked_header(path)?;
    let mut out = BTreeMap::new();
    if let Some(Value::Object(map)) = header.entries.get("__metadata__") {
        for (key, value) in map {
            if let Value::String(text) = value {
                out.insert(key.clone(), text.clone());
            }
        }
    }
    Ok(out)
}

/// The tensor names and shapes of safetensors files, read from their (checked) headers only,
/// for diagnostics such as "this UNet takes 4 input channels, not 8".
pub fn safetensors_shapes(files: &[PathBuf]) -> Result<BTreeMap<String, Vec<u64>>, WeightsError> {
    let mut shapes = BTreeMap::new();
    for path in files {
        for (name, info) in read_checked_header(path)?.entries {
            if name == "__metadata__" {
                continue;
            }
            shapes.insert(name, u64_list(info.get("shape")).unwrap_or_default());
        }
    }
    Ok(shapes)
}

#[cfg(test)]
mod tests;
