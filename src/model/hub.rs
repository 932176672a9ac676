//! Where a model comes from: a local diffusers folder or a Hugging Face Hub repo resolved into
//! the standard Hugging Face cache (`models--owner--name/{blobs,refs,snapshots}`), shared with
//! diffusers and huggingface_hub so nothing is downloaded twice.
//!
//! Downloads go through hf-hub 0.5's sync API (its blob/snapshot/ref layout, resumable `.part`
//! files, locks). What hf-hub 0.5 lacks is done here: the `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and
//! `HF_TOKEN` variables, resolving `refs/<revision>` and snapshot files from the cache without any
//! request (offline, or when the Hub cannot be reached), telling a missing repo (404) from a
//! private or gated one (401/403), choosing which files of the repo an edit needs from the
//! repo listing so that only those are downloaded, progress as "file 3 of 9" with overall bytes
//! (the listing's `?blobs=true` sizes), and cancelling a download mid-file
//! ([`fetch_model_with_cancel`]; it unwinds out of hf-hub's download, so the crate must not be
//! built with `panic = "abort"`).
//!
//! Training datasets come the same way ([`fetch_dataset`]: `datasets--owner--name/...`, only the
//! files the caller chooses from the listing); which files those are is `train::data`'s call.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hf_hub::api::Progress;
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

use super::config::{ConfigError, MODEL_INDEX_FILE, ModelIndex, read_json};
pub use super::weights::Variant;
use super::weights::{
    DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, WeightEntry, WeightsError, is_plain_file_name,
    select_weights, shard_names,
};

/// The model used when none is named.
pub const DEFAULT_REPO: &str = "timbrooks/instruct-pix2pix";
/// The Hub's address when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision used when none is named.
pub const DEFAULT_REVISION: &str = "main";

/// The components an edit needs whose weights are loaded, with their weight base names.
const WEIGHT_COMPONENTS: [(&str, &str); 3] = [
    ("unet", DIFFUSERS_WEIGHTS),
    ("vae", DIFFUSERS_WEIGHTS),
    ("text_encoder", TRANSFORMERS_WEIGHTS),
];
/// Tokenizer files used when present (either `tokenizer.json` or `vocab.json` + `merges.txt`
/// must be).
const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "added_tokens.json",
];
const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A folder in diffusers' layout.
    LocalDir(PathBuf),
    /// A Hub repo at a revision (branch, tag or commit hash).
    Hub {
        /// `owner/name`.
        repo_id: String,
        /// Branch, tag or commit hash; `main` by default.
        revision: String,
    },
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec::Hub {
            repo_id: DEFAULT_REPO.to_string(),
            revision: DEFAULT_REVISION.to_string(),
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSpec::LocalDir(path) => write!(f, "{}", path.display()),
            ModelSpec::Hub { repo_id, revision } if revision == DEFAULT_REVISION => {
                f.write_str(repo_id)
            }
            ModelSpec::Hub { repo_id, revision } => write!(f, "{repo_id}@{revision}"),
        }
    }
}

