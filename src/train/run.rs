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
//! Bad examples: the dataset is checked first ([`Dataset::check`]); with `skip_bad_examples` the
//! bad ones are left out, otherwise the run stops with [`RunError::BadExamples`] listing them.
//! An example that passes the check but fails to decode later is skipped with a
//! [`TrainEvent::Notice`], never a crash.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, Var};
use image::RgbImage;
use serde_json::{Value, json};

use super::checkpoint::{
    self, CheckpointError, LoadedCheckpoint, TensorGroup, resolve_resume, save_checkpoint,
};
use super::data::{
    CheckLevel, CheckReport, Columns, CropMode, DataError, Dataset, DatasetOptions, EpochSampler,
    FlipMode, SamplerPosition, prepare_batch,
};
use super::ema::{EmaConfig, EmaModel, EmaState};
use super::lora::{LoraConfig, LoraError, UNetLora, lora_key};
use super::metrics::{MetricsError, MetricsLog, StepMetrics, TensorBoardWriter};
use super::optim::{AdamW, AdamWConfig, AdamWState, MomentStorage};
use super::output::{OutputError, write_final_model};
use super::schedule::{LrSchedule, LrScheduleKind, ScheduleError};
use super::step::{StepConfig, StepDraws, TrainError, TrainLoadOptions, Trainer, TrainingModels};
use crate::model::InstructPix2PixModel;
use crate::model::hub::HubSettings;
use crate::model::nn::LowRankAdapter;
use crate::model::unet::UNet2DConditionModel;
use crate::model::weights::Variant;
use crate::pipeline::EditSettings;
use crate::pipeline::edit::{EditError, EditPipeline};
use crate::pipeline::image::{ImageError, edit_size, resize_lanczos, save_image};

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
/// The largest resolution accepted (a typo guard; 1024² is already far beyond a CPU).
pub const MAX_RESOLUTION: u32 = 4096;
/// The script's own `--learning_rate` default: what the command line and [`TrainConfig`] start
/// from, so a run without the flag matches the script's.
pub const DEFAULT_LEARNING_RATE: f64 = 1e-4;
/// The learning rate of the script's documented example run (diffusers' InstructPix2Pix README:
/// `--learning_rate=5e-05`, with the 15000 steps, batch 4 and 4 accumulation steps that go with
/// it). The window's fine-tuning dialog presets that whole example recipe, so it takes this value
/// rather than [`DEFAULT_LEARNING_RATE`].
pub const RECOMMENDED_LEARNING_RATE: f64 = 5e-5;

/// Where the training examples come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// `--train_data_dir`: an imagefolder or a folder of pairs.
    TrainDataDir(PathBuf),
    /// `--dataset_name`: a local folder (Parquet, imagefolder, pairs) or a Hub dataset id
    /// (downloaded into the Hugging Face cache).
    DatasetName {
        /// The folder or `owner/name`.
        name: String,
        /// `--revision` of a Hub dataset (`main` when `None`).
        revision: Option<String>,
    },
}

/// The validation edits (`--validation_prompt`, `--val_image_url`, `--num_validation_images`,
/// `--validation_epochs`).
#[derive(Debug, Clone)]
pub struct ValidationConfig {
    /// The instruction.
    pub prompt: String,
    /// The image to edit (already read or downloaded).
    pub image: RgbImage,
    /// Edits per validation (`--num_validation_images`, 4).
    pub num_images: usize,
    /// Validate after every this many epochs (`--validation_epochs`, 1).
    pub every_epochs: u64,
}

