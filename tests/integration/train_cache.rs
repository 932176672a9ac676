//! `--cache_latents` on the tiny fixture pipeline: a cached run takes the same steps as an
//! uncached one (same losses, same final weights, with random flips and conditioning dropout),
//! resumes from its checkpoint by caching again, reports its progress, frees the VAE and text
//! encoder (keeping them for validation edits), and the cache holds both flips and one text
//! embedding per distinct instruction.

use crate::common;
use crate::train_dataset;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use instruct_pix2pix::train::data::{CheckLevel, CropMode, Dataset, DatasetOptions};
use instruct_pix2pix::train::latent_cache::{CacheMiss, CacheOptions, LatentCache};
use instruct_pix2pix::train::run::{
    DataSource, RunError, TrainConfig, TrainControl, TrainEvent, ValidationConfig, train,
};
use instruct_pix2pix::train::step::{TrainError, TrainLoadOptions, TrainingModels};

/// A short run with every random draw the loop makes: flips per batch, dropout, EMA, 2-step
/// accumulation over an epoch of 5 batches (so one optimizer step takes a single micro-batch).
fn config(data: &Path, output: &Path, batch: usize) -> TrainConfig {
    let mut config = TrainConfig::new(
        common::fixture_pipeline("sd1-tiny"),
        DataSource::TrainDataDir(data.to_path_buf()),
        output.to_path_buf(),
    );
    config.resolution = 32;
    config.train_batch_size = batch;
    config.gradient_accumulation_steps = 2;
    config.max_train_steps = Some(4);
    config.learning_rate = 1e-3;
    config.lr_warmup_steps = 0;
    config.random_flip = true;
    config.conditioning_dropout_prob = Some(0.2);
    config.use_ema = true;
    config.report_to_tensorboard = false;
    config.checkpointing_steps = 1_000_000;
    config.seed = 5;
    config
}

/// Runs `config`, asking for a stop after step `stop_at`; returns every event.
fn run(config: &TrainConfig, stop_at: Option<u64>) -> Vec<TrainEvent> {
    let control = TrainControl::new();
    let mut events = Vec::new();
    train(config, &control, &mut |event| {
        if let TrainEvent::Step(step) = &event
            && Some(step.step) == stop_at
        {
            control.request_stop();
        }
        events.push(event);
    })
    .unwrap();
    events
}

fn losses(events: &[TrainEvent]) -> Vec<(u64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Step(step) => Some((step.step, step.loss)),
            _ => None,
        })
        .collect()
}

fn notices(events: &[TrainEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Notice(text) => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn unet_weights(output: &Path) -> Vec<(String, Tensor)> {
    let path = output.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

/// The largest difference between two runs' final UNet weights.
fn weight_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (unet_weights(a), unet_weights(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, nb);
            (ta - tb)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

fn dataset(dir: &Path, count: usize) -> PathBuf {
    let data = dir.join("data");
    train_dataset::write_invert_dataset(&data, count, 32, 21);
    data
}

#[test]
fn cached_run_equals_uncached_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 5);

    // Batches of one: each example goes through the encoders alone in both runs, so every
    // float is computed by the same operations on the same values: equal bit for bit.
    let plain = dir.path().join("plain");
    let uncached = run(&config(&data, &plain, 1), None);
    let cached_dir = dir.path().join("cached");
    let mut cached_config = config(&data, &cached_dir, 1);
    cached_config.cache_latents = true;
    let cached = run(&cached_config, None);
    assert_eq!(losses(&uncached).len(), 4);
    assert_eq!(losses(&cached), losses(&uncached));
    let difference = weight_difference(&plain, &cached_dir);
    println!("batch 1: largest weight difference {difference:e}");
    assert_eq!(difference, 0.0);

    // Batches of two: the uncached run encodes two images at once, the cache one at a time;
    // the same values up to the summation order inside the encoders' kernels (measured: equal
    // bit for bit here too).
    let plain = dir.path().join("plain2");
    let uncached = run(&config(&data, &plain, 2), None);
    let cached_dir = dir.path().join("cached2");
    let mut cached_config = config(&data, &cached_dir, 2);
    cached_config.cache_latents = true;
    let cached = run(&cached_config, None);
    let (uncached, cached) = (losses(&uncached), losses(&cached));
    assert_eq!(cached.len(), uncached.len());
    for ((step_a, a), (step_b, b)) in uncached.iter().zip(&cached) {
        assert_eq!(step_a, step_b);
        assert!(
            (a - b).abs() <= 1e-6 * a.abs().max(1.0),
            "step {step_a}: {a} vs {b}"
        );
    }
    let difference = weight_difference(&plain, &cached_dir);
    println!("batch 2: largest weight difference {difference:e}");
    assert!(difference <= 1e-6, "{difference}");
}

#[test]
fn cached_run_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 5);
    let straight = dir.path().join("straight");
    let straight_events = run(&config(&data, &straight, 1), None);

    let resumed = dir.path().join("resumed");
    let mut first = config(&data, &resumed, 1);
    first.cache_latents = true;
    let events = run(&first, Some(2));
    assert!(resumed.join("checkpoint-2").is_dir());
    assert_eq!(losses(&events).len(), 2);
    let mut second = first.clone();
    second.resume_from_checkpoint = Some("latest".into());
    let events = run(&second, None);
    // The cache is built again (it is not in the checkpoint).
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TrainEvent::CachingLatents { done: 5, total: 5 })),
        "no caching on resume"
    );
    assert_eq!(losses(&events), losses(&straight_events)[2..]);
    assert_eq!(weight_difference(&straight, &resumed), 0.0);
}

