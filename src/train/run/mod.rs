//! The training loop of `train_instruct_pix2pix.py` as a library, for the `train` command and
//! the window's "Fine-tune on folder" dialog: [`train`] takes a [`TrainConfig`] (the script's
//! flags, validated by [`TrainConfig::validate`], every nonsense value refused with a message
//! naming the flag), a [`TrainControl`] (pause and stop flags another thread may set) and a
//! callback receiving [`TrainEvent`]s (plain data: the dataset check, step metrics, checkpoints,
//! validation images, the end).
//!
//! # The procedure (the script's)
//! - `batches_per_epoch = ceil(examples / train_batch_size)` (partial last batch kept),
//!   `num_update_steps_per_epoch = ceil(batches_per_epoch / gradient_accumulation_steps)`;
//!   `max_train_steps` defaults to `num_train_epochs · num_update_steps_per_epoch` and, when
//!   given, overrides the epochs: `num_train_epochs = ceil(max_train_steps / updates_per_epoch)`.
//! - `--scale_lr`: `learning_rate · gradient_accumulation_steps · train_batch_size` (one process).
//! - Micro-batches accumulate; the optimizer steps after `gradient_accumulation_steps` of them or
//!   at the end of an epoch (accelerate syncs there), then the EMA follows.
//! - Every `checkpointing_steps` optimizer steps, `checkpoint-STEP/` ([`super::checkpoint`]) with
//!   the UNet (or LoRA) weights, AdamW's moments, the EMA, and `state.json`: step, epoch, the
//!   sampler's position and the micro-batch counter the random draws derive from
//!   ([`super::step::StepDraws::seeded`]), so a resumed run draws exactly what the uninterrupted
//!   one would have and ends with the same weights. `checkpoints_total_limit` keeps the newest.
//!   (The script recomputes the data position from the step; saving it is equivalent and also
//!   exact when an epoch's last optimizer step takes fewer micro-batches.)
//! - Validation (when a prompt and an image are given): at the end of every epoch whose number is
//!   a multiple of `validation_epochs`, and at the end of training, `num_validation_images` edits
//!   of the validation image with the EMA weights when `--use_ema` (the current ones otherwise),
//!   as the script's `log_validation`: 20 steps, guidance 7, image guidance 1.5, the model's own
//!   scheduler, seeds `seed, seed + 1, ...` (the script draws them one after another from one
//!   generator). The image is first scaled so its longer side is at most `resolution` (the script
//!   edits it at its own size). Saved as `output_dir/validation/step-STEP-I.png` and listed in
//!   `metrics.jsonl`.
//! - The end: the EMA weights copied in when used; a full fine-tune writes the complete model
//!   folder into `output_dir` ([`super::output::write_final_model`]), a LoRA training
//!   `output_dir/pytorch_lora_weights.safetensors` ([`super::lora`]).
//! - Metrics: every optimizer step appends to `output_dir/metrics.jsonl`; with
//!   `report_to_tensorboard`, also TensorBoard scalars (`train_loss`, `lr`, `grad_norm`) under
//!   `output_dir/logs/instruct-pix2pix/` (accelerate's `logging_dir/project_name`).
//!
//! A stop request ([`TrainControl::request_stop`]) ends the run between micro-batches: micro-
//! batches accumulated since the last optimizer step are dropped, a checkpoint of the last step
//! is saved (resuming from it continues the run) and the model so far is written.
//!
//! - `--cache_latents`: before the first step (and again on resume: the cache is not saved),
//!   every example is encoded once ([`super::latent_cache`], with [`TrainEvent::CachingLatents`]
//!   as it goes) and the steps read those encodings; the VAE and text encoder are then freed
//!   unless validation edits need them. The random draws are the same, so the run's losses and
//!   weights are those of the uncached run.
//!
//! Bad examples: the dataset is checked first ([`Dataset::check`]); with `skip_bad_examples` the
//! bad ones are left out, otherwise the run stops with [`RunError::BadExamples`] listing them.
//! An example that passes the check but fails to decode later is skipped with a
//! [`TrainEvent::Notice`], never a crash.
//!
//! This file owns the loop itself ([`train`], checkpoint saving and resuming, validation);
//! the settings live in `config` ([`TrainConfig`]) and what the run reports in `events`
//! ([`RunError`], [`TrainControl`], [`TrainEvent`]), both re-exported here.

mod config;
mod events;
mod memory_plan;
mod parallel;
mod resume;

pub use config::{
    DEFAULT_LEARNING_RATE, DataSource, MAX_RESOLUTION, MemoryCheck, MixedPrecision,
    RECOMMENDED_LEARNING_RATE, TrainConfig, ValidationConfig,
};
pub use events::{
    RunError, RunPlan, StepEvent, TrainControl, TrainEvent, TrainOutcome, ValidationEvent,
    memory_in_use,
};

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use candle_core::{Tensor, Var};
use serde_json::{Value, json};

