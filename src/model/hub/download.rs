//! Talking to the Hub: listing a repo at a revision (telling a missing repo from a private one,
//! or an unreachable Hub, in which case the cache serves), and downloading listed files into the
//! cache snapshot (one file at a time through `transfer`), reporting progress and stopping on
//! cancel.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use hf_hub::RepoType;

use super::HubError;
use super::client::{BodyPart, CallError, HubClient, NetError, encode_path};
use super::settings::{HubSettings, write_ref};
use super::transfer::{FileProgress, FileTarget, download_file};
use crate::model::weights::is_plain_file_name;

/// The most bytes a repo listing may have (a dataset of many thousand files lists in a few MB).
const MAX_LISTING_BYTES: usize = 256 << 20;

/// Progress of one file download, reported as bytes arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadProgress {
    /// The file's path in the repo (`unet/diffusion_pytorch_model.safetensors`).
    pub file: String,
    /// Bytes of this file on disk so far (a resumed download starts above zero).
    pub bytes_done: u64,
    /// The file's size.
    pub bytes_total: u64,
    /// This file's place (1-based) among the files this fetch downloads: "file 3 of 9".
    pub file_index: usize,
    /// How many files this fetch downloads; files already in the cache are not counted. Known
    /// from the repo listing before the first download; for sharded weights the shards are
    /// added once their index file has been read, so the count can grow then.
    pub file_count: usize,
    /// Bytes of all the files of this fetch on disk so far (finished files plus this one's
    /// `bytes_done`), when the listing gave every planned file's size.
    pub overall_done: Option<u64>,
    /// The sum of the sizes of all the files this fetch downloads, when the listing gave them
    /// (the Hub does with `?blobs=true`); `None` means only the per-file bar is known.
    pub overall_total: Option<u64>,
}

/// What [`list_online`] found: the listing to download from, or why only the cache can serve.
pub(super) enum Online {
    /// The Hub answered with the repo's listing.
    Listed {
        /// The client that listed it, to download with.
        client: HubClient,
        /// The listing.
        listing: Listing,
    },
    /// Offline, or the Hub could not be reached: why, for the caller's `NotCached` message.
    CacheOnly(String),
}

/// Lists `repo_id` at `revision` on the Hub, unless `settings.offline` (or a Hub that does not
/// answer) leaves only the cache. A set `cancel` stops before the request.
pub(super) fn list_online(
    repo_id: &str,
    revision: &str,
    repo_type: RepoType,
    settings: &HubSettings,
    cancel: &AtomicBool,
) -> Result<Online, HubError> {
    if settings.offline {
        let why = "HF_HUB_OFFLINE is set; unset it to download".to_string();
        return Ok(Online::CacheOnly(why));
    }
    if cancel.load(Ordering::Acquire) {
        return Err(HubError::Cancelled {
            repo: repo_id.to_string(),
        });
    }
    let client = HubClient::new(settings)?;
    match list_repo(&client, repo_id, revision, repo_type, settings, cancel) {
        Ok(listing) => Ok(Online::Listed { client, listing }),
        Err(ListError::Unreachable(reason)) => Ok(Online::CacheOnly(format!(
            "{} could not be reached: {reason}",
            settings.endpoint
        ))),
        Err(ListError::Hub(err)) => Err(*err),
        Err(ListError::Cancelled) => Err(HubError::Cancelled {
            repo: repo_id.to_string(),
        }),
    }
}

/// The repo listing: its commit, file names and (when the Hub gives them) file sizes.
pub(super) struct Listing {
    pub(super) sha: String,
    pub(super) files: BTreeSet<String>,
    sizes: BTreeMap<String, u64>,
}

/// The Hub's answer to `/api/models/{repo}/revision/{rev}?blobs=true`, the parts used.
#[derive(serde::Deserialize)]
struct RepoListing {
    sha: String,
    siblings: Vec<ListedFile>,
}

#[derive(serde::Deserialize)]
struct ListedFile {
    rfilename: String,
    /// Present with `?blobs=true` (the LFS size for large files).
    #[serde(default)]
    size: Option<u64>,
}

