//! One instruction and one set of settings applied to every image of a folder (`edit --image DIR
//! --output DIR`, the window's "Apply to folder…").
//!
//! - Inputs: the regular files of the folder (not its subfolders) whose extension is one of
//!   [`INPUT_EXTENSIONS`], in name order; hidden files (`.name`) are passed over, other files are
//!   counted as ignored.
//! - Outputs: one PNG per input in the output folder, `NAME.png` for `NAME.jpg` (or `NAME-1.png`,
//!   `NAME-2.png`, … when each input makes several images). When two inputs share a name apart
//!   from the extension (`a.jpg`, `a.png`), both keep the extension in the name (`a-jpg.png`,
//!   `a-png.png`). Each PNG carries its settings ([`EditRecord`]).
//! - Inputs are never overwritten: the output folder may not be the input folder (the edits
//!   would be mixed with the originals, and the next run would take them as inputs).
//! - Outputs already present (complete PNG files) are not made again, so a second run continues
//!   where a stopped one ended. Every output is written atomically (temporary file, then
//!   rename): a run killed at any moment leaves complete files and at most a hidden
//!   `.tmp-*.part`, which a later run removes; a PNG cut short by some other writer is made
//!   again.
//! - A file that cannot be read or edited is skipped and reported ([`FolderSummary::failed`]);
//!   failing to write into the output folder stops the run ([`FolderStop::Error`]).
//! - [`recorded_settings`] reads what the results already there were made with, so a run that
//!   continues can take the same seed and say when its settings differ.
//! - The instruction is encoded once for the whole folder (the pipeline keeps its encoding while
//!   the prompts stay the same); [`FolderSummary::prompt_encodings`] counts it.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::edit::{EditError, EditPipeline};
use super::image::{
    INPUT_EXTENSIONS, ImageError, edit_size, load_image, read_png_text, resize_lanczos, save_image,
};
use super::metadata::EditRecord;
use super::settings::{EditSettings, check_num_images};

/// Temporary files older than this in the output folder are left over from a killed run (a
/// save takes well under a second) and are removed when a run starts.
const STALE_TEMPORARY_AGE: Duration = Duration::from_secs(10 * 60);

/// The name prefix and suffix of [`save_image`]'s temporary files.
const TEMPORARY_PREFIX: &str = ".tmp-";
const TEMPORARY_SUFFIX: &str = ".part";

/// Why a folder cannot be edited. Every message names the folder.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("input folder not found: {}", path.display())]
    InputNotFound { path: PathBuf },
    #[error("{} is not a folder", path.display())]
    InputNotAFolder { path: PathBuf },
    #[error("cannot list the folder {}: {source}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the folder {} holds no images to edit (files ending in .{})",
        path.display(),
        INPUT_EXTENSIONS.join(", .")
    )]
    NoImages { path: PathBuf },
    #[error(
        "the output {} is a file: give a folder for the edited images (it is created when missing)",
        path.display()
    )]
    OutputIsFile { path: PathBuf },
    #[error(
        "the output folder {} is the input folder: the edits would be mixed with the originals \
         (and taken as inputs by the next run); choose another output folder",
        path.display()
    )]
    SameFolder { path: PathBuf },
    #[error(
        "{} and {} would both be written to {}; rename one of them",
        first.display(),
        second.display(),
        output.display()
    )]
    NameClash {
        first: PathBuf,
        second: PathBuf,
        output: PathBuf,
    },
    #[error("cannot create the output folder {}: {source}", path.display())]
    CreateOutput {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing an edited image failed (disk full, permissions): the run stops.
    #[error(transparent)]
    Write(ImageError),
    /// A setting outside what an edit accepts (checked before any file).
    #[error("invalid {name} {value}: {reason}")]
    InvalidSetting {
        name: &'static str,
        value: String,
        reason: String,
    },
}

