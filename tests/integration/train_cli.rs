//! `instruct-pix2pix train` as a user runs it: the script's flags and their kebab-case aliases,
//! notices for flags without meaning here, bad input refused in one line with nothing written,
//! a plain 4-channel model grown, a validation image from a URL, LoRA, and a run killed with
//! SIGKILL mid-run that `--resume_from_checkpoint latest` continues, and a Hub dataset id
//! downloaded from a fake Hub on 127.0.0.1.
//!
//! With `INSTRUCT_PIX2PIX_EXPORT_DIR=DIR` set, the LoRA and full tests leave their outputs in
//! `DIR/train_lora` and `DIR/train_full` for scripts/check_lora_in_diffusers.py and
//! scripts/check_trained_model.py.

use crate::common;
use crate::train_dataset;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use instruct_pix2pix::model::weights::Variant;
use instruct_pix2pix::model::{InstructPix2PixModel, LoadOptions};
use instruct_pix2pix::train::checkpoint::{list_checkpoints, load_checkpoint, write_safetensors};
use instruct_pix2pix::train::lora::apply_lora_file;
use instruct_pix2pix::train::memory::{
    DeviceKind, ESTIMATE_MARGIN, MemorySettings, ModelSizes, estimate, format_bytes,
};
use instruct_pix2pix::train::metrics::read_metrics;

fn model(name: &str) -> String {
    common::fixture_pipeline(name).display().to_string()
}

/// `train` on `data` into `out` for a few quick steps at 32², plus `extra` flags.
fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let quick = [
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "2",
        "--lr_warmup_steps",
        "0",
        "--seed",
        "3",
    ];
    common::train_args(data, out, &[&quick[..], extra].concat())
}

fn run(args: &[String]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::run(home.path(), &args)
}

fn dataset(dir: &Path, count: usize) -> PathBuf {
    let data = dir.join("data");
    train_dataset::write_invert_dataset(&data, count, 32, 11);
    data
}

/// The error lines of a failed run: exactly one, starting with `error:`.
fn one_error_line(output: &Output) -> String {
    let stderr = common::stderr(output);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            !l.starts_with("note:") && !l.starts_with("dataset:") && !l.starts_with("memory:")
        })
        .collect();
    assert_eq!(errors.len(), 1, "stderr: {stderr}");
    assert!(errors[0].starts_with("error"), "stderr: {stderr}");
    errors[0].to_string()
}

fn export_dir(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("INSTRUCT_PIX2PIX_EXPORT_DIR")?).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent()?).unwrap();
    Some(dir)
}

#[test]
fn script_flags_aliases_and_notices() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    let out = dir.path().join("out");
    let output = run(&train_args(
        &data,
        &out,
        &[
            // kebab-case aliases of the script's names
            "--gradient-accumulation-steps",
            "1",
            "--learning-rate",
            "1e-3",
            "--lr-scheduler",
            "linear",
            "--conditioning-dropout-prob",
            "0.05",
            "--random-flip",
            "--use-ema",
            "--checkpointing-steps",
            "1",
            "--checkpoints-total-limit",
            "1",
            // memory savers that take effect
            "--use_8bit_adam",
            "--gradient_checkpointing",
            "--cache-latents",
            // flags without meaning here
            "--enable_xformers_memory_efficient_attention",
            "--allow_tf32",
            "--hub_model_id",
            "me/model",
            "--mixed_precision",
            "fp16",
            "--report_to",
            "wandb",
            "--logging_dir",
            "logs",
            "--local_rank",
            "0",
            "--dataloader_num_workers",
            "4",
            "--non_ema_revision",
            "main",
        ],
    ));
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    for flag in [
        "--enable_xformers_memory_efficient_attention",
        "--allow_tf32",
        "--hub_model_id",
        "--mixed_precision fp16",
        "--report_to wandb",
        "--logging_dir",
        "--local_rank",
        "--dataloader_num_workers",
        "--non_ema_revision",
    ] {
        let notices: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("note: ") && l.contains(flag))
            .collect();
        assert_eq!(notices.len(), 1, "{flag}: {stderr}");
    }
    assert!(
        stderr.contains("note: cached the latents of 4 examples (both flips)"),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("trained after 2 steps"), "{stdout}");
    // The model folder, one checkpoint (the limit), metrics, and no TensorBoard (wandb asked).
    assert!(out.join("model_index.json").is_file());
    let checkpoints = list_checkpoints(&out).unwrap();
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(checkpoints[0].0, 2);
    assert_eq!(read_metrics(&out.join("metrics.jsonl")).unwrap().len(), 2);
    assert!(!out.join("logs").exists());
}

