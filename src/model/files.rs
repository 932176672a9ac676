//! Opening the files a model, an image or a latents array is read from: regular files only, and
//! never more bytes than the caller's stated limit.
//!
//! A FIFO given as an input blocks forever in `open`, `/dev/zero` reads until memory runs out and
//! a directory fails with an obscure error; so the type is checked on the path (symlinks
//! followed, as in the Hugging Face cache) before opening, and again on the open handle. Errors are
//! plain [`std::io::Error`]s for each reader to wrap with the file's name; a missing file keeps
//! the kind [`std::io::ErrorKind::NotFound`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A file-system operation that failed on `path`: "writing /x/y: No space left on device".
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct FileError {
    /// What was being done, as a verb: "writing", "renaming", "listing".
    pub action: &'static str,
    pub path: PathBuf,
    pub source: io::Error,
}

/// A `map_err` adapter naming the action and the path (`?` then wraps the [`FileError`] into
/// the caller's error type).
pub fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FileError {
    let path = path.to_path_buf();
    move |source| FileError {
        action,
        path,
        source,
    }
}

/// Largest JSON config file read (`config.json`, `model_index.json`, `scheduler_config.json`,
/// weight indexes): real ones are a few kilobytes, a sharded index a few hundred.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Largest tokenizer file read: CLIP's `tokenizer.json` is about 3.6 MB, `vocab.json` 1 MB.
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// What a path is when it is not a regular file, for messages.
fn kind_of(metadata: &std::fs::Metadata) -> &'static str {
    let file_type = metadata.file_type();
    if file_type.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    "not a plain file"
}

fn not_regular(metadata: &std::fs::Metadata) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is {}, not a regular file", kind_of(metadata)),
    )
}

/// Opens `path` for reading if it is a regular file; returns the file and its length.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    // Checked before `open`: opening a FIFO without a writer never returns.
    let metadata = std::fs::metadata(path)?;
    if !metadata.is_file() {
        return Err(not_regular(&metadata));
    }
    let file = File::open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(not_regular(&metadata));
    }
    Ok((file, metadata.len()))
}

/// Human size for limits in messages: "64 MiB", "1.3 GiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64;
    let mut unit = "bytes";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {unit}")
    } else {
        format!("{value:.1} {unit}")
    }
}

/// The whole of a regular file of at most `max_bytes` bytes. A larger file is refused before
/// anything is read, and a file that grows while read is cut off at the limit and refused.
pub fn read_limited(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    let too_large = |len: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "it has {len} bytes, more than the {} this file may have",
                human_bytes(max_bytes)
            ),
        )
    };
    if len > max_bytes {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_to_string_limited(path: &Path, max_bytes: u64) -> io::Result<String> {
    String::from_utf8(read_limited(path, max_bytes)?).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_read_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        std::fs::write(&path, b"{}").unwrap();
        assert_eq!(read_limited(&path, 2).unwrap(), b"{}");
        let err = read_limited(&path, 1).unwrap_err();
        assert!(err.to_string().contains("more than the 1 bytes"), "{err}");
        let missing = read_limited(&dir.path().join("nope"), 10).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn folders_and_devices_are_refused_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_limited(dir.path(), 10).unwrap_err();
        assert!(err.to_string().contains("a folder"), "{err}");
        #[cfg(unix)]
        {
            let err = read_limited(Path::new("/dev/zero"), 10).unwrap_err();
            assert!(err.to_string().contains("character device"), "{err}");
        }
    }

    /// A FIFO without a writer would block `open` forever; it is refused before opening.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path and a mode; no memory is shared.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let err = open_regular(&fifo).unwrap_err();
        assert!(err.to_string().contains("FIFO"), "{err}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(10), "10 bytes");
        assert_eq!(human_bytes(64 << 20), "64 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
