//! The windows over the editor: fine-tuning, Apply to folder, the model manager, Save, the
//! guidance explorer, About.

use std::path::PathBuf;

use egui::{Context, RichText, vec2};

use super::app::EditorApp;
use super::explorer::{CellState, GRID_SIDE};
use super::tasks::{FilePurpose, FolderPurpose};
use crate::worker::{DEFAULT_REPO, MAX_LORA_SCALE};

/// Draws whichever windows are open.
pub fn show(app: &mut EditorApp, ctx: &Context) {
    let waker = app.waker();
    if let Some(action) = app.finetune.show(ctx, &waker) {
        app.finetune_action(action);
    }
    let settings = app.folder_settings_text();
    let blocker = app.folder_blocker();
    if let Some(action) = app.folder.show(ctx, &settings, blocker) {
        app.folder_action(action);
    }
    model_manager(app, ctx);
    save_window(app, ctx);
    explorer_window(app, ctx);
    about_window(app, ctx);
}

fn model_manager(app: &mut EditorApp, ctx: &Context) {
    let mut open = app.ui_state.model_manager_open;
    let mut load = None;
    egui::Window::new("Model manager")
        .open(&mut open)
        .default_width(520.0)
        .show(ctx, |ui| {
            match &app.model {
                Some(info) => {
                    ui.label(format!(
                        "In use: {} on {} ({})",
                        info.name, info.device, info.dtype
                    ));
                    ui.weak(info.folder.display().to_string());
                    if info.ema == Some(true) {
                        ui.weak("Single file: its EMA weights are used.");
                    }
                    if !info.loras.is_empty() {
                        let loras: Vec<String> = info
                            .loras
                            .iter()
                            .map(|l| format!("{} ×{}", file_name(&l.path), l.scale))
                            .collect();
                        ui.label(format!("With LoRA: {}", loras.join(", ")));
                    }
                }
                None => {
                    ui.label("No model is loaded.");
                }
            }
            if let Some(failure) = &app.load_failure {
                ui.colored_label(
                    ui.visuals().error_fg_color,
                    format!("{} failed to load: {}", failure.spec, failure.message),
                );
            }
            if let Some(loading) = app.loading.clone() {
                ui.horizontal(|ui| {
                    ui.label(format!("Loading {}…", loading.spec));
                    if ui
                        .button("Cancel download")
                        .on_hover_text("Stop downloading; the model in use stays")
                        .clicked()
                    {
                        app.cancel_load();
                    }
                });
                if let Some(download) = &loading.download {
                    ui.add(egui::ProgressBar::new(download.fraction()).text(download.describe()));
                }
            }
            ui.separator();

            ui.horizontal(|ui| {
                ui.label(RichText::new("Models on this computer").strong());
                if ui.small_button("Refresh").clicked() {
                    app.refresh_catalog();
                }
            });
            if app.catalog.is_empty() {
                if app.catalog_pending() {
                    ui.weak("Looking for models…");
                } else {
                    ui.weak(
                        "None yet: download one below, or choose a folder in diffusers' layout.",
                    );
                }
            }
            egui::Grid::new("model-catalog")
                .striped(true)
                .num_columns(4)
                .show(ui, |ui| {
                    for entry in &app.catalog {
                        ui.label(&entry.spec).on_hover_text(entry.source);
                        ui.label(format!("{:.2} GB", entry.bytes_on_disk as f64 / 1e9));
                        match &entry.problem {
                            None => {
                                ui.label("ready");
                            }
                            Some(problem) => {
                                ui.colored_label(ui.visuals().warn_fg_color, problem);
                            }
                        }
                        let in_use = app.model.as_ref().is_some_and(|m| m.name == entry.spec);
                        let usable = entry.problem.is_none() && app.loading.is_none() && !in_use;
                        let text = if in_use { "In use" } else { "Use" };
                        if ui
                            .add_enabled(usable, egui::Button::new(text))
                            .on_hover_text(format!("Load {}", entry.spec))
                            .clicked()
                        {
                            load = Some(entry.spec.clone());
                        }
                        ui.end_row();
                    }
                });
            ui.separator();

            let field_label = ui.label("Model folder or Hub repo id");
            ui.horizontal(|ui| {
                ui.add(
                    egui::TextEdit::singleline(&mut app.ui_state.model_field)
                        .hint_text(DEFAULT_REPO)
                        .desired_width(340.0),
                )
                .labelled_by(field_label.id);
                if ui.button("Browse…").clicked() {
                    app.tasks.folder_dialog(
                        "Choose a model folder (diffusers layout)",
                        FolderPurpose::Model,
                    );
                }
                if ui
                    .button("Single file…")
                    .on_hover_text(
                        "A whole model in one .safetensors or .ckpt file (the original LDM layout)",
                    )
                    .clicked()
                {
                    app.tasks.file_dialog(
                        "Choose a single-file checkpoint",
                        "Checkpoints",
                        &["safetensors", "ckpt"],
                        FilePurpose::ModelFile,
                    );
                }
            });
            if crate::worker::is_single_file(&app.ui_state.model_field) {
                let config_label = ui.label("Config folder or repo of the single file");
                ui.add(
                    egui::TextEdit::singleline(&mut app.ui_state.config_field)
                        .hint_text(DEFAULT_REPO)
                        .desired_width(340.0),
                )
                .labelled_by(config_label.id)
                .on_hover_text(
                    "Where its tokenizer and scheduler settings come from (only their small \
                     files are downloaded)",
                );
            }
            ui.horizontal(|ui| {
                egui::ComboBox::from_label("Device")
                    .selected_text(app.settings.device.clone())
                    .show_ui(ui, |ui| {
                        for device in ["auto", "cpu", "cuda", "metal"] {
                            ui.selectable_value(&mut app.settings.device, device.into(), device);
                        }
                    });
                egui::ComboBox::from_label("Precision")
                    .selected_text(app.settings.dtype.clone())
                    .show_ui(ui, |ui| {
                        for dtype in ["auto", "f32", "f16", "bf16"] {
                            ui.selectable_value(&mut app.settings.dtype, dtype.into(), dtype);
                        }
                    });
            });
            let idle = app.loading.is_none();
            ui.horizontal(|ui| {
                if ui
                    .add_enabled(idle, egui::Button::new("Load"))
                    .on_hover_text("Load this model (downloading it first when it is a Hub repo)")
                    .clicked()
                {
                    load = Some(app.ui_state.model_field.clone());
                }
                if ui
                    .add_enabled(idle, egui::Button::new(format!("Download {DEFAULT_REPO}")))
                    .on_hover_text("The original InstructPix2Pix model, about 5 GB in float32")
                    .clicked()
                {
                    app.ui_state.model_field = DEFAULT_REPO.into();
                    load = Some(DEFAULT_REPO.into());
                }
            });
            let hub = app.hub_settings();
            ui.weak(format!(
                "Downloads go to the Hugging Face cache ({}), shared with diffusers.",
                hub.cache_dir.display()
            ));
            ui.separator();
            lora_section(app, ui, idle);
            ui.separator();
            if ui.button("Close").clicked() {
                app.ui_state.model_manager_open = false;
            }
        });
    app.ui_state.model_manager_open = open && app.ui_state.model_manager_open;
    if let Some(spec) = load {
        app.load_model(spec);
    }
}

