//! `instruct-pix2pix edit`: one image (or a folder of them, see [`super::edit_folder`]), one
//! instruction, one or more results on disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use clap::Args;
use image::RgbImage;

use super::load::{ModelFlags, load_model};
use super::progress::Progress;
use crate::model::device::{DTypeChoice, DeviceChoice};
use crate::model::hub::DEFAULT_REPO;
use crate::model::lora::LoraChoice;
use crate::pipeline::EditPipeline;
use crate::pipeline::folder::{FolderPlan, recorded_settings};
use crate::pipeline::image::{edit_size, load_image, resize_lanczos, save_image, writes_format};
use crate::pipeline::metadata::EditRecord;
use crate::pipeline::npy::{NpyArray, read_f32_npy};
use crate::pipeline::scheduler::SchedulerKind;
use crate::pipeline::settings::{
    DEFAULT_GUIDANCE_SCALE, DEFAULT_IMAGE_GUIDANCE_SCALE, DEFAULT_MAX_SIDE, DEFAULT_STEPS,
    EditSettings, InitialLatents, MAX_NUM_IMAGES, MAX_STEPS, check_guidance,
};

#[derive(Debug, Args)]
pub struct EditArgs {
    /// The image to edit (PNG, JPEG, WebP, BMP or TIFF), or a folder: every image in it is
    /// edited into the --output folder.
    #[arg(long, value_name = "PATH|DIR")]
    pub image: PathBuf,
    /// The written instruction, e.g. "make the mountains snowy".
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// What the result should not look like.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub negative_prompt: String,
    /// Where to write the result: .png (with the settings embedded), .jpg/.jpeg or .webp; with a
    /// folder as --image, a folder (created when missing, not the input folder) that receives
    /// NAME.png for every input NAME.ext; results already there are not made again.
    #[arg(long, short, value_name = "PATH|DIR")]
    pub output: PathBuf,
    /// A folder in diffusers' layout, a Hugging Face Hub repo id, or a single-file checkpoint
    /// (.safetensors or .ckpt in the original LDM layout).
    #[arg(long, value_name = "DIR|REPO_ID|FILE", default_value = DEFAULT_REPO)]
    pub model: String,
    /// For a single-file --model: the folder or Hub repo its tokenizer and scheduler config come
    /// from (only their config files are downloaded). Default: timbrooks/instruct-pix2pix.
    #[arg(long, value_name = "DIR|REPO_ID")]
    pub config: Option<String>,
    /// A LoRA file (diffusers/peft or kohya format) fused into the model at SCALE (default 1).
    /// Repeatable. Range of SCALE: -100 to 100.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<LoraChoice>,
    /// Hub revision (branch, tag or commit) of the model.
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Denoising steps. Range: 1 to 1000.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STEPS, value_parser = parse_steps, allow_negative_numbers = true)]
    pub steps: usize,
    /// How strongly to follow the instruction (text guidance). Range: 0 to 100.
    #[arg(long, value_name = "F", default_value_t = DEFAULT_GUIDANCE_SCALE, value_parser = parse_scale, allow_negative_numbers = true)]
    pub guidance_scale: f64,
    /// How closely to stay with the input image (image guidance). Range: 0 to 100.
    #[arg(long, value_name = "F", default_value_t = DEFAULT_IMAGE_GUIDANCE_SCALE, value_parser = parse_scale, allow_negative_numbers = true)]
    pub image_guidance_scale: f64,
    /// Random seed (torch-compatible: the same seed gives diffusers' result); random when absent.
    /// Range: 0 to 18446744073709551615.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Scheduler to use instead of the model's own.
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<SchedulerKind>,
    /// The long side is scaled down to at most this many pixels (never up). Range: 8 to 8192.
    #[arg(long, value_name = "PX", default_value_t = DEFAULT_MAX_SIDE, value_parser = clap::value_parser!(u32).range(8..=8192))]
    pub resolution: u32,
    /// How many images to make from the seed, as diffusers' num_images_per_prompt (one random
    /// draw for the whole batch): out-1.png, out-2.png, … Range: 1 to 1000.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=MAX_NUM_IMAGES as i64))]
    pub num_images: u32,
    /// A float32 .npy array [N, 4, H/f, W/f] (N = --num-images) used instead of the random
    /// initial latents (diffusers' `latents=`).
    #[arg(long, value_name = "FILE.npy")]
    pub latents: Option<PathBuf>,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, value_name = "DEVICE", default_value_t = DeviceChoice::default())]
    pub device: DeviceChoice,
    /// auto (the default: bf16 on a CPU with avx512_bf16 for a large model whose bf16 probe
    /// stays close to f32, else f32), f32, f16 (picks the model's fp16 weights when it has them)
    /// or bf16 (on a CPU without avx512_bf16: f32, with a notice).
    #[arg(long, value_name = "DTYPE", default_value_t = DTypeChoice::default())]
    pub dtype: DTypeChoice,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_lora(text: &str) -> Result<LoraChoice, String> {
    text.parse()
}

