//! The editor window driven by its labels with egui_kittest, on the tiny fixture models: open an
//! image, type, slide, generate, cancel, re-run, chain, save, explore, recover from a bad file.
//! The model thread is the real one; frames are stepped until what the user would see appears.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use instruct_pix2pix::gui::settings::{Settings, SettingsStore};
use instruct_pix2pix::gui::{EditorApp, StartOptions};
use instruct_pix2pix::pipeline::image::{load_image, read_png_text};
use instruct_pix2pix::pipeline::metadata::EditRecord;

/// Long enough for the slowest step of a loaded CI machine; a failing test says what it waited for.
const WAIT: Duration = Duration::from_secs(180);

pub(super) fn options(model: &str) -> StartOptions {
    StartOptions {
        model: Some(common::fixture_pipeline(model).display().to_string()),
        ..StartOptions::default()
    }
}

pub(super) fn harness(options: StartOptions) -> Harness<'static, EditorApp> {
    Harness::builder()
        .with_size([1280.0, 900.0])
        .build_eframe(move |cc| EditorApp::new(cc, options))
}

/// Steps frames until `done` holds for the app, as a user waits watching the window.
pub(super) fn wait_for(
    harness: &mut Harness<'static, EditorApp>,
    what: &str,
    done: impl Fn(&EditorApp) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        harness.step();
        if done(harness.state()) {
            // One more frame so the new state is drawn and queryable.
            harness.step();
            return;
        }
        if let Some(notice) = harness.state().notices.iter().find(|n| n.is_error)
            && !what.contains("error")
        {
            panic!(
                "waiting for {what}: the window shows an error: {}",
                notice.text
            );
        }
        let app = harness.state();
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: model {:?}, running {:?}, {} results, notices {:?}",
            app.model,
            app.running,
            app.history.len(),
            app.notices
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(super) fn model_ready(app: &EditorApp) -> bool {
    app.model.is_some() && app.loading.is_none()
}

/// A file as the platform layer hands a drop to egui.
#[derive(Debug)]
struct DroppedPath(PathBuf);

impl egui::DroppedFile for DroppedPath {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        std::fs::read(&self.0).map_err(|e| e.to_string())
    }
}

fn drop_file(harness: &mut Harness<'static, EditorApp>, path: &Path) {
    harness
        .input_mut()
        .dropped_files
        .push(std::sync::Arc::new(DroppedPath(path.to_path_buf())));
}

pub(super) fn type_into(harness: &mut Harness<'static, EditorApp>, label: &str, text: &str) {
    let field = harness.get_by_label(label);
    field.click();
    field.type_text(text);
    harness.run_steps(2);
    let value = harness.get_by_label(label).value().unwrap_or_default();
    assert!(
        value.ends_with(text),
        "typed {text:?} into {label:?}, it holds {value:?}"
    );
}

pub(super) fn click(harness: &mut Harness<'static, EditorApp>, label: &str) {
    harness.get_by_label(label).click();
    harness.run_steps(2);
}

/// Sets a slider or number field the way assistive technology does (accesskit's SetValue).
pub(super) fn set_slider(harness: &mut Harness<'static, EditorApp>, label: &str, value: f64) {
    // A slider's number box carries the same label; the seed is a number box alone.
    let slider = harness.query_by_role_and_label(egui::Role::Slider, label);
    let node = slider.unwrap_or_else(|| harness.get_by_label(label));
    node.set_value_accesskit(value);
    harness.run_steps(2);
}

/// Opens the model manager and waits for its listing of the models on this computer: the list
/// arrives from a background thread and, when it adds rows, moves the fields below it.
fn open_model_manager(harness: &mut Harness<'static, EditorApp>) {
    click(harness, "Models…");
    wait_for(harness, "the model manager's listing", |app| {
        !app.catalog_pending()
    });
}

pub(super) fn sees(harness: &Harness<'static, EditorApp>, text: &str) -> bool {
    harness.query_all_by_label_contains(text).next().is_some()
}

/// Drops the fixture image, sets the steps and types the instruction, as a user starts.
fn open_fixture_and_type(harness: &mut Harness<'static, EditorApp>, steps: u32, prompt: &str) {
    drop_file(harness, &ancestral_case().join("input.png"));
    wait_for(harness, "the dropped image", |app| app.input.is_some());
    set_slider(harness, "Steps", f64::from(steps));
    type_into(harness, "Instruction", prompt);
}

fn ancestral_case() -> PathBuf {
    common::fixtures().join("edits").join("sd1-ancestral-seed")
}

