//! The model catalog: what models are on this machine, for a model manager to list. Scans the
//! Hugging Face cache (`<cache>/models--owner--name/{refs,snapshots,blobs}`) and local diffusers
//! folders, and says for each whether it is a diffusers pipeline, whether it is an
//! InstructPix2Pix model, and whether it holds every file an edit needs offline (the same check
//! [`super::hub::fetch_model`] makes with `HF_HUB_OFFLINE`), with the reason when not.
//!
//! Nothing here touches the network or loads weights; files are only looked at (configs are
//! parsed). A broken entry (a dangling link, unreadable JSON, a file where a folder should be)
//! never fails the listing: it is listed with its problem. Every list is sorted, so the result
//! is the same from one scan to the next.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::MODEL_INDEX_FILE;
use super::hub::{HubError, HubSettings, Variant, check_pipeline_folder};

/// The `_class_name` of InstructPix2Pix pipelines in `model_index.json`.
pub const INSTRUCT_PIX2PIX_PIPELINE: &str = "StableDiffusionInstructPix2PixPipeline";
/// The UNet input channels of an InstructPix2Pix model: 4 noisy latent channels + 4 image ones.
pub const INSTRUCT_PIX2PIX_IN_CHANNELS: u64 = 8;

/// Why a local folder could not be inspected at all.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// Nothing is at the path.
    #[error("model folder {path} does not exist")]
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// The path is a file.
    #[error("{path} is a file, not a model folder")]
    NotAFolder {
        /// The path given.
        path: PathBuf,
    },
    /// The folder could not be read.
    #[error("cannot read model folder {path}: {source}")]
    Read {
        /// The folder.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// What a pipeline folder (a local folder or one cache snapshot) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineCheck {
    /// It has a `model_index.json`, so it is a diffusers pipeline.
    pub is_pipeline: bool,
    /// `_class_name` of `model_index.json` (`StableDiffusionInstructPix2PixPipeline`), when
    /// readable.
    pub class_name: Option<String>,
    /// `in_channels` of `unet/config.json`, when readable.
    pub unet_in_channels: Option<u64>,
    /// The class is the InstructPix2Pix pipeline, or the UNet takes 8 input channels.
    pub is_instruct_pix2pix: bool,
    /// Why an edit cannot load it offline with the default (float32) weights; `None` when it can.
    /// For example `"unet weights missing"` or `"not an InstructPix2Pix model: UNet has 4 input
    /// channels"`.
    pub problem: Option<String>,
    /// The same for float16, which picks the `fp16` weight files and falls back to the default
    /// ones per component.
    pub fp16_problem: Option<String>,
}

impl PipelineCheck {
    /// Whether an edit can load it offline (default weights).
    pub fn is_loadable(&self) -> bool {
        self.problem.is_none()
    }

    /// Inspects a pipeline folder; never fails, problems are described in the result.
    pub fn of_folder(folder: &Path) -> Self {
        let index_path = folder.join(MODEL_INDEX_FILE);
        let is_pipeline = index_path.is_file();
        let mut json_problem = None;
        let class_name = if is_pipeline {
            match read_json_value(&index_path) {
                Ok(index) => index
                    .get("_class_name")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                Err(reason) => {
                    json_problem = Some(format!("{MODEL_INDEX_FILE} is unreadable: {reason}"));
                    None
                }
            }
        } else {
            None
        };
        let unet_config = folder.join("unet").join("config.json");
        let unet_in_channels = if unet_config.is_file() {
            match read_json_value(&unet_config) {
                Ok(config) => config.get("in_channels").and_then(Value::as_u64),
                Err(reason) => {
                    json_problem.get_or_insert(format!("unet/config.json is unreadable: {reason}"));
                    None
                }
            }
        } else {
            None
        };
        let is_instruct_pix2pix = class_name.as_deref() == Some(INSTRUCT_PIX2PIX_PIPELINE)
            || unet_in_channels == Some(INSTRUCT_PIX2PIX_IN_CHANNELS);

        let problem_for = |variant: Variant| -> Option<String> {
            if !is_pipeline {
                return Some(if folder.join(MODEL_INDEX_FILE).exists() {
                    format!("{MODEL_INDEX_FILE} is not a readable file")
                } else {
                    format!("not a diffusers pipeline: no {MODEL_INDEX_FILE}")
                });
            }
            if let Some(problem) = &json_problem {
                return Some(problem.clone());
            }
            if let Some(channels) = unet_in_channels
                && channels != INSTRUCT_PIX2PIX_IN_CHANNELS
            {
                return Some(format!(
                    "not an InstructPix2Pix model: UNet has {channels} input channels"
                ));
            }
            check_pipeline_folder(folder, variant)
                .err()
                .map(|error| short_reason(&error))
        };
        let problem = problem_for(Variant::Default);
        let fp16_problem = problem_for(Variant::Fp16);
        Self {
            is_pipeline,
            class_name,
            unet_in_channels,
            is_instruct_pix2pix,
            problem,
            fp16_problem,
        }
    }
}