impl ModelSpec {
    /// Reads a model argument: an existing folder wins (a leading `~/` is the home folder);
    /// `owner/name` is a Hub repo id (at `revision`, `main` when `None`); anything else is an
    /// error saying which it looked like.
    pub fn parse(spec: &str, revision: Option<&str>) -> Result<Self, HubError> {
        let trimmed = spec.trim();
        let invalid = |reason: &str| HubError::InvalidSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        if trimmed.is_empty() {
            return Err(invalid("it is empty"));
        }
        // Typed paths (a settings field, not a shell) may start with `~/`.
        let expanded = match (trimmed.strip_prefix("~/"), std::env::home_dir()) {
            (Some(rest), Some(home)) => home.join(rest),
            _ => PathBuf::from(trimmed),
        };
        let path = expanded.as_path();
        if path.is_dir() {
            return Ok(ModelSpec::LocalDir(path.to_path_buf()));
        }
        if path.exists() {
            return Err(HubError::NotAFolder {
                path: path.to_path_buf(),
            });
        }
        if looks_like_path(trimmed) {
            return Err(HubError::LocalDirMissing {
                path: path.to_path_buf(),
            });
        }
        if let Err(reason) = check_repo_id(trimmed) {
            return Err(invalid(&format!(
                "it is neither an existing folder nor a Hub repo id of the form owner/name ({reason})"
            )));
        }
        let revision = revision.map(str::trim).unwrap_or(DEFAULT_REVISION);
        check_revision(revision).map_err(|reason| HubError::InvalidRevision {
            revision: revision.to_string(),
            reason,
        })?;
        Ok(ModelSpec::Hub {
            repo_id: trimmed.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Paths a user types, as opposed to `owner/name`.
fn looks_like_path(spec: &str) -> bool {
    let path = Path::new(spec);
    path.is_absolute()
        || spec.starts_with('.')
        || spec.starts_with('~')
        || spec.contains('\\')
        || spec.ends_with('/')
        || spec.matches('/').count() > 1
}

/// huggingface_hub's `validate_repo_id`, restricted to `owner/name`.
pub(crate) fn check_repo_id(repo_id: &str) -> Result<(), String> {
    let Some((owner, name)) = repo_id.split_once('/') else {
        return Err("no `/` between owner and name".to_string());
    };
    if repo_id.len() > 96 {
        return Err("longer than 96 characters".to_string());
    }
    for part in [owner, name] {
        if part.is_empty() {
            return Err("empty owner or name".to_string());
        }
        if let Some(c) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!("{c:?} is not allowed"));
        }
        if part.contains("--") || part.contains("..") {
            return Err("`--` and `..` are not allowed".to_string());
        }
        if part.starts_with(['-', '.']) || part.ends_with(['-', '.']) {
            return Err("a part starts or ends with `-` or `.`".to_string());
        }
    }
    Ok(())
}

/// A revision names a file under `refs/` (branches may contain `/`), so it must stay inside it.
fn check_revision(revision: &str) -> Result<(), String> {
    if revision.is_empty() {
        return Err("it is empty".to_string());
    }
    if revision.starts_with('/')
        || revision.ends_with('/')
        || revision.contains('\\')
        || revision
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        || revision
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("it is not a branch, tag or commit name".to_string());
    }
    Ok(())
}

/// How to reach the Hub and where its cache is: the Hugging Face environment variables, or
/// values set directly (tests, a settings window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The Hub's address, without a trailing `/` (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The cache folder holding `models--owner--name` folders (`HF_HUB_CACHE`).
    pub cache_dir: PathBuf,
    /// The access token for private and gated repos (`HF_TOKEN` or the token file).
    pub token: Option<String>,
    /// Never touch the network; use only what is cached (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubSettings {
    /// Settings from the environment, as huggingface_hub reads it:
    /// - `HF_ENDPOINT` (default `https://huggingface.co`);
    /// - `HF_HUB_CACHE` (also the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, where
    ///   `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// - `HF_TOKEN` (also the older `HUGGING_FACE_HUB_TOKEN`), else the file `HF_TOKEN_PATH`,
    ///   else `$HF_HOME/token` (written by `huggingface-cli login`);
    /// - `HF_HUB_OFFLINE` (also `TRANSFORMERS_OFFLINE`) set to 1/ON/YES/TRUE.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok(), std::env::home_dir())
    }

    /// [`HubSettings::from_env`] with the variables read through `lookup` and the given home
    /// folder (for tests and for callers that keep their own environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Self {
        // An empty variable counts as unset, as in huggingface_hub.
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            let cache_root = var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".cache")))
                // No home folder at all: a relative cache beats failing to start.
                .unwrap_or_else(|| PathBuf::from(".cache"));
            cache_root.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_file = var("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("token"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| std::fs::read_to_string(&token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let offline = var("HF_HUB_OFFLINE")
            .or_else(|| var("TRANSFORMERS_OFFLINE"))
            .is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_uppercase().as_str(),
                    "1" | "ON" | "YES" | "TRUE"
                )
            });
        HubSettings {
            endpoint,
            cache_dir,
            token,
            offline,
        }
    }

    /// The cache folder of one model repo: `<cache_dir>/models--owner--name`.
    pub fn repo_cache_dir(&self, repo_id: &str) -> PathBuf {
        self.cache_dir
            .join(Repo::new(repo_id.to_string(), RepoType::Model).folder_name())
    }

    /// The cache folder of Hub dataset `repo_id` (`datasets--owner--name`).
    pub fn dataset_cache_dir(&self, repo_id: &str) -> PathBuf {
        self.cache_dir
            .join(Repo::new(repo_id.to_string(), RepoType::Dataset).folder_name())
    }
}

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