/// One input and where its results go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderItem {
    pub input: PathBuf,
    /// One path per image made from the input (`num_images` of them).
    pub outputs: Vec<PathBuf>,
}

/// What a folder run will do, found before any model work ([`plan_folder`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderPlan {
    pub input_dir: PathBuf,
    pub output_dir: PathBuf,
    /// Images made from each input.
    pub num_images: usize,
    /// Inputs to edit, in name order.
    pub todo: Vec<FolderItem>,
    /// Inputs whose outputs are all present already (made by an earlier run).
    pub done: Vec<FolderItem>,
    /// Files of the input folder that are not images by their extension.
    pub ignored: Vec<PathBuf>,
    /// Outputs present but not complete PNG files (cut short): their inputs are edited again.
    pub incomplete: Vec<PathBuf>,
}

/// Lists what editing `input_dir` into `output_dir` involves, changing nothing: every check
/// that needs no model (the input is a folder with images, the output is not a file nor the
/// input folder, no two inputs would share an output) runs here.
pub fn plan_folder(
    input_dir: &Path,
    output_dir: &Path,
    num_images: usize,
) -> Result<FolderPlan, FolderError> {
    check_num_images(num_images).map_err(|e| FolderError::InvalidSetting {
        name: e.name,
        value: e.value,
        reason: e.reason,
    })?;
    match std::fs::metadata(input_dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(FolderError::InputNotAFolder {
                path: input_dir.to_path_buf(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FolderError::InputNotFound {
                path: input_dir.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(FolderError::List {
                path: input_dir.to_path_buf(),
                source,
            });
        }
    }
    match std::fs::metadata(output_dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(FolderError::OutputIsFile {
                path: output_dir.to_path_buf(),
            });
        }
        Ok(_) if same_folder(input_dir, output_dir) => {
            return Err(FolderError::SameFolder {
                path: output_dir.to_path_buf(),
            });
        }
        _ => {}
    }

    let list_error = |source| FolderError::List {
        path: input_dir.to_path_buf(),
        source,
    };
    let mut inputs = Vec::new();
    let mut ignored = Vec::new();
    for entry in std::fs::read_dir(input_dir).map_err(list_error)? {
        let entry = entry.map_err(list_error)?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Through symbolic links; a dangling link is a file that cannot be read.
        if std::fs::metadata(&path).is_ok_and(|meta| meta.is_dir()) {
            continue;
        }
        if is_input_name(&path) {
            inputs.push(path);
        } else {
            ignored.push(path);
        }
    }
    if inputs.is_empty() {
        return Err(FolderError::NoImages {
            path: input_dir.to_path_buf(),
        });
    }
    inputs.sort();
    ignored.sort();

    let items = name_outputs(&inputs, output_dir, num_images)?;
    let mut plan = FolderPlan {
        input_dir: input_dir.to_path_buf(),
        output_dir: output_dir.to_path_buf(),
        num_images,
        todo: Vec::new(),
        done: Vec::new(),
        ignored,
        incomplete: Vec::new(),
    };
    for item in items {
        let mut complete = true;
        for output in &item.outputs {
            match output_state(output) {
                OutputState::Missing => complete = false,
                OutputState::Incomplete => {
                    complete = false;
                    plan.incomplete.push(output.clone());
                }
                OutputState::Complete => {}
            }
        }
        if complete {
            plan.done.push(item);
        } else {
            plan.todo.push(item);
        }
    }
    Ok(plan)
}

/// The settings recorded in the first result already in the output folder (None when there is
/// none, or it carries no record): what a stopped run was doing, so the next one can go on
/// alike.
pub fn recorded_settings(plan: &FolderPlan) -> Option<EditRecord> {
    plan.done
        .iter()
        .flat_map(|item| item.outputs.first())
        .find_map(|path| {
            read_png_text(path)
                .ok()
                .and_then(|chunks| EditRecord::from_text_chunks(&chunks))
        })
}

/// How `record` (a result already there) differs from what this run makes: "seed 5 → 7",
/// "steps 20 → 30"… Empty when it is the same edit.
pub fn settings_differences(
    record: &EditRecord,
    settings: &EditSettings,
    num_images: usize,
) -> Vec<String> {
    let mut differences = Vec::new();
    let mut differ = |name: &str, then: String, now: String| {
        if then != now {
            differences.push(format!("{name} {then} → {now}"));
        }
    };
    differ(
        "instruction",
        format!("{:?}", record.prompt),
        format!("{:?}", settings.prompt),
    );
    differ(
        "negative prompt",
        format!("{:?}", record.negative_prompt),
        format!("{:?}", settings.negative_prompt),
    );
    differ("seed", record.seed.to_string(), settings.seed.to_string());
    differ(
        "steps",
        record.steps.to_string(),
        settings.steps.to_string(),
    );
    differ(
        "text guidance",
        record.guidance_scale.to_string(),
        settings.guidance_scale.to_string(),
    );
    differ(
        "image guidance",
        record.image_guidance_scale.to_string(),
        settings.image_guidance_scale.to_string(),
    );
    let scheduler = |kind: Option<String>| kind.unwrap_or_else(|| "the model's".into());
    differ(
        "scheduler",
        scheduler(record.scheduler.clone()),
        scheduler(settings.scheduler.map(|k| k.to_string())),
    );
    differ(
        "images per input",
        record.num_images.to_string(),
        num_images.to_string(),
    );
    differences
}

/// Whether `path` names an image by its extension ([`INPUT_EXTENSIONS`], any letter case).
pub fn is_input_name(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| INPUT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The output paths of every input (see the module doc for the names).
fn name_outputs(
    inputs: &[PathBuf],
    output_dir: &Path,
    num_images: usize,
) -> Result<Vec<FolderItem>, FolderError> {
    let stem_key = |path: &Path| {
        path.file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .to_lowercase()
    };
    let mut items: Vec<FolderItem> = Vec::with_capacity(inputs.len());
    // Case-insensitive, as the output folder may be on a file system that is.
    let mut taken: std::collections::HashMap<String, PathBuf> = Default::default();
    for input in inputs {
        let shared = inputs
            .iter()
            .filter(|other| stem_key(other) == stem_key(input))
            .count()
            > 1;
        let mut base = OsString::from(input.file_stem().unwrap_or_default());
        if shared {
            base.push("-");
            base.push(input.extension().unwrap_or_default());
        }
        let outputs: Vec<PathBuf> = if num_images == 1 {
            let mut name = base.clone();
            name.push(".png");
            vec![output_dir.join(name)]
        } else {
            (1..=num_images)
                .map(|i| {
                    let mut name = base.clone();
                    name.push(format!("-{i}.png"));
                    output_dir.join(name)
                })
                .collect()
        };
        for output in &outputs {
            let key = output
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_lowercase();
            if let Some(first) = taken.insert(key, input.clone()) {
                return Err(FolderError::NameClash {
                    first,
                    second: input.clone(),
                    output: output.clone(),
                });
            }
        }
        items.push(FolderItem {
            input: input.clone(),
            outputs,
        });
    }
    Ok(items)
}

enum OutputState {
    Missing,
    /// Present but not a PNG that ends with its IEND chunk.
    Incomplete,
    Complete,
}

/// The last 12 bytes of every complete PNG: the empty IEND chunk and its CRC.
const PNG_END: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

fn output_state(path: &Path) -> OutputState {
    let Ok(meta) = std::fs::metadata(path) else {
        return OutputState::Missing;
    };
    if !meta.is_file() || meta.len() < (PNG_SIGNATURE.len() + PNG_END.len()) as u64 {
        return OutputState::Incomplete;
    }
    let ends_well = || -> std::io::Result<bool> {
        let mut file = std::fs::File::open(path)?;
        let mut start = [0u8; 8];
        file.read_exact(&mut start)?;
        file.seek(SeekFrom::End(-(PNG_END.len() as i64)))?;
        let mut end = [0u8; 12];
        file.read_exact(&mut end)?;
        Ok(start == PNG_SIGNATURE && end == PNG_END)
    };
    match ends_well() {
        Ok(true) => OutputState::Complete,
        _ => OutputState::Incomplete,
    }
}

/// How every image of the folder is edited.
#[derive(Debug, Clone)]
pub struct FolderRequest<'a> {
    pub settings: &'a EditSettings,
    /// The long side of an input is scaled down to at most this (as `--resolution`).
    pub max_side: u32,
    /// The model's name and precision, for each PNG's record.
    pub model: &'a str,
    pub dtype: &'a str,
}

/// Where a folder run is, given after every denoising step.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderProgress {
    /// Inputs finished (written or failed) by this run.
    pub files_done: usize,
    /// Inputs this run edits (those already done are not counted).
    pub files_total: usize,
    /// The input being edited.
    pub current: PathBuf,
    /// Denoising steps of the current input done, of `steps`.
    pub step: usize,
    pub steps: usize,
    /// Since the run started.
    pub elapsed: Duration,
    /// The time left at the pace so far (encodings, decoding and writing included); None
    /// before the first step.
    pub eta: Option<Duration>,
}

/// What a folder run tells as it goes.
#[derive(Debug)]
pub enum FolderUpdate<'a> {
    /// A step of the current input is done (step 0: it starts).
    Progress(&'a FolderProgress),
    /// An input's results are written.
    Written {
        input: &'a Path,
        outputs: &'a [PathBuf],
        width: u32,
        height: u32,
    },
    /// An input could not be read or edited and is skipped.
    Failed { input: &'a Path, reason: &'a str },
}

/// An input that was skipped, and why (one line naming the file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedFile {
    pub input: PathBuf,
    pub reason: String,
}

