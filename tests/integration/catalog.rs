//! The model catalog: Hugging Face cache trees built by hand in a temp folder (links, plain
//! files, broken entries) and a real cache filled through the fake Hub (including a cancelled,
//! half-downloaded repo), and the committed fixture pipelines as local folders.
//!
//! Expected values are derived from the trees the tests build (sizes from the bytes written),
//! never typed in.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use common::fake_hub::{FakeHub, FakeRepo, content_etag};
use common::{copy_dir, fixture_pipeline};
use instruct_pix2pix::model::catalog::{
    CachedModel, CatalogError, INSTRUCT_PIX2PIX_PIPELINE, inspect_folder, list_cached_models,
};
use instruct_pix2pix::model::hub::{
    DownloadProgress, HubError, HubSettings, ModelSpec, Variant, fetch_model,
    fetch_model_with_cancel,
};

const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn settings(cache: &Path) -> HubSettings {
    HubSettings {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: true,
    }
}

fn write(path: &Path, content: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, content).expect("write");
}

/// Puts every file of `pipeline` into `repo_dir` as huggingface_hub does: content in
/// `blobs/<etag>`, `snapshots/<sha>/<path>` a relative link to it. Returns the blob bytes.
#[cfg(unix)]
fn cache_pipeline(repo_dir: &Path, sha: &str, pipeline: &Path) -> u64 {
    let repo = FakeRepo::from_folder("x/y", sha, pipeline);
    let mut bytes = 0;
    for (path, content) in &repo.files {
        let etag = content_etag(content);
        let blob = repo_dir.join("blobs").join(&etag);
        if !blob.exists() {
            write(&blob, content);
            bytes += content.len() as u64;
        }
        let link = repo_dir.join("snapshots").join(sha).join(path);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("mkdir");
        let depth = path.matches('/').count() + 2;
        let target = format!("{}blobs/{etag}", "../".repeat(depth));
        std::os::unix::fs::symlink(target, &link).expect("symlink");
    }
    bytes
}

fn find<'m>(models: &'m [CachedModel], repo_id: &str) -> &'m CachedModel {
    models
        .iter()
        .find(|m| m.repo_id == repo_id)
        .unwrap_or_else(|| panic!("{repo_id} not listed in {models:#?}"))
}