/// Opens the ancestral fixture's input, types its instruction and sets its values.
fn prepare_ancestral_edit(harness: &mut Harness<'static, EditorApp>) {
    wait_for(harness, "the model to load", model_ready);
    drop_file(harness, &ancestral_case().join("input.png"));
    wait_for(harness, "the dropped image", |app| app.input.is_some());
    assert!(
        sees(harness, "input.png · 64×64, edited at 64×64"),
        "the input's size and edit size are shown"
    );
    type_into(harness, "Instruction", "make it snowy");
    set_slider(harness, "Steps", 10.0);
    set_slider(harness, "Text guidance", 7.5);
    set_slider(harness, "Image guidance", 1.5);
    harness.get_by_label("Random seed each time").click();
    harness.run_steps(2);
    set_slider(harness, "Seed", 1234.0);
}

#[test]
fn an_edit_in_the_window_equals_diffusers() {
    let mut harness = harness(options("sd1-tiny-ancestral"));
    prepare_ancestral_edit(&mut harness);
    assert!(!harness.state().settings.randomize_seed);

    click(&mut harness, "Generate");
    wait_for(&mut harness, "the first step", |app| {
        app.running.as_ref().is_some_and(|r| r.progress.is_some())
    });
    assert!(
        sees(&harness, "of 10"),
        "the progress bar shows the step count"
    );
    assert!(harness.state().preview.is_some(), "the edit shows forming");
    wait_for(&mut harness, "the result", |app| !app.history.is_empty());

    let app = harness.state();
    let entry = &app.history[0];
    assert_eq!(entry.result.seed, 1234);
    assert_eq!(entry.result.settings.steps, 10);
    let expected = load_image(&ancestral_case().join("expected.png")).unwrap();
    let (worst, mean) = common::pixel_difference(&entry.result.image, &expected);
    assert!(
        worst <= 3 && mean <= 0.3,
        "window result vs diffusers: worst {worst}, mean {mean}"
    );
    assert!(sees(
        &harness,
        "seed 1234 · text guidance 7.50 · image guidance 1.50"
    ));
    assert!(sees(&harness, "Result #1"));
}

#[test]
fn enter_generates_and_a_slider_change_reruns_only_the_denoising() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    open_fixture_and_type(&mut harness, 4, "turn it into a watercolor");
    harness.key_press(egui::Key::Enter);
    wait_for(&mut harness, "the result of Enter", |app| {
        app.history.len() == 1
    });
    let first = harness.state().history[0].result.clone();
    assert!(!first.reused_prompt_embeddings && !first.reused_image_latents);
    assert!(sees(&harness, "encoded the instruction and the image"));

    set_slider(&mut harness, "Text guidance", 3.0);
    wait_for(&mut harness, "the re-run", |app| app.history.len() == 2);
    let second = harness.state().history[1].result.clone();
    assert_eq!(second.settings.guidance_scale, 3.0);
    assert_eq!(second.seed, first.seed, "a slider re-run keeps the seed");
    assert!(second.reused_prompt_embeddings && second.reused_image_latents);
    assert!(sees(&harness, "encodings reused: only the denoising ran"));
    assert_ne!(second.image, first.image);

    // The dice draws a new seed and re-runs with it.
    click(&mut harness, "New seed");
    wait_for(&mut harness, "the re-run with a new seed", |app| {
        app.history.len() == 3
    });
    assert_ne!(harness.state().history[2].result.seed, first.seed);
}

#[test]
fn cancel_stops_midway_and_keeps_the_previous_result() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    // A large input keeps each step slow enough to cancel in the middle.
    let folder = tempfile::tempdir().unwrap();
    let big = folder.path().join("big.png");
    let source = load_image(&ancestral_case().join("input.png")).unwrap();
    image::imageops::resize(&source, 256, 256, image::imageops::FilterType::Nearest)
        .save(&big)
        .unwrap();
    drop_file(&mut harness, &big);
    wait_for(&mut harness, "the image", |app| app.input.is_some());
    type_into(&mut harness, "Instruction", "make it night");
    set_slider(&mut harness, "Steps", 2.0);
    click(&mut harness, "Generate");
    wait_for(&mut harness, "the first result", |app| {
        app.history.len() == 1
    });
    let kept = harness.state().history[0].result.image.clone();

    set_slider(&mut harness, "Steps", 100.0);
    // Slider re-runs are on: the step change already started the long edit.
    wait_for(&mut harness, "the long edit's third step", |app| {
        app.running
            .as_ref()
            .and_then(|r| r.progress.as_ref())
            .is_some_and(|p| p.step >= 3)
    });
    click(&mut harness, "Cancel");
    wait_for(&mut harness, "the cancel", |app| app.running.is_none());
    let app = harness.state();
    assert_eq!(app.history.len(), 1, "a cancelled edit adds no result");
    assert_eq!(app.selected, Some(0));
    assert_eq!(
        app.history[0].result.image, kept,
        "the previous result stays in view"
    );
    assert!(sees(&harness, "edit cancelled"));
}

