//! `instruct-pix2pix edit --image DIR --output DIR`: the instruction and settings applied to every
//! image of a folder ([`crate::pipeline::folder`] says which files, how outputs are named, what
//! is skipped). A progress bar with the time left; Ctrl+C stops after the current step and keeps
//! what is written, so the same command continues; files that cannot be edited are listed at
//! the end and make the exit status non-zero.

use std::path::Path;

use anyhow::{Result, anyhow, bail};
use indicatif::ProgressBar;

use super::edit::EditArgs;
use super::progress::Progress;
use super::sigint;
use crate::pipeline::EditPipeline;
use crate::pipeline::folder::{
    FolderPlan, FolderRequest, FolderStop, FolderUpdate, human_duration, plan_folder, run_folder,
    settings_differences,
};
use crate::pipeline::image::writes_format;
use crate::pipeline::metadata::EditRecord;
use crate::pipeline::settings::EditSettings;

/// Checks the folders and lists the work, before the model loads.
pub fn plan(args: &EditArgs) -> Result<FolderPlan> {
    if !args.output.exists() && writes_format(&args.output) {
        bail!(
            "--output {}: with a folder as --image, --output is the folder the edited images go \
             to, not an image file",
            args.output.display()
        );
    }
    let plan = plan_folder(&args.image, &args.output, args.num_images as usize)?;
    if !args.quiet && !plan.todo.is_empty() {
        let mut line = format!(
            "{} {} to edit from {} into {}",
            plan.todo.len(),
            plural(plan.todo.len(), "image", "images"),
            plan.input_dir.display(),
            plan.output_dir.display()
        );
        if !plan.done.is_empty() {
            line.push_str(&format!(
                " ({} already there, not made again)",
                plan.done.len()
            ));
        }
        eprintln!("{line}");
        note_ignored(&plan);
    }
    Ok(plan)
}

/// Every input's results are in the output folder already.
pub fn nothing_to_do(plan: &FolderPlan) {
    println!(
        "all {} {} of {} are already in {}: nothing to do",
        plan.done.len(),
        plural(plan.done.len(), "image", "images"),
        plan.input_dir.display(),
        plan.output_dir.display()
    );
}

fn note_ignored(plan: &FolderPlan) {
    if !plan.ignored.is_empty() {
        eprintln!(
            "note: {} {} not an image by its name and {} ignored: {}",
            plan.ignored.len(),
            plural(plan.ignored.len(), "file is", "files are"),
            plural(plan.ignored.len(), "is", "are"),
            names(plan.ignored.iter().map(|p| p.as_path()))
        );
    }
    for path in &plan.incomplete {
        eprintln!(
            "note: {} is cut short (a PNG without its end): it is made again",
            path.display()
        );
    }
}

/// Says when the results already in the output folder were made with other settings: they are
/// kept as they are, so the folder would mix two edits.
pub fn warn_if_different(
    args: &EditArgs,
    plan: &FolderPlan,
    record: &EditRecord,
    settings: &EditSettings,
) {
    let differences = settings_differences(record, settings, plan.num_images);
    if !differences.is_empty() && !args.quiet {
        eprintln!(
            "warning: the {} {} already in {} {} made with other settings ({}); {} kept as \
             {} {}: remove {}, or choose another output folder, to have every image made alike",
            plan.done.len(),
            plural(plan.done.len(), "result", "results"),
            plan.output_dir.display(),
            plural(plan.done.len(), "was", "were"),
            differences.join(", "),
            plural(plan.done.len(), "it is", "they are"),
            plural(plan.done.len(), "it", "they"),
            plural(plan.done.len(), "is", "are"),
            plural(plan.done.len(), "it", "them"),
        );
    }
}

/// Edits the folder with the loaded model and reports: Ok only when every input was edited or
/// already done.
pub fn run(
    args: &EditArgs,
    pipeline: &mut EditPipeline,
    plan: &FolderPlan,
    settings: &EditSettings,
    dtype: &str,
    progress: &Progress,
) -> Result<()> {
    let interrupted = sigint::install();
    let steps = settings.steps;
    let total = plan.todo.len();
    let bar = progress.folder(total * steps);
    let say = |bar: &ProgressBar, line: String, error: bool| {
        bar.suspend(|| {
            if error {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        })
    };
    let request = FolderRequest {
        settings,
        max_side: args.resolution,
        model: &args.model,
        dtype,
    };
    let hint = if plan.num_images > 1 {
        format!("seed {}, {} images each", settings.seed, plan.num_images)
    } else {
        format!("seed {}", settings.seed)
    };
    let summary = run_folder(
        pipeline,
        plan,
        &request,
        &mut |update| match update {
            FolderUpdate::Progress(p) => {
                bar.set_position((p.files_done * p.steps + p.step) as u64);
                let left = p.eta.map_or_else(
                    || "time left: measuring".into(),
                    |eta| format!("{} left", human_duration(eta)),
                );
                bar.set_message(format!(
                    "{}/{} · {} · step {}/{} · {left}",
                    p.files_done + 1,
                    p.files_total,
                    file_name(&p.current),
                    p.step,
                    p.steps
                ));
            }
            FolderUpdate::Written {
                outputs,
                width,
                height,
                ..
            } => {
                for output in outputs {
                    say(
                        &bar,
                        format!("wrote {} ({width}×{height}, {hint})", output.display()),
                        false,
                    );
                }
            }
            FolderUpdate::Failed { reason, .. } => {
                say(&bar, format!("skipped: {reason}"), true);
            }
        },
        interrupted,
    );
    bar.finish_and_clear();

    let mut line = format!(
        "edited {} of {} {} into {} in {}",
        summary.edited,
        total,
        plural(total, "image", "images"),
        plan.output_dir.display(),
        human_duration(summary.elapsed)
    );
    if summary.already_done > 0 {
        line.push_str(&format!(" ({} already there)", summary.already_done));
    }
    if summary.edited > 0 {
        line.push_str(&format!(
            "; the instruction was encoded {}",
            match summary.prompt_encodings {
                1 => "once".to_string(),
                n => format!("{n} times"),
            }
        ));
    }
    println!("{line}");
    if !summary.failed.is_empty() {
        eprintln!(
            "{} {} could not be edited and {} skipped:",
            summary.failed.len(),
            plural(summary.failed.len(), "file", "files"),
            plural(summary.failed.len(), "was", "were")
        );
        for failed in &summary.failed {
            eprintln!("  {}", failed.reason);
        }
    }
    match summary.stopped {
        Some(FolderStop::Cancelled) => Err(anyhow!(
            "stopped by Ctrl+C with {} of {total} left; the finished images are kept: run the \
             same command again to continue",
            summary.not_reached
        )),
        Some(FolderStop::Error(error)) => Err(anyhow::Error::new(error).context(format!(
            "stopped with {} of {total} left",
            summary.not_reached
        ))),
        None if !summary.failed.is_empty() => Err(anyhow!(
            "{} of {total} {} could not be edited (listed above: {})",
            summary.failed.len(),
            plural(total, "image", "images"),
            names(summary.failed.iter().map(|f| f.input.as_path()))
        )),
        None => Ok(()),
    }
}

fn plural<'a>(count: usize, one: &'a str, many: &'a str) -> &'a str {
    if count == 1 { one } else { many }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// "a.png, b.txt" (the first ten, then "and N more").
fn names<'a>(paths: impl Iterator<Item = &'a Path>) -> String {
    let all: Vec<String> = paths.map(file_name).collect();
    let shown = all.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
    if all.len() > 10 {
        format!("{shown} and {} more", all.len() - 10)
    } else {
        shown
    }
}
