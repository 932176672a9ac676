//! The fine-tuning thread (`ip2p-train`) behind the window's "Fine-tune on folder" dialog: takes a
//! [`TrainRequest`], runs [`crate::train::run`] and reports [`TrainingEvent`]s over a bounded
//! channel, waking the window after each. Pause and stop are flags the loop checks between steps;
//! stop saves a checkpoint and the model so far. With several GPUs ("Use all N GPUs") the thread
//! runs one rank per GPU as threads of its own ([`train_ranks`]), joined as the command line's
//! processes are. Plain data only, like the edit protocol. Also the dialog's dataset check
//! ([`check_dataset`]), so the window never opens a dataset itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use image::RgbImage;

use super::Waker;
use crate::model::device::{DeviceChoice, select_device};
use crate::model::hub::{HubSettings, ModelSpec, Variant, cached_snapshot, fetch_model};
use crate::pipeline::image::load_image;
use crate::train::data::{CheckLevel, Dataset, DatasetKind, DatasetOptions};
use crate::train::distributed::{DEFAULT_TIMEOUT, DistributedError, WorldConfig};
pub use crate::train::memory::DeviceKind;
use crate::train::memory::{
    MemorySettings, ModelSizes, available_memory, estimate, fit, format_bytes,
};
pub use crate::train::run::MixedPrecision;
use crate::train::run::{
    DataSource, RunError, TrainConfig, TrainControl, TrainEvent, TrainOutcome, ValidationConfig,
    train,
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
    /// Recompute the UNet's blocks in the backward pass instead of keeping their activations.
    pub gradient_checkpointing: bool,
    /// AdamW with 8-bit moments.
    pub use_8bit_adam: bool,
    /// The frozen networks' precision (16 bits only on a GPU; the CPU trains in float32).
    pub mixed_precision: MixedPrecision,
    /// Encode each example once and train from the cached latents.
    pub cache_latents: bool,
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
    /// Data-parallel ranks, one per GPU ("Use all N GPUs"): each trains `train_batch_size`
    /// examples of every step and the gradients are averaged. 1 trains on one device.
    pub processes: usize,
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
            gradient_checkpointing: false,
            use_8bit_adam: false,
            mixed_precision: MixedPrecision::No,
            cache_latents: false,
            conditioning_dropout_prob: 0.05,
            checkpointing_steps: 5000,
            validation_image: None,
            validation_prompt: None,
            validation_epochs: 1,
            num_validation_images: 2,
            seed: 42,
            skip_bad_examples: true,
            processes: 1,
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
    /// Training began (or resumed) at `step` of `total_steps`, with its estimated peak memory.
    Started {
        step: u64,
        total_steps: u64,
        memory: MemoryFigures,
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
    /// The run is waiting, paused, before its next step (every rank, with several GPUs).
    Paused,
    /// It goes on after a pause.
    Resumed,
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
        let mut forward = |event| {
            if let Some(event) = TrainingEvent::from_train_event(event, lora) {
                send(event);
            }
        };
        if request.processes > 1 {
            train_ranks(&config, request.processes, control, &mut forward)
        } else {
            train(&config, control, &mut forward).map_err(failure_line)
        }
    }));
    // The run's gradients and optimizer state are gone: the window need not keep their blocks.
    crate::heap::release_cached();
    match outcome {
        Ok(Ok(_)) => {}
        Ok(Err(message)) => send(TrainingEvent::Failed(message)),
        Err(_) => send(TrainingEvent::Failed(
            "fine-tuning stopped on an internal error".into(),
        )),
    }
}

/// A failed run as one line for the window.
fn failure_line(error: RunError) -> String {
    match error {
        // The window's names for the settings to change, not the command line's flags.
        RunError::OutOfMemory(oom) => oom.message_with_labels(),
        other => other.to_string(),
    }
}

/// Why one rank of [`train_ranks`] ended without a model.
struct RankFailure {
    /// It failed only because another rank did (its peer went away, or the run stopped while it
    /// waited for the others).
    because_of_another: bool,
    /// One line for the window.
    message: String,
}

impl RankFailure {
    fn new(error: RunError) -> Self {
        Self {
            because_of_another: matches!(
                error,
                RunError::Distributed(
                    DistributedError::PeerClosed { .. }
                        | DistributedError::PeerTimeout { .. }
                        | DistributedError::Cancelled { .. }
                )
            ),
            message: failure_line(error),
        }
    }

