//! One file from the Hub into the cache, in huggingface_hub's layout: the metadata request
//! (commit, etag, size, and the CDN address of large files), the body into `blobs/<etag>.part`,
//! checked against the etag (a large file's etag is its SHA-256, a small file's the git blob
//! SHA-1), renamed to `blobs/<etag>` and linked from `snapshots/<commit>/<file>`.
//!
//! What it guarantees: a download that stops moving fails after the stall time (see
//! [`super::client`]) with a message naming the host and the file; a dropped connection is
//! retried from where it stopped (`Range: bytes=N-`), and a `.part` left by an earlier run is
//! continued the same way; a file whose bytes do not match its etag, or that cannot be written
//! (a full disk), leaves no `.part` behind, and never enters the cache.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring::digest;

use super::HubError;
use super::client::{
    BodyPart, CallError, Exchange, HubClient, NetError, encode_path, host_of, origin,
};
use crate::model::weights::is_plain_file_name;

/// Tries in a row that bring no new byte before a download gives up; a try that brings bytes
/// resets the count, so a connection that keeps dropping but moves on is followed to the end.
const TRIES_WITHOUT_PROGRESS: u32 = 3;

/// Relative redirects followed on the Hub itself (a renamed repo).
const MAX_RELATIVE_REDIRECTS: usize = 5;

/// Why one file could not be downloaded (the file and repo are named by
/// [`HubError::Download`]).
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// No bytes for the stall time, in every try.
    #[error(
        "no data from {host} for {stall_secs} s ({tries} tries){kept}; \
         check the network, or set {var} to wait longer",
        var = super::client::STALL_TIMEOUT_VAR
    )]
    Stalled {
        /// `host:port` that went silent.
        host: String,
        /// The stall time, in seconds.
        stall_secs: String,
        /// Tries made.
        tries: u32,
        /// What was kept for the next run (empty when nothing).
        kept: String,
    },
    /// The connection failed in every try.
    #[error(
        "{host} could not be reached or dropped the connection ({tries} tries): {reason}{kept}"
    )]
    Connection {
        /// `host:port`.
        host: String,
        /// Tries made.
        tries: u32,
        /// The last failure.
        reason: String,
        /// What was kept for the next run (empty when nothing).
        kept: String,
    },
    /// An HTTP status that is not an answer with the file.
    #[error("{host} answered HTTP {status}{hint}")]
    Status {
        /// `host:port`.
        host: String,
        /// The status.
        status: u16,
        /// What it likely means.
        hint: String,
    },
    /// The Hub's answer lacks what a download needs.
    #[error("{host} answered without {what}")]
    BadAnswer {
        /// `host:port`.
        host: String,
        /// What is missing or malformed.
        what: String,
    },
    /// The bytes do not hash to the etag.
    #[error(
        "the downloaded bytes have {algorithm} {got}, not the {expected} the Hub lists: \
         the file is damaged and was deleted; try again"
    )]
    ChecksumMismatch {
        /// `SHA-256` or `git SHA-1`.
        algorithm: &'static str,
        /// The etag.
        expected: String,
        /// What the bytes hash to.
        got: String,
    },
    /// The disk of the cache is full.
    #[error(
        "the disk holding {folder} is full ({written} bytes written); the partial file was \
         deleted: free some space, or set HF_HUB_CACHE to a folder on a disk with room"
    )]
    DiskFull {
        /// The blobs folder.
        folder: PathBuf,
        /// Bytes of the file on disk when the write failed.
        written: u64,
    },
    /// Any other error writing the cache.
    #[error("cannot write {path}: {source}; the partial file was deleted")]
    Write {
        /// The `.part` file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What to download, and where.
pub(super) struct FileTarget<'a> {
    /// `owner/name`.
    pub(super) repo_id: &'a str,
    /// `""` for models, `"datasets/"` for datasets (the URL prefix).
    pub(super) url_prefix: &'static str,
    /// The listed commit.
    pub(super) sha: &'a str,
    /// The file's path in the repo.
    pub(super) file: &'a str,
    /// `<cache>/models--owner--name`.
    pub(super) repo_dir: &'a Path,
    /// The cache folder (for `.locks/`, as huggingface_hub keeps them).
    pub(super) cache_dir: &'a Path,
}