/// Why a folder run ended before its last input.
#[derive(Debug)]
pub enum FolderStop {
    /// `cancel` was set (Ctrl+C, the window's Cancel); the input being edited was not written.
    Cancelled,
    /// The output folder could not be created or written.
    Error(FolderError),
}

/// What a folder run did.
#[derive(Debug)]
pub struct FolderSummary {
    /// Inputs edited and written by this run.
    pub edited: usize,
    /// The files written.
    pub written: Vec<PathBuf>,
    /// Inputs whose outputs were already present ([`FolderPlan::done`]).
    pub already_done: usize,
    /// Inputs skipped because they could not be read or edited.
    pub failed: Vec<FailedFile>,
    /// Inputs not reached because the run stopped.
    pub not_reached: usize,
    pub stopped: Option<FolderStop>,
    /// How many times the instruction was encoded (1 for a whole folder).
    pub prompt_encodings: usize,
    pub elapsed: Duration,
}

impl FolderSummary {
    /// Every input of the plan was edited or was already done.
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && self.stopped.is_none()
    }
}

/// Edits every input of `plan` still to do with `request`'s settings, writing each result as
/// soon as it is made. Stops between steps when `cancel` is set. See the module doc.
pub fn run_folder(
    pipeline: &mut EditPipeline,
    plan: &FolderPlan,
    request: &FolderRequest<'_>,
    on_update: &mut dyn FnMut(FolderUpdate<'_>),
    cancel: &AtomicBool,
) -> FolderSummary {
    let started = Instant::now();
    let mut summary = FolderSummary {
        edited: 0,
        written: Vec::new(),
        already_done: plan.done.len(),
        failed: Vec::new(),
        not_reached: 0,
        stopped: None,
        prompt_encodings: 0,
        elapsed: Duration::ZERO,
    };
    if let Err(e) = request.settings.validate() {
        summary.stopped = Some(FolderStop::Error(FolderError::InvalidSetting {
            name: e.name,
            value: e.value,
            reason: e.reason,
        }));
        summary.not_reached = plan.todo.len();
        return summary;
    }
    if !plan.todo.is_empty()
        && let Err(source) = std::fs::create_dir_all(&plan.output_dir)
    {
        summary.stopped = Some(FolderStop::Error(FolderError::CreateOutput {
            path: plan.output_dir.clone(),
            source,
        }));
        summary.not_reached = plan.todo.len();
        return summary;
    }
    remove_stale_temporaries(&plan.output_dir);

    let total = plan.todo.len();
    let steps = request.settings.steps;
    for (index, item) in plan.todo.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            summary.stopped = Some(FolderStop::Cancelled);
            summary.not_reached = total - index;
            break;
        }
        let mut progress = FolderProgress {
            files_done: index,
            files_total: total,
            current: item.input.clone(),
            step: 0,
            steps,
            elapsed: started.elapsed(),
            eta: None,
        };
        progress.eta = eta(&progress);
        on_update(FolderUpdate::Progress(&progress));
        let outcome = edit_one(
            pipeline,
            item,
            request,
            plan.num_images,
            cancel,
            &mut |step| {
                progress.step = step;
                progress.elapsed = started.elapsed();
                progress.eta = eta(&progress);
                on_update(FolderUpdate::Progress(&progress));
            },
        );
        match outcome {
            Ok(made) => {
                if !made.reused_prompt {
                    summary.prompt_encodings += 1;
                }
                summary.edited += 1;
                summary.written.extend(item.outputs.iter().cloned());
                on_update(FolderUpdate::Written {
                    input: &item.input,
                    outputs: &item.outputs,
                    width: made.width,
                    height: made.height,
                });
            }
            Err(OneFailure::Cancelled) => {
                summary.stopped = Some(FolderStop::Cancelled);
                summary.not_reached = total - index;
                break;
            }
            Err(OneFailure::Write(error)) => {
                summary.stopped = Some(FolderStop::Error(FolderError::Write(error)));
                summary.not_reached = total - index;
                break;
            }
            Err(OneFailure::Input(reason)) => {
                on_update(FolderUpdate::Failed {
                    input: &item.input,
                    reason: &reason,
                });
                summary.failed.push(FailedFile {
                    input: item.input.clone(),
                    reason,
                });
            }
        }
    }
    summary.elapsed = started.elapsed();
    summary
}

