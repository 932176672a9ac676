//! The fine-tuning thread (`ip2p-train`) behind the window's "Fine-tune on folder" dialog: takes a
//! [`TrainRequest`], runs [`crate::train::run`] and reports [`TrainingEvent`]s over a bounded
//! channel, waking the window after each. Pause and stop are flags the loop checks between steps;
//! stop saves a checkpoint and the model so far. Plain data only, like the edit protocol. Also the
//! dialog's dataset check ([`check_dataset`]), so the window never opens a dataset itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use image::RgbImage;

use super::Waker;
use crate::model::hub::{HubSettings, ModelSpec, Variant, fetch_model};
use crate::pipeline::image::load_image;
use crate::train::data::{CheckLevel, Dataset, DatasetKind, DatasetOptions};
use crate::train::run::{
    DataSource, TrainConfig, TrainControl, TrainEvent, ValidationConfig, train,
};

/// Name of the fine-tuning thread.
pub const TRAIN_THREAD_NAME: &str = "ip2p-train";

/// What the dialog asks for, with the reference script's recipe as the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRequest {
    /// A folder of examples (imagefolder with metadata.jsonl, Parquet files, or NAME.png +
    /// NAME_edited.png + NAME.txt pairs).
    pub dataset: PathBuf,
    /// The model to start from: a folder or a Hub repo id.
    pub base_model: String,
    pub output_dir: PathBuf,
    pub max_train_steps: u64,
    pub learning_rate: f64,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub resolution: u32,
    /// Some(rank): train LoRA adapters only; None: the whole UNet.
    pub lora_rank: Option<usize>,
    pub use_ema: bool,
    pub conditioning_dropout_prob: f64,
    pub checkpointing_steps: u64,
    /// Edit this image with `validation_prompt` after every `validation_epochs` epochs.
    pub validation_image: Option<PathBuf>,
    pub validation_prompt: Option<String>,
    pub validation_epochs: u64,
    pub num_validation_images: usize,
    pub seed: u64,
    /// Train on the good examples when the check finds bad ones (else refuse to start).
    pub skip_bad_examples: bool,
    /// Encode every example once before the first step (`--cache_latents`).
    pub cache_latents: bool,
    /// The Hub and cache for a repo id; None reads the environment.
    pub hub: Option<HubSettings>,
}

impl Default for TrainRequest {
    fn default() -> Self {
        Self {
            dataset: PathBuf::new(),
            base_model: crate::model::hub::DEFAULT_REPO.into(),
            output_dir: PathBuf::new(),
            max_train_steps: 15000,
            learning_rate: crate::train::run::RECOMMENDED_LEARNING_RATE,
            train_batch_size: 4,
            gradient_accumulation_steps: 4,
            resolution: 256,
            lora_rank: None,
            use_ema: true,
            conditioning_dropout_prob: 0.05,
            checkpointing_steps: 5000,
            validation_image: None,
            validation_prompt: None,
            validation_epochs: 1,
            num_validation_images: 2,
            seed: 42,
            skip_bad_examples: true,
            cache_latents: false,
            hub: None,
        }
    }
}

/// News from the fine-tuning thread.
#[derive(Debug, Clone)]
pub enum TrainingEvent {
    /// Something worth knowing that is not an error (one line).
    Notice(String),
    /// The dataset was checked: how many examples, and the bad ones by name.
    Checked {
        total: usize,
        problems: Vec<String>,
    },
    /// Training began (or resumed) at `step` of `total_steps`.
    Started {
        step: u64,
        total_steps: u64,
    },
    /// One optimizer step done.
    Step(TrainingProgress),
    /// Validation edits of the chosen image.
    Validation {
        step: u64,
        prompt: String,
        images: Vec<RgbImage>,
    },
    CheckpointSaved {
        step: u64,
        path: PathBuf,
    },
    /// The run finished (or was stopped) and its model is written here.
    Finished {
        model: PathBuf,
        lora: bool,
        stopped_at: Option<u64>,
    },
    /// One line for the user.
    Failed(String),
}

/// One step's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingProgress {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    pub loss: f64,
    pub lr: f64,
    pub seconds_per_step: f64,
    pub eta: Duration,
    /// Resident memory of the process, when the platform says.
    pub memory_bytes: Option<u64>,
}