    fn internal(message: String) -> Self {
        Self {
            because_of_another: false,
            message,
        }
    }
}

/// "Use all N GPUs": one rank per device as threads of this process, each with its own model
/// copy, connected through the same rendezvous (on a free port of 127.0.0.1) and gradient sums
/// as the command line's processes. Rank 0 reports to the window and alone writes; pause and
/// stop reach every rank through the shared `control` and are agreed between them. A rank that
/// fails stops the others, and its own error is the one reported (not the others' "rank k
/// stopped").
fn train_ranks(
    config: &TrainConfig,
    processes: usize,
    control: &TrainControl,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainOutcome, String> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map_err(|e| format!("cannot find a free local port for the GPUs to meet on: {e}"))?
        .port();
    let configs = (0..processes)
        .map(|rank| {
            let device = if config.device.is_cuda() {
                select_device(DeviceChoice::Cuda(rank)).map_err(|e| format!("GPU {rank}: {e}"))?
            } else {
                config.device.clone()
            };
            Ok(TrainConfig {
                device,
                distributed: Some(WorldConfig {
                    rank,
                    world_size: processes,
                    local_rank: rank,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    timeout: DEFAULT_TIMEOUT,
                }),
                ..config.clone()
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let panicked = || RankFailure::internal("fine-tuning stopped on an internal error".into());
    // A rank's result; when it failed, the others are asked to stop.
    let train_rank = |config: &TrainConfig, on_event: &mut dyn FnMut(TrainEvent)| {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            train(config, control, on_event).map_err(RankFailure::new)
        }))
        .unwrap_or_else(|_| Err(panicked()));
        if result.is_err() {
            control.request_stop();
        }
        result
    };
    let results = std::thread::scope(|scope| {
        let others = (1..processes)
            .map(|rank| {
                let (config, train_rank) = (&configs[rank], &train_rank);
                std::thread::Builder::new()
                    .name(format!("{TRAIN_THREAD_NAME}-rank{rank}"))
                    .spawn_scoped(scope, move || train_rank(config, &mut |_| {}))
            })
            .collect::<Vec<_>>();
        if others.iter().any(Result::is_err) {
            // Rank 0 would wait at the rendezvous for a rank that never started.
            control.request_stop();
        }
        let mut results = vec![train_rank(&configs[0], on_event)];
        for other in others {
            results.push(match other {
                Ok(thread) => thread.join().unwrap_or_else(|_| Err(panicked())),
                Err(e) => Err(RankFailure::internal(format!(
                    "cannot start a training thread: {e}"
                ))),
            });
        }
        results
    });
    let devices: Vec<String> = configs
        .iter()
        .map(|c| crate::model::device::device_label(&c.device))
        .collect();
    outcome_of_ranks(results, &devices)
}

/// The run's outcome from its ranks' (rank 0's model, or the error that ended the run: the
/// first rank's own error rather than the "rank k stopped" of those it took down).
fn outcome_of_ranks(
    results: Vec<Result<TrainOutcome, RankFailure>>,
    devices: &[String],
) -> Result<TrainOutcome, String> {
    let mut results = results.into_iter();
    let failure = match results.next() {
        Some(Ok(outcome)) => return Ok(outcome),
        Some(Err(failure)) => failure,
        None => return Err("no ranks to train".into()),
    };
    if failure.because_of_another {
        for (rank, result) in (1..).zip(results) {
            if let Err(cause) = result
                && !cause.because_of_another
            {
                let device = devices.get(rank).map_or("?", String::as_str);
                return Err(format!("rank {rank} on {device}: {}", cause.message));
            }
        }
    }
    Err(failure.message)
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
    config.device = training_device();
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
    config.gradient_checkpointing = request.gradient_checkpointing;
    config.use_8bit_adam = request.use_8bit_adam;
    config.mixed_precision = request.mixed_precision;
    config.cache_latents = request.cache_latents;
    config.checkpointing_steps = request.checkpointing_steps;
    config.checkpoints_total_limit = Some(1);
    config.lora_rank = request.lora_rank;
    config.skip_bad_examples = request.skip_bad_examples;
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

/// Where the dialog's fine-tuning runs, as `train --device auto`: the GPU when the build has one
/// and it opens, else the CPU.
pub fn training_device() -> candle_core::Device {
    select_device(DeviceChoice::Auto).unwrap_or(candle_core::Device::Cpu)
}

/// What the dialog needs to show a run's estimated peak memory for any of its settings, without
/// asking the worker again: the base model's sizes (from its configs and weight headers) and
/// the memory the training device has free. Plain numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryProfile {
    /// The base model as the dialog named it.
    pub base_model: String,
    pub sizes: ModelSizes,
    /// Bytes free on the training device (None where the platform does not say).
    pub available: Option<u64>,
    pub device: DeviceKind,
    /// GPUs the run could use, one rank each ("Use all N GPUs" when more than one).
    pub gpus: usize,
    /// Whether bf16 mixed precision is offered: on a GPU, and on a CPU with avx512_bf16 (where
    /// it holds the frozen weights in bf16).
    pub bf16: bool,
}

/// A request's estimated peak memory and what the device has free, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFigures {
    pub needed: u64,
    pub available: Option<u64>,
}