/// Every setting of a training run, the script's flags by their meaning. Build it with
/// [`TrainConfig::new`] (the script's defaults) and set fields; [`train`] validates it first.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// `--pretrained_model_name_or_path`, resolved to a local pipeline folder (diffusers'
    /// layout; an InstructPix2Pix model, or plain Stable Diffusion whose conv_in grows).
    pub pretrained_model: PathBuf,
    /// `--variant`.
    pub variant: Variant,
    /// `--train_data_dir` or `--dataset_name`.
    pub data: DataSource,
    /// `--original_image_column --edit_prompt_column --edited_image_column`.
    pub columns: Columns,
    /// `--max_train_samples`.
    pub max_train_samples: Option<usize>,
    /// `--output_dir` (checkpoints, logs, validation images and the final model).
    pub output_dir: PathBuf,
    /// `--seed` (every random draw of the run follows from it).
    pub seed: u64,
    /// `--resolution` (256).
    pub resolution: u32,
    /// `--center_crop`.
    pub center_crop: bool,
    /// `--random_flip`.
    pub random_flip: bool,
    /// `--train_batch_size` (16).
    pub train_batch_size: usize,
    /// `--num_train_epochs` (100).
    pub num_train_epochs: u64,
    /// `--max_train_steps` (overrides the epochs).
    pub max_train_steps: Option<u64>,
    /// `--gradient_accumulation_steps` (1).
    pub gradient_accumulation_steps: usize,
    /// `--learning_rate` (1e-4).
    pub learning_rate: f64,
    /// `--scale_lr`.
    pub scale_lr: bool,
    /// `--lr_scheduler` (constant).
    pub lr_scheduler: LrScheduleKind,
    /// `--lr_warmup_steps` (500).
    pub lr_warmup_steps: u64,
    /// `--conditioning_dropout_prob`.
    pub conditioning_dropout_prob: Option<f64>,
    /// `--use_ema`.
    pub use_ema: bool,
    /// `--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay`.
    pub adam: AdamWConfig,
    /// `--max_grad_norm` (1).
    pub max_grad_norm: f64,
    /// `--use_8bit_adam`: AdamW keeps block-wise 8-bit moments (bitsandbytes' `AdamW8bit`).
    pub use_8bit_adam: bool,
    /// `--gradient_checkpointing`: the UNet recomputes its blocks in backward instead of keeping
    /// their activations.
    pub gradient_checkpointing: bool,
    /// `--checkpointing_steps` (500).
    pub checkpointing_steps: u64,
    /// `--checkpoints_total_limit`.
    pub checkpoints_total_limit: Option<usize>,
    /// `--resume_from_checkpoint` (`latest` or a checkpoint folder or name).
    pub resume_from_checkpoint: Option<String>,
    /// The validation edits, when both a prompt and an image are given.
    pub validation: Option<ValidationConfig>,
    /// `--report_to tensorboard` (the script's default).
    pub report_to_tensorboard: bool,
    /// `--lora-rank`: train LoRA adapters of this rank instead of the whole UNet.
    pub lora_rank: Option<usize>,
    /// Train on the good examples when the check finds bad ones (else refuse).
    pub skip_bad_examples: bool,
    /// How thoroughly the dataset is checked before training.
    pub check_level: CheckLevel,
    /// Where training runs.
    pub device: Device,
}

impl TrainConfig {
    /// The script's defaults for a model, a dataset and an output folder.
    pub fn new(pretrained_model: PathBuf, data: DataSource, output_dir: PathBuf) -> Self {
        Self {
            pretrained_model,
            variant: Variant::Default,
            data,
            columns: Columns::default(),
            max_train_samples: None,
            output_dir,
            seed: 0,
            resolution: 256,
            center_crop: false,
            random_flip: false,
            train_batch_size: 16,
            num_train_epochs: 100,
            max_train_steps: None,
            gradient_accumulation_steps: 1,
            learning_rate: DEFAULT_LEARNING_RATE,
            scale_lr: false,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 500,
            conditioning_dropout_prob: None,
            use_ema: false,
            adam: AdamWConfig::default(),
            max_grad_norm: 1.0,
            use_8bit_adam: false,
            gradient_checkpointing: false,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            validation: None,
            report_to_tensorboard: true,
            lora_rank: None,
            skip_bad_examples: false,
            check_level: CheckLevel::Headers,
            device: Device::Cpu,
        }
    }