#[test]
fn caching_reports_progress_and_frees_the_encoders_unless_validation_needs_them() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 3);
    let mut config = config(&data, &dir.path().join("out"), 1);
    config.cache_latents = true;
    config.max_train_steps = Some(1);
    let events = run(&config, None);
    let progress: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::CachingLatents { done, total } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    assert_eq!(progress, [(0, 3), (1, 3), (2, 3), (3, 3)]);
    let started = events
        .iter()
        .position(|e| matches!(e, TrainEvent::Started(_)))
        .unwrap();
    let last_caching = events
        .iter()
        .rposition(|e| matches!(e, TrainEvent::CachingLatents { .. }))
        .unwrap();
    assert!(
        last_caching < started,
        "caching comes before the first step"
    );
    let lines = notices(&events);
    assert!(
        lines.iter().any(|n| n.starts_with(
            "cached the latents of 3 examples (both flips): 14.5 kB in memory; the VAE and text encoder are freed"
        )),
        "{lines:?}"
    );

    // Validation edits need the VAE and text encoder: they stay, and the edits are made.
    config.output_dir = dir.path().join("validated");
    config.validation = Some(ValidationConfig {
        prompt: train_dataset::INSTRUCTION.into(),
        image: image::RgbImage::new(32, 32),
        num_images: 1,
        every_epochs: 1,
    });
    let events = run(&config, None);
    let lines = notices(&events);
    assert!(
        lines
            .iter()
            .any(|n| n.ends_with("the VAE and text encoder stay loaded for the validation edits")),
        "{lines:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, TrainEvent::Validation(_)))
    );
}

#[test]
fn the_cache_holds_both_flips_and_one_text_embedding_per_instruction() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 3);
    let dataset = Dataset::open_train_data_dir(&data, &DatasetOptions::default()).unwrap();
    let mut models = TrainingModels::load(
        &common::fixture_pipeline("sd1-tiny"),
        &TrainLoadOptions::default(),
    )
    .unwrap();
    let mut options = CacheOptions {
        resolution: 32,
        crop: CropMode::Random,
        both_flips: true,
        device: Device::Cpu,
    };
    let mut calls = 0;
    let cache = LatentCache::build(&dataset, &models, &options, &|| false, &mut |_, _| {
        calls += 1
    })
    .unwrap()
    .unwrap();
    assert_eq!((cache.len(), cache.unreadable(), calls), (3, 0, 3));
    let plain = cache.get(0, false).unwrap();
    let flipped = cache.get(0, true).unwrap();
    assert_eq!(plain.edited_posterior.mean.dims(), [1, 4, 4, 4]);
    // The mirrored images' latents are other numbers (the images are not symmetric)...
    let difference = (&plain.image_latents - &flipped.image_latents)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(difference > 1e-3, "{difference}");
    // ...and every example's instruction is the same: one embedding, shared.
    let text = cache.get(2, true).unwrap().encoder_hidden_states.id();
    assert_eq!(plain.encoder_hidden_states.id(), text);
    assert_eq!(flipped.encoder_hidden_states.id(), text);
    // 3 examples × 2 flips × (mean, log-variance, image latents) of 4×4×4 floats, one text
    // embedding of 77 × 32 floats.
    assert_eq!(cache.bytes(), (3 * 2 * 3 * 64 + 77 * 32) * 4);
    assert_eq!(
        cache.get(3, false).unwrap_err(),
        CacheMiss::OutOfRange { index: 3, len: 3 }
    );

    // Without --random_flip no mirrored images, and a stop request ends the build early.
    options.both_flips = false;
    let cache = LatentCache::build(&dataset, &models, &options, &|| false, &mut |_, _| {})
        .unwrap()
        .unwrap();
    assert!(matches!(
        cache.get(1, true),
        Err(CacheMiss::NoFlip { index: 1, .. })
    ));
    let stopped =
        LatentCache::build(&dataset, &models, &options, &|| true, &mut |_, _| {}).unwrap();
    assert!(stopped.is_none());

    // Once freed, the encoders are gone: encoding again says so.
    models.release_frozen_encoders();
    assert!(!models.holds_frozen_encoders());
    let error = LatentCache::build(&dataset, &models, &options, &|| false, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(error.contains("VAE was released"), "{error}");
    assert!(matches!(
        models.vae(),
        Err(TrainError::EncoderReleased { component: "VAE" })
    ));
}

/// Cuts the body of `ex{i}_edited.png`: its header still passes the quick check, decoding fails.
fn truncate_edited(data: &Path, i: usize) {
    let path = data.join(format!("ex{i:03}_edited.png"));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
}

#[test]
fn unreadable_examples_are_skipped_once_and_a_cache_of_none_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path(), 3);
    truncate_edited(&data, 1);
    let mut config = config(&data, &dir.path().join("out"), 1);
    config.cache_latents = true;
    config.check_level = CheckLevel::Headers;
    config.max_train_steps = Some(3);
    let events = run(&config, None);
    let lines = notices(&events);
    assert!(
        lines
            .iter()
            .any(|n| n.starts_with("cached the latents of 2 examples")),
        "{lines:?}"
    );
    let skipped: Vec<&String> = lines.iter().filter(|n| n.starts_with("skipped")).collect();
    assert_eq!(skipped.len(), 1, "{lines:?}");
    assert!(skipped[0].contains("ex001"), "{skipped:?}");
    assert_eq!(losses(&events).len(), 3);

    truncate_edited(&data, 0);
    truncate_edited(&data, 2);
    config.output_dir = dir.path().join("none");
    let result = train(&config, &TrainControl::new(), &mut |_| {});
    match result {
        Err(RunError::NoUsableExamples { examples, .. }) => assert_eq!(examples, 3),
        other => panic!("expected NoUsableExamples, got {other:?}"),
    }
    assert!(!config.output_dir.exists(), "nothing is written");
}