/// A running fine-tune: pause, resume, stop.
pub struct TrainingHandle {
    control: Arc<TrainControl>,
    thread: Option<JoinHandle<()>>,
}

impl TrainingHandle {
    /// Starts fine-tuning on its own thread.
    pub fn spawn(
        request: TrainRequest,
        waker: Waker,
    ) -> std::io::Result<(Self, Receiver<TrainingEvent>)> {
        let (events, receiver) = crossbeam_channel::bounded(256);
        let control = Arc::new(TrainControl::default());
        let thread_control = Arc::clone(&control);
        let thread = std::thread::Builder::new()
            .name(TRAIN_THREAD_NAME.into())
            .spawn(move || run(request, &thread_control, &events, &waker))?;
        let handle = Self {
            control,
            thread: Some(thread),
        };
        Ok((handle, receiver))
    }

    pub fn pause(&self) {
        self.control.set_paused(true);
    }

    pub fn resume(&self) {
        self.control.set_paused(false);
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Asks the run to stop after the current step, saving a checkpoint and the model so far.
    pub fn stop(&self) {
        self.control.request_stop();
        self.resume();
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for TrainingHandle {
    /// Closing the window stops the run cleanly (checkpoint and model written) before it returns.
    fn drop(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    request: TrainRequest,
    control: &TrainControl,
    events: &Sender<TrainingEvent>,
    waker: &Waker,
) {
    let send = |event: TrainingEvent| {
        if events.send(event).is_ok() {
            waker();
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let config = config_for(&request)?;
        let lora = config.lora_rank.is_some();
        train(&config, control, &mut |event| {
            if let Some(event) = TrainingEvent::from_train_event(event, lora) {
                send(event);
            }
        })
        .map_err(|e| e.to_string())
    }));
    match outcome {
        Ok(Ok(_)) => {}
        Ok(Err(message)) => send(TrainingEvent::Failed(message)),
        Err(_) => send(TrainingEvent::Failed(
            "fine-tuning stopped on an internal error".into(),
        )),
    }
}

/// The loop's settings for a dialog request: the base model fetched (or found in the cache),
/// the validation image read, the rest the script's defaults.
fn config_for(request: &TrainRequest) -> Result<TrainConfig, String> {
    let hub = request.hub.clone().unwrap_or_else(HubSettings::from_env);
    let spec = ModelSpec::parse(&request.base_model, None).map_err(|e| e.to_string())?;
    let base =
        fetch_model(&spec, Variant::Default, &hub, &mut |_| {}).map_err(|e| e.to_string())?;
    let data = if holds_parquet(&request.dataset) {
        DataSource::DatasetName {
            name: request.dataset.display().to_string(),
            revision: None,
        }
    } else {
        DataSource::TrainDataDir(request.dataset.clone())
    };
    let mut config = TrainConfig::new(base, data, request.output_dir.clone());
    config.seed = request.seed;
    config.resolution = request.resolution;
    config.random_flip = true;
    config.train_batch_size = request.train_batch_size;
    config.gradient_accumulation_steps = request.gradient_accumulation_steps;
    config.max_train_steps = Some(request.max_train_steps);
    config.learning_rate = request.learning_rate;
    config.lr_warmup_steps = 0;
    config.conditioning_dropout_prob = Some(request.conditioning_dropout_prob);
    config.use_ema = request.use_ema;
    config.checkpointing_steps = request.checkpointing_steps;
    config.checkpoints_total_limit = Some(1);
    config.lora_rank = request.lora_rank;
    config.skip_bad_examples = request.skip_bad_examples;
    config.cache_latents = request.cache_latents;
    config.report_to_tensorboard = false;
    // A run stopped earlier in the same folder goes on from its checkpoint.
    config.resume_from_checkpoint = Some("latest".into());
    if let (Some(path), Some(prompt)) = (&request.validation_image, &request.validation_prompt) {
        let image = load_image(path).map_err(|e| e.to_string())?;
        config.validation = Some(ValidationConfig {
            prompt: prompt.clone(),
            image,
            num_images: request.num_validation_images.max(1),
            every_epochs: request.validation_epochs.max(1),
        });
    }
    Ok(config)
}

/// A folder of examples as the dialog shows it after checking.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSummary {
    pub folder: PathBuf,
    /// "imagefolder", "Parquet", "pairs".
    pub kind: String,
    pub total: usize,
    /// Bad examples, each "name: reason".
    pub problems: Vec<String>,
}

/// Opens a folder of examples as a training run would (Parquet files, else an imagefolder or
/// pairs) and checks every file's header. Blocks on the disk: call it off the UI thread. The
/// error is one line for the user.
pub fn check_dataset(folder: &std::path::Path) -> Result<DatasetSummary, String> {
    let options = DatasetOptions::default();
    let dataset = if holds_parquet(folder) {
        Dataset::open_parquet_folder(folder, &options)
    } else {
        Dataset::open_train_data_dir(folder, &options)
    }
    .map_err(|e| e.to_string())?;
    let report = dataset.check(CheckLevel::Headers);
    Ok(DatasetSummary {
        folder: folder.to_path_buf(),
        kind: match dataset.kind() {
            DatasetKind::ImageFolder(_) => "imagefolder",
            DatasetKind::Parquet(_) => "Parquet",
            DatasetKind::Pairs(_) => "pairs",
        }
        .into(),
        total: report.total,
        problems: problem_lines(&report),
    })
}

/// A dataset check's bad examples as "name: reason" lines.
fn problem_lines(report: &crate::train::data::CheckReport) -> Vec<String> {
    report
        .problems
        .iter()
        .map(|p| format!("{}: {}", p.name, p.reason))
        .collect()
}

/// Whether a dataset folder holds Parquet files (at its top or in `data/`, as Hub datasets do).
fn holds_parquet(folder: &std::path::Path) -> bool {
    let in_folder = |dir: std::path::PathBuf| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "parquet"))
        })
    };
    in_folder(folder.to_path_buf()) || in_folder(folder.join("data"))
}