#[test]
fn local_fixture_folders_are_inspected() {
    let ip2p = inspect_folder(&fixture_pipeline("sd1-tiny")).expect("inspect");
    assert!(ip2p.check.is_pipeline);
    assert!(ip2p.check.is_instruct_pix2pix);
    assert_eq!(
        ip2p.check.class_name.as_deref(),
        Some(INSTRUCT_PIX2PIX_PIPELINE)
    );
    assert_eq!(ip2p.check.unet_in_channels, Some(8));
    assert_eq!(ip2p.check.problem, None);
    assert_eq!(ip2p.check.fp16_problem, None);
    assert!(ip2p.check.is_loadable());
    let sizes: u64 = FakeRepo::from_folder("x/y", SHA_A, &fixture_pipeline("sd1-tiny"))
        .files
        .values()
        .map(|c| c.len() as u64)
        .sum();
    assert_eq!(ip2p.bytes_on_disk, sizes);

    let plain = inspect_folder(&fixture_pipeline("sd-plain-4ch")).expect("inspect");
    assert!(plain.check.is_pipeline);
    assert!(!plain.check.is_instruct_pix2pix);
    assert_eq!(plain.check.unet_in_channels, Some(4));
    assert_eq!(
        plain.check.problem.as_deref(),
        Some("not an InstructPix2Pix model: UNet has 4 input channels")
    );
    assert!(!plain.check.is_loadable());

    let tmp = tempfile::tempdir().expect("temp dir");
    let missing = tmp.path().join("nothing");
    assert!(matches!(
        inspect_folder(&missing),
        Err(CatalogError::Missing { path }) if path == missing
    ));
    let file = tmp.path().join("file");
    write(&file, b"x");
    let err = inspect_folder(&file).expect_err("a file");
    assert!(matches!(err, CatalogError::NotAFolder { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{} is a file, not a model folder", file.display())
    );

    // A folder of something else is listed as such, not an error.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let other = inspect_folder(&empty).expect("inspect");
    assert!(!other.check.is_pipeline);
    assert_eq!(
        other.check.problem.as_deref(),
        Some("not a diffusers pipeline: no model_index.json")
    );
}

#[test]
fn a_local_folder_missing_its_unet_weights_says_so() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let folder = tmp.path().join("model");
    copy_dir(&fixture_pipeline("sd1-tiny"), &folder);
    std::fs::remove_file(folder.join("unet/diffusion_pytorch_model.safetensors")).expect("rm");
    let model = inspect_folder(&folder).expect("inspect");
    assert!(model.check.is_instruct_pix2pix);
    // The float32 load has no UNet weights; float16 falls back to the fp16 file, still present.
    assert_eq!(model.check.problem.as_deref(), Some("unet weights missing"));
    assert_eq!(model.check.fp16_problem, None);

    std::fs::remove_file(folder.join("tokenizer/merges.txt")).expect("rm");
    let model = inspect_folder(&folder).expect("inspect");
    assert!(
        model
            .check
            .fp16_problem
            .as_deref()
            .is_some_and(|p| p.contains("tokenizer/merges.txt")),
        "{:?}",
        model.check
    );
}

#[cfg(unix)]
#[test]
fn hand_built_cache_trees_are_listed_with_their_problems() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path();

    // A complete InstructPix2Pix repo with two snapshots sharing most blobs.
    let good = cache.join("models--owner--good");
    let mut good_bytes = cache_pipeline(&good, SHA_A, &fixture_pipeline("sd1-tiny-ancestral"));
    good_bytes += cache_pipeline(&good, SHA_B, &fixture_pipeline("sd1-tiny"));
    write(&good.join("refs/main"), SHA_B.as_bytes());
    write(&good.join("refs/pr/1"), format!("{SHA_A}\n").as_bytes());
    write(&good.join("blobs/deadbeef.part"), &[0u8; 100]);
    good_bytes += 100;

    // A plain Stable Diffusion repo written as plain files (no links).
    let plain = cache.join("models--owner--plain");
    copy_dir(
        &fixture_pipeline("sd-plain-4ch"),
        &plain.join("snapshots").join(SHA_A),
    );
    write(&plain.join("refs/main"), SHA_A.as_bytes());
    let plain_bytes = inspect_folder(&plain.join("snapshots").join(SHA_A))
        .expect("inspect")
        .bytes_on_disk;

    // A repo whose UNet blob was deleted: a dangling link.
    let dangling = cache.join("models--owner--dangling");
    cache_pipeline(&dangling, SHA_A, &fixture_pipeline("sd1-tiny-ancestral"));
    write(&dangling.join("refs/main"), SHA_A.as_bytes());
    let unet_link = dangling
        .join("snapshots")
        .join(SHA_A)
        .join("unet/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(std::fs::canonicalize(&unet_link).expect("blob")).expect("rm blob");

    // Broken JSON, a file for a repo folder, a repo with no snapshots, a ref to nowhere.
    let broken = cache.join("models--owner--broken-json");
    cache_pipeline(&broken, SHA_A, &fixture_pipeline("sd1-tiny-ancestral"));
    let index = broken
        .join("snapshots")
        .join(SHA_A)
        .join("model_index.json");
    std::fs::remove_file(&index).expect("rm link");
    write(&index, b"{ not json");
    write(&cache.join("models--owner--a-file"), b"oops");
    write(
        &cache.join("models--owner--no-snapshots/refs/main"),
        SHA_A.as_bytes(),
    );
    // Not model repos: ignored.
    std::fs::create_dir_all(cache.join("datasets--owner--data/snapshots")).expect("mkdir");
    std::fs::create_dir_all(cache.join(".locks/models--owner--good")).expect("mkdir");

    let models = list_cached_models(&settings(cache));
    let ids: Vec<&str> = models.iter().map(|m| m.repo_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "owner/a-file",
            "owner/broken-json",
            "owner/dangling",
            "owner/good",
            "owner/no-snapshots",
            "owner/plain"
        ]
    );
    assert_eq!(
        models,
        list_cached_models(&settings(cache)),
        "deterministic"
    );

    let m = find(&models, "owner/good");
    assert_eq!(m.cache_folder, good);
    let revisions: Vec<(&str, &str)> = m
        .revisions
        .iter()
        .map(|r| (r.name.as_str(), r.commit.as_str()))
        .collect();
    assert_eq!(revisions, [("main", SHA_B), ("pr/1", SHA_A)]);
    assert_eq!(m.snapshots.len(), 2);
    assert_eq!(m.snapshots[0].commit, SHA_A);
    assert_eq!(m.snapshots[0].revisions, ["pr/1"]);
    assert_eq!(m.snapshots[1].revisions, ["main"]);
    assert_eq!(m.bytes_on_disk, good_bytes, "shared blobs counted once");
    assert_eq!(m.partial_downloads, 1);
    assert!(m.problems.is_empty(), "{:?}", m.problems);
    for snapshot in &m.snapshots {
        assert!(snapshot.check.is_instruct_pix2pix);
        assert_eq!(snapshot.check.problem, None, "{}", snapshot.commit);
        assert!(snapshot.dangling_links.is_empty());
    }
    let preferred = m.preferred_snapshot().expect("a snapshot");
    assert_eq!(preferred.commit, SHA_B);
    assert_eq!(preferred.folder, good.join("snapshots").join(SHA_B));
    assert_eq!(
        m.snapshot_for("pr/1").map(|s| s.commit.as_str()),
        Some(SHA_A)
    );
    assert_eq!(
        m.snapshot_for(SHA_A).map(|s| s.commit.as_str()),
        Some(SHA_A)
    );
    assert!(m.snapshot_for("dev").is_none());

    let m = find(&models, "owner/plain");
    assert_eq!(m.bytes_on_disk, plain_bytes, "plain snapshot files count");
    assert_eq!(
        m.snapshots[0].check.problem.as_deref(),
        Some("not an InstructPix2Pix model: UNet has 4 input channels")
    );

    let m = find(&models, "owner/dangling");
    assert_eq!(
        m.snapshots[0].dangling_links,
        ["unet/diffusion_pytorch_model.safetensors"]
    );
    assert_eq!(
        m.snapshots[0].check.problem.as_deref(),
        Some("unet weights missing")
    );
    assert!(m.snapshots[0].check.is_instruct_pix2pix);

    let m = find(&models, "owner/broken-json");
    let problem = m.snapshots[0].check.problem.clone().unwrap_or_default();
    assert!(
        problem.starts_with("model_index.json is unreadable"),
        "{problem}"
    );
    // The UNet config still says what it is.
    assert!(m.snapshots[0].check.is_instruct_pix2pix);

    let m = find(&models, "owner/a-file");
    assert_eq!(m.problems, ["the cache entry is a file, not a folder"]);
    assert!(m.snapshots.is_empty());

    let m = find(&models, "owner/no-snapshots");
    assert_eq!(
        m.problems,
        [
            "no snapshots folder: nothing of it is downloaded".to_string(),
            format!("refs/main points to commit {SHA_A} whose snapshot is missing"),
        ]
    );
}

