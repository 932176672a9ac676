//! Reading a float32 `.npy` array (`--latents`, diffusers' `latents=`), checking every size the
//! header declares against the file's length and a limit before anything is allocated: a
//! 192-byte file declaring shape (1, 4, 100000, 100000) is refused, not allocated.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;

use crate::model::files::{human_bytes, open_regular};

/// Largest `.npy` file read: the initial latents of a 8192×8192 edit are 16 MiB.
pub const MAX_NPY_BYTES: u64 = 256 << 20;

/// Largest header read (numpy's own reader refuses headers over 10 000 bytes by default).
const MAX_HEADER_BYTES: u64 = 64 << 10;

/// Most dimensions accepted (numpy allows 64; latents have 4).
const MAX_DIMS: usize = 32;

/// A float32 array: its shape and its values in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Why a `.npy` file could not be read. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// The file could not be opened or read (missing, not a regular file, I/O error).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The content is not a `.npy` array this reader takes.
    #[error("{} is not a readable .npy array: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// Reads a little-endian float32 (`'<f4'`), C-ordered `.npy` file (format versions 1 to 3).
pub fn read_f32_npy(path: &Path) -> Result<NpyArray, NpyError> {
    let io = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |reason: String| NpyError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let (file, file_len) = open_regular(path).map_err(io)?;
    if file_len > MAX_NPY_BYTES {
        return Err(invalid(format!(
            "it has {file_len} bytes, more than the {} a latents file may have",
            human_bytes(MAX_NPY_BYTES)
        )));
    }
    // Read at most what was measured, so a file that grows meanwhile is not followed.
    let mut bytes = Vec::with_capacity(file_len as usize);
    file.take(file_len).read_to_end(&mut bytes).map_err(io)?;
    let (header, data) = split_header(&bytes).map_err(invalid)?;
    let (descr, fortran_order, shape) = parse_header(header).map_err(invalid)?;
    if descr != "<f4" {
        return Err(invalid(format!(
            "its dtype is '{descr}'; float32 ('<f4') is needed"
        )));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|count| count.checked_mul(4))
        .ok_or_else(|| invalid(format!("shape {shape:?} overflows")))?;
    if count != data.len() {
        return Err(invalid(format!(
            "shape {shape:?} needs {count} bytes of float32 data, the file has {}",
            data.len()
        )));
    }
    if fortran_order && shape.iter().filter(|&&d| d > 1).count() > 1 {
        return Err(invalid(
            "it is stored in Fortran order; save it with numpy.ascontiguousarray".to_string(),
        ));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(NpyArray { shape, values })
}

/// The header text and the data after it; the header's declared length is checked against the
/// bytes present and [`MAX_HEADER_BYTES`].
fn split_header(bytes: &[u8]) -> Result<(&str, &[u8]), String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || !bytes.starts_with(MAGIC) {
        return Err("it does not start with the .npy signature".to_string());
    }
    let (len_size, header_len) = match bytes[6] {
        1 => (2, u64::from(u16::from_le_bytes([bytes[8], bytes[9]]))),
        2 | 3 if bytes.len() >= 12 => (
            4,
            u64::from(u32::from_le_bytes([
                bytes[8], bytes[9], bytes[10], bytes[11],
            ])),
        ),
        version => return Err(format!("format version {version} is not one numpy writes")),
    };
    let start = 8 + len_size;
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "its header declares {header_len} bytes, more than {MAX_HEADER_BYTES}"
        ));
    }
    let end = start + header_len as usize;
    if end > bytes.len() {
        return Err(format!(
            "its header declares {header_len} bytes but the file ends after {}",
            bytes.len() - start
        ));
    }
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| "its header is not text".to_string())?;
    Ok((header, &bytes[end..]))
}

/// The header's three fields, as the Python dict literal numpy writes them.
static DESCR: LazyLock<Result<Regex, regex::Error>> =
    LazyLock::new(|| Regex::new(r"'descr'\s*:\s*'([^']*)'"));
static FORTRAN_ORDER: LazyLock<Result<Regex, regex::Error>> =
    LazyLock::new(|| Regex::new(r"'fortran_order'\s*:\s*(True|False)"));
static SHAPE: LazyLock<Result<Regex, regex::Error>> =
    LazyLock::new(|| Regex::new(r"'shape'\s*:\s*\(([^)]*)\)"));