/// A short reason for a model manager's list, from the offline check's error.
fn short_reason(error: &HubError) -> String {
    match error {
        HubError::NotAPipeline { .. } => format!("not a diffusers pipeline: no {MODEL_INDEX_FILE}"),
        HubError::MissingComponent { component, .. } => format!("{component}/ folder missing"),
        HubError::MissingFile { file, .. } => format!("{file} missing"),
        HubError::NoWeights { component, .. } => format!("{component} weights missing"),
        other => other.to_string(),
    }
}

fn read_json_value(path: &Path) -> Result<Value, String> {
    let text = super::files::read_to_string_limited(path, super::files::MAX_CONFIG_BYTES)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

/// A revision name the cache knows: `refs/<name>` and the commit it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedRevision {
    /// The branch or tag (`main`, `refs/pr/1`).
    pub name: String,
    /// The commit hash written in the ref file.
    pub commit: String,
}

/// One snapshot folder (`snapshots/<commit>`) of a cached repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedSnapshot {
    /// The commit hash (the folder's name).
    pub commit: String,
    /// The snapshot folder: what a load of this revision reads.
    pub folder: PathBuf,
    /// The refs pointing at this commit, sorted.
    pub revisions: Vec<String>,
    /// What the snapshot holds.
    pub check: PipelineCheck,
    /// Links in the snapshot whose blob is gone, as snapshot-relative paths, sorted.
    pub dangling_links: Vec<String>,
}

/// One repo in the Hugging Face cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    /// `owner/name`, from the folder's name.
    pub repo_id: String,
    /// The repo's cache folder (`<cache>/models--owner--name`).
    pub cache_folder: PathBuf,
    /// `refs/*`, sorted by name.
    pub revisions: Vec<CachedRevision>,
    /// `snapshots/*`, sorted by commit.
    pub snapshots: Vec<CachedSnapshot>,
    /// Bytes on disk: every file of `blobs/` once (however many snapshots link it, partial
    /// downloads included), plus plain files inside snapshots (caches written without links).
    pub bytes_on_disk: u64,
    /// Unfinished downloads (`blobs/*.part`) that the next download resumes.
    pub partial_downloads: usize,
    /// What is wrong with the repo folder itself (no `snapshots/`, an unreadable ref, a file
    /// where a folder should be), sorted. Problems of one snapshot are in its
    /// [`PipelineCheck::problem`].
    pub problems: Vec<String>,
}

impl CachedModel {
    /// The snapshot `revision` (a ref name or a commit hash) resolves to, if cached.
    pub fn snapshot_for(&self, revision: &str) -> Option<&CachedSnapshot> {
        let commit = self
            .revisions
            .iter()
            .find(|r| r.name == revision)
            .map(|r| r.commit.as_str())
            .unwrap_or(revision);
        self.snapshots.iter().find(|s| s.commit == commit)
    }

    /// The snapshot to offer first: `main`'s, else the only one referenced by a ref (first by
    /// ref name), else the first by commit.
    pub fn preferred_snapshot(&self) -> Option<&CachedSnapshot> {
        self.snapshot_for("main")
            .or_else(|| {
                self.revisions
                    .iter()
                    .find_map(|r| self.snapshot_for(&r.commit))
            })
            .or_else(|| self.snapshots.first())
    }
}