#[test]
fn bad_input_is_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    let out = dir.path().join("out");
    let not_a_model = dir.path().join("not-a-model");
    std::fs::create_dir_all(not_a_model.join("unet")).unwrap();
    std::fs::write(not_a_model.join("README.md"), "hello").unwrap();
    let missing = dir.path().join("missing");

    // Numbers out of their flag's range are clap's to refuse: cli_errors::train_nonsense_numbers.
    let cases: Vec<(Vec<String>, &str)> = vec![
        (train_args(&missing, &out, &[]), "dataset folder"),
        (
            train_args(&data, &out, &["--lr_scheduler", "sometimes"]),
            "--lr_scheduler sometimes",
        ),
        (
            train_args(&data, &out, &["--mixed_precision", "fp8"]),
            "--mixed_precision fp8",
        ),
        (
            train_args(&data, &out, &["--resolution", "36"]),
            "--resolution 36: must be a multiple of 8",
        ),
        // A GPU this build cannot use (CI's builds have no CUDA): said, nothing written.
        #[cfg(not(feature = "cuda"))]
        (
            train_args(&data, &out, &["--device", "cuda"]),
            "no CUDA support: rebuild with --features cuda",
        ),
        (
            train_args(&data, &out, &["--resume_from_checkpoint", "checkpoint-5"]),
            "checkpoint-5",
        ),
        (
            train_args(
                &data,
                &out,
                &[
                    "--validation_prompt",
                    "x",
                    "--val_image_url",
                    "/no/such.png",
                ],
            ),
            "such.png",
        ),
    ];
    for (args, expected) in cases {
        let output = run(&args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let line = one_error_line(&output);
        assert!(line.contains(expected), "{expected}: {line}");
        assert!(!out.exists(), "{expected}: the output folder was created");
    }

    // A folder that is not a diffusers pipeline.
    let mut args = train_args(&data, &out, &[]);
    args[2] = not_a_model.display().to_string();
    let output = run(&args);
    assert_eq!(output.status.code(), Some(1));
    let line = one_error_line(&output);
    assert!(line.contains("not-a-model"), "{line}");
    assert!(!out.exists());

    // Both data sources, or none: one line too (exit 1).
    let mut args = train_args(&data, &out, &["--dataset_name", "owner/name"]);
    let output = run(&args);
    assert!(one_error_line(&output).contains("not both"));
    args.drain(3..5);
    args.truncate(args.len() - 2);
    let output = run(&args);
    assert!(one_error_line(&output).contains("--train_data_dir"));
    assert!(!out.exists());
}

/// Cuts every safetensors file of a checkpoint folder to half its length.
fn damage_checkpoint(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let len = std::fs::metadata(&path).unwrap().len();
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(len / 2).unwrap();
        }
    }
}