impl TrainingEvent {
    fn from_train_event(event: TrainEvent, lora: bool) -> Option<Self> {
        Some(match event {
            TrainEvent::Notice(line) => TrainingEvent::Notice(line),
            TrainEvent::DatasetChecked(report) => TrainingEvent::Checked {
                total: report.total,
                problems: problem_lines(&report),
            },
            TrainEvent::Started(plan) => TrainingEvent::Started {
                step: plan.first_step,
                total_steps: plan.total_steps,
            },
            TrainEvent::Step(step) => TrainingEvent::Step(TrainingProgress {
                step: step.step,
                total_steps: step.total_steps,
                epoch: step.epoch,
                loss: step.loss,
                lr: step.lr,
                seconds_per_step: step.seconds_per_step,
                eta: Duration::from_secs_f64(step.eta_seconds.max(0.0)),
                memory_bytes: step.rss_bytes,
            }),
            TrainEvent::Validation(validation) => TrainingEvent::Validation {
                step: validation.step,
                prompt: validation.prompt,
                images: validation.images,
            },
            TrainEvent::CheckpointSaved { step, path, .. } => {
                TrainingEvent::CheckpointSaved { step, path }
            }
            TrainEvent::Finished(outcome) => TrainingEvent::Finished {
                model: outcome.model?,
                lora,
                stopped_at: outcome.stopped.then_some(outcome.step),
            },
            // The window hears of the cache at its start and end only.
            TrainEvent::CachingLatents { done: 0, total } => {
                TrainingEvent::Notice(format!("caching the latents of {total} examples"))
            }
            TrainEvent::CachingLatents { .. } | TrainEvent::Paused | TrainEvent::Resumed => {
                return None;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_carries_cache_latents_into_the_run_and_caching_is_announced_once() {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pipelines/sd1-tiny");
        for cache_latents in [false, true] {
            let request = TrainRequest {
                dataset: PathBuf::from("data"),
                base_model: base.display().to_string(),
                output_dir: PathBuf::from("out"),
                cache_latents,
                ..TrainRequest::default()
            };
            let config = config_for(&request).unwrap();
            assert_eq!(config.cache_latents, cache_latents);
        }
        assert!(!TrainRequest::default().cache_latents);

        let event = |done| TrainEvent::CachingLatents { done, total: 3 };
        match TrainingEvent::from_train_event(event(0), false) {
            Some(TrainingEvent::Notice(line)) => {
                assert_eq!(line, "caching the latents of 3 examples");
            }
            other => panic!("expected a notice, got {other:?}"),
        }
        assert!(TrainingEvent::from_train_event(event(2), false).is_none());
    }
}
