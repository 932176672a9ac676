//! Uploading files to a model repo on the Hub in one commit (`train --push_to_hub`), through the
//! Hub's HTTP API as huggingface_hub's `upload_folder` does it:
//!
//! 1. the repo id: `owner/name` as given, or `name` under the token's user (`GET /api/whoami-v2`);
//! 2. `POST /api/repos/create` (an existing repo, 409, is fine);
//! 3. `POST /api/models/{repo}/preupload/main` with each file's size, SHA-256 and first 512
//!    bytes: the Hub says which files go to large-file storage (LFS) and which in the commit;
//! 4. LFS files: `POST {repo}.git/info/lfs/objects/batch` (operation `upload`, SHA-256 oids),
//!    then a `PUT` of each file's bytes to the address it gives (objects the Hub already has get
//!    no address and are not sent again), then its `verify` call when it asks for one;
//! 5. `POST /api/models/{repo}/commit/main` with an NDJSON body: the header, small files as
//!    base64, LFS files by oid and size. Nothing is visible in the repo before this last call.
//!
//! Only the "basic" LFS transfer is offered, so one file is one `PUT` (storage services accept
//! up to 5 GB in one `PUT`; a Stable Diffusion 1.x UNet in float32 is 3.4 GB). A `PUT` that fails
//! on the network or with a 5xx or 429 is tried again after 1 s, then 2 s, up to [`PUT_TRIES`]
//! times; the other requests are tried once.
//!
//! The token comes from [`HubSettings::token`]; it goes only to the Hub's own origin, in the
//! `Authorization` header, and never into a message.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ring::digest;
use serde_json::{Value, json};

use super::client::{Answer, BodyPart, CallError, HubClient, NetError, Payload, encode_path};
use super::settings::HubSettings;
use super::{HubError, check_repo_id};

/// Tries of one LFS file's `PUT` before giving up.
pub const PUT_TRIES: u32 = 3;

/// Files per preupload request, as huggingface_hub batches them.
const PREUPLOAD_BATCH: usize = 256;

/// Bytes of each file sent to the preupload call.
const SAMPLE_BYTES: usize = 512;

/// One file to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadFile {
    /// Its path in the repo, with `/` between folders.
    pub path_in_repo: String,
    /// The file on disk.
    pub local: PathBuf,
}

/// What the upload is doing, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushStage {
    /// Computing the files' SHA-256 (bytes of all files).
    Hashing,
    /// Sending bytes (LFS files, then the commit with the small files).
    Uploading,
}

/// Progress of [`push_files`]: `done` of `total` bytes in `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushProgress {
    /// What is being done.
    pub stage: PushStage,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// What a successful push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOutcome {
    /// `owner/name` pushed to.
    pub repo_id: String,
    /// The repo's page.
    pub url: String,
    /// The commit made, when the Hub said.
    pub commit: Option<String>,
    /// Files in the commit.
    pub files: usize,
    /// LFS files whose bytes were sent (the others were on the Hub already, or small).
    pub lfs_sent: usize,
}

