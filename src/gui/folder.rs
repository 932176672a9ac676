//! The "Apply to folder…" dialog: the instruction and settings on the controls applied to every
//! image of a folder, as `edit --image DIR --output DIR` does. Pick the input and output
//! folders (typed, or Browse…), start, watch the progress with the time left, Cancel (or Esc),
//! then read the summary with the files that were skipped. The run is a [`FolderJob`] on the
//! model thread; this file only draws the dialog and takes in the job's events.

use std::time::Instant;

use egui::{Context, RichText};

use crate::worker::{Event, FolderProgress, FolderReport, JobId, human_duration};

/// The dialog's state.
#[derive(Default)]
pub struct FolderDialog {
    pub open: bool,
    /// The folder of images to edit, as typed or chosen.
    pub input: String,
    /// Where the results go.
    pub output: String,
    pub running: Option<FolderRun>,
    /// The last run's outcome.
    pub report: Option<FolderReport>,
    /// Why the last run could not start (a folder that cannot be listed, the output a file…).
    pub error: Option<String>,
}

/// A folder job the model thread is working on.
#[derive(Debug, Clone)]
pub struct FolderRun {
    pub id: JobId,
    pub started: Instant,
    /// Images to edit, once the job has listed the folder.
    pub total: Option<usize>,
    pub already_done: usize,
    /// The seed every image gets, once the job has chosen it.
    pub seed: Option<u64>,
    pub progress: Option<FolderProgress>,
}

/// What the dialog asks of the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FolderAction {
    Start,
    Cancel,
    BrowseInput,
    BrowseOutput,
}

impl FolderDialog {
    /// The running job's id.
    pub fn running_id(&self) -> Option<JobId> {
        self.running.as_ref().map(|run| run.id)
    }

    /// A job was sent.
    pub fn started(&mut self, id: JobId) {
        self.running = Some(FolderRun {
            id,
            started: Instant::now(),
            total: None,
            already_done: 0,
            seed: None,
            progress: None,
        });
        self.report = None;
        self.error = None;
    }

    /// Takes a model-thread event about the running job; returns it when it is about another.
    pub fn on_event(&mut self, event: Event) -> Option<Event> {
        let Some(id) = self.running_id() else {
            return Some(event);
        };
        match event {
            Event::FolderStarted {
                id: event_id,
                seed,
                total,
                already_done,
                ..
            } if event_id == id => {
                if let Some(run) = &mut self.running {
                    run.total = Some(total);
                    run.already_done = already_done;
                    run.seed = Some(seed);
                }
            }
            Event::FolderProgress(progress) if progress.id == id => {
                if let Some(run) = &mut self.running {
                    run.progress = Some(progress);
                }
            }
            Event::FolderFinished(report) if report.id == id => {
                self.running = None;
                self.report = Some(*report);
            }
            Event::Failed {
                id: Some(event_id),
                message,
            } if event_id == id => {
                self.running = None;
                self.error = Some(message);
            }
            other => return Some(other),
        }
        None
    }

    /// Draws the dialog. `settings` describes what every image gets; `blocker` says why Start
    /// cannot run now.
    pub fn show(
        &mut self,
        ctx: &Context,
        settings: &str,
        blocker: Option<&str>,
    ) -> Option<FolderAction> {
        let mut action = None;
        let mut open = self.open;
        egui::Window::new("Apply to folder")
            .open(&mut open)
            .default_width(480.0)
            .show(ctx, |ui| {
                ui.label(
                    "Edits every image of a folder (PNG, JPEG, WebP, BMP, TIFF) with the \
                     instruction and settings on the left. Each result is NAME.png in the output \
                     folder, carrying its settings; results already there are kept, so a \
                     cancelled run continues where it stopped.",
                );
                ui.weak(settings);
                ui.separator();
                let idle = self.running.is_none();
                if folder_field(
                    ui,
                    "Input folder",
                    &mut self.input,
                    idle,
                    "Choose the folder of images to edit",
                ) {
                    action = Some(FolderAction::BrowseInput);
                }
                if folder_field(
                    ui,
                    "Output folder",
                    &mut self.output,
                    idle,
                    "Choose where the edited images go (not the input folder)",
                ) {
                    action = Some(FolderAction::BrowseOutput);
                }
                ui.horizontal(|ui| {
                    let can_start = idle && blocker.is_none();
                    let start = ui.add_enabled(can_start, egui::Button::new("Edit all images"));
                    if let Some(why) = blocker {
                        start.clone().on_disabled_hover_text(why);
                    }
                    if start.clicked() {
                        action = Some(FolderAction::Start);
                    }
                    if ui
                        .add_enabled(!idle, egui::Button::new("Cancel"))
                        .on_hover_text(
                            "Stop after the current step (Esc); the images written so far stay",
                        )
                        .clicked()
                    {
                        action = Some(FolderAction::Cancel);
                    }
                });
                if let Some(run) = &self.running {
                    let (fraction, text) = progress_text(run);
                    ui.add(egui::ProgressBar::new(fraction).text(text));
                }
                if let Some(error) = &self.error {
                    ui.colored_label(ui.visuals().error_fg_color, error);
                }
                if let Some(report) = &self.report {
                    ui.separator();
                    summary(ui, report);
                }
            });
        self.open = open;
        action
    }
}

