//! The editor's state types that more than one part of the window reads: the model load, the
//! running edit and what it is for, the input, the history, notices, and which dialogs are open.
//! [`super::app`] changes them; [`super::panels`], [`super::dialogs`] and [`super::explorer`]
//! read them, so they live here and the imports run one way.

use std::sync::Arc;
use std::time::Instant;

use egui::TextureHandle;
use image::RgbImage;

use crate::worker::{EditRecord, EditResult, JobId, LoraChoice, StepProgress};

use super::tasks::OpenedImage;

/// A model load in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Loading {
    pub spec: String,
    pub download: Option<DownloadStatus>,
}

/// A model load that failed, for the status bar and the model manager.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadFailure {
    pub spec: String,
    pub message: String,
}

/// The file being downloaded and how far along it is.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadStatus {
    pub file: String,
    pub done: u64,
    pub total: u64,
    /// 1-based, of `file_count` files this load downloads.
    pub file_index: usize,
    pub file_count: usize,
    /// Bytes over all files, when the Hub said their sizes.
    pub overall: Option<(u64, u64)>,
}

impl DownloadStatus {
    /// Fraction done, over all files when known, else of this file.
    pub fn fraction(&self) -> f32 {
        let (done, total) = self.overall.unwrap_or((self.done, self.total));
        if total == 0 {
            0.0
        } else {
            (done as f64 / total as f64) as f32
        }
    }

    /// "unet/diffusion_pytorch_model.safetensors (3 of 9): 120 of 3400 MB".
    pub fn describe(&self) -> String {
        let (done, total) = self.overall.unwrap_or((self.done, self.total));
        format!(
            "{} ({} of {}): {:.0} of {:.0} MB",
            self.file,
            self.file_index,
            self.file_count,
            done as f64 / 1e6,
            total as f64 / 1e6
        )
    }
}

/// What a running edit is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The main edit: its result joins the history and shows.
    Main,
    /// A cell of the guidance explorer's grid.
    Explorer { cell: usize },
}

/// The edit the model thread is working on for us.
#[derive(Debug, Clone)]
pub struct RunningEdit {
    pub id: JobId,
    pub purpose: Purpose,
    pub started: Instant,
    /// The size it runs at, once the thread said.
    pub size: Option<(u32, u32)>,
    /// The latest step event.
    pub progress: Option<StepProgress>,
    /// The input it edits, at its own size.
    pub source: Arc<RgbImage>,
}

/// The input image and its texture.
#[derive(Clone)]
pub struct InputImage {
    pub opened: OpenedImage,
    pub texture: TextureHandle,
    /// File name, or where it came from ("clipboard", "result #3").
    pub name: String,
}

/// One finished edit of this session.
#[derive(Clone)]
pub struct HistoryEntry {
    /// 1-based, in the order results arrived.
    pub number: usize,
    pub result: Arc<EditResult>,
    /// The input it edited, at its own size (to tell whether a slider change can re-run it).
    pub source: Arc<RgbImage>,
    /// The model that made it (for the saved file's record).
    pub model: String,
    pub dtype: String,
    pub texture: TextureHandle,
    /// The input as edited, for before/after.
    pub before: TextureHandle,
}

impl HistoryEntry {
    /// The settings as a saved PNG carries them.
    pub fn record(&self) -> EditRecord {
        let (width, height) = self.result.image.dimensions();
        EditRecord::new(
            &self.model,
            &self.result.settings,
            width,
            height,
            &self.dtype,
        )
    }
}

/// A message shown at the top of the image view until dismissed.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub text: String,
    pub is_error: bool,
}

/// Which windows are open and what is typed in them.
#[derive(Debug, Clone, Default)]
pub struct DialogState {
    pub model_manager_open: bool,
    /// The model folder, repo id or single file typed in the model manager.
    pub model_field: String,
    /// The config folder or repo typed for single-file checkpoints (empty: the default model's).
    pub config_field: String,
    /// The LoRA file typed in the model manager.
    pub lora_field: String,
    /// The LoRAs fused into every model loaded, in order, with their scales.
    pub loras: Vec<LoraChoice>,
    pub save_open: bool,
    /// The file typed (or chosen with Browse…) in the Save window.
    pub save_path: String,
    pub about_open: bool,
}