/// Why a push failed. Every message names the repo; none holds the token.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// No token from the flag, `HF_TOKEN` or the token file.
    #[error(
        "cannot push to {repo}: no Hugging Face token (give --hub_token, set HF_TOKEN, or log in \
         with `huggingface-cli login`, which writes the token file)"
    )]
    NoToken {
        /// The repo as given.
        repo: String,
    },
    /// The repo id cannot be used.
    #[error("cannot push to {repo:?}: {reason}")]
    InvalidRepo {
        /// The repo as given.
        repo: String,
        /// Why.
        reason: String,
    },
    /// The Hub refused the token (401/403).
    #[error(
        "pushing to {repo} on {endpoint} was refused while {stage} (HTTP {status}{message}): \
         the token is invalid or has no write access to this repo"
    )]
    Refused {
        /// `owner/name` (or the name as given when the owner was being asked for).
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// 401 or 403.
        status: u16,
        /// What was being done.
        stage: &'static str,
        /// The Hub's message, as `: message`, or empty.
        message: String,
    },
    /// Any other unexpected HTTP status.
    #[error("pushing to {repo} on {endpoint} failed while {stage}: HTTP {status}{message}")]
    Status {
        /// `owner/name`.
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// The status.
        status: u16,
        /// What was being done.
        stage: &'static str,
        /// The Hub's message, as `: message`, or empty.
        message: String,
    },
    /// The network failed (no connection, or no bytes for the stall time).
    #[error("pushing to {repo} on {endpoint} failed while {stage}: {reason}")]
    Network {
        /// `owner/name`.
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// What was being done.
        stage: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The Hub's answer lacks what the next step needs.
    #[error("pushing to {repo} on {endpoint}: the answer while {stage} is unusable: {reason}")]
    BadAnswer {
        /// `owner/name`.
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// What was being done.
        stage: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A local file could not be read.
    #[error("pushing to {repo}: cannot read {path}: {source}")]
    Read {
        /// `owner/name`.
        repo: String,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The token can only read.
    #[error(
        "cannot push to {repo}: the token is read-only; create one with write access at \
         {endpoint}/settings/tokens"
    )]
    ReadOnlyToken {
        /// The repo as given.
        repo: String,
        /// The Hub's address.
        endpoint: String,
    },
    /// The cancel flag was set. The commit is the last request, so nothing is in the repo.
    #[error("the push to {repo} was cancelled; nothing was committed")]
    Cancelled {
        /// The repo as given.
        repo: String,
    },
    /// The HTTP client could not be set up (a bad environment variable).
    #[error("pushing to {repo}: {source}")]
    Setup {
        /// The repo as given.
        repo: String,
        /// The error.
        source: Box<HubError>,
    },
}

/// A file with what the Hub needs to know about it.
struct Hashed<'a> {
    file: &'a UploadFile,
    size: u64,
    sha256: String,
    sample: Vec<u8>,
}

/// Checks, before any work is done, that a push to `repo` can start: a token the Hub accepts
/// and that may write (`GET /api/whoami-v2`: its user and role). Returns the repo as
/// `owner/name` (a bare `name` goes under the token's user). Whether the token may write to
/// that particular repo shows only when the push creates or commits to it.
pub fn check_push_access(
    settings: &HubSettings,
    repo: &str,
    cancel: &AtomicBool,
) -> Result<String, PushError> {
    let (client, start) = start_push(settings, repo, cancel)?;
    let push = Push {
        client: &client,
        repo_id: start.repo_id,
        cancel: start.cancel,
    };
    let (user, role) = push.whoami()?;
    if role.as_deref() == Some("read") {
        return Err(PushError::ReadOnlyToken {
            repo: repo.to_string(),
            endpoint: client.endpoint().to_string(),
        });
    }
    Ok(if repo.contains('/') {
        repo.to_string()
    } else {
        format!("{user}/{repo}")
    })
}

/// The checks every push starts with, and its client.
fn start_push<'c>(
    settings: &HubSettings,
    repo: &str,
    cancel: &'c AtomicBool,
) -> Result<(HubClient, PushStart<'c>), PushError> {
    if settings.token.is_none() {
        return Err(PushError::NoToken {
            repo: repo.to_string(),
        });
    }
    check_push_repo_id(repo)?;
    let client = HubClient::new(settings).map_err(|source| PushError::Setup {
        repo: repo.to_string(),
        source: Box::new(source),
    })?;
    Ok((
        client,
        PushStart {
            repo_id: repo.to_string(),
            cancel,
        },
    ))
}

/// [`Push`] without its client (which the caller owns).
struct PushStart<'c> {
    repo_id: String,
    cancel: &'c AtomicBool,
}