/// The file name of a path, for short labels.
fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The model manager's LoRAs: the list fused into every model loaded, each with its scale, and
/// "Add LoRA…" / "Apply LoRAs".
fn lora_section(app: &mut EditorApp, ui: &mut egui::Ui, idle: bool) {
    ui.label(RichText::new("LoRA").strong());
    if app.ui_state.loras.is_empty() {
        ui.weak("None: add diffusers or kohya LoRA files to fuse them into the model.");
    }
    let mut remove = None;
    for (index, lora) in app.ui_state.loras.iter_mut().enumerate() {
        ui.horizontal(|ui| {
            let name = file_name(&lora.path);
            let label = ui
                .label(format!("{name}, scale"))
                .on_hover_text(lora.path.display().to_string());
            ui.add(
                egui::DragValue::new(&mut lora.scale)
                    .speed(0.05)
                    .range(-MAX_LORA_SCALE..=MAX_LORA_SCALE),
            )
            .labelled_by(label.id);
            if ui
                .small_button("Remove")
                .on_hover_text(format!("Take {name} off the list"))
                .clicked()
            {
                remove = Some(index);
            }
        });
    }
    if let Some(index) = remove {
        app.ui_state.loras.remove(index);
    }
    let field_label = ui.label("LoRA file");
    ui.horizontal(|ui| {
        ui.add(
            egui::TextEdit::singleline(&mut app.ui_state.lora_field)
                .hint_text("path/to/lora.safetensors")
                .desired_width(260.0),
        )
        .labelled_by(field_label.id);
        if ui
            .button("Add this LoRA")
            .on_hover_text("Add the typed file to the list")
            .clicked()
        {
            let path = std::path::PathBuf::from(app.ui_state.lora_field.trim());
            app.add_lora(path);
            app.ui_state.lora_field.clear();
        }
        if ui
            .button("Add LoRA…")
            .on_hover_text("Choose a LoRA file (.safetensors, or a kohya .pt)")
            .clicked()
        {
            app.tasks.file_dialog(
                "Choose a LoRA file",
                "LoRA",
                &["safetensors", "pt", "bin"],
                FilePurpose::Lora,
            );
        }
    });
    let loaded = app.model.is_some();
    if ui
        .add_enabled(idle && loaded, egui::Button::new("Apply LoRAs"))
        .on_hover_text("Load the model in use again with these LoRAs fused in (the list also applies to every model loaded)")
        .clicked()
    {
        app.apply_loras();
    }
}

