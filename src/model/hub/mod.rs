//! Where a model comes from: a local diffusers folder or a Hugging Face Hub repo resolved into
//! the standard Hugging Face cache (`models--owner--name/{blobs,refs,snapshots}`), shared with
//! diffusers and huggingface_hub so nothing is downloaded twice.
//!
//! Downloads are our own (over ureq), in huggingface_hub's cache layout (`blobs/<etag>`, linked
//! from `snapshots/<commit>/`, `refs/<revision>`; resumable `blobs/<etag>.part` files; locks in
//! `.locks/`); hf-hub only names the cache folders. Here: the `HF_HUB_CACHE`, `HF_HUB_OFFLINE`
//! and `HF_TOKEN` variables, resolving `refs/<revision>` and snapshot files from the cache without
//! any request (offline, or when the Hub cannot be reached), telling a missing repo (404) from a
//! private or gated one (401/403), choosing which files of the repo an edit needs from the
//! repo listing so that only those are downloaded, progress as "file 3 of 9" with overall bytes
//! (the listing's `?blobs=true` sizes), cancelling a download mid-file
//! ([`fetch_model_with_cancel`]), and downloads that neither hang nor give up too early: no bytes
//! for [`DEFAULT_STALL_TIMEOUT`] (or [`STALL_TIMEOUT_VAR`]) fails, however long the whole file
//! takes; a dropped connection continues where it stopped; every file is checked against its
//! etag (SHA-256 for large files) before it enters the cache.
//!
//! Uploads too ([`push_files`], for `train --push_to_hub`): files into a model repo in one
//! commit through the Hub's commit API, large files through its LFS batch API.
//!
//! Training datasets come the same way ([`fetch_dataset`]: `datasets--owner--name/...`, only the
//! files the caller chooses from the listing); which files those are is `train::data`'s call.
//!
//! # Layout
//! Here: naming a model ([`ModelSpec`]) and the errors. `settings` reads the environment and
//! resolves revisions in the cache; `client` is the HTTP client (its timeouts); `download` lists
//! a repo on the Hub and downloads listed files into the cache with progress and cancel;
//! `transfer` downloads one file (resume, retries, checksum, cache layout); `pipeline` decides which files of a diffusers
//! pipeline an edit needs and fetches a model; `dataset` fetches a dataset repo; `upload`
//! creates a repo and commits files to it.

mod client;
mod dataset;
mod download;
mod pipeline;
mod settings;
mod transfer;
mod upload;

use std::fmt;
use std::path::{Path, PathBuf};

pub use self::client::{DEFAULT_STALL_TIMEOUT, STALL_TIMEOUT_VAR};
pub use self::dataset::{DatasetFileChoice, fetch_dataset};
pub use self::download::DownloadProgress;
pub(crate) use self::pipeline::check_pipeline_folder;
pub use self::pipeline::{fetch_configs_with_cancel, fetch_model, fetch_model_with_cancel};
pub use self::settings::{HubSettings, cached_snapshot, snapshot_in_cache_folder};
pub use self::transfer::DownloadError;
pub use self::upload::{
    PUT_TRIES, PushError, PushOutcome, PushProgress, PushStage, UploadFile, check_push_access,
    check_push_repo_id, push_files,
};
use super::config::ConfigError;
pub use super::weights::Variant;
use super::weights::WeightsError;

/// The model used when none is named.
pub const DEFAULT_REPO: &str = "timbrooks/instruct-pix2pix";
/// The Hub's address when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision used when none is named.
pub const DEFAULT_REVISION: &str = "main";

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// A folder in diffusers' layout.
    LocalDir(PathBuf),
    /// A single-file checkpoint (`.safetensors`, `.ckpt`) in the original LDM layout; its
    /// tokenizer and scheduler config come from a config folder or repo.
    SingleFile(PathBuf),
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
            ModelSpec::LocalDir(path) | ModelSpec::SingleFile(path) => {
                write!(f, "{}", path.display())
            }
            ModelSpec::Hub { repo_id, revision } if revision == DEFAULT_REVISION => {
                f.write_str(repo_id)
            }
            ModelSpec::Hub { repo_id, revision } => write!(f, "{repo_id}@{revision}"),
        }
    }
}

impl ModelSpec {
    /// Reads a model argument: an existing folder wins (a leading `~/` is the home folder), then
    /// an existing `.safetensors`/`.ckpt` file (a single-file checkpoint); `owner/name` is a Hub
    /// repo id (at `revision`, `main` when `None`); anything else is an error saying which it
    /// looked like.
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
        let single_file = crate::model::single_file::is_single_file_name(path);
        if path.exists() {
            if single_file {
                return Ok(ModelSpec::SingleFile(path.to_path_buf()));
            }
            return Err(HubError::NotAFolder {
                path: path.to_path_buf(),
            });
        }
        if single_file {
            return Err(HubError::ModelFileMissing {
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

/// [`check_repo_id`] and [`check_revision`] for a repo named in code rather than parsed by
/// [`ModelSpec::parse`]: both name paths inside the cache.
fn check_repo_and_revision(repo_id: &str, revision: &str) -> Result<(), HubError> {
    check_repo_id(repo_id).map_err(|reason| HubError::InvalidSpec {
        spec: repo_id.to_string(),
        reason,
    })?;
    check_revision(revision).map_err(|reason| HubError::InvalidRevision {
        revision: revision.to_string(),
        reason,
    })
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
    #[error(
        "{path} is a file, not a model folder (single-file checkpoints are .safetensors or .ckpt files)"
    )]
    NotAFolder {
        /// The path.
        path: PathBuf,
    },
    /// A single-file checkpoint was named and nothing is there.
    #[error("model file {path} does not exist")]
    ModelFileMissing {
        /// The path.
        path: PathBuf,
    },
    /// A single-file checkpoint where only a pipeline folder (or a repo) will do.
    #[error(
        "{path} is a single-file checkpoint; {what} needs a diffusers pipeline folder or a Hub repo id"
    )]
    NeedsPipelineFolder {
        /// The file.
        path: PathBuf,
        /// What needs the folder ("fine-tuning", "--config").
        what: &'static str,
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
    /// An environment variable has a value that cannot be used.
    #[error("{var}={value:?} cannot be used: {reason}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
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
        /// What went wrong (boxed: it is large next to the other errors).
        source: Box<DownloadError>,
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
