//! The main window's panels: menu bar, the controls on the left (input, instruction, sliders,
//! seed, Generate/Cancel, progress, result), the history strip and status bar at the bottom, and
//! the image view in the middle. Every input widget has a label, so screen readers and the UI
//! tests find it by name.

use egui::{Key, KeyboardShortcut, Modifiers, RichText, Ui, vec2};

use super::app::EditorApp;
use super::settings::{GUIDANCE_RANGE, IMAGE_GUIDANCE_RANGE, RESOLUTION_RANGE, STEPS_RANGE};
use super::state::Purpose;
use super::viewer::{self, CompareMode, Shown};
use crate::worker::SchedulerKind;

const OPEN: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);
const SAVE: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::S);
const GENERATE: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter);
const UNDO_INPUT: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Z);
const COPY: KeyboardShortcut =
    KeyboardShortcut::new(Modifiers::COMMAND.plus(Modifiers::SHIFT), Key::C);

pub const GUIDANCE_HELP: &str = "How closely the edit follows the instruction (guidance_scale). \
Higher: a stronger edit. Too little change? Raise this or lower the image guidance.";
pub const IMAGE_GUIDANCE_HELP: &str = "How closely the result stays with the input image \
(image_guidance_scale). Higher: more faithful to the photo, a weaker edit. Too much change? Raise \
this or lower the text guidance.";
pub const STEPS_HELP: &str = "Denoising steps. More: finer detail, slower. 20 is usually enough; \
the time grows with each step.";
pub const SEED_HELP: &str = "The random seed of the starting noise: the same seed, image and \
settings give the same result (as diffusers with torch.Generator().manual_seed(seed)). Try \
several seeds: results vary a lot.";

/// Draws the whole window.
pub fn show(app: &mut EditorApp, ui: &mut Ui) {
    shortcuts(app, ui);
    egui::Panel::top("menu").show(ui, |ui| menu_bar(app, ui));
    egui::Panel::bottom("status").show(ui, |ui| status_bar(app, ui));
    if !app.history.is_empty() {
        egui::Panel::bottom("history")
            .resizable(false)
            .show(ui, |ui| history_strip(app, ui));
    }
    egui::Panel::left("controls")
        .resizable(true)
        .default_size(310.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| controls(app, ui));
        });
    egui::CentralPanel::default().show(ui, |ui| image_area(app, ui));
}

fn shortcuts(app: &mut EditorApp, ui: &mut Ui) {
    let (open, save, generate, undo, copy, paste, escape) = ui.input_mut(|i| {
        (
            i.consume_shortcut(&OPEN),
            i.consume_shortcut(&SAVE),
            i.consume_shortcut(&GENERATE),
            i.consume_shortcut(&UNDO_INPUT),
            i.consume_shortcut(&COPY),
            // egui turns Ctrl+V into a text paste; an image paste is asked of the clipboard itself
            // when no text field has the focus.
            i.events.iter().any(|e| matches!(e, egui::Event::Paste(_)))
                || i.consume_shortcut(&KeyboardShortcut::new(Modifiers::COMMAND, Key::V)),
            i.key_pressed(Key::Escape),
        )
    });
    let typing = ui.memory(|m| m.focused().is_some());
    if open {
        let folder = app
            .settings
            .recent_images
            .first()
            .and_then(|p| p.parent().map(Into::into));
        app.tasks.open_dialog(folder);
    }
    if save {
        open_save_dialog(app);
    }
    if generate {
        app.generate();
    }
    if undo && !typing {
        app.undo_input();
    }
    if copy {
        app.copy_selected();
    }
    if paste && !typing {
        app.tasks.paste();
    }
    if escape && (app.running.is_some() || app.folder.running.is_some()) {
        app.cancel();
    }
}

pub fn open_save_dialog(app: &mut EditorApp) {
    if app.selected_entry().is_none() {
        app.notify_error("there is no result to save yet".into());
        return;
    }
    app.ui_state.save_path = app.suggested_save_path().display().to_string();
    app.ui_state.save_open = true;
}