fn save_window(app: &mut EditorApp, ctx: &Context) {
    let mut open = app.ui_state.save_open;
    egui::Window::new("Save result")
        .open(&mut open)
        .collapsible(false)
        .default_width(420.0)
        .show(ctx, |ui| {
            let label = ui.label("Save to file");
            ui.horizontal(|ui| {
                let field = ui
                    .add(
                        egui::TextEdit::singleline(&mut app.ui_state.save_path)
                            .desired_width(300.0),
                    )
                    .labelled_by(label.id);
                if field.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter)) {
                    let path = PathBuf::from(app.ui_state.save_path.trim());
                    app.save_selected(path);
                }
                if ui.button("Browse…").clicked() {
                    let suggested = PathBuf::from(app.ui_state.save_path.trim());
                    app.tasks.save_dialog(suggested);
                }
            });
            ui.weak(
                ".png keeps the instruction, seed and every setting inside the file; .jpg and \
                 .webp do not.",
            );
            if ui.button("Save").clicked() {
                let path = PathBuf::from(app.ui_state.save_path.trim());
                app.save_selected(path);
            }
        });
    app.ui_state.save_open = open && app.ui_state.save_open;
}

fn explorer_window(app: &mut EditorApp, ctx: &Context) {
    let mut open = app.explorer.open;
    let mut adopt = None;
    let mut start = false;
    let mut stop = false;
    egui::Window::new("Guidance explorer")
        .open(&mut open)
        .default_width(420.0)
        .show(ctx, |ui| {
            ui.label(
                "One edit per cell, same image, instruction and seed: text guidance grows to the \
                 right, image guidance grows upward. Click a result to take its values.",
            );
            ui.horizontal(|ui| {
                let label = if app.explorer.cells.is_empty() || app.explorer.done_count() == 0 {
                    "Render grid"
                } else {
                    "Continue grid"
                };
                if ui
                    .add_enabled(!app.explorer.running, egui::Button::new(label))
                    .clicked()
                {
                    start = true;
                }
                if ui
                    .add_enabled(app.explorer.running, egui::Button::new("Stop grid"))
                    .clicked()
                {
                    stop = true;
                }
                if !app.explorer.cells.is_empty() {
                    ui.label(format!(
                        "{} of {} done",
                        app.explorer.done_count(),
                        app.explorer.cells.len()
                    ));
                }
            });
            if app.explorer.cells.is_empty() {
                return;
            }
            egui::Grid::new("explorer-grid")
                .spacing(vec2(4.0, 4.0))
                .show(ui, |ui| {
                    for (index, cell) in app.explorer.cells.iter().enumerate() {
                        let label = format!(
                            "text {:.2} · image {:.2}",
                            cell.guidance_scale, cell.image_guidance_scale
                        );
                        let size = vec2(120.0, 120.0);
                        match &cell.state {
                            CellState::Done { texture, .. } => {
                                let image = egui::Image::new(texture).fit_to_exact_size(size);
                                let response = ui
                                    .add(egui::Button::image_and_text(image, label.clone()))
                                    .on_hover_text("Take these values");
                                if response.clicked() {
                                    adopt = Some(index);
                                }
                            }
                            CellState::Waiting => {
                                ui.add_sized(size, egui::Label::new(format!("{label}\nwaiting")));
                            }
                            CellState::Running(_) => {
                                ui.add_sized(
                                    size,
                                    egui::Label::new(
                                        RichText::new(format!("{label}\nrendering…")).strong(),
                                    ),
                                );
                            }
                            CellState::Failed(message) => {
                                ui.add_sized(
                                    size,
                                    egui::Label::new(format!("{label}\nfailed: {message}")),
                                );
                            }
                        }
                        if (index + 1) % GRID_SIDE == 0 {
                            ui.end_row();
                        }
                    }
                });
        });
    app.explorer.open = open;
    if start {
        app.start_explorer();
    }
    if stop {
        app.explorer.running = false;
        app.cancel();
    }
    if let Some(cell) = adopt {
        app.adopt_explorer_cell(cell);
    }
}

