//! The "Fine-tune on folder…" dialog: pick a folder of examples, see the dataset check, choose
//! the base model, output folder and main settings (the reference recipe as the preset), the
//! memory savers (gradient checkpointing, 8-bit AdamW, precision, cached latents, preset to what
//! fits the device's memory) with the estimated peak memory before Start, "Use all N GPUs" where
//! there are several (and the effective batch it makes), then Start / Pause / Stop, with
//! progress, a live loss curve, the latest validation edits and memory in use; when done, "Open
//! in editor" loads the new model. Training runs on the [`crate::worker::training`] thread, which
//! also reads the model's sizes and counts the GPUs ([`MemoryProfile`]); this file only sends
//! requests, draws their answers and computes the estimate's figures through the worker's
//! profile.

use std::path::PathBuf;
use std::time::Instant;

use crossbeam_channel::Receiver;
use egui::{Context, RichText, TextureHandle, TextureOptions, Ui, vec2};
use egui_plot::{Line, Plot, PlotPoints};

use crate::worker::Waker;
use crate::worker::training::DeviceKind;
use crate::worker::training::{
    DatasetSummary, MemoryFigures, MemoryProfile, MixedPrecision, TrainRequest, TrainingEvent,
    TrainingHandle, TrainingProgress,
};

use super::textures::to_color_image;

/// The dialog's state.
#[derive(Default)]
pub struct FineTune {
    pub open: bool,
    pub folder: String,
    pub output: String,
    pub base_model: String,
    pub validation_image: String,
    pub validation_prompt: String,
    pub lora: bool,
    pub request: TrainRequest,
    pub check: Option<Result<DatasetSummary, String>>,
    /// The base model's memory profile (or why there is none), from the worker.
    pub memory: Option<Result<MemoryProfile, String>>,
    /// The base model whose profile was last asked for.
    memory_asked: Option<String>,
    pub run: Option<Run>,
}

/// A run started from the dialog and what it has reported.
pub struct Run {
    /// What was asked for.
    pub request: TrainRequest,
    /// The run's own estimate and the memory free when it started.
    pub memory: Option<MemoryFigures>,
    pub handle: TrainingHandle,
    events: Receiver<TrainingEvent>,
    pub started: Instant,
    /// (step, loss) of every step.
    pub losses: Vec<[f64; 2]>,
    pub last: Option<TrainingProgress>,
    pub validation: Vec<TextureHandle>,
    pub validation_step: Option<u64>,
    pub checkpoints: Vec<u64>,
    /// The model written, and whether it is a LoRA file (to apply on the base model).
    pub finished: Option<(PathBuf, bool)>,
    pub failed: Option<String>,
    /// One-line notes from the run (skipped examples, resumed checkpoint…).
    pub notices: Vec<String>,
    /// The run has stopped between steps on Pause (not just been asked to).
    pub paused: bool,
}

impl Run {
    /// Still training (not finished, failed or stopped).
    pub fn active(&self) -> bool {
        self.finished.is_none() && self.failed.is_none()
    }
}

/// What the dialog wants the app to do.
pub enum FineTuneAction {
    /// Check this folder (on a chore thread).
    Check(PathBuf),
    /// Pick a folder with the native dialog.
    BrowseFolder,
    /// Read this base model's memory profile (on a chore thread).
    EstimateMemory(String),
    /// Load the finished model in the editor: a model, with LoRA weights on top when set.
    OpenInEditor {
        model: String,
        lora: Option<PathBuf>,
    },
}

impl FineTune {
    /// Fills the fields from the preset the first time the dialog opens.
    pub fn open_with(&mut self, current_model: &str) {
        if !self.open && self.run.is_none() {
            if self.base_model.is_empty() {
                self.base_model = current_model.to_string();
            }
            self.request = TrainRequest {
                base_model: self.base_model.clone(),
                ..self.request.clone()
            };
        }
        self.open = true;
    }

    /// Uses a chosen or dropped folder.
    pub fn set_folder(&mut self, folder: PathBuf) -> FineTuneAction {
        self.folder = folder.display().to_string();
        if self.output.is_empty() {
            self.output = folder.with_extension("finetuned").display().to_string();
        }
        self.check = None;
        FineTuneAction::Check(folder)
    }