enum ListError {
    /// No HTTP answer at all: the cache may still serve.
    Unreachable(String),
    /// The cancel flag was set.
    Cancelled,
    /// The Hub answered, and the answer is an error.
    Hub(Box<HubError>),
}

/// `GET {endpoint}/api/models/{repo}/revision/{revision}?blobs=true` (the sizes feed the overall
/// progress), reading statuses and the Hub's `X-Error-Code` header.
fn list_repo(
    client: &HubClient,
    repo_id: &str,
    revision: &str,
    repo_type: RepoType,
    settings: &HubSettings,
    cancel: &AtomicBool,
) -> Result<Listing, ListError> {
    let endpoint = settings.endpoint.clone();
    let kind = match repo_type {
        RepoType::Dataset => "datasets",
        RepoType::Space => "spaces",
        _ => "models",
    };
    let url = format!(
        "{endpoint}/api/{kind}/{repo_id}/revision/{}?blobs=true",
        encode_path(revision, false)
    );
    let unreachable = |err: NetError| {
        ListError::Unreachable(match err {
            NetError::Stalled => format!(
                "no answer for {} s (set {} to wait longer)",
                client.stall().as_secs_f64(),
                super::client::STALL_TIMEOUT_VAR
            ),
            NetError::Failed(reason) => reason,
        })
    };
    let call_err = |err| match err {
        CallError::Cancelled => ListError::Cancelled,
        CallError::Net(err) => unreachable(err),
    };
    let mut response = client.get(&url, None, true, cancel).map_err(call_err)?;
    let status = response.status;
    let error_code = response.header("x-error-code").unwrap_or("").to_string();
    let repo = repo_id.to_string();
    let token_given = settings.token.is_some();
    let hub_err = |err| Err(ListError::Hub(Box::new(err)));
    match (status, error_code.as_str()) {
        (200, _) => {}
        (404, "RevisionNotFound") => {
            return hub_err(HubError::RevisionNotFound {
                repo,
                revision: revision.to_string(),
                endpoint,
            });
        }
        (401 | 403 | 404, "RepoNotFound") | (404, _) => {
            // The Hub answers 401 RepoNotFound for private repos to anonymous callers.
            let hint = if token_given {
                String::new()
            } else {
                " (if it is private or gated, set HF_TOKEN or run `huggingface-cli login`)"
                    .to_string()
            };
            return hub_err(HubError::RepoNotFound {
                repo,
                endpoint,
                hint,
            });
        }
        (401 | 403, code) => {
            let gated = code == "GatedRepo";
            let advice = match (gated, token_given) {
                (true, false) => {
                    "it is gated: accept its conditions on the Hub, then set HF_TOKEN to an access token (or run `huggingface-cli login`)"
                }
                (true, true) => {
                    "it is gated and the token given (HF_TOKEN or the token file) has not been granted access: accept its conditions on the Hub with that account"
                }
                (false, false) => {
                    "it is private or gated: set HF_TOKEN to an access token that can read it (or run `huggingface-cli login`)"
                }
                (false, true) => {
                    "the token given (HF_TOKEN or the token file) is invalid or cannot read this repository"
                }
            };
            return hub_err(HubError::Unauthorized {
                repo,
                endpoint,
                status,
                advice: advice.to_string(),
            });
        }
        _ => {
            return hub_err(HubError::HubStatus {
                repo,
                endpoint,
                status,
            });
        }
    }
    let bad = |reason: String| {
        ListError::Hub(Box::new(HubError::BadListing {
            repo: repo_id.to_string(),
            endpoint: settings.endpoint.clone(),
            reason,
        }))
    };
    let mut body = Vec::new();
    loop {
        match response.next(cancel).map_err(call_err)? {
            BodyPart::Bytes(bytes) => body.extend_from_slice(&bytes),
            BodyPart::End => break,
        }
        if body.len() > MAX_LISTING_BYTES {
            return Err(bad(format!("it is larger than {MAX_LISTING_BYTES} bytes")));
        }
    }
    let info: RepoListing = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    if !is_plain_file_name(&info.sha) {
        return Err(bad(format!("commit {:?} is not a commit hash", info.sha)));
    }
    let mut files = BTreeSet::new();
    let mut sizes = BTreeMap::new();
    for sibling in info.siblings {
        if !is_safe_repo_path(&sibling.rfilename) {
            return Err(bad(format!("file name {:?} is unsafe", sibling.rfilename)));
        }
        if let Some(size) = sibling.size {
            sizes.insert(sibling.rfilename.clone(), size);
        }
        files.insert(sibling.rfilename);
    }
    Ok(Listing {
        sha: info.sha,
        files,
        sizes,
    })
}