/// Progress of the bytes of one file: the offset a try starts at, then each chunk.
pub(super) trait FileProgress {
    /// A try starts at `offset` bytes of `total`.
    fn started(&mut self, offset: u64, total: u64);
    /// `bytes` more are on disk.
    fn advanced(&mut self, bytes: u64);
    /// The file is complete.
    fn finished(&mut self);
}

/// Why a try ended: give up (or cancel), or try again.
enum Failure {
    /// Boxed: a `Result` carrying it stays small.
    Fatal(Box<HubError>),
    Retry {
        host: String,
        error: NetError,
    },
}

impl Failure {
    fn fatal(err: HubError) -> Failure {
        Failure::Fatal(Box::new(err))
    }
}

/// The answer to the metadata request.
struct Metadata {
    commit: String,
    etag: String,
    size: u64,
    /// Where the bytes are: the resolve URL, or the CDN it redirects to.
    url: String,
}

/// What the tries of one file have done so far.
#[derive(Default)]
struct Tries {
    /// Tries made.
    made: u32,
    /// Tries in a row that wrote no byte.
    fruitless: u32,
    /// Whether the current try left the `.part` longer than it found it (a try that starts
    /// over and gets as far as the last one does not count, so no server loops it forever).
    progressed: bool,
    /// The `.part`'s length when the current try opened it.
    start_len: u64,
    /// Bytes of the file in its `.part` after the last write.
    kept: u64,
}

/// Downloads `target.file` at `target.sha` into the cache; returns its snapshot path.
pub(super) fn download_file(
    client: &HubClient,
    target: &FileTarget,
    progress: &mut dyn FileProgress,
    cancel: &AtomicBool,
) -> Result<PathBuf, HubError> {
    let mut tries = Tries::default();
    loop {
        tries.made += 1;
        tries.progressed = false;
        let (host, error) = match try_once(client, target, progress, cancel, &mut tries) {
            Ok(path) => return Ok(path),
            Err(Failure::Fatal(err)) => return Err(*err),
            Err(Failure::Retry { host, error }) => (host, error),
        };
        if tries.progressed {
            tries.fruitless = 0;
            continue;
        }
        tries.fruitless += 1;
        if tries.fruitless >= TRIES_WITHOUT_PROGRESS {
            let kept = if tries.kept > 0 {
                format!(
                    "; the {} bytes received are kept and the next download continues from them",
                    tries.kept
                )
            } else {
                String::new()
            };
            let source = match error {
                NetError::Stalled => DownloadError::Stalled {
                    host,
                    stall_secs: format!("{}", client.stall().as_secs_f64()),
                    tries: tries.made,
                    kept,
                },
                NetError::Failed(reason) => DownloadError::Connection {
                    host,
                    tries: tries.made,
                    reason,
                    kept,
                },
            };
            return Err(download_error(client, target, source));
        }
        // 1 s, then 2 s between tries that bring nothing; at once after one that brought bytes.
        let wait = Duration::from_secs(1 << (tries.fruitless - 1).min(4));
        sleep_unless_cancelled(wait, cancel).map_err(|()| cancelled(target))?;
    }
}