/// Issue 16 item 9: `--resume_from_checkpoint latest` says which damaged checkpoint it passes
/// over and which one it resumes from; when every checkpoint is damaged it refuses, leaving
/// them as they are, instead of starting over on top of them.
#[test]
fn resuming_latest_names_damaged_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    let out = dir.path().join("out");
    let output = run(&train_args(&data, &out, &["--checkpointing_steps", "1"]));
    assert!(output.status.success(), "{}", common::stderr(&output));
    damage_checkpoint(&out.join("checkpoint-2"));

    let resume = [
        "--resume_from_checkpoint",
        "latest",
        "--checkpointing_steps",
        "1",
    ];
    let mut args = train_args(&data, &out, &resume);
    let steps_at = args.iter().position(|a| a == "--max_train_steps").unwrap();
    args[steps_at + 1] = "3".to_string();
    let output = run(&args);
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    let notice = stderr
        .lines()
        .find(|l| l.contains("is damaged"))
        .unwrap_or_else(|| panic!("no notice: {stderr}"));
    assert!(
        notice.starts_with("note: checkpoint")
            && notice.contains("checkpoint-2 is damaged")
            && notice.contains("resuming from the older")
            && notice.contains("checkpoint-1"),
        "{notice}"
    );

    for (_, path) in list_checkpoints(&out).unwrap() {
        damage_checkpoint(&path);
    }
    let before = list_checkpoints(&out).unwrap();
    let output = run(&train_args(&data, &out, &resume));
    assert_eq!(output.status.code(), Some(1));
    let line = one_error_line(&output);
    assert!(
        line.contains("every checkpoint there is damaged") && line.contains("checkpoint-3"),
        "{line}"
    );
    assert_eq!(
        list_checkpoints(&out).unwrap(),
        before,
        "checkpoints changed"
    );
}

#[test]
fn half_a_dataset_is_listed_and_skipped_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    std::fs::remove_file(data.join("ex001_edited.png")).unwrap();
    std::fs::write(data.join("ex002.png"), b"not a png").unwrap();
    let out = dir.path().join("out");

    let output = run(&train_args(&data, &out, &[]));
    assert_eq!(output.status.code(), Some(1));
    let stderr = common::stderr(&output);
    assert!(stderr.contains("4 examples: 2 good, 2 bad"), "{stderr}");
    assert!(
        stderr.contains("ex001") && stderr.contains("ex002"),
        "{stderr}"
    );
    assert!(stderr.contains("--skip_bad_examples"), "{stderr}");
    assert!(!out.exists());

    let output = run(&train_args(&data, &out, &["--skip-bad-examples"]));
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("training on 2"), "{stderr}");
    assert!(out.join("model_index.json").is_file());
}

#[test]
fn plain_four_channel_model_grows_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 2);
    let out = dir.path().join("out");
    let mut args = train_args(&data, &out, &["--max_train_steps", "1"]);
    args[2] = model("sd-plain-4ch");
    let output = run(&args);
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("conv_in grows from 4 to 8"), "{stderr}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("unet/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["in_channels"], 8);
    // The written folder loads as an InstructPix2Pix model.
    InstructPix2PixModel::load(&out, &load_options()).unwrap();
}

fn load_options() -> LoadOptions {
    LoadOptions {
        variant: Default::default(),
        dtype: DType::F32,
        device: Device::Cpu,
    }
}

