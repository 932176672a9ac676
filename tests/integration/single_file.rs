//! Single-file checkpoints in the original LDM layout (issue 15 item 2): the tiny model of
//! tests/fixtures/single_file (made by tests/fixtures/scripts/single_file_refs.py, which loads it
//! back with diffusers' own `from_single_file`) edits to diffusers' pixels from `.safetensors` and
//! from an EMA `.ckpt`; a pickle that would run code, truncated files and a plain Stable Diffusion
//! checkpoint are refused by name, and nothing runs.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{fixtures, pixel_difference, run, stderr};
use instruct_pix2pix::model::device::{DTypeChoice, DeviceChoice};
use instruct_pix2pix::model::hub::ModelSpec;
use instruct_pix2pix::model::single_file::{SingleFile, Templates};
use instruct_pix2pix::model::torch_file::TorchFile;
use instruct_pix2pix::worker::catalog::list_catalog;
use instruct_pix2pix::worker::{Event, Job, ModelRequest, Worker};

const MAX_LEVELS: u8 = 3;
const MEAN_LEVELS: f64 = 0.3;

fn dir() -> PathBuf {
    fixtures().join("single_file")
}

/// `edit` with the fixture's settings (seed 1234, 6 steps) on `model`, with `--config config/`.
fn edit(model: &Path, output: &Path, extra: &[&str]) -> Output {
    let dir = dir();
    let (model, config, input) = (
        model.display().to_string(),
        dir.join("config").display().to_string(),
        dir.join("edit").join("input.png").display().to_string(),
    );
    let output_text = output.display().to_string();
    let mut args = vec![
        "edit",
        "--model",
        &model,
        "--config",
        &config,
        "--image",
        &input,
        "--prompt",
        "make it snowy",
        "--steps",
        "6",
        "--seed",
        "1234",
        "--output",
        &output_text,
        "--quiet",
    ];
    args.extend_from_slice(extra);
    let hf_home = output.with_file_name("hf");
    run(&hf_home, &args)
}

fn assert_matches(output: &Path, expected: &str) {
    let ours = image::open(output).unwrap().to_rgb8();
    let expected = image::open(dir().join("edit").join(expected))
        .unwrap()
        .to_rgb8();
    let (max, mean) = pixel_difference(&ours, &expected);
    eprintln!(
        "{}: max difference {max} levels, mean {mean:.4}",
        output.display()
    );
    assert!(
        max <= MAX_LEVELS && mean <= MEAN_LEVELS,
        "max {max}, mean {mean:.4}"
    );
}

#[test]
fn a_safetensors_checkpoint_edits_to_diffusers_pixels() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("result.png");
    let result = edit(&dir().join("ip2p-tiny.safetensors"), &output, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_matches(&output, "expected.png");
}

/// The `.ckpt` holds the real UNet in its EMA weights only (its `model.diffusion_model.*` are
/// other values), one tensor stored transposed and two sharing a storage.
#[test]
fn an_ema_ckpt_edits_to_diffusers_pixels_from_its_ema_weights() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("result.png");
    let result = edit(&dir().join("ip2p-tiny-ema.ckpt"), &output, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_matches(&output, "expected.png");
}

