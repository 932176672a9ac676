//! Finding and loading models: Hub downloads into a real-layout Hugging Face cache through a
//! fake Hub on 127.0.0.1, offline resolution from that cache and from a hand-built one, variant
//! choice, the error messages (404, 401, offline miss, truncated safetensors, malformed config,
//! incomplete folders), and loading the chosen weights with candle.
//!
//! Weight values are compared exactly: the loaded bytes must be the bytes written (f32), or
//! their f16 rounding for the fp16 variant, so any tolerance would hide a wrong file.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};
use common::fake_hub::{FakeHub, FakeRepo, content_etag};
use common::pipeline::{
    Tensors, needed_default, pipeline_files, text_encoder_tensors, unet_tensors, vae_shards,
    write_files,
};
use instruct_pix2pix::model::config::{ConfigError, ModelIndex};
use instruct_pix2pix::model::hub::{
    DownloadProgress, HubError, HubSettings, ModelSpec, Variant, fetch_model,
    fetch_model_with_cancel,
};
use instruct_pix2pix::model::weights::{
    DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, WeightsError, component_weights,
    component_weights_detailed, var_builder,
};

const REPO: &str = "tester/tiny-pix2pix";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn fake_repo() -> FakeRepo {
    FakeRepo {
        repo_id: REPO.to_string(),
        sha: SHA.to_string(),
        files: pipeline_files(),
        token: None,
    }
}

fn settings(endpoint: &str, cache: &Path) -> HubSettings {
    HubSettings {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
    }
}

fn hub_spec(repo: &str) -> ModelSpec {
    ModelSpec::parse(repo, None).expect("a repo id")
}

/// An endpoint on a port nothing listens on (bound, then released).
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

fn no_progress() -> impl FnMut(&DownloadProgress) {
    |_: &DownloadProgress| {}
}

/// Loads every tensor of `expected` through `var_builder` and compares values exactly, after
/// rounding the expected values through `stored` (the dtype the file holds).
fn assert_weights(files: &[PathBuf], expected: &Tensors, stored: DType) {
    let vb = var_builder(files, DType::F32, &Device::Cpu).expect("weights load");
    for (name, shape, data) in expected {
        let got: Vec<f32> = vb
            .get(shape.as_slice(), name)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("tensor present with its shape");
        let want: Vec<f32> = Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_dtype(stored))
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("expected values");
        assert_eq!(got, want, "{name}");
    }
}

fn repo_dir(cache: &Path) -> PathBuf {
    cache.join("models--tester--tiny-pix2pix")
}