#[test]
fn validation_image_from_a_url_and_lora_output() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    let out = dir.path().join("out");
    // A one-file web server for --val_image_url.
    let png = std::fs::read(data.join("ex000.png")).unwrap();
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let port = server.server_addr().to_ip().unwrap().port();
    let serving = std::thread::spawn(move || {
        if let Ok(Some(request)) = server.recv_timeout(Duration::from_secs(60)) {
            let _ = request.respond(tiny_http::Response::from_data(png));
        }
    });
    let url = format!("http://127.0.0.1:{port}/val.png");
    let output = run(&train_args(
        &data,
        &out,
        &[
            "--lora-rank",
            "4",
            "--learning_rate",
            "1e-2",
            "--max_train_steps",
            "4",
            "--validation_prompt",
            train_dataset::INSTRUCTION,
            "--val_image_url",
            &url,
            "--num_validation_images",
            "2",
            "--validation_epochs",
            "1",
        ],
    ));
    serving.join().unwrap();
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    // 4 examples in batches of 2: 2 steps per epoch, validation after epochs 0 and 1.
    for step in [2, 4] {
        for i in 0..2 {
            let path = out.join(format!("validation/step-{step:06}-{i}.png"));
            assert_eq!(
                image::open(&path).unwrap().width(),
                32,
                "{}",
                path.display()
            );
        }
    }
    let validations: Vec<serde_json::Value> = read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|v| v.get("validation").is_some())
        .collect();
    assert_eq!(validations.len(), 2);
    assert_eq!(
        validations[0]["validation"][0]["prompt"],
        train_dataset::INSTRUCTION
    );
    // The LoRA file, no model folder; it applies to the base model.
    let lora_file = out.join("pytorch_lora_weights.safetensors");
    assert!(lora_file.is_file());
    assert!(!out.join("model_index.json").exists());
    let mut model =
        InstructPix2PixModel::load(&common::fixture_pipeline("sd1-tiny"), &load_options()).unwrap();
    assert_eq!(apply_lora_file(&mut model, &out).unwrap().rank, 4);

    if let Some(export) = export_dir("train_lora") {
        // The UNet output with the trained adapter on the LoRA check's input.
        std::fs::create_dir_all(&export).unwrap();
        std::fs::copy(&lora_file, export.join("pytorch_lora_weights.safetensors")).unwrap();
        let case = candle_core::safetensors::load(
            common::fixtures().join("train_persist/lora_py/cases.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let output = model
            .unet
            .forward(
                &case["sample"],
                &case["timesteps"],
                &case["encoder_hidden_states"],
            )
            .unwrap();
        write_safetensors(
            &export.join("cases.safetensors"),
            &[
                ("sample".into(), case["sample"].clone()),
                ("timesteps".into(), case["timesteps"].clone()),
                (
                    "encoder_hidden_states".into(),
                    case["encoder_hidden_states"].clone(),
                ),
                ("output".into(), output),
            ],
            None,
        )
        .unwrap();
    }
}

/// Steps logged in metrics.jsonl, in order.
fn logged_steps(out: &Path) -> Vec<u64> {
    read_metrics(&out.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_hub_dataset_id_is_downloaded_into_the_cache_and_trained_on() {
    use common::fake_hub::{FakeHub, FakeRepo};
    let sha = "6666666666666666666666666666666666666666";
    let hub = FakeHub::start(vec![FakeRepo::from_folder(
        "datasets/owner/tiny-edits",
        sha,
        &common::fixtures().join("train_data/parquet"),
    )]);
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut args = train_args(Path::new("unused"), &out, &[]);
    let at = args.iter().position(|a| a == "--train_data_dir").unwrap();
    args[at] = "--dataset_name".into();
    args[at + 1] = "owner/tiny-edits".into();
    let output = common::program(home.path())
        .env("HF_HUB_OFFLINE", "0")
        .env("HF_ENDPOINT", &hub.endpoint)
        .args(&args)
        .output()
        .unwrap();
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    for (index, file) in ["train-00000-of-00002", "train-00001-of-00002"]
        .iter()
        .enumerate()
    {
        let line = format!(
            "note: downloading dataset owner/tiny-edits: data/{file}.parquet ({} of 2,",
            index + 1
        );
        assert!(stderr.contains(&line), "{line:?} in {stderr}");
    }
    assert!(stderr.contains("6 examples"), "{stderr}");
    assert_eq!(logged_steps(&out), [1, 2]);
    let repo_dir = home.path().join("hub/datasets--owner--tiny-edits");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        sha
    );
    // The test split was not downloaded.
    assert!(
        !repo_dir
            .join("snapshots")
            .join(sha)
            .join("data/test-00000-of-00001.parquet")
            .exists()
    );
}

#[test]
fn killed_mid_run_resumes_from_the_latest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 6);
    let out = dir.path().join("out");
    let flags = [
        "--max_train_steps",
        "60",
        "--checkpointing_steps",
        "4",
        "--checkpoints_total_limit",
        "2",
        "--use_ema",
        "--gradient_accumulation_steps",
        "2",
    ];
    let args = train_args(&data, &out, &flags);
    let mut child = common::program(home.path())
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the second checkpoint, then SIGKILL (Child::kill sends SIGKILL on Unix).
    let started = Instant::now();
    while !out.join("checkpoint-8").is_dir() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint-8 after 2 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Nothing corrupt: every checkpoint folder is complete and loads; at most the limit remain.
    let checkpoints = list_checkpoints(&out).unwrap();
    assert!(
        !checkpoints.is_empty() && checkpoints.len() <= 2,
        "{checkpoints:?}"
    );
    for (_, path) in &checkpoints {
        load_checkpoint(path, &Device::Cpu).unwrap();
    }
    let last = checkpoints.last().unwrap().0;
    assert!((8..60).contains(&last), "{last}");
    let killed_steps = logged_steps(&out);
    assert!(killed_steps.len() as u64 >= last);

    // Resume: no --seed needed (the checkpoint's is taken), continues after `last`.
    let mut args = train_args(&data, &out, &flags);
    let seed_at = args.iter().position(|a| a == "--seed").unwrap();
    args.drain(seed_at..seed_at + 2);
    args.extend(["--resume_from_checkpoint".to_string(), "latest".to_string()]);
    let output = run(&args);
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("checkpoint-{last} at step {last}")),
        "{stderr}"
    );
    assert!(!stderr.contains("note: seed"), "{stderr}");
    // metrics.jsonl reads as one run: steps after the checkpoint logged by the killed run were
    // dropped and logged again.
    assert_eq!(logged_steps(&out), (1..=60).collect::<Vec<u64>>());
    let checkpoints = list_checkpoints(&out).unwrap();
    assert_eq!(
        checkpoints.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [56, 60]
    );
    assert!(out.join("model_index.json").is_file());
    if let Some(export) = export_dir("train_full") {
        common::copy_dir(&out, &export);
    }
}