/// A local diffusers folder, inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    /// The folder, as given.
    pub folder: PathBuf,
    /// Total size of the files under it (links followed, each path counted).
    pub bytes_on_disk: u64,
    /// What it holds.
    pub check: PipelineCheck,
}

/// Every model repo in the cache (`settings.cache_dir`), sorted by repo id. A missing or
/// unreadable cache folder gives an empty list; broken entries are listed with their problems.
pub fn list_cached_models(settings: &HubSettings) -> Vec<CachedModel> {
    let Ok(entries) = std::fs::read_dir(&settings.cache_dir) else {
        return Vec::new();
    };
    let mut models: Vec<CachedModel> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_string();
            let repo_id = repo_id_of_folder(&name)?;
            Some(scan_repo(repo_id, entry.path()))
        })
        .collect();
    models.sort_by(|a, b| {
        a.repo_id
            .cmp(&b.repo_id)
            .then_with(|| a.cache_folder.cmp(&b.cache_folder))
    });
    models
}

/// Inspects a local diffusers folder as the catalog inspects cache snapshots.
pub fn inspect_folder(folder: &Path) -> Result<LocalModel, CatalogError> {
    let metadata = std::fs::metadata(folder).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CatalogError::Missing {
                path: folder.to_path_buf(),
            }
        } else {
            CatalogError::Read {
                path: folder.to_path_buf(),
                source,
            }
        }
    })?;
    if !metadata.is_dir() {
        return Err(CatalogError::NotAFolder {
            path: folder.to_path_buf(),
        });
    }
    std::fs::read_dir(folder).map_err(|source| CatalogError::Read {
        path: folder.to_path_buf(),
        source,
    })?;
    Ok(LocalModel {
        folder: folder.to_path_buf(),
        bytes_on_disk: tree_size(folder, 0),
        check: PipelineCheck::of_folder(folder),
    })
}

/// A single-file checkpoint on disk: its size, and why it cannot be loaded (`None` when it can).
/// Reads its header (or its pickle), never its tensors.
pub fn inspect_single_file(path: &Path) -> (u64, Option<String>) {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let problem = super::single_file::SingleFile::check(path)
        .err()
        .map(|error| error.to_string());
    (bytes, problem)
}

/// `models--owner--name` → `owner/name`; `None` for folders that are not model repos.
fn repo_id_of_folder(name: &str) -> Option<String> {
    let rest = name.strip_prefix("models--")?;
    let (owner, repo) = rest.split_once("--")?;
    if owner.is_empty() || repo.is_empty() {
        return None;
    }
    Some(format!("{owner}/{}", repo.replace("--", "/")))
}