#[test]
fn download_into_cache_then_offline_without_server() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path().join("hub");
    let hub = FakeHub::start(vec![fake_repo()]);
    let mut events: Vec<DownloadProgress> = Vec::new();
    let snapshot = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &settings(&hub.endpoint, &cache),
        &mut |p: &DownloadProgress| events.push(p.clone()),
    )
    .expect("download succeeds");

    // The real cache layout: snapshots/<commit>, refs/main → commit, blobs named by etag.
    assert_eq!(snapshot, repo_dir(&cache).join("snapshots").join(SHA));
    let main_ref = std::fs::read_to_string(repo_dir(&cache).join("refs/main")).expect("refs/main");
    assert_eq!(main_ref, SHA);
    assert!(
        !repo_dir(&cache).join("refs").join(SHA).exists(),
        "no ref named by the commit"
    );
    let files = pipeline_files();
    for needed in needed_default() {
        let link = snapshot.join(needed);
        let content = std::fs::read(&link).expect(needed);
        assert_eq!(content, files[needed], "{needed}");
        let blob = repo_dir(&cache)
            .join("blobs")
            .join(content_etag(&files[needed]));
        assert!(blob.is_file(), "blob of {needed}");
        #[cfg(unix)]
        assert_eq!(
            std::fs::canonicalize(&link).expect("resolves"),
            std::fs::canonicalize(&blob).expect("blob"),
            "{needed} links to its blob"
        );
    }

    // Only what an edit needs was downloaded, each once.
    let mut downloaded = hub.resolved_files();
    downloaded.sort();
    downloaded.dedup();
    let mut expected: Vec<String> = needed_default().iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(downloaded, expected);

    // Progress ends at the full size for every downloaded file.
    for needed in needed_default() {
        let last = events
            .iter()
            .rev()
            .find(|e| e.file == needed)
            .unwrap_or_else(|| panic!("no progress for {needed}"));
        let size = files[needed].len() as u64;
        assert_eq!(
            (last.bytes_done, last.bytes_total),
            (size, size),
            "{needed}"
        );
    }

    // A second fetch lists the repo but downloads nothing.
    hub.clear_log();
    let again = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &settings(&hub.endpoint, &cache),
        &mut no_progress(),
    )
    .expect("cached");
    assert_eq!(again, snapshot);
    assert_eq!(
        hub.requests(),
        vec![format!("GET /api/models/{REPO}/revision/main?blobs=true")]
    );

    // Offline: no request at all, even with the server still up.
    hub.clear_log();
    let mut offline = settings(&hub.endpoint, &cache);
    offline.offline = true;
    let from_cache = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &offline,
        &mut no_progress(),
    )
    .expect("offline from cache");
    assert_eq!(from_cache, snapshot);
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());

    // Offline without the server.
    drop(hub);
    let offline = HubSettings {
        endpoint: dead_endpoint(),
        ..offline
    };
    let from_cache = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &offline,
        &mut no_progress(),
    )
    .expect("offline from cache");
    assert_eq!(from_cache, snapshot);

    // The cached weights load and hold the published values.
    let unet = component_weights(&snapshot.join("unet"), DIFFUSERS_WEIGHTS, Variant::Default)
        .expect("unet weights");
    assert_eq!(
        unet,
        [snapshot.join("unet/diffusion_pytorch_model.safetensors")]
    );
    assert_weights(&unet, &unet_tensors(), DType::F32);
    let vae = component_weights(&snapshot.join("vae"), DIFFUSERS_WEIGHTS, Variant::Default)
        .expect("sharded vae weights");
    assert_eq!(vae.len(), 2);
    let [shard1, shard2] = vae_shards();
    assert_weights(&vae, &[shard1, shard2].concat(), DType::F32);
    let index = ModelIndex::read(&snapshot).expect("model_index.json");
    assert_eq!(index.class_name, "StableDiffusionInstructPix2PixPipeline");

    // The Hub unreachable (not offline): a fully cached model is still used.
    let unreachable = HubSettings {
        offline: false,
        ..offline.clone()
    };
    let from_cache = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &unreachable,
        &mut no_progress(),
    )
    .expect("unreachable Hub falls back to the cache");
    assert_eq!(from_cache, snapshot);

    // Offline, fp16 asked for but only the default files cached: the cached files serve, and
    // the loader's note says so (diffusers too uses what the local snapshot has).
    let fp16 = fetch_model(&hub_spec(REPO), Variant::Fp16, &offline, &mut no_progress())
        .expect("default weights serve an fp16 request offline");
    assert_eq!(fp16, snapshot);
    let unet = component_weights_detailed(&fp16.join("unet"), DIFFUSERS_WEIGHTS, Variant::Fp16)
        .expect("unet");
    assert_eq!(unet.variant, Variant::Default);
    assert!(unet.fallback_note.is_some());

    // A file missing from the snapshot: the error names repo and file.
    std::fs::remove_file(snapshot.join("scheduler/scheduler_config.json")).expect("rm");
    let err = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &offline,
        &mut no_progress(),
    )
    .expect_err("scheduler config not cached");
    let message = err.to_string();
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");
    assert!(message.contains(REPO), "{message}");
    assert!(
        message.contains("scheduler/scheduler_config.json is not cached"),
        "{message}"
    );
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
}

#[test]
fn interrupted_download_resumes_from_its_part_file() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let hub = FakeHub::start(vec![fake_repo()]);
    let files = pipeline_files();
    let unet_file = "unet/diffusion_pytorch_model.safetensors";
    let content = &files[unet_file];
    let etag = content_etag(content);
    // What hf-hub leaves behind when a download is cut: blobs/<etag>.part with the first bytes.
    let blobs = repo_dir(tmp.path()).join("blobs");
    std::fs::create_dir_all(&blobs).expect("blobs");
    let half = content.len() / 2;
    std::fs::write(blobs.join(format!("{etag}.part")), &content[..half]).expect("part file");

    let mut events: Vec<DownloadProgress> = Vec::new();
    let snapshot = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &settings(&hub.endpoint, tmp.path()),
        &mut |p: &DownloadProgress| events.push(p.clone()),
    )
    .expect("download resumes");
    assert_eq!(
        std::fs::read(snapshot.join(unet_file)).expect("unet"),
        *content
    );
    let content_requests: Vec<String> = hub
        .requests()
        .into_iter()
        .filter(|r| r.starts_with(&format!("CDN GET /cdn/{etag} ")) && !r.ends_with("bytes=0-0"))
        .collect();
    assert_eq!(
        content_requests,
        [format!("CDN GET /cdn/{etag} bytes={half}-")]
    );
    let unet_events: Vec<u64> = events
        .iter()
        .filter(|e| e.file == unet_file)
        .map(|e| e.bytes_done)
        .collect();
    assert_eq!(unet_events.first(), Some(&(half as u64)), "{unet_events:?}");
    assert_eq!(unet_events.last(), Some(&(content.len() as u64)));
    assert!(!blobs.join(format!("{etag}.part")).exists());
}

#[test]
fn offline_with_empty_cache_names_the_repo() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut offline = settings(&dead_endpoint(), tmp.path());
    offline.offline = true;
    let err = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &offline,
        &mut no_progress(),
    )
    .expect_err("nothing cached");
    let message = err.to_string();
    assert!(message.contains(REPO), "{message}");
    assert!(message.contains("revision main"), "{message}");
    assert!(message.contains("HF_HUB_OFFLINE is set"), "{message}");

    // Not offline but unreachable, and not cached: the network failure is reported.
    let unreachable = settings(&dead_endpoint(), tmp.path());
    let err = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &unreachable,
        &mut no_progress(),
    )
    .expect_err("nothing cached, no Hub");
    let message = err.to_string();
    assert!(message.contains("could not be reached"), "{message}");
    assert!(message.contains(&unreachable.endpoint), "{message}");
}

