//! A whole folder: `edit --image DIR --output DIR` and the model thread's folder job (what the
//! window's "Apply to folder…" sends). Every image gets the same instruction and settings and a PNG
//! with them; bad files are skipped and listed (non-zero exit); results already there are not made
//! again, so a second run continues; Ctrl+C stops cleanly; inputs are never overwritten; a killed
//! run's leftovers do not fool the next one.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{files_in, fixture_pipeline, fixtures, pixel_difference, program, run, stderr};
use instruct_pix2pix::model::device::{DTypeChoice, DeviceChoice};
use instruct_pix2pix::pipeline::image::read_png_text;
use instruct_pix2pix::pipeline::metadata::EditRecord;
use instruct_pix2pix::worker::{
    EditSettings, Event, FolderJob, FolderReport, Job, ModelRequest, Worker,
};

fn fixture_input() -> PathBuf {
    fixtures().join("edits").join("sd1-plain").join("input.png")
}

fn model() -> String {
    fixture_pipeline("sd1-tiny").display().to_string()
}

/// A folder of images: `a.png` (the fixture), `b.jpg` (the same as JPEG), `notes.txt`.
fn photo_folder(root: &Path) -> PathBuf {
    let input = root.join("photos");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(fixture_input(), input.join("a.png")).unwrap();
    let image = image::open(fixture_input()).unwrap().to_rgb8();
    image.save(input.join("b.jpg")).unwrap();
    std::fs::write(input.join("notes.txt"), "not an image").unwrap();
    input
}

fn edit_folder(root: &Path, input: &Path, output: &Path, extra: &[&str]) -> Output {
    let model = model();
    let input = input.display().to_string();
    let output = output.display().to_string();
    let mut args = vec![
        "edit",
        "--model",
        &model,
        "--image",
        &input,
        "--prompt",
        "make it snowy",
        "--steps",
        "2",
        "--seed",
        "5",
        "--output",
        &output,
    ];
    args.extend_from_slice(extra);
    run(&root.join("hf"), &args)
}