/// A run whose estimated peak is more than the memory available stops before step 1, in one
/// line naming what it needs, what there is and the settings that would bring it down (largest
/// saving first), exits 1 and writes nothing; `--skip_memory_check` trains anyway.
#[test]
fn a_run_that_does_not_fit_stops_before_step_one_naming_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 2);
    let out = dir.path().join("out");
    let home = tempfile::tempdir().unwrap();
    // At 512² the UNet's activations, not the encoder's work, set this model's peak.
    let args = train_args(
        &data,
        &out,
        &[
            "--resolution",
            "512",
            "--train_batch_size",
            "2",
            "--use_ema",
        ],
    );
    let output = common::program(home.path())
        .args(&args)
        .env(MEMORY_AVAILABLE_VAR, "20MB")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let line = one_error_line(&output);
    assert!(line.contains("training needs ~"), "{line}");
    assert!(line.contains("20 MB available on cpu: try "), "{line}");
    for flag in [
        "--gradient_checkpointing (−",
        "--use_8bit_adam (−",
        "--train_batch_size 1 (−",
        "--resolution 384 (−",
        "no --use_ema (−",
    ] {
        assert!(line.contains(flag), "{flag}: {line}");
    }
    // The savings are listed largest first.
    let savings: Vec<f64> = line
        .split("(−")
        .skip(1)
        .map(|part| {
            let (number, rest) = part.split_once(' ').unwrap();
            let scale = match &rest[..2] {
                "GB" => 1e9,
                "MB" => 1e6,
                _ => 1e3,
            };
            number.parse::<f64>().unwrap() * scale
        })
        .collect();
    assert!(savings.len() >= 5, "{line}");
    assert!(savings.windows(2).all(|w| w[0] >= w[1]), "{line}");
    assert!(
        line.ends_with("(or --skip_memory_check to try anyway)"),
        "{line}"
    );
    assert!(!out.exists(), "the output folder was created");

    // At 32² (quick) the run still needs more than 20 MB; the flag starts it anyway.
    let skip = train_args(&data, &out, &["--skip_memory_check"]);
    let output = common::program(home.path())
        .args(&skip)
        .env(MEMORY_AVAILABLE_VAR, "20MB")
        .output()
        .unwrap();
    let stderr = common::stderr(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("memory: estimated peak ~"), "{stderr}");
    assert!(out.join("model_index.json").is_file());

    // A nonsense figure is refused by name.
    let output = common::program(home.path())
        .args(&args)
        .env(MEMORY_AVAILABLE_VAR, "plenty")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(common::stderr(&output).contains(MEMORY_AVAILABLE_VAR));
}

