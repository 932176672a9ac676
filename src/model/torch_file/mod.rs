//! PyTorch weight files (`.ckpt`, `.pt`, `.pth`, `.bin` as `torch.save` writes them: a zip archive
//! holding `<name>/data.pkl` and one `<name>/data/<key>` record per storage), read without
//! running anything.
//!
//! The pickle is interpreted by [`unpickle`], which builds plain data and refuses any global
//! outside PyTorch's tensor-rebuilding whitelist (naming the file, the callable and the byte),
//! so a checkpoint that would run code when unpickled by Python runs nothing here. Every size the
//! file declares is checked against its length before anything is allocated: the pickle's own
//! length, each storage record's bytes against the storage's element count and dtype, and each
//! tensor's extent (offset, shape, strides) against its storage. Tensors are read one at a time
//! when asked for (a 7 GB checkpoint holding EMA and non-EMA weights is never read whole), and
//! values of NaN or infinity are refused naming the tensor, as for safetensors files.
//!
//! The state dict is the top-level dict, or the dict under `state_dict` (PyTorch Lightning's
//! checkpoints, as diffusers reads them); entries that are not tensors are ignored.

pub mod unpickle;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use self::unpickle::{Pairs, Refusal, StorageRef, TensorRef, Value};
use super::weights::tensor_from_le_bytes;

/// Largest pickle read (Stable Diffusion's is ~200 KB; optimizer states add a few MB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;
/// Most dimensions a tensor may have.
const MAX_RANK: usize = 8;

/// Why a PyTorch file could not be read. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TorchFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The pickle would run code: nothing was run.
    #[error("{path}: refused: {refusal}")]
    Unsafe { path: PathBuf, refusal: String },
    #[error("{path} is truncated: {reason} (an interrupted download? delete it and fetch again)")]
    Truncated { path: PathBuf, reason: String },
    #[error("{path} is not a PyTorch weights file this program reads: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// One tensor of the file: a strided view of a storage record.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    stride: Vec<usize>,
    /// Absolute file offset of element 0 of the storage.
    storage_start: u64,
    /// First element of the view, in elements of the storage.
    offset: usize,
}

/// A PyTorch weights file whose tensors are read on demand.
pub struct TorchFile {
    path: PathBuf,
    file: Mutex<File>,
    tensors: BTreeMap<String, Entry>,
    /// `global_step` beside the state dict (Lightning checkpoints), when there is one.
    global_step: Option<i64>,
}

impl std::fmt::Debug for TorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// The element type of a torch storage class, `None` for those this program cannot load.
fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "ByteStorage" | "BoolStorage" | "CharStorage" => DType::U8,
        _ => return None,
    })
}

/// A zip record's place in the file.
struct Record {
    data_start: u64,
    len: u64,
}