/// Why a model could not be found or fetched.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The model argument is neither a folder nor a repo id.
    #[error("cannot use {spec:?} as a model: {reason}")]
    InvalidSpec {
        /// The argument as given.
        spec: String,
        /// Why.
        reason: String,
    },
    /// The revision cannot name a branch, tag or commit.
    #[error("cannot use {revision:?} as a revision: {reason}")]
    InvalidRevision {
        /// The revision as given.
        revision: String,
        /// Why.
        reason: String,
    },
    /// A path was given and nothing is there.
    #[error("model folder {path} does not exist")]
    LocalDirMissing {
        /// The path.
        path: PathBuf,
    },
    /// A path was given and it is a file.
    #[error("{path} is a file, not a model folder")]
    NotAFolder {
        /// The path.
        path: PathBuf,
    },
    /// The folder (or repo) has no `model_index.json`.
    #[error(
        "{location} is not a diffusers pipeline: it has no model_index.json \
         (a pipeline folder has model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
    )]
    NotAPipeline {
        /// The folder, or `repo@revision`.
        location: String,
    },
    /// A component folder the edit needs is absent.
    #[error("{location} has no {component}/ folder, which an edit needs")]
    MissingComponent {
        /// The folder, or `repo@revision`.
        location: String,
        /// `unet`, `vae`, `text_encoder`, `tokenizer` or `scheduler`.
        component: String,
    },
    /// A file the edit needs is absent.
    #[error("{location} has no {file}")]
    MissingFile {
        /// The folder, or `repo@revision`.
        location: String,
        /// The file's path inside the pipeline.
        file: String,
    },
    /// A component folder has no weights with a known name.
    #[error("{location} has no weights in {component}/: expected {expected}")]
    NoWeights {
        /// The folder, or `repo@revision`.
        location: String,
        /// The component.
        component: String,
        /// The names looked for.
        expected: String,
    },
    /// HF_HUB_OFFLINE is set (or the Hub could not be reached) and the model is not (fully)
    /// cached.
    #[error(
        "{repo} (revision {revision}) is not available from the Hugging Face cache at {cache_dir}: {detail}{why}"
    )]
    NotCached {
        /// `owner/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The cache folder searched.
        cache_dir: PathBuf,
        /// What is missing.
        detail: String,
        /// Why the cache was the only source (offline, or the network error).
        why: String,
    },
    /// The Hub answered 404 for the repo.
    #[error("repository {repo} not found on {endpoint}{hint}")]
    RepoNotFound {
        /// `owner/name`.
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// A hint about private repos when no token was sent.
        hint: String,
    },
    /// The repo exists but not the revision.
    #[error("revision {revision} not found in repository {repo} on {endpoint}")]
    RevisionNotFound {
        /// `owner/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The Hub's address.
        endpoint: String,
    },
    /// The Hub refused access (401/403): a private or gated repo.
    #[error("access to repository {repo} on {endpoint} was refused (HTTP {status}): {advice}")]
    Unauthorized {
        /// `owner/name`.
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// 401 or 403.
        status: u16,
        /// What to do about it (mentions HF_TOKEN).
        advice: String,
    },
    /// Any other HTTP status from the Hub's API.
    #[error("{endpoint} answered HTTP {status} when listing repository {repo}")]
    HubStatus {
        /// `owner/name`.
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// The status code.
        status: u16,
    },
    /// The Hub's listing could not be read.
    #[error("the listing of repository {repo} from {endpoint} is unusable: {reason}")]
    BadListing {
        /// `owner/name`.
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// A dataset repo has no files the training can read.
    #[error("dataset {repo} on {endpoint} has no training data this program reads: {reason}")]
    NoDataFiles {
        /// `owner/name`.
        repo: String,
        /// The Hub's address.
        endpoint: String,
        /// What was looked for.
        reason: String,
    },
    /// hf-hub could not be set up.
    #[error("cannot set up the Hugging Face client: {source}")]
    Client {
        /// hf-hub's error.
        source: ApiError,
    },
    /// A file download failed.
    #[error("downloading {file} of {repo} from {endpoint} failed: {source}")]
    Download {
        /// `owner/name`.
        repo: String,
        /// The file's path in the repo.
        file: String,
        /// The Hub's address.
        endpoint: String,
        /// hf-hub's error.
        source: ApiError,
    },
    /// A file landed in a different snapshot than the listing's commit.
    #[error(
        "{file} of {repo} was downloaded at commit {got}, not the listed {expected}: \
         the repo changed during the download; try again"
    )]
    CommitChanged {
        /// `owner/name`.
        repo: String,
        /// The file's path in the repo.
        file: String,
        /// The listing's commit.
        expected: String,
        /// The snapshot the file landed in.
        got: String,
    },
    /// The download was cancelled (through the cancel flag of [`fetch_model_with_cancel`]).
    /// A file cut off mid-way stays as a `.part` blob that the next download resumes; nothing
    /// in the snapshot points at it.
    #[error("the download of {repo} was cancelled")]
    Cancelled {
        /// `owner/name`.
        repo: String,
    },
    /// The cache could not be read or written.
    #[error("Hugging Face cache error at {path}: {source}")]
    Cache {
        /// The file or folder.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A config file is missing or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A weight index is malformed.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Makes every file an edit needs present locally and returns the pipeline folder (a local dir as
/// is, or the cache snapshot folder): model_index.json, {unet,vae,text_encoder}/config.json and weights
/// (`diffusion_pytorch_model[.fp16].safetensors` / `model[.fp16].safetensors`; `.bin` fallback;
/// sharded `*.safetensors.index.json` too), tokenizer files (vocab.json, merges.txt, tokenizer.json,
/// special_tokens_map.json, tokenizer_config.json, whichever exist), scheduler/scheduler_config.json.
/// Downloads only what is needed (listing the repo through the Hub API,
/// `/api/models/{repo}/revision/{rev}`, to know which exist), reports progress through
/// `progress(file, bytes_done, bytes_total)`.
///
/// Offline (`settings.offline`) nothing is requested: `refs/<revision>` and the snapshot are read
/// from the cache. When the Hub cannot be reached at all, a fully cached model is used the same
/// way (as huggingface_hub does).
pub fn fetch_model(
    spec: &ModelSpec,
    variant: Variant,
    settings: &HubSettings,
    progress: &mut dyn FnMut(&DownloadProgress),
) -> Result<PathBuf, HubError> {
    fetch_model_with_cancel(spec, variant, settings, progress, &AtomicBool::new(false))
}

/// [`fetch_model`] that stops with [`HubError::Cancelled`] once `cancel` is set: before the
/// listing, before each file, and mid-file at the next block of bytes that arrives (hf-hub 0.5
/// has no abort, so the progress callback unwinds out of its download with a private payload
/// that is caught here; hf-hub's lock on the blob is released as the unwind drops it).
///
/// A file cut off mid-way stays as `blobs/<etag>.part`, which the next download of the same
/// file resumes; the snapshot only ever links complete blobs, and `refs/<revision>` is written
/// only once every file is present. A stalled connection (no bytes at all) is not interrupted:
/// hf-hub 0.5 offers no timeout for its downloads, so the cancel takes effect when bytes flow
/// again.
pub fn fetch_model_with_cancel(
    spec: &ModelSpec,
    variant: Variant,
    settings: &HubSettings,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, HubError> {
    match spec {
        ModelSpec::LocalDir(dir) => {
            if !dir.is_dir() {
                return Err(if dir.exists() {
                    HubError::NotAFolder { path: dir.clone() }
                } else {
                    HubError::LocalDirMissing { path: dir.clone() }
                });
            }
            let mut source = FolderSource {
                root: dir.clone(),
                origin: FolderOrigin::Local,
            };
            collect_pipeline_files(&mut source, variant)?;
            Ok(dir.clone())
        }
        ModelSpec::Hub { repo_id, revision } => {
            // A spec built by hand skipped `parse`; both name paths inside the cache.
            check_repo_id(repo_id).map_err(|reason| HubError::InvalidSpec {
                spec: repo_id.clone(),
                reason,
            })?;
            check_revision(revision).map_err(|reason| HubError::InvalidRevision {
                revision: revision.clone(),
                reason,
            })?;
            if settings.offline {
                let why = "HF_HUB_OFFLINE is set; unset it to download".to_string();
                return fetch_from_cache(repo_id, revision, variant, settings, why);
            }
            fetch_from_hub(repo_id, revision, variant, settings, progress, cancel)
        }
    }
}

/// Checks, without any request, that `folder` (a local pipeline or a cache snapshot) holds every
/// file an edit with `variant` needs: the same check [`fetch_model`] makes offline.
pub(crate) fn check_pipeline_folder(folder: &Path, variant: Variant) -> Result<(), HubError> {
    let mut source = FolderSource {
        root: folder.to_path_buf(),
        origin: FolderOrigin::Local,
    };
    collect_pipeline_files(&mut source, variant)
}

/// The snapshot folder of `repo_id` at `revision` in the cache, if the cache knows that
/// revision (`refs/<revision>`, or a snapshot named by a commit hash). Does not check that the
/// snapshot holds every file; [`fetch_model`] with `offline` does.
pub fn cached_snapshot(settings: &HubSettings, repo_id: &str, revision: &str) -> Option<PathBuf> {
    resolve_cached_revision(&settings.repo_cache_dir(repo_id), revision)
        .ok()
        .map(|(_, dir)| dir)
}

/// Resolves a revision in one repo's cache folder to `(commit, snapshot folder)`.
fn resolve_cached_revision(repo_dir: &Path, revision: &str) -> Result<(String, PathBuf), String> {
    if !repo_dir.is_dir() {
        return Err(format!("the cache has no {}", repo_dir.display()));
    }
    let snapshots = repo_dir.join("snapshots");
    // A commit hash is used as is (huggingface_hub writes no ref for it).
    if is_commit_hash(revision) && snapshots.join(revision).is_dir() {
        return Ok((revision.to_string(), snapshots.join(revision)));
    }
    let ref_path = repo_dir.join("refs").join(revision);
    let commit = std::fs::read_to_string(&ref_path)
        .map_err(|_| format!("no ref for revision {revision} ({})", ref_path.display()))?;
    let commit = commit.trim();
    if !is_plain_file_name(commit) {
        return Err(format!("{} holds no commit hash", ref_path.display()));
    }
    let snapshot = snapshots.join(commit);
    if !snapshot.is_dir() {
        return Err(format!(
            "{} points to commit {commit} but {} is missing",
            ref_path.display(),
            snapshot.display()
        ));
    }
    Ok((commit.to_string(), snapshot))
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Uses the cached snapshot only; `why` says why the Hub is not asked.
fn fetch_from_cache(
    repo_id: &str,
    revision: &str,
    variant: Variant,
    settings: &HubSettings,
    why: String,
) -> Result<PathBuf, HubError> {
    let not_cached = |detail: String| HubError::NotCached {
        repo: repo_id.to_string(),
        revision: revision.to_string(),
        cache_dir: settings.cache_dir.clone(),
        detail,
        why: format!(" ({why})"),
    };
    let (_, snapshot) =
        resolve_cached_revision(&settings.repo_cache_dir(repo_id), revision).map_err(not_cached)?;
    let mut source = FolderSource {
        root: snapshot.clone(),
        origin: FolderOrigin::Cache,
    };
    // Say which file is missing from the cache, not that the repo lacks it.
    collect_pipeline_files(&mut source, variant).map_err(|err| match err {
        HubError::NotAPipeline { .. } => not_cached(format!("{MODEL_INDEX_FILE} is not cached")),
        HubError::MissingComponent { component, .. } => {
            not_cached(format!("nothing of {component}/ is cached"))
        }
        HubError::MissingFile { file, .. } => not_cached(format!("{file} is not cached")),
        HubError::NoWeights {
            component,
            expected,
            ..
        } => not_cached(format!(
            "no weights of {component}/ are cached (expected {expected})"
        )),
        other => other,
    })?;
    Ok(snapshot)
}

/// Lists the repo at `revision`, then downloads what is missing from its snapshot.
fn fetch_from_hub(
    repo_id: &str,
    revision: &str,
    variant: Variant,
    settings: &HubSettings,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, HubError> {
    let cancelled = || HubError::Cancelled {
        repo: repo_id.to_string(),
    };
    if cancel.load(Ordering::Acquire) {
        return Err(cancelled());
    }
    let endpoint = settings.endpoint.clone();
    let api = hub_api(settings)?;
    let listing_repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let listing = match list_repo(&listing_repo, repo_id, revision, settings) {
        Ok(listing) => listing,
        Err(ListError::Unreachable(reason)) => {
            let why = format!("{endpoint} could not be reached: {reason}");
            return fetch_from_cache(repo_id, revision, variant, settings, why);
        }
        Err(ListError::Hub(err)) => return Err(*err),
    };

    if cancel.load(Ordering::Acquire) {
        return Err(cancelled());
    }

    let repo_dir = settings.repo_cache_dir(repo_id);
    let snapshot = repo_dir.join("snapshots").join(&listing.sha);
    // Which files are missing, from the listing alone, so progress can say "file 3 of 9" and
    // errors in the repo's layout show before any download.
    let mut plan_source = PlanSource {
        location: format!("repository {repo_id}@{revision} on {endpoint}"),
        files: &listing.files,
        snapshot: &snapshot,
        planned: Vec::new(),
    };
    collect_pipeline_files(&mut plan_source, variant)?;
    let planned = plan_source.planned;
    let target = ListedTarget {
        repo_id,
        revision,
        repo_type: RepoType::Model,
        repo_dir: &repo_dir,
        endpoint,
    };
    download_listed(target, &api, listing, planned, progress, cancel, |source| {
        collect_pipeline_files(source, variant)
    })
}

/// Where [`download_listed`] downloads: the repo, the revision asked for, and its cache folder.
struct ListedTarget<'a> {
    repo_id: &'a str,
    revision: &'a str,
    repo_type: RepoType,
    repo_dir: &'a Path,
    endpoint: String,
}

/// Runs `download` on a [`HubSource`] for the listed commit's snapshot (with `planned` as the
/// files it expects to download, for progress), then leaves the refs as huggingface_hub does, and
/// returns the snapshot folder.
fn download_listed(
    target: ListedTarget,
    api: &hf_hub::api::sync::Api,
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

/// Picks the files of a dataset repo to download from all its file names, or says why none
/// will do.
pub type DatasetFileChoice = dyn Fn(&BTreeSet<String>) -> Result<Vec<String>, String>;

/// Makes the files of Hub dataset `repo_id` at `revision` that `choose` picks from the repo's
/// listing (`/api/datasets/{repo}/revision/{rev}`) present in the Hugging Face cache, as
/// `huggingface-cli download --repo-type dataset` leaves them (`datasets--owner--name/snapshots/
/// <commit>/`, `refs/<revision>`), and returns the snapshot folder. `choose` gets every file name
/// of the repo and returns those to fetch, or why none will do. Files already in the snapshot are
/// not downloaded again; progress and cancelling work as for [`fetch_model_with_cancel`].
///
/// Offline (`settings.offline`), or when the Hub cannot be reached, a cached snapshot of
/// `revision` is returned as it is (the caller then reads what it holds).
pub fn fetch_dataset(
    repo_id: &str,
    revision: &str,
    settings: &HubSettings,
    choose: &DatasetFileChoice,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, HubError> {
    check_repo_id(repo_id).map_err(|reason| HubError::InvalidSpec {
        spec: repo_id.to_string(),
        reason,
    })?;
    check_revision(revision).map_err(|reason| HubError::InvalidRevision {
        revision: revision.to_string(),
        reason,
    })?;
    let repo_dir = settings.dataset_cache_dir(repo_id);
    let from_cache = |why: String| {
        resolve_cached_revision(&repo_dir, revision)
            .map(|(_, snapshot)| snapshot)
            .map_err(|detail| HubError::NotCached {
                repo: format!("dataset {repo_id}"),
                revision: revision.to_string(),
                cache_dir: settings.cache_dir.clone(),
                detail,
                why: format!(" ({why})"),
            })
    };
    if settings.offline {
        return from_cache("HF_HUB_OFFLINE is set; unset it to download".to_string());
    }
    let cancelled = || HubError::Cancelled {
        repo: repo_id.to_string(),
    };
    if cancel.load(Ordering::Acquire) {
        return Err(cancelled());
    }
    let endpoint = settings.endpoint.clone();
    let api = hub_api(settings)?;
    let listing_repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Dataset,
        revision.to_string(),
    ));
    let listing = match list_repo(&listing_repo, repo_id, revision, settings) {
        Ok(listing) => listing,
        Err(ListError::Unreachable(reason)) => {
            return from_cache(format!("{endpoint} could not be reached: {reason}"));
        }
        Err(ListError::Hub(err)) => return Err(*err),
    };
    let chosen = choose(&listing.files).map_err(|reason| HubError::NoDataFiles {
        repo: repo_id.to_string(),
        endpoint: endpoint.clone(),
        reason,
    })?;
    let snapshot = repo_dir.join("snapshots").join(&listing.sha);
    let missing: Vec<String> = chosen
        .iter()
        .filter(|file| !snapshot.join(file).is_file())
        .cloned()
        .collect();
    let target = ListedTarget {
        repo_id,
        revision,
        repo_type: RepoType::Dataset,
        repo_dir: &repo_dir,
        endpoint,
    };
    download_listed(target, &api, listing, missing, progress, cancel, |source| {
        chosen
            .iter()
            .try_for_each(|file| match source.fetch(file)? {
                true => Ok(()),
                false => Err(HubError::MissingFile {
                    location: source.location(),
                    file: file.clone(),
                }),
            })
    })
}

/// Records `refs/<revision>` → commit, as huggingface_hub does after a download.
fn write_ref(repo_dir: &Path, revision: &str, sha: &str) -> Result<(), HubError> {
    let ref_path = repo_dir.join("refs").join(revision);
    let cache_err = |source| HubError::Cache {
        path: ref_path.clone(),
        source,
    };
    if let Some(parent) = ref_path.parent() {
        std::fs::create_dir_all(parent).map_err(cache_err)?;
    }
    if std::fs::read_to_string(&ref_path).is_ok_and(|current| current.trim() == sha) {
        return Ok(());
    }
    std::fs::write(&ref_path, sha).map_err(cache_err)
}

/// The repo listing: its commit, file names and (when the Hub gives them) file sizes.
struct Listing {
    sha: String,
    files: BTreeSet<String>,
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

/// Where a pipeline's files are looked up: a folder (local or a cache snapshot) or the Hub.
trait PipelineSource {
    /// A name for messages: the folder, or `repo@revision`.
    fn location(&self) -> String;
    /// The local folder the pipeline lives in (once its files are present).
    fn root(&self) -> &Path;
    /// Whether the folder `component/` has any file.
    fn has_component(&mut self, component: &str) -> Result<bool, HubError>;
    /// The file names directly inside `component/`.
    fn component_files(&mut self, component: &str) -> Result<BTreeSet<String>, HubError>;
    /// Makes `file` (a pipeline-relative path) present locally; `Ok(false)` when the source does
    /// not have it.
    fn fetch(&mut self, file: &str) -> Result<bool, HubError>;
    /// Whether a fetched `file` can be read now. Only a [`PlanSource`] says no (it fetches
    /// nothing): the checks that read files are then left to the pass that downloads them.
    fn readable(&self, _file: &str) -> bool {
        true
    }
}

/// Fetches (or checks) every file an edit needs, in the order small-to-large so that a broken
/// repo fails before the big downloads: configs and tokenizer, then weights.
fn collect_pipeline_files(
    source: &mut dyn PipelineSource,
    variant: Variant,
) -> Result<(), HubError> {
    let location = source.location();
    let missing = |file: &str| HubError::MissingFile {
        location: location.clone(),
        file: file.to_string(),
    };
    if !source.fetch(MODEL_INDEX_FILE)? {
        return Err(HubError::NotAPipeline {
            location: location.clone(),
        });
    }
    // Parse it now so a broken index fails before any weight is downloaded.
    if source.readable(MODEL_INDEX_FILE) {
        ModelIndex::read(source.root())?;
    }

    for component in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        if !source.has_component(component)? {
            return Err(HubError::MissingComponent {
                location: location.clone(),
                component: component.to_string(),
            });
        }
    }
    for (component, _) in WEIGHT_COMPONENTS {
        let config = format!("{component}/config.json");
        if !source.fetch(&config)? {
            return Err(missing(&config));
        }
        if source.readable(&config) {
            let _: serde_json::Value = read_json(&source.root().join(&config))?;
        }
    }
    if !source.fetch(SCHEDULER_CONFIG)? {
        return Err(missing(SCHEDULER_CONFIG));
    }
    if source.readable(SCHEDULER_CONFIG) {
        let _: serde_json::Value = read_json(&source.root().join(SCHEDULER_CONFIG))?;
    }

    let tokenizer_files = source.component_files("tokenizer")?;
    let has = |name: &str| tokenizer_files.contains(name);
    if !(has("tokenizer.json") || (has("vocab.json") && has("merges.txt"))) {
        return Err(missing(
            "tokenizer/vocab.json and tokenizer/merges.txt (or tokenizer/tokenizer.json)",
        ));
    }
    for name in TOKENIZER_FILES.iter().filter(|name| has(name)) {
        let file = format!("tokenizer/{name}");
        if !source.fetch(&file)? {
            return Err(missing(&file));
        }
    }

    for (component, base_name) in WEIGHT_COMPONENTS {
        let names = source.component_files(component)?;
        let Some(selection) = select_weights(&names, base_name, variant) else {
            return Err(HubError::NoWeights {
                location: location.clone(),
                component: component.to_string(),
                expected: super::weights::expected_names(base_name, variant),
            });
        };
        match selection.entry {
            WeightEntry::Single(name) => {
                let file = format!("{component}/{name}");
                if !source.fetch(&file)? {
                    return Err(missing(&file));
                }
            }
            WeightEntry::Sharded { index } => {
                let index_file = format!("{component}/{index}");
                if !source.fetch(&index_file)? {
                    return Err(missing(&index_file));
                }
                if !source.readable(&index_file) {
                    // Planning: the shards are known once the index is downloaded.
                    continue;
                }
                for shard in shard_names(&source.root().join(&index_file))? {
                    let file = format!("{component}/{shard}");
                    if !names.contains(&shard) || !source.fetch(&file)? {
                        return Err(missing(&file));
                    }
                }
            }
        }
    }
    Ok(())
}

/// What kind of folder a [`FolderSource`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FolderOrigin {
    /// A folder the user named.
    Local,
    /// A snapshot folder of the Hugging Face cache.
    Cache,
}

/// A pipeline already on disk: files are checked, never fetched.
struct FolderSource {
    root: PathBuf,
    origin: FolderOrigin,
}

impl PipelineSource for FolderSource {
    fn location(&self) -> String {
        match self.origin {
            FolderOrigin::Local => self.root.display().to_string(),
            FolderOrigin::Cache => format!("cached snapshot {}", self.root.display()),
        }
    }

    fn root(&self) -> &Path {
        &self.root
    }

    fn has_component(&mut self, component: &str) -> Result<bool, HubError> {
        Ok(self.root.join(component).is_dir())
    }

    fn component_files(&mut self, component: &str) -> Result<BTreeSet<String>, HubError> {
        let dir = self.root.join(component);
        let read_err = |source| HubError::Cache {
            path: dir.clone(),
            source,
        };
        let mut names = BTreeSet::new();
        if !dir.is_dir() {
            return Ok(names);
        }
        for entry in std::fs::read_dir(&dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            // `is_file` follows symlinks: cache snapshots link into blobs/.
            if entry.path().is_file()
                && let Some(name) = entry.file_name().to_str()
            {
                names.insert(name.to_string());
            }
        }
        Ok(names)
    }

    fn fetch(&mut self, file: &str) -> Result<bool, HubError> {
        Ok(self.root.join(file).is_file())
    }
}

/// A Hub listing walked without downloading: records which needed files the snapshot lacks.
struct PlanSource<'l> {
    /// As the downloading pass names it, so errors read the same from either pass.
    location: String,
    files: &'l BTreeSet<String>,
    snapshot: &'l Path,
    /// Needed files not yet in the snapshot, in download order.
    planned: Vec<String>,
}

impl PipelineSource for PlanSource<'_> {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn root(&self) -> &Path {
        self.snapshot
    }

    fn has_component(&mut self, component: &str) -> Result<bool, HubError> {
        Ok(listed_has_component(self.files, component))
    }

    fn component_files(&mut self, component: &str) -> Result<BTreeSet<String>, HubError> {
        Ok(listed_component_files(self.files, component))
    }

    fn fetch(&mut self, file: &str) -> Result<bool, HubError> {
        if !self.files.contains(file) {
            return Ok(false);
        }
        if !self.snapshot.join(file).is_file() && !self.planned.iter().any(|p| p == file) {
            self.planned.push(file.to_string());
        }
        Ok(true)
    }

    fn readable(&self, file: &str) -> bool {
        self.snapshot.join(file).is_file()
    }
}