impl MemoryFigures {
    /// "Estimated peak memory: 1.7 GB of 20.3 GB available".
    pub fn summary(&self) -> String {
        match self.available {
            Some(available) => format!(
                "Estimated peak memory: {} of {} available",
                format_bytes(self.needed),
                format_bytes(available)
            ),
            None => format!("Estimated peak memory: {}", format_bytes(self.needed)),
        }
    }

    /// Whether the run fits (unknown counts as fitting).
    pub fn fits(&self) -> bool {
        self.available.is_none_or(|a| self.needed <= a)
    }
}

impl MemoryProfile {
    fn settings(&self, request: &TrainRequest) -> MemorySettings {
        MemorySettings {
            resolution: request.resolution,
            train_batch_size: request.train_batch_size,
            gradient_accumulation_steps: request.gradient_accumulation_steps,
            lora_rank: request.lora_rank,
            gradient_checkpointing: request.gradient_checkpointing,
            use_8bit_adam: request.use_8bit_adam,
            use_ema: request.use_ema,
            cache_latents: request.cache_latents,
            // The dialog's runs flip at random.
            random_flip: true,
            // On the CPU, bf16 holds the frozen weights in half (fp16 is not offered there).
            half_precision_frozen: match self.device {
                DeviceKind::Gpu => request.mixed_precision != MixedPrecision::No,
                DeviceKind::Cpu => self.bf16 && request.mixed_precision == MixedPrecision::Bf16,
            },
            // The cache of a typical folder; the estimate is shown before the count is known.
            examples: 1000,
            device: self.device,
        }
    }

    /// The estimate for a request's settings.
    pub fn figures(&self, request: &TrainRequest) -> MemoryFigures {
        MemoryFigures {
            needed: estimate(&self.sizes, &self.settings(request)).total(),
            available: self.available,
        }
    }

    /// Turns on, in `request`, what makes the run fit without changing what it learns
    /// (checkpointing, 8-bit AdamW, cached latents, half precision on a GPU), largest saving
    /// first, as far as needed.
    pub fn preset(&self, request: &mut TrainRequest) {
        let Some(available) = self.available else {
            return;
        };
        let fitted = fit(&self.sizes, &self.settings(request), available);
        request.gradient_checkpointing = fitted.gradient_checkpointing;
        request.use_8bit_adam = fitted.use_8bit_adam;
        request.cache_latents = fitted.cache_latents;
        if fitted.half_precision_frozen
            && self.bf16
            && request.mixed_precision == MixedPrecision::No
        {
            request.mixed_precision = MixedPrecision::Bf16;
        }
    }
}