fn parse_steps(text: &str) -> Result<usize, String> {
    let steps: i64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number"))?;
    // Parsed as a signed number so `-5` is called out of range rather than not a number.
    let max = MAX_STEPS as i64;
    if !(1..=max).contains(&steps) {
        return Err(format!("must be between 1 and {max}, got {steps}"));
    }
    Ok(steps as usize)
}

fn parse_scale(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number"))?;
    // The flag names itself in clap's message; the limits are the pipeline's own.
    check_guidance("guidance scale", value).map_err(|e| format!("{}, got {text}", e.reason))
}

pub fn run(args: EditArgs) -> Result<()> {
    // What is read and written is checked before the model loads.
    let work = if args.image.is_dir() {
        if args.latents.is_some() {
            bail!(
                "--latents fixes the noise of one image size, so it cannot be used with a folder \
                 (--image {})",
                args.image.display()
            );
        }
        let plan = super::edit_folder::plan(&args)?;
        if plan.todo.is_empty() {
            super::edit_folder::nothing_to_do(&plan);
            return Ok(());
        }
        Work::Folder(plan)
    } else {
        let outputs = output_paths(&args.output, args.num_images)?;
        check_output_folder(&args.output)?;
        let initial_latents = args
            .latents
            .as_deref()
            .map(|path| read_latents(path, args.num_images))
            .transpose()?;
        let input = load_image(&args.image)?;
        Work::One {
            input,
            outputs,
            initial_latents,
        }
    };

    let mut progress = Progress::new(args.quiet);
    let flags = ModelFlags {
        model: &args.model,
        revision: args.revision.as_deref(),
        device: args.device,
        dtype: args.dtype,
        config: args.config.as_deref(),
        loras: &args.loras,
    };
    let model = load_model(&flags, &mut progress)?;
    let dtype = model.precision_label().to_string();
    let truncated = model.tokenizer.truncated_tokens(&args.prompt);
    if truncated > 0 && !args.quiet {
        eprintln!(
            "warning: the prompt is longer than the text encoder reads: its last {truncated} tokens are ignored"
        );
    }
    let mut pipeline = EditPipeline::new(model)?;

    // A folder run that continues takes the seed of the results already there.
    let recorded = match &work {
        Work::Folder(plan) => recorded_settings(plan),
        Work::One { .. } => None,
    };
    let seed = args
        .seed
        .or(recorded.as_ref().map(|record| record.seed))
        .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    if args.seed.is_none() && !args.quiet {
        if recorded.is_some() {
            eprintln!(
                "seed {seed}, that of the results already in {} (pass --seed to choose another)",
                args.output.display()
            );
        } else {
            eprintln!("seed {seed} (pass --seed {seed} to make this result again)");
        }
    }
    let settings = EditSettings {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        image_guidance_scale: args.image_guidance_scale,
        seed,
        scheduler: args.scheduler,
        initial_latents: None,
    };
    match work {
        Work::Folder(plan) => {
            if let Some(record) = &recorded {
                super::edit_folder::warn_if_different(&args, &plan, record, &settings);
            }
            super::edit_folder::run(&args, &mut pipeline, &plan, &settings, &dtype, &progress)
        }
        Work::One {
            input,
            outputs,
            initial_latents,
        } => {
            let settings = EditSettings {
                initial_latents,
                ..settings
            };
            edit_one_image(
                &args,
                &mut pipeline,
                &input,
                &outputs,
                &settings,
                &dtype,
                &progress,
            )
        }
    }
}

/// What one `edit` command does.
enum Work {
    /// `--image FILE`: one input, `--num-images` outputs.
    One {
        input: RgbImage,
        outputs: Vec<PathBuf>,
        initial_latents: Option<InitialLatents>,
    },
    /// `--image DIR --output DIR`.
    Folder(FolderPlan),
}