fn menu_bar(app: &mut EditorApp, ui: &mut Ui) {
    egui::MenuBar::new().ui(ui, |ui| {
        ui.menu_button("File", |ui| {
            if ui.button("Open image…").clicked() {
                app.tasks.open_dialog(None);
            }
            if ui.button("Paste image").clicked() {
                app.tasks.paste();
            }
            let recent = app.settings.recent_images.clone();
            ui.add_enabled_ui(!recent.is_empty(), |ui| {
                ui.menu_button("Open recent", |ui| {
                    for path in recent {
                        if ui.button(path.display().to_string()).clicked() {
                            app.tasks.open_file(path);
                        }
                    }
                });
            });
            ui.separator();
            let has_result = app.selected_entry().is_some();
            if ui
                .add_enabled(has_result, egui::Button::new("Save result…"))
                .clicked()
            {
                open_save_dialog(app);
            }
            if ui
                .add_enabled(has_result, egui::Button::new("Copy result"))
                .clicked()
            {
                app.copy_selected();
            }
            ui.separator();
            if ui.button("Apply to folder…").clicked() {
                app.folder.open = true;
            }
            if ui.button("Fine-tune on folder…").clicked() {
                app.finetune.open_with(&app.settings.model);
            }
            ui.separator();
            if ui.button("Quit").clicked() {
                ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
            }
        });
        ui.menu_button("Model", |ui| {
            if ui.button("Model manager…").clicked() {
                app.ui_state.model_manager_open = true;
                app.refresh_catalog();
            }
        });
        ui.menu_button("View", |ui| {
            ui.radio_value(&mut app.viewer.mode, CompareMode::After, "After");
            ui.radio_value(&mut app.viewer.mode, CompareMode::Before, "Before");
            ui.radio_value(&mut app.viewer.mode, CompareMode::Split, "Before | after");
            if ui.button("Fit to window").clicked() {
                app.viewer.reset_view();
            }
        });
        ui.menu_button("Help", |ui| {
            if ui.button("About").clicked() {
                app.ui_state.about_open = true;
            }
        });
    });
}