/// Lays a repo out as huggingface_hub does: blobs named by etag, snapshot entries as relative
/// symlinks into blobs, `refs/main` holding the commit without a newline.
fn hand_built_cache(cache: &Path, repo_folder: &str, sha: &str, files: &BTreeMap<String, Vec<u8>>) {
    let repo = cache.join(repo_folder);
    std::fs::create_dir_all(repo.join("blobs")).expect("blobs");
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs/main"), sha).expect("ref");
    for (path, content) in files {
        let etag = content_etag(content);
        std::fs::write(repo.join("blobs").join(&etag), content).expect("blob");
        let link = repo.join("snapshots").join(sha).join(path);
        std::fs::create_dir_all(link.parent().expect("parent")).expect("snapshot dir");
        let depth = path.matches('/').count() + 2;
        let target: PathBuf = std::iter::repeat_n("..", depth)
            .collect::<PathBuf>()
            .join("blobs")
            .join(&etag);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        #[cfg(not(unix))]
        std::fs::write(&link, content).expect("copy");
    }
}

#[test]
fn hand_built_cache_is_found_without_a_server() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path().join("hub");
    let files: BTreeMap<String, Vec<u8>> = pipeline_files()
        .into_iter()
        .filter(|(path, _)| needed_default().contains(&path.as_str()))
        .collect();
    let sha = "fedcba9876543210fedcba9876543210fedcba98";
    hand_built_cache(&cache, "models--someone--cached-pix2pix", sha, &files);

    let mut offline = settings(&dead_endpoint(), &cache);
    offline.offline = true;
    let expected = cache
        .join("models--someone--cached-pix2pix/snapshots")
        .join(sha);
    let found = fetch_model(
        &hub_spec("someone/cached-pix2pix"),
        Variant::Default,
        &offline,
        &mut no_progress(),
    )
    .expect("hand-built cache found offline");
    assert_eq!(found, expected);

    // A commit hash as revision needs no ref.
    let by_commit = ModelSpec::parse("someone/cached-pix2pix", Some(sha)).expect("spec");
    let found = fetch_model(&by_commit, Variant::Default, &offline, &mut no_progress())
        .expect("found by commit");
    assert_eq!(found, expected);

    // Online with the Hub unreachable, the cache serves too.
    offline.offline = false;
    let found = fetch_model(
        &hub_spec("someone/cached-pix2pix"),
        Variant::Default,
        &offline,
        &mut no_progress(),
    )
    .expect("found with the Hub down");
    assert_eq!(found, expected);

    let te = component_weights(
        &found.join("text_encoder"),
        TRANSFORMERS_WEIGHTS,
        Variant::Default,
    )
    .expect("text encoder weights");
    assert_weights(&te, &text_encoder_tensors(), DType::F32);

    // An unknown branch is not in the cache.
    offline.offline = true;
    let dev = ModelSpec::parse("someone/cached-pix2pix", Some("dev")).expect("spec");
    let err =
        fetch_model(&dev, Variant::Default, &offline, &mut no_progress()).expect_err("no refs/dev");
    assert!(err.to_string().contains("no ref for revision dev"), "{err}");
}

#[test]
fn fp16_variant_is_downloaded_and_falls_back_per_component() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let hub = FakeHub::start(vec![fake_repo()]);
    let snapshot = fetch_model(
        &hub_spec(REPO),
        Variant::Fp16,
        &settings(&hub.endpoint, tmp.path()),
        &mut no_progress(),
    )
    .expect("fp16 download");
    let downloaded = hub.resolved_files();
    assert!(downloaded.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
    assert!(downloaded.contains(&"text_encoder/model.fp16.safetensors".to_string()));
    assert!(
        !downloaded.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()),
        "the default UNet weights are not needed: {downloaded:?}"
    );
    // The VAE has no fp16 files: its default shards are used.
    assert!(
        downloaded.contains(&"vae/diffusion_pytorch_model-00001-of-00002.safetensors".to_string())
    );

    let unet = component_weights_detailed(&snapshot.join("unet"), DIFFUSERS_WEIGHTS, Variant::Fp16)
        .expect("unet");
    assert_eq!(unet.variant, Variant::Fp16);
    assert_eq!(unet.fallback_note, None);
    assert_eq!(
        unet.files,
        [snapshot.join("unet/diffusion_pytorch_model.fp16.safetensors")]
    );
    assert_weights(&unet.files, &unet_tensors(), DType::F16);

    let vae = component_weights_detailed(&snapshot.join("vae"), DIFFUSERS_WEIGHTS, Variant::Fp16)
        .expect("vae");
    assert_eq!(vae.variant, Variant::Default);
    let note = vae.fallback_note.expect("a fallback note");
    assert!(note.contains("no fp16 weights"), "{note}");
}

