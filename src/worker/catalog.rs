//! What the model manager lists: the Hugging Face cache's models and the known folders, each
//! checked for what an edit needs, and whether a model is at hand without a download. Reads the
//! disk only (no candle): the window calls it from its chore threads.

use std::path::PathBuf;

use crate::model::catalog::{inspect_folder, inspect_single_file, list_cached_models};
use crate::model::hub::{HubSettings, ModelSpec, cached_snapshot};

/// One model the model manager lists.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogEntry {
    /// What to load: a Hub repo id or a folder path.
    pub spec: String,
    /// "Hugging Face cache", "folder" or "single file".
    pub source: &'static str,
    pub bytes_on_disk: u64,
    /// Why it cannot be loaded as it is; None when it can.
    pub problem: Option<String>,
}

/// The cache's models, then the folders' (and single-file checkpoints'), each checked for what
/// an edit needs.
pub fn list_catalog(hub: &HubSettings, folders: &[PathBuf]) -> Vec<CatalogEntry> {
    let mut entries: Vec<CatalogEntry> = list_cached_models(hub)
        .into_iter()
        .map(|model| {
            let problem = match model.preferred_snapshot() {
                Some(snapshot) if snapshot.check.is_loadable() => None,
                Some(snapshot) => Some(
                    snapshot
                        .check
                        .problem
                        .clone()
                        .unwrap_or_else(|| "incomplete".into()),
                ),
                None if model.partial_downloads > 0 => Some("download not finished".into()),
                None => Some(
                    model
                        .problems
                        .first()
                        .cloned()
                        .unwrap_or_else(|| "nothing downloaded".into()),
                ),
            };
            CatalogEntry {
                spec: model.repo_id,
                source: "Hugging Face cache",
                bytes_on_disk: model.bytes_on_disk,
                problem,
            }
        })
        .collect();
    for folder in folders {
        if folder.is_file() {
            let (bytes_on_disk, problem) = inspect_single_file(folder);
            entries.push(CatalogEntry {
                spec: folder.display().to_string(),
                source: "single file",
                bytes_on_disk,
                problem,
            });
            continue;
        }
        let entry = match inspect_folder(folder) {
            Ok(local) => CatalogEntry {
                spec: folder.display().to_string(),
                source: "folder",
                bytes_on_disk: local.bytes_on_disk,
                problem: (!local.check.is_loadable()).then(|| {
                    local
                        .check
                        .problem
                        .clone()
                        .unwrap_or_else(|| "incomplete".into())
                }),
            },
            Err(e) => CatalogEntry {
                spec: folder.display().to_string(),
                source: "folder",
                bytes_on_disk: 0,
                problem: Some(e.to_string()),
            },
        };
        entries.push(entry);
    }
    entries
}

/// Whether `spec` can be loaded without a download: a local folder, or a Hub repo whose revision
/// is already in the cache.
pub fn model_at_hand(spec: &str, hub: &HubSettings) -> bool {
    match ModelSpec::parse(spec, None) {
        Ok(ModelSpec::LocalDir(dir)) => dir.is_dir(),
        // Its configs come from the default model, or a given config folder, at load.
        Ok(ModelSpec::SingleFile(file)) => file.is_file(),
        Ok(ModelSpec::Hub { repo_id, revision }) => {
            cached_snapshot(hub, &repo_id, &revision).is_some()
        }
        Err(_) => false,
    }
}