fn controls(app: &mut EditorApp, ui: &mut Ui) {
    ui.add_space(4.0);
    ui.heading("Input");
    ui.horizontal(|ui| {
        if ui
            .button("Open…")
            .on_hover_text("Open an image (Ctrl+O); or drop one on the window")
            .clicked()
        {
            app.tasks.open_dialog(None);
        }
        if ui
            .button("Paste")
            .on_hover_text("Paste an image from the clipboard (Ctrl+V)")
            .clicked()
        {
            app.tasks.paste();
        }
        let can_undo = !app.input_stack.is_empty();
        if ui
            .add_enabled(can_undo, egui::Button::new("Undo input"))
            .on_hover_text("Back to the previous input (Ctrl+Z)")
            .clicked()
        {
            app.undo_input();
        }
    });
    match &app.input {
        Some(input) => {
            let (width, height) = input.opened.image.dimensions();
            let mut text = format!("{} · {width}×{height}", input.name);
            if let Some((w, h)) = app.edit_size() {
                text.push_str(&format!(", edited at {w}×{h}"));
            }
            ui.label(text);
        }
        None => {
            ui.weak("No image yet: drop one on the window.");
        }
    }
    ui.separator();

    let prompt_label = ui.label(RichText::new("Instruction").heading());
    let prompt = ui
        .add(
            egui::TextEdit::singleline(&mut app.prompt)
                .hint_text("e.g. make the mountains snowy")
                .desired_width(f32::INFINITY),
        )
        .labelled_by(prompt_label.id);
    if prompt.lost_focus() && ui.input(|i| i.key_pressed(Key::Enter)) {
        app.generate();
    }
    ui.add_space(6.0);

    let mut rerun = false;
    rerun |= slider_row(
        ui,
        &mut app.settings.guidance_scale,
        GUIDANCE_RANGE,
        "Text guidance",
        GUIDANCE_HELP,
        0.5,
    );
    rerun |= slider_row(
        ui,
        &mut app.settings.image_guidance_scale,
        IMAGE_GUIDANCE_RANGE,
        "Image guidance",
        IMAGE_GUIDANCE_HELP,
        0.1,
    );
    let steps = ui
        .add(
            egui::Slider::new(&mut app.settings.steps, STEPS_RANGE.0..=STEPS_RANGE.1).text("Steps"),
        )
        .on_hover_text(STEPS_HELP);
    rerun |= slider_committed(&steps);

    ui.horizontal(|ui| {
        let seed_label = ui.label("Seed");
        let seed = ui
            .add(egui::DragValue::new(&mut app.settings.seed).speed(1.0))
            .labelled_by(seed_label.id)
            .on_hover_text(SEED_HELP);
        rerun |= slider_committed(&seed);
        if ui
            .button("New seed")
            .on_hover_text("Draw a new seed")
            .clicked()
        {
            app.settings.seed = u64::from(rand::random::<u32>());
            rerun = true;
        }
    });
    ui.checkbox(&mut app.settings.randomize_seed, "Random seed each time")
        .on_hover_text("Generate draws a new seed each time; slider changes keep the seed");
    ui.checkbox(&mut app.rerun_on_change, "Re-run when settings change")
        .on_hover_text(
            "After a result, moving a slider or changing the seed runs the edit again. Only the \
             denoising re-runs: the instruction's and the image's encodings are kept.",
        );

    egui::CollapsingHeader::new("Advanced").show(ui, |ui| {
        let current = app.settings.scheduler.clone();
        let shown = current.clone().unwrap_or_else(|| "model's own".into());
        egui::ComboBox::from_label("Scheduler")
            .selected_text(shown)
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut app.settings.scheduler, None, "model's own");
                for kind in SchedulerKind::ALL {
                    let name = kind.name().to_string();
                    ui.selectable_value(&mut app.settings.scheduler, Some(name.clone()), name);
                }
            });
        if app.settings.scheduler != current {
            rerun = true;
        }
        let resolution = ui
            .add(
                egui::Slider::new(
                    &mut app.settings.max_side,
                    RESOLUTION_RANGE.0..=RESOLUTION_RANGE.1,
                )
                .step_by(64.0)
                .text("Max side"),
            )
            .on_hover_text(
                "Larger images are scaled down so their long side is at most this many pixels \
                 before the edit (memory and time grow with the area).",
            );
        rerun |= slider_committed(&resolution);
        let negative_label = ui.label("Negative prompt");
        ui.add(
            egui::TextEdit::singleline(&mut app.settings.negative_prompt)
                .hint_text("what the result should not look like")
                .desired_width(f32::INFINITY),
        )
        .labelled_by(negative_label.id);
    });
    if rerun {
        app.settings_changed();
    }
    ui.add_space(8.0);

    ui.horizontal(|ui| {
        let blocker = app.generate_blocker();
        let generate = ui
            .add_enabled(
                blocker.is_none(),
                egui::Button::new(RichText::new("Generate").strong()).min_size(vec2(110.0, 28.0)),
            )
            .on_hover_text("Run the edit (Enter in the instruction box, or Ctrl+Enter)");
        if let Some(why) = blocker {
            generate.clone().on_disabled_hover_text(why);
        }
        if generate.clicked() {
            app.generate();
        }
        let running = app.running.is_some() || app.folder.running.is_some();
        if ui
            .add_enabled(
                running,
                egui::Button::new("Cancel").min_size(vec2(80.0, 28.0)),
            )
            .on_hover_text("Stop the edit (Esc); the result in view stays")
            .clicked()
        {
            app.cancel();
        }
    });
    progress(app, ui);
    ui.separator();
    result_info(app, ui);
    ui.separator();
    if ui
        .button("Guidance explorer…")
        .on_hover_text("A 3×3 grid of results around the current guidance values, same seed")
        .clicked()
    {
        app.explorer.open = true;
    }
    if ui
        .button("Apply to folder…")
        .on_hover_text("Edit every image of a folder with this instruction and these settings")
        .clicked()
    {
        app.folder.open = true;
    }
    if ui
        .button("Fine-tune on folder…")
        .on_hover_text("Teach the model your own edits from a folder of examples")
        .clicked()
    {
        app.finetune.open_with(&app.settings.model);
    }
}