#[test]
fn unknown_repo_and_revision_say_so() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let hub = FakeHub::start(vec![fake_repo()]);
    let s = settings(&hub.endpoint, tmp.path());
    let err = fetch_model(
        &hub_spec("nobody/nothing"),
        Variant::Default,
        &s,
        &mut no_progress(),
    )
    .expect_err("404");
    assert!(matches!(err, HubError::RepoNotFound { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "repository nobody/nothing not found on {}",
            hub.endpoint
        )),
        "{message}"
    );
    assert!(message.contains("HF_TOKEN"), "{message}");

    let spec = ModelSpec::parse(REPO, Some("no-such-branch")).expect("spec");
    let err = fetch_model(&spec, Variant::Default, &s, &mut no_progress()).expect_err("404");
    assert_eq!(
        err.to_string(),
        format!(
            "revision no-such-branch not found in repository {REPO} on {}",
            hub.endpoint
        )
    );
    // Nothing was written for either.
    assert!(!repo_dir(tmp.path()).join("snapshots").exists());
}

#[test]
fn private_repo_needs_a_token() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut repo = fake_repo();
    repo.token = Some("hf_secret".to_string());
    let hub = FakeHub::start(vec![repo]);
    let mut s = settings(&hub.endpoint, tmp.path());

    let err = fetch_model(&hub_spec(REPO), Variant::Default, &s, &mut no_progress())
        .expect_err("401 without a token");
    let message = err.to_string();
    assert!(
        matches!(err, HubError::Unauthorized { status: 401, .. }),
        "{err:?}"
    );
    assert!(message.contains(REPO), "{message}");
    assert!(message.contains("set HF_TOKEN"), "{message}");

    s.token = Some("hf_wrong".to_string());
    let err = fetch_model(&hub_spec(REPO), Variant::Default, &s, &mut no_progress())
        .expect_err("401 with a wrong token");
    assert!(err.to_string().contains("token given"), "{err}");

    s.token = Some("hf_secret".to_string());
    let snapshot = fetch_model(&hub_spec(REPO), Variant::Default, &s, &mut no_progress())
        .expect("the right token downloads");
    assert!(
        snapshot
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
}

#[test]
fn truncated_safetensors_is_reported_before_loading() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let files = pipeline_files();
    let path = tmp.path().join("diffusion_pytorch_model.safetensors");
    let full = &files["unet/diffusion_pytorch_model.safetensors"];
    std::fs::write(&path, &full[..full.len() - 10]).expect("write");
    let err = var_builder(std::slice::from_ref(&path), DType::F32, &Device::Cpu)
        .err()
        .expect("truncated");
    assert!(matches!(err, WeightsError::Truncated { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{} is truncated: ", path.display())),
        "{message}"
    );
    assert!(message.contains("(10 missing)"), "{message}");

    // Cut inside the header too.
    std::fs::write(&path, &full[..20]).expect("write");
    let err = var_builder(std::slice::from_ref(&path), DType::F32, &Device::Cpu)
        .err()
        .expect("truncated header");
    assert!(
        err.to_string().contains("is truncated: the header needs"),
        "{err}"
    );

    // Trailing garbage is not a truncation but still refused before candle sees it.
    let mut longer = full.clone();
    longer.extend_from_slice(b"junk");
    std::fs::write(&path, &longer).expect("write");
    let err = var_builder(std::slice::from_ref(&path), DType::F32, &Device::Cpu)
        .err()
        .expect("trailing bytes");
    assert!(err.to_string().contains("4 unexpected bytes"), "{err}");
}

#[test]
fn malformed_config_names_file_line_and_column() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut files = pipeline_files();
    files.insert(
        "unet/config.json".to_string(),
        b"{\n  \"in_channels\": 8,\n  \"out_channels\": 4,,\n}".to_vec(),
    );
    write_files(tmp.path(), &files);
    let spec = ModelSpec::parse(&tmp.path().display().to_string(), None).expect("a folder");
    let err = fetch_model(
        &spec,
        Variant::Default,
        &settings("", tmp.path()),
        &mut no_progress(),
    )
    .expect_err("bad config");
    assert!(
        matches!(err, HubError::Config(ConfigError::Malformed { .. })),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&tmp.path().join("unet/config.json").display().to_string()),
        "{message}"
    );
    assert!(message.contains("line 3 column 21"), "{message}");
}