fn about_window(app: &mut EditorApp, ctx: &Context) {
    let mut open = app.ui_state.about_open;
    egui::Window::new("About instruct-pix2pix")
        .open(&mut open)
        .collapsible(false)
        .show(ctx, |ui| {
            ui.label(
                RichText::new(format!("instruct-pix2pix {}", env!("CARGO_PKG_VERSION"))).strong(),
            );
            ui.label(env!("CARGO_PKG_DESCRIPTION"));
            ui.label(format!("License: {}", env!("CARGO_PKG_LICENSE")));
            let hub = app.hub_settings();
            ui.label(format!("Models are stored in {}", hub.cache_dir.display()));
            // The packages (packaging/) put it beside the program (Windows), in
            // ../share/doc/instruct-pix2pix (Linux), ../Resources (macOS .app) or
            // ../lib/instruct-pix2pix (cargo-packager's Linux layout).
            let licenses = std::env::current_exe().ok().and_then(|exe| {
                let (dir, up) = (exe.parent()?, exe.parent()?.parent()?);
                [
                    dir.to_owned(),
                    up.join("share/doc/instruct-pix2pix"),
                    up.join("Resources"),
                    up.join("lib/instruct-pix2pix"),
                ]
                .map(|folder| folder.join("THIRD-PARTY-LICENSES.html"))
                .into_iter()
                .find(|path| path.is_file())
            });
            ui.label(
                licenses.map_or("Third-party licenses: see the package".into(), |path| {
                    format!("Third-party licenses: {}", path.display())
                }),
            );
            if let Some(store) = &app.store {
                ui.label(format!("Settings: {}", store.path.display()));
            }
        });
    app.ui_state.about_open = open;
}