fn record(path: &Path) -> EditRecord {
    EditRecord::from_text_chunks(&read_png_text(path).unwrap()).expect("settings chunk")
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

/// Fails cleanly: non-zero exit, no panic, the error line last.
fn failure(output: &Output) -> String {
    let text = stderr(output);
    assert!(!output.status.success(), "expected a failure: {text}");
    assert!(!text.contains("panicked"), "{text}");
    text
}

#[test]
fn a_folder_is_edited_with_one_encoding_and_a_second_run_continues() {
    let work = tempfile::tempdir().unwrap();
    let input = photo_folder(work.path());
    let output = work.path().join("edited");
    let result = edit_folder(work.path(), &input, &output, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(files_in(&output), ["a.png", "b.png"]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains("edited 2 of 2 images") && stdout.contains("encoded once"),
        "{stdout}"
    );
    assert!(
        stderr(&result).contains("notes.txt"),
        "the ignored file is named"
    );
    let a = record(&output.join("a.png"));
    assert_eq!(
        (
            a.prompt.as_str(),
            a.seed,
            a.steps,
            a.image_index,
            a.num_images
        ),
        ("make it snowy", 5, 2, 0, 1)
    );
    assert_eq!(record(&output.join("b.png")).seed, 5);

    // The same image as a single edit with the same settings.
    let single = work.path().join("single.png");
    let input_a = input.join("a.png").display().to_string();
    let single_arg = single.display().to_string();
    let model = model();
    let result = run(
        &work.path().join("hf"),
        &[
            "edit",
            "--model",
            &model,
            "--image",
            &input_a,
            "--prompt",
            "make it snowy",
            "--steps",
            "2",
            "--seed",
            "5",
            "--output",
            &single_arg,
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let folder_a = image::open(output.join("a.png")).unwrap().to_rgb8();
    assert_eq!(
        pixel_difference(&folder_a, &image::open(&single).unwrap().to_rgb8()).0,
        0
    );

    // A second run makes only what is missing.
    let kept = modified(&output.join("a.png"));
    std::fs::remove_file(output.join("b.png")).unwrap();
    let result = edit_folder(work.path(), &input, &output, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains("edited 1 of 1 image") && stdout.contains("(1 already there)"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("a.png"),
        "a.png is not made again: {stdout}"
    );
    assert_eq!(modified(&output.join("a.png")), kept);
    assert_eq!(files_in(&output), ["a.png", "b.png"]);

    // Without --seed, a run that continues takes the seed of the results there; with another
    // seed it says the folder would mix two edits.
    std::fs::remove_file(output.join("b.png")).unwrap();
    let model_arg = model.clone();
    let input_arg = input.display().to_string();
    let output_arg = output.display().to_string();
    let result = run(
        &work.path().join("hf"),
        &[
            "edit",
            "--model",
            &model_arg,
            "--image",
            &input_arg,
            "--prompt",
            "make it snowy",
            "--steps",
            "2",
            "--output",
            &output_arg,
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("seed 5, that of the results already in"),
        "{}",
        stderr(&result)
    );
    assert_eq!(record(&output.join("b.png")).seed, 5);
    std::fs::remove_file(output.join("b.png")).unwrap();
    let result = run(
        &work.path().join("hf"),
        &[
            "edit",
            "--model",
            &model_arg,
            "--image",
            &input_arg,
            "--prompt",
            "make it snowy",
            "--steps",
            "2",
            "--seed",
            "6",
            "--output",
            &output_arg,
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("made with other settings (seed 5 → 6)"),
        "{}",
        stderr(&result)
    );

    // Everything there: nothing to do, no model loaded.
    let result = edit_folder(work.path(), &input, &output, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(String::from_utf8_lossy(&result.stdout).contains("nothing to do"));
}

/// `--num-images` in a folder: NAME-1.png … per input, each recording its place.
#[test]
fn several_images_per_input_in_a_folder() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(fixture_input(), input.join("x.png")).unwrap();
    let output = work.path().join("out");
    let result = edit_folder(
        work.path(),
        &input,
        &output,
        &["--num-images", "2", "--quiet"],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(files_in(&output), ["x-1.png", "x-2.png"]);
    let second = record(&output.join("x-2.png"));
    assert_eq!((second.image_index, second.num_images), (1, 2));
}

#[test]
fn bad_files_are_skipped_and_listed_with_a_failing_exit() {
    let work = tempfile::tempdir().unwrap();
    let input = photo_folder(work.path());
    std::fs::write(input.join("broken.png"), b"\x89PNG\r\n\x1a\nnot an image").unwrap();
    std::fs::write(input.join("empty.jpg"), b"").unwrap();
    let output = work.path().join("edited");
    let result = edit_folder(work.path(), &input, &output, &[]);
    let text = failure(&result);
    assert!(
        text.contains("broken.png") && text.contains("empty.jpg"),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("error: 2 of 4 images could not be edited")),
        "{text}"
    );
    // The good ones are done all the same, and nothing is written for the bad ones.
    assert_eq!(files_in(&output), ["a.png", "b.png"]);
}

#[test]
fn a_folder_of_unreadable_files() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("bad");
    std::fs::create_dir(&input).unwrap();
    std::fs::write(input.join("one.png"), b"garbage").unwrap();
    std::fs::write(input.join("two.webp"), b"RIFF").unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(input.join("pipe.jpg"))
        .status()
        .unwrap();
    assert!(status.success());
    let output = work.path().join("out");
    let result = edit_folder(work.path(), &input, &output, &["--quiet"]);
    let text = failure(&result);
    for name in ["one.png", "two.webp", "pipe.jpg"] {
        assert!(text.contains(name), "{name}: {text}");
    }
    assert!(text.contains("3 of 3 images could not be edited"), "{text}");
    assert!(files_in(&output).is_empty(), "{:?}", files_in(&output));
}

#[test]
fn an_empty_folder_or_one_without_images() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("empty");
    std::fs::create_dir(&input).unwrap();
    let output = work.path().join("out");
    let text = failure(&edit_folder(work.path(), &input, &output, &[]));
    assert!(
        text.contains("empty") && text.contains("holds no images"),
        "{text}"
    );
    std::fs::write(input.join("readme.txt"), "hi").unwrap();
    let text = failure(&edit_folder(work.path(), &input, &output, &[]));
    assert!(
        text.contains("holds no images") && text.contains(".png"),
        "{text}"
    );
    assert!(!output.exists(), "nothing is created");
}

#[test]
fn an_output_path_that_is_a_file_or_the_input_folder() {
    let work = tempfile::tempdir().unwrap();
    let input = photo_folder(work.path());
    let file = work.path().join("result.png");
    std::fs::write(&file, b"keep me").unwrap();
    let text = failure(&edit_folder(work.path(), &input, &file, &[]));
    assert!(
        text.contains("result.png") && text.contains("is a file"),
        "{text}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let missing_file = work.path().join("new.png");
    let text = failure(&edit_folder(work.path(), &input, &missing_file, &[]));
    assert!(
        text.contains("new.png") && text.contains("folder"),
        "{text}"
    );
    assert!(!missing_file.exists());

    // The input folder itself (by another spelling): refused, inputs untouched.
    let before = std::fs::read(input.join("a.png")).unwrap();
    let text = failure(&edit_folder(work.path(), &input, &input.join("."), &[]));
    assert!(text.contains("is the input folder"), "{text}");
    assert_eq!(std::fs::read(input.join("a.png")).unwrap(), before);
    assert_eq!(files_in(&input), ["a.png", "b.jpg", "notes.txt"]);
}

/// A run killed while writing leaves at most a hidden temporary (outputs are written to a
/// temporary file and renamed); a PNG cut short by another writer is made again, and an old
/// temporary is removed.
#[test]
fn a_half_written_output_from_a_killed_run() {
    let work = tempfile::tempdir().unwrap();
    let input = photo_folder(work.path());
    let output = work.path().join("edited");
    std::fs::create_dir(&output).unwrap();
    let whole = std::fs::read(fixture_input()).unwrap();
    std::fs::write(output.join("a.png"), &whole[..whole.len() / 2]).unwrap();
    let temporary = output.join(".tmp-Xy12ab.part");
    std::fs::write(&temporary, &whole[..100]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&temporary)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    let result = edit_folder(work.path(), &input, &output, &[]);
    assert!(result.status.success(), "{}", stderr(&result));
    assert!(
        stderr(&result).contains("a.png is cut short"),
        "{}",
        stderr(&result)
    );
    assert_eq!(
        files_in(&output),
        ["a.png", "b.png"],
        "the temporary is gone"
    );
    let a = image::open(output.join("a.png")).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (64, 64));
    assert_eq!(record(&output.join("a.png")).seed, 5);
}

/// Ctrl+C (SIGINT) stops after the current step: the images finished are kept whole, nothing
/// half-written is left, the exit says how to continue, and the next run does the rest.
#[test]
fn ctrl_c_stops_cleanly_and_the_next_run_continues() {
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("many");
    std::fs::create_dir(&input).unwrap();
    for i in 0..6 {
        std::fs::copy(fixture_input(), input.join(format!("img{i}.png"))).unwrap();
    }
    let output = work.path().join("out");
    let model = model();
    let mut child = program(&work.path().join("hf"))
        .args([
            "edit",
            "--model",
            &model,
            "--image",
            &input.display().to_string(),
            "--prompt",
            "make it snowy",
            "--steps",
            "30",
            "--seed",
            "1",
            "--output",
            &output.display().to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !output.join("img0.png").exists() {
        assert!(Instant::now() < deadline, "no image written in time");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: sends SIGINT to the child this test started.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let result = child.wait_with_output().unwrap();
    let text = failure(&result);
    assert!(
        text.contains("stopped by Ctrl+C") && text.contains("run the same command again"),
        "{text}"
    );
    let written = files_in(&output);
    assert!(
        !written.is_empty() && written.len() < 6,
        "stopped midway: {written:?}"
    );
    for name in &written {
        assert!(name.ends_with(".png") && !name.starts_with('.'), "{name}");
        image::open(output.join(name)).expect("a whole image");
    }

    let result = edit_folder(work.path(), &input, &output, &["--quiet"]);
    assert!(result.status.success(), "{}", stderr(&result));
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(
        stdout.contains(&format!("({} already there)", written.len())),
        "{stdout}"
    );
    assert_eq!(files_in(&output).len(), 6);
}

/// The folder job of the model thread, as the window sends it: progress with the time left,
/// a report listing the skipped file, one encoding of the instruction.
#[test]
fn the_worker_edits_a_folder_and_reports_skipped_files() {
    let work = tempfile::tempdir().unwrap();
    let input = photo_folder(work.path());
    std::fs::write(input.join("broken.png"), b"garbage").unwrap();
    let output = work.path().join("edited");
    let (handle, events) = Worker::spawn(Arc::new(|| {})).unwrap();
    let request = ModelRequest::new(model(), DeviceChoice::Cpu, DTypeChoice::F32);
    handle.send(Job::LoadModel(request)).unwrap();
    let settings = EditSettings {
        prompt: "make it snowy".into(),
        steps: 3,
        seed: 9,
        ..EditSettings::default()
    };
    let job = FolderJob {
        id: 7,
        input_dir: input.clone(),
        output_dir: output.clone(),
        max_side: 512,
        settings,
        random_seed: false,
    };
    handle.send(Job::EditFolder(job)).unwrap();
    let mut progress = Vec::new();
    let mut started = None;
    let report: FolderReport = loop {
        match events
            .recv_timeout(Duration::from_secs(120))
            .expect("an event")
        {
            Event::FolderStarted {
                id,
                seed,
                total,
                already_done,
                ignored,
            } => {
                started = Some((id, seed, total, already_done, ignored));
            }
            Event::FolderProgress(p) => progress.push(p),
            Event::FolderFinished(report) => break *report,
            Event::Failed { message, .. } => panic!("{message}"),
            _ => {}
        }
    };
    assert_eq!(started, Some((7, 9, 3, 0, 1)));
    assert!(
        progress.iter().any(|p| p.eta.is_some() && p.step > 0),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .all(|p| p.id == 7 && p.total == 3 && p.steps == 3)
    );
    assert_eq!((report.edited, report.total, report.not_reached), (2, 3, 0));
    assert!(!report.cancelled && report.error.is_none());
    assert_eq!(report.prompt_encodings, 1);
    assert_eq!((report.seed, report.warning.as_deref()), (9, None));
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].0, "broken.png");
    assert!(
        report.skipped[0].1.contains("broken.png"),
        "{:?}",
        report.skipped
    );
    assert_eq!(files_in(&output), ["a.png", "b.png"]);
    assert_eq!(record(&output.join("b.png")).seed, 9);

    // A folder that cannot be used is one failure line for the job.
    let job = FolderJob {
        id: 8,
        input_dir: input.clone(),
        output_dir: input.clone(),
        max_side: 512,
        settings: EditSettings::default(),
        random_seed: false,
    };
    handle.send(Job::EditFolder(job)).unwrap();
    let message = loop {
        match events
            .recv_timeout(Duration::from_secs(60))
            .expect("an event")
        {
            Event::Failed {
                id: Some(8),
                message,
            } => break message,
            Event::FolderFinished(report) => panic!("{report:?}"),
            _ => {}
        }
    };
    assert!(message.contains("is the input folder"), "{message}");
}
