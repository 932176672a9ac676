//! What the window and the model thread say to each other: [`Job`]s in, [`Event`]s out.
//!
//! Plain data only (images, numbers, strings): no tensors, no GUI types, so the window never needs
//! candle and the worker never needs the GUI toolkit.

pub use crate::model::device::DeviceMemory;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use image::RgbImage;

use super::{DTypeChoice, DeviceChoice, EditSettings, HubSettings, LoraChoice};

/// Names one edit; chosen by the caller, echoed in every event about that edit.
pub type JobId = u64;

/// Work for the model thread.
#[derive(Debug, Clone)]
pub enum Job {
    /// Load (fetching from the Hub when needed) a model, replacing the loaded one once the new
    /// one's files are all downloaded. Stopped by [`super::WorkerHandle::cancel_load`].
    LoadModel(ModelRequest),
    /// Run one edit with the loaded model. "Latest wins": a new edit cancels the running one and
    /// replaces one still waiting (see [`super::WorkerHandle::send`]).
    Edit(EditJob),
    /// Apply one edit to every image of a folder, writing the results into another folder.
    /// Shares the edit's mailbox: it replaces an edit still waiting and stops the running one,
    /// and a later edit or folder job stops it (its [`Event::FolderFinished`] then says
    /// cancelled).
    EditFolder(FolderJob),
    /// Stop the edit or folder job with this id, running or waiting; the same as
    /// [`super::WorkerHandle::cancel`].
    Cancel { id: JobId },
    /// Stop the thread: the running edit is cancelled, waiting work is dropped.
    Shutdown,
}

/// Which model to load and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRequest {
    /// A folder in diffusers' layout, a Hub repo id (`owner/name`) or a single-file checkpoint
    /// (`.safetensors`, `.ckpt`), as the `--model` flag.
    pub spec: String,
    /// For a single-file checkpoint: the folder or repo of its tokenizer and scheduler config, as
    /// the `--config` flag; `None` is the default model's.
    pub config: Option<String>,
    /// Branch, tag or commit for a Hub repo; `None` is `main`.
    pub revision: Option<String>,
    pub device: DeviceChoice,
    /// float16 also picks the repo's fp16 weight files, as the command line does.
    pub dtype: DTypeChoice,
    /// Where the Hub is and where its cache lives; `None` reads the `HF_*` environment variables.
    pub hub: Option<HubSettings>,
    /// LoRA files fused into the weights, in order, as the `--lora` flags: diffusers/peft files
    /// (or the folder of a `pytorch_lora_weights.safetensors`, as fine-tuning with `--lora-rank`
    /// writes them) and kohya files.
    pub loras: Vec<LoraChoice>,
}

impl ModelRequest {
    /// A request with the environment's Hub settings.
    pub fn new(spec: impl Into<String>, device: DeviceChoice, dtype: DTypeChoice) -> Self {
        Self {
            spec: spec.into(),
            revision: None,
            device,
            dtype,
            hub: None,
            config: None,
            loras: Vec::new(),
        }
    }
}

/// One edit.
///
/// The image is given as the user opened it; the worker scales it to the edit size itself (long
/// side capped at `max_side`, sides floored to the model's multiple, Pillow's Lanczos filter, as
/// [`crate::pipeline::image::edit_size`] and the command line's `--resolution`), so the window
/// needs to know nothing of the model and never spends frame time resizing. Sending the same
/// `Arc` again (slider re-runs) reuses the scaled image and the cached VAE encoding.
#[derive(Debug, Clone)]
pub struct EditJob {
    pub id: JobId,
    /// The input at its own size.
    pub image: Arc<RgbImage>,
    /// The most pixels the long side may have; `u32::MAX` keeps the size (floored to the multiple).
    pub max_side: u32,
    /// Prompt, scales, steps, seed, scheduler.
    pub settings: EditSettings,
    /// Size of the latent previews sent with step events; `None` sends steps without previews.
    pub preview_size: Option<(u32, u32)>,
}

