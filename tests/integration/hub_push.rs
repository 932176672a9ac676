//! `train --push_to_hub` against the fake Hub on 127.0.0.1: the repo is created, the model's
//! files (and only those: no checkpoints, logs or metrics) arrive in one commit with their exact
//! bytes, large files through LFS and not sent twice, and the token is never printed. No token,
//! an invalid one or a read-only one is refused before training starts; a repo the token may not
//! write to, or a Hub that cannot be reached, fails after training in one line naming the repo,
//! with the trained model kept. A cancelled push commits nothing; a failed large-file upload is
//! tried again.

use crate::common;
use crate::common::fake_hub::FakeHub;
use crate::train_dataset;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const TOKEN: &str = "hf_fakeWriteToken0123456789";

/// `train` for two quick steps at 32² into `out`, plus `extra` flags, against `hub`.
fn train_command(
    hf_home: &Path,
    hub: &FakeHub,
    data: &Path,
    out: &Path,
    extra: &[&str],
) -> Command {
    let mut command = common::program(hf_home);
    command
        .env("HF_ENDPOINT", &hub.endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .args(common::train_args(
            data,
            out,
            &[
                "--resolution",
                "32",
                "--train_batch_size",
                "2",
                "--max_train_steps",
                "2",
                "--checkpointing_steps",
                "1",
                "--lr_warmup_steps",
                "0",
            ],
        ))
        .args(extra);
    command
}

fn run(mut command: Command) -> (Output, String) {
    let output = command.output().expect("the test binary starts");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        common::stderr(&output)
    );
    (output, all)
}

/// Every file of the model in `out`, read independently of the program: everything under the
/// output folder except checkpoints, logs, metrics and validation images.
fn model_files_on_disk(out: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, prefix: &str, files: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.path().is_dir() {
                walk(&entry.path(), &format!("{name}/"), files);
            } else {
                files.insert(name, std::fs::read(entry.path()).unwrap());
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(out, "", &mut files);
    files.retain(|name, _| {
        !(name.starts_with("checkpoint-")
            || name.starts_with("logs/")
            || name.starts_with("validation/")
            || name == "metrics.jsonl")
    });
    files
}

#[test]
fn a_trained_model_is_pushed_in_one_commit_with_exactly_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let hf_home = dir.path().join("hf");
    let data = dir.path().join("data");
    train_dataset::write_invert_dataset(&data, 4, 32, 11);
    let hub = FakeHub::start(Vec::new());
    hub.set_write_token(TOKEN, "me");

    let out = dir.path().join("out");
    let (output, all) = run(train_command(
        &hf_home,
        &hub,
        &data,
        &out,
        &[
            "--seed",
            "3",
            "--push_to_hub",
            "--hub_model_id",
            "me/tiny-ip2p",
            "--hub_token",
            TOKEN,
        ],
    ));
    assert!(output.status.success(), "{all}");
    assert!(!all.contains(TOKEN), "the token was printed:\n{all}");
    assert!(
        all.contains(&format!("to {}/me/tiny-ip2p", hub.endpoint)),
        "{all}"
    );
    assert_eq!(hub.created_repos(), vec!["me/tiny-ip2p".to_string()]);
    let commits = hub.commits();
    assert_eq!(commits.len(), 1, "{all}");
    assert_eq!(commits[0].repo_id, "me/tiny-ip2p");
    let expected = model_files_on_disk(&out);
    assert!(expected.contains_key("model_index.json"));
    assert!(expected.contains_key("unet/diffusion_pytorch_model.safetensors"));
    // The output folder has more than the model; only the model went.
    assert!(out.join("checkpoint-2").is_dir() && out.join("metrics.jsonl").is_file());
    assert_eq!(
        commits[0].files.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    assert!(commits[0].files == expected, "the bytes differ");
    // The weights went through LFS, each once.
    let weights: Vec<&String> = expected
        .keys()
        .filter(|name| name.ends_with(".safetensors"))
        .collect();
    assert!(weights.len() >= 3, "{weights:?}");
    let first_uploads = hub.lfs_uploads();
    assert_eq!(first_uploads.len(), weights.len(), "{first_uploads:?}");

    // Again into the same repo, named without its owner (the token's user), the token from
    // HF_TOKEN: the repo exists (409, fine), and the weights the Hub has already are not sent.
    let out2 = dir.path().join("out2");
    let mut again = train_command(
        &hf_home,
        &hub,
        &data,
        &out2,
        &[
            "--seed",
            "4",
            "--push_to_hub",
            "--hub_model_id",
            "tiny-ip2p",
        ],
    );
    again.env("HF_TOKEN", TOKEN);
    let (output, all) = run(again);
    assert!(output.status.success(), "{all}");
    assert!(!all.contains(TOKEN), "the token was printed:\n{all}");
    assert_eq!(hub.created_repos(), vec!["me/tiny-ip2p".to_string()]);
    let commits = hub.commits();
    assert_eq!(commits.len(), 2);
    assert_eq!(commits[1].repo_id, "me/tiny-ip2p");
    assert!(commits[1].files == model_files_on_disk(&out2));
    let second_uploads = &hub.lfs_uploads()[first_uploads.len()..];
    // Only the retrained UNet is new; the frozen components' weights are on the Hub already.
    assert_eq!(second_uploads.len(), 1, "{second_uploads:?}");
    assert_eq!(
        second_uploads[0],
        common::fake_hub::content_etag(
            &commits[1].files["unet/diffusion_pytorch_model.safetensors"]
        )
    );
}

#[test]
fn an_invalid_or_read_only_token_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    train_dataset::write_invert_dataset(&data, 4, 32, 11);
    let hub = FakeHub::start(Vec::new());
    hub.set_write_token(TOKEN, "me");
    let read_token = "hf_readOnlyToken1234567890";
    hub.add_read_token(read_token, "me");
    let out = dir.path().join("out");
    for (token, expected) in [
        ("hf_wrongToken9876543210", "HTTP 401"),
        (read_token, "read-only"),
    ] {
        let (output, all) = run(train_command(
            &dir.path().join("hf"),
            &hub,
            &data,
            &out,
            &[
                "--push_to_hub",
                "--hub_model_id",
                "me/tiny-ip2p",
                "--hub_token",
                token,
            ],
        ));
        assert!(!output.status.success(), "{all}");
        assert!(!all.contains(token), "the token was printed:\n{all}");
        let stderr = common::stderr(&output);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains("me/tiny-ip2p"), "{stderr}");
        assert!(errors[0].contains(expected), "{stderr}");
        assert!(!out.exists(), "training started: {stderr}");
    }
    assert!(hub.created_repos().is_empty());
}

