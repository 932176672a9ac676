//! `edit --model OWNER/NAME`: the model comes through hf-hub from a server on 127.0.0.1 that answers
//! like the Hub, into a Hugging Face cache in the real layout; then again offline from that cache.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use common::fake_hub::{FakeHub, FakeRepo};
use common::{fixture_pipeline, fixtures, pixel_difference, program, stderr};

const REPO: &str = "tiny-org/instruct-pix2pix-tiny";

/// Every file of a fixture pipeline, by repo-relative path (symlinks followed).
fn repo_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, files);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                files.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    files
}

fn edit_args<'a>(case_dir: &'a str, output: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "edit",
        "--model",
        REPO,
        "--image",
        &format!("{case_dir}/input.png"),
        "--latents",
        &format!("{case_dir}/latents.npy"),
        "--prompt",
        "make it snowy",
        "--steps",
        "10",
        "--output",
        output,
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn download_then_offline_gives_diffusers_pixels() {
    let hub = FakeHub::start(vec![FakeRepo {
        repo_id: REPO.into(),
        sha: "0123456789abcdef0123456789abcdef01234567".into(),
        files: repo_files(&fixture_pipeline("sd1-tiny")),
        token: None,
    }]);
    let work = tempfile::tempdir().unwrap();
    let hf_home = work.path().join("hf");
    let case_dir = fixtures().join("edits").join("sd1-plain");
    let case_dir = case_dir.display().to_string();
    let expected = image::open(fixtures().join("edits/sd1-plain/expected.png"))
        .unwrap()
        .to_rgb8();

    // Online: downloads into HF_HOME/hub in huggingface_hub's layout.
    let online = work.path().join("online.png").display().to_string();
    let result = program(&hf_home)
        .env("HF_HUB_OFFLINE", "0")
        .env("HF_ENDPOINT", &hub.endpoint)
        .args(edit_args(&case_dir, &online, &[]))
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "online edit failed: {}",
        stderr(&result)
    );
    let repo_cache = hf_home
        .join("hub")
        .join("models--tiny-org--instruct-pix2pix-tiny");
    assert!(
        repo_cache.join("refs").join("main").is_file(),
        "no refs/main in the cache"
    );
    assert!(repo_cache.join("blobs").is_dir(), "no blobs/ in the cache");
    let fetched = hub.resolved_files();
    assert!(
        fetched
            .iter()
            .any(|f| f == "unet/diffusion_pytorch_model.safetensors"),
        "{fetched:?}"
    );
    assert!(
        !fetched.iter().any(|f| f.contains(".fp16.")),
        "the default run must not download fp16 weights: {fetched:?}"
    );
    let ours = image::open(&online).unwrap().to_rgb8();
    let (max, mean) = pixel_difference(&ours, &expected);
    assert!(
        max <= 3 && mean <= 0.3,
        "online result differs from diffusers: max {max}, mean {mean}"
    );

    // Offline, with the server gone: the same model from the cache, the same pixels.
    drop(hub);
    let offline = work.path().join("offline.png").display().to_string();
    let result = program(&hf_home)
        .args(edit_args(&case_dir, &offline, &[]))
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "offline edit failed: {}",
        stderr(&result)
    );
    let again = image::open(&offline).unwrap().to_rgb8();
    assert_eq!(
        pixel_difference(&again, &ours).0,
        0,
        "offline result differs from the online one"
    );
}

#[test]
fn dtype_f16_fetches_the_fp16_variant() {
    let hub = FakeHub::start(vec![FakeRepo {
        repo_id: REPO.into(),
        sha: "89abcdef0123456789abcdef0123456789abcdef".into(),
        files: repo_files(&fixture_pipeline("sd1-tiny")),
        token: None,
    }]);
    let work = tempfile::tempdir().unwrap();
    let case_dir = fixtures()
        .join("edits")
        .join("sd1-plain")
        .display()
        .to_string();
    let output = work.path().join("half.png").display().to_string();
    let result = program(&work.path().join("hf"))
        .env("HF_HUB_OFFLINE", "0")
        .env("HF_ENDPOINT", &hub.endpoint)
        .args(edit_args(
            &case_dir,
            &output,
            &["--dtype", "f16", "--device", "cpu"],
        ))
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "f16 edit failed: {}",
        stderr(&result)
    );
    let fetched = hub.resolved_files();
    for component in [
        "unet/diffusion_pytorch_model",
        "vae/diffusion_pytorch_model",
        "text_encoder/model",
    ] {
        let half = format!("{component}.fp16.safetensors");
        let full = format!("{component}.safetensors");
        assert!(fetched.contains(&half), "{half} not fetched: {fetched:?}");
        assert!(
            !fetched.contains(&full),
            "{full} fetched although f16 was asked for"
        );
    }
    // Half precision stays close to diffusers' float32 result.
    let ours = image::open(&output).unwrap().to_rgb8();
    let expected = image::open(fixtures().join("edits/sd1-plain/expected.png"))
        .unwrap()
        .to_rgb8();
    let (max, mean) = pixel_difference(&ours, &expected);
    assert!(
        max <= 40 && mean <= 3.0,
        "f16 result too far from float32: max {max}, mean {mean}"
    );
}
