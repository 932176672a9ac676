//! Talking to the Hub: listing a repo at a revision (telling a missing repo from a private one,
//! or an unreachable Hub, in which case the cache serves), and downloading listed files into the
//! cache snapshot with hf-hub, reporting progress and stopping on cancel.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hf_hub::api::Progress;
use hf_hub::api::sync::{Api, ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::HubError;
use super::settings::{HubSettings, write_ref};
use crate::model::weights::is_plain_file_name;

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

/// hf-hub's client for the Hub and cache of `settings`.
fn hub_api(settings: &HubSettings) -> Result<hf_hub::api::sync::Api, HubError> {
    ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
        .with_endpoint(settings.endpoint.clone())
        .with_token(settings.token.clone())
        .with_progress(false)
        .with_retries(2)
        .with_user_agent(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|source| HubError::Client { source })
}

/// What [`list_online`] found: the listing to download from, or why only the cache can serve.
pub(super) enum Online {
    /// The Hub answered with the repo's listing.
    Listed {
        /// The client that listed it, to download with (boxed: it is large next to the reason).
        api: Box<Api>,
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
    let api = hub_api(settings)?;
    let listing_repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        repo_type,
        revision.to_string(),
    ));
    match list_repo(&listing_repo, repo_id, revision, settings) {
        Ok(listing) => Ok(Online::Listed {
            api: Box::new(api),
            listing,
        }),
        Err(ListError::Unreachable(reason)) => Ok(Online::CacheOnly(format!(
            "{} could not be reached: {reason}",
            settings.endpoint
        ))),
        Err(ListError::Hub(err)) => Err(*err),
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
    /// The Hub answered, and the answer is an error.
    Hub(Box<HubError>),
}

/// `GET {endpoint}/api/models/{repo}/revision/{revision}?blobs=true` (the sizes feed the overall
/// progress), reading statuses and the Hub's
/// `X-Error-Code` header itself (hf-hub's `info()` turns them all into one opaque error).
fn list_repo(
    api_repo: &ApiRepo,
    repo_id: &str,
    revision: &str,
    settings: &HubSettings,
) -> Result<Listing, ListError> {
    let endpoint = settings.endpoint.clone();
    let response = api_repo
        .info_request()
        .query("blobs", "true")
        .config()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .call();
    let mut response = match response {
        Ok(response) => response,
        Err(err) => return Err(ListError::Unreachable(err.to_string())),
    };
    let status = response.status().as_u16();
    let error_code = response
        .headers()
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
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
    let info: RepoListing = response
        .body_mut()
        .read_json()
        .map_err(|e| bad(e.to_string()))?;
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
    api: &Api,
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
    let snapshot = repo_dir.join("snapshots").join(&listing.sha);
    // Downloads name the listed commit, so every file comes from the same snapshot. hf-hub then
    // writes `refs/<commit>`, which huggingface_hub never does; it is removed afterwards.
    let stray_ref = repo_dir.join("refs").join(&listing.sha);
    let stray_ref_existed = stray_ref.exists();
    let mut source = HubSource {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        endpoint,
        sha: listing.sha.clone(),
        plan: DownloadPlan::new(planned, &listing.sizes),
        files: listing.files,
        sizes: listing.sizes,
        cancel,
        snapshot: snapshot.clone(),
        api_repo: api.repo(Repo::with_revision(
            repo_id.to_string(),
            repo_type,
            listing.sha.clone(),
        )),
        progress,
    };
    let outcome = download(&mut source);
    if !stray_ref_existed && revision != listing.sha {
        // Best effort: a leftover ref only clutters `huggingface-cli scan-cache`.
        let _ = std::fs::remove_file(&stray_ref);
    }
    outcome?;
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
    endpoint: String,
    sha: String,
    pub(super) files: BTreeSet<String>,
    /// File sizes from the listing (may be empty).
    sizes: BTreeMap<String, u64>,
    plan: DownloadPlan,
    cancel: &'p AtomicBool,
    pub(super) snapshot: PathBuf,
    api_repo: ApiRepo,
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
        let cancelled = || HubError::Cancelled {
            repo: self.repo_id.clone(),
        };
        if self.cancel.load(Ordering::Acquire) {
            return Err(cancelled());
        }
        let file_index = self.plan.start(file, self.sizes.get(file).copied());
        let reporter = ProgressReporter {
            file: file.to_string(),
            bytes_done: 0,
            bytes_total: 0,
            last_reported: None,
            file_index,
            file_count: self.plan.count(),
            overall_base: self.plan.finished_bytes,
            overall_total: self.plan.total_bytes,
            cancel: self.cancel,
            callback: &mut *self.progress,
        };
        let api_repo = &self.api_repo;
        // The reporter unwinds with `DownloadCancelled` to abort hf-hub's download mid-file.
        let downloaded = catch_unwind(AssertUnwindSafe(|| {
            api_repo.download_with_progress(file, reporter)
        }));
        let downloaded = match downloaded {
            Ok(downloaded) => downloaded,
            Err(payload) if payload.is::<DownloadCancelled>() => return Err(cancelled()),
            // A panic of the caller's progress callback (or of hf-hub) is not ours to hide.
            Err(payload) => resume_unwind(payload),
        };
        let path = downloaded.map_err(|source| HubError::Download {
            repo: self.repo_id.clone(),
            file: file.to_string(),
            endpoint: self.endpoint.clone(),
            source,
        })?;
        let size = self
            .sizes
            .get(file)
            .copied()
            .or_else(|| std::fs::metadata(&path).ok().map(|m| m.len()))
            .unwrap_or(0);
        self.plan.finished_bytes += size;
        if path != local {
            let got = path
                .strip_prefix(self.snapshot.parent().unwrap_or(&self.snapshot))
                .ok()
                .and_then(|p| p.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string());
            return Err(HubError::CommitChanged {
                repo: self.repo_id.clone(),
                file: file.to_string(),
                expected: self.sha.clone(),
                got,
            });
        }
        Ok(true)
    }
}

/// The unwind payload that aborts an hf-hub download when the cancel flag is set; private, so
/// no other panic is mistaken for a cancel.
struct DownloadCancelled;

/// Forwards hf-hub's progress calls to the caller's callback, at most every 256 KiB (and at the
/// start and end of each file) so a UI is not flooded; checks the cancel flag on every call.
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
    cancel: &'p AtomicBool,
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

impl Progress for ProgressReporter<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        // hf-hub calls init once per attempt and then `update(resume_offset)`.
        self.bytes_total = size as u64;
        self.bytes_done = 0;
        self.last_reported = None;
    }

    fn update(&mut self, size: usize) {
        if self.cancel.load(Ordering::Acquire) {
            // hf-hub has no abort: unwind out of `download_with_progress` (caught in
            // `HubSource::fetch`). The bytes of this block are not yet written, so the `.part`
            // file holds exactly what was written before, and resumes from there.
            resume_unwind(Box::new(DownloadCancelled));
        }
        self.bytes_done += size as u64;
        self.report(false);
    }

    fn finish(&mut self) {
        self.report(true);
    }
}