#[test]
fn chain_save_and_undo() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    open_fixture_and_type(&mut harness, 3, "add fireworks");
    click(&mut harness, "Generate");
    wait_for(&mut harness, "the first result", |app| {
        app.history.len() == 1
    });

    click(&mut harness, "Use as input");
    assert!(sees(&harness, "result #1 · 64×64"));
    click(&mut harness, "Generate");
    wait_for(&mut harness, "the chained result", |app| {
        app.history.len() == 2
    });
    let chained_input = harness.state().history[1].source.clone();
    assert_eq!(*chained_input, harness.state().history[0].result.image);

    // Save with the Save window; the PNG carries the settings like the `edit` command's.
    let folder = tempfile::tempdir().unwrap();
    let target = folder.path().join("chained.png");
    click(&mut harness, "Save…");
    let field = harness.get_by_label("Save to file");
    field.click();
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness
        .get_by_label("Save to file")
        .type_text(&target.display().to_string());
    harness.run_steps(2);
    click(&mut harness, "Save");
    wait_for(&mut harness, "the saved file", |app| {
        app.notices.iter().any(|n| n.text.starts_with("saved "))
    });
    let saved = load_image(&target).unwrap();
    assert_eq!(saved, harness.state().history[1].result.image);
    let record = EditRecord::from_text_chunks(&read_png_text(&target).unwrap()).unwrap();
    assert_eq!(record.prompt, "add fireworks");
    assert_eq!(record.seed, harness.state().history[1].result.seed);
    assert_eq!(record.steps, 3);
    assert_eq!((record.width, record.height), (64, 64));

    click(&mut harness, "Undo input");
    assert!(sees(&harness, "input.png · 64×64"));
    assert!(harness.state().input_stack.is_empty());

    // Opening the saved file restores its settings on the controls.
    harness.state_mut().prompt.clear();
    drop_file(&mut harness, &target);
    wait_for(&mut harness, "the saved file as input", |app| {
        app.prompt == "add fireworks"
    });
    assert_eq!(harness.state().settings.steps, 3);
}

#[test]
fn the_guidance_explorer_fills_its_grid_and_a_cell_can_be_adopted() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    open_fixture_and_type(&mut harness, 2, "make it autumn");
    click(&mut harness, "Guidance explorer…");
    click(&mut harness, "Render grid");
    wait_for(&mut harness, "nine grid cells", |app| {
        app.explorer.done_count() == 9
    });
    assert!(sees(&harness, "9 of 9 done"));
    let seeds: Vec<u64> = (0..9)
        .map(|i| harness.state().explorer.cell_result(i).unwrap().0.seed)
        .collect();
    assert!(
        seeds.iter().all(|&s| s == seeds[0]),
        "one seed for the whole grid"
    );
    // All cells after the first reuse the encodings.
    assert!(
        harness
            .state()
            .explorer
            .cell_result(8)
            .unwrap()
            .0
            .reused_image_latents
    );

    click(&mut harness, "text 10.00 · image 1.00");
    let app = harness.state();
    assert_eq!(app.settings.guidance_scale, 10.0);
    assert_eq!(app.settings.image_guidance_scale, 1.0);
    assert_eq!(app.history.len(), 1, "the adopted cell joins the history");
    assert_eq!(app.selected, Some(0));
}

#[test]
fn a_bad_file_shows_an_error_and_the_window_keeps_working() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    let folder = tempfile::tempdir().unwrap();
    let bad = folder.path().join("holiday.png");
    std::fs::write(&bad, b"this is not a picture").unwrap();
    drop_file(&mut harness, &bad);
    wait_for(&mut harness, "the error", |app| !app.notices.is_empty());
    assert!(sees(&harness, "holiday.png"), "the message names the file");
    assert!(harness.state().input.is_none());
    assert!(harness.state().notices[0].is_error);
    click(&mut harness, "Dismiss");
    assert!(harness.state().notices.is_empty());

    open_fixture_and_type(&mut harness, 2, "make it snowy");
    click(&mut harness, "Generate");
    wait_for(&mut harness, "a result after the error", |app| {
        app.history.len() == 1
    });
}

#[test]
fn a_model_that_fails_to_load_is_reported_and_another_can_be_loaded() {
    let mut harness = harness(options("sd-plain-4ch"));
    wait_for(&mut harness, "the load error", |app| {
        app.load_failure.is_some()
    });
    assert!(sees(&harness, "it needs 8"), "the reason is shown");
    click(&mut harness, "Dismiss");
    open_model_manager(&mut harness);
    let model = common::fixture_pipeline("sd1-tiny").display().to_string();
    type_into(&mut harness, "Model folder or Hub repo id", &model);
    click(&mut harness, "Load");
    wait_for(&mut harness, "the other model", model_ready);
    assert!(sees(&harness, "Model: "), "the status bar names the model");
    #[cfg(target_os = "linux")]
    assert!(
        sees(&harness, "Memory: ") && sees(&harness, " GB"),
        "the status bar shows the memory in use"
    );
}

