//! Training runs that must not end in silence or spin (issue 16, items 1, 2, 7, 8): examples that
//! all fail to decode, NaN weights and divergence, a NaN optimizer state on resume, a validation
//! image that cannot be edited, a failure after step 1 that keeps the work, the output folder
//! that is the base model, stale temporary model folders of killed runs, and `edit
//! --num-images` that writes all images or none.

use crate::common;
use crate::train_dataset;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::RgbImage;
use instruct_pix2pix::train::checkpoint::{list_checkpoints, load_checkpoint, write_safetensors};
use instruct_pix2pix::train::data::CheckLevel;
use instruct_pix2pix::train::run::{
    DataSource, MAX_NON_FINITE_STEPS_IN_A_ROW, RunError, TrainConfig, TrainControl, TrainEvent,
    TrainOutcome, ValidationConfig, train,
};

/// 32², batches of 2, a constant rate, no checkpoints unless asked.
fn config(model: &Path, data: &Path, output: &Path) -> TrainConfig {
    let mut config = TrainConfig::new(
        model.to_path_buf(),
        DataSource::TrainDataDir(data.to_path_buf()),
        output.to_path_buf(),
    );
    config.resolution = 32;
    config.train_batch_size = 2;
    config.max_train_steps = Some(4);
    config.lr_warmup_steps = 0;
    config.report_to_tensorboard = false;
    config.checkpointing_steps = 1_000_000;
    config.seed = 5;
    config
}

/// Runs `train`, returning its result and the notices it sent.
fn run_collecting_notices(config: &TrainConfig) -> (Result<TrainOutcome, RunError>, Vec<String>) {
    let mut notices = Vec::new();
    let result = train(config, &TrainControl::new(), &mut |event| {
        if let TrainEvent::Notice(text) = event {
            notices.push(text);
        }
    });
    (result, notices)
}

fn sd1_tiny() -> PathBuf {
    common::fixture_pipeline("sd1-tiny")
}

fn dataset(dir: &Path, count: usize) -> PathBuf {
    let data = dir.join("data");
    train_dataset::write_invert_dataset(&data, count, 32, 11);
    data
}

/// Whether the folder holds a final model (full fine-tune) or LoRA weights.
fn holds_a_model(output: &Path) -> bool {
    output.join("model_index.json").exists()
        || output.join("unet").exists()
        || output.join("pytorch_lora_weights.safetensors").exists()
}

#[test]
fn examples_that_all_fail_to_decode_end_the_run_instead_of_spinning() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset(work.path(), 3);
    // Headers intact, bodies cut: the quick check passes, decoding fails.
    for i in 0..3 {
        let path = data.join(format!("ex{i:03}_edited.png"));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    }
    let output = work.path().join("out");
    let mut config = config(&sd1_tiny(), &data, &output);
    config.check_level = CheckLevel::Headers;
    let (result, notices) = run_collecting_notices(&config);
    match result {
        Err(RunError::NoUsableExamples { examples, .. }) => assert_eq!(examples, 3),
        other => panic!("expected NoUsableExamples, got {other:?}"),
    }
    let skipped = notices.iter().filter(|n| n.starts_with("skipped")).count();
    assert!(skipped <= 3, "one notice per example at most: {notices:?}");
    assert!(!holds_a_model(&output));
}

/// A copy of sd1-tiny whose UNet's `name` is changed by `change`.
fn changed_model(dir: &Path, folder: &str, name: &str, change: impl Fn(&mut Vec<f32>)) -> PathBuf {
    let model = dir.join(folder);
    common::copy_dir(&sd1_tiny(), &model);
    let path = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    for (tensor_name, tensor) in &mut tensors {
        if tensor_name == name {
            let mut values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            change(&mut values);
            *tensor = Tensor::from_vec(values, tensor.dims(), &Device::Cpu).unwrap();
        }
    }
    write_safetensors(&path, &tensors, None).unwrap();
    model
}