    /// Refuses every value the run cannot use, naming the flag.
    pub fn validate(&self) -> Result<(), RunError> {
        fn bad(flag: &'static str, value: impl ToString, reason: &str) -> RunError {
            RunError::Setting {
                flag,
                value: value.to_string(),
                reason: reason.to_string(),
            }
        }
        if self.resolution < 8 || self.resolution > MAX_RESOLUTION {
            return Err(bad(
                "--resolution",
                self.resolution,
                &format!("must be between 8 and {MAX_RESOLUTION}"),
            ));
        }
        if self.train_batch_size == 0 {
            return Err(bad("--train_batch_size", 0, "must be at least 1"));
        }
        match self.max_train_steps {
            Some(0) => return Err(bad("--max_train_steps", 0, "must be at least 1")),
            None if self.num_train_epochs == 0 => {
                return Err(bad("--num_train_epochs", 0, "must be at least 1"));
            }
            _ => {}
        }
        if self.gradient_accumulation_steps == 0 {
            return Err(bad(
                "--gradient_accumulation_steps",
                0,
                "must be at least 1",
            ));
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return Err(bad(
                "--learning_rate",
                self.learning_rate,
                "must be a number above 0",
            ));
        }
        if let Some(p) = self.conditioning_dropout_prob
            && !(0.0..=1.0).contains(&p)
        {
            return Err(bad(
                "--conditioning_dropout_prob",
                p,
                "must be between 0 and 1",
            ));
        }
        for (flag, value) in [
            ("--adam_beta1", self.adam.beta1),
            ("--adam_beta2", self.adam.beta2),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(bad(flag, value, "must be at least 0 and below 1"));
            }
        }
        if !self.adam.eps.is_finite() || self.adam.eps <= 0.0 {
            return Err(bad(
                "--adam_epsilon",
                self.adam.eps,
                "must be a number above 0",
            ));
        }
        if !self.adam.weight_decay.is_finite() || self.adam.weight_decay < 0.0 {
            return Err(bad(
                "--adam_weight_decay",
                self.adam.weight_decay,
                "must be a number of at least 0",
            ));
        }
        if !self.max_grad_norm.is_finite() || self.max_grad_norm <= 0.0 {
            return Err(bad(
                "--max_grad_norm",
                self.max_grad_norm,
                "must be a number above 0",
            ));
        }
        if self.checkpointing_steps == 0 {
            return Err(bad("--checkpointing_steps", 0, "must be at least 1"));
        }
        if self.checkpoints_total_limit == Some(0) {
            return Err(bad("--checkpoints_total_limit", 0, "must be at least 1"));
        }
        if self.max_train_samples == Some(0) {
            return Err(bad("--max_train_samples", 0, "must be at least 1"));
        }
        if self.lora_rank == Some(0) {
            return Err(bad("--lora-rank", 0, "must be at least 1"));
        }
        if self.output_dir.as_os_str().is_empty() {
            return Err(bad("--output_dir", "\"\"", "must name a folder"));
        }
        if self.output_dir.is_file() {
            return Err(bad(
                "--output_dir",
                self.output_dir.display(),
                "is a file, not a folder",
            ));
        }
        if let Some(v) = &self.validation {
            if v.num_images == 0 {
                return Err(bad("--num_validation_images", 0, "must be at least 1"));
            }
            if v.every_epochs == 0 {
                return Err(bad("--validation_epochs", 0, "must be at least 1"));
            }
            if v.image.width() == 0 || v.image.height() == 0 {
                return Err(bad("--val_image_url", "(empty image)", "has no pixels"));
            }
        }
        Ok(())
    }
}