/// Every image of a folder edited with the same instruction and settings (the command line's
/// `edit --image DIR --output DIR`): inputs are the folder's images by extension, each result
/// is `NAME.png` in `output_dir` carrying its settings, results already there are not made
/// again, inputs that cannot be read are skipped and listed, and the instruction is encoded
/// once. `output_dir` is created when missing and may not be `input_dir`.
#[derive(Debug, Clone)]
pub struct FolderJob {
    pub id: JobId,
    pub input_dir: PathBuf,
    pub output_dir: PathBuf,
    /// The most pixels the long side of an input may have (as [`EditJob::max_side`]).
    pub max_side: u32,
    /// The same for every image: the seed too.
    pub settings: EditSettings,
    /// Instead of `settings.seed`: the seed of the results already in `output_dir` when there
    /// are some (a stopped run continues alike), else a new random one.
    pub random_seed: bool,
}

/// News from the model thread.
#[derive(Debug, Clone)]
pub enum Event {
    /// Loading `spec` has started. The previously loaded model stays loaded (and edits queued
    /// after the load still wait for it) until the new model's files are all downloaded; then
    /// [`Event::ModelReleased`] comes.
    ModelLoading { spec: String },
    /// Bytes of one file downloaded so far (may be skipped when the window is slow).
    Download {
        /// The file's path in the repo.
        file: String,
        /// Bytes of this file on disk so far (a resumed download starts above zero).
        done: u64,
        /// This file's size.
        total: u64,
        /// This file's place (1-based) among the files this load downloads: "file 3 of 9".
        file_index: usize,
        /// How many files this load downloads (cached ones not counted; may grow once for
        /// sharded weights).
        file_count: usize,
        /// Bytes of all the files of this load so far, when the Hub listing gave their sizes.
        overall_done: Option<u64>,
        /// The sum of those sizes; `None`: only the per-file bar is known.
        overall_total: Option<u64>,
    },
    /// The previous model has been released, every file of `spec` is present, and its weights
    /// are being read: from here the load can no longer be cancelled, and edits fail until
    /// [`Event::ModelLoaded`] (or the load's [`Event::Failed`]). Sent only when a model was
    /// loaded.
    ModelReleased { spec: String },
    /// The load of `spec` was cancelled ([`super::WorkerHandle::cancel_load`]) while waiting or
    /// downloading. The previously loaded model, if any, is still loaded and usable. Downloaded
    /// files stay in the cache; a cut-off file resumes at the next load of the same repo.
    LoadCancelled { spec: String },
    /// The model is ready for edits.
    ModelLoaded(ModelInfo),
    /// An edit has started at this size (after scaling).
    EditStarted { id: JobId, width: u32, height: u32 },
    /// A denoising step is done (may be skipped when the window is slow; never the last events).
    Step(StepProgress),
    /// An edit's result.
    Finished(Box<EditResult>),
    /// The edit was cancelled (by [`Job::Cancel`] or shutdown) before it finished.
    Cancelled { id: JobId },
    /// The edit was stopped, or dropped before starting, because edit `by` replaced it.
    Superseded { id: JobId, by: JobId },
    /// A folder job has listed its folder and starts editing.
    FolderStarted {
        id: JobId,
        /// The seed every image is made with.
        seed: u64,
        /// Images to edit in this run.
        total: usize,
        /// Images whose results were already in the output folder.
        already_done: usize,
        /// Files of the input folder that are not images by their name.
        ignored: usize,
    },
    /// Where a folder job is (after each denoising step; may be skipped when the window is slow).
    FolderProgress(FolderProgress),
    /// A folder job ended: finished, cancelled, or stopped by an error writing the output
    /// folder. The last event of the job, except for a folder that could not be listed at all
    /// ([`Event::Failed`] with its id).
    FolderFinished(Box<FolderReport>),
    /// Something failed: an edit (`id` set) or a model load (`id` none). One line, for the user.
    /// A load that fails before [`Event::ModelReleased`] (a bad spec, a download error) leaves
    /// the previous model loaded; after it, no model is loaded
    /// ([`super::WorkerHandle::loaded_model`] says which is the case).
    Failed { id: Option<JobId>, message: String },
}