/// A relative `/`-separated path that stays inside the snapshot folder.
fn is_safe_repo_path(path: &str) -> bool {
    !path.starts_with('/') && path.split('/').all(is_plain_file_name)
}

/// Where [`download_listed`] downloads: the repo, the revision asked for, and its cache folder.
pub(super) struct ListedTarget<'a> {
    pub(super) repo_id: &'a str,
    pub(super) revision: &'a str,
    pub(super) repo_type: RepoType,
    pub(super) repo_dir: &'a Path,
    pub(super) endpoint: String,
}

/// Runs `download` on a [`HubSource`] for the listed commit's snapshot (with `planned` as the
/// files it expects to download, for progress), then leaves the refs as huggingface_hub does, and
/// returns the snapshot folder.
pub(super) fn download_listed(
    target: ListedTarget,
    client: &HubClient,
    listing: Listing,
    planned: Vec<String>,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
    download: impl FnOnce(&mut HubSource) -> Result<(), HubError>,
) -> Result<PathBuf, HubError> {
    let ListedTarget {
        repo_id,
        revision,
        repo_type,
        repo_dir,
        endpoint,
    } = target;
    // Downloads name the listed commit, so every file comes from the same snapshot.
    let snapshot = repo_dir.join("snapshots").join(&listing.sha);
    let mut source = HubSource {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        url_prefix: match repo_type {
            RepoType::Dataset => "datasets/",
            RepoType::Space => "spaces/",
            RepoType::Model => "",
        },
        endpoint,
        sha: listing.sha.clone(),
        plan: DownloadPlan::new(planned, &listing.sizes),
        files: listing.files,
        sizes: listing.sizes,
        cancel,
        snapshot: snapshot.clone(),
        repo_dir: repo_dir.to_path_buf(),
        client,
        progress,
    };
    download(&mut source)?;
    if revision != listing.sha {
        write_ref(repo_dir, revision, &listing.sha)?;
    }
    Ok(snapshot)
}

/// The files one fetch downloads, for "file 3 of 9" and the overall bar.
struct DownloadPlan {
    /// Files expected to be downloaded; shards join once their index is read.
    planned: BTreeSet<String>,
    /// Files downloaded (or being downloaded) so far.
    started: usize,
    /// Bytes of the files finished so far.
    finished_bytes: u64,
    /// Sum of the planned files' sizes, while every one is known.
    total_bytes: Option<u64>,
}

impl DownloadPlan {
    fn new(planned: Vec<String>, sizes: &BTreeMap<String, u64>) -> Self {
        let total_bytes = planned
            .iter()
            .map(|file| sizes.get(file).copied())
            .sum::<Option<u64>>();
        Self {
            planned: planned.into_iter().collect(),
            started: 0,
            finished_bytes: 0,
            total_bytes,
        }
    }

    /// Counts `file` as the next download; returns its 1-based index.
    fn start(&mut self, file: &str, size: Option<u64>) -> usize {
        if self.planned.insert(file.to_string()) {
            // Not foreseen (a shard): it adds to the total, which is unknown without its size.
            self.total_bytes = self.total_bytes.zip(size).map(|(total, size)| total + size);
        }
        self.started += 1;
        self.started
    }

    fn count(&self) -> usize {
        self.planned.len().max(self.started)
    }
}