/// Runs `command` to its end and returns its stderr and its peak resident memory in bytes (the
/// kernel's account for this child alone, from wait4).
#[cfg(target_os = "linux")]
// The child is reaped by wait4 (which also gives its rusage), not by Child::wait.
#[allow(clippy::zombie_processes)]
fn peak_memory_of(mut command: std::process::Command) -> (std::process::ExitStatus, String, u64) {
    use std::io::Read;
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text).unwrap();
        text
    });
    // The kernel's peak of the run's own memory (VmHWM), polled until the process is gone.
    // Not wait4's ru_maxrss: the child is spawned with vfork, and exec carries the high-water
    // mark of the test process (other tests' models loaded beside) into it.
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(kb) = text
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = reader.join().unwrap();
    assert!(peak_kb > 0, "no memory figure was read: {stderr}");
    (status, stderr, peak_kb * 1024)
}

/// The estimate the run prints is the library's, and it is within the stated margin of the
/// peak resident memory the kernel measured for the run (a setting not used to calibrate it).
#[cfg(target_os = "linux")]
#[test]
fn the_memory_estimate_is_near_the_measured_peak() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 4);
    let out = dir.path().join("out");
    let home = tempfile::tempdir().unwrap();
    let (resolution, batch) = (MEASURED_RESOLUTION, MEASURED_BATCH);
    let mut args = train_args(
        &data,
        &out,
        &[
            "--resolution",
            &resolution.to_string(),
            "--train_batch_size",
            &batch.to_string(),
            "--max_train_steps",
            "1",
            "--report_to",
            "none",
        ],
    );
    // The later flags win (argparse's rule); drop the helper's 2 steps for clarity.
    let steps = args.iter().position(|a| a == "--max_train_steps").unwrap();
    args.drain(steps..steps + 2);
    let mut command = common::program(home.path());
    command.args(&args);
    let (status, stderr, measured) = peak_memory_of(command);
    assert!(status.success(), "{stderr}");

    let sizes =
        ModelSizes::from_folder(&common::fixture_pipeline("sd1-tiny"), Variant::Default).unwrap();
    let settings = MemorySettings {
        resolution,
        train_batch_size: batch,
        gradient_accumulation_steps: 1,
        lora_rank: None,
        gradient_checkpointing: false,
        use_8bit_adam: false,
        use_ema: false,
        cache_latents: false,
        random_flip: false,
        half_precision_frozen: false,
        examples: 4,
        device: DeviceKind::Cpu,
    };
    let estimated = estimate(&sizes, &settings).total();
    assert!(
        stderr.contains(&format!(
            "memory: estimated peak ~{}",
            format_bytes(estimated)
        )),
        "{stderr}"
    );
    // The step's own memory (activations or the encoder's work) must be most of the peak, or
    // the check would not test it.
    let parts = estimate(&sizes, &settings);
    assert!(
        parts.activations.max(parts.frozen_work) > estimated / 3,
        "{parts:?}"
    );
    let error = (estimated as f64 - measured as f64).abs() / measured as f64;
    assert!(
        error <= ESTIMATE_MARGIN,
        "estimated {estimated} bytes, measured {measured} bytes: {:.0}% off",
        error * 100.0
    );
}

/// The variable that sets the memory the check assumes free.
const MEMORY_AVAILABLE_VAR: &str = "INSTRUCT_PIX2PIX_MEMORY_AVAILABLE";

/// The setting of the measured check (not one of the calibration runs).
const MEASURED_RESOLUTION: u32 = 256;
const MEASURED_BATCH: usize = 2;