/// A file marked `v_pred` (ComfyUI's convention) edits with the scheduler in v-prediction, as
/// diffusers does when given such a scheduler.
#[test]
fn a_file_marked_v_pred_predicts_v() {
    let work = tempfile::tempdir().unwrap();
    let mut tensors = candle_core::safetensors::load(
        dir().join("ip2p-tiny.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    tensors.insert(
        "v_pred".into(),
        candle_core::Tensor::zeros(0, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let model = work.path().join("vpred.safetensors");
    candle_core::safetensors::save(&tensors, &model).unwrap();
    let output = work.path().join("result.png");
    let result = edit(&model, &output, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_matches(&output, "expected-vpred.png");
}

/// The pickle of evil.ckpt calls os.system('touch "$IP2P_PICKLE_MARKER"') through GLOBAL and
/// REDUCE (the fixture script checks that Python's unpickler runs it). Here it is refused before
/// anything runs, naming the file and the callable, and the marker file never appears.
#[test]
fn a_pickle_that_would_run_code_is_refused_and_runs_nothing() {
    let work = tempfile::tempdir().unwrap();
    let marker = work.path().join("pwned");
    let evil = dir().join("evil.ckpt");
    let output = work.path().join("result.png");
    let dir = dir();
    let result = common::program(&work.path().join("hf"))
        .env("IP2P_PICKLE_MARKER", &marker)
        .args([
            "edit",
            "--model",
            evil.to_str().unwrap(),
            "--config",
            dir.join("config").to_str().unwrap(),
            "--image",
            dir.join("edit").join("input.png").to_str().unwrap(),
            "--prompt",
            "x",
            "--output",
            output.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let message = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{message}");
    assert!(
        message.contains("evil.ckpt") && message.contains("posix.system"),
        "{message}"
    );
    assert!(message.contains("nothing was run"), "{message}");
    assert!(!marker.exists(), "the pickle's command ran");
    assert!(!output.exists());
    // The library says the same, and a pickle that runs code is never half-read.
    let error = TorchFile::open(&evil).unwrap_err().to_string();
    assert!(error.contains("GLOBAL posix.system"), "{error}");
    assert!(!marker.exists());
}

#[test]
fn truncated_single_files_are_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    for (name, keep) in [
        ("ip2p-tiny.safetensors", 500_000),
        ("ip2p-tiny-ema.ckpt", 1_000_000),
        // Cut inside the pickle: the zip's directory is gone too.
        ("ip2p-tiny-ema.ckpt", 100_000),
    ] {
        let bytes = std::fs::read(dir().join(name)).unwrap();
        let cut = work.path().join(format!("cut-{keep}-{name}"));
        std::fs::write(&cut, &bytes[..keep]).unwrap();
        let output = work.path().join("result.png");
        let result = edit(&cut, &output, &[]);
        let message = stderr(&result);
        assert_eq!(result.status.code(), Some(1), "{message}");
        assert!(
            message.contains(&cut.display().to_string()) && message.contains("truncated"),
            "{message}"
        );
        assert!(!output.exists());
    }
}

#[test]
fn a_plain_stable_diffusion_checkpoint_is_not_instruct_pix2pix() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("result.png");
    let plain = dir().join("sd-plain-4ch.safetensors");
    let result = edit(&plain, &output, &[]);
    let message = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{message}");
    assert!(
        message.contains("sd-plain-4ch.safetensors")
            && message.contains("not an InstructPix2Pix model")
            && message.contains("4 input channels")
            && message.contains("text-to-image"),
        "{message}"
    );
    assert!(!output.exists());
}

/// Without `--config`, the configs come from the default model, which an empty offline cache
/// lacks: the message says so and what to do.
#[test]
fn without_a_config_folder_offline_the_message_says_what_to_give() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("result.png");
    let model = dir().join("ip2p-tiny.safetensors");
    let result = run(
        &work.path().join("hf"),
        &[
            "edit",
            "--model",
            model.to_str().unwrap(),
            "--image",
            dir().join("edit").join("input.png").to_str().unwrap(),
            "--prompt",
            "x",
            "--output",
            output.to_str().unwrap(),
        ],
    );
    let message = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{message}");
    assert!(
        message.contains("timbrooks/instruct-pix2pix") && message.contains("--config"),
        "{message}"
    );
    // --config with a pipeline folder is refused: a pipeline has its own.
    let folder = common::fixture_pipeline("sd1-tiny");
    let config = dir().join("config");
    let result = run(
        &work.path().join("hf"),
        &[
            "edit",
            "--model",
            folder.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--image",
            dir().join("edit").join("input.png").to_str().unwrap(),
            "--prompt",
            "x",
            "--output",
            output.to_str().unwrap(),
        ],
    );
    assert!(
        stderr(&result).contains("single-file checkpoints"),
        "{}",
        stderr(&result)
    );
}

/// The configs read from the tensors: what the file tells, and the numbers it cannot tell
/// (heads, groups) from the config folder when its sizes match.
#[test]
fn configs_are_read_from_the_tensors() {
    let config = dir().join("config");
    let templates = Templates::from_folder(&config).unwrap();
    let file = SingleFile::open(&dir().join("ip2p-tiny-ema.ckpt"), &templates).unwrap();
    assert!(file.uses_ema);
    let unet = &file.unet_config;
    assert_eq!(unet.in_channels, 8);
    assert_eq!(unet.block_out_channels, [8, 16, 16]);
    assert_eq!(
        unet.down_block_types,
        [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D"
        ]
    );
    assert_eq!(
        unet.up_block_types,
        ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    );
    assert_eq!(unet.norm_num_groups, Some(4), "from the config folder");
    assert_eq!(file.vae_config.block_out_channels, [8, 8, 16, 16]);
    assert_eq!(file.text_encoder_config.hidden_size, 16);
    assert_eq!(file.text_encoder_config.num_attention_heads, 2);
    assert_eq!(file.prediction_type, None);
    // Without templates, the original configs' rules: 8 heads, 32 groups (which cannot divide
    // this tiny model's 8 channels: refused with the reason, naming the file).
    let error = SingleFile::open(&dir().join("ip2p-tiny.safetensors"), &Templates::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("ip2p-tiny.safetensors"), "{error}");
    // A file is a single-file model spec; a missing one is named as a file.
    let spec = ModelSpec::parse(dir().join("ip2p-tiny.safetensors").to_str().unwrap(), None);
    assert!(matches!(spec, Ok(ModelSpec::SingleFile(_))), "{spec:?}");
    let missing = ModelSpec::parse("/nonexistent/model.ckpt", None).unwrap_err();
    assert!(missing.to_string().contains("model file"), "{missing}");
}

/// Damaged copies of the .ckpt (a byte changed, cut short) are read or refused, never a panic.
#[test]
fn damaged_ckpt_files_never_panic() {
    let work = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(dir().join("ip2p-tiny-ema.ckpt")).unwrap();
    let path = work.path().join("damaged.ckpt");
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |below: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % below as u64) as usize
    };
    let mut refused = 0;
    for round in 0..40 {
        let mut damaged = bytes.clone();
        if round % 4 == 0 {
            damaged.truncate(next(damaged.len()));
        } else {
            // Mostly the pickle (the first record) and the zip's directory at the end.
            for _ in 0..4 {
                let at = if next(2) == 0 {
                    next(180_000)
                } else {
                    damaged.len() - 1 - next(60_000)
                };
                damaged[at] = next(256) as u8;
            }
        }
        std::fs::write(&path, &damaged).unwrap();
        match TorchFile::open(&path) {
            Ok(file) => {
                let names: Vec<String> = file.shapes().map(|(n, _)| n.to_string()).collect();
                for name in names.iter().take(50) {
                    let _ = file.load(name, candle_core::DType::F32, &candle_core::Device::Cpu);
                }
            }
            Err(error) => {
                assert!(error.to_string().contains("damaged.ckpt"), "{error}");
                refused += 1;
            }
        }
    }
    assert!(refused > 5, "only {refused} of 40 damaged files refused");
}

/// The model manager lists single files with whether they load, and the worker loads one as the
/// command line does.
#[test]
fn the_window_lists_and_loads_single_files_through_the_worker() {
    let work = tempfile::tempdir().unwrap();
    let hub = instruct_pix2pix::model::hub::HubSettings {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: work.path().join("hub"),
        token: None,
        offline: true,
    };
    let files = [
        dir().join("ip2p-tiny.safetensors"),
        dir().join("sd-plain-4ch.safetensors"),
        dir().join("evil.ckpt"),
    ];
    let entries = list_catalog(&hub, &files);
    let entry = |name: &str| {
        entries
            .iter()
            .find(|e| e.spec.ends_with(name))
            .unwrap_or_else(|| panic!("{name} not listed: {entries:?}"))
    };
    assert_eq!(entry("ip2p-tiny.safetensors").problem, None);
    assert_eq!(entry("ip2p-tiny.safetensors").source, "single file");
    assert!(
        entry("sd-plain-4ch.safetensors")
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("not an InstructPix2Pix model")),
        "{entries:?}"
    );
    assert!(
        entry("evil.ckpt")
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("posix.system")),
        "{entries:?}"
    );

    let (handle, events) = Worker::spawn(std::sync::Arc::new(|| {})).unwrap();
    let mut request = ModelRequest::new(
        dir().join("ip2p-tiny-ema.ckpt").display().to_string(),
        DeviceChoice::Cpu,
        DTypeChoice::F32,
    );
    request.config = Some(dir().join("config").display().to_string());
    request.hub = Some(hub);
    handle.send(Job::LoadModel(request)).unwrap();
    loop {
        match events
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap()
        {
            Event::ModelLoaded(info) => {
                assert_eq!(info.ema, Some(true));
                assert!(info.folder.ends_with("ip2p-tiny-ema.ckpt"), "{info:?}");
                break;
            }
            Event::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    }
}
