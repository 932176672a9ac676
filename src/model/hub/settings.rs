//! How to reach the Hub and where its cache is ([`HubSettings`], from the Hugging Face
//! environment variables), and finding a revision's snapshot in the cache without any request.

use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};

use super::{DEFAULT_ENDPOINT, HubError, check_revision};
use crate::model::weights::is_plain_file_name;

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

/// The snapshot folder of `repo_id` at `revision` in the cache, if the cache knows that
/// revision (`refs/<revision>`, or a snapshot named by a commit hash). Does not check that the
/// snapshot holds every file; [`super::fetch_model`] with `offline` does.
pub fn cached_snapshot(settings: &HubSettings, repo_id: &str, revision: &str) -> Option<PathBuf> {
    resolve_cached_revision(&settings.repo_cache_dir(repo_id), revision)
        .ok()
        .map(|(_, dir)| dir)
}

/// A repo's cache folder given as a path (`models--owner--name` or `datasets--owner--name`, the
/// folder holding `snapshots/`): its snapshot of `revision`, when the cache knows that revision
/// and the folder is one.
pub fn snapshot_in_cache_folder(repo_dir: &Path, revision: &str) -> Option<PathBuf> {
    if !repo_dir.join("snapshots").is_dir() || check_revision(revision).is_err() {
        return None;
    }
    resolve_cached_revision(repo_dir, revision)
        .ok()
        .map(|(_, dir)| dir)
}

/// Resolves a revision in one repo's cache folder to `(commit, snapshot folder)`.
pub(super) fn resolve_cached_revision(
    repo_dir: &Path,
    revision: &str,
) -> Result<(String, PathBuf), String> {
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

/// Records `refs/<revision>` → commit, as huggingface_hub does after a download.
pub(super) fn write_ref(repo_dir: &Path, revision: &str, sha: &str) -> Result<(), HubError> {
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