fn listed_has_component(files: &BTreeSet<String>, component: &str) -> bool {
    let prefix = format!("{component}/");
    files.iter().any(|f| f.starts_with(&prefix))
}

fn listed_component_files(files: &BTreeSet<String>, component: &str) -> BTreeSet<String> {
    let prefix = format!("{component}/");
    files
        .iter()
        .filter_map(|f| f.strip_prefix(&prefix))
        .filter(|name| !name.contains('/'))
        .map(str::to_string)
        .collect()
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
struct HubSource<'p> {
    repo_id: String,
    revision: String,
    endpoint: String,
    sha: String,
    files: BTreeSet<String>,
    /// File sizes from the listing (may be empty).
    sizes: BTreeMap<String, u64>,
    plan: DownloadPlan,
    cancel: &'p AtomicBool,
    snapshot: PathBuf,
    api_repo: ApiRepo,
    progress: &'p mut dyn FnMut(&DownloadProgress),
}

impl PipelineSource for HubSource<'_> {
    fn location(&self) -> String {
        format!(
            "repository {}@{} on {}",
            self.repo_id, self.revision, self.endpoint
        )
    }

    fn root(&self) -> &Path {
        &self.snapshot
    }

    fn has_component(&mut self, component: &str) -> Result<bool, HubError> {
        Ok(listed_has_component(&self.files, component))
    }

    fn component_files(&mut self, component: &str) -> Result<BTreeSet<String>, HubError> {
        Ok(listed_component_files(&self.files, component))
    }

    fn fetch(&mut self, file: &str) -> Result<bool, HubError> {
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
