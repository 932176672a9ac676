//! Seconds per training step (forward, backward, AdamW) of `train::step::Trainer` on a pipeline
//! folder, with random 1-sample batches: what `instruct-pix2pix train` runs per step, without
//! the data loading, for A/B timings of the CPU kernels.
//!
//! ```text
//! cargo run --release --locked --example train_step_bench -- MODEL_DIR [RESOLUTION] [STEPS] [full|lora] [fast|candle]
//! ```
//!
//! Defaults: 256, 4 steps (the first one, a warm-up, is not counted), full training, `fast`
//! (the fused CPU kernels; `candle` switches them off everywhere). Prints each step's time and
//! the median of the counted ones; each step's time is split into the frozen encoders' part
//! (VAE and text encoder), the UNet's forward + backward and the optimizer's part (clipping and
//! AdamW), and the step's large allocations that the process's block cache could not serve
//! are counted, with the fresh memory they took (faulted in and cleared page by page).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use instruct_pix2pix::model::nn;
use instruct_pix2pix::train::data::TrainBatch;
use instruct_pix2pix::train::lora::{LoraConfig, UNetLora};
use instruct_pix2pix::train::optim::AdamWConfig;
use instruct_pix2pix::train::schedule::{LrSchedule, LrScheduleKind};
use instruct_pix2pix::train::step::{
    StepConfig, StepDraws, TrainLoadOptions, Trainer, TrainingModels,
};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let folder = PathBuf::from(args.first().context(
        "usage: train_step_bench MODEL_DIR [RESOLUTION] [STEPS] [full|lora] [fast|candle]",
    )?);
    let resolution: usize = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(256);
    let steps: u64 = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(4);
    let lora = match args.get(3).map(String::as_str) {
        None | Some("full") => false,
        Some("lora") => true,
        Some(other) => bail!("expected full or lora, got {other}"),
    };
    match args.get(4).map(String::as_str) {
        None | Some("fast") => nn::set_fast_cpu_kernels(true),
        Some("candle") => nn::set_fast_cpu_kernels(false),
        Some(other) => bail!("expected fast or candle, got {other}"),
    }

    let mut models = TrainingModels::load(&folder, &TrainLoadOptions::default())?;
    let params = if lora {
        models.unet.freeze_base()?;
        UNetLora::attach(&mut models.unet.unet, LoraConfig::new(4), 0)?.named_vars()
    } else {
        models.unet.params().to_vec()
    };
    let trainable: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    println!("{trainable} trainable parameters");
    let latent_shape = models.latent_shape(1, resolution);
    let timesteps = models.noise_schedule.num_train_timesteps();
    let schedule = LrSchedule::new(LrScheduleKind::Constant, 1e-4, 0, steps)?;
    let config = StepConfig {
        gradient_accumulation_steps: 1,
        max_grad_norm: 1.0,
        conditioning_dropout_prob: Some(0.05),
    };
    let mut trainer = Trainer::with_trainable(
        models,
        params,
        AdamWConfig::default(),
        schedule,
        None,
        config,
    )?;

    let image = |seed: u64| -> Result<Tensor> {
        let values = Tensor::rand(-1f32, 1f32, (1, 3, resolution, resolution), &Device::Cpu)?;
        // Different images per step without a seeded generator: shift by the seed.
        Ok((values * (1.0 - 0.01 * seed as f64))?)
    };
    let mut times = Vec::new();
    for step in 0..steps {
        let batch = TrainBatch {
            original_pixel_values: image(step)?,
            edited_pixel_values: image(step + 100)?,
            prompts: vec!["make it snowy".into()],
            names: vec![format!("bench{step}")],
        };
        let draws = StepDraws::seeded(0, step, latent_shape, timesteps, &Device::Cpu)?;
        let heap_before = instruct_pix2pix::heap::stats();
        let started = Instant::now();
        let encoded = trainer.models().encode_batch(&batch)?;
        let encoded_at = Instant::now();
        trainer.accumulate_encoded(&encoded, &draws)?;
        let backward_done = Instant::now();
        trainer.optimizer_step()?;
        let seconds = started.elapsed().as_secs_f64();
        let heap = instruct_pix2pix::heap::stats();
        let encoding = (encoded_at - started).as_secs_f64();
        let forward_backward = (backward_done - encoded_at).as_secs_f64();
        println!(
            "step {step}: {seconds:.3} s (VAE + text encoder {encoding:.3} s, UNet forward + backward {forward_backward:.3} s, clipping + AdamW {:.3} s; {} large blocks not in the block cache, {} of them resized cached ones, {:.0} MB of fresh memory)",
            seconds - forward_backward - encoding,
            heap.misses - heap_before.misses,
            heap.resized - heap_before.resized,
            (heap.fresh_bytes - heap_before.fresh_bytes) as f64 / 1e6,
        );
        if step > 0 {
            times.push(seconds);
        }
    }
    times.sort_by(f64::total_cmp);
    if let Some(median) = times.get(times.len() / 2) {
        println!("median of steps 1..={}: {median:.3} s", steps - 1);
    }
    Ok(())
}