/// Why a run could not start or stopped with an error. Messages name the flag or file.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A setting out of range.
    #[error("{flag} {value}: {reason}")]
    Setting {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        reason: String,
    },
    /// The dataset check found bad examples and skipping them was not asked for.
    #[error(
        "the dataset has bad examples ({}); fix them or pass --skip_bad_examples to train on the others:{}",
        report.summary(),
        list_problems(report)
    )]
    BadExamples {
        /// The check's result.
        report: CheckReport,
    },
    /// Reading the dataset failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Loading the model or a training step failed.
    #[error(transparent)]
    Train(Box<TrainError>),
    /// The learning-rate schedule cannot be built.
    #[error("--lr_scheduler: {0}")]
    Schedule(#[from] ScheduleError),
    /// Saving or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A checkpoint does not belong to this run's settings.
    #[error("cannot resume from {}: {reason}", path.display())]
    ResumeMismatch {
        /// The checkpoint folder.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// LoRA adapters failed.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// Writing the final model failed.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// Writing metrics failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A validation edit failed.
    #[error("validation edit: {0}")]
    Validation(Box<EditError>),
    /// Saving a validation image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Creating the output folder failed.
    #[error("creating {}: {source}", path.display())]
    Io {
        /// The folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

impl From<TrainError> for RunError {
    fn from(error: TrainError) -> Self {
        RunError::Train(Box::new(error))
    }
}

impl From<EditError> for RunError {
    fn from(error: EditError) -> Self {
        RunError::Validation(Box::new(error))
    }
}

fn list_problems(report: &CheckReport) -> String {
    report
        .problems
        .iter()
        .map(|p| format!("\n  {}: {}", p.name, p.reason))
        .collect()
}

/// Pause and stop requests from another thread (the window, or Ctrl+C).
#[derive(Debug, Default)]
pub struct TrainControl {
    stop: AtomicBool,
    pause: AtomicBool,
}

impl TrainControl {
    /// Neither paused nor stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to save a checkpoint and the model so far, then return.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Pauses (between micro-batches) or resumes the run.
    pub fn set_paused(&self, paused: bool) {
        self.pause.store(paused, Ordering::SeqCst);
    }

    /// Whether the run is asked to pause.
    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }
}

/// The run's arithmetic, announced before the first step.
#[derive(Debug, Clone, PartialEq)]
pub struct RunPlan {
    /// Examples trained on (after skipping bad ones and `--max_train_samples`).
    pub examples: usize,
    /// `ceil(examples / train_batch_size)`.
    pub batches_per_epoch: usize,
    /// `ceil(batches_per_epoch / gradient_accumulation_steps)`.
    pub updates_per_epoch: u64,
    /// `max_train_steps` (given or from the epochs).
    pub total_steps: u64,
    /// Epochs the run spans.
    pub epochs: u64,
    /// The step the run starts from (0, or the checkpoint's).
    pub first_step: u64,
    /// The learning rate after `--scale_lr`.
    pub learning_rate: f64,
    /// Trained parameters (UNet weights or LoRA matrices), in elements.
    pub trainable_parameters: usize,
    /// Whether conv_in grew from 4 input channels.
    pub grew_conv_in: bool,
    /// The checkpoint resumed from.
    pub resumed_from: Option<PathBuf>,
}

/// One optimizer step's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct StepEvent {
    /// The global step (1 after the first).
    pub step: u64,
    /// `max_train_steps`.
    pub total_steps: u64,
    /// The epoch (0-based).
    pub epoch: u64,
    /// The script's `train_loss` (the mean over the accumulated micro-batches).
    pub loss: f64,
    /// The learning rate used.
    pub lr: f64,
    /// The gradients' total norm before clipping.
    pub grad_norm: f32,
    /// Wall seconds of this step (micro-batches and update, without checkpoints or validation).
    pub seconds_per_step: f64,
    /// Estimated seconds left (recent mean step time × steps left).
    pub eta_seconds: f64,
    /// Resident memory now, in bytes (Linux; `None` elsewhere).
    pub rss_bytes: Option<u64>,
    /// The process's peak resident memory so far, in bytes (Linux).
    pub peak_rss_bytes: Option<u64>,
    /// On the run's first step only: the trained parameters whose gradient was missing or all
    /// zero in it (empty when every one got a gradient).
    pub params_without_gradient: Option<Vec<String>>,
}

/// Validation edits.
#[derive(Debug, Clone)]
pub struct ValidationEvent {
    /// The global step they were made at.
    pub step: u64,
    /// The epoch.
    pub epoch: u64,
    /// The instruction.
    pub prompt: String,
    /// The edited images.
    pub images: Vec<RgbImage>,
    /// Where they were saved.
    pub paths: Vec<PathBuf>,
}

/// What [`train`] reports while it runs.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Something the user should know that is not an error (one line).
    Notice(String),
    /// The dataset check's result (before any model is loaded).
    DatasetChecked(CheckReport),
    /// The run is set up and about to take its first step.
    Started(RunPlan),
    /// An optimizer step finished.
    Step(StepEvent),
    /// A checkpoint was written (and older ones removed for the limit).
    CheckpointSaved {
        /// Its step.
        step: u64,
        /// Its folder.
        path: PathBuf,
        /// Checkpoints removed.
        removed: Vec<PathBuf>,
    },
    /// The run paused (it waits until resumed or stopped).
    Paused,
    /// The run goes on after a pause.
    Resumed,
    /// Validation edits are ready.
    Validation(ValidationEvent),
    /// The run ended (also returned by [`train`]).
    Finished(TrainOutcome),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The last optimizer step taken.
    pub step: u64,
    /// Whether it ended on a stop request before `max_train_steps`.
    pub stopped: bool,
    /// The model written: the output folder (full) or the LoRA file; `None` when a stop came
    /// before the first step.
    pub model: Option<PathBuf>,
    /// The last checkpoint written by this run.
    pub checkpoint: Option<PathBuf>,
}

/// Resident and peak resident memory of this process in bytes, from `/proc/self/statm` and
/// `/proc/self/status` (`None` where they do not exist).
pub fn memory_in_use() -> (Option<u64>, Option<u64>) {
    let page = page_size();
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page);
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        });
    (rss, peak)
}