use super::checkpoint::{self, TensorGroup, resolve_resume_choice, save_checkpoint};
use super::data::{
    CropMode, Dataset, DatasetOptions, EpochSampler, FlipMode, SamplerPosition, prepare_batch,
};
use super::ema::{EmaConfig, EmaModel, EmaState};
use super::latent_cache::{CacheOptions, LatentCache};
use super::lora::{LoraConfig, UNetLora, lora_key};
use super::loss_scale::{LossScaleState, LossScaler};
use super::metrics::{MetricsLog, StepMetrics, TensorBoardWriter};
use super::optim::{AdamW, AdamWState, MomentStorage};
use super::output::write_final_model;
use super::schedule::LrSchedule;
use super::step::{
    EncodedBatch, StepConfig, StepDraws, TrainError, TrainLoadOptions, Trainer, TrainingModels,
};
use crate::model::InstructPix2PixModel;
use crate::model::hub::HubSettings;
use crate::model::nn::LowRankAdapter;
use crate::model::unet::UNet2DConditionModel;
use crate::pipeline::EditSettings;
use crate::pipeline::edit::EditPipeline;
use crate::pipeline::image::{edit_size, resize_lanczos, save_image};
use memory_plan::MemoryPlan;
use parallel::Parallel;
use resume::{check_resume_state, restore_weights};

/// The validation folder inside the output folder.
pub const VALIDATION_DIR: &str = "validation";
/// Where TensorBoard event files go inside the output folder (accelerate's
/// `logging_dir/project_name` with the script's `logs` and `instruct-pix2pix`).
pub const TENSORBOARD_DIR: &str = "logs/instruct-pix2pix";
/// The script's validation edit: denoising steps.
pub const VALIDATION_STEPS: usize = 20;
/// The script's validation edit: text guidance.
pub const VALIDATION_GUIDANCE_SCALE: f64 = 7.0;
/// The script's validation edit: image guidance.
pub const VALIDATION_IMAGE_GUIDANCE_SCALE: f64 = 1.5;
/// The run's data position and counters, saved in every checkpoint's `state.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct LoopState {
    global_step: u64,
    /// Where the sampler continues after this step's last micro-batch.
    sampler: SamplerPosition,
    /// Micro-batches taken so far (the index of the next one's random draws).
    micro_batch_index: u64,
    optimizer: AdamWState,
    ema: Option<EmaState>,
    lora_rank: Option<usize>,
    seed: u64,
    examples: usize,
    train_batch_size: usize,
    /// Processes that trained together (their global batch is `train_batch_size · processes`);
    /// 1 in checkpoints written before data-parallel training.
    #[serde(default = "one_process")]
    processes: usize,
    resolution: u32,
    /// The float16 loss scale (`--mixed_precision fp16` on a GPU); absent otherwise and in
    /// checkpoints written before mixed precision computed in half.
    #[serde(default)]
    loss_scale: Option<LossScaleState>,
}

fn one_process() -> usize {
    1
}

const GROUP_UNET: &str = "unet";
const GROUP_LORA: &str = "lora";
const GROUP_OPTIMIZER: &str = "optimizer";
const GROUP_EMA: &str = "ema";

/// Steps in a row whose loss or gradients are not finite before the run stops as diverged.
pub const MAX_NON_FINITE_STEPS_IN_A_ROW: u32 = 3;

/// The running state [`train`] threads through its helpers.
struct Run<'a> {
    config: &'a TrainConfig,
    trainer: Trainer,
    lora: Option<UNetLora>,
    /// Rank 0's (the others write nothing).
    metrics: Option<MetricsLog>,
    tensorboard: Option<TensorBoardWriter>,
    last_checkpoint: Option<PathBuf>,
    last_checkpoint_step: Option<u64>,
    /// Sampler position and micro-batch counter right after the last optimizer step.
    step_state: (SamplerPosition, u64),
    started: Instant,
    /// Examples trained on (checked again on resume).
    examples: usize,
    /// `--cache_latents`: every example's encodings, read instead of running the encoders.
    cache: Option<LatentCache>,
    /// The other processes of a data-parallel run.
    parallel: Option<Parallel>,
}

/// The crop the settings ask for.
fn crop_mode(config: &TrainConfig) -> CropMode {
    if config.center_crop {
        CropMode::Center
    } else {
        CropMode::Random
    }
}