fn sleep_unless_cancelled(wait: Duration, cancel: &AtomicBool) -> Result<(), ()> {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if cancel.load(Ordering::Acquire) {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn cancelled(target: &FileTarget) -> HubError {
    HubError::Cancelled {
        repo: target.repo_id.to_string(),
    }
}

fn download_error(client: &HubClient, target: &FileTarget, source: DownloadError) -> HubError {
    HubError::Download {
        repo: target.repo_id.to_string(),
        file: target.file.to_string(),
        endpoint: client.endpoint().to_string(),
        source: Box::new(source),
    }
}

fn call_failure(target: &FileTarget, url: &str, err: CallError) -> Failure {
    match err {
        CallError::Cancelled => Failure::fatal(cancelled(target)),
        CallError::Net(error) => Failure::Retry {
            host: host_of(url),
            error,
        },
    }
}

/// One try: metadata, then the body from where the `.part` ends, then the check and the links.
fn try_once(
    client: &HubClient,
    target: &FileTarget,
    progress: &mut dyn FileProgress,
    cancel: &AtomicBool,
    tries: &mut Tries,
) -> Result<PathBuf, Failure> {
    let fatal = |source| Failure::fatal(download_error(client, target, source));
    let meta = metadata(client, target, cancel)?;
    if meta.commit != target.sha {
        return Err(Failure::fatal(HubError::CommitChanged {
            repo: target.repo_id.to_string(),
            file: target.file.to_string(),
            expected: target.sha.to_string(),
            got: meta.commit,
        }));
    }
    let blobs = target.repo_dir.join("blobs");
    let blob = blobs.join(&meta.etag);
    let pointer = target
        .repo_dir
        .join("snapshots")
        .join(target.sha)
        .join(target.file);
    if blob.is_file() {
        // Another snapshot (or an earlier run) already has these bytes.
        link_into_snapshot(&blob, &pointer).map_err(Failure::fatal)?;
        progress.started(meta.size, meta.size);
        progress.finished();
        return Ok(pointer);
    }
    let cache_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Failure::fatal(HubError::Cache { path, source })
    };
    std::fs::create_dir_all(&blobs).map_err(cache_err(&blobs))?;
    let _lock = lock_blob(target, &meta.etag, client.stall(), cancel)?;
    if blob.is_file() {
        // Finished by the process that held the lock.
        link_into_snapshot(&blob, &pointer).map_err(Failure::fatal)?;
        progress.started(meta.size, meta.size);
        progress.finished();
        return Ok(pointer);
    }

    let part_path = blobs.join(format!("{}.part", meta.etag));
    let mut part = PartFile::open(
        &part_path,
        &blobs,
        Verifier::for_etag(&meta.etag, meta.size),
    )
    .map_err(&fatal)?;
    tries.kept = part.len;
    tries.start_len = part.len;
    if part.len > meta.size {
        // Longer than the file: not a prefix of it.
        part.restart().map_err(&fatal)?;
    }
    if part.len < meta.size {
        receive_body(client, target, &meta, &mut part, progress, cancel, tries)?;
    } else {
        progress.started(part.len, meta.size);
    }
    if part.len != meta.size {
        return Err(Failure::Retry {
            host: host_of(&meta.url),
            error: NetError::Failed(format!(
                "the answer ended after {} of {} bytes",
                part.len, meta.size
            )),
        });
    }
    part.verify(&meta.etag).map_err(&fatal)?;
    drop(part);
    std::fs::rename(&part_path, &blob).map_err(cache_err(&blob))?;
    link_into_snapshot(&blob, &pointer).map_err(Failure::fatal)?;
    progress.finished();
    Ok(pointer)
}

/// The body from `part.len` on, appended to the part file.
fn receive_body(
    client: &HubClient,
    target: &FileTarget,
    meta: &Metadata,
    part: &mut PartFile,
    progress: &mut dyn FileProgress,
    cancel: &AtomicBool,
    tries: &mut Tries,
) -> Result<(), Failure> {
    let fatal = |source| Failure::fatal(download_error(client, target, source));
    let host = host_of(&meta.url);
    let range = format!("bytes={}-", part.len);
    let mut exchange: Exchange = client
        .get(&meta.url, Some(range), true, cancel)
        .map_err(|err| call_failure(target, &meta.url, err))?;
    match exchange.status {
        206 => {
            let start = exchange
                .header("content-range")
                .and_then(|r| r.strip_prefix("bytes "))
                .and_then(|r| r.split_once('-'))
                .and_then(|(start, _)| start.trim().parse::<u64>().ok());
            if start != Some(part.len) {
                return Err(fatal(DownloadError::BadAnswer {
                    host,
                    what: format!(
                        "the asked-for range (Content-Range {:?} for bytes {}-)",
                        exchange.header("content-range").unwrap_or(""),
                        part.len
                    ),
                }));
            }
        }
        // The server ignored the range: the body is the whole file.
        200 => part.restart().map_err(&fatal)?,
        // The range starts past the server's end of the file: the file is shorter than the Hub
        // said; tries that bring nothing end in an error naming this.
        416 => {
            return Err(Failure::Retry {
                host,
                error: NetError::Failed(format!(
                    "HTTP 416 for bytes {}- of a file the Hub says has {} bytes",
                    part.len, meta.size
                )),
            });
        }
        // A CDN address may have expired (they are signed for a while): the next try asks the
        // Hub for a fresh one.
        401 | 403 | 404 | 410 if meta.url != resolve_url(client, target) => {
            return Err(Failure::Retry {
                host,
                error: NetError::Failed(format!("HTTP {}", exchange.status)),
            });
        }
        status if status >= 500 || status == 429 || status == 408 => {
            return Err(Failure::Retry {
                host,
                error: NetError::Failed(format!("HTTP {status}")),
            });
        }
        status => {
            return Err(fatal(DownloadError::Status {
                host,
                status,
                hint: String::new(),
            }));
        }
    }
    progress.started(part.len, meta.size);
    loop {
        let piece = match exchange.next(cancel) {
            Ok(piece) => piece,
            Err(err) => return Err(call_failure(target, &meta.url, err)),
        };
        let bytes = match piece {
            BodyPart::Bytes(bytes) => bytes,
            BodyPart::End => return Ok(()),
        };
        if part.len + bytes.len() as u64 > meta.size {
            part.discard();
            return Err(fatal(DownloadError::BadAnswer {
                host,
                what: format!("stopping at the file's size ({} bytes)", meta.size),
            }));
        }
        part.append(&bytes).map_err(&fatal)?;
        tries.progressed = part.len > tries.start_len;
        tries.kept = part.len;
        progress.advanced(bytes.len() as u64);
    }
}

fn resolve_url(client: &HubClient, target: &FileTarget) -> String {
    format!(
        "{}/{}{}/resolve/{}/{}",
        client.endpoint(),
        target.url_prefix,
        target.repo_id,
        encode_path(target.sha, false),
        encode_path(target.file, true)
    )
}

/// `GET <resolve URL>` with `Range: bytes=0-0`, following only relative redirects (a renamed
/// repo): the commit, etag and size come from the Hub's headers (`X-Linked-Etag` and
/// `X-Linked-Size` for large files, whose bytes are at the `Location` it redirects to).
fn metadata(
    client: &HubClient,
    target: &FileTarget,
    cancel: &AtomicBool,
) -> Result<Metadata, Failure> {
    let bad = |url: &str, what: &str| {
        Failure::fatal(download_error(
            client,
            target,
            DownloadError::BadAnswer {
                host: host_of(url),
                what: what.to_string(),
            },
        ))
    };
    let mut url = resolve_url(client, target);
    let mut redirects = 0;
    let exchange = loop {
        let exchange = client
            .get(&url, Some("bytes=0-0".to_string()), false, cancel)
            .map_err(|err| call_failure(target, &url, err))?;
        let relative = (300..400)
            .contains(&exchange.status)
            .then(|| exchange.header("location"))
            .flatten()
            .filter(|location| location.starts_with('/') && !location.starts_with("//"));
        match relative {
            Some(location) if redirects < MAX_RELATIVE_REDIRECTS => {
                redirects += 1;
                let origin = origin(&url).unwrap_or_else(|| client.endpoint().to_string());
                url = format!("{origin}{location}");
            }
            _ => break exchange,
        }
    };
    let status = exchange.status;
    let host = host_of(&url);
    if !(200..400).contains(&status) {
        let hint = match status {
            401 | 403 => {
                " (access refused: a private or gated repo needs HF_TOKEN with access)".to_string()
            }
            404 => " (the file is not in the repository at this commit)".to_string(),
            _ => String::new(),
        };
        if status >= 500 || status == 429 || status == 408 {
            return Err(Failure::Retry {
                host,
                error: NetError::Failed(format!("HTTP {status}")),
            });
        }
        return Err(Failure::fatal(download_error(
            client,
            target,
            DownloadError::Status { host, status, hint },
        )));
    }
    let commit = exchange
        .header("x-repo-commit")
        .map(str::trim)
        .filter(|c| is_plain_file_name(c))
        .ok_or_else(|| bad(&url, "the X-Repo-Commit header"))?
        .to_string();
    let etag = exchange
        .header("x-linked-etag")
        .or_else(|| exchange.header("etag"))
        .map(|e| {
            e.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_string()
        })
        .filter(|e| is_plain_file_name(e))
        .ok_or_else(|| bad(&url, "a usable ETag header"))?;
    let content_range_total = exchange
        .header("content-range")
        .and_then(|r| r.rsplit_once('/'))
        .and_then(|(_, total)| total.trim().parse::<u64>().ok());
    let size = exchange
        .header("x-linked-size")
        .and_then(|s| s.trim().parse::<u64>().ok())
        .or(content_range_total)
        .or_else(|| {
            (status == 200)
                .then(|| exchange.header("content-length"))
                .flatten()
                .and_then(|s| s.trim().parse::<u64>().ok())
        })
        .ok_or_else(|| bad(&url, "the file's size (X-Linked-Size or Content-Range)"))?;
    let download_url = if (300..400).contains(&status) {
        let location = exchange
            .header("location")
            .ok_or_else(|| bad(&url, "a Location for its redirect"))?;
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            return Err(bad(&url, "an absolute Location for its redirect"));
        }
    } else {
        url.clone()
    };
    Ok(Metadata {
        commit,
        etag,
        size,
        url: download_url,
    })
}