/// Time left at the pace so far, counting in denoising steps.
fn eta(progress: &FolderProgress) -> Option<Duration> {
    let done = progress.files_done * progress.steps + progress.step;
    if done == 0 {
        return None;
    }
    let all = progress.files_total * progress.steps;
    let left = all.saturating_sub(done);
    Some(progress.elapsed.mul_f64(left as f64 / done as f64))
}

/// A duration for people: "45 s", "3 min 20 s", "1 h 05 min".
pub fn human_duration(duration: Duration) -> String {
    let seconds = duration.as_secs_f64().ceil() as u64;
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min {:02} s", seconds / 60, seconds % 60),
        _ => format!("{} h {:02} min", seconds / 3600, seconds % 3600 / 60),
    }
}

struct Made {
    width: u32,
    height: u32,
    reused_prompt: bool,
}

enum OneFailure {
    Cancelled,
    /// The input cannot be read or edited: skip it (one line naming the file).
    Input(String),
    /// The output folder refused a write: stop.
    Write(ImageError),
}

fn edit_one(
    pipeline: &mut EditPipeline,
    item: &FolderItem,
    request: &FolderRequest<'_>,
    num_images: usize,
    cancel: &AtomicBool,
    on_step: &mut dyn FnMut(usize),
) -> Result<Made, OneFailure> {
    let name = item.input.display();
    let image = load_image(&item.input).map_err(|e| OneFailure::Input(e.to_string()))?;
    let (width, height) = edit_size(
        image.width(),
        image.height(),
        request.max_side,
        pipeline.size_multiple(),
    )
    .map_err(|e| OneFailure::Input(format!("{name}: {e}")))?;
    let image = resize_lanczos(&image, width, height);
    let output = pipeline
        .edit_batch(
            &image,
            request.settings,
            num_images,
            &mut |info| on_step(info.step),
            cancel,
        )
        .map_err(|e| match e {
            EditError::Cancelled => OneFailure::Cancelled,
            other => OneFailure::Input(format!("{name}: {}", one_line(&other))),
        })?;
    let record = EditRecord::new(
        request.model,
        request.settings,
        width,
        height,
        request.dtype,
    );
    for (index, (path, result)) in item.outputs.iter().zip(&output.images).enumerate() {
        let record = record.clone().for_image(index, num_images);
        save_image(path, result, &record.to_text_chunks()).map_err(OneFailure::Write)?;
    }
    Ok(Made {
        width,
        height,
        reused_prompt: output.reused_prompt_embeddings,
    })
}