/// Runs a whole training (see the module doc): checks the data, loads the model, resumes when
/// asked, trains, checkpoints, validates, writes the final model. `on_event` sees everything as
/// it happens; the outcome is also returned.
pub fn train(
    config: &TrainConfig,
    control: &TrainControl,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainOutcome, RunError> {
    config.validate()?;
    // The other processes first: a run whose ranks cannot meet stops before any work.
    let mut parallel =
        Parallel::connect(config.distributed.as_ref(), &config.device, &control.stop)?;
    let adopted;
    let config = match &mut parallel {
        Some(parallel) => {
            // Every rank draws from rank 0's seed (a launcher without --seed gives each its own).
            let (seed, differed) = parallel.adopt_rank0(config.seed)?;
            if differed {
                on_event(TrainEvent::Notice(format!(
                    "rank {} takes rank 0's seed {seed}",
                    parallel.rank()
                )));
            }
            adopted = TrainConfig {
                seed,
                ..config.clone()
            };
            &adopted
        }
        None => config,
    };
    let main_rank = parallel.as_ref().is_none_or(|p| p.rank() == 0);

    // The data first: a bad dataset is refused before the model is loaded.
    let options = DatasetOptions {
        columns: config.columns.clone(),
        max_train_samples: config.max_train_samples,
        seed: config.seed,
    };
    let dataset = match &config.data {
        DataSource::TrainDataDir(dir) => Dataset::open_train_data_dir(dir, &options)?,
        DataSource::DatasetName { name, revision } => {
            // A Hub dataset downloads first: one line per file, and a stop request cancels it.
            let mut announced = 0;
            Dataset::fetch_dataset_name(
                name,
                revision.as_deref(),
                &HubSettings::from_env(),
                &options,
                &mut |download| {
                    if download.file_index != announced {
                        announced = download.file_index;
                        let bytes = download.bytes_total;
                        let size = if bytes < 1_000_000 {
                            format!("{} kB", bytes.div_ceil(1000))
                        } else {
                            format!("{:.1} MB", bytes as f64 / 1e6)
                        };
                        on_event(TrainEvent::Notice(format!(
                            "downloading dataset {name}: {} ({} of {}, {size})",
                            download.file, download.file_index, download.file_count
                        )));
                    }
                },
                &control.stop,
            )?
        }
    };
    let report = dataset.check(config.check_level);
    on_event(TrainEvent::DatasetChecked(report.clone()));
    let dataset = if report.is_clean() {
        dataset
    } else if config.skip_bad_examples && !report.good.is_empty() {
        on_event(TrainEvent::Notice(format!(
            "skipping {} bad examples, training on {}",
            report.problems.len(),
            report.good.len()
        )));
        dataset.subset(&report.good)?
    } else {
        return Err(RunError::BadExamples { report });
    };
    if let Some(parallel) = &mut parallel {
        parallel.check_same(
            "examples in the dataset",
            dataset.len() as u64,
            "every machine needs the same data at the same path",
        )?;
    }
    let processes = parallel.as_ref().map_or(1, Parallel::world_size);
    // accelerate's sharding: a global batch of train_batch_size per process.
    let global_batch = config.train_batch_size * processes;

    // Memory: refused here, before the model loads and anything is written, when it cannot fit.
    let memory = MemoryPlan::check(config, dataset.len())?;
    let lora = config.lora_rank.is_some();
    if let Some(line) = config.mixed_precision.cpu_notice(&config.device, lora) {
        on_event(TrainEvent::Notice(line));
    }
    let cpu_bf16 = config.mixed_precision.cpu_bf16(&config.device);

    let mut models = TrainingModels::load(
        &config.pretrained_model,
        &TrainLoadOptions {
            variant: config.variant,
            frozen_dtype: config.mixed_precision.frozen_dtype(&config.device),
            device: config.device.clone(),
            seed: config.seed,
            keep_vae_decoder: config.validation.is_some(),
            bf16_frozen_encoders: cpu_bf16,
            bf16_frozen_unet: cpu_bf16 && lora,
        },
    )?;
    let factor = models.vae_config().downscale_factor() as u32;
    if !config.resolution.is_multiple_of(factor) {
        return Err(RunError::Setting {
            flag: "--resolution",
            value: config.resolution.to_string(),
            reason: format!("must be a multiple of {factor} (the VAE's downscale factor)"),
        });
    }
    // The validation image is edited at the end of epochs: one that cannot be edited is refused
    // now, not after an epoch of work.
    if let Some(validation) = &config.validation {
        let (w, h) = validation.image.dimensions();
        edit_size(w, h, config.resolution, factor).map_err(|error| RunError::Setting {
            flag: "--val_image_url",
            value: format!("{w}×{h} image"),
            reason: error.to_string(),
        })?;
    }
    let grew_conv_in = models.unet.grew_conv_in();
    if grew_conv_in {
        on_event(TrainEvent::Notice(
            "the base model is plain Stable Diffusion: conv_in grows from 4 to 8 input channels (new weights 0, new bias drawn as torch initialises it)".into(),
        ));
    }

    // Mixed precision: the UNet computes in half over float32 master weights (set before LoRA
    // freezes the base, which is then kept in half as diffusers' LoRA scripts do).
    models
        .unet
        .set_compute_dtype(config.mixed_precision.frozen_dtype(&config.device));
    // What trains: the whole UNet, or LoRA adapters on a frozen one.
    let lora = match config.lora_rank {
        Some(rank) => {
            models.unet.freeze_base()?;
            Some(UNetLora::attach(
                &mut models.unet.unet,
                LoraConfig::new(rank),
                config.seed,
            )?)
        }
        None => None,
    };
    let params: Vec<(String, Var)> = match &lora {
        Some(lora) => lora.named_vars(),
        None => models.unet.params().to_vec(),
    };
    if config.gradient_checkpointing {
        // After the LoRA setup: freezing the base rebuilds the UNet.
        models.unet.unet.enable_gradient_checkpointing();
    }
    let moment_storage = if config.use_8bit_adam {
        MomentStorage::Blockwise8Bit
    } else {
        MomentStorage::Float32
    };
    let trainable_parameters = params.iter().map(|(_, v)| v.elem_count()).sum();

    // The script's arithmetic.
    let flip = if config.random_flip {
        FlipMode::PerBatch
    } else {
        FlipMode::Never
    };
    let batches_per_epoch = dataset.len().div_ceil(global_batch);
    let updates_per_epoch = batches_per_epoch.div_ceil(config.gradient_accumulation_steps) as u64;
    let total_steps = config
        .max_train_steps
        .unwrap_or(config.num_train_epochs * updates_per_epoch);
    let epochs = total_steps.div_ceil(updates_per_epoch);
    let learning_rate = if config.scale_lr {
        config.learning_rate
            * config.gradient_accumulation_steps as f64
            * config.train_batch_size as f64
            * processes as f64
    } else {
        config.learning_rate
    };
    let schedule = LrSchedule::new(
        config.lr_scheduler,
        learning_rate,
        config.lr_warmup_steps,
        total_steps,
    )?;
    let step_config = StepConfig {
        gradient_accumulation_steps: config.gradient_accumulation_steps,
        max_grad_norm: config.max_grad_norm,
        conditioning_dropout_prob: config.conditioning_dropout_prob,
    };

    // Resume, or start fresh.
    let resume_dir = match &config.resume_from_checkpoint {
        Some(value) => {
            let choice = resolve_resume_choice(&config.output_dir, value)?;
            for notice in choice.notices() {
                on_event(TrainEvent::Notice(notice));
            }
            let dir = choice.dir;
            if dir.is_none() {
                on_event(TrainEvent::Notice(format!(
                    "checkpoint '{value}' does not exist; starting a new training run"
                )));
            }
            dir
        }
        None => None,
    };
    let ema_config = config.use_ema.then(EmaConfig::default);
    let (mut trainer, sampler, micro_batch_index) = match &resume_dir {
        Some(dir) => {
            let loaded = checkpoint::load_checkpoint(dir, &config.device)?;
            for (group, tensors) in &loaded.groups {
                check_finite(
                    &format!("the checkpoint {} ({group})", loaded.path.display()),
                    tensors,
                )?;
            }
            let state = check_resume_state(&loaded, config, dataset.len(), processes)?;
            restore_weights(&loaded, &models, lora.as_ref())?;
            let optimizer = AdamW::from_state(
                params.clone(),
                state.optimizer.clone(),
                loaded.group(GROUP_OPTIMIZER)?.to_vec(),
            )
            .map_err(TrainError::from)?;
            let ema = match &state.ema {
                Some(ema_state) => Some(
                    EmaModel::from_state(
                        ema_state.clone(),
                        loaded.group(GROUP_EMA)?.to_vec(),
                        &params,
                    )
                    .map_err(TrainError::from)?,
                ),
                None => None,
            };
            let mut trainer = Trainer::resume(models, optimizer, schedule, ema, step_config)?;
            if let Some(loss_scale) = state.loss_scale {
                trainer.restore_loss_scale(loss_scale);
            }
            let sampler = EpochSampler::resume(
                dataset.len(),
                global_batch,
                config.seed,
                flip,
                state.sampler,
            )?;
            (trainer, sampler, state.micro_batch_index)
        }
        None => {
            let optimizer = AdamW::with_storage(params, config.adam.clone(), moment_storage)
                .map_err(TrainError::from)?;
            let trainer =
                Trainer::with_optimizer(models, optimizer, schedule, ema_config, step_config)?;
            let sampler = EpochSampler::new(dataset.len(), global_batch, config.seed, flip)?;
            (trainer, sampler, 0)
        }
    };
    let cache = if config.cache_latents {
        cache_latents(&dataset, &mut trainer, config, control, on_event)?
    } else {
        None
    };
    let first_step = trainer.global_step();
    if let Some(parallel) = &mut parallel {
        parallel.check_same(
            "the step the run starts from",
            first_step,
            "every rank must see the same checkpoints: put --output_dir on a shared disk",
        )?;
    }
    // Nothing is written before everything above succeeded, and only by rank 0.
    let metrics = if !main_rank {
        None
    } else {
        std::fs::create_dir_all(&config.output_dir).map_err(|source| RunError::Io {
            path: config.output_dir.clone(),
            source,
        })?;
        Some(if resume_dir.is_some() {
            MetricsLog::resume(&config.output_dir, first_step)?
        } else {
            MetricsLog::open(&config.output_dir)?
        })
    };
    let tensorboard = if config.report_to_tensorboard && main_rank {
        Some(TensorBoardWriter::create(
            &config.output_dir.join(TENSORBOARD_DIR),
        )?)
    } else {
        None
    };
    on_event(TrainEvent::Started(RunPlan {
        examples: dataset.len(),
        batches_per_epoch,
        updates_per_epoch,
        total_steps,
        epochs,
        first_step,
        learning_rate,
        trainable_parameters,
        grew_conv_in,
        resumed_from: resume_dir.clone(),
        estimated_peak_bytes: memory.estimate,
        available_bytes: memory.available,
        device: crate::model::device::device_label(&config.device),
        processes,
        per_process_batch: config.train_batch_size,
        accumulation_steps: config.gradient_accumulation_steps,
        effective_batch: global_batch * config.gradient_accumulation_steps,
        backend: parallel.as_ref().map(Parallel::backend_name),
    }));

    let mut run = Run {
        config,
        trainer,
        lora,
        metrics,
        tensorboard,
        last_checkpoint: None,
        last_checkpoint_step: resume_dir.as_ref().map(|_| first_step),
        step_state: (sampler.position(), micro_batch_index),
        started: Instant::now(),
        examples: dataset.len(),
        cache,
        parallel,
    };
    let outcome = match run.train_loop(
        &dataset,
        sampler,
        micro_batch_index,
        total_steps,
        batches_per_epoch,
        control,
        on_event,
    ) {
        Ok(outcome) => outcome,
        Err(error) => {
            if main_rank {
                run.save_after_failure(&error, on_event);
            }
            let step = run.trainer.global_step() + 1;
            return Err(memory.out_of_memory_in_step(error, step, || run.newest_checkpoint()));
        }
    };
    on_event(TrainEvent::Finished(outcome.clone()));
    Ok(outcome)
}

/// `--cache_latents`: encodes every example once ([`LatentCache::build`]), reporting
/// [`TrainEvent::CachingLatents`] after each and the cache's size at the end, then frees the VAE
/// and text encoder unless validation edits need them. `None` when a stop request came first.
fn cache_latents(
    dataset: &Dataset,
    trainer: &mut Trainer,
    config: &TrainConfig,
    control: &TrainControl,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<Option<LatentCache>, RunError> {
    let options = CacheOptions {
        resolution: config.resolution,
        crop: crop_mode(config),
        both_flips: config.random_flip,
        device: config.device.clone(),
    };
    on_event(TrainEvent::CachingLatents {
        done: 0,
        total: dataset.len(),
    });
    let Some(cache) = LatentCache::build(
        dataset,
        trainer.models(),
        &options,
        &|| control.stop_requested(),
        &mut |done, total| on_event(TrainEvent::CachingLatents { done, total }),
    )?
    else {
        return Ok(None);
    };
    if cache.unreadable() == cache.len() {
        return Err(RunError::NoUsableExamples {
            examples: cache.len(),
            first_error: cache.first_unreadable().unwrap_or_default().to_string(),
        });
    }
    let size = cache.bytes() as f64;
    let size = if size >= 1e9 {
        format!("{:.1} GB", size / 1e9)
    } else if size >= 1e6 {
        format!("{:.1} MB", size / 1e6)
    } else {
        format!("{:.1} kB", size / 1e3)
    };
    let flips = if config.random_flip {
        " (both flips)"
    } else {
        ""
    };
    let encoders = if config.validation.is_some() {
        "the VAE and text encoder stay loaded for the validation edits"
    } else {
        trainer.release_frozen_encoders();
        "the VAE and text encoder are freed"
    };
    on_event(TrainEvent::Notice(format!(
        "cached the latents of {} examples{flips}: {size} in memory; {encoders}",
        cache.len() - cache.unreadable()
    )));
    if cache.bytes() as f64 >= LARGE_CACHE_BYTES {
        on_event(TrainEvent::Notice(format!(
            "the latent cache is large ({size}); without --cache_latents the examples are encoded at each step instead"
        )));
    }
    Ok(Some(cache))
}

/// A latent cache at least this large gets its own notice.
const LARGE_CACHE_BYTES: f64 = 2e9;

impl Run<'_> {
    /// Whether to stop and whether to pause before the next micro-batch. The processes of a
    /// data-parallel run decide together (a Ctrl+C or the window's Pause reaches them at
    /// different moments).
    fn stop_or_pause(&mut self, control: &TrainControl) -> Result<[bool; 2], RunError> {
        let flags = [control.stop_requested(), control.is_paused()];
        match &mut self.parallel {
            Some(parallel) => parallel.any(flags),
            None => Ok(flags),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn train_loop(
        &mut self,
        dataset: &Dataset,
        mut sampler: EpochSampler,
        mut micro_batch_index: u64,
        total_steps: u64,
        batches_per_epoch: usize,
        control: &TrainControl,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<TrainOutcome, RunError> {
        let config = self.config;
        let crop = crop_mode(config);
        let num_train_timesteps = self.trainer.models().noise_schedule.num_train_timesteps();
        let mut step_started = Instant::now();
        let mut recent_step_seconds: Vec<f64> = Vec::new();
        let mut first_step_of_run = true;
        let mut last_validation_step = None;
        let mut stopped = false;
        let mut unreadable = HashSet::new();
        let mut first_unreadable: Option<String> = None;
        let mut non_finite_in_a_row = 0u32;

        while self.trainer.global_step() < total_steps {
            let [stop, pause] = self.stop_or_pause(control)?;
            if stop {
                stopped = true;
                break;
            }
            if pause {
                on_event(TrainEvent::Paused);
                // Every rank waits here together (a rank left in a sum would time out).
                while self.stop_or_pause(control)? == [false, true] {
                    std::thread::sleep(Duration::from_millis(50));
                }
                on_event(TrainEvent::Resumed);
                step_started = Instant::now();
                continue;
            }

            let batch = sampler.next_batch();
            let epoch = batch.position.epoch;
            let last_of_epoch = batch.position.batch + 1 == batches_per_epoch;
            let draws_index = micro_batch_index;
            micro_batch_index += 1;
            // This process's rows of the global batch (all of them for a single process).
            let rows = match &self.parallel {
                Some(parallel) => parallel.local_rows(batch.indices.len(), config.train_batch_size),
                None => 0..batch.indices.len(),
            };
            let mut used_rows = Vec::with_capacity(rows.len());

            // Bad files found only now are skipped, never a crash: one notice per example, and
            // the run ends once every example has failed (it would spin forever otherwise).
            let mut failed: Vec<(usize, String)> = Vec::new();
            let encoded = match &self.cache {
                Some(cache) => {
                    let mut parts = Vec::with_capacity(rows.len());
                    for row in rows {
                        let index = batch.indices[row];
                        match cache.get(index, batch.flips[row]) {
                            Ok(encoded) => {
                                parts.push(encoded);
                                used_rows.push(row);
                            }
                            Err(miss) => failed.push((index, miss.to_string())),
                        }
                    }
                    if parts.is_empty() {
                        None
                    } else {
                        Some(EncodedBatch::cat(&parts)?)
                    }
                }
                None => {
                    let mut examples = Vec::with_capacity(rows.len());
                    let mut flips = Vec::with_capacity(rows.len());
                    for row in rows {
                        let index = batch.indices[row];
                        match dataset.load(index) {
                            Ok(example) => {
                                examples.push(example);
                                flips.push(batch.flips[row]);
                                used_rows.push(row);
                            }
                            Err(error) => failed.push((index, error.to_string())),
                        }
                    }
                    if examples.is_empty() {
                        None
                    } else {
                        let prepared = prepare_batch(
                            &examples,
                            &flips,
                            config.resolution,
                            crop,
                            &config.device,
                        )?;
                        Some(self.trainer.models().encode_batch(&prepared)?)
                    }
                }
            };
            for (index, message) in failed {
                if unreadable.insert(index) {
                    on_event(TrainEvent::Notice(format!(
                        "skipped (this example will be left out from now on): {message}"
                    )));
                }
                first_unreadable.get_or_insert(message);
                if unreadable.len() == dataset.len() {
                    return Err(RunError::NoUsableExamples {
                        examples: dataset.len(),
                        first_error: first_unreadable.unwrap_or_default(),
                    });
                }
            }
            if let Some(encoded) = encoded {
                let [_, c, h, w] = self
                    .trainer
                    .models()
                    .latent_shape(1, config.resolution as usize);
                let draws = StepDraws::seeded_rows(
                    config.seed,
                    draws_index,
                    &used_rows,
                    [c, h, w],
                    num_train_timesteps,
                    &config.device,
                )?;
                // Several processes: each weighs its loss by its part of the global batch, so
                // the sum of their gradients is the whole batch's.
                let share = match &self.parallel {
                    Some(_) => used_rows.len() as f64 / batch.indices.len() as f64,
                    None => 1.0,
                };
                self.trainer.accumulate_share(&encoded, &draws, share)?;
            } else if self.parallel.is_some() {
                // Counted all the same, so that every process steps at the same micro-batch.
                self.trainer.count_empty_micro_batch();
            }

            let pending = self.trainer.pending_micro_batches();
            let sync = pending >= config.gradient_accumulation_steps || last_of_epoch;
            if sync && pending > 0 {
                let params_without_gradient = first_step_of_run
                    .then(|| self.params_without_gradient())
                    .transpose()?;
                first_step_of_run = false;
                if let Some(parallel) = &mut self.parallel {
                    parallel.reduce(&mut self.trainer)?;
                }
                let report = match self.trainer.optimizer_step() {
                    Err(TrainError::LossScaleOverflow { scale, new_scale }) => {
                        // float16's range, not divergence: skipped, as GradScaler does.
                        on_event(TrainEvent::Notice(format!(
                            "step {} skipped: the float16 gradients overflowed at loss scale {scale}; now {new_scale}",
                            self.trainer.global_step() + 1
                        )));
                        None
                    }
                    Err(TrainError::NonFiniteStep { loss, grad_norm }) => {
                        // Skipped (nothing changed); a few in a row mean the run diverged.
                        non_finite_in_a_row += 1;
                        let last_step = self.trainer.global_step();
                        on_event(TrainEvent::Notice(format!(
                            "step {} skipped: the loss or the gradients are not finite (loss {loss}, gradient norm {grad_norm})",
                            last_step + 1
                        )));
                        if non_finite_in_a_row >= MAX_NON_FINITE_STEPS_IN_A_ROW {
                            return Err(RunError::Diverged {
                                steps: non_finite_in_a_row,
                                last_step,
                                loss,
                                grad_norm,
                                last_checkpoint: self.newest_checkpoint(),
                            });
                        }
                        None
                    }
                    other => Some(other?),
                };
                if let Some(report) = report {
                    non_finite_in_a_row = 0;
                    self.step_state = (sampler.position(), micro_batch_index);
                    let seconds = step_started.elapsed().as_secs_f64();
                    recent_step_seconds.push(seconds);
                    if recent_step_seconds.len() > 20 {
                        recent_step_seconds.remove(0);
                    }
                    let mean =
                        recent_step_seconds.iter().sum::<f64>() / recent_step_seconds.len() as f64;
                    let (rss_bytes, peak_rss_bytes) = memory_in_use();
                    if let Some(metrics) = &mut self.metrics {
                        metrics.log_step(&StepMetrics {
                            step: report.step,
                            epoch,
                            loss: report.loss,
                            lr: report.lr,
                            grad_norm: Some(f64::from(report.grad_norm)),
                            seconds: self.started.elapsed().as_secs_f64(),
                        })?;
                    }
                    if let Some(tb) = &mut self.tensorboard {
                        tb.add_scalars(
                            report.step as i64,
                            &[
                                ("train_loss", report.loss as f32),
                                ("lr", report.lr as f32),
                                ("grad_norm", report.grad_norm),
                            ],
                        )?;
                    }
                    on_event(TrainEvent::Step(StepEvent {
                        step: report.step,
                        total_steps,
                        epoch,
                        loss: report.loss,
                        lr: report.lr,
                        grad_norm: report.grad_norm,
                        seconds_per_step: seconds,
                        eta_seconds: mean * total_steps.saturating_sub(report.step) as f64,
                        rss_bytes,
                        peak_rss_bytes,
                        params_without_gradient,
                    }));
                    if report.step.is_multiple_of(config.checkpointing_steps) && self.main_rank() {
                        self.checkpoint(on_event)?;
                    }
                }
                step_started = Instant::now();
            }

            // The script validates after each epoch's loop (also the one cut short by the end).
            let finished = self.trainer.global_step() >= total_steps;
            if (last_of_epoch || finished)
                && self.main_rank()
                && let Some(validation) = &config.validation
                && epoch.is_multiple_of(validation.every_epochs)
                && last_validation_step != Some(self.trainer.global_step())
            {
                self.validate(validation, epoch, on_event)?;
                last_validation_step = Some(self.trainer.global_step());
                step_started = Instant::now();
            }
        }

        let step = self.trainer.global_step();
        let main_rank = self.main_rank();
        if stopped && step > 0 && main_rank && self.last_checkpoint_step != Some(step) {
            self.checkpoint(on_event)?;
        }
        let model = if step > 0 && main_rank {
            Some(self.write_model()?)
        } else {
            None
        };
        if !stopped
            && main_rank
            && let Some(validation) = &config.validation
            && last_validation_step != Some(step)
        {
            let epoch = self.step_state.0.epoch;
            self.validate(validation, epoch, on_event)?;
        }
        // The others wait while rank 0 writes, so that no process ends before the run has.
        if let Some(parallel) = &mut self.parallel {
            parallel.barrier()?;
        }
        Ok(TrainOutcome {
            step,
            stopped,
            model,
            checkpoint: self.last_checkpoint.clone(),
        })
    }

    /// Whether this process writes the run's files (rank 0, or the only process).
    fn main_rank(&self) -> bool {
        self.parallel.as_ref().is_none_or(|p| p.rank() == 0)
    }

    /// A run that fails after its first step keeps that work: a checkpoint of the last applied
    /// step is saved (when it has none yet), unless the failure was in the weights themselves
    /// or in writing checkpoints. A second failure here is only reported.
    fn save_after_failure(&mut self, error: &RunError, on_event: &mut dyn FnMut(TrainEvent)) {
        let step = self.trainer.global_step();
        let weights_suspect = matches!(
            error,
            RunError::Diverged { .. } | RunError::NonFiniteWeights { .. } | RunError::Checkpoint(_)
        );
        if step == 0 || weights_suspect || self.last_checkpoint_step == Some(step) {
            return;
        }
        if let Err(second) = self.checkpoint(on_event) {
            on_event(TrainEvent::Notice(format!(
                "could not save a checkpoint of step {step} after the failure: {second}"
            )));
        }
    }

    /// The newest checkpoint on disk (this run's or an earlier one's).
    fn newest_checkpoint(&self) -> Option<PathBuf> {
        self.last_checkpoint.clone().or_else(|| {
            checkpoint::list_checkpoints(&self.config.output_dir)
                .ok()
                .and_then(|list| list.into_iter().max_by_key(|(step, _)| *step))
                .map(|(_, path)| path)
        })
    }

    /// The trained parameters whose accumulated gradient is missing or all zero.
    fn params_without_gradient(&self) -> Result<Vec<String>, RunError> {
        let mut names = Vec::new();
        for ((name, _), grad) in self
            .trainer
            .params()
            .iter()
            .zip(self.trainer.accumulated_gradients())
        {
            let nonzero = match grad {
                Some(g) => {
                    g.abs()
                        .and_then(|a| a.max_all())
                        .and_then(|m| m.to_scalar::<f32>())
                        .map_err(|source| TrainError::Compute {
                            stage: "inspecting gradients",
                            source,
                        })?
                        > 0.0
                }
                None => false,
            };
            if !nonzero {
                names.push(name.clone());
            }
        }
        Ok(names)
    }

    /// Saves `checkpoint-STEP/` for the last optimizer step.
    fn checkpoint(&mut self, on_event: &mut dyn FnMut(TrainEvent)) -> Result<(), RunError> {
        let config = self.config;
        let step = self.trainer.global_step();
        let weights = match &self.lora {
            Some(lora) => TensorGroup::new(GROUP_LORA, lora.named_tensors()?),
            None => TensorGroup::new(GROUP_UNET, self.trainer.models().unet.named_tensors()),
        };
        let optimizer = self.trainer.optimizer();
        let mut groups = vec![
            weights,
            TensorGroup::new(
                GROUP_OPTIMIZER,
                optimizer.state_tensors().map_err(TrainError::from)?,
            ),
        ];
        if let Some(ema) = self.trainer.ema() {
            groups.push(TensorGroup::new(GROUP_EMA, ema.shadow_tensors()));
        }
        for group in &groups {
            check_finite(
                &format!("the {} of step {step}", group.name),
                &group.tensors,
            )?;
        }
        let (sampler, micro_batch_index) = self.step_state;
        let state = LoopState {
            global_step: step,
            sampler,
            micro_batch_index,
            optimizer: optimizer.state(),
            ema: self.trainer.ema().map(EmaModel::state),
            lora_rank: config.lora_rank,
            seed: config.seed,
            examples: self.examples,
            train_batch_size: config.train_batch_size,
            processes: self.parallel.as_ref().map_or(1, Parallel::world_size),
            resolution: config.resolution,
            loss_scale: self.trainer.loss_scaler().map(LossScaler::state),
        };
        let state = serde_json::to_value(&state).unwrap_or(Value::Null);
        let saved = save_checkpoint(
            &config.output_dir,
            step,
            &groups,
            &state,
            config.checkpoints_total_limit,
        )?;
        self.last_checkpoint = Some(saved.path.clone());
        self.last_checkpoint_step = Some(step);
        on_event(TrainEvent::CheckpointSaved {
            step,
            path: saved.path,
            removed: saved.removed,
        });
        Ok(())
    }

    /// The final weights (EMA when used) written as the model.
    fn write_model(&mut self) -> Result<PathBuf, RunError> {
        let config = self.config;
        if let Some(ema) = self.trainer.ema() {
            ema.copy_to(self.trainer.params())
                .map_err(TrainError::from)?;
        }
        let named: Vec<(String, Tensor)> = self
            .trainer
            .params()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        check_finite("the trained weights", &named)?;
        match &self.lora {
            Some(lora) => Ok(lora.save(&config.output_dir)?),
            None => Ok(write_final_model(
                &config.pretrained_model,
                &config.output_dir,
                &self.trainer.models().unet.named_tensors(),
            )?),
        }
    }

    /// A UNet with the weights to validate (EMA when used) as plain tensors.
    fn validation_unet(&self) -> Result<UNet2DConditionModel, RunError> {
        let models = self.trainer.models();
        let ema = self.trainer.ema();
        match &self.lora {
            None => {
                let tensors = match ema {
                    Some(ema) => ema.shadow_tensors(),
                    None => models.unet.named_tensors(),
                };
                Ok(models.unet.frozen_unet(&tensors)?)
            }
            Some(lora) => {
                let weights: HashMap<String, Tensor> = match ema {
                    Some(ema) => ema.shadow_tensors().into_iter().collect(),
                    None => lora.named_tensors()?.into_iter().collect(),
                };
                let scale = lora.config().scale();
                let mut unet = models.unet.unet.clone();
                for (path, attention) in unet.attentions_mut() {
                    for (name, linear) in attention.projections_mut() {
                        let module = format!("{path}.{name}");
                        let (Some(down), Some(up)) = (
                            weights.get(&lora_key(&module, false)),
                            weights.get(&lora_key(&module, true)),
                        ) else {
                            continue;
                        };
                        linear.adapter = Some(LowRankAdapter {
                            down: down.detach(),
                            up: up.detach(),
                            scale,
                        });
                    }
                }
                Ok(unet)
            }
        }
    }

    /// The validation edits (see the module doc), saved and logged.
    fn validate(
        &mut self,
        validation: &ValidationConfig,
        epoch: u64,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> Result<(), RunError> {
        let config = self.config;
        let step = self.trainer.global_step();
        let models = self.trainer.models();
        let model = InstructPix2PixModel {
            folder: config.pretrained_model.clone(),
            tokenizer: models.tokenizer.clone(),
            text_encoder: models.text_encoder()?.clone(),
            vae: models.vae()?.clone(),
            unet: self.validation_unet()?,
            dtype: candle_core::DType::F32,
            device: config.device.clone(),
            single_file: None,
        };
        let mut pipeline = EditPipeline::new(model)?;
        let multiple = pipeline.size_multiple();
        let (w, h) = validation.image.dimensions();
        let (w, h) = edit_size(w, h, config.resolution, multiple)?;
        let image = resize_lanczos(&validation.image, w, h);
        let folder = config.output_dir.join(VALIDATION_DIR);
        std::fs::create_dir_all(&folder).map_err(|source| RunError::Io {
            path: folder.clone(),
            source,
        })?;
        let cancel = AtomicBool::new(false);
        let mut images = Vec::with_capacity(validation.num_images);
        let mut paths = Vec::with_capacity(validation.num_images);
        let mut logged = Vec::with_capacity(validation.num_images);
        for i in 0..validation.num_images {
            let seed = config.seed.wrapping_add(i as u64);
            let settings = EditSettings {
                prompt: validation.prompt.clone(),
                steps: VALIDATION_STEPS,
                guidance_scale: VALIDATION_GUIDANCE_SCALE,
                image_guidance_scale: VALIDATION_IMAGE_GUIDANCE_SCALE,
                seed,
                ..EditSettings::default()
            };
            let out = pipeline.edit(&image, &settings, &mut |_| {}, &cancel)?;
            let name = format!("step-{step:06}-{i}.png");
            let path = folder.join(&name);
            save_image(
                &path,
                &out.image,
                &[(
                    "instruct-pix2pix".to_string(),
                    json!({"prompt": validation.prompt, "step": step, "seed": seed}).to_string(),
                )],
            )?;
            logged.push(json!({
                "prompt": validation.prompt,
                "seed": seed,
                "image": format!("{VALIDATION_DIR}/{name}"),
            }));
            images.push(out.image);
            paths.push(path);
        }
        if let Some(metrics) = &mut self.metrics {
            metrics.log(&json!({"step": step, "epoch": epoch, "validation": logged}))?;
        }
        on_event(TrainEvent::Validation(ValidationEvent {
            step,
            epoch,
            prompt: validation.prompt.clone(),
            images,
            paths,
        }));
        Ok(())
    }
}

/// Refuses weights holding a NaN or an infinity (`what` names them in the message). Float
/// tensors only; a quantised optimizer state's bytes cannot be non-finite.
fn check_finite(what: &str, tensors: &[(String, Tensor)]) -> Result<(), RunError> {
    for (name, tensor) in tensors {
        if !tensor.dtype().is_float() {
            continue;
        }
        // x·0 is 0 for every finite x and NaN for NaN and ±∞, so the sum is 0 exactly when
        // every value is finite (a plain sum could overflow on large finite values).
        let finite = tensor
            .affine(0.0, 0.0)
            .and_then(|zeros| zeros.to_dtype(candle_core::DType::F32))
            .and_then(|zeros| zeros.sum_all())
            .and_then(|sum| sum.to_scalar::<f32>())
            .map_err(|source| TrainError::Compute {
                stage: "checking the weights for NaN",
                source,
            })?
            == 0.0;
        if !finite {
            return Err(RunError::NonFiniteWeights {
                what: what.to_string(),
                name: name.clone(),
            });
        }
    }
    Ok(())
}