/// The hash an etag names: 64 hex digits are a large file's SHA-256, 40 a small file's git
/// blob id (SHA-1 of `blob <size>\0` and the bytes); other etags (a mirror's) are not checked.
enum Verifier {
    Sha256(digest::Context),
    GitSha1(digest::Context, u64),
    Unchecked,
}

impl Verifier {
    fn for_etag(etag: &str, size: u64) -> Verifier {
        let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
        match etag.len() {
            64 if hex => Verifier::Sha256(digest::Context::new(&digest::SHA256)),
            40 if hex => Verifier::git_sha1(size),
            _ => Verifier::Unchecked,
        }
    }

    fn git_sha1(size: u64) -> Verifier {
        let mut context = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
        context.update(format!("blob {size}\0").as_bytes());
        Verifier::GitSha1(context, size)
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Verifier::Sha256(context) | Verifier::GitSha1(context, _) => context.update(bytes),
            Verifier::Unchecked => {}
        }
    }

    fn reset(&mut self) {
        *self = match self {
            Verifier::Sha256(_) => Verifier::Sha256(digest::Context::new(&digest::SHA256)),
            Verifier::GitSha1(_, size) => Verifier::git_sha1(*size),
            Verifier::Unchecked => Verifier::Unchecked,
        };
    }

    /// `Some((algorithm, hex digest))`, or `None` when unchecked.
    fn finish(self) -> Option<(&'static str, String)> {
        let (algorithm, context) = match self {
            Verifier::Sha256(context) => ("SHA-256", context),
            Verifier::GitSha1(context, _) => ("git SHA-1", context),
            Verifier::Unchecked => return None,
        };
        let hex = context
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some((algorithm, hex))
    }
}

