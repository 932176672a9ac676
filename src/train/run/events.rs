//! What a training run tells the outside: [`RunError`] (why it could not start or stopped),
//! [`TrainControl`] (the pause and stop flags another thread sets), the [`TrainEvent`]s the
//! callback receives (the plan, step metrics, checkpoints, validation images, the end), the
//! final [`TrainOutcome`], and [`memory_in_use`] for the step metrics.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use image::RgbImage;

use crate::pipeline::edit::EditError;
use crate::pipeline::image::ImageError;
use crate::train::checkpoint::CheckpointError;
use crate::train::data::{CheckReport, DataError};
use crate::train::latent_cache::CacheError;
use crate::train::lora::LoraError;
use crate::train::memory::OutOfMemory;
use crate::train::metrics::MetricsError;
use crate::train::output::OutputError;
use crate::train::schedule::ScheduleError;
use crate::train::step::TrainError;

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
    /// `--cache_latents`: encoding the examples failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Writing the final model failed.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The processes of a data-parallel run could not connect, or one of them failed.
    #[error(transparent)]
    Distributed(#[from] crate::train::distributed::DistributedError),
    /// Writing metrics failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// A validation edit failed.
    #[error("validation edit: {0}")]
    Validation(Box<EditError>),
    /// Saving a validation image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The run does not fit in the device's memory (found before step 1, or a step ran out):
    /// what it needs, what there is, and the settings to change.
    #[error("{0}")]
    OutOfMemory(Box<OutOfMemory>),
    /// Creating the output folder failed.
    #[error("creating {}: {source}", path.display())]
    Io {
        /// The folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Every example passed the quick check but none could be decoded for training.
    #[error(
        "none of the {examples} examples could be read for training (the first: {first_error})"
    )]
    NoUsableExamples {
        /// The examples in the dataset.
        examples: usize,
        /// Why the first one failed.
        first_error: String,
    },
    /// The loss or gradients were NaN or infinite in several steps in a row: the run stopped
    /// without applying them or saving anything from them.
    #[error(
        "training diverged: the loss or the gradients were not finite in {steps} steps in a row after step {last_step} (loss {loss}, gradient norm {grad_norm}); nothing was saved from them{}. Lower --learning_rate, check the base model's weights, or resume from an earlier checkpoint",
        match last_checkpoint {
            Some(path) => format!(" and the last good checkpoint, {}, is kept", path.display()),
            None => String::new(),
        }
    )]
    Diverged {
        /// How many steps in a row were skipped.
        steps: u32,
        /// The last step that was applied.
        last_step: u64,
        /// The last skipped step's loss.
        loss: f64,
        /// The last skipped step's gradient norm.
        grad_norm: f32,
        /// The newest checkpoint on disk, if any.
        last_checkpoint: Option<PathBuf>,
    },
    /// Weights about to be saved (or just resumed) hold NaN or infinite values.
    #[error("{what} holds NaN or infinite values ({name}); nothing was written from it")]
    NonFiniteWeights {
        /// Which weights (the trained UNet, a checkpoint's file, ...).
        what: String,
        /// The first tensor with a non-finite value.
        name: String,
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
    /// Read by the dataset download too, which stops when it is set.
    pub(super) stop: AtomicBool,
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
    /// The estimated peak memory of the run, in bytes ([`crate::train::memory`]).
    pub estimated_peak_bytes: u64,
    /// What the training device had free before the model loaded (None where the platform does
    /// not say).
    pub available_bytes: Option<u64>,
    /// Where the run trains (`cpu`, `cuda:0`).
    pub device: String,
    /// Processes training together (1 without a launcher).
    pub processes: usize,
    /// `--train_batch_size`: examples per micro-batch on each process.
    pub per_process_batch: usize,
    /// `--gradient_accumulation_steps`.
    pub accumulation_steps: usize,
    /// Examples per optimizer step: `train_batch_size · processes · gradient_accumulation_steps`.
    pub effective_batch: usize,
    /// The sum between processes (`tcp`, `nccl`), when there are several.
    pub backend: Option<&'static str>,
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

/// What [`train`](super::train) reports while it runs.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// Something the user should know that is not an error (one line).
    Notice(String),
    /// The dataset check's result (before any model is loaded).
    DatasetChecked(CheckReport),
    /// `--cache_latents`: `done` of `total` examples encoded (first with `done` 0, before the
    /// run's [`TrainEvent::Started`]).
    CachingLatents {
        /// Examples encoded so far.
        done: usize,
        /// Examples in the dataset.
        total: usize,
    },
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
    /// The run ended (also returned by [`train`](super::train)).
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
    let rss = crate::model::device::resident_bytes();
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