    /// Takes in the training thread's news.
    pub fn take_events(&mut self, ctx: &Context) {
        let Some(run) = &mut self.run else { return };
        while let Ok(event) = run.events.try_recv() {
            match event {
                TrainingEvent::Checked { total, problems } => {
                    if let Some(Ok(check)) = &mut self.check {
                        check.total = total;
                        check.problems = problems;
                    }
                }
                TrainingEvent::Started { memory, .. } => run.memory = Some(memory),
                TrainingEvent::Notice(line) => run.notices.push(line),
                TrainingEvent::Step(progress) => {
                    run.losses.push([progress.step as f64, progress.loss]);
                    run.last = Some(progress);
                }
                TrainingEvent::Validation { step, images, .. } => {
                    run.validation = images
                        .iter()
                        .enumerate()
                        .map(|(i, image)| {
                            ctx.load_texture(
                                format!("validation-{i}"),
                                to_color_image(image),
                                TextureOptions::LINEAR,
                            )
                        })
                        .collect();
                    run.validation_step = Some(step);
                }
                TrainingEvent::CheckpointSaved { step, .. } => run.checkpoints.push(step),
                TrainingEvent::Finished { model, lora, .. } => run.finished = Some((model, lora)),
                TrainingEvent::Paused => run.paused = true,
                TrainingEvent::Resumed => run.paused = false,
                TrainingEvent::Failed(message) => run.failed = Some(message),
            }
        }
    }

    /// Takes the worker's memory profile of a base model: kept when it is the current one, and
    /// the memory savers preset to what fits (before any run).
    pub fn set_memory(&mut self, profile: Result<MemoryProfile, String>) {
        if let Ok(p) = &profile {
            if p.base_model != self.base_model.trim() {
                return;
            }
            if self.run.is_none() {
                p.preset(&mut self.request);
                // "Use all N GPUs" follows the device's count (off where there is one).
                if self.request.processes > 1 {
                    self.request.processes = p.gpus.max(1);
                }
            }
        }
        self.memory = Some(profile);
    }

    /// The request as Start would send it, for the estimate (LoRA from its checkbox).
    fn planned_request(&self) -> TrainRequest {
        TrainRequest {
            lora_rank: self.lora.then_some(self.request.lora_rank.unwrap_or(4)),
            ..self.request.clone()
        }
    }

    /// The estimate for the current settings, when the profile is known.
    pub fn memory_figures(&self) -> Option<MemoryFigures> {
        match &self.memory {
            Some(Ok(profile)) => Some(profile.figures(&self.planned_request())),
            _ => None,
        }
    }

    /// Whether a run holds the device (editing waits meanwhile).
    pub fn training(&self) -> bool {
        self.run.as_ref().is_some_and(Run::active)
    }

    fn start(&mut self, waker: Waker) -> Result<(), String> {
        let folder = self.folder.trim();
        if folder.is_empty() {
            return Err("choose a folder of examples first".into());
        }
        if self.output.trim().is_empty() {
            return Err("choose an output folder".into());
        }
        let validation_image = Some(self.validation_image.trim())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let validation_prompt = Some(self.validation_prompt.trim())
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        if validation_image.is_some() != validation_prompt.is_some() {
            return Err("validation needs both an image and a prompt (or neither)".into());
        }
        let request = TrainRequest {
            dataset: PathBuf::from(folder),
            base_model: self.base_model.trim().to_string(),
            output_dir: PathBuf::from(self.output.trim()),
            lora_rank: self.lora.then_some(self.request.lora_rank.unwrap_or(4)),
            validation_image,
            validation_prompt,
            ..self.request.clone()
        };
        let (handle, events) = TrainingHandle::spawn(request.clone(), waker)
            .map_err(|e| format!("cannot start the training thread: {e}"))?;
        self.run = Some(Run {
            request,
            memory: None,
            handle,
            events,
            started: Instant::now(),
            losses: Vec::new(),
            last: None,
            validation: Vec::new(),
            validation_step: None,
            checkpoints: Vec::new(),
            finished: None,
            failed: None,
            notices: Vec::new(),
            paused: false,
        });
        Ok(())
    }

