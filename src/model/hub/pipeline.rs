//! Models: which files of a diffusers pipeline an edit needs (chosen from a local folder, a
//! cache snapshot or the Hub's listing), and fetching a model into the cache.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use hf_hub::RepoType;

use super::download::{HubSource, ListedTarget, Listing, Online, download_listed, list_online};
use super::settings::{HubSettings, resolve_cached_revision};
use super::{DownloadProgress, HubError, ModelSpec, check_repo_and_revision};
use crate::model::config::{MODEL_INDEX_FILE, ModelIndex, read_json};
use crate::model::weights::{
    DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, Variant, WeightEntry, expected_names, select_weights,
    shard_names,
};

/// What a fetch makes present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    /// Everything an edit reads, with this variant's weights.
    Pipeline(Variant),
    /// The configs, tokenizer and scheduler only: what a single-file checkpoint takes from a
    /// pipeline.
    Configs,
}

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
/// listing, before each file, and mid-file within a tenth of a second, also while the network
/// is silent.
///
/// A file cut off mid-way stays as `blobs/<etag>.part`, which the next download of the same
/// file resumes; the snapshot only ever links complete blobs, and `refs/<revision>` is written
/// only once every file is present.
pub fn fetch_model_with_cancel(
    spec: &ModelSpec,
    variant: Variant,
    settings: &HubSettings,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, HubError> {
    fetch_wanted(spec, Wanted::Pipeline(variant), settings, progress, cancel)
}

/// The config files a single-file checkpoint needs from a pipeline (`tokenizer/`,
/// `scheduler/scheduler_config.json`, and the networks' `config.json` when there), made present
/// as [`fetch_model_with_cancel`] does, without any weights. A local folder needs only the
/// tokenizer and the scheduler config.
pub fn fetch_configs_with_cancel(
    spec: &ModelSpec,
    settings: &HubSettings,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, HubError> {
    fetch_wanted(spec, Wanted::Configs, settings, progress, cancel)
}

fn fetch_wanted(
    spec: &ModelSpec,
    wanted: Wanted,
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
            match wanted {
                Wanted::Pipeline(variant) => check_pipeline_folder(dir, variant)?,
                Wanted::Configs => check_config_folder(dir)?,
            }
            Ok(dir.clone())
        }
        ModelSpec::SingleFile(path) => Err(HubError::NeedsPipelineFolder {
            path: path.clone(),
            what: match wanted {
                Wanted::Pipeline(_) => "fine-tuning",
                Wanted::Configs => "the config of a single-file checkpoint",
            },
        }),
        ModelSpec::Hub { repo_id, revision } => {
            // A spec built by hand skipped `parse`.
            check_repo_and_revision(repo_id, revision)?;
            match list_online(repo_id, revision, RepoType::Model, settings, cancel)? {
                Online::Listed { client, listing } => {
                    let target = ListedTarget {
                        repo_id,
                        revision,
                        repo_type: RepoType::Model,
                        repo_dir: &settings.repo_cache_dir(repo_id),
                        endpoint: settings.endpoint.clone(),
                    };
                    download_pipeline(target, &client, listing, wanted, progress, cancel)
                }
                Online::CacheOnly(why) => {
                    fetch_from_cache(repo_id, revision, wanted, settings, why)
                }
            }
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
    collect_pipeline_files(&mut source, Wanted::Pipeline(variant))
}

/// Checks that a local config folder has what a single-file checkpoint takes from it: the
/// tokenizer's files and `scheduler/scheduler_config.json` (the networks' configs are optional).
fn check_config_folder(folder: &Path) -> Result<(), HubError> {
    let location = folder.display().to_string();
    let mut source = FolderSource {
        root: folder.to_path_buf(),
        origin: FolderOrigin::Local,
    };
    if !source.fetch(SCHEDULER_CONFIG)? {
        return Err(HubError::MissingFile {
            location,
            file: SCHEDULER_CONFIG.to_string(),
        });
    }
    collect_tokenizer_files(&mut source, &location)
}

/// Uses the cached snapshot only; `why` says why the Hub is not asked.
fn fetch_from_cache(
    repo_id: &str,
    revision: &str,
    wanted: Wanted,
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
    collect_pipeline_files(&mut source, wanted).map_err(|err| match err {
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

/// Downloads what the listed pipeline's snapshot lacks of what an edit with `variant` needs.
fn download_pipeline(
    target: ListedTarget,
    client: &super::client::HubClient,
    listing: Listing,
    wanted: Wanted,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
) -> Result<PathBuf, HubError> {
    if cancel.load(Ordering::Acquire) {
        return Err(HubError::Cancelled {
            repo: target.repo_id.to_string(),
        });
    }
    let snapshot = target.repo_dir.join("snapshots").join(&listing.sha);
    // Which files are missing, from the listing alone, so progress can say "file 3 of 9" and
    // errors in the repo's layout show before any download.
    let mut plan_source = PlanSource {
        location: format!(
            "repository {}@{} on {}",
            target.repo_id, target.revision, target.endpoint
        ),
        files: &listing.files,
        snapshot: &snapshot,
        planned: Vec::new(),
    };
    collect_pipeline_files(&mut plan_source, wanted)?;
    let planned = plan_source.planned;
    download_listed(
        target,
        client,
        listing,
        planned,
        progress,
        cancel,
        |source| collect_pipeline_files(source, wanted),
    )
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
fn collect_pipeline_files(source: &mut dyn PipelineSource, wanted: Wanted) -> Result<(), HubError> {
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

    collect_tokenizer_files(source, &location)?;
    let Wanted::Pipeline(variant) = wanted else {
        return Ok(());
    };

    for (component, base_name) in WEIGHT_COMPONENTS {
        let names = source.component_files(component)?;
        let Some(selection) = select_weights(&names, base_name, variant) else {
            return Err(HubError::NoWeights {
                location: location.clone(),
                component: component.to_string(),
                expected: expected_names(base_name, variant),
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

/// The tokenizer's files: `tokenizer.json` or `vocab.json` + `merges.txt`, and the others present.
fn collect_tokenizer_files(
    source: &mut dyn PipelineSource,
    location: &str,
) -> Result<(), HubError> {
    let missing = |file: &str| HubError::MissingFile {
        location: location.to_string(),
        file: file.to_string(),
    };
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
            // Symlinks followed (cache snapshots link into blobs/). Special files (a FIFO, a link
            // to a device) count as present, so that reading them fails naming them.
            if is_present(&entry.path())
                && let Some(name) = entry.file_name().to_str()
            {
                names.insert(name.to_string());
            }
        }
        Ok(names)
    }

    fn fetch(&mut self, file: &str) -> Result<bool, HubError> {
        Ok(is_present(&self.root.join(file)))
    }
}

/// Whether a local model folder has `path`: anything but a folder (symlinks followed).
fn is_present(path: &Path) -> bool {
    path.exists() && !path.is_dir()
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

impl PipelineSource for HubSource<'_> {
    fn location(&self) -> String {
        HubSource::location(self)
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
        HubSource::fetch(self, file)
    }
}