fn scan_repo(repo_id: String, cache_folder: PathBuf) -> CachedModel {
    let mut model = CachedModel {
        repo_id,
        cache_folder: cache_folder.clone(),
        revisions: Vec::new(),
        snapshots: Vec::new(),
        bytes_on_disk: 0,
        partial_downloads: 0,
        problems: Vec::new(),
    };
    if !cache_folder.is_dir() {
        model
            .problems
            .push("the cache entry is a file, not a folder".to_string());
        return model;
    }

    let refs_dir = cache_folder.join("refs");
    if refs_dir.exists() {
        if refs_dir.is_dir() {
            read_refs(&refs_dir, "", &mut model.revisions, &mut model.problems);
        } else {
            model
                .problems
                .push("refs is a file, not a folder".to_string());
        }
    }
    model.revisions.sort_by(|a, b| a.name.cmp(&b.name));

    let blobs_dir = cache_folder.join("blobs");
    if blobs_dir.is_dir() {
        match std::fs::read_dir(&blobs_dir) {
            Ok(entries) => {
                for entry in entries.filter_map(Result::ok) {
                    let Ok(metadata) = entry.metadata() else {
                        continue;
                    };
                    if metadata.is_file() {
                        model.bytes_on_disk += metadata.len();
                        if entry.path().extension().is_some_and(|e| e == "part") {
                            model.partial_downloads += 1;
                        }
                    }
                }
            }
            Err(error) => model.problems.push(format!("blobs is unreadable: {error}")),
        }
    } else if blobs_dir.exists() {
        model
            .problems
            .push("blobs is a file, not a folder".to_string());
    }

    let snapshots_dir = cache_folder.join("snapshots");
    if !snapshots_dir.is_dir() {
        model.problems.push(if snapshots_dir.exists() {
            "snapshots is a file, not a folder".to_string()
        } else {
            "no snapshots folder: nothing of it is downloaded".to_string()
        });
    } else {
        match std::fs::read_dir(&snapshots_dir) {
            Ok(entries) => {
                let mut names: Vec<(String, PathBuf)> = entries
                    .filter_map(Result::ok)
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect();
                names.sort();
                for (commit, folder) in names {
                    if !folder.is_dir() {
                        model
                            .problems
                            .push(format!("snapshots/{commit} is a file, not a folder"));
                        continue;
                    }
                    let mut dangling_links = Vec::new();
                    model.bytes_on_disk += snapshot_plain_files(&folder, "", &mut dangling_links);
                    dangling_links.sort();
                    let revisions = model
                        .revisions
                        .iter()
                        .filter(|r| r.commit == commit)
                        .map(|r| r.name.clone())
                        .collect();
                    model.snapshots.push(CachedSnapshot {
                        check: PipelineCheck::of_folder(&folder),
                        commit,
                        folder,
                        revisions,
                        dangling_links,
                    });
                }
            }
            Err(error) => model
                .problems
                .push(format!("snapshots is unreadable: {error}")),
        }
    }
    let known: BTreeSet<&str> = model.snapshots.iter().map(|s| s.commit.as_str()).collect();
    for revision in &model.revisions {
        if !known.contains(revision.commit.as_str()) {
            model.problems.push(format!(
                "refs/{} points to commit {} whose snapshot is missing",
                revision.name, revision.commit
            ));
        }
    }
    model.problems.sort();
    model
}

/// Reads `refs/` recursively (branch names may hold `/`).
fn read_refs(dir: &Path, prefix: &str, out: &mut Vec<CachedRevision>, problems: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        problems.push(format!("refs/{prefix} is unreadable"));
        return;
    };
    let mut by_name = BTreeMap::new();
    for entry in entries.filter_map(Result::ok) {
        by_name.insert(
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        );
    }
    for (name, path) in by_name {
        let full_name = format!("{prefix}{name}");
        if path.is_dir() {
            read_refs(&path, &format!("{full_name}/"), out, problems);
            continue;
        }
        // A ref holds a 40-character hash; a FIFO or a huge file is not one.
        match super::files::read_to_string_limited(&path, 4096) {
            Ok(text) => {
                let commit = text.trim();
                if commit.is_empty() || commit.contains(['/', '\\']) || commit.contains("..") {
                    problems.push(format!("refs/{full_name} holds no commit hash"));
                } else {
                    out.push(CachedRevision {
                        name: full_name,
                        commit: commit.to_string(),
                    });
                }
            }
            Err(error) => problems.push(format!("refs/{full_name} is unreadable: {error}")),
        }
    }
}

/// Bytes of plain files (not links) under a snapshot folder, which no blob accounts for; collects
/// links whose target is gone.
fn snapshot_plain_files(dir: &Path, prefix: &str, dangling: &mut Vec<String>) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut bytes = 0;
    for entry in entries.filter_map(Result::ok) {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let Ok(link_metadata) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if link_metadata.file_type().is_symlink() {
            if std::fs::metadata(entry.path()).is_err() {
                dangling.push(name);
            }
        } else if link_metadata.is_dir() {
            bytes += snapshot_plain_files(&entry.path(), &format!("{name}/"), dangling);
        } else {
            bytes += link_metadata.len();
        }
    }
    bytes
}

/// Total size of the files under `dir`, following links (a local folder may link its weights);
/// the depth guard stops link cycles.
fn tree_size(dir: &Path, depth: usize) -> u64 {
    const MAX_DEPTH: usize = 16;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut bytes = 0;
    for entry in entries.filter_map(Result::ok) {
        let Ok(metadata) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if metadata.is_dir() {
            if depth < MAX_DEPTH {
                bytes += tree_size(&entry.path(), depth + 1);
            }
        } else {
            bytes += metadata.len();
        }
    }
    bytes
}