#[test]
fn local_folder_errors_name_what_is_missing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let s = settings("", tmp.path());
    let files = pipeline_files();

    // A complete folder is returned as is.
    let good = tmp.path().join("good");
    write_files(&good, &files);
    let spec = ModelSpec::parse(&good.display().to_string(), None).expect("folder");
    assert_eq!(spec, ModelSpec::LocalDir(good.clone()));
    assert_eq!(
        fetch_model(&spec, Variant::Default, &s, &mut no_progress()).expect("complete"),
        good
    );

    // No model_index.json.
    let plain = tmp.path().join("plain");
    std::fs::create_dir_all(&plain).expect("mkdir");
    let err = fetch_model(
        &ModelSpec::LocalDir(plain.clone()),
        Variant::Default,
        &s,
        &mut no_progress(),
    )
    .expect_err("not a pipeline");
    assert!(matches!(err, HubError::NotAPipeline { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&plain.display().to_string()),
        "{err}"
    );

    // No vae/ folder.
    let no_vae = tmp.path().join("no-vae");
    let without: BTreeMap<String, Vec<u8>> = files
        .iter()
        .filter(|(p, _)| !p.starts_with("vae/"))
        .map(|(p, c)| (p.clone(), c.clone()))
        .collect();
    write_files(&no_vae, &without);
    let err = fetch_model(
        &ModelSpec::LocalDir(no_vae.clone()),
        Variant::Default,
        &s,
        &mut no_progress(),
    )
    .expect_err("no vae");
    assert_eq!(
        err.to_string(),
        format!(
            "{} has no vae/ folder, which an edit needs",
            no_vae.display()
        )
    );

    // A shard named by the index is missing.
    let no_shard = tmp.path().join("no-shard");
    write_files(&no_shard, &files);
    std::fs::remove_file(no_shard.join("vae/diffusion_pytorch_model-00002-of-00002.safetensors"))
        .expect("rm");
    let err = fetch_model(
        &ModelSpec::LocalDir(no_shard.clone()),
        Variant::Default,
        &s,
        &mut no_progress(),
    )
    .expect_err("missing shard");
    assert!(
        err.to_string()
            .contains("has no vae/diffusion_pytorch_model-00002-of-00002.safetensors"),
        "{err}"
    );

    // No weights at all in text_encoder/.
    let no_weights = tmp.path().join("no-weights");
    write_files(&no_weights, &files);
    for name in [
        "model.safetensors",
        "model.fp16.safetensors",
        "pytorch_model.bin",
    ] {
        std::fs::remove_file(no_weights.join("text_encoder").join(name)).expect("rm");
    }
    let err = fetch_model(
        &ModelSpec::LocalDir(no_weights.clone()),
        Variant::Default,
        &s,
        &mut no_progress(),
    )
    .expect_err("no weights");
    let message = err.to_string();
    assert!(message.contains("no weights in text_encoder/"), "{message}");
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(message.contains("pytorch_model.bin"), "{message}");

    // A folder that does not exist.
    let err = ModelSpec::parse("./no/such/folder", None).expect_err("missing");
    assert_eq!(
        err.to_string(),
        "model folder ./no/such/folder does not exist"
    );
}

#[test]
fn model_spec_parsing() {
    assert_eq!(
        ModelSpec::parse("timbrooks/instruct-pix2pix", None).expect("repo id"),
        ModelSpec::Hub {
            repo_id: "timbrooks/instruct-pix2pix".to_string(),
            revision: "main".to_string()
        }
    );
    assert_eq!(ModelSpec::default(), hub_spec("timbrooks/instruct-pix2pix"));
    assert_eq!(
        ModelSpec::parse("a/b", Some("refs/pr/3")).expect("PR revision"),
        ModelSpec::Hub {
            repo_id: "a/b".to_string(),
            revision: "refs/pr/3".to_string()
        }
    );
    let err = ModelSpec::parse("instruct-pix2pix", None).expect_err("no owner");
    assert!(
        err.to_string()
            .contains("neither an existing folder nor a Hub repo id of the form owner/name"),
        "{err}"
    );
    if let Some(home) = std::env::home_dir() {
        let err = ModelSpec::parse("~/no-such-model-folder-7f3a", None).expect_err("missing");
        assert!(
            matches!(&err, HubError::LocalDirMissing { path } if *path == home.join("no-such-model-folder-7f3a")),
            "{err:?}"
        );
    }
    assert!(ModelSpec::parse("a/b c", None).is_err());
    assert!(ModelSpec::parse("a/b", Some("../../etc")).is_err());
    // A spec built by hand is checked too before any path is made from it.
    let tmp = tempfile::tempdir().expect("temp dir");
    let hand_made = ModelSpec::Hub {
        repo_id: "a/b".to_string(),
        revision: "../../../outside".to_string(),
    };
    let err = fetch_model(
        &hand_made,
        Variant::Default,
        &settings(&dead_endpoint(), tmp.path()),
        &mut no_progress(),
    )
    .expect_err("bad revision");
    assert!(matches!(err, HubError::InvalidRevision { .. }), "{err:?}");
    assert!(ModelSpec::parse("", None).is_err());
}