#[test]
fn settings_persist_across_restarts() {
    let folder = tempfile::tempdir().unwrap();
    let store = SettingsStore::at(folder.path().join("settings.json"));
    let start = |store: &SettingsStore| StartOptions {
        settings_store: Some(store.clone()),
        ..options("sd1-tiny")
    };
    let mut first = harness(start(&store));
    wait_for(&mut first, "the model to load", model_ready);
    set_slider(&mut first, "Text guidance", 11.0);
    set_slider(&mut first, "Image guidance", 2.5);
    set_slider(&mut first, "Steps", 37.0);
    drop_file(&mut first, &ancestral_case().join("input.png"));
    wait_for(&mut first, "the image", |app| app.input.is_some());
    eframe::App::on_exit(first.state_mut());
    drop(first);

    let (saved, error) = store.load();
    assert!(error.is_none());
    assert_eq!(saved.guidance_scale, 11.0);
    assert_eq!(saved.steps, 37);
    assert_eq!(
        saved.model,
        common::fixture_pipeline("sd1-tiny").display().to_string()
    );
    assert_eq!(saved.recent_images, [ancestral_case().join("input.png")]);

    // The second start names no model: the remembered one loads.
    let mut second = harness(StartOptions {
        settings_store: Some(store.clone()),
        ..StartOptions::default()
    });
    wait_for(&mut second, "the remembered model", model_ready);
    let settings: &Settings = &second.state().settings;
    assert_eq!(settings.image_guidance_scale, 2.5);
    assert_eq!(settings.steps, 37);
}

#[test]
fn first_start_offers_the_default_model_and_downloads_it_with_progress() {
    use common::fake_hub::{FakeHub, FakeRepo};
    use instruct_pix2pix::model::hub::DEFAULT_REPO;

    // A fresh install: no settings, an empty Hugging Face cache, and a Hub that serves the
    // default repo (the tiny fixture pipeline under its name).
    let repo = FakeRepo::from_folder(
        DEFAULT_REPO,
        "8888888888888888888888888888888888888888",
        &common::fixture_pipeline("sd1-tiny-ancestral"),
    );
    let hub = FakeHub::start(vec![repo]);
    // Slow enough to see the progress bar.
    hub.set_cdn_delay(Duration::from_millis(20));
    let cache = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let store = SettingsStore::at(config.path().join("settings.json"));
    let mut harness = harness(StartOptions {
        settings_store: Some(store.clone()),
        hub: Some(hub.settings(cache.path())),
        ..StartOptions::default()
    });
    harness.run_steps(10);

    // Nothing downloads by itself: the model manager offers the default model or a folder.
    let app = harness.state();
    assert!(app.model.is_none() && app.loading.is_none());
    assert!(app.ui_state.model_manager_open);
    assert!(sees(&harness, "No model is loaded."));
    assert!(harness.query_by_label("Browse…").is_some());
    assert!(
        hub.requests().is_empty(),
        "nothing was asked of the Hub before the user chose"
    );

    click(&mut harness, &format!("Download {DEFAULT_REPO}"));
    wait_for(&mut harness, "download progress", |app| {
        app.loading
            .as_ref()
            .and_then(|l| l.download.as_ref())
            .is_some_and(|d| d.done > 0)
    });
    assert!(sees(&harness, "MB"), "the download shows its progress");
    wait_for(&mut harness, "the downloaded model", |app| {
        model_ready(app) && app.model.as_ref().is_some_and(|m| m.name == DEFAULT_REPO)
    });
    assert!(sees(
        &harness,
        &format!("Model: {DEFAULT_REPO} · cpu · f32")
    ));
    // Into the Hugging Face cache's own layout, where diffusers would look too.
    assert!(
        cache
            .path()
            .join("models--timbrooks--instruct-pix2pix/snapshots")
            .join("8888888888888888888888888888888888888888")
            .join("model_index.json")
            .is_file()
    );
    eframe::App::on_exit(harness.state_mut());
    drop(harness);
    assert_eq!(store.load().0.model, DEFAULT_REPO);
}