#[test]
fn nan_weights_or_a_huge_learning_rate_stop_the_run_without_saving_a_model() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset(work.path(), 4);

    // A base model with a NaN weight is refused as it loads, naming the file and the tensor.
    let nan_model = changed_model(work.path(), "nan-model", "conv_in.weight", |v| {
        v[0] = f32::NAN
    });
    let output = work.path().join("out-nan");
    let (result, _) = run_collecting_notices(&config(&nan_model, &data, &output));
    let error = result.expect_err("a NaN weight must not train");
    let message = error.to_string();
    assert!(message.contains("conv_in.weight"), "{message}");
    assert!(
        message.contains("diffusion_pytorch_model.safetensors"),
        "{message}"
    );
    assert!(!holds_a_model(&output));

    // Weights so large that every loss overflows: no step is applied, and after three in a row
    // the run stops as diverged with nothing saved.
    let huge_model = changed_model(work.path(), "huge-model", "conv_out.weight", |v| {
        v.iter_mut().for_each(|x| *x *= 1e30)
    });
    let output = work.path().join("out-huge");
    let mut huge_run = config(&huge_model, &data, &output);
    huge_run.max_train_steps = Some(10);
    let (result, notices) = run_collecting_notices(&huge_run);
    match result {
        Err(RunError::Diverged {
            steps, last_step, ..
        }) => {
            assert_eq!(steps, MAX_NON_FINITE_STEPS_IN_A_ROW);
            assert_eq!(last_step, 0);
        }
        other => panic!("expected Diverged, got {other:?}"),
    }
    let skipped = notices.iter().filter(|n| n.contains("skipped")).count();
    assert_eq!(
        skipped, MAX_NON_FINITE_STEPS_IN_A_ROW as usize,
        "{notices:?}"
    );
    assert!(!holds_a_model(&output));
    assert!(list_checkpoints(&output).unwrap_or_default().is_empty());

    // --learning_rate 1e30: the first step is applied, the run diverges after it; the message
    // names the last good checkpoint, which stays as it was.
    let output = work.path().join("out-lr");
    let mut huge_lr = config(&sd1_tiny(), &data, &output);
    huge_lr.learning_rate = 1e30;
    huge_lr.max_train_steps = Some(10);
    huge_lr.checkpointing_steps = 1;
    let (result, _) = run_collecting_notices(&huge_lr);
    let error = result.expect_err("a learning rate of 1e30 must not end as a trained model");
    assert!(
        matches!(
            error,
            RunError::Diverged { .. } | RunError::NonFiniteWeights { .. }
        ),
        "{error}"
    );
    assert!(!holds_a_model(&output), "{error}");
    for (_, checkpoint) in list_checkpoints(&output).unwrap() {
        let loaded = load_checkpoint(&checkpoint, &Device::Cpu).unwrap();
        for (name, tensor) in &loaded.groups["unet"] {
            let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{name} in {checkpoint:?}"
            );
        }
    }
}

#[test]
fn a_resumed_optimizer_state_with_nan_is_refused_by_name() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset(work.path(), 4);
    let output = work.path().join("out");
    let mut first = config(&sd1_tiny(), &data, &output);
    first.max_train_steps = Some(1);
    first.checkpointing_steps = 1;
    run_collecting_notices(&first).0.unwrap();

    // Every moment NaN, written over the values in place.
    let optimizer = output.join("checkpoint-1/optimizer.safetensors");
    let mut bytes = std::fs::read(&optimizer).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert!(
        header
            .as_object()
            .unwrap()
            .iter()
            .all(|(name, info)| name == "__metadata__" || info["dtype"] == "F32"),
        "{header}"
    );
    for value in bytes[8 + header_len..].chunks_exact_mut(4) {
        value.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    std::fs::write(&optimizer, &bytes).unwrap();
    // As a run that saved NaN moments would have written it: the manifest's checksum matches,
    // so only the values tell.
    let manifest_path = output.join("checkpoint-1/checkpoint.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["files"]["optimizer.safetensors"]["crc32"] =
        format!("{:08x}", crc32fast::hash(&bytes)).into();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let before = std::fs::read(output.join("checkpoint-1/unet.safetensors")).unwrap();

    let mut resumed = config(&sd1_tiny(), &data, &output);
    resumed.max_train_steps = Some(3);
    resumed.resume_from_checkpoint = Some("latest".into());
    let (result, _) = run_collecting_notices(&resumed);
    match result {
        Err(error @ RunError::NonFiniteWeights { .. }) => {
            let message = error.to_string();
            assert!(message.contains("checkpoint-1"), "{message}");
            assert!(message.contains("optimizer"), "{message}");
        }
        other => panic!("expected NonFiniteWeights, got {other:?}"),
    }
    let after = std::fs::read(output.join("checkpoint-1/unet.safetensors")).unwrap();
    assert_eq!(before, after, "the checkpoint stays as it was");
}

#[test]
fn a_validation_image_that_cannot_be_edited_is_refused_before_step_one() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset(work.path(), 2);
    let output = work.path().join("out");
    let mut config = config(&sd1_tiny(), &data, &output);
    config.validation = Some(ValidationConfig {
        prompt: "invert".into(),
        image: RgbImage::new(1, 1),
        num_images: 1,
        every_epochs: 1,
    });
    let (result, _) = run_collecting_notices(&config);
    match result {
        Err(RunError::Setting { flag, .. }) => assert_eq!(flag, "--val_image_url"),
        other => panic!("expected the validation image refused, got {other:?}"),
    }
    assert!(!output.exists(), "nothing is written before step 1");
}