/// Uploads `files` to the model repo `repo` (`owner/name`, or `name` for the token's user) in
/// one commit titled `summary`, creating the repo when it does not exist. Setting `cancel` stops
/// it at the next read of a file (a large file's upload is cut off mid-way) or between requests;
/// the commit comes last, so a cancelled push leaves the repo as it was (apart from its creation).
pub fn push_files(
    settings: &HubSettings,
    repo: &str,
    files: &[UploadFile],
    summary: &str,
    progress: &mut dyn FnMut(PushProgress),
    cancel: &AtomicBool,
) -> Result<PushOutcome, PushError> {
    let (client, start) = start_push(settings, repo, cancel)?;
    let mut push = Push {
        client: &client,
        repo_id: start.repo_id,
        cancel: start.cancel,
    };
    if !repo.contains('/') {
        let (user, _) = push.whoami()?;
        push.repo_id = format!("{user}/{repo}");
        check_push_repo_id(&push.repo_id)?;
    }
    push.create_repo()?;

    push.check_cancel()?;
    let hashed = hash_files(&push.repo_id, files, progress, cancel)?;
    push.check_cancel()?;
    let modes = push.preupload(&hashed)?;
    let kept: Vec<(&Hashed, bool)> = hashed
        .iter()
        .zip(modes)
        .filter_map(|(file, mode)| mode.map(|lfs| (file, lfs)))
        .collect();
    let total: u64 = kept.iter().map(|(file, _)| file.size).sum();
    let mut done = 0u64;
    progress(PushProgress {
        stage: PushStage::Uploading,
        done,
        total,
    });
    let lfs: Vec<&Hashed> = kept
        .iter()
        .filter(|(_, lfs)| *lfs)
        .map(|(f, _)| *f)
        .collect();
    let lfs_sent = push.upload_lfs(&lfs, &mut done, total, progress)?;
    push.check_cancel()?;
    let commit = push.commit(&kept, summary)?;
    progress(PushProgress {
        stage: PushStage::Uploading,
        done: total,
        total,
    });
    Ok(PushOutcome {
        url: format!("{}/{}", client.endpoint(), push.repo_id),
        repo_id: push.repo_id,
        commit,
        files: kept.len(),
        lfs_sent,
    })
}

/// Checks a repo id to push to: `owner/name`, or a bare `name` (for the token's user), as the Hub
/// allows them.
pub fn check_push_repo_id(repo: &str) -> Result<(), PushError> {
    let full = if repo.contains('/') {
        repo.to_string()
    } else {
        format!("owner/{repo}")
    };
    check_repo_id(&full).map_err(|reason| PushError::InvalidRepo {
        repo: repo.to_string(),
        reason,
    })
}

/// SHA-256, size and first bytes of each file, reading each once.
fn hash_files<'a>(
    repo: &str,
    files: &'a [UploadFile],
    progress: &mut dyn FnMut(PushProgress),
    cancel: &AtomicBool,
) -> Result<Vec<Hashed<'a>>, PushError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PushError::Read {
            repo: repo.to_string(),
            path,
            source,
        }
    };
    let mut total = 0u64;
    for file in files {
        let meta = std::fs::metadata(&file.local).map_err(read_err(&file.local))?;
        if !meta.is_file() {
            return Err(read_err(&file.local)(std::io::Error::other(
                "not a regular file",
            )));
        }
        total += meta.len();
    }
    let mut done = 0u64;
    progress(PushProgress {
        stage: PushStage::Hashing,
        done,
        total,
    });
    let mut hashed = Vec::with_capacity(files.len());
    let mut buffer = vec![0u8; 1 << 20];
    for file in files {
        let mut reader = File::open(&file.local).map_err(read_err(&file.local))?;
        let mut context = digest::Context::new(&digest::SHA256);
        let mut sample = Vec::new();
        let mut size = 0u64;
        loop {
            if cancel.load(Ordering::Acquire) {
                return Err(PushError::Cancelled {
                    repo: repo.to_string(),
                });
            }
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(read_err(&file.local)(err)),
            };
            if sample.len() < SAMPLE_BYTES {
                let take = (SAMPLE_BYTES - sample.len()).min(n);
                sample.extend_from_slice(&buffer[..take]);
            }
            context.update(&buffer[..n]);
            size += n as u64;
            done += n as u64;
            progress(PushProgress {
                stage: PushStage::Hashing,
                done,
                total,
            });
        }
        hashed.push(Hashed {
            file,
            size,
            sha256: hex(context.finish().as_ref()),
            sample,
        });
    }
    Ok(hashed)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding (RFC 4648), as the commit API reads small files.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A push in progress: the client, the repo id once known, the cancel flag.
