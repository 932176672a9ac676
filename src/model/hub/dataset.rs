//! Hub datasets: the files of a dataset repo that the caller picks from its listing, fetched
//! into the Hugging Face cache as `huggingface-cli download --repo-type dataset` leaves them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use hf_hub::RepoType;

use super::download::{ListedTarget, Online, download_listed, list_online};
use super::settings::{HubSettings, resolve_cached_revision};
use super::{DownloadProgress, HubError, check_repo_and_revision};

/// Picks the files of a dataset repo to download from all its file names, or says why none
/// will do.
pub type DatasetFileChoice = dyn Fn(&BTreeSet<String>) -> Result<Vec<String>, String>;

/// Makes the files of Hub dataset `repo_id` at `revision` that `choose` picks from the repo's
/// listing (`/api/datasets/{repo}/revision/{rev}`) present in the Hugging Face cache, as
/// `huggingface-cli download --repo-type dataset` leaves them (`datasets--owner--name/snapshots/
/// <commit>/`, `refs/<revision>`), and returns the snapshot folder. `choose` gets every file name
/// of the repo and returns those to fetch, or why none will do. Files already in the snapshot are
/// not downloaded again; progress and cancelling work as for [`super::fetch_model_with_cancel`].
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
    check_repo_and_revision(repo_id, revision)?;
    let repo_dir = settings.dataset_cache_dir(repo_id);
    let (client, listing) =
        match list_online(repo_id, revision, RepoType::Dataset, settings, cancel)? {
            Online::Listed { client, listing } => (client, listing),
            Online::CacheOnly(why) => {
                return resolve_cached_revision(&repo_dir, revision)
                    .map(|(_, snapshot)| snapshot)
                    .map_err(|detail| HubError::NotCached {
                        repo: format!("dataset {repo_id}"),
                        revision: revision.to_string(),
                        cache_dir: settings.cache_dir.clone(),
                        detail,
                        why: format!(" ({why})"),
                    });
            }
        };
    let endpoint = settings.endpoint.clone();
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
    download_listed(
        target,
        &client,
        listing,
        missing,
        progress,
        cancel,
        |source| {
            chosen
                .iter()
                .try_for_each(|file| match source.fetch(file)? {
                    true => Ok(()),
                    false => Err(HubError::MissingFile {
                        location: source.location(),
                        file: file.clone(),
                    }),
                })
        },
    )
}