/// A Hub repo at a listed commit, downloading into the cache snapshot on demand.
pub(super) struct HubSource<'p> {
    repo_id: String,
    revision: String,
    /// `""`, or `datasets/` for a dataset repo (its URLs).
    url_prefix: &'static str,
    endpoint: String,
    sha: String,
    pub(super) files: BTreeSet<String>,
    /// File sizes from the listing (may be empty).
    sizes: BTreeMap<String, u64>,
    plan: DownloadPlan,
    cancel: &'p AtomicBool,
    pub(super) snapshot: PathBuf,
    /// `<cache>/models--owner--name`.
    repo_dir: PathBuf,
    client: &'p HubClient,
    progress: &'p mut dyn FnMut(&DownloadProgress),
}

impl HubSource<'_> {
    /// The repo and revision, for messages.
    pub(super) fn location(&self) -> String {
        format!(
            "repository {}@{} on {}",
            self.repo_id, self.revision, self.endpoint
        )
    }

    /// Downloads `file` (a repo path) into the snapshot unless it is there; `Ok(false)` when the
    /// listing does not have it.
    pub(super) fn fetch(&mut self, file: &str) -> Result<bool, HubError> {
        if !self.files.contains(file) {
            return Ok(false);
        }
        let local = self.snapshot.join(file);
        if local.is_file() {
            return Ok(true);
        }
        if self.cancel.load(Ordering::Acquire) {
            return Err(HubError::Cancelled {
                repo: self.repo_id.clone(),
            });
        }
        let file_index = self.plan.start(file, self.sizes.get(file).copied());
        let mut reporter = ProgressReporter {
            file: file.to_string(),
            bytes_done: 0,
            bytes_total: 0,
            last_reported: None,
            file_index,
            file_count: self.plan.count(),
            overall_base: self.plan.finished_bytes,
            overall_total: self.plan.total_bytes,
            callback: &mut *self.progress,
        };
        let cache_dir = self.repo_dir.parent().unwrap_or(&self.repo_dir);
        let target = FileTarget {
            repo_id: &self.repo_id,
            url_prefix: self.url_prefix,
            sha: &self.sha,
            file,
            repo_dir: &self.repo_dir,
            cache_dir,
        };
        let path = download_file(self.client, &target, &mut reporter, self.cancel)?;
        let size = self
            .sizes
            .get(file)
            .copied()
            .or_else(|| std::fs::metadata(&path).ok().map(|m| m.len()))
            .unwrap_or(0);
        self.plan.finished_bytes += size;
        Ok(true)
    }
}

/// Forwards a file's progress to the caller's callback, at most every 256 KiB (and at the start
/// of each try and the end of the file) so a UI is not flooded.
struct ProgressReporter<'p> {
    file: String,
    bytes_done: u64,
    bytes_total: u64,
    last_reported: Option<u64>,
    file_index: usize,
    file_count: usize,
    /// Bytes of the files of this fetch finished before this one.
    overall_base: u64,
    overall_total: Option<u64>,
    callback: &'p mut dyn FnMut(&DownloadProgress),
}

impl ProgressReporter<'_> {
    const STEP: u64 = 256 * 1024;

    fn report(&mut self, force: bool) {
        let due = match self.last_reported {
            None => true,
            Some(last) => {
                self.bytes_done >= last + Self::STEP || self.bytes_done == self.bytes_total
            }
        };
        if (due || force) && self.last_reported != Some(self.bytes_done) {
            self.last_reported = Some(self.bytes_done);
            (self.callback)(&DownloadProgress {
                file: self.file.clone(),
                bytes_done: self.bytes_done,
                bytes_total: self.bytes_total,
                file_index: self.file_index,
                file_count: self.file_count,
                overall_done: self
                    .overall_total
                    .map(|_| self.overall_base + self.bytes_done),
                overall_total: self.overall_total,
            });
        }
    }
}

impl FileProgress for ProgressReporter<'_> {
    fn started(&mut self, offset: u64, total: u64) {
        // Each try starts from what its `.part` holds (a resumed download starts above zero).
        self.bytes_total = total;
        self.bytes_done = offset;
        self.last_reported = None;
        self.report(true);
    }

    fn advanced(&mut self, bytes: u64) {
        self.bytes_done += bytes;
        self.report(false);
    }

    fn finished(&mut self) {
        self.report(true);
    }
}