impl TorchFile {
    /// Opens `path`, reads and checks its pickle and the records it names. No tensor is read.
    pub fn open(path: &Path) -> Result<Self, TorchFileError> {
        let read_err = |source| TorchFileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |reason: String| TorchFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let truncated = |reason: String| TorchFileError::Truncated {
            path: path.to_path_buf(),
            reason,
        };
        let (mut file, file_len) = super::files::open_regular(path).map_err(read_err)?;
        let mut magic = [0u8; 4];
        let got = file.by_ref().take(4).read(&mut magic).map_err(read_err)?;
        if got < 4 {
            return Err(truncated(format!("it has {file_len} bytes")));
        }
        if magic != *b"PK\x03\x04" {
            return Err(invalid(if magic[0] == 0x80 {
                "it is a PyTorch file in the legacy format (before PyTorch 1.6, not a zip archive), \
                 which this program does not read; save it again with a newer PyTorch or convert \
                 it to .safetensors"
                    .to_string()
            } else {
                "it is not a zip archive as torch.save writes them".to_string()
            }));
        }
        file.seek(SeekFrom::Start(0)).map_err(read_err)?;
        // The zip reader reads the directory; records are read with plain reads at their offsets.
        let mut raw = file.try_clone().map_err(read_err)?;
        let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
            // A zip whose end (the central directory) is missing was cut off.
            truncated(format!("its zip directory cannot be read ({e})"))
        })?;

        // Record names → index; the pickle is `<prefix>data.pkl`, the storages `<prefix>data/<key>`.
        let mut names: HashMap<String, usize> = HashMap::new();
        for index in 0..archive.len() {
            if let Some(Ok(name)) = archive.name_for_index(index) {
                names.insert(name.into_owned(), index);
            }
        }
        let pickles: Vec<&String> = names
            .keys()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let pickle_name = match pickles.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(invalid("the archive has no data.pkl".into())),
            _ => return Err(invalid("the archive has several data.pkl".into())),
        };
        let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
        if let Some(&index) = names.get(&format!("{prefix}byteorder")) {
            let record = record(&mut archive, index, file_len, path)?;
            let bytes = read_at(&mut raw, &record, path)?;
            if bytes != b"little" {
                return Err(invalid(format!(
                    "its tensors are stored {:?}-endian; only little-endian files are read",
                    String::from_utf8_lossy(&bytes)
                )));
            }
        }
        let pickle_record = record(&mut archive, names[&pickle_name], file_len, path)?;
        if pickle_record.len > MAX_PICKLE_BYTES {
            return Err(invalid(format!(
                "its pickle has {} bytes, more than the {} this program reads",
                pickle_record.len,
                super::files::human_bytes(MAX_PICKLE_BYTES)
            )));
        }
        let pickle = read_at(&mut raw, &pickle_record, path)?;
        let value = unpickle::unpickle(&pickle).map_err(|refusal| match refusal {
            Refusal::Unsafe { .. } => TorchFileError::Unsafe {
                path: path.to_path_buf(),
                refusal: refusal.to_string(),
            },
            Refusal::Invalid { .. } => invalid(refusal.to_string()),
        })?;
        let (state, global_step) = state_dict(value)
            .ok_or_else(|| invalid("its pickle holds no dict of tensors (a state dict)".into()))?;

        let mut storages: HashMap<String, u64> = HashMap::new();
        let mut tensors = BTreeMap::new();
        for (key, value) in state.iter() {
            let (Value::Str(name), Value::Tensor(tensor)) = (key, value) else {
                continue;
            };
            let storage = &tensor.storage;
            let Some(dtype) = storage_dtype(storage.class) else {
                return Err(invalid(format!(
                    "tensor {name} is stored as {}, which this program cannot load",
                    storage.class
                )));
            };
            let storage_start = match storages.get(&storage.key) {
                Some(&start) => start,
                None => {
                    let record_name = format!("{prefix}data/{}", storage.key);
                    let Some(&index) = names.get(&record_name) else {
                        return Err(truncated(format!(
                            "tensor {name}'s data (record {record_name}) is not in the archive"
                        )));
                    };
                    let record = record(&mut archive, index, file_len, path)?;
                    check_storage(storage, dtype, &record)
                        .map_err(|reason| invalid(format!("tensor {name}: {reason}")))?;
                    storages.insert(storage.key.clone(), record.data_start);
                    record.data_start
                }
            };
            let (shape, stride, offset) = check_view(tensor, dtype)
                .map_err(|reason| invalid(format!("tensor {name}: {reason}")))?;
            tensors.insert(
                name.clone(),
                Entry {
                    dtype,
                    shape,
                    stride,
                    storage_start,
                    offset,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(raw),
            tensors,
            global_step,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensors' names and shapes.
    pub fn shapes(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.tensors
            .iter()
            .map(|(name, e)| (name.as_str(), e.shape.as_slice()))
    }

    /// `global_step` of a Lightning checkpoint.
    pub fn global_step(&self) -> Option<i64> {
        self.global_step
    }

    /// Whether the file has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Reads one tensor (contiguous, on the CPU, in its stored dtype) and converts it. Floating
    /// values of NaN or infinity are refused naming the tensor.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let size = entry.dtype.size_in_bytes();
        let numel: usize = entry.shape.iter().product();
        // The extent of the view in the storage (checked at open against the record).
        let extent = if numel == 0 {
            0
        } else {
            1 + entry
                .shape
                .iter()
                .zip(&entry.stride)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
        };
        let mut bytes = vec![0u8; extent * size];
        {
            let mut file = self
                .file
                .lock()
                .map_err(|_| candle_core::Error::Msg("a weight reader panicked".into()))?;
            let start = entry.storage_start + (entry.offset * size) as u64;
            file.seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(|e| {
                    candle_core::Error::Msg(format!("{}: reading {name}: {e}", self.path.display()))
                })?;
        }
        let contiguous = is_contiguous(&entry.shape, &entry.stride);
        let bytes = if contiguous {
            bytes
        } else {
            gather(&bytes, &entry.shape, &entry.stride, size)
        };
        tensor_from_le_bytes(&self.path, name, entry.dtype, bytes, &entry.shape)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

/// The state dict (the dict, or the dict under `state_dict`, as often as it nests) and the
/// `global_step` beside it.
fn state_dict(value: Value) -> Option<(Pairs, Option<i64>)> {
    let Value::Dict(mut dict) = value else {
        return None;
    };
    let mut global_step = None;
    loop {
        let inner = dict.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Dict(inner)) if k == "state_dict" => Some(inner.clone()),
            _ => None,
        });
        if let Some(step) = dict.iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Int(step)) if k == "global_step" => Some(*step),
            _ => None,
        }) {
            global_step = Some(step);
        }
        match inner {
            Some(inner) => dict = inner,
            None => return Some((dict, global_step)),
        }
    }
}

