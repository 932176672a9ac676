//! The window's "Apply to folder…" driven by its labels with egui_kittest, on the tiny fixture
//! model and the real model thread: pick the folders, edit them all, watch the progress with
//! the time left, Cancel, read the summary with the skipped files, continue, and the folders
//! that cannot be used.

use crate::common;

use std::path::{Path, PathBuf};

use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use instruct_pix2pix::gui::EditorApp;
use instruct_pix2pix::pipeline::image::read_png_text;
use instruct_pix2pix::pipeline::metadata::EditRecord;

use super::window::{click, harness, model_ready, options, sees, set_slider, type_into, wait_for};

fn fixture_input() -> PathBuf {
    common::fixtures()
        .join("edits")
        .join("sd1-plain")
        .join("input.png")
}

/// Instruction, steps and a fixed seed on the controls, then the dialog opened with both
/// folders typed.
fn open_dialog(harness: &mut Harness<'static, EditorApp>, steps: u32, input: &Path, output: &Path) {
    wait_for(harness, "the model to load", model_ready);
    type_into(harness, "Instruction", "make it snowy");
    set_slider(harness, "Steps", f64::from(steps));
    harness.get_by_label("Random seed each time").click();
    harness.run_steps(2);
    set_slider(harness, "Seed", 5.0);
    assert!(
        harness.state().folder_blocker().is_some(),
        "no folders chosen yet"
    );
    click(harness, "Apply to folder…");
    type_into(harness, "Input folder", &input.display().to_string());
    type_into(harness, "Output folder", &output.display().to_string());
    assert_eq!(harness.state().folder_blocker(), None);
}

fn folder_done(app: &EditorApp) -> bool {
    app.folder.running.is_none() && (app.folder.report.is_some() || app.folder.error.is_some())
}

#[test]
fn apply_to_folder_edits_every_image_and_lists_the_skipped_files() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("photos");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(fixture_input(), input.join("a.png")).unwrap();
    std::fs::copy(fixture_input(), input.join("b.png")).unwrap();
    std::fs::write(input.join("broken.png"), b"not an image").unwrap();
    let output = work.path().join("edited");

    let mut harness = harness(options("sd1-tiny"));
    open_dialog(&mut harness, 2, &input, &output);
    click(&mut harness, "Edit all images");
    assert!(
        harness.state().generate_blocker().is_some(),
        "editing waits while the folder runs"
    );
    wait_for(&mut harness, "the folder's report", folder_done);
    let report = harness.state().folder.report.clone().expect("a report");
    assert_eq!((report.edited, report.total), (2, 3));
    assert_eq!(report.prompt_encodings, 1);
    assert!(sees(&harness, "Done: 2 of 3 edited"));
    assert!(sees(&harness, "Skipped 1 file that could not be edited"));
    assert!(sees(&harness, "broken.png"));
    assert_eq!(common::files_in(&output), ["a.png", "b.png"]);
    let record = EditRecord::from_text_chunks(&read_png_text(&output.join("b.png")).unwrap())
        .expect("settings chunk");
    assert_eq!(
        (record.prompt.as_str(), record.seed, record.steps),
        ("make it snowy", 5, 2)
    );
    let blocker = harness.state().generate_blocker().unwrap_or_default();
    assert!(
        !blocker.contains("folder"),
        "the folder no longer blocks editing: {blocker}"
    );

    // Again: the results there are kept, only the broken file is tried (and skipped) again.
    click(&mut harness, "Edit all images");
    wait_for(&mut harness, "the second report", folder_done);
    let report = harness.state().folder.report.clone().expect("a report");
    assert_eq!(
        (report.edited, report.total, report.already_done),
        (0, 1, 2)
    );
    assert!(sees(&harness, "2 already in the output folder"));
}

#[test]
fn apply_to_folder_shows_the_time_left_and_cancel_keeps_the_finished_images() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("three");
    std::fs::create_dir(&input).unwrap();
    for name in ["p1.png", "p2.png", "p3.png"] {
        std::fs::copy(fixture_input(), input.join(name)).unwrap();
    }
    let output = work.path().join("out");

    let mut harness = harness(options("sd1-tiny"));
    // Enough steps to cancel in the middle of the folder.
    open_dialog(&mut harness, 16, &input, &output);
    click(&mut harness, "Edit all images");
    wait_for(
        &mut harness,
        "the first image done and the time left",
        |app| {
            app.folder
                .running
                .as_ref()
                .and_then(|run| run.progress.as_ref())
                .is_some_and(|p| p.done >= 1 && p.eta.is_some())
        },
    );
    assert!(
        sees(&harness, "Image 2 of 3"),
        "the progress names the image"
    );
    assert!(sees(&harness, " left"), "the progress shows the time left");
    // The dialog's Cancel and the main one both stop the folder.
    let cancel = harness
        .query_all_by_label("Cancel")
        .find(|node| !node.accesskit_node().is_disabled())
        .expect("an enabled Cancel");
    cancel.click();
    harness.run_steps(2);
    wait_for(&mut harness, "the cancelled report", folder_done);
    let report = harness.state().folder.report.clone().expect("a report");
    assert!(report.cancelled, "{report:?}");
    assert!(report.edited >= 1 && report.edited < 3, "{report:?}");
    assert!(sees(&harness, "Cancelled:"));
    let kept = common::files_in(&output);
    assert_eq!(kept.len(), report.edited, "{kept:?}");
    for name in &kept {
        image::open(output.join(name)).expect("whole images only");
    }

    click(&mut harness, "Edit all images");
    wait_for(&mut harness, "the rest of the folder", folder_done);
    let report = harness.state().folder.report.clone().expect("a report");
    assert!(!report.cancelled);
    assert_eq!(report.already_done, kept.len());
    assert_eq!(report.edited, 3 - kept.len());
    assert_eq!(common::files_in(&output).len(), 3);
}

#[test]
fn apply_to_folder_names_a_folder_it_cannot_use() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("photos");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(fixture_input(), input.join("a.png")).unwrap();
    let file = work.path().join("taken.png");
    std::fs::write(&file, b"x").unwrap();

    let mut harness = harness(options("sd1-tiny"));
    open_dialog(&mut harness, 2, &input, &file);
    click(&mut harness, "Edit all images");
    wait_for(&mut harness, "the error", folder_done);
    let error = harness.state().folder.error.clone().expect("an error");
    assert!(
        error.contains("taken.png") && error.contains("is a file"),
        "{error}"
    );
    assert!(sees(&harness, "is a file"));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");

    // An empty folder.
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    super::window::replace_text(&mut harness, "Input folder", &empty.display().to_string());
    super::window::replace_text(
        &mut harness,
        "Output folder",
        &work.path().join("out").display().to_string(),
    );
    click(&mut harness, "Edit all images");
    wait_for(&mut harness, "the error", folder_done);
    let error = harness.state().folder.error.clone().expect("an error");
    assert!(error.contains("holds no images"), "{error}");
    // The window keeps working: the model is still there and nothing runs.
    assert!(harness.state().model.is_some() && harness.state().running.is_none());
}