/// A slider for a guidance scale, its number editable, with the tuning advice as hover text.
/// True when a change was committed (released, typed, or stepped with the keyboard).
fn slider_row(
    ui: &mut Ui,
    value: &mut f64,
    (low, high): (f64, f64),
    label: &str,
    help: &str,
    step: f64,
) -> bool {
    let response = ui
        .add(
            egui::Slider::new(value, low..=high)
                .step_by(step / 5.0)
                .fixed_decimals(2)
                .text(label),
        )
        .on_hover_text(help);
    slider_committed(&response)
}

/// A value change the user has finished making (not every frame of a drag).
fn slider_committed(response: &egui::Response) -> bool {
    response.drag_stopped() || (response.changed() && !response.dragged())
}

fn progress(app: &EditorApp, ui: &mut Ui) {
    if let Some(run) = &app.folder.running {
        // Also here, so closing the dialog does not hide it.
        let (fraction, text) = super::folder::progress_text(run);
        ui.add(egui::ProgressBar::new(fraction).text(format!("Folder: {text}")));
    }
    let Some(running) = &app.running else {
        return;
    };
    let what = match running.purpose {
        Purpose::Main => "Editing",
        Purpose::Explorer { .. } => "Guidance grid",
    };
    let (fraction, text) = match &running.progress {
        Some(p) => {
            let left = p.eta.as_secs_f64();
            (
                p.step as f32 / p.total.max(1) as f32,
                format!(
                    "{what}: step {} of {} · {:.0} s left",
                    p.step,
                    p.total,
                    left.ceil()
                ),
            )
        }
        None => (0.0, format!("{what}: encoding the image and instruction…")),
    };
    ui.add(egui::ProgressBar::new(fraction).text(text));
}

fn result_info(app: &mut EditorApp, ui: &mut Ui) {
    let Some(index) = app.selected else {
        ui.weak("Results appear here with the settings that made them.");
        return;
    };
    let Some(entry) = app.history.get(index) else {
        return;
    };
    let result = &entry.result;
    let used = &result.settings;
    let scheduler = used
        .scheduler
        .map_or_else(|| "model's scheduler".into(), |s| s.to_string());
    ui.label(RichText::new(format!("Result #{}", entry.number)).strong());
    ui.label(format!(
        "seed {} · text guidance {:.2} · image guidance {:.2}",
        result.seed, used.guidance_scale, used.image_guidance_scale
    ));
    ui.label(format!(
        "{} steps · {} · {:.1} s",
        used.steps,
        scheduler,
        result.total_time.as_secs_f64()
    ));
    let reused = match (result.reused_prompt_embeddings, result.reused_image_latents) {
        (true, true) => "encodings reused: only the denoising ran",
        (true, false) => "instruction encoding reused",
        (false, true) => "image encoding reused",
        (false, false) => "encoded the instruction and the image",
    };
    ui.weak(reused);
    ui.horizontal_wrapped(|ui| {
        if ui
            .button("Save…")
            .on_hover_text("Save the result (Ctrl+S)")
            .clicked()
        {
            open_save_dialog(app);
        }
        if ui
            .button("Copy")
            .on_hover_text("Copy the result (Ctrl+Shift+C)")
            .clicked()
        {
            app.copy_selected();
        }
        if ui
            .button("Use as input")
            .on_hover_text("Edit this result further")
            .clicked()
        {
            app.use_result_as_input();
        }
        if ui
            .button("Restore settings")
            .on_hover_text("Put this result's instruction, seed and values back on the controls")
            .clicked()
        {
            app.restore_settings(index);
        }
    });
}

fn history_strip(app: &mut EditorApp, ui: &mut Ui) {
    egui::ScrollArea::horizontal().show(ui, |ui| {
        ui.horizontal(|ui| {
            let mut clicked = None;
            for (index, entry) in app.history.iter().enumerate() {
                let used = &entry.result.settings;
                let thumb = egui::Image::new(&entry.texture).fit_to_exact_size(vec2(72.0, 72.0));
                let button = egui::Button::image_and_text(thumb, format!("#{}", entry.number))
                    .selected(app.selected == Some(index));
                let response = ui.add(button).on_hover_text(format!(
                    "“{}”\nseed {} · text {:.2} · image {:.2} · {} steps",
                    used.prompt,
                    entry.result.seed,
                    used.guidance_scale,
                    used.image_guidance_scale,
                    used.steps
                ));
                if response.clicked() {
                    clicked = Some(index);
                }
            }
            if let Some(index) = clicked {
                app.selected = Some(index);
            }
        });
    });
}