#[test]
fn a_failure_after_step_one_keeps_a_checkpoint_of_the_last_step() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset(work.path(), 4);
    let output = work.path().join("out");
    let mut config = config(&sd1_tiny(), &data, &output);
    config.validation = Some(ValidationConfig {
        prompt: "invert".into(),
        image: RgbImage::new(32, 32),
        num_images: 1,
        every_epochs: 1,
    });
    // After step 1, a file takes the validation folder's name: the validation at the end of
    // epoch 1 (after step 2) cannot write its images.
    let blocker = output.join("validation");
    let result = train(&config, &TrainControl::new(), &mut |event| {
        if let TrainEvent::Step(step) = event
            && step.step == 1
        {
            std::fs::write(&blocker, b"not a folder").unwrap();
        }
    });
    let error = result.expect_err("the validation folder cannot be made");
    assert!(matches!(error, RunError::Io { .. }), "{error}");
    let checkpoints = list_checkpoints(&output).unwrap();
    assert_eq!(
        checkpoints.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![2],
        "{error}"
    );
    load_checkpoint(&checkpoints[0].1, &Device::Cpu).unwrap();
}

#[test]
fn the_base_models_own_folder_is_refused_as_output() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset(work.path(), 2);
    let model = work.path().join("model");
    common::copy_dir(&sd1_tiny(), &model);
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    // Named another way (a trailing `.`), still the same folder.
    let config = config(&model, &data, &model.join("."));
    let (result, _) = run_collecting_notices(&config);
    match result {
        Err(error @ RunError::Setting { .. }) => {
            assert!(error.to_string().contains("--output_dir"), "{error}");
            assert!(error.to_string().contains("base model"), "{error}");
        }
        other => panic!("expected --output_dir refused, got {other:?}"),
    }
    assert_eq!(std::fs::read(&weights).unwrap(), before);
}

#[cfg(target_os = "linux")]
#[test]
fn temporary_model_folders_of_killed_runs_are_removed_and_live_ones_kept() {
    let work = tempfile::tempdir().unwrap();
    let data = dataset(work.path(), 2);
    // A process that has ended: its id names a leftover of a killed run.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let stale = work.path().join(format!(".tmp-model-out-{dead_pid}"));
    std::fs::create_dir_all(stale.join("unet")).unwrap();
    let live = work.path().join(format!(
        ".tmp-model-out-{}",
        std::os::unix::process::parent_id()
    ));
    std::fs::create_dir_all(&live).unwrap();

    let output = work.path().join("out");
    let mut config = config(&sd1_tiny(), &data, &output);
    config.max_train_steps = Some(1);
    run_collecting_notices(&config).0.unwrap();
    assert!(holds_a_model(&output));
    assert!(!stale.exists(), "a dead run's temporary folder is removed");
    assert!(live.exists(), "a running process's folder is left alone");
}

#[test]
fn several_images_are_written_all_or_none() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("edit.png");
    std::fs::create_dir(work.path().join("edit-3.png")).unwrap();
    let input = common::fixtures()
        .join("edits/sd1-plain/input.png")
        .display()
        .to_string();
    let model = sd1_tiny().display().to_string();
    let result = common::run(
        &work.path().join("hf"),
        &[
            "edit",
            "--model",
            &model,
            "--image",
            &input,
            "--prompt",
            "x",
            "--steps",
            "1",
            "--num-images",
            "3",
            "--output",
            &output.display().to_string(),
        ],
    );
    assert!(!result.status.success());
    let stderr = common::stderr(&result);
    assert!(stderr.contains("edit-3.png"), "{stderr}");
    assert!(!work.path().join("edit-1.png").exists(), "{stderr}");
    assert!(!work.path().join("edit-2.png").exists(), "{stderr}");
}