    /// Draws the dialog; returns what the app should do.
    pub fn show(&mut self, ctx: &Context, waker: &Waker) -> Option<FineTuneAction> {
        let mut open = self.open;
        let mut action = None;
        egui::Window::new("Fine-tune on folder")
            .open(&mut open)
            .default_width(560.0)
            .show(ctx, |ui| action = self.contents(ui, waker));
        self.open = open;
        action
    }

    fn contents(&mut self, ui: &mut Ui, waker: &Waker) -> Option<FineTuneAction> {
        let mut action = None;
        let running = self.training();
        ui.add_enabled_ui(!running, |ui| {
            let label = ui.label("Examples folder");
            ui.horizontal(|ui| {
                let field = ui
                    .add(egui::TextEdit::singleline(&mut self.folder).desired_width(380.0))
                    .labelled_by(label.id);
                if field.lost_focus() && !self.folder.trim().is_empty() {
                    action = Some(FineTuneAction::Check(PathBuf::from(self.folder.trim())));
                }
                if ui.button("Choose…").clicked() {
                    action = Some(FineTuneAction::BrowseFolder);
                }
                if ui.button("Check").clicked() && !self.folder.trim().is_empty() {
                    action = Some(FineTuneAction::Check(PathBuf::from(self.folder.trim())));
                }
            });
            ui.weak(
                "A Hugging Face imagefolder (metadata.jsonl with input_image, edit_prompt, \
                 edited_image), Parquet files, or pairs NAME.png + NAME_edited.png with the \
                 instruction in NAME.txt.",
            );
            match &self.check {
                Some(Ok(check)) => {
                    ui.label(format!(
                        "{} ({}): {} examples, {} bad",
                        check.folder.display(),
                        check.kind,
                        check.total,
                        check.problems.len()
                    ));
                    if !check.problems.is_empty() {
                        egui::CollapsingHeader::new(format!(
                            "{} examples will be skipped",
                            check.problems.len()
                        ))
                        .show(ui, |ui| {
                            for problem in check.problems.iter().take(50) {
                                ui.label(problem);
                            }
                        });
                    }
                }
                Some(Err(message)) => {
                    ui.colored_label(ui.visuals().error_fg_color, message);
                }
                None => {}
            }
            ui.separator();
            let base_focused = text_row(ui, "Base model", &mut self.base_model);
            let base = self.base_model.trim();
            // One action a frame: a folder check asked for in this frame goes first.
            if action.is_none()
                && !base_focused
                && !base.is_empty()
                && self.memory_asked.as_deref() != Some(base)
            {
                self.memory_asked = Some(base.to_string());
                self.memory = None;
                action = Some(FineTuneAction::EstimateMemory(base.to_string()));
            }
            text_row(ui, "Output folder", &mut self.output);
            let request = &mut self.request;
            ui.add(
                egui::Slider::new(&mut request.max_train_steps, 10..=50_000)
                    .logarithmic(true)
                    .text("Training steps"),
            );
            ui.add(
                egui::Slider::new(&mut request.learning_rate, 1e-6..=1e-3)
                    .logarithmic(true)
                    .text("Learning rate"),
            );
            ui.add(egui::Slider::new(&mut request.train_batch_size, 1..=32).text("Batch size"));
            ui.add(
                egui::Slider::new(&mut request.gradient_accumulation_steps, 1..=32)
                    .text("Gradient accumulation"),
            );
            ui.add(
                egui::Slider::new(&mut request.resolution, 64..=1024)
                    .step_by(64.0)
                    .text("Resolution"),
            );
            ui.add(
                egui::Slider::new(&mut request.conditioning_dropout_prob, 0.0..=0.3)
                    .text("Conditioning dropout"),
            );
            ui.horizontal(|ui| {
                ui.checkbox(&mut self.lora, "LoRA (adapters only)")
                    .on_hover_text(
                        "Trains small adapters on the attention layers: far less memory",
                    );
                ui.checkbox(&mut request.use_ema, "EMA weights");
            });
            ui.horizontal(|ui| {
                ui.checkbox(
                    &mut request.gradient_checkpointing,
                    "Gradient checkpointing",
                )
                .on_hover_text(
                    "Recomputes the UNet's blocks in the backward pass instead of keeping their \
                     activations: far less memory, one more forward pass of time",
                );
                ui.checkbox(&mut request.use_8bit_adam, "8-bit AdamW")
                    .on_hover_text(
                        "Keeps the optimizer's moments in 8 bits: 2 bytes per weight instead of 8",
                    );
                ui.checkbox(&mut request.cache_latents, "Cache latents")
                    .on_hover_text(
                        "Encodes each example once and skips the VAE and text encoder afterwards",
                    );
            });
            let gpu = matches!(&self.memory, Some(Ok(p)) if p.device == DeviceKind::Gpu);
            let cpu_bf16 =
                matches!(&self.memory, Some(Ok(p)) if p.device == DeviceKind::Cpu && p.bf16);
            ui.horizontal(|ui| {
                egui::ComboBox::from_label("Precision")
                    .selected_text(precision_name(request.mixed_precision))
                    .show_ui(ui, |ui| {
                        let choices: &[MixedPrecision] = if gpu {
                            &[
                                MixedPrecision::No,
                                MixedPrecision::Bf16,
                                MixedPrecision::Fp16,
                            ]
                        } else if cpu_bf16 {
                            &[MixedPrecision::No, MixedPrecision::Bf16]
                        } else {
                            &[MixedPrecision::No]
                        };
                        for &choice in choices {
                            ui.selectable_value(
                                &mut request.mixed_precision,
                                choice,
                                precision_name(choice),
                            );
                        }
                    });
                if cpu_bf16 {
                    ui.weak(
                        "On the CPU training computes in float32; bf16 holds the frozen weights \
                         in half",
                    );
                } else if !gpu {
                    ui.weak("On this CPU training runs in float32");
                }
            });
            let gpus = match &self.memory {
                Some(Ok(profile)) => profile.gpus,
                _ => 0,
            };
            if gpus > 1 {
                let mut all = request.processes > 1;
                ui.checkbox(&mut all, format!("Use all {gpus} GPUs"))
                    .on_hover_text(
                        "One training rank per GPU, each with the batch size above and its own \
                         copy of the model; their gradients are averaged every step (as \
                         accelerate launch --multi_gpu)",
                    );
                request.processes = if all { gpus } else { 1 };
            }
            ui.weak(effective_batch(request));
            text_row(ui, "Validation image", &mut self.validation_image);
            text_row(ui, "Validation prompt", &mut self.validation_prompt);
        });
        match (&self.memory, self.memory_figures()) {
            (_, Some(figures)) if figures.fits() => {
                ui.horizontal(|ui| {
                    ui.label(figures.summary());
                    if self.request.processes > 1 {
                        ui.weak("(on each GPU)");
                    }
                });
            }
            (_, Some(figures)) => {
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    format!(
                        "{}: too much; turn on the savers above, LoRA, or lower the batch size or resolution",
                        figures.summary()
                    ),
                );
            }
            (Some(Err(message)), None) => {
                ui.weak(format!("Estimated peak memory: unknown ({message})"));
            }
            (_, None) => {
                ui.weak("Estimated peak memory: reading the model's sizes…");
            }
        }