#[test]
fn the_model_manager_downloads_with_progress_cancels_and_switches_models() {
    use common::fake_hub::{FakeHub, FakeRepo};

    const REPO: &str = "someone/tiny-ip2p";
    let repo = FakeRepo::from_folder(
        REPO,
        "7777777777777777777777777777777777777777",
        &common::fixture_pipeline("sd1-tiny-ancestral"),
    );
    let hub = FakeHub::start(vec![repo]);
    // Slow weight bodies (the 2.2 MB UNet takes seconds) leave time to see progress and cancel.
    hub.set_cdn_delay(Duration::from_millis(20));
    let cache = tempfile::tempdir().unwrap();
    let mut harness = harness(StartOptions {
        hub: Some(hub.settings(cache.path())),
        ..options("sd1-tiny")
    });
    wait_for(&mut harness, "the first model", model_ready);
    let first = harness.state().model.clone().unwrap();

    open_model_manager(&mut harness);
    type_into(&mut harness, "Model folder or Hub repo id", REPO);
    click(&mut harness, "Load");
    wait_for(&mut harness, "download progress", |app| {
        app.loading
            .as_ref()
            .and_then(|l| l.download.as_ref())
            .is_some_and(|d| d.file.starts_with("unet/") && d.done > 0)
    });
    assert!(sees(&harness, "MB"), "the download shows its progress");
    assert_eq!(
        harness.state().model.as_ref(),
        Some(&first),
        "the old model stays meanwhile"
    );
    click(&mut harness, "Cancel download");
    // The manager lists the cache again after a cancel: the partial download shows up, not
    // ready (and, as it adds a row, moves the buttons below it: wait for it before clicking).
    wait_for(&mut harness, "the cancel and the new listing", |app| {
        app.loading.is_none()
            && app
                .catalog
                .iter()
                .any(|e| e.spec == REPO && e.problem.is_some())
    });
    assert!(sees(&harness, "was cancelled; still using"));
    assert_eq!(harness.state().model.as_ref(), Some(&first));
    click(&mut harness, "Close");
    wait_for(&mut harness, "the model manager to close", |app| {
        !app.ui_state.model_manager_open
    });
    // Let the closing window fade out so it no longer covers the controls.
    for _ in 0..240 {
        if harness
            .query_by_label("Model folder or Hub repo id")
            .is_none()
        {
            break;
        }
        harness.step();
    }
    harness.run_steps(30);

    // Edits still work with the old model.
    open_fixture_and_type(&mut harness, 2, "make it snowy");
    click(&mut harness, "Generate");
    wait_for(&mut harness, "an edit after the cancel", |app| {
        app.history.len() == 1
    });

    // Full speed now: the download resumes, the new model replaces the old.
    hub.set_cdn_delay(Duration::ZERO);
    open_model_manager(&mut harness);
    click(&mut harness, "Load");
    wait_for(&mut harness, "the downloaded model", |app| {
        model_ready(app) && app.model.as_ref().is_some_and(|m| m.name == REPO)
    });
    assert!(sees(&harness, &format!("Model: {REPO} · cpu · f32")));
    // The catalog lists the cached repo as ready.
    click(&mut harness, "Refresh");
    wait_for(&mut harness, "the catalog", |app| {
        app.catalog
            .iter()
            .any(|e| e.spec == REPO && e.problem.is_none())
    });
    set_slider(&mut harness, "Steps", 3.0);
    wait_for(&mut harness, "an edit with the new model", |app| {
        app.history.len() == 2
    });
    assert!(harness.state().history[1].model.contains(REPO));
}

#[test]
fn before_after_split_zoom_and_history() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    open_fixture_and_type(&mut harness, 2, "make it snowy");
    click(&mut harness, "Generate");
    wait_for(&mut harness, "the first result", |app| {
        app.history.len() == 1
    });
    set_slider(&mut harness, "Image guidance", 2.0);
    wait_for(&mut harness, "the second result", |app| {
        app.history.len() == 2
    });

    click(&mut harness, "Before | after");
    assert_eq!(
        harness.state().viewer.mode,
        instruct_pix2pix::gui::viewer::CompareMode::Split
    );
    // Drag the split line (it starts in the middle of the image) to the left.
    let view = harness.get_by_label("Image view").rect();
    let centre = view.center();
    harness.drag_at(centre);
    harness.run_steps(1);
    harness.hover_at(centre - egui::vec2(view.width() / 8.0, 0.0));
    harness.run_steps(1);
    harness.drop_at(centre - egui::vec2(view.width() / 8.0, 0.0));
    harness.run_steps(2);
    let split = harness.state().viewer.split;
    assert!(split < 0.5, "the split line moved left: {split}");

    // Zoom with the wheel around the pointer; double-click fits again.
    harness.hover_at(centre);
    harness.event(egui::Event::MouseWheel {
        unit: egui::MouseWheelUnit::Point,
        delta: egui::vec2(0.0, 120.0),
        phase: egui::TouchPhase::Move,
        modifiers: egui::Modifiers::NONE,
        source: egui::MouseWheelSource::Wheel,
    });
    harness.run_steps(4);
    assert!(harness.state().viewer.zoom > 1.0, "zoomed in");
    click(&mut harness, "Fit");
    assert_eq!(harness.state().viewer.zoom, 1.0);

    // History: click the first thumbnail, restore its settings.
    click(&mut harness, "#1");
    assert_eq!(harness.state().selected, Some(0));
    assert!(sees(&harness, "Result #1"));
    click(&mut harness, "Restore settings");
    assert_eq!(harness.state().settings.image_guidance_scale, 1.5);
}

/// Clears a text field and types `text` (Ctrl+A, then typing replaces the selection).
pub(super) fn replace_text(harness: &mut Harness<'static, EditorApp>, label: &str, text: &str) {
    harness.get_by_label(label).click();
    harness.run_steps(1);
    harness.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    harness.get_by_label(label).type_text(text);
    harness.run_steps(2);
    let value = harness.get_by_label(label).value().unwrap_or_default();
    assert_eq!(value, text, "{label}");
}