#[test]
fn an_empty_or_missing_cache_lists_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    assert!(list_cached_models(&settings(tmp.path())).is_empty());
    assert!(list_cached_models(&settings(&tmp.path().join("absent"))).is_empty());
}

#[test]
fn a_cache_filled_through_the_hub_lists_complete_and_cancelled_repos() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path().join("hub");
    let complete = FakeRepo::from_folder(
        "tester/complete",
        SHA_A,
        &fixture_pipeline("sd1-tiny-ancestral"),
    );
    let partial = FakeRepo::from_folder(
        "tester/partial",
        SHA_B,
        &fixture_pipeline("sd1-tiny-ancestral"),
    );
    let hub = FakeHub::start(vec![complete.clone(), partial]);
    let online = HubSettings {
        endpoint: hub.endpoint.clone(),
        offline: false,
        ..settings(&cache)
    };
    let spec = |repo: &str| ModelSpec::parse(repo, None).expect("repo id");
    let snapshot = fetch_model(
        &spec("tester/complete"),
        Variant::Default,
        &online,
        &mut |_: &DownloadProgress| {},
    )
    .expect("download");
    let cancel = AtomicBool::new(false);
    let err = fetch_model_with_cancel(
        &spec("tester/partial"),
        Variant::Default,
        &online,
        &mut |p: &DownloadProgress| {
            if p.file == "unet/diffusion_pytorch_model.safetensors" && p.bytes_done > 0 {
                cancel.store(true, Ordering::SeqCst);
            }
        },
        &cancel,
    )
    .expect_err("cancelled");
    assert!(matches!(err, HubError::Cancelled { .. }), "{err:?}");

    let models = list_cached_models(&settings(&cache));
    assert_eq!(models.len(), 2);
    let m = find(&models, "tester/complete");
    assert_eq!(m.revisions.len(), 1);
    assert_eq!(
        (m.revisions[0].name.as_str(), m.revisions[0].commit.as_str()),
        ("main", SHA_A)
    );
    let s = m.preferred_snapshot().expect("snapshot");
    assert_eq!(s.folder, snapshot);
    assert_eq!(s.check.problem, None);
    assert!(s.check.is_instruct_pix2pix && s.check.is_pipeline);
    // Blobs hold exactly the files an edit needs, each once.
    let needed: u64 = complete.files.values().map(|c| c.len() as u64).sum();
    assert_eq!(m.bytes_on_disk, needed);
    assert_eq!(m.partial_downloads, 0);

    // The cancelled one: no ref yet, its snapshot lacks the UNet, one resumable part.
    let m = find(&models, "tester/partial");
    assert!(m.revisions.is_empty());
    assert_eq!(m.partial_downloads, 1);
    assert_eq!(m.snapshots.len(), 1);
    assert_eq!(
        m.snapshots[0].check.problem.as_deref(),
        Some("unet weights missing")
    );
    assert!(m.snapshots[0].dangling_links.is_empty());
    assert_eq!(
        m.preferred_snapshot().map(|s| s.commit.as_str()),
        Some(SHA_B)
    );
}