        ui.separator();
        ui.horizontal(|ui| {
            if ui
                .add_enabled(!running, egui::Button::new("Start"))
                .clicked()
                && let Err(message) = self.start(waker.clone())
            {
                self.check = Some(Err(message));
            }
            if let Some(run) = self.run.as_ref().filter(|r| r.active()) {
                let label = if run.handle.is_paused() {
                    "Resume"
                } else {
                    "Pause"
                };
                if ui.button(label).clicked() {
                    if run.handle.is_paused() {
                        run.handle.resume();
                    } else {
                        run.handle.pause();
                    }
                }
                if ui
                    .button("Stop")
                    .on_hover_text("Stop after this step; the model so far is saved")
                    .clicked()
                {
                    run.handle.stop();
                }
                if run.paused {
                    ui.weak("Paused");
                } else if run.handle.is_paused() {
                    ui.weak("Pausing after this step…");
                }
            }
        });
        if let Some(run) = &self.run {
            if let Some(progress) = &run.last {
                let fraction = progress.step as f32 / progress.total_steps.max(1) as f32;
                let estimate = run
                    .memory
                    .map(|m| format!(" (estimated peak {:.1} GB)", m.needed as f64 / 1e9))
                    .unwrap_or_default();
                let memory = progress
                    .memory_bytes
                    .map(|b| format!(" · {:.1} GB in use{estimate}", b as f64 / 1e9))
                    .unwrap_or_default();
                ui.add(egui::ProgressBar::new(fraction).text(format!(
                    "step {} of {} · loss {:.4} · {:.0} s left{memory}",
                    progress.step,
                    progress.total_steps,
                    progress.loss,
                    progress.eta.as_secs_f64()
                )));
            } else if run.active() {
                ui.label("Checking the examples and loading the model…");
            }
            if !run.losses.is_empty() {
                Plot::new("loss")
                    .height(160.0)
                    .allow_scroll(false)
                    .x_axis_label("step")
                    .y_axis_label("loss")
                    .show(ui, |plot| {
                        plot.line(Line::new("loss", PlotPoints::from(run.losses.clone())));
                    });
            }
            if let Some(step) = run.validation_step {
                ui.label(format!("Validation at step {step}"));
                ui.horizontal_wrapped(|ui| {
                    for texture in &run.validation {
                        ui.add(egui::Image::new(texture).fit_to_exact_size(vec2(128.0, 128.0)));
                    }
                });
            }
            for notice in &run.notices {
                ui.weak(notice);
            }
            if let Some(message) = &run.failed {
                ui.colored_label(ui.visuals().error_fg_color, message);
            }
            if let Some((model, lora)) = &run.finished {
                ui.label(RichText::new(format!("Saved {}", model.display())).strong());
                if ui.button("Open in editor").clicked() {
                    action = Some(if *lora {
                        FineTuneAction::OpenInEditor {
                            model: self.base_model.trim().to_string(),
                            lora: Some(model.clone()),
                        }
                    } else {
                        FineTuneAction::OpenInEditor {
                            model: model.display().to_string(),
                            lora: None,
                        }
                    });
                }
            }
        }
        action
    }
}