#[test]
fn settings_follow_the_huggingface_variables() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let home = tmp.path().join("home");
    let hf_home = tmp.path().join("hf");
    std::fs::create_dir_all(&hf_home).expect("mkdir");
    std::fs::write(hf_home.join("token"), "hf_from_file\n").expect("token file");

    let env = |vars: &[(&str, &str)]| {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubSettings::from_lookup(move |name| vars.get(name).cloned(), Some(home.clone()))
    };

    let defaults = env(&[]);
    assert_eq!(defaults.endpoint, "https://huggingface.co");
    assert_eq!(defaults.cache_dir, home.join(".cache/huggingface/hub"));
    assert_eq!(defaults.token, None);
    assert!(!defaults.offline);

    let hf_home_str = hf_home.display().to_string();
    let from_home = env(&[("HF_HOME", &hf_home_str), ("HF_HUB_OFFLINE", "1")]);
    assert_eq!(from_home.cache_dir, hf_home.join("hub"));
    assert_eq!(from_home.token.as_deref(), Some("hf_from_file"));
    assert!(from_home.offline);

    let explicit = env(&[
        ("HF_HOME", &hf_home_str),
        ("HF_HUB_CACHE", "/elsewhere/cache"),
        ("HF_TOKEN", "hf_from_env"),
        ("HF_ENDPOINT", "http://mirror.example/"),
        ("HF_HUB_OFFLINE", "0"),
    ]);
    assert_eq!(explicit.cache_dir, PathBuf::from("/elsewhere/cache"));
    assert_eq!(explicit.token.as_deref(), Some("hf_from_env"));
    assert_eq!(explicit.endpoint, "http://mirror.example");
    assert!(!explicit.offline);
    assert_eq!(
        explicit.repo_cache_dir("timbrooks/instruct-pix2pix"),
        PathBuf::from("/elsewhere/cache/models--timbrooks--instruct-pix2pix")
    );
    assert!(env(&[("HF_HUB_OFFLINE", "true")]).offline);
}

/// The `.bin` fallback against weights written by torch/diffusers themselves (see
/// tests/fixtures/scripts/load_bin_weights.py): every tensor loaded from the PyTorch pickles
/// (sharded by diffusers, and single-file) equals the same tensor loaded from the safetensors
/// copy, bit for bit.
#[test]
fn pytorch_bin_weights_match_their_safetensors_copy() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/load/bin");
    for (bin_dir, st_dir, base_name, expected_bin_files) in [
        ("vae_bin", "vae_st", DIFFUSERS_WEIGHTS, 3),
        (
            "text_encoder_bin",
            "text_encoder_st",
            TRANSFORMERS_WEIGHTS,
            1,
        ),
    ] {
        let bin = component_weights(&fixtures.join(bin_dir), base_name, Variant::Default)
            .expect("bin weights found");
        assert_eq!(bin.len(), expected_bin_files, "{bin_dir}: {bin:?}");
        assert!(
            bin.iter()
                .all(|p| p.extension().is_some_and(|e| e == "bin"))
        );
        let st = component_weights(&fixtures.join(st_dir), base_name, Variant::Default)
            .expect("safetensors weights found");
        let st_tensors = candle_core::safetensors::load(&st[0], &Device::Cpu).expect("load st");
        assert!(st_tensors.len() > 10, "{st_dir} has its tensors");
        let vb_bin = var_builder(&bin, DType::F32, &Device::Cpu).expect("bin loads");
        for (name, want) in &st_tensors {
            let got = vb_bin
                .get(want.shape(), name)
                .unwrap_or_else(|e| panic!("{bin_dir}: {name}: {e}"));
            let diff = (got - want)
                .and_then(|d| d.abs())
                .and_then(|d| d.flatten_all())
                .and_then(|d| d.max(0))
                .and_then(|d| d.to_scalar::<f32>())
                .expect("difference");
            assert_eq!(diff, 0.0, "{bin_dir}: {name}");
        }
    }
}