/// The progress bar's fraction and text: "Image 3 of 10 · photo.jpg · step 4 of 20 · 1 min 05 s
/// left".
pub fn progress_text(run: &FolderRun) -> (f32, String) {
    let Some(progress) = &run.progress else {
        return (0.0, "Listing the folder…".into());
    };
    let all = (progress.total * progress.steps).max(1);
    let done = progress.done * progress.steps + progress.step;
    let left = progress.eta.map_or_else(
        || "time left: measuring…".to_string(),
        |eta| format!("{} left", human_duration(eta)),
    );
    (
        done as f32 / all as f32,
        format!(
            "Image {} of {} · {} · step {} of {} · {left}",
            (progress.done + 1).min(progress.total),
            progress.total,
            progress.current,
            progress.step,
            progress.steps
        ),
    )
}

/// The outcome of a run, with every skipped file and why.
fn summary(ui: &mut egui::Ui, report: &FolderReport) {
    let mut line = if report.cancelled {
        format!(
            "Cancelled: {} of {} edited, {} left. Edit all images again to continue.",
            report.edited, report.total, report.not_reached
        )
    } else if report.error.is_some() {
        format!(
            "Stopped: {} of {} edited, {} left.",
            report.edited, report.total, report.not_reached
        )
    } else {
        format!(
            "Done: {} of {} edited in {}.",
            report.edited,
            report.total,
            human_duration(report.elapsed)
        )
    };
    if report.already_done > 0 {
        line.push_str(&format!(
            " {} already in the output folder.",
            report.already_done
        ));
    }
    ui.label(RichText::new(line).strong());
    if let Some(warning) = &report.warning {
        ui.colored_label(ui.visuals().warn_fg_color, warning);
    }
    if let Some(error) = &report.error {
        ui.colored_label(ui.visuals().error_fg_color, error);
    }
    ui.weak(format!(
        "Results in {}, seed {}",
        report.output_dir.display(),
        report.seed
    ));
    if !report.skipped.is_empty() {
        ui.label(format!(
            "Skipped {} {} that could not be edited:",
            report.skipped.len(),
            if report.skipped.len() == 1 {
                "file"
            } else {
                "files"
            }
        ));
        egui::ScrollArea::vertical()
            .max_height(160.0)
            .show(ui, |ui| {
                for (name, reason) in &report.skipped {
                    ui.label(RichText::new(name).strong())
                        .on_hover_text(reason.as_str());
                    ui.add(egui::Label::new(RichText::new(reason).weak()).wrap());
                }
            });
    }
}

/// A labelled folder field with its Browse… button, both disabled unless `enabled`; returns
/// whether Browse… was clicked.
fn folder_field(
    ui: &mut egui::Ui,
    label: &str,
    text: &mut String,
    enabled: bool,
    browse_hint: &str,
) -> bool {
    let label = ui.label(label);
    ui.horizontal(|ui| {
        ui.add_enabled(
            enabled,
            egui::TextEdit::singleline(text).desired_width(360.0),
        )
        .labelled_by(label.id);
        ui.add_enabled(enabled, egui::Button::new("Browse…"))
            .on_hover_text(browse_hint)
            .clicked()
    })
    .inner
}