#[test]
fn the_fine_tune_dialog_checks_a_folder_trains_validates_stops_and_opens_the_model() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    click(&mut harness, "Fine-tune on folder…");
    let data = common::fixtures().join("train_data");

    // A folder with broken pairs: the check lists them by name.
    replace_text(
        &mut harness,
        "Examples folder",
        &data.join("pairs_broken").display().to_string(),
    );
    click(&mut harness, "Check");
    wait_for(&mut harness, "the dataset check", |app| {
        app.finetune.check.is_some()
    });
    let check = harness.state().finetune.check.clone().unwrap().unwrap();
    assert!(!check.problems.is_empty(), "{check:?}");
    assert!(sees(&harness, "examples will be skipped"));

    let output = tempfile::tempdir().unwrap();
    let model_dir = output.path().join("tuned");
    replace_text(
        &mut harness,
        "Examples folder",
        &data.join("pairs").display().to_string(),
    );
    click(&mut harness, "Check");
    wait_for(
        &mut harness,
        "the clean check",
        |app| matches!(&app.finetune.check, Some(Ok(c)) if c.problems.is_empty() && c.total == 2),
    );
    replace_text(
        &mut harness,
        "Output folder",
        &model_dir.display().to_string(),
    );
    set_slider(&mut harness, "Training steps", 1000.0);
    set_slider(&mut harness, "Batch size", 1.0);
    set_slider(&mut harness, "Gradient accumulation", 1.0);
    set_slider(&mut harness, "Resolution", 64.0);
    replace_text(
        &mut harness,
        "Validation image",
        &ancestral_case().join("input.png").display().to_string(),
    );
    replace_text(&mut harness, "Validation prompt", "make it snowy");
    click(&mut harness, "Start");
    assert!(
        harness.state().generate_blocker().is_some(),
        "editing waits while training holds the device"
    );
    wait_for(&mut harness, "loss points and a validation image", |app| {
        app.finetune
            .run
            .as_ref()
            .is_some_and(|run| run.losses.len() >= 3 && !run.validation.is_empty())
    });
    assert!(sees(&harness, "Validation at step"));
    assert!(sees(&harness, "loss "), "the progress line shows the loss");
    click(&mut harness, "Stop");
    wait_for(&mut harness, "the stopped run's model", |app| {
        app.finetune
            .run
            .as_ref()
            .is_some_and(|run| run.finished.is_some())
    });
    let run = harness.state().finetune.run.as_ref().unwrap();
    assert!(run.failed.is_none(), "{:?}", run.failed);
    let steps = run.losses.len() as u64;
    assert!(steps < 1000, "stopped early, after {steps} steps");
    assert!(model_dir.join("model_index.json").is_file());
    assert!(model_dir.join("unet").join("config.json").is_file());

    click(&mut harness, "Open in editor");
    wait_for(&mut harness, "the fine-tuned model in the editor", |app| {
        model_ready(app)
            && app
                .model
                .as_ref()
                .is_some_and(|m| m.name == model_dir.display().to_string())
    });
}

/// In the fine-tuning dialog: the fixture's two clean pairs as the examples (checked) and
/// `output` as the output folder.
fn choose_clean_pairs(harness: &mut Harness<'static, EditorApp>, output: &Path) {
    let pairs = common::fixtures().join("train_data").join("pairs");
    replace_text(harness, "Examples folder", &pairs.display().to_string());
    click(harness, "Check");
    wait_for(
        harness,
        "the clean check",
        |app| matches!(&app.finetune.check, Some(Ok(c)) if c.problems.is_empty()),
    );
    replace_text(harness, "Output folder", &output.display().to_string());
}