/// An error's message on one line (candle errors may carry several); the worker's messages
/// use it too.
pub(crate) fn one_line(error: &dyn std::error::Error) -> String {
    error
        .to_string()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Removes [`save_image`]'s temporary files left in `folder` by a killed run (older than
/// [`STALE_TEMPORARY_AGE`], so a save in progress elsewhere is left alone). Best effort.
fn remove_stale_temporaries(folder: &Path) {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(TEMPORARY_PREFIX) && name.ends_with(TEMPORARY_SUFFIX)) {
            continue;
        }
        let old = entry
            .metadata()
            .ok()
            .filter(|meta| meta.is_file())
            .and_then(|meta| meta.modified().ok())
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|age| age >= STALE_TEMPORARY_AGE);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
    }

    fn complete_png(path: &Path) {
        save_image(path, &image::RgbImage::new(2, 2), &[]).unwrap();
    }

    #[test]
    fn plans_names_skips_done_and_redoes_cut_files() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        let output = dir.path().join("out");
        std::fs::create_dir_all(input.join("sub")).unwrap();
        std::fs::create_dir_all(&output).unwrap();
        for name in [
            "b.JPG",
            "a.png",
            "a.jpg",
            "c.webp",
            "notes.txt",
            ".hidden.png",
        ] {
            touch(&input.join(name), b"x");
        }
        complete_png(&output.join("b.png"));
        touch(&output.join("c.png"), &PNG_SIGNATURE);

        let plan = plan_folder(&input, &output, 1).unwrap();
        let names = |items: &[FolderItem]| -> Vec<(String, Vec<String>)> {
            items
                .iter()
                .map(|item| {
                    let file = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
                    (file(&item.input), item.outputs.iter().map(file).collect())
                })
                .collect()
        };
        assert_eq!(
            names(&plan.todo),
            [
                ("a.jpg".into(), vec!["a-jpg.png".into()]),
                ("a.png".into(), vec!["a-png.png".into()]),
                ("c.webp".into(), vec!["c.png".into()]),
            ]
        );
        assert_eq!(names(&plan.done), [("b.JPG".into(), vec!["b.png".into()])]);
        assert_eq!(plan.ignored, [input.join("notes.txt")]);
        assert_eq!(plan.incomplete, [output.join("c.png")]);

        let plan = plan_folder(&input, &output, 2).unwrap();
        assert_eq!(
            plan.todo[3].outputs,
            [output.join("c-1.png"), output.join("c-2.png")]
        );
        assert_eq!(plan.todo.len(), 4, "b.JPG has neither b-1.png nor b-2.png");
    }

    #[test]
    fn refuses_what_would_lose_or_mix_files() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir_all(&input).unwrap();
        assert!(matches!(
            plan_folder(&input, &dir.path().join("out"), 1),
            Err(FolderError::NoImages { .. })
        ));
        touch(&input.join("a.png"), b"x");
        let file = dir.path().join("file.png");
        touch(&file, b"x");
        let error = plan_folder(&input, &file, 1).unwrap_err();
        assert!(matches!(error, FolderError::OutputIsFile { .. }), "{error}");
        assert!(error.to_string().contains("file.png"), "{error}");
        let error = plan_folder(&input, &input.join("."), 1).unwrap_err();
        assert!(matches!(error, FolderError::SameFolder { .. }), "{error}");
        assert!(matches!(
            plan_folder(&file, &input, 1),
            Err(FolderError::InputNotAFolder { .. })
        ));
        assert!(matches!(
            plan_folder(&dir.path().join("nope"), &input, 1),
            Err(FolderError::InputNotFound { .. })
        ));
        // `a.png` and `A.jpg` would share `a-…` only by letter case: kept apart by extension.
        touch(&input.join("A.jpg"), b"x");
        let plan = plan_folder(&input, &dir.path().join("out"), 1).unwrap();
        let outputs: Vec<_> = plan.todo.iter().flat_map(|i| i.outputs.clone()).collect();
        assert_eq!(outputs.len(), 2);
        assert_ne!(
            outputs[0].to_string_lossy().to_lowercase(),
            outputs[1].to_string_lossy().to_lowercase()
        );
    }

    #[test]
    fn the_results_already_there_tell_their_settings() {
        let dir = tempfile::tempdir().unwrap();
        let (input, output) = (dir.path().join("in"), dir.path().join("out"));
        std::fs::create_dir_all(&input).unwrap();
        std::fs::create_dir_all(&output).unwrap();
        touch(&input.join("a.png"), b"x");
        touch(&input.join("b.png"), b"x");
        let settings = EditSettings {
            prompt: "make it snowy".into(),
            seed: 5,
            ..EditSettings::default()
        };
        let plan = plan_folder(&input, &output, 1).unwrap();
        assert_eq!(recorded_settings(&plan), None);
        let record = EditRecord::new("m", &settings, 2, 2, "f32");
        save_image(
            &output.join("b.png"),
            &image::RgbImage::new(2, 2),
            &record.to_text_chunks(),
        )
        .unwrap();
        let plan = plan_folder(&input, &output, 1).unwrap();
        let found = recorded_settings(&plan).unwrap();
        assert_eq!(found, record);
        assert!(settings_differences(&found, &settings, 1).is_empty());
        let other = EditSettings {
            seed: 7,
            steps: 30,
            ..settings
        };
        assert_eq!(
            settings_differences(&found, &other, 2),
            ["seed 5 → 7", "steps 20 → 30", "images per input 1 → 2"]
        );
    }

    #[test]
    fn old_temporaries_go_and_fresh_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".tmp-abc.part");
        let fresh = dir.path().join(".tmp-def.part");
        let other = dir.path().join(".tmp-keep.txt");
        for path in [&old, &fresh, &other] {
            touch(path, b"half");
        }
        let past = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(past)
            .unwrap();
        remove_stale_temporaries(dir.path());
        assert!(!old.exists());
        assert!(fresh.exists() && other.exists());
    }

    #[test]
    fn the_time_left_follows_the_pace() {
        let mut progress = FolderProgress {
            files_done: 0,
            files_total: 4,
            current: PathBuf::from("a.png"),
            step: 0,
            steps: 10,
            elapsed: Duration::from_secs(1),
            eta: None,
        };
        assert_eq!(eta(&progress), None);
        progress.files_done = 1;
        progress.step = 0;
        progress.elapsed = Duration::from_secs(10);
        assert_eq!(eta(&progress), Some(Duration::from_secs(30)));
        assert_eq!(human_duration(Duration::from_millis(44_200)), "45 s");
        assert_eq!(human_duration(Duration::from_secs(200)), "3 min 20 s");
        assert_eq!(human_duration(Duration::from_secs(3900)), "1 h 05 min");
    }
}