#[test]
fn a_repo_the_token_may_not_write_fails_after_training_and_keeps_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    train_dataset::write_invert_dataset(&data, 4, 32, 11);
    let hub = FakeHub::start(Vec::new());
    hub.set_write_token(TOKEN, "me");
    let out = dir.path().join("out");
    let (output, all) = run(train_command(
        &dir.path().join("hf"),
        &hub,
        &data,
        &out,
        &[
            "--push_to_hub",
            "--hub_model_id",
            "someone-else/tiny-ip2p",
            "--hub_token",
            TOKEN,
        ],
    ));
    assert!(!output.status.success(), "{all}");
    assert!(!all.contains(TOKEN), "the token was printed:\n{all}");
    let stderr = common::stderr(&output);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("someone-else/tiny-ip2p"), "{stderr}");
    assert!(errors[0].contains("HTTP 403"), "{stderr}");
    assert!(errors[0].contains(&out.display().to_string()), "{stderr}");
    // Trained and kept, nothing committed.
    assert!(String::from_utf8_lossy(&output.stdout).contains("trained after 2 steps"));
    assert!(out.join("model_index.json").is_file());
    assert!(
        out.join("unet/diffusion_pytorch_model.safetensors")
            .is_file()
    );
    assert!(hub.commits().is_empty());
    assert!(hub.created_repos().is_empty());
}

#[test]
fn no_token_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    train_dataset::write_invert_dataset(&data, 4, 32, 11);
    let hub = FakeHub::start(Vec::new());
    let out = dir.path().join("out");
    // An empty HF_HOME: no token file; HF_TOKEN is removed by `common::program`.
    let (output, all) = run(train_command(
        &dir.path().join("hf"),
        &hub,
        &data,
        &out,
        &["--push_to_hub", "--hub_model_id", "me/tiny-ip2p"],
    ));
    assert!(!output.status.success(), "{all}");
    let stderr = common::stderr(&output);
    assert!(stderr.contains("me/tiny-ip2p"), "{stderr}");
    assert!(stderr.contains("--hub_token"), "{stderr}");
    assert!(stderr.contains("HF_TOKEN"), "{stderr}");
    assert!(!out.exists(), "training started: {stderr}");
    assert!(hub.requests().is_empty());

    // The token file of `huggingface-cli login` is read when nothing else is given.
    let hf_home = dir.path().join("hf-logged-in");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), format!("{TOKEN}\n")).unwrap();
    hub.set_write_token(TOKEN, "me");
    let (output, all) = run(train_command(
        &hf_home,
        &hub,
        &data,
        &out,
        &["--push_to_hub", "--hub_model_id", "me/tiny-ip2p"],
    ));
    assert!(output.status.success(), "{all}");
    assert!(!all.contains(TOKEN), "the token was printed:\n{all}");
    assert_eq!(hub.commits().len(), 1);
}