/// Not a test: serves the fake Hub for tests/fixtures/scripts/hf_cache_from_fake_hub.py, which
/// downloads from it with huggingface_hub itself to make the `hf_cache` fixture. Writes the
/// endpoint to `$FAKE_HUB_DIR/endpoint` and serves until `$FAKE_HUB_DIR/done` appears.
#[test]
#[ignore = "helper for a fixture script"]
fn serve_fake_hub_for_python() {
    let Some(dir) = std::env::var_os("FAKE_HUB_DIR").map(PathBuf::from) else {
        return;
    };
    let hub = FakeHub::start(vec![fake_repo()]);
    std::fs::write(dir.join("endpoint"), &hub.endpoint).expect("write endpoint");
    for _ in 0..1200 {
        if dir.join("done").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A cache written by huggingface_hub itself (hf_hub_download against the fake Hub; see
/// tests/fixtures/scripts/hf_cache_from_fake_hub.py): `.locks/`, `CACHEDIR.TAG`, relative
/// symlinks, `refs/main`. Read offline, its files are the published ones.
#[test]
fn cache_written_by_huggingface_hub_is_used_offline() {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/load/hf_cache");
    let offline = HubSettings {
        endpoint: dead_endpoint(),
        cache_dir: cache.clone(),
        token: None,
        offline: true,
    };
    let snapshot = fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &offline,
        &mut no_progress(),
    )
    .expect("huggingface_hub's cache is found");
    assert_eq!(snapshot, repo_dir(&cache).join("snapshots").join(SHA));
    let files = pipeline_files();
    for needed in needed_default() {
        if needed.ends_with(".json") || needed.ends_with(".txt") {
            let content = std::fs::read(snapshot.join(needed)).expect(needed);
            assert_eq!(content, files[needed], "{needed}");
        }
    }
    let unet = component_weights(&snapshot.join("unet"), DIFFUSERS_WEIGHTS, Variant::Default)
        .expect("unet weights");
    assert_weights(&unet, &unet_tensors(), DType::F32);
    let vae = component_weights(&snapshot.join("vae"), DIFFUSERS_WEIGHTS, Variant::Default)
        .expect("vae weights");
    let [shard1, shard2] = vae_shards();
    assert_weights(&vae, &[shard1, shard2].concat(), DType::F32);
}

// ---- Cancellable downloads, file counts and overall bytes ----

const BIG_REPO: &str = "tester/fixture-pix2pix";
const BIG_UNET: &str = "unet/diffusion_pytorch_model.safetensors";

/// The committed tiny pipeline (a 2.2 MB UNet) as a Hub repo: big enough to cancel mid-file.
fn fixture_repo() -> FakeRepo {
    FakeRepo::from_folder(
        BIG_REPO,
        SHA,
        &common::fixture_pipeline("sd1-tiny-ancestral"),
    )
}

fn blobs_of(cache: &Path, repo_folder: &str) -> Vec<(String, u64)> {
    let mut blobs: Vec<(String, u64)> = std::fs::read_dir(cache.join(repo_folder).join("blobs"))
        .expect("blobs folder")
        .map(|e| {
            let e = e.expect("entry");
            let len = e.metadata().expect("metadata").len();
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    blobs.sort();
    blobs
}

#[test]
fn a_cancelled_download_leaves_a_resumable_part_and_nothing_in_the_snapshot() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path().join("hub");
    let repo = fixture_repo();
    let unet = repo.files[BIG_UNET].clone();
    let unet_etag = content_etag(&unet);
    let hub = FakeHub::start(vec![repo.clone()]);
    let s = settings(&hub.endpoint, &cache);
    let cancel = AtomicBool::new(false);
    let mut events = Vec::new();
    // Cancel from inside the progress callback once 256 KiB of the UNet are in: the next block
    // of bytes must stop the download.
    let err = fetch_model_with_cancel(
        &hub_spec(BIG_REPO),
        Variant::Default,
        &s,
        &mut |p: &DownloadProgress| {
            events.push(p.clone());
            if p.file == BIG_UNET && p.bytes_done > 0 {
                cancel.store(true, Ordering::SeqCst);
            }
        },
        &cancel,
    )
    .expect_err("cancelled");
    assert!(
        matches!(&err, HubError::Cancelled { repo } if repo == BIG_REPO),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("the download of {BIG_REPO} was cancelled")
    );
    let last = events.last().expect("progress before the cancel");
    assert_eq!(last.file, BIG_UNET, "nothing was reported after the cancel");

    // The UNet blob stays as a `.part` holding a true prefix of the file; no complete blob.
    let folder = "models--tester--fixture-pix2pix";
    let blobs = blobs_of(&cache, folder);
    let part_name = format!("{unet_etag}.part");
    let part_len = blobs
        .iter()
        .find(|(name, _)| *name == part_name)
        .map(|(_, len)| *len)
        .unwrap_or_else(|| panic!("no {part_name} in {blobs:?}"));
    assert!(
        part_len >= 256 * 1024 && part_len < unet.len() as u64,
        "partial length {part_len} of {}",
        unet.len()
    );
    let part = std::fs::read(cache.join(folder).join("blobs").join(&part_name)).expect("part");
    assert_eq!(part, unet[..part.len()], "the part is the file's start");
    assert!(!blobs.iter().any(|(name, _)| *name == unet_etag));
    // Nothing in the snapshot points at it, and no ref claims the revision is there.
    let snapshot = cache.join(folder).join("snapshots").join(SHA);
    assert!(std::fs::symlink_metadata(snapshot.join(BIG_UNET)).is_err());
    assert!(
        snapshot.join("model_index.json").is_file(),
        "configs came first"
    );
    assert!(!cache.join(folder).join("refs").join("main").exists());
    assert!(!cache.join(folder).join("refs").join(SHA).exists());
    // Offline, the model is reported as incomplete, not as a bad file.
    let offline = HubSettings {
        offline: true,
        ..s.clone()
    };
    let err = fetch_model(
        &hub_spec(BIG_REPO),
        Variant::Default,
        &offline,
        &mut no_progress(),
    )
    .expect_err("incomplete");
    assert!(matches!(err, HubError::NotCached { .. }), "{err:?}");

    // The next fetch resumes the part (hf-hub's lock was released) and completes.
    hub.clear_log();
    let mut events = Vec::new();
    let snapshot_again = fetch_model(
        &hub_spec(BIG_REPO),
        Variant::Default,
        &s,
        &mut |p: &DownloadProgress| events.push(p.clone()),
    )
    .expect("resumed download");
    assert_eq!(snapshot_again, snapshot);
    assert_eq!(std::fs::read(snapshot.join(BIG_UNET)).expect("unet"), unet);
    let resumed = format!("CDN GET /cdn/{unet_etag} bytes={part_len}-");
    assert!(
        hub.requests().contains(&resumed),
        "no {resumed:?} in {:#?}",
        hub.requests()
    );
    let first_unet = events
        .iter()
        .find(|e| e.file == BIG_UNET)
        .expect("UNet progress");
    assert_eq!(
        first_unet.bytes_done, part_len,
        "progress starts at the resume offset"
    );
    assert_eq!(
        std::fs::read_to_string(cache.join(folder).join("refs/main")).expect("refs/main"),
        SHA
    );
    assert!(
        !blobs_of(&cache, folder)
            .iter()
            .any(|(n, _)| n.ends_with(".part"))
    );

    // Only the files not yet cached were counted: the UNet, the VAE and the text encoder.
    let weights = [
        BIG_UNET,
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ];
    let total: u64 = weights.iter().map(|f| repo.files[*f].len() as u64).sum();
    for (index, file) in weights.iter().enumerate() {
        let file_events: Vec<&DownloadProgress> =
            events.iter().filter(|e| e.file == *file).collect();
        assert!(!file_events.is_empty(), "no progress for {file}");
        for e in file_events {
            assert_eq!((e.file_index, e.file_count), (index + 1, 3), "{file}");
            assert_eq!(e.overall_total, Some(total), "{file}");
        }
    }
    let last = events.last().expect("events");
    assert_eq!(last.overall_done, Some(total), "the overall bar ends full");
}

#[test]
fn a_cancel_set_before_the_fetch_makes_no_request() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let hub = FakeHub::start(vec![fake_repo()]);
    let cancel = AtomicBool::new(true);
    let err = fetch_model_with_cancel(
        &hub_spec(REPO),
        Variant::Default,
        &settings(&hub.endpoint, &tmp.path().join("hub")),
        &mut no_progress(),
        &cancel,
    )
    .expect_err("cancelled");
    assert!(matches!(err, HubError::Cancelled { .. }), "{err:?}");
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}

/// Every download event of a fresh fetch of the sharded test repo, with or without sizes in
/// the listing.
fn fresh_fetch_events(listing_sizes: bool) -> Vec<DownloadProgress> {
    let tmp = tempfile::tempdir().expect("temp dir");
    let hub = FakeHub::start_with(vec![fake_repo()], listing_sizes);
    let mut events = Vec::new();
    fetch_model(
        &hub_spec(REPO),
        Variant::Default,
        &settings(&hub.endpoint, &tmp.path().join("hub")),
        &mut |p: &DownloadProgress| events.push(p.clone()),
    )
    .expect("download");
    events
}

#[test]
fn progress_says_which_file_of_how_many_and_the_overall_bytes() {
    let events = fresh_fetch_events(true);
    let files = pipeline_files();
    let needed = needed_default();
    // Each needed file gets one index, in download order, 1..=14.
    let mut order: Vec<(&str, usize)> = Vec::new();
    for e in &events {
        if order.last().map(|(f, _)| *f) != Some(e.file.as_str()) {
            order.push((e.file.as_str(), e.file_index));
        }
    }
    assert_eq!(order.len(), needed.len(), "{order:?}");
    for (position, (file, index)) in order.iter().enumerate() {
        assert_eq!(*index, position + 1, "{file}");
        assert!(needed.contains(file), "{file}");
    }
    // The listing cannot name the VAE's shards until its index is read: 12 files are planned,
    // and the two shards (files 12 and 13) join the count and their sizes the total when they
    // come.
    let shards = [
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
    ];
    assert_eq!(order[11].0, shards[0]);
    assert_eq!(order[12].0, shards[1]);
    let size = |f: &str| files[f].len() as u64;
    let all: u64 = needed.iter().map(|f| size(f)).sum();
    let before_shards: u64 = all - shards.iter().map(|f| size(f)).sum::<u64>();
    for e in &events {
        let (count, total) = match e.file_index {
            1..=11 => (12, before_shards),
            12 => (13, before_shards + size(shards[0])),
            _ => (14, all),
        };
        assert_eq!(e.file_count, count, "{}", e.file);
        assert_eq!(e.overall_total, Some(total), "{}", e.file);
        assert!(e.overall_done.expect("sizes listed") <= total, "{e:?}");
    }
    let last = events.last().expect("events");
    assert_eq!((last.file_index, last.file_count), (14, 14));
    assert_eq!(
        (last.overall_done, last.overall_total),
        (Some(all), Some(all))
    );
    // The overall bytes never go back.
    let overall: Vec<u64> = events.iter().filter_map(|e| e.overall_done).collect();
    assert!(overall.windows(2).all(|w| w[0] <= w[1]), "{overall:?}");
}

#[test]
fn without_sizes_in_the_listing_only_the_file_counts_are_given() {
    let events = fresh_fetch_events(false);
    assert!(!events.is_empty());
    for e in &events {
        assert_eq!(
            (e.overall_done, e.overall_total),
            (None, None),
            "{}",
            e.file
        );
        assert!(e.file_index >= 1 && e.file_index <= e.file_count, "{e:?}");
    }
    let last = events.last().expect("events");
    assert_eq!((last.file_index, last.file_count), (14, 14));
}