/// What was loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The spec as requested.
    pub name: String,
    /// The folder the weights were read from (a Hub cache snapshot for repos), or the file of a
    /// single-file checkpoint.
    pub folder: PathBuf,
    /// `cpu`, `cuda:0`, `metal:0`.
    pub device: String,
    /// `f32`, `f16`, `bf16`.
    pub dtype: String,
    /// Image sides must be multiples of this (the VAE factor).
    pub size_multiple: u32,
    /// Works, but badly (float16 on the CPU).
    pub warning: Option<String>,
    /// The LoRA files fused into the weights.
    pub loras: Vec<LoraChoice>,
    /// For a single-file checkpoint: whether its UNet came from its EMA weights.
    pub ema: Option<bool>,
    /// Memory in use on the device, read after the load and after each edit.
    pub memory: Option<DeviceMemory>,
}

/// Progress of a running edit.
#[derive(Debug, Clone)]
pub struct StepProgress {
    pub id: JobId,
    /// Steps done (1 after the first).
    pub step: usize,
    pub total: usize,
    /// Time in the denoising loop so far.
    pub elapsed: Duration,
    /// Remaining denoising time at the mean step time so far (the VAE decode comes on top).
    pub eta: Duration,
    /// The latents seen as RGB at the job's `preview_size`, when asked for.
    pub preview: Option<RgbImage>,
}

/// A finished edit.
#[derive(Debug, Clone)]
pub struct EditResult {
    pub id: JobId,
    /// The edited image, at the edit size.
    pub image: RgbImage,
    /// The input as edited (scaled to the edit size): the "before" of a comparison.
    pub input: Arc<RgbImage>,
    pub seed: u64,
    /// The settings the edit ran with (for the history and the saved file's metadata).
    pub settings: EditSettings,
    /// Whether the prompt embeddings / image latents were kept from the previous edit.
    pub reused_prompt_embeddings: bool,
    pub reused_image_latents: bool,
    /// Time in the denoising loop, and for the whole edit (encodings and decode included).
    pub denoise_time: Duration,
    pub total_time: Duration,
    /// Memory in use on the device after the edit.
    pub memory: Option<DeviceMemory>,
}

/// Progress of a folder job.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderProgress {
    pub id: JobId,
    /// Images finished (written or skipped) so far, of `total`.
    pub done: usize,
    pub total: usize,
    /// The file being edited (its name).
    pub current: String,
    /// Denoising steps of the current image, of `steps`.
    pub step: usize,
    pub steps: usize,
    /// The time left at the pace so far; None until the first step.
    pub eta: Option<Duration>,
}

/// What a folder job did.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderReport {
    pub id: JobId,
    pub output_dir: PathBuf,
    /// Images edited and written by this job.
    pub edited: usize,
    /// Images this job set out to edit (those already done not counted).
    pub total: usize,
    /// Images whose results were already in the output folder.
    pub already_done: usize,
    /// Files that could not be read or edited, skipped: (file name, one line naming the file).
    pub skipped: Vec<(String, String)>,
    /// Images not reached because the job stopped.
    pub not_reached: usize,
    /// Stopped by [`Job::Cancel`] (or a newer edit).
    pub cancelled: bool,
    /// Stopped by an error writing the output folder (one line).
    pub error: Option<String>,
    /// How many times the instruction was encoded (once for the whole folder).
    pub prompt_encodings: usize,
    /// The seed every image was made with.
    pub seed: u64,
    /// The results already there were made with other settings (which, one line).
    pub warning: Option<String>,
    pub elapsed: Duration,
}