struct Push<'c> {
    client: &'c HubClient,
    repo_id: String,
    cancel: &'c AtomicBool,
}

/// A reader that reports each read's bytes, and fails once `cancel` is set (which ends the
/// request that sends it).
struct Counting<'a, R> {
    inner: R,
    on_read: &'a mut dyn FnMut(u64),
    cancel: &'a AtomicBool,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(std::io::Error::other("cancelled"));
        }
        let n = self.inner.read(buf)?;
        (self.on_read)(n as u64);
        Ok(n)
    }
}

impl Push<'_> {
    fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    /// Sleeps `time`, or less when cancelled.
    fn wait(&self, time: std::time::Duration) -> Result<(), PushError> {
        let until = std::time::Instant::now() + time;
        while std::time::Instant::now() < until {
            self.check_cancel()?;
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.check_cancel()
    }

    fn check_cancel(&self) -> Result<(), PushError> {
        if self.cancel.load(Ordering::Acquire) {
            Err(PushError::Cancelled {
                repo: self.repo_id.clone(),
            })
        } else {
            Ok(())
        }
    }

    fn api(&self, what: &str) -> String {
        format!(
            "{}/api/models/{}/{what}/{}",
            self.endpoint(),
            self.repo_id,
            encode_path(super::DEFAULT_REVISION, false)
        )
    }

    fn network(&self, stage: &'static str, err: NetError) -> PushError {
        PushError::Network {
            repo: self.repo_id.clone(),
            endpoint: self.endpoint().to_string(),
            stage,
            reason: match err {
                NetError::Stalled => format!(
                    "no answer from the Hub for {} s (set {} to wait longer)",
                    self.client.stall().as_secs_f64(),
                    super::client::STALL_TIMEOUT_VAR
                ),
                NetError::Failed(reason) => reason,
            },
        }
    }

    /// The error for an answer that is not a success.
    fn status(&self, stage: &'static str, answer: &Answer) -> PushError {
        let message = answer
            .error_message()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let (repo, endpoint) = (self.repo_id.clone(), self.endpoint().to_string());
        match answer.status {
            status @ (401 | 403) => PushError::Refused {
                repo,
                endpoint,
                status,
                stage,
                message,
            },
            status => PushError::Status {
                repo,
                endpoint,
                status,
                stage,
                message,
            },
        }
    }

    fn bad_answer(&self, stage: &'static str, reason: impl Into<String>) -> PushError {
        PushError::BadAnswer {
            repo: self.repo_id.clone(),
            endpoint: self.endpoint().to_string(),
            stage,
            reason: reason.into(),
        }
    }

    /// POSTs JSON (or NDJSON) and returns the answer when it is a success.
    fn post(
        &self,
        stage: &'static str,
        url: &str,
        content_type: &str,
        body: Vec<u8>,
        accept: &[u16],
    ) -> Result<Answer, PushError> {
        let headers = [
            ("Content-Type".to_string(), content_type.to_string()),
            ("Accept".to_string(), content_type.to_string()),
        ];
        let answer = self
            .client
            .send("POST", url, &headers, Payload::Bytes(body))
            .map_err(|err| self.network(stage, err))?;
        if (200..300).contains(&answer.status) || accept.contains(&answer.status) {
            Ok(answer)
        } else {
            Err(self.status(stage, &answer))
        }
    }

    fn json_of(&self, stage: &'static str, answer: &Answer) -> Result<Value, PushError> {
        serde_json::from_slice(&answer.body)
            .map_err(|err| self.bad_answer(stage, format!("not JSON ({err})")))
    }

    /// POSTs the JSON `body` and returns the list the answer holds under `key` (the preupload
    /// and LFS batch calls both answer with one).
    fn post_for_list(
        &self,
        stage: &'static str,
        url: &str,
        content_type: &str,
        body: &Value,
        key: &str,
    ) -> Result<Vec<Value>, PushError> {
        let answer = self.post(stage, url, content_type, body.to_string().into_bytes(), &[])?;
        match self.json_of(stage, &answer)?.get_mut(key).map(Value::take) {
            Some(Value::Array(list)) => Ok(list),
            _ => Err(self.bad_answer(stage, format!("no \"{key}\" list"))),
        }
    }

    /// The token's user name, and its role (`read`, `write`, `fineGrained`) when the Hub says.
    fn whoami(&self) -> Result<(String, Option<String>), PushError> {
        const STAGE: &str = "asking the Hub whose token this is (for a repo id without owner)";
        let url = format!("{}/api/whoami-v2", self.endpoint());
        let call_error = |err| match err {
            CallError::Net(err) => self.network(STAGE, err),
            CallError::Cancelled => PushError::Cancelled {
                repo: self.repo_id.clone(),
            },
        };
        // whoami is a GET: it goes through the streaming client.
        let mut exchange = self
            .client
            .get(&url, None, true, self.cancel)
            .map_err(call_error)?;
        let mut body = Vec::new();
        while let BodyPart::Bytes(bytes) = exchange.next(self.cancel).map_err(call_error)? {
            if body.len() + bytes.len() > 1 << 20 {
                return Err(self.bad_answer(STAGE, "longer than 1 MiB"));
            }
            body.extend_from_slice(&bytes);
        }
        let answer = Answer {
            status: exchange.status,
            body,
        };
        if answer.status != 200 {
            return Err(self.status(STAGE, &answer));
        }
        let value = self.json_of(STAGE, &answer)?;
        let name = value
            .get("name")
            .and_then(Value::as_str)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .ok_or_else(|| self.bad_answer(STAGE, "no user name"))?;
        let role = value
            .pointer("/auth/accessToken/role")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((name, role))
    }

    fn create_repo(&self) -> Result<(), PushError> {
        const STAGE: &str = "creating the repo";
        let (owner, name) = self
            .repo_id
            .split_once('/')
            .unwrap_or(("", self.repo_id.as_str()));
        let body = json!({ "name": name, "organization": owner, "type": "model" });
        let url = format!("{}/api/repos/create", self.endpoint());
        // 409: the repo exists already, which is fine.
        self.post(
            STAGE,
            &url,
            "application/json",
            body.to_string().into_bytes(),
            &[409],
        )?;
        Ok(())
    }

    /// For each file: `Some(true)` for LFS, `Some(false)` for a file sent in the commit, `None`
    /// for a file the Hub says to leave out (its `.gitignore`).
    fn preupload(&self, files: &[Hashed]) -> Result<Vec<Option<bool>>, PushError> {
        const STAGE: &str = "asking which files go to large-file storage (preupload)";
        let mut modes = Vec::with_capacity(files.len());
        for batch in files.chunks(PREUPLOAD_BATCH) {
            let body = json!({
                "files": batch.iter().map(|f| json!({
                    "path": f.file.path_in_repo,
                    "sample": base64(&f.sample),
                    "size": f.size,
                    "sha": f.sha256,
                })).collect::<Vec<_>>()
            });
            let listed = self.post_for_list(
                STAGE,
                &self.api("preupload"),
                "application/json",
                &body,
                "files",
            )?;
            for file in batch {
                let entry = listed
                    .iter()
                    .find(|e| {
                        e.get("path").and_then(Value::as_str) == Some(&file.file.path_in_repo)
                    })
                    .ok_or_else(|| {
                        self.bad_answer(STAGE, format!("{} is not listed", file.file.path_in_repo))
                    })?;
                if entry.get("shouldIgnore").and_then(Value::as_bool) == Some(true) {
                    modes.push(None);
                    continue;
                }
                match entry.get("uploadMode").and_then(Value::as_str) {
                    Some("lfs") => modes.push(Some(true)),
                    Some("regular") => modes.push(Some(false)),
                    other => {
                        return Err(self.bad_answer(
                            STAGE,
                            format!(
                                "uploadMode {} for {}",
                                other.unwrap_or("(none)"),
                                file.file.path_in_repo
                            ),
                        ));
                    }
                }
            }
        }
        Ok(modes)
    }

    /// Sends the LFS files the Hub does not have yet; returns how many were sent.
    fn upload_lfs(
        &self,
        files: &[&Hashed],
        done: &mut u64,
        total: u64,
        progress: &mut dyn FnMut(PushProgress),
    ) -> Result<usize, PushError> {
        const STAGE: &str = "asking where to upload the large files (LFS batch)";
        if files.is_empty() {
            return Ok(0);
        }
        let body = json!({
            "operation": "upload",
            "transfers": ["basic"],
            "hash_algo": "sha256",
            "ref": { "name": super::DEFAULT_REVISION },
            "objects": files.iter().map(|f| json!({ "oid": f.sha256, "size": f.size }))
                .collect::<Vec<_>>(),
        });
        let url = format!(
            "{}/{}.git/info/lfs/objects/batch",
            self.endpoint(),
            self.repo_id
        );
        let objects = self.post_for_list(
            STAGE,
            &url,
            "application/vnd.git-lfs+json",
            &body,
            "objects",
        )?;
        let mut sent = 0;
        for file in files {
            let object = objects
                .iter()
                .find(|o| o.get("oid").and_then(Value::as_str) == Some(&file.sha256))
                .ok_or_else(|| {
                    self.bad_answer(STAGE, format!("no object for {}", file.file.path_in_repo))
                })?;
            if let Some(error) = object.get("error") {
                return Err(self.bad_answer(
                    STAGE,
                    format!(
                        "{} was refused: {}",
                        file.file.path_in_repo,
                        error
                            .get("message")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                    ),
                ));
            }
            let actions = object.get("actions");
            let Some(upload) = actions.and_then(|a| a.get("upload")) else {
                // The Hub has these bytes already.
                *done += file.size;
                progress(PushProgress {
                    stage: PushStage::Uploading,
                    done: *done,
                    total,
                });
                continue;
            };
            if upload
                .get("header")
                .and_then(|h| h.get("chunk_size"))
                .is_some()
            {
                return Err(self.bad_answer(
                    STAGE,
                    "a multipart upload, which was not asked for".to_string(),
                ));
            }
            self.put_file(file, upload, done, total, progress)?;
            if let Some(verify) = actions.and_then(|a| a.get("verify")) {
                self.verify(file, verify)?;
            }
            sent += 1;
        }
        Ok(sent)
    }

    /// The `header` object of an LFS action as header pairs.
    fn action_headers(action: &Value) -> Vec<(String, String)> {
        action
            .get("header")
            .and_then(Value::as_object)
            .map(|headers| {
                headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn put_file(
        &self,
        file: &Hashed,
        upload: &Value,
        done: &mut u64,
        total: u64,
        progress: &mut dyn FnMut(PushProgress),
    ) -> Result<(), PushError> {
        const STAGE: &str = "uploading a large file";
        let href = upload
            .get("href")
            .and_then(Value::as_str)
            .filter(|h| h.starts_with("http://") || h.starts_with("https://"))
            .ok_or_else(|| self.bad_answer(STAGE, "an upload action without an address"))?;
        let headers = Self::action_headers(upload);
        let start = *done;
        let mut last_error = None;
        for attempt in 0..PUT_TRIES {
            if attempt > 0 {
                // 1 s, then 2 s: a busy storage service gets a moment.
                self.wait(std::time::Duration::from_secs(1 << (attempt - 1)))?;
            }
            let reader = File::open(&file.file.local).map_err(|source| PushError::Read {
                repo: self.repo_id.clone(),
                path: file.file.local.clone(),
                source,
            })?;
            let mut sent = 0u64;
            let mut on_read = |n: u64| {
                sent += n;
                progress(PushProgress {
                    stage: PushStage::Uploading,
                    done: start + sent.min(file.size),
                    total,
                });
            };
            let mut counting = Counting {
                inner: reader.take(file.size),
                on_read: &mut on_read,
                cancel: self.cancel,
            };
            let result = self.client.send(
                "PUT",
                href,
                &headers,
                Payload::Reader(&mut counting, file.size),
            );
            match result {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    *done = start + file.size;
                    return Ok(());
                }
                Ok(answer) if answer.status >= 500 || answer.status == 429 => {
                    last_error = Some(self.with_file(self.status(STAGE, &answer), file));
                }
                Ok(answer) => return Err(self.with_file(self.status(STAGE, &answer), file)),
                Err(_) if self.cancel.load(Ordering::Acquire) => {
                    return Err(PushError::Cancelled {
                        repo: self.repo_id.clone(),
                    });
                }
                Err(err) => last_error = Some(self.with_file(self.network(STAGE, err), file)),
            }
            progress(PushProgress {
                stage: PushStage::Uploading,
                done: start,
                total,
            });
        }
        Err(last_error.unwrap_or_else(|| self.bad_answer(STAGE, "no try was made")))
    }

    /// Names the file in a network or status error's reason.
    fn with_file(&self, err: PushError, file: &Hashed) -> PushError {
        let name = &file.file.path_in_repo;
        match err {
            PushError::Network {
                repo,
                endpoint,
                stage,
                reason,
            } => PushError::Network {
                repo,
                endpoint,
                stage,
                reason: format!("{name}: {reason}"),
            },
            PushError::Status {
                repo,
                endpoint,
                status,
                stage,
                message,
            } => PushError::Status {
                repo,
                endpoint,
                status,
                stage,
                message: format!("{message} ({name})"),
            },
            other => other,
        }
    }

    fn verify(&self, file: &Hashed, verify: &Value) -> Result<(), PushError> {
        const STAGE: &str = "verifying an uploaded large file";
        let href = verify
            .get("href")
            .and_then(Value::as_str)
            .filter(|h| h.starts_with("http://") || h.starts_with("https://"))
            .ok_or_else(|| self.bad_answer(STAGE, "a verify action without an address"))?;
        let mut headers = Self::action_headers(verify);
        headers.push((
            "Content-Type".to_string(),
            "application/vnd.git-lfs+json".to_string(),
        ));
        let body = json!({ "oid": file.sha256, "size": file.size });
        let answer = self
            .client
            .send(
                "POST",
                href,
                &headers,
                Payload::Bytes(body.to_string().into_bytes()),
            )
            .map_err(|err| self.with_file(self.network(STAGE, err), file))?;
        if (200..300).contains(&answer.status) {
            Ok(())
        } else {
            Err(self.with_file(self.status(STAGE, &answer), file))
        }
    }

    /// The commit: returns its id when the Hub gives one.
    fn commit(
        &self,
        files: &[(&Hashed, bool)],
        summary: &str,
    ) -> Result<Option<String>, PushError> {
        const STAGE: &str = "committing the files";
        let mut body = Vec::new();
        let mut line = |value: Value| {
            body.extend_from_slice(value.to_string().as_bytes());
            body.push(b'\n');
        };
        line(json!({ "key": "header", "value": { "summary": summary, "description": "" } }));
        for (file, lfs) in files {
            if *lfs {
                line(json!({ "key": "lfsFile", "value": {
                    "path": file.file.path_in_repo,
                    "algo": "sha256",
                    "oid": file.sha256,
                    "size": file.size,
                }}));
            } else {
                let bytes = std::fs::read(&file.file.local).map_err(|source| PushError::Read {
                    repo: self.repo_id.clone(),
                    path: file.file.local.clone(),
                    source,
                })?;
                line(json!({ "key": "file", "value": {
                    "path": file.file.path_in_repo,
                    "content": base64(&bytes),
                    "encoding": "base64",
                }}));
            }
        }
        let answer = self.post(
            STAGE,
            &self.api("commit"),
            "application/x-ndjson",
            body,
            &[],
        )?;
        let value = self.json_of(STAGE, &answer)?;
        Ok(value
            .get("commitOid")
            .and_then(Value::as_str)
            .map(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        // RFC 4648 section 10's test vectors.
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x3e]), "//4+");
    }

    #[test]
    fn a_repo_without_owner_is_a_name_for_the_tokens_user() {
        assert!(check_push_repo_id("my-model").is_ok());
        assert!(check_push_repo_id("me/my-model").is_ok());
        for bad in ["", "a/b/c", "me/bad name", "-x"] {
            assert!(check_push_repo_id(bad).is_err(), "{bad:?}");
        }
    }
}