/// The fine-tuning dialog's memory savers: the worker reads the base model's sizes, the dialog
/// shows "Estimated peak memory: X of Y available" before Start, toggling the savers by their
/// labels moves it, a small device presets them on, and the run started carries them.
#[test]
fn the_fine_tune_dialog_estimates_memory_and_its_savers_reach_the_run() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    click(&mut harness, "Fine-tune on folder…");
    wait_for(&mut harness, "the memory estimate", |app| {
        matches!(&app.finetune.memory, Some(Ok(_)))
    });
    let figures = |h: &Harness<'static, EditorApp>| h.state().finetune.memory_figures().unwrap();
    let before = figures(&harness);
    assert!(before.available.is_some_and(|a| a > 0), "{before:?}");
    assert!(sees(&harness, &before.summary()), "{}", before.summary());
    let cpu_bf16 = matches!(&harness.state().finetune.memory, Some(Ok(p)) if p.bf16);
    assert!(sees(
        &harness,
        if cpu_bf16 {
            "On the CPU training computes in float32; bf16 holds the frozen weights in half"
        } else {
            "On this CPU training runs in float32"
        }
    ));

    // Checkpointing lowers the activations: the line shows the new figure.
    click(&mut harness, "Gradient checkpointing");
    let checkpointed = figures(&harness);
    assert!(
        checkpointed.needed < before.needed,
        "{checkpointed:?} {before:?}"
    );
    assert!(sees(&harness, &checkpointed.summary()));
    assert!(!sees(&harness, &before.summary()));
    // 8-bit AdamW lowers the optimizer's part (a few MB on this tiny model).
    click(&mut harness, "8-bit AdamW");
    let eight_bit = figures(&harness);
    assert!(eight_bit.needed < checkpointed.needed);
    // A larger batch raises the activations.
    set_slider(&mut harness, "Batch size", 8.0);
    assert!(figures(&harness).needed > eight_bit.needed);
    set_slider(&mut harness, "Batch size", 1.0);
    click(&mut harness, "Cache latents");
    assert!(harness.state().finetune.request.cache_latents);

    // A device with little memory: the savers come on by themselves. (At 512², batch 2 the
    // UNet's activations set this model's peak; at 256², batch 1 the VAE encoder's work does.)
    click(&mut harness, "Gradient checkpointing");
    click(&mut harness, "8-bit AdamW");
    click(&mut harness, "Cache latents");
    set_slider(&mut harness, "Resolution", 512.0);
    set_slider(&mut harness, "Batch size", 2.0);
    let mut small = match &harness.state().finetune.memory {
        Some(Ok(profile)) => profile.clone(),
        other => panic!("{other:?}"),
    };
    let without = figures(&harness);
    small.available = Some(without.needed - 1);
    harness.state_mut().finetune.set_memory(Ok(small));
    harness.run_steps(2);
    let request = &harness.state().finetune.request;
    // Checkpointing saves the most here; it alone makes the run fit.
    assert!(request.gradient_checkpointing, "{request:?}");
    assert!(!request.use_8bit_adam, "{request:?}");
    let preset = figures(&harness);
    assert!(preset.fits(), "{preset:?}");
    assert!(sees(&harness, &preset.summary()));

    // Start: the run carries the options.
    let output = tempfile::tempdir().unwrap();
    choose_clean_pairs(&mut harness, &output.path().join("tuned"));
    set_slider(&mut harness, "Resolution", 64.0);
    click(&mut harness, "8-bit AdamW");
    click(&mut harness, "Start");
    let run = harness
        .state()
        .finetune
        .run
        .as_ref()
        .expect("a run started");
    assert!(run.request.gradient_checkpointing);
    assert!(run.request.use_8bit_adam);
    assert_eq!(run.request.resolution, 64);
    wait_for(&mut harness, "a first step", |app| {
        app.finetune
            .run
            .as_ref()
            .is_some_and(|run| !run.losses.is_empty() && run.memory.is_some())
    });
    assert!(
        sees(&harness, "(estimated peak "),
        "the progress line shows the run's own estimate"
    );
    click(&mut harness, "Stop");
    wait_for(&mut harness, "the run to end", |app| {
        app.finetune.run.as_ref().is_some_and(|run| !run.active())
    });
    let run = harness.state().finetune.run.as_ref().unwrap();
    assert!(run.failed.is_none(), "{:?}", run.failed);
}

/// Issue 13 in the window: where the worker counts several GPUs the dialog offers "Use all N
/// GPUs" and shows the effective batch it makes; the run trains one rank per GPU (two ranks on
/// the CPU stand in for them here: the ranks, their rendezvous and their gradient sums are the
/// real ones); Pause holds every rank between steps, Resume goes on, Stop saves the model.
#[test]
fn the_fine_tune_dialog_uses_all_gpus_and_pause_holds_every_rank() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the model to load", model_ready);
    click(&mut harness, "Fine-tune on folder…");
    wait_for(&mut harness, "the memory profile", |app| {
        matches!(&app.finetune.memory, Some(Ok(_)))
    });
    // This machine has no GPU: nothing to offer.
    assert!(!sees(&harness, "Use all"));
    let mut two_gpus = match &harness.state().finetune.memory {
        Some(Ok(profile)) => profile.clone(),
        other => panic!("{other:?}"),
    };
    two_gpus.gpus = 2;
    harness.state_mut().finetune.set_memory(Ok(two_gpus));
    harness.run_steps(2);
    set_slider(&mut harness, "Batch size", 1.0);
    set_slider(&mut harness, "Gradient accumulation", 1.0);
    assert!(sees(&harness, "Effective batch: 1 example per update"));
    click(&mut harness, "Use all 2 GPUs");
    assert_eq!(harness.state().finetune.request.processes, 2);
    assert!(sees(
        &harness,
        "Effective batch: 1 × 2 GPUs = 2 examples per update"
    ));
    assert!(sees(&harness, "(on each GPU)"));

    let output = tempfile::tempdir().unwrap();
    let model_dir = output.path().join("tuned");
    choose_clean_pairs(&mut harness, &model_dir);
    set_slider(&mut harness, "Training steps", 1000.0);
    set_slider(&mut harness, "Resolution", 64.0);
    click(&mut harness, "Start");
    let losses = |app: &EditorApp| app.finetune.run.as_ref().map_or(0, |run| run.losses.len());
    wait_for(&mut harness, "a first step on two ranks", |app| {
        losses(app) >= 1
    });

    click(&mut harness, "Pause");
    wait_for(&mut harness, "both ranks to pause", |app| {
        app.finetune.run.as_ref().is_some_and(|run| run.paused)
    });
    assert!(sees(&harness, "Paused"));
    let paused_at = losses(harness.state());
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        harness.step();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(losses(harness.state()), paused_at, "no step while paused");
    click(&mut harness, "Resume");
    wait_for(&mut harness, "a step after resuming", |app| {
        losses(app) > paused_at
    });
    click(&mut harness, "Stop");
    wait_for(&mut harness, "the stopped run's model", |app| {
        app.finetune.run.as_ref().is_some_and(|run| !run.active())
    });
    let run = harness.state().finetune.run.as_ref().unwrap();
    assert!(run.failed.is_none(), "{:?}", run.failed);
    assert_eq!(run.request.processes, 2);
    assert!(model_dir.join("unet").join("config.json").is_file());
    // Rank 0 alone wrote: one line of metrics a step, not two.
    let metrics = std::fs::read_to_string(model_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), run.losses.len(), "{metrics}");
}