/// A labelled one-line text field; returns whether it has the keyboard focus.
fn text_row(ui: &mut Ui, label: &str, value: &mut String) -> bool {
    ui.horizontal(|ui| {
        let label = ui.label(label);
        ui.add(egui::TextEdit::singleline(value).desired_width(360.0))
            .labelled_by(label.id)
            .has_focus()
    })
    .inner
}

/// "Effective batch: 4 × 2 GPUs × 4 accumulation steps = 32 examples per update".
fn effective_batch(request: &TrainRequest) -> String {
    let (batch, gpus, accumulation) = (
        request.train_batch_size,
        request.processes.max(1),
        request.gradient_accumulation_steps.max(1),
    );
    let mut factors = vec![batch.to_string()];
    if gpus > 1 {
        factors.push(format!("{gpus} GPUs"));
    }
    if accumulation > 1 {
        factors.push(format!("{accumulation} accumulation steps"));
    }
    let total = batch * gpus * accumulation;
    let examples = if total == 1 { "example" } else { "examples" };
    if factors.len() == 1 {
        format!("Effective batch: {total} {examples} per update")
    } else {
        format!(
            "Effective batch: {} = {total} {examples} per update",
            factors.join(" × ")
        )
    }
}

/// The precision as the dialog names it.
fn precision_name(precision: MixedPrecision) -> &'static str {
    match precision {
        MixedPrecision::No => "fp32",
        MixedPrecision::Bf16 => "bf16",
        MixedPrecision::Fp16 => "fp16",
    }
}