#[cfg(target_os = "linux")]
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

#[cfg(not(target_os = "linux"))]
fn page_size() -> u64 {
    4096
}

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
    resolution: u32,
}

const GROUP_UNET: &str = "unet";
const GROUP_LORA: &str = "lora";
const GROUP_OPTIMIZER: &str = "optimizer";
const GROUP_EMA: &str = "ema";

/// The running state [`train`] threads through its helpers.
struct Run<'a> {
    config: &'a TrainConfig,
    trainer: Trainer,
    lora: Option<UNetLora>,
    metrics: MetricsLog,
    tensorboard: Option<TensorBoardWriter>,
    last_checkpoint: Option<PathBuf>,
    last_checkpoint_step: Option<u64>,
    /// Sampler position and micro-batch counter right after the last optimizer step.
    step_state: (SamplerPosition, u64),
    started: Instant,
    /// Examples trained on (checked again on resume).
    examples: usize,
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

    let mut models = TrainingModels::load(
        &config.pretrained_model,
        &TrainLoadOptions {
            variant: config.variant,
            device: config.device.clone(),
            seed: config.seed,
            ..TrainLoadOptions::default()
        },
    )?;
    let factor = models.vae.config().downscale_factor() as u32;
    if !config.resolution.is_multiple_of(factor) {
        return Err(RunError::Setting {
            flag: "--resolution",
            value: config.resolution.to_string(),
            reason: format!("must be a multiple of {factor} (the VAE's downscale factor)"),
        });
    }
    let grew_conv_in = models.unet.grew_conv_in();
    if grew_conv_in {
        on_event(TrainEvent::Notice(
            "the base model is plain Stable Diffusion: conv_in grows from 4 to 8 input channels (new weights 0, new bias drawn as torch initialises it)".into(),
        ));
    }

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
    let batches_per_epoch = dataset.len().div_ceil(config.train_batch_size);
    let updates_per_epoch = batches_per_epoch.div_ceil(config.gradient_accumulation_steps) as u64;
    let total_steps = config
        .max_train_steps
        .unwrap_or(config.num_train_epochs * updates_per_epoch);
    let epochs = total_steps.div_ceil(updates_per_epoch);
    let learning_rate = if config.scale_lr {
        config.learning_rate
            * config.gradient_accumulation_steps as f64
            * config.train_batch_size as f64
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
            let dir = resolve_resume(&config.output_dir, value)?;
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
    let (trainer, sampler, micro_batch_index) = match &resume_dir {
        Some(dir) => {
            let loaded = checkpoint::load_checkpoint(dir, &config.device)?;
            let state = check_resume_state(&loaded, config, dataset.len())?;
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
            let trainer = Trainer::resume(models, optimizer, schedule, ema, step_config)?;
            let sampler = EpochSampler::resume(
                dataset.len(),
                config.train_batch_size,
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
            let sampler =
                EpochSampler::new(dataset.len(), config.train_batch_size, config.seed, flip)?;
            (trainer, sampler, 0)
        }
    };
    // Nothing is written before everything above succeeded.
    std::fs::create_dir_all(&config.output_dir).map_err(|source| RunError::Io {
        path: config.output_dir.clone(),
        source,
    })?;
    let first_step = trainer.global_step();
    let metrics = if resume_dir.is_some() {
        MetricsLog::resume(&config.output_dir, first_step)?
    } else {
        MetricsLog::open(&config.output_dir)?
    };
    let tensorboard = if config.report_to_tensorboard {
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
    };
    let outcome = run.train_loop(
        &dataset,
        sampler,
        micro_batch_index,
        total_steps,
        batches_per_epoch,
        control,
        on_event,
    )?;
    on_event(TrainEvent::Finished(outcome.clone()));
    Ok(outcome)
}

/// Reads a checkpoint's `state.json` and checks that it belongs to a run with these settings.
fn check_resume_state(
    loaded: &LoadedCheckpoint,
    config: &TrainConfig,
    examples: usize,
) -> Result<LoopState, RunError> {
    let mismatch = |reason: String| RunError::ResumeMismatch {
        path: loaded.path.clone(),
        reason,
    };
    let state: LoopState = serde_json::from_value(loaded.state.clone())
        .map_err(|e| mismatch(format!("its state.json is not this program's: {e}")))?;
    let describe = |rank: Option<usize>| match rank {
        Some(r) => format!("LoRA of rank {r}"),
        None => "full fine-tuning".to_string(),
    };
    if state.lora_rank != config.lora_rank {
        return Err(mismatch(format!(
            "it is a {}, this run a {}",
            describe(state.lora_rank),
            describe(config.lora_rank)
        )));
    }
    if state.ema.is_some() != config.use_ema {
        return Err(mismatch(format!(
            "it was made {} --use_ema",
            if state.ema.is_some() {
                "with"
            } else {
                "without"
            }
        )));
    }
    let moments = if config.use_8bit_adam {
        MomentStorage::Blockwise8Bit
    } else {
        MomentStorage::Float32
    };
    if state.optimizer.moments != moments {
        return Err(mismatch(format!(
            "its optimizer is {}, this run asks for {} ({} --use_8bit_adam to resume it)",
            state.optimizer.moments,
            moments,
            if config.use_8bit_adam { "drop" } else { "add" }
        )));
    }
    if state.examples != examples || state.train_batch_size != config.train_batch_size {
        return Err(mismatch(format!(
            "it was made with {} examples in batches of {}, this run has {examples} in batches of {}",
            state.examples, state.train_batch_size, config.train_batch_size
        )));
    }
    if state.seed != config.seed {
        return Err(mismatch(format!(
            "it was made with --seed {}, this run has --seed {}",
            state.seed, config.seed
        )));
    }
    Ok(state)
}

/// Sets the UNet's (or the LoRA adapters') variables to a checkpoint's weights.
fn restore_weights(
    loaded: &LoadedCheckpoint,
    models: &TrainingModels,
    lora: Option<&UNetLora>,
) -> Result<(), RunError> {
    if let Some(lora) = lora {
        lora.restore(loaded.group(GROUP_LORA)?)?;
        return Ok(());
    }
    let tensors: HashMap<&str, &Tensor> = loaded
        .group(GROUP_UNET)?
        .iter()
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    for (name, var) in models.unet.params() {
        let Some(tensor) = tensors.get(name.as_str()) else {
            return Err(RunError::ResumeMismatch {
                path: loaded.path.clone(),
                reason: format!("it has no UNet weight {name}"),
            });
        };
        if tensor.dims() != var.dims() {
            return Err(RunError::ResumeMismatch {
                path: loaded.path.clone(),
                reason: format!(
                    "its {name} has shape {:?}, the model {:?}",
                    tensor.dims(),
                    var.dims()
                ),
            });
        }
        var.set(tensor).map_err(|source| TrainError::Compute {
            stage: "restoring the UNet",
            source,
        })?;
    }
    Ok(())
}

impl Run<'_> {
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
        let crop = if config.center_crop {
            CropMode::Center
        } else {
            CropMode::Random
        };
        let num_train_timesteps = self.trainer.models().noise_schedule.num_train_timesteps();
        let mut step_started = Instant::now();
        let mut recent_step_seconds: Vec<f64> = Vec::new();
        let mut first_step_of_run = true;
        let mut last_validation_step = None;
        let mut stopped = false;

        while self.trainer.global_step() < total_steps {
            if control.stop_requested() {
                stopped = true;
                break;
            }
            if control.is_paused() {
                on_event(TrainEvent::Paused);
                while control.is_paused() && !control.stop_requested() {
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

            // Bad files found only now are skipped, never a crash.
            let mut examples = Vec::with_capacity(batch.indices.len());
            let mut flips = Vec::with_capacity(batch.indices.len());
            for (&index, &flip) in batch.indices.iter().zip(&batch.flips) {
                match dataset.load(index) {
                    Ok(example) => {
                        examples.push(example);
                        flips.push(flip);
                    }
                    Err(error) => on_event(TrainEvent::Notice(format!("skipped: {error}"))),
                }
            }
            if !examples.is_empty() {
                let prepared =
                    prepare_batch(&examples, &flips, config.resolution, crop, &config.device)?;
                let latent_shape = self
                    .trainer
                    .models()
                    .latent_shape(examples.len(), config.resolution as usize);
                let draws = StepDraws::seeded(
                    config.seed,
                    draws_index,
                    latent_shape,
                    num_train_timesteps,
                    &config.device,
                )?;
                self.trainer.accumulate(&prepared, &draws)?;
            }

            let pending = self.trainer.pending_micro_batches();
            let sync = pending >= config.gradient_accumulation_steps || last_of_epoch;
            if sync && pending > 0 {
                let params_without_gradient = first_step_of_run
                    .then(|| self.params_without_gradient())
                    .transpose()?;
                first_step_of_run = false;
                let report = self.trainer.optimizer_step()?;
                self.step_state = (sampler.position(), micro_batch_index);
                let seconds = step_started.elapsed().as_secs_f64();
                recent_step_seconds.push(seconds);
                if recent_step_seconds.len() > 20 {
                    recent_step_seconds.remove(0);
                }
                let mean =
                    recent_step_seconds.iter().sum::<f64>() / recent_step_seconds.len() as f64;
                let (rss_bytes, peak_rss_bytes) = memory_in_use();
                self.metrics.log_step(&StepMetrics {
                    step: report.step,
                    epoch,
                    loss: report.loss,
                    lr: report.lr,
                    grad_norm: Some(f64::from(report.grad_norm)),
                    seconds: self.started.elapsed().as_secs_f64(),
                })?;
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
                if report.step.is_multiple_of(config.checkpointing_steps) {
                    self.checkpoint(on_event)?;
                }
                step_started = Instant::now();
            }

            // The script validates after each epoch's loop (also the one cut short by the end).
            let finished = self.trainer.global_step() >= total_steps;
            if (last_of_epoch || finished)
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
        if stopped && step > 0 && self.last_checkpoint_step != Some(step) {
            self.checkpoint(on_event)?;
        }
        let model = if step > 0 {
            Some(self.write_model()?)
        } else {
            None
        };
        if !stopped
            && let Some(validation) = &config.validation
            && last_validation_step != Some(step)
        {
            let epoch = self.step_state.0.epoch;
            self.validate(validation, epoch, on_event)?;
        }
        Ok(TrainOutcome {
            step,
            stopped,
            model,
            checkpoint: self.last_checkpoint.clone(),
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
            resolution: config.resolution,
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
            text_encoder: models.text_encoder.clone(),
            vae: models.vae.clone(),
            unet: self.validation_unet()?,
            dtype: candle_core::DType::F32,
            device: config.device.clone(),
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
        self.metrics
            .log(&json!({"step": step, "epoch": epoch, "validation": logged}))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TrainConfig {
        TrainConfig::new(
            PathBuf::from("model"),
            DataSource::TrainDataDir(PathBuf::from("data")),
            PathBuf::from("out"),
        )
    }

    #[test]
    fn nonsense_values_name_their_flag() {
        type Change = Box<dyn Fn(&mut TrainConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("--resolution", Box::new(|c| c.resolution = 0)),
            ("--train_batch_size", Box::new(|c| c.train_batch_size = 0)),
            (
                "--max_train_steps",
                Box::new(|c| c.max_train_steps = Some(0)),
            ),
            ("--num_train_epochs", Box::new(|c| c.num_train_epochs = 0)),
            (
                "--gradient_accumulation_steps",
                Box::new(|c| c.gradient_accumulation_steps = 0),
            ),
            ("--learning_rate", Box::new(|c| c.learning_rate = f64::NAN)),
            ("--learning_rate", Box::new(|c| c.learning_rate = -1.0)),
            (
                "--conditioning_dropout_prob",
                Box::new(|c| c.conditioning_dropout_prob = Some(1.5)),
            ),
            ("--adam_beta1", Box::new(|c| c.adam.beta1 = 1.0)),
            ("--adam_beta2", Box::new(|c| c.adam.beta2 = -0.1)),
            ("--adam_epsilon", Box::new(|c| c.adam.eps = 0.0)),
            (
                "--adam_weight_decay",
                Box::new(|c| c.adam.weight_decay = -1.0),
            ),
            ("--max_grad_norm", Box::new(|c| c.max_grad_norm = 0.0)),
            (
                "--checkpointing_steps",
                Box::new(|c| c.checkpointing_steps = 0),
            ),
            (
                "--checkpoints_total_limit",
                Box::new(|c| c.checkpoints_total_limit = Some(0)),
            ),
            ("--lora-rank", Box::new(|c| c.lora_rank = Some(0))),
        ];
        for (flag, change) in cases {
            let mut c = config();
            change(&mut c);
            let message = c.validate().unwrap_err().to_string();
            assert!(message.starts_with(flag), "{flag}: {message}");
        }
        assert!(config().validate().is_ok());
    }
}
