//! The library API the window and the trainer call: load once, edit many times, a callback per
//! step with a cheap preview, cancellation, and reuse of the encodings when only the denoising
//! settings change.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use common::{fixture_pipeline, fixtures, pixel_difference};
use instruct_pix2pix::model::hub::Variant;
use instruct_pix2pix::model::{InstructPix2PixModel, LoadOptions};
use instruct_pix2pix::pipeline::image::load_image;
use instruct_pix2pix::pipeline::{EditError, EditPipeline, EditSettings};

fn pipeline() -> EditPipeline {
    let options = LoadOptions {
        variant: Variant::Default,
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let model =
        InstructPix2PixModel::load(&fixture_pipeline("sd1-tiny-ancestral"), &options).unwrap();
    EditPipeline::new(model).unwrap()
}

fn input() -> image::RgbImage {
    load_image(&fixtures().join("edits/sd1-plain/input.png")).unwrap()
}

fn settings(seed: u64) -> EditSettings {
    EditSettings {
        prompt: "make it snowy".into(),
        steps: 4,
        seed,
        ..EditSettings::default()
    }
}

#[test]
fn only_denoising_reruns_when_the_prompt_and_image_stay() {
    let mut pipeline = pipeline();
    let image = input();
    let cancel = AtomicBool::new(false);
    let first = pipeline
        .edit(&image, &settings(1), &mut |_| {}, &cancel)
        .unwrap();
    assert!(!first.reused_prompt_embeddings && !first.reused_image_latents);

    let mut changed = settings(2);
    changed.guidance_scale = 5.0;
    let second = pipeline
        .edit(&image, &changed, &mut |_| {}, &cancel)
        .unwrap();
    assert!(second.reused_prompt_embeddings && second.reused_image_latents);
    assert!(pixel_difference(&first.image, &second.image).0 > 0);

    // Reuse must not change results: a fresh pipeline gives the same image for the same settings.
    let fresh = self::pipeline()
        .edit(&image, &changed, &mut |_| {}, &cancel)
        .unwrap();
    assert_eq!(pixel_difference(&fresh.image, &second.image).0, 0);

    let mut new_prompt = changed.clone();
    new_prompt.prompt = "make it autumn".into();
    let third = pipeline
        .edit(&image, &new_prompt, &mut |_| {}, &cancel)
        .unwrap();
    assert!(!third.reused_prompt_embeddings && third.reused_image_latents);
}

#[test]
fn every_step_reports_with_a_preview() {
    let mut pipeline = pipeline();
    let cancel = AtomicBool::new(false);
    let mut steps = Vec::new();
    let mut preview_sizes = Vec::new();
    pipeline
        .edit(
            &input(),
            &settings(3),
            &mut |step| {
                steps.push((step.step, step.total));
                preview_sizes.push(step.preview(32, 24).unwrap().dimensions());
            },
            &cancel,
        )
        .unwrap();
    assert_eq!(steps, [(1, 4), (2, 4), (3, 4), (4, 4)]);
    assert!(preview_sizes.iter().all(|&size| size == (32, 24)));
}

#[test]
fn cancel_stops_within_one_step() {
    let mut pipeline = pipeline();
    let cancel = AtomicBool::new(false);
    let mut seen = 0;
    let result = pipeline.edit(
        &input(),
        &settings(4),
        &mut |step| {
            seen = step.step;
            if step.step == 2 {
                cancel.store(true, Ordering::Relaxed);
            }
        },
        &cancel,
    );
    assert!(matches!(result, Err(EditError::Cancelled)), "{result:?}");
    assert_eq!(seen, 2, "ran past the cancel");

    // The pipeline keeps working after a cancel.
    cancel.store(false, Ordering::Relaxed);
    pipeline
        .edit(&input(), &settings(4), &mut |_| {}, &cancel)
        .unwrap();
}

#[test]
fn nonsense_settings_are_refused_before_work() {
    let mut pipeline = pipeline();
    let cancel = AtomicBool::new(false);
    for bad in [
        EditSettings {
            steps: 0,
            ..settings(0)
        },
        EditSettings {
            guidance_scale: f64::NAN,
            ..settings(0)
        },
        EditSettings {
            image_guidance_scale: -1.0,
            ..settings(0)
        },
    ] {
        let mut called = false;
        let result = pipeline.edit(&input(), &bad, &mut |_| called = true, &cancel);
        assert!(
            matches!(result, Err(EditError::InvalidSetting { .. })),
            "{result:?}"
        );
        assert!(!called);
    }
    let odd = image::RgbImage::new(60, 44);
    let result = pipeline.edit(&odd, &settings(0), &mut |_| {}, &cancel);
    assert!(
        matches!(result, Err(EditError::ImageSize { .. })),
        "{result:?}"
    );
}