fn status_bar(app: &mut EditorApp, ui: &mut Ui) {
    ui.horizontal(|ui| {
        match (&app.model, &app.loading) {
            (_, Some(loading)) => {
                ui.label(format!("Loading {}…", loading.spec));
                if let Some(download) = &loading.download {
                    ui.add(
                        egui::ProgressBar::new(download.fraction())
                            .desired_width(260.0)
                            .text(download.describe()),
                    );
                }
            }
            (Some(info), None) => {
                ui.label(format!(
                    "Model: {} · {} · {}",
                    info.name, info.device, info.dtype
                ));
                if let Some(memory) = &info.memory {
                    ui.label(format!("Memory: {}", memory.describe()))
                        .on_hover_text(if info.device == "cpu" {
                            "This program's memory in use, of the computer's"
                        } else {
                            "The GPU's memory in use (all programs'), of its total"
                        });
                }
            }
            (None, None) => match &app.load_failure {
                Some(failure) => {
                    ui.colored_label(
                        ui.visuals().error_fg_color,
                        format!("Model {} failed to load", failure.spec),
                    );
                }
                None => {
                    ui.label("No model loaded");
                }
            },
        }
        if ui.small_button("Models…").clicked() {
            app.ui_state.model_manager_open = true;
            app.refresh_catalog();
        }
    });
}

fn image_area(app: &mut EditorApp, ui: &mut Ui) {
    let mut dismissed = None;
    for (index, notice) in app.notices.iter().enumerate() {
        let fill = if notice.is_error {
            ui.visuals().error_fg_color.gamma_multiply(0.25)
        } else {
            ui.visuals().selection.bg_fill.gamma_multiply(0.4)
        };
        egui::Frame::new()
            .fill(fill)
            .inner_margin(6.0)
            .corner_radius(4.0)
            .show(ui, |ui| {
                // The button first, at the right edge, then the text wrapped in the width
                // left: a long message (a path, a config key) never pushes Dismiss out of view.
                ui.with_layout(egui::Layout::right_to_left(egui::Align::TOP), |ui| {
                    if ui.small_button("Dismiss").clicked() {
                        dismissed = Some(index);
                    }
                    ui.add(egui::Label::new(&notice.text).wrap());
                });
            });
    }
    if let Some(index) = dismissed {
        app.notices.remove(index);
    }

    ui.horizontal(|ui| {
        ui.label("Show:");
        ui.selectable_value(&mut app.viewer.mode, CompareMode::After, "After");
        ui.selectable_value(&mut app.viewer.mode, CompareMode::Before, "Before");
        ui.selectable_value(&mut app.viewer.mode, CompareMode::Split, "Before | after");
        if ui
            .button("Fit")
            .on_hover_text("Fit the image to the view (double-click)")
            .clicked()
        {
            app.viewer.reset_view();
        }
    });

    let shown = |texture: &egui::TextureHandle| Shown {
        texture: texture.id(),
        size: texture.size_vec2(),
    };
    let input = app.input.as_ref().map(|i| shown(&i.texture));
    let running_main = app
        .running
        .as_ref()
        .is_some_and(|r| r.purpose == Purpose::Main);
    let (before, after) = if let (true, Some(preview)) = (running_main, &app.preview) {
        (input, Some(shown(preview)))
    } else if let Some(entry) = app.selected_entry() {
        (Some(shown(&entry.before)), Some(shown(&entry.texture)))
    } else {
        (input, None)
    };
    let hovering_files = ui.input(|i| !i.raw.hovered_files.is_empty());
    let response = viewer::show(ui, &mut app.viewer, before, after, "Image view");
    if app.input.is_none() || hovering_files {
        let text = if hovering_files {
            "Drop to open"
        } else {
            "Drop an image here, or Open… (Ctrl+O), or Paste (Ctrl+V)"
        };
        ui.painter().text(
            response.rect.center(),
            egui::Align2::CENTER_CENTER,
            text,
            egui::FontId::proportional(18.0),
            ui.visuals().weak_text_color(),
        );
    }
}