/// `blobs/<etag>.part`, open for appending, with the hash of what it holds so far. A write
/// error or a wrong hash deletes it.
struct PartFile {
    path: PathBuf,
    blobs: PathBuf,
    file: Option<File>,
    len: u64,
    verifier: Verifier,
}

impl PartFile {
    /// Opens (or creates) the part file and hashes what it already holds.
    fn open(path: &Path, blobs: &Path, mut verifier: Verifier) -> Result<PartFile, DownloadError> {
        let write_err = |source| DownloadError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(write_err)?;
        let mut len = 0u64;
        let mut buffer = vec![0u8; 1 << 20];
        file.seek(SeekFrom::Start(0)).map_err(write_err)?;
        // Only the length the file has now: a special file (a link to a device) may read forever.
        let on_disk = file.metadata().map_err(write_err)?.len();
        let mut existing = (&mut file).take(on_disk);
        loop {
            let n = match existing.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(write_err(err)),
            };
            verifier.update(&buffer[..n]);
            len += n as u64;
        }
        Ok(PartFile {
            path: path.to_path_buf(),
            blobs: blobs.to_path_buf(),
            file: Some(file),
            len,
            verifier,
        })
    }

    /// Empties it, to download from the start.
    fn restart(&mut self) -> Result<(), DownloadError> {
        if let Some(file) = &self.file
            && let Err(err) = file.set_len(0)
        {
            return Err(self.write_failed(err));
        }
        self.len = 0;
        self.verifier.reset();
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), DownloadError> {
        let written = match &mut self.file {
            Some(file) => file.write_all(bytes),
            None => Err(std::io::Error::other("the part file was closed")),
        };
        if let Err(err) = written {
            return Err(self.write_failed(err));
        }
        self.verifier.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Checks the hash; a mismatch deletes the file.
    fn verify(&mut self, etag: &str) -> Result<(), DownloadError> {
        if let Some(file) = &mut self.file
            && let Err(err) = file.flush()
        {
            return Err(self.write_failed(err));
        }
        let verifier = std::mem::replace(&mut self.verifier, Verifier::Unchecked);
        match verifier.finish() {
            Some((algorithm, got)) if !got.eq_ignore_ascii_case(etag) => {
                self.discard();
                Err(DownloadError::ChecksumMismatch {
                    algorithm,
                    expected: etag.to_string(),
                    got,
                })
            }
            _ => Ok(()),
        }
    }

    /// A write failed: the file is deleted (a full disk must not keep a partial file).
    fn write_failed(&mut self, err: std::io::Error) -> DownloadError {
        let written = self.len;
        self.discard();
        if matches!(
            err.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ) {
            DownloadError::DiskFull {
                folder: self.blobs.clone(),
                written,
            }
        } else {
            DownloadError::Write {
                path: self.path.clone(),
                source: err,
            }
        }
    }

    /// Closes and deletes the file (best effort: it may be gone already).
    fn discard(&mut self) {
        self.file = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The lock huggingface_hub takes on a blob while downloading it
/// (`<cache>/.locks/<repo folder>/<etag>.lock`), so two programs never write one `.part`.
/// Waits while the holder's `.part` grows; gives up when it has not grown for the stall time.
fn lock_blob(
    target: &FileTarget,
    etag: &str,
    stall: Duration,
    cancel: &AtomicBool,
) -> Result<File, Failure> {
    let folder_name = target
        .repo_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let locks = target.cache_dir.join(".locks").join(folder_name);
    let path = locks.join(format!("{etag}.lock"));
    let cache_err = |source| {
        Failure::fatal(HubError::Cache {
            path: path.clone(),
            source,
        })
    };
    std::fs::create_dir_all(&locks).map_err(cache_err)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(cache_err)?;
    let part = target.repo_dir.join("blobs").join(format!("{etag}.part"));
    let part_len = || std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let mut last_len = part_len();
    let mut last_change = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(source)) => return Err(cache_err(source)),
        }
        if cancel.load(Ordering::Acquire) {
            return Err(Failure::fatal(cancelled(target)));
        }
        let len = part_len();
        if len != last_len {
            last_len = len;
            last_change = Instant::now();
        } else if last_change.elapsed() >= stall {
            return Err(Failure::fatal(HubError::Cache {
                path: path.clone(),
                source: std::io::Error::other(format!(
                    "another program holds this lock while downloading {} and its {} has not \
                     grown for {} s",
                    target.file,
                    part.display(),
                    stall.as_secs_f64()
                )),
            }));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `snapshots/<commit>/<file>` → `blobs/<etag>` as a relative symlink, as huggingface_hub
/// links them; where symlinks are not allowed (Windows without developer mode) a hard link,
/// else a copy.
fn link_into_snapshot(blob: &Path, pointer: &Path) -> Result<(), HubError> {
    let cache_err = |source| HubError::Cache {
        path: pointer.to_path_buf(),
        source,
    };
    if pointer.is_file() {
        return Ok(());
    }
    let parent = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(cache_err)?;
    // A dangling link (its blob was deleted) is replaced.
    if std::fs::symlink_metadata(pointer).is_ok()
        && let Err(err) = std::fs::remove_file(pointer)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        return Err(cache_err(err));
    }
    let relative = relative_path(blob, parent);
    // Another download of the same file (another program, or a thread) may link it first.
    let linked_by_another =
        |err: &std::io::Error| err.kind() == std::io::ErrorKind::AlreadyExists && pointer.is_file();
    #[cfg(unix)]
    let linked = std::os::unix::fs::symlink(&relative, pointer);
    #[cfg(windows)]
    let linked = std::os::windows::fs::symlink_file(&relative, pointer);
    #[cfg(not(any(unix, windows)))]
    let linked: std::io::Result<()> = Err(std::io::Error::other("no symlinks"));
    match linked {
        Ok(()) => return Ok(()),
        Err(err) if linked_by_another(&err) => return Ok(()),
        Err(_) => {}
    }
    match std::fs::hard_link(blob, pointer) {
        Ok(()) => return Ok(()),
        Err(err) if linked_by_another(&err) => return Ok(()),
        Err(_) => {}
    }
    // A copy, written aside and renamed so that the pointer is never a half-written file.
    let aside = parent.join(format!(
        ".{}.{}.tmp",
        pointer
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    std::fs::copy(blob, &aside)
        .and_then(|_| std::fs::rename(&aside, pointer))
        .map_err(|err| {
            let _ = std::fs::remove_file(&aside);
            cache_err(err)
        })
}

/// `target` relative to the folder `from` (both under the same repo folder).
fn relative_path(target: &Path, from: &Path) -> PathBuf {
    let target: Vec<_> = target.components().collect();
    let from: Vec<_> = from.components().collect();
    let common = target.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut relative = PathBuf::new();
    for _ in common..from.len() {
        relative.push("..");
    }
    for part in &target[common..] {
        relative.push(part);
    }
    relative
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etag_names_the_hash_to_check() {
        // `printf hello | sha256sum` and `printf hello | git hash-object --stdin`.
        let mut sha256 = Verifier::for_etag(&"0".repeat(64), 5);
        sha256.update(b"he");
        sha256.update(b"llo");
        assert_eq!(
            sha256.finish(),
            Some((
                "SHA-256",
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".to_string()
            ))
        );
        let mut git = Verifier::for_etag(&"a".repeat(40), 5);
        git.update(b"hello");
        assert_eq!(
            git.finish(),
            Some((
                "git SHA-1",
                "b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0".to_string()
            ))
        );
        let mut other = Verifier::for_etag("some-mirror-etag", 5);
        other.update(b"hello");
        assert_eq!(other.finish(), None);
    }

    #[test]
    fn a_restarted_hash_forgets_what_came_before() {
        let mut verifier = Verifier::for_etag(&"0".repeat(64), 5);
        verifier.update(b"garbage");
        verifier.reset();
        verifier.update(b"hello");
        assert_eq!(
            verifier.finish().map(|(_, got)| got),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".to_string())
        );
    }

    #[test]
    fn snapshot_links_are_relative_to_the_blobs() {
        let repo = Path::new("/cache/models--a--b");
        let blob = repo.join("blobs/abc");
        let folder = repo.join("snapshots/0123/unet");
        assert_eq!(
            relative_path(&blob, &folder),
            PathBuf::from("../../../blobs/abc")
        );
    }
}