/// Reads a base model's sizes (a local folder, or a Hub repo already in the cache: nothing is
/// downloaded) and the training device's free memory. Reads a few small files: call it off the
/// UI thread. The error is one line for the user.
pub fn memory_profile(base_model: &str, hub: Option<HubSettings>) -> Result<MemoryProfile, String> {
    let hub = hub.unwrap_or_else(HubSettings::from_env);
    let folder = match ModelSpec::parse(base_model, None).map_err(|e| e.to_string())? {
        ModelSpec::LocalDir(dir) => dir,
        ModelSpec::SingleFile(path) => {
            return Err(format!(
                "{} is a single-file checkpoint: fine-tuning needs a diffusers pipeline folder or a Hub repo id",
                path.display()
            ));
        }
        ModelSpec::Hub { repo_id, revision } => cached_snapshot(&hub, &repo_id, &revision)
            .ok_or_else(|| {
                format!("{repo_id} is not downloaded yet: the memory estimate comes once it is")
            })?,
    };
    let sizes = ModelSizes::from_folder(&folder, Variant::Default).map_err(|e| e.to_string())?;
    let device = training_device();
    Ok(MemoryProfile {
        base_model: base_model.to_string(),
        sizes,
        available: available_memory(&device).map(|a| a.bytes),
        device: if device.is_cpu() {
            DeviceKind::Cpu
        } else {
            DeviceKind::Gpu
        },
        gpus: if device.is_cuda() {
            crate::model::device::cuda_device_count()
        } else {
            usize::from(!device.is_cpu())
        },
        bf16: !device.is_cpu() || crate::model::nn::cpu_bf16_enabled(),
    })
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
                memory: MemoryFigures {
                    needed: plan.estimated_peak_bytes,
                    available: plan.available_bytes,
                },
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
            TrainEvent::Paused => TrainingEvent::Paused,
            TrainEvent::Resumed => TrainingEvent::Resumed,
            TrainEvent::CachingLatents { .. } => return None,
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

    fn fixture() -> String {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pipelines/sd1-tiny")
            .display()
            .to_string()
    }

    #[test]
    fn the_memory_profile_gives_figures_for_any_request_and_presets_what_fits() {
        let profile = memory_profile(&fixture(), None).unwrap();
        assert_eq!(profile.device, DeviceKind::Cpu);
        let request = TrainRequest {
            resolution: 512,
            train_batch_size: 2,
            ..TrainRequest::default()
        };
        let figures = profile.figures(&request);
        assert!(figures.needed > 0);
        assert!(figures.summary().starts_with("Estimated peak memory: "));
        // Plenty of memory: the recipe is left as it is.
        let mut roomy = request.clone();
        MemoryProfile {
            available: Some(u64::MAX),
            ..profile.clone()
        }
        .preset(&mut roomy);
        assert_eq!(roomy, request);
        // Just too little: the savers that keep results come on until it fits.
        let tight = MemoryProfile {
            available: Some(figures.needed - 1),
            ..profile.clone()
        };
        let mut preset = request.clone();
        tight.preset(&mut preset);
        assert!(preset.gradient_checkpointing, "{preset:?}");
        assert!(tight.figures(&preset).fits());
        assert_eq!(preset.lora_rank, None);
        assert_eq!(preset.train_batch_size, 2);
    }

    /// With several GPUs the window reports the error of the rank that failed first, not the
    /// "rank 1 stopped or crashed" of rank 0 that it took down; rank 0's own error otherwise.
    #[test]
    fn the_failing_rank_s_own_error_is_the_one_reported() {
        let devices = ["cuda:0".to_string(), "cuda:1".into(), "cuda:2".into()];
        let peer_gone = || {
            Err(RankFailure::new(RunError::Distributed(
                DistributedError::PeerClosed {
                    rank: 2,
                    what: "summing gradients".into(),
                },
            )))
        };
        let own = |message: &str| Err(RankFailure::internal(message.into()));
        let outcome = outcome_of_ranks(
            vec![peer_gone(), peer_gone(), own("out of GPU memory")],
            &devices,
        );
        assert_eq!(outcome.unwrap_err(), "rank 2 on cuda:2: out of GPU memory");
        // Rank 0's own error comes first.
        let outcome = outcome_of_ranks(vec![own("bad dataset"), own("other")], &devices);
        assert_eq!(outcome.unwrap_err(), "bad dataset");
        // Nobody else failed on their own: rank 0's message stands.
        let message = outcome_of_ranks(vec![peer_gone(), peer_gone()], &devices).unwrap_err();
        assert!(message.contains("rank 2 stopped or crashed"), "{message}");
        let finished = TrainOutcome {
            step: 3,
            stopped: false,
            model: Some(PathBuf::from("out")),
            checkpoint: None,
        };
        let outcome = outcome_of_ranks(vec![Ok(finished.clone()), peer_gone()], &devices);
        assert_eq!(outcome.unwrap(), finished);
    }

    #[test]
    fn a_hub_model_not_downloaded_has_no_profile_yet() {
        let cache = tempfile::tempdir().unwrap();
        let hub = HubSettings {
            cache_dir: cache.path().to_path_buf(),
            ..HubSettings::from_env()
        };
        let error = memory_profile("owner/model", Some(hub)).unwrap_err();
        assert!(
            error.contains("owner/model is not downloaded yet"),
            "{error}"
        );
    }
}
