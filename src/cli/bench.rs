//! `instruct-pix2pix bench`: times edits on a model (seconds per step, per edit, the encoders'
//! and the VAE decoder's share, peak memory) and prints them as one JSON line, for
//! docs/benchmarks.md.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use image::{Rgb, RgbImage};

use super::load::{ModelFlags, load_model};
use super::progress::Progress;
use crate::model::device::{DTypeChoice, DeviceChoice};
use crate::pipeline::scheduler::SchedulerKind;
use crate::pipeline::{EditPipeline, EditSettings};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A folder in diffusers' layout or a Hub repo id.
    #[arg(long, value_name = "DIR|REPO_ID", default_value = crate::model::hub::DEFAULT_REPO)]
    pub model: String,
    /// Side of the square test image, in pixels.
    #[arg(long, value_name = "PX", default_value_t = 256)]
    pub size: u32,
    /// Denoising steps per edit.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub steps: usize,
    /// Timed edits after one untimed warm-up edit (0 skips the warm-up and times one edit).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub runs: usize,
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<SchedulerKind>,
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    #[arg(long, value_name = "DTYPE", default_value = "f32")]
    pub dtype: DTypeChoice,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let flags = ModelFlags {
        model: &args.model,
        config: None,
        loras: &[],
        revision: None,
        device: args.device,
        dtype: args.dtype,
    };
    let load_started = Instant::now();
    let model = load_model(&flags, &mut Progress::new(true))?;
    let dtype = model.precision_label();
    let load_seconds = load_started.elapsed().as_secs_f64();
    let mut pipeline = EditPipeline::new(model)?;
    let multiple = pipeline.size_multiple();
    let side = (args.size / multiple).max(1) * multiple;
    let image = RgbImage::from_fn(side, side, |x, y| {
        Rgb([
            (x * 255 / side) as u8,
            (y * 255 / side) as u8,
            ((x + y) * 127 / side) as u8,
        ])
    });
    let mut settings = EditSettings {
        prompt: "make it look like a watercolor painting".into(),
        steps: args.steps,
        scheduler: args.scheduler,
        ..EditSettings::default()
    };
    let cancel = AtomicBool::new(false);
    let runs = args.runs.max(1);
    if args.runs > 0 {
        // Warm-up: first-touch of memory-mapped weights and allocator growth.
        pipeline.edit(&image, &settings, &mut |_| {}, &cancel)?;
    }
    let mut step_seconds = Vec::new();
    let mut edit_seconds = Vec::new();
    let mut encode_seconds = Vec::new();
    let mut decode_seconds = Vec::new();
    for run in 0..runs {
        settings.seed = run as u64;
        // A new prompt each run so text and image encoding are timed too.
        settings.prompt = format!("make it look like a watercolor painting, take {run}");
        pipeline.clear_caches();
        let started = Instant::now();
        let output = pipeline.edit(&image, &settings, &mut |_| {}, &cancel)?;
        edit_seconds.push(started.elapsed().as_secs_f64());
        step_seconds.push(output.denoise_time.as_secs_f64() / args.steps as f64);
        encode_seconds.push(output.encode_time.as_secs_f64());
        decode_seconds.push(output.decode_time.as_secs_f64());
    }
    let first_preview_seconds = first_preview_after_slider(&mut pipeline, &image, &settings)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let report = serde_json::json!({
        "tool": "instruct-pix2pix",
        "version": env!("CARGO_PKG_VERSION"),
        "model": args.model,
        "size": side,
        "steps": args.steps,
        "dtype": dtype,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_kernels": crate::model::nn::cpu_kernels_name(),
        "winograd_conv": crate::model::nn::winograd_conv_available(),
        "load_s": load_seconds,
        "s_per_step": mean(&step_seconds),
        "s_per_edit": mean(&edit_seconds),
        "encode_s": mean(&encode_seconds),
        "vae_decode_s": mean(&decode_seconds),
        "runs": runs,
        "reedit_first_preview_s": first_preview_seconds,
        "peak_rss_mb": peak_rss_mb(),
    });
    println!("{report}");
    Ok(())
}

/// The window's re-edit when a guidance slider moves: the same image and instruction (their
/// encodings cached from the edit before), the image guidance changed. Seconds from the start of
/// the edit to the first step's latent preview (the window's preview size, 256 px), then the
/// edit is cancelled.
fn first_preview_after_slider(
    pipeline: &mut EditPipeline,
    image: &RgbImage,
    last: &EditSettings,
) -> Result<f64> {
    let moved = EditSettings {
        image_guidance_scale: last.image_guidance_scale + 0.1,
        ..last.clone()
    };
    let cancel = AtomicBool::new(false);
    let started = Instant::now();
    let mut first_preview = None;
    let result = pipeline.edit(
        image,
        &moved,
        &mut |step| {
            if first_preview.is_none() && step.preview(256, 256).is_ok() {
                first_preview = Some(started.elapsed().as_secs_f64());
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        },
        &cancel,
    );
    match (first_preview, result) {
        (Some(seconds), _) => Ok(seconds),
        (None, Err(error)) => Err(error.into()),
        (None, Ok(_)) => anyhow::bail!("the re-edit made no step"),
    }
}

/// Peak resident memory of this process in MiB (Linux: VmHWM), or null elsewhere.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
