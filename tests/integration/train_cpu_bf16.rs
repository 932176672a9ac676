//! `--mixed_precision bf16` on the CPU (issue 11 item 4): the frozen weights (the text encoder,
//! the VAE and a LoRA run's UNet base) are held in bf16, half their memory, while activations,
//! trained weights, gradients and optimizer state stay float32; products run the CPU's bf16
//! kernels where it has avx512_bf16 and are widened to float32 otherwise. Runs on any CPU; the
//! bounds hold either way.

use crate::common;
use crate::train_mixed_precision::{assert_follows_float32, step_losses};

use candle_core::DType;
use instruct_pix2pix::train::lora::{LoraConfig, UNetLora};
use instruct_pix2pix::train::optim::AdamWConfig;
use instruct_pix2pix::train::schedule::{LrSchedule, LrScheduleKind};
use instruct_pix2pix::train::step::{StepConfig, TrainLoadOptions, Trainer, TrainingModels};

fn load(bf16: bool, lora: bool) -> TrainingModels {
    TrainingModels::load(
        &common::fixture_pipeline("sd1-tiny"),
        &TrainLoadOptions {
            bf16_frozen_encoders: bf16,
            bf16_frozen_unet: bf16 && lora,
            ..TrainLoadOptions::default()
        },
    )
    .unwrap()
}

/// The loss of each of `steps` optimizer steps (full fine-tuning, or LoRA rank 4).
fn losses(bf16: bool, lora: bool, steps: u64) -> Vec<f32> {
    let mut models = load(bf16, lora);
    let shape = models.latent_shape(2, 32);
    let params = if lora {
        models.unet.freeze_base().unwrap();
        UNetLora::attach(&mut models.unet.unet, LoraConfig::new(4), 0)
            .unwrap()
            .named_vars()
    } else {
        models.unet.params().to_vec()
    };
    assert!(params.iter().all(|(_, v)| v.dtype() == DType::F32));
    // LoRA's adapters start at zero: a larger rate moves its loss as far as full training's.
    let rate = if lora { 1e-2 } else { 1e-3 };
    let schedule = LrSchedule::new(LrScheduleKind::Constant, rate, 0, steps).unwrap();
    let mut trainer = Trainer::with_trainable(
        models,
        params,
        AdamWConfig::default(),
        schedule,
        None,
        StepConfig::default(),
    )
    .unwrap();
    step_losses(&mut trainer, shape, steps)
}

/// Measured over 6 steps (steps 0, 2, 4 and 1, 3, 5 share their draws): at most 4e-4 relative
/// apart, with or without avx512_bf16; the bound is about ten times that.
fn assert_tracks(float32: &[f32], bf16: &[f32], margin: f32) {
    assert_follows_float32(float32, bf16, margin, "bf16");
}

/// LoRA: the UNet's frozen base is held in bf16 from the load on (no float32 copy is ever
/// made: there are no base variables), the adapters train in float32, and the loss follows the
/// float32 run's.
#[test]
fn lora_holds_its_frozen_base_in_bf16_and_follows_the_float32_loss_curve() {
    let models = load(true, true);
    assert!(models.unet.params().is_empty(), "no float32 base");
    assert_eq!(models.unet.unet.conv_in.weight().dtype(), DType::BF16);
    drop(models);
    let steps = 6;
    assert_tracks(
        &losses(false, true, steps),
        &losses(true, true, steps),
        5e-3,
    );
}

/// Full fine-tuning: only the text encoder and the VAE are frozen (held in bf16); the UNet
/// trains in float32, and the loss follows the float32 run's.
#[test]
fn full_fine_tuning_holds_the_frozen_encoders_in_bf16_and_follows_the_float32_loss_curve() {
    let models = load(true, false);
    assert_eq!(models.unet.unet.conv_in.weight().dtype(), DType::F32);
    assert!(!models.unet.params().is_empty());
    drop(models);
    let steps = 6;
    assert_tracks(
        &losses(false, false, steps),
        &losses(true, false, steps),
        5e-3,
    );
}

/// The command a user types: `train --mixed_precision bf16` on the CPU announces what it holds
/// in bf16 (or, without avx512_bf16, that it trains in float32), estimates less memory than the
/// float32 run where it holds the weights in half, and writes its LoRA weights.
#[test]
fn train_with_mixed_precision_bf16_on_the_cpu_says_what_it_does_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    crate::train_dataset::write_invert_dataset(&data, 2, 32, 11);
    let run = |name: &str, precision: &str| {
        let out = dir.path().join(name);
        let args = [
            "train",
            "--pretrained_model_name_or_path",
            &common::fixture_pipeline("sd1-tiny").display().to_string(),
            "--train_data_dir",
            &data.display().to_string(),
            "--output_dir",
            &out.display().to_string(),
            "--resolution",
            "32",
            "--max_train_steps",
            "2",
            "--lora_rank",
            "4",
            "--device",
            "cpu",
            "--mixed_precision",
            precision,
        ];
        let home = tempfile::tempdir().unwrap();
        let output = common::run(home.path(), &args);
        let stderr = common::stderr(&output);
        assert!(output.status.success(), "{stderr}");
        assert!(
            out.join("pytorch_lora_weights.safetensors").is_file(),
            "{stderr}"
        );
        stderr
    };
    // The estimate alone: the memory available, after the comma, moves between the two runs.
    let estimate = |stderr: &str| {
        let line = stderr
            .lines()
            .find(|l| l.starts_with("memory:"))
            .unwrap_or_else(|| panic!("no memory line: {stderr}"));
        line.split(',').next().unwrap_or(line).to_string()
    };
    let bf16 = run("bf16", "bf16");
    let float32 = run("f32", "no");
    if instruct_pix2pix::model::nn::cpu_bf16_enabled() {
        assert!(
            bf16.contains(
                "note: --mixed_precision bf16 on the CPU: the text encoder, the VAE and the UNet's frozen base held in bf16"
            ),
            "{bf16}"
        );
        assert_ne!(estimate(&bf16), estimate(&float32));
    } else {
        assert!(bf16.contains("training runs in float32"), "{bf16}");
        assert_eq!(estimate(&bf16), estimate(&float32));
    }
}