/// Issue 15 items 2 and 3 in the window: the model manager fuses a LoRA at a chosen scale into
/// the model in use, then loads a single-file checkpoint with its config folder, all through
/// the model thread.
#[test]
fn the_model_manager_adds_a_lora_and_loads_a_single_file() {
    let mut harness = harness(options("sd1-tiny"));
    wait_for(&mut harness, "the first model", model_ready);
    open_model_manager(&mut harness);
    let lora = common::fixtures()
        .join("lora_edit")
        .join("kohya.safetensors");
    type_into(&mut harness, "LoRA file", lora.to_str().unwrap());
    click(&mut harness, "Add this LoRA");
    assert_eq!(harness.state().ui_state.loras.len(), 1);
    set_slider(&mut harness, "kohya.safetensors, scale", 0.5);
    click(&mut harness, "Apply LoRAs");
    wait_for(&mut harness, "the model with the LoRA", |app| {
        model_ready(app)
            && app
                .model
                .as_ref()
                .is_some_and(|m| m.loras.len() == 1 && m.loras[0].scale == 0.5)
    });
    assert!(sees(&harness, "With LoRA: kohya.safetensors ×0.5"));

    // A single file: the list is emptied first (its LoRA is for sd1-tiny's widths).
    click(&mut harness, "Remove");
    let single = common::fixtures().join("single_file");
    let file = single.join("ip2p-tiny-ema.ckpt");
    type_into(
        &mut harness,
        "Model folder or Hub repo id",
        file.to_str().unwrap(),
    );
    type_into(
        &mut harness,
        "Config folder or repo of the single file",
        single.join("config").to_str().unwrap(),
    );
    click(&mut harness, "Load");
    wait_for(&mut harness, "the single file", |app| {
        model_ready(app)
            && app
                .model
                .as_ref()
                .is_some_and(|m| m.ema == Some(true) && m.loras.is_empty())
    });
    assert!(sees(&harness, "Single file: its EMA weights are used."));
}

/// `--model FILE --config DIR --lora FILE:SCALE` at start: the single file loads with the LoRA.
#[test]
fn start_up_flags_load_a_single_file_with_its_config_and_a_lora() {
    use instruct_pix2pix::worker::LoraChoice;

    let single = common::fixtures().join("single_file");
    // A LoRA of the single file's own widths: the training LoRA format, written here.
    let work = tempfile::tempdir().unwrap();
    let lora = work.path().join("lora.safetensors");
    let cpu = candle_core::Device::Cpu;
    let module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let tensors = std::collections::HashMap::from([
        (
            format!("{module}.lora_A.weight"),
            candle_core::Tensor::ones((2, 8), candle_core::DType::F32, &cpu).unwrap(),
        ),
        (
            format!("{module}.lora_B.weight"),
            candle_core::Tensor::ones((8, 2), candle_core::DType::F32, &cpu).unwrap(),
        ),
    ]);
    candle_core::safetensors::save(&tensors, &lora).unwrap();
    let mut harness = harness(StartOptions {
        model: Some(single.join("ip2p-tiny.safetensors").display().to_string()),
        config: Some(single.join("config").display().to_string()),
        loras: vec![LoraChoice {
            path: lora.clone(),
            scale: 0.25,
        }],
        ..StartOptions::default()
    });
    wait_for(&mut harness, "the single file with its LoRA", |app| {
        model_ready(app)
            && app
                .model
                .as_ref()
                .is_some_and(|m| m.ema == Some(false) && m.loras.len() == 1)
    });
}