#[test]
fn a_lora_run_pushes_only_its_weights_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    train_dataset::write_invert_dataset(&data, 4, 32, 11);
    let hub = FakeHub::start(Vec::new());
    hub.set_write_token(TOKEN, "me");
    // No --hub_model_id: the output folder's name under the token's user.
    let out = dir.path().join("tiny-lora");
    let (output, all) = run(train_command(
        &dir.path().join("hf"),
        &hub,
        &data,
        &out,
        &["--lora-rank", "4", "--push_to_hub", "--hub_token", TOKEN],
    ));
    assert!(output.status.success(), "{all}");
    let commits = hub.commits();
    assert_eq!(commits.len(), 1, "{all}");
    assert_eq!(commits[0].repo_id, "me/tiny-lora");
    let weights = std::fs::read(out.join("pytorch_lora_weights.safetensors")).unwrap();
    assert_eq!(
        commits[0].files,
        BTreeMap::from([("pytorch_lora_weights.safetensors".to_string(), weights)])
    );
}

#[test]
fn an_unreachable_hub_fails_in_one_line_and_keeps_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    train_dataset::write_invert_dataset(&data, 4, 32, 11);
    let hub = FakeHub::start(Vec::new());
    let out = dir.path().join("out");
    let mut command = train_command(
        &dir.path().join("hf"),
        &hub,
        &data,
        &out,
        &["--push_to_hub", "--hub_model_id", "me/tiny-ip2p"],
    );
    // Nothing listens on port 9 (discard) on the test machines.
    command
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_TOKEN", TOKEN);
    let (output, all) = run(command);
    assert!(!output.status.success(), "{all}");
    assert!(!all.contains(TOKEN), "the token was printed:\n{all}");
    let stderr = common::stderr(&output);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("me/tiny-ip2p"), "{stderr}");
    assert!(errors[0].contains("127.0.0.1:9"), "{stderr}");
    assert!(errors[0].contains("creating the repo"), "{stderr}");
    assert!(
        stderr.contains("note: --push_to_hub: the Hub cannot be reached now"),
        "{stderr}"
    );
    assert!(out.join("model_index.json").is_file());
}

#[test]
fn a_cancelled_push_commits_nothing() {
    use instruct_pix2pix::model::hub::{PushError, PushStage, push_files};
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(Vec::new());
    hub.set_write_token(TOKEN, "me");
    let mut settings = hub.settings(&dir.path().join("cache"));
    settings.token = Some(TOKEN.to_string());
    let files = upload_files(dir.path());
    let cancel = AtomicBool::new(false);
    let result = push_files(
        &settings,
        "me/cancelled",
        &files,
        "End of training",
        // Cancelled once the large file's bytes start to go.
        &mut |update| {
            if update.stage == PushStage::Uploading && update.done > 0 {
                cancel.store(true, Ordering::Release);
            }
        },
        &cancel,
    );
    let err = result.expect_err("the push was cancelled");
    assert!(matches!(err, PushError::Cancelled { .. }), "{err}");
    assert!(err.to_string().contains("me/cancelled"), "{err}");
    assert!(hub.commits().is_empty());
    assert!(hub.lfs_uploads().is_empty());
}

fn upload_files(dir: &Path) -> Vec<instruct_pix2pix::model::hub::UploadFile> {
    let big = dir.join("big.safetensors");
    std::fs::write(
        &big,
        (0..8u32 << 20).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let small = dir.join("config.json");
    std::fs::write(&small, "{}").unwrap();
    vec![
        instruct_pix2pix::model::hub::UploadFile {
            path_in_repo: "config.json".to_string(),
            local: small,
        },
        instruct_pix2pix::model::hub::UploadFile {
            path_in_repo: "big.safetensors".to_string(),
            local: big,
        },
    ]
}

#[test]
fn a_failed_large_file_upload_is_tried_again() {
    use instruct_pix2pix::model::hub::{PUT_TRIES, PushError, push_files};
    use std::sync::atomic::AtomicBool;

    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start(Vec::new());
    hub.set_write_token(TOKEN, "me");
    let mut settings = hub.settings(&dir.path().join("cache"));
    settings.token = Some(TOKEN.to_string());
    let files = upload_files(dir.path());
    let never = AtomicBool::new(false);

    // Storage busy for all but the last try: the push succeeds.
    hub.fail_lfs_puts(PUT_TRIES as usize - 1);
    let outcome = push_files(&settings, "me/retried", &files, "One", &mut |_| {}, &never)
        .expect("the push succeeds on the last try");
    assert_eq!((outcome.files, outcome.lfs_sent), (2, 1));
    let commits = hub.commits();
    assert_eq!(commits.len(), 1);
    assert_eq!(
        commits[0].files["big.safetensors"],
        std::fs::read(&files[1].local).unwrap()
    );

    // Busy for every try: one error naming the repo, the file and the status; no commit.
    std::fs::write(&files[1].local, b"changed bytes, a new object").unwrap();
    hub.fail_lfs_puts(PUT_TRIES as usize);
    let err = push_files(&settings, "me/retried", &files, "Two", &mut |_| {}, &never)
        .expect_err("storage stays busy");
    assert!(
        matches!(err, PushError::Status { status: 503, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("me/retried"), "{message}");
    assert!(message.contains("big.safetensors"), "{message}");
    assert_eq!(hub.commits().len(), 1);
}