/// A record's data range, checked against the file: stored (not compressed) and inside it.
fn record(
    archive: &mut zip::ZipArchive<std::io::BufReader<File>>,
    index: usize,
    file_len: u64,
    path: &Path,
) -> Result<Record, TorchFileError> {
    let entry = archive
        .by_index_raw(index)
        .map_err(|e| TorchFileError::Truncated {
            path: path.to_path_buf(),
            reason: format!("zip record {index} cannot be read ({e})"),
        })?;
    let name = entry.name().map(|n| n.into_owned()).unwrap_or_default();
    if entry.compression() != zip::CompressionMethod::Stored
        || entry.compressed_size() != entry.size()
    {
        return Err(TorchFileError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "record {name} is compressed ({:?}); torch.save stores records uncompressed",
                entry.compression()
            ),
        });
    }
    let Some(data_start) = entry.data_start() else {
        return Err(TorchFileError::Invalid {
            path: path.to_path_buf(),
            reason: format!("record {name} has no data offset"),
        });
    };
    let len = entry.size();
    match data_start.checked_add(len) {
        Some(end) if end <= file_len => Ok(Record { data_start, len }),
        _ => Err(TorchFileError::Truncated {
            path: path.to_path_buf(),
            reason: format!(
                "record {name} needs bytes {data_start} to {} but the file has {file_len}",
                data_start.saturating_add(len)
            ),
        }),
    }
}

/// The bytes of a (checked) record.
fn read_at(reader: &mut File, record: &Record, path: &Path) -> Result<Vec<u8>, TorchFileError> {
    let mut bytes = vec![0u8; record.len as usize];
    reader
        .seek(SeekFrom::Start(record.data_start))
        .and_then(|_| reader.read_exact(&mut bytes))
        .map_err(|source| TorchFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes)
}

/// The storage's declared size against its record.
fn check_storage(storage: &StorageRef, dtype: DType, record: &Record) -> Result<(), String> {
    let needed = storage
        .numel
        .checked_mul(dtype.size_in_bytes() as u64)
        .ok_or_else(|| {
            format!(
                "its storage declares an impossible {} elements",
                storage.numel
            )
        })?;
    if needed > record.len {
        return Err(format!(
            "its storage declares {} elements ({needed} bytes) but its record has {} bytes",
            storage.numel, record.len
        ));
    }
    Ok(())
}

/// Shape, strides and offset of a view, checked to lie inside its storage.
fn check_view(
    tensor: &TensorRef,
    _dtype: DType,
) -> Result<(Vec<usize>, Vec<usize>, usize), String> {
    if tensor.shape.len() > MAX_RANK {
        return Err(format!(
            "{} dimensions (at most {MAX_RANK})",
            tensor.shape.len()
        ));
    }
    let too_large = || "its shape, strides or offset overflow".to_string();
    let numel = tensor
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(too_large)?;
    let end = if numel == 0 {
        tensor.offset
    } else {
        let mut last = tensor.offset;
        for (&d, &s) in tensor.shape.iter().zip(&tensor.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| last.checked_add(x))
                .ok_or_else(too_large)?;
        }
        last + 1
    };
    if end > tensor.storage.numel {
        return Err(format!(
            "its view (offset {}, shape {:?}, strides {:?}) reaches element {end} of a storage of {}",
            tensor.offset, tensor.shape, tensor.stride, tensor.storage.numel
        ));
    }
    let to_usize = |v: &[u64]| -> Result<Vec<usize>, String> {
        v.iter()
            .map(|&x| usize::try_from(x).map_err(|_| too_large()))
            .collect()
    };
    Ok((
        to_usize(&tensor.shape)?,
        to_usize(&tensor.stride)?,
        usize::try_from(tensor.offset).map_err(|_| too_large())?,
    ))
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

/// The elements of a strided view (`bytes` starts at its first element) in row-major order.
fn gather(bytes: &[u8], shape: &[usize], stride: &[usize], size: usize) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * size);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at: usize = index.iter().zip(stride).map(|(&i, &s)| i * s).sum();
        out.extend_from_slice(&bytes[at * size..(at + 1) * size]);
        for dim in (0..shape.len()).rev() {
            index[dim] += 1;
            if index[dim] < shape[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_views_are_gathered_in_row_major_order() {
        // A 2x3 tensor stored transposed (Fortran order): storage [a d b e c f].
        let storage: Vec<u8> = [0u8, 3, 1, 4, 2, 5].to_vec();
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert_eq!(
            gather(&storage, &[2, 3], &[1, 2], 1),
            vec![0, 1, 2, 3, 4, 5]
        );
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[7, 1]));
    }

    #[test]
    fn views_beyond_their_storage_are_refused() {
        let storage = std::rc::Rc::new(StorageRef {
            class: "FloatStorage",
            key: "0".into(),
            numel: 6,
        });
        let view = |offset, shape: Vec<u64>, stride: Vec<u64>| TensorRef {
            storage: storage.clone(),
            offset,
            shape,
            stride,
        };
        assert!(check_view(&view(0, vec![2, 3], vec![3, 1]), DType::F32).is_ok());
        assert!(check_view(&view(1, vec![2, 3], vec![3, 1]), DType::F32).is_err());
        assert!(check_view(&view(0, vec![u64::MAX, 2], vec![u64::MAX, 1]), DType::F32).is_err());
        assert!(check_view(&view(6, vec![0], vec![1]), DType::F32).is_ok());
    }
}