/// Makes the `--num-images` images of one input from one seed, as diffusers'
/// `num_images_per_prompt`, and writes them all or none.
fn edit_one_image(
    args: &EditArgs,
    pipeline: &mut EditPipeline,
    input: &RgbImage,
    outputs: &[PathBuf],
    settings: &EditSettings,
    dtype: &str,
    progress: &Progress,
) -> Result<()> {
    let multiple = pipeline.size_multiple();
    let (width, height) = edit_size(input.width(), input.height(), args.resolution, multiple)
        .with_context(|| format!("{}", args.image.display()))?;
    let input = resize_lanczos(input, width, height);
    let count = outputs.len();
    let label = if count > 1 {
        format!("{count} images")
    } else {
        "editing".to_string()
    };
    let bar = progress.steps(args.steps, &label);
    let cancel = AtomicBool::new(false);
    let result = pipeline.edit_batch(
        &input,
        settings,
        count,
        &mut |step| bar.set_position(step.step as u64),
        &cancel,
    );
    bar.finish_and_clear();
    let result = result?;
    let record = EditRecord::new(&args.model, settings, width, height, dtype);
    // All or nothing: a failed write removes the images this run wrote before it.
    let mut written: Vec<&Path> = Vec::with_capacity(count);
    for (index, (output, image)) in outputs.iter().zip(&result.images).enumerate() {
        let record = record.clone().for_image(index, count);
        if let Err(error) = save_image(output, image, &record.to_text_chunks()) {
            for path in &written {
                let _ = std::fs::remove_file(path);
            }
            let kept = if written.is_empty() {
                String::new()
            } else {
                format!(" (the {} written before it removed)", written.len())
            };
            return Err(anyhow::Error::new(error).context(format!("no image kept{kept}")));
        }
        written.push(output);
    }
    for (index, output) in outputs.iter().enumerate() {
        let hint = record.clone().for_image(index, count).reproduce_hint();
        println!(
            "wrote {} ({}×{}, {hint}, {:.1} s)",
            output.display(),
            width,
            height,
            result.total_time.as_secs_f64()
        );
    }
    Ok(())
}

/// `out.png` for one image; `out-1.png`, `out-2.png`, … for several.
fn output_paths(output: &Path, count: u32) -> Result<Vec<PathBuf>> {
    let extension = output
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if !writes_format(output) {
        bail!(
            "{}: unsupported output format: use a .png, .jpg, .jpeg or .webp file name",
            output.display()
        );
    }
    if count == 1 {
        return Ok(vec![output.to_path_buf()]);
    }
    let stem = output
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("edit");
    let paths: Vec<PathBuf> = (1..=count)
        .map(|i| output.with_file_name(format!("{stem}-{i}.{extension}")))
        .collect();
    if let Some(folder) = paths.iter().find(|p| p.is_dir()) {
        bail!(
            "{}: is a folder, so image {} of {count} could not be written; nothing was edited",
            folder.display(),
            paths.iter().position(|p| p == folder).unwrap_or(0) + 1
        );
    }
    Ok(paths)
}

/// Fails before any model work if the output folder is missing or not writable.
fn check_output_folder(output: &Path) -> Result<()> {
    let folder = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !folder.is_dir() {
        bail!(
            "{}: the output folder {} does not exist",
            output.display(),
            folder.display()
        );
    }
    tempfile::Builder::new()
        .prefix(".instruct-pix2pix-probe")
        .tempfile_in(&folder)
        .map(drop)
        .with_context(|| {
            format!(
                "{}: cannot write to the folder {}",
                output.display(),
                folder.display()
            )
        })
}

/// Reads a float32 .npy latents file (sizes checked against the file before allocating): one
/// [C, h, w] block per image, `[num_images, C, h, w]`.
fn read_latents(path: &Path, num_images: u32) -> Result<InitialLatents> {
    let NpyArray { shape, values } = read_f32_npy(path).context("--latents")?;
    if shape.len() != 4 || shape[0] != num_images as usize {
        bail!(
            "--latents {}: latents must have shape [{num_images}, C, h, w] (the first number is \
             --num-images), this array has {shape:?}",
            path.display()
        );
    }
    Ok(InitialLatents { shape, values })
}