/// `descr`, `fortran_order` and `shape` from the header's Python dict literal.
fn parse_header(header: &str) -> Result<(String, bool, Vec<usize>), String> {
    let field =
        |re: &LazyLock<Result<Regex, regex::Error>>, name: &str| -> Result<String, String> {
            let re = re.as_ref().map_err(|e| e.to_string())?;
            re.captures(header)
                .and_then(|c| c.get(1))
                .map(|m| m.as_str().to_string())
                .ok_or_else(|| format!("its header has no {name}"))
        };
    let descr = field(&DESCR, "'descr'")?;
    let fortran_order = field(&FORTRAN_ORDER, "'fortran_order'")? == "True";
    let dims = field(&SHAPE, "'shape'")?;
    let shape = dims
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| {
            d.parse::<usize>()
                .map_err(|_| format!("its shape ({dims}) has a dimension {d:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if shape.len() > MAX_DIMS {
        return Err(format!(
            "its shape has {} dimensions, more than {MAX_DIMS}",
            shape.len()
        ));
    }
    Ok((descr, fortran_order, shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-1 `.npy` file with the given header dict and data bytes.
    fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut header = dict.to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn a_float32_array_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let values = [1.0f32, -2.5, 3.25, 0.0, 7.0, 8.5];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let path = write(
            dir.path(),
            "a.npy",
            &npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }",
                &data,
            ),
        );
        let array = read_f32_npy(&path).unwrap();
        assert_eq!(array.shape, [1, 2, 3]);
        assert_eq!(array.values, values);
    }

    /// Issue 16 item 4: a header declaring 4×10¹⁰ elements in a 192-byte file is refused by
    /// comparing with the file's length, before any allocation.
    #[test]
    fn a_huge_declared_shape_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 100000, 100000), }",
            &[0u8; 64],
        );
        assert_eq!(bytes.len(), 192);
        let path = write(dir.path(), "huge.npy", &bytes);
        let message = read_f32_npy(&path).unwrap_err().to_string();
        assert!(
            message.contains("huge.npy")
                && message.contains("[1, 4, 100000, 100000]")
                && message.contains("the file has 64"),
            "{message}"
        );
        // A shape whose byte count overflows.
        let path = write(
            dir.path(),
            "overflow.npy",
            &npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4), }",
                &[],
            ),
        );
        let message = read_f32_npy(&path).unwrap_err().to_string();
        assert!(message.contains("overflows"), "{message}");
    }

    #[test]
    fn bad_headers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, Vec<u8>, &str); 5] = [
            ("empty.npy", Vec::new(), "signature"),
            (
                "f8.npy",
                npy(
                    "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }",
                    &[0; 8],
                ),
                "'<f8'",
            ),
            (
                "noshape.npy",
                npy("{'descr': '<f4', 'fortran_order': False, }", &[]),
                "no 'shape'",
            ),
            (
                "text.npy",
                npy(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }",
                    &[],
                ),
                "\"x\"",
            ),
            (
                "longheader.npy",
                {
                    let mut b = b"\x93NUMPY\x01\x00".to_vec();
                    b.extend_from_slice(&60_000u16.to_le_bytes());
                    b.extend_from_slice(b"{'descr'");
                    b
                },
                "declares 60000 bytes",
            ),
        ];
        for (name, bytes, expected) in cases {
            let path = write(dir.path(), name, &bytes);
            let message = read_f32_npy(&path).unwrap_err().to_string();
            assert!(
                message.contains(name) && message.contains(expected),
                "{name}: {message}"
            );
        }
    }

    /// Damaged copies of a valid file (bytes changed, cut, or grown) are read or refused, never
    /// a panic or an allocation beyond the file: a small deterministic fuzz of the reader.
    #[test]
    fn damaged_files_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let valid = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }",
            &data,
        );
        let path = dir.path().join("fuzz.npy");
        let mut rng = crate::test_support::XorShift::new(0x9E37_79B9_7F4A_7C15);
        let mut refused = 0;
        for _ in 0..500 {
            // A digit of the header (the shape, the length) is what a changed digit hits.
            let bytes = rng.damage(&valid, 10..128);
            std::fs::write(&path, &bytes).unwrap();
            match read_f32_npy(&path) {
                Ok(array) => assert!(array.values.len() * 4 <= bytes.len()),
                Err(err) => {
                    assert!(err.to_string().contains("fuzz.npy"), "{err}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 120, "only {refused} of 500 damaged files refused");
    }

    /// Issue 16 item 5: a device given as --latents is refused at once.
    #[cfg(unix)]
    #[test]
    fn a_device_is_refused() {
        let message = read_f32_npy(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("not a regular file"), "{message}");
    }
}
