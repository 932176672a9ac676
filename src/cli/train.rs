//! `instruct-pix2pix train`: `train_instruct_pix2pix.py`'s flags under the same snake_case names
//! (plus kebab-case aliases and `--lora-rank`), validated into a [`TrainConfig`] and run by
//! [`crate::train::run::train`] with a progress bar. Flags that mean nothing here are accepted
//! with a one-line notice of what is done instead. Ctrl+C stops cleanly: a checkpoint of the last
//! step and the model so far are saved (a second Ctrl+C ends the process at once).
//! `--push_to_hub` is checked before training (a token the Hub accepts for writing, a repo id)
//! and, after a run that reached its end, uploads the model with
//! [`crate::model::hub::push_files`]; Ctrl+C stops that upload.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Arg, Args};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::progress::Progress;
use super::ranges::{
    MAX_ACCUMULATION, MAX_BATCH_SIZE, MAX_LORA_RANK, MAX_STEP_COUNT, MAX_VALIDATION_IMAGES,
    count_in, float_in,
};
use super::sigint;
use crate::model::device::{DeviceChoice, select_device};
use crate::model::hub::{
    HubSettings, ModelSpec, PushError, PushStage, UploadFile, Variant, check_push_access,
    check_push_repo_id, fetch_model, push_files,
};
use crate::pipeline::image::{decode_image, load_image};
use crate::train::checkpoint::{STATE_FILE, resolve_resume};
use crate::train::data::{
    CheckLevel, Columns, DEFAULT_EDIT_PROMPT_COLUMN, DEFAULT_EDITED_IMAGE_COLUMN,
    DEFAULT_ORIGINAL_IMAGE_COLUMN,
};
use crate::train::distributed::WorldConfig;
use crate::train::memory::{format_bytes, parse_bytes};
use crate::train::optim::AdamWConfig;
use crate::train::output::model_files;
use crate::train::run::{
    DataSource, MAX_RESOLUTION, MemoryCheck, MixedPrecision, RunError, TrainConfig, TrainControl,
    TrainEvent, ValidationConfig, train,
};
use crate::train::schedule::LrScheduleKind;

/// The environment variable that sets the memory the check assumes free (a share of a machine
/// others use too), instead of what the device reports.
pub const MEMORY_AVAILABLE_VAR: &str = "INSTRUCT_PIX2PIX_MEMORY_AVAILABLE";

/// The script's flags (same names and defaults), plus `--lora-rank`, `--skip_bad_examples`,
/// `--decode_check`, `--skip_memory_check` and `--quiet`. A flag given twice takes its last
/// value, as with argparse. Long flags are the fields' snake_case names; each also answers to its
/// kebab-case spelling ([`alias_other_spelling`]).
#[derive(Debug, Args)]
// As argparse: a flag given twice takes its last value.
#[command(
    args_override_self = true,
    rename_all = "snake_case",
    mut_args = alias_other_spelling
)]
pub struct TrainArgs {
    /// The base model: a folder in diffusers' layout or a Hub repo id (InstructPix2Pix, or plain
    /// Stable Diffusion whose conv_in grows to 8 channels).
    #[arg(long, value_name = "DIR|REPO_ID")]
    pub pretrained_model_name_or_path: String,
    /// Hub revision of the model.
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Weight variant of the model files (fp16).
    #[arg(long, value_name = "NAME")]
    pub variant: Option<String>,
    /// A dataset: a local folder (Parquet files, imagefolder or pairs) or a Hub dataset id
    /// (downloaded into the Hugging Face cache, e.g. fusing/instructpix2pix-1000-samples).
    #[arg(long, value_name = "DIR|ID")]
    pub dataset_name: Option<String>,
    /// A folder of training data: imagefolder (metadata.jsonl) or pairs (NAME.png,
    /// NAME_edited.png, NAME.txt).
    #[arg(long, value_name = "DIR")]
    pub train_data_dir: Option<PathBuf>,
    /// Column of the input images.
    #[arg(long, default_value = DEFAULT_ORIGINAL_IMAGE_COLUMN)]
    pub original_image_column: String,
    /// Column of the edit instructions.
    #[arg(long, default_value = DEFAULT_EDIT_PROMPT_COLUMN)]
    pub edit_prompt_column: String,
    /// Column of the edited images.
    #[arg(long, default_value = DEFAULT_EDITED_IMAGE_COLUMN)]
    pub edited_image_column: String,
    /// Train on the first N examples of a seeded shuffle. Range: 1 to 1000000000.
    #[arg(long, value_name = "N", value_parser = count_in(1, MAX_STEP_COUNT))]
    pub max_train_samples: Option<usize>,
    /// Checkpoints, logs, validation images and the final model go here.
    #[arg(long, value_name = "DIR", default_value = "instruct-pix2pix-model")]
    pub output_dir: PathBuf,
    /// Seed of every random draw (random and printed when absent; a resumed run takes its
    /// checkpoint's). Range: 0 to 18446744073709551615.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// Training images are resized to this square size. Range: 8 to 4096.
    #[arg(long, value_name = "PX", default_value_t = 256, value_parser = clap::value_parser!(u32).range(8..=i64::from(MAX_RESOLUTION)))]
    pub resolution: u32,
    /// Center crop (a no-op after the square resize, as in the script).
    #[arg(long)]
    pub center_crop: bool,
    /// Flip input and edited image together at random.
    #[arg(long)]
    pub random_flip: bool,
    /// Examples per micro-batch. Range: 1 to 1024.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = count_in(1, MAX_BATCH_SIZE))]
    pub train_batch_size: usize,
    /// Epochs (ignored when --max_train_steps is given). Range: 1 to 1000000000.
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=MAX_STEP_COUNT))]
    pub num_train_epochs: u64,
    /// Optimizer steps to train (overrides the epochs). Range: 1 to 1000000000.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_STEP_COUNT))]
    pub max_train_steps: Option<u64>,
    /// Micro-batches per optimizer step. Range: 1 to 10000.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = count_in(1, MAX_ACCUMULATION))]
    pub gradient_accumulation_steps: usize,
    /// Recompute the UNet's resnets and transformers in the backward pass instead of keeping
    /// their activations (less memory, one more forward pass of compute).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Encode every example (both flips with --random_flip) and instruction once before the
    /// first step and keep the result in memory: each step then skips the VAE and the text
    /// encoder, which are freed unless validation edits need them. Exact: the same losses and
    /// weights as without it.
    #[arg(long)]
    pub cache_latents: bool,
    /// The learning rate (after warm-up). Range: above 0, at most 1.
    #[arg(
        long,
        value_name = "F",
        default_value_t = crate::train::run::DEFAULT_LEARNING_RATE,
        allow_negative_numbers = true,
        value_parser = float_in(0.0, false, 1.0, true)
    )]
    pub learning_rate: f64,
    /// Multiply the learning rate by accumulation steps × batch size.
    #[arg(long)]
    pub scale_lr: bool,
    /// constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial.
    #[arg(long, value_name = "NAME", default_value = "constant")]
    pub lr_scheduler: String,
    /// Warm-up steps of the learning rate. Range: 0 to 1000000000.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=MAX_STEP_COUNT))]
    pub lr_warmup_steps: u64,
    /// Probability of dropping the text, the image or both conditionings (InstructPix2Pix used
    /// 0.05). Range: 0 to 1.
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = float_in(0.0, true, 1.0, true))]
    pub conditioning_dropout_prob: Option<f64>,
    /// Keep an exponential moving average of the weights and save it as the model.
    #[arg(long)]
    pub use_ema: bool,
    /// Not used: the EMA starts from the same weights as training.
    #[arg(long, value_name = "REV")]
    pub non_ema_revision: Option<String>,
    /// AdamW with block-wise 8-bit moments (bitsandbytes' AdamW8bit): 2 bytes of optimizer
    /// state per parameter instead of 8.
    #[arg(long)]
    pub use_8bit_adam: bool,
    /// Not used (an NVIDIA Ampere setting).
    #[arg(long)]
    pub allow_tf32: bool,
    /// Not used: examples are read on the training thread. Range: 0 to 1024.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = count_in(0, 1024))]
    pub dataloader_num_workers: usize,
    /// AdamW β1. Range: at least 0, below 1.
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.9,
        allow_negative_numbers = true,
        value_parser = float_in(0.0, true, 1.0, false)
    )]
    pub adam_beta1: f64,
    /// AdamW β2. Range: at least 0, below 1.
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.999,
        allow_negative_numbers = true,
        value_parser = float_in(0.0, true, 1.0, false)
    )]
    pub adam_beta2: f64,
    /// AdamW decoupled weight decay. Range: 0 to 1.
    #[arg(
        long,
        value_name = "F",
        default_value_t = 1e-2,
        allow_negative_numbers = true,
        value_parser = float_in(0.0, true, 1.0, true)
    )]
    pub adam_weight_decay: f64,
    /// AdamW ε. Range: above 0, at most 1.
    #[arg(
        long,
        value_name = "F",
        default_value_t = 1e-8,
        allow_negative_numbers = true,
        value_parser = float_in(0.0, false, 1.0, true)
    )]
    pub adam_epsilon: f64,
    /// Gradients are clipped to this total norm. Range: above 0, at most 1000000.
    #[arg(
        long,
        value_name = "F",
        default_value_t = 1.0,
        allow_negative_numbers = true,
        value_parser = float_in(0.0, false, 1e6, true)
    )]
    pub max_grad_norm: f64,
    /// After training ends, upload the model (the pipeline folder, or the LoRA file; not
    /// checkpoints, logs or validation images) to the Hub repo --hub_model_id in one commit,
    /// creating the repo if needed. The trained model stays in --output_dir either way.
    #[arg(long)]
    pub push_to_hub: bool,
    /// The Hub token for --push_to_hub (else HF_TOKEN, else the token file written by
    /// `huggingface-cli login`). Never printed.
    #[arg(long, value_name = "TOKEN")]
    pub hub_token: Option<String>,
    /// The repo for --push_to_hub: OWNER/NAME, or NAME under the token's user (default: the
    /// --output_dir folder's name under the token's user).
    #[arg(long, value_name = "ID")]
    pub hub_model_id: Option<String>,
    /// Not used: TensorBoard files go to OUTPUT_DIR/logs/instruct-pix2pix.
    #[arg(long, value_name = "DIR")]
    pub logging_dir: Option<PathBuf>,
    /// no, fp16 or bf16, on a GPU: the frozen VAE and text encoder in 16 bits, the UNet's passes
    /// in 16 bits over float32 master weights (fp16 with dynamic loss scaling); on the CPU
    /// training runs in float32 (fp16/bf16 get a notice).
    #[arg(long, value_name = "MODE")]
    pub mixed_precision: Option<String>,
    /// Where training runs: auto (a GPU when the build has one and it opens, else the CPU),
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, value_name = "DEVICE", default_value_t = DeviceChoice::default())]
    pub device: DeviceChoice,
    /// Start even when the estimated peak memory is more than the device has free (the check
    /// uses MemAvailable or the cgroup's limit on the CPU, the driver's free memory on a GPU, or
    /// INSTRUCT_PIX2PIX_MEMORY_AVAILABLE, e.g. 8GB, when set).
    #[arg(long)]
    pub skip_memory_check: bool,
    /// tensorboard (the default; also metrics.jsonl, always written), all, wandb, comet_ml or none.
    #[arg(long, value_name = "WHERE", default_value = "tensorboard")]
    pub report_to: String,
    /// Not used: a process's rank on its machine comes from the launcher's LOCAL_RANK variable.
    /// Range: -1 to 65535.
    #[arg(long, value_name = "N", default_value_t = -1, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(-1..=65535))]
    pub local_rank: i64,
    /// One process per GPU of this machine, summing gradients over NCCL (as `accelerate launch
    /// --multi_gpu`); needs a CUDA build.
    #[arg(long)]
    pub multi_gpu: bool,
    /// Processes over all machines (with --multi_gpu: GPUs × machines by default); on the CPU,
    /// `--num_processes N --device cpu` runs N CPU processes summing over TCP. Range: 1 to 1024.
    #[arg(long, value_name = "N", value_parser = count_in(1, crate::train::distributed::MAX_WORLD_SIZE as u64))]
    pub num_processes: Option<usize>,
    /// The GPUs of this machine to use with --multi_gpu: `all` or a list such as 0,1.
    #[arg(long, value_name = "IDS")]
    pub gpu_ids: Option<String>,
    /// Machines the run spans (each runs this command with its own --machine_rank). Range: 1
    /// to 1024.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = count_in(1, crate::train::distributed::MAX_WORLD_SIZE as u64))]
    pub num_machines: usize,
    /// This machine's number, 0 for the one rank 0 runs on. Range: 0 to 1023.
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = count_in(0, crate::train::distributed::MAX_WORLD_SIZE as u64 - 1))]
    pub machine_rank: usize,
    /// Address of machine 0, where the processes meet (127.0.0.1 on one machine).
    #[arg(long, value_name = "IP")]
    pub main_process_ip: Option<String>,
    /// Port on machine 0 where the processes meet (29500). Range: 1 to 65535.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub main_process_port: Option<u16>,
    /// Seconds a process waits for another before the run stops (a rank that died is noticed
    /// at once; one that hangs after this long). Range: 1 to 86400.
    #[arg(long, value_name = "SECONDS", default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub ddp_timeout: u64,
    /// Save a checkpoint every N optimizer steps. Range: 1 to 1000000000.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=MAX_STEP_COUNT))]
    pub checkpointing_steps: u64,
    /// Keep at most this many checkpoints (the oldest are removed). Range: 1 to 1000000000.
    #[arg(long, value_name = "N", value_parser = count_in(1, MAX_STEP_COUNT))]
    pub checkpoints_total_limit: Option<usize>,
    /// `latest` or a checkpoint folder (name under --output_dir, or a path) to continue from.
    #[arg(long, value_name = "latest|DIR")]
    pub resume_from_checkpoint: Option<String>,
    /// Not available (xformers is a CUDA library): attention runs in blocks on the CPU anyway.
    #[arg(long)]
    pub enable_xformers_memory_efficient_attention: bool,
    /// Instruction of the validation edits.
    #[arg(long, value_name = "TEXT")]
    pub validation_prompt: Option<String>,
    /// Image of the validation edits: an http(s) URL or a local file.
    #[arg(long, value_name = "URL|PATH")]
    pub val_image_url: Option<String>,
    /// Validation edits each time. Range: 1 to 100.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = count_in(1, MAX_VALIDATION_IMAGES))]
    pub num_validation_images: usize,
    /// Validate after every N epochs. Range: 1 to 1000000000.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=MAX_STEP_COUNT))]
    pub validation_epochs: u64,
    /// Train LoRA adapters of this rank on the attention projections instead of the whole UNet
    /// (saved as OUTPUT_DIR/pytorch_lora_weights.safetensors). Range: 1 to 1024.
    #[arg(long = "lora-rank", value_name = "N", value_parser = count_in(1, MAX_LORA_RANK))]
    pub lora_rank: Option<usize>,
    /// Train on the good examples when the dataset check finds bad ones (else refuse, or ask on
    /// a terminal).
    #[arg(long)]
    pub skip_bad_examples: bool,
    /// Decode every image in the dataset check (slower; by default headers are checked).
    #[arg(long)]
    pub decode_check: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Adds a long flag's other spelling as a hidden alias: `--learning-rate` for the script's
/// `--learning_rate`, `--lora_rank` for `--lora-rank`. `--help` shows the flag's own name.
fn alias_other_spelling(arg: Arg) -> Arg {
    let Some(long) = arg.get_long() else {
        return arg;
    };
    let other = if long.contains('_') {
        long.replace('_', "-")
    } else {
        long.replace('-', "_")
    };
    if other == long { arg } else { arg.alias(other) }
}

/// Set in the processes of a data-parallel run other than rank 0: they print only what is
/// their own (rank 0 speaks for the run).
static OTHER_RANK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This process's rank in a data-parallel run (0 otherwise).
static RANK: AtomicUsize = AtomicUsize::new(0);

fn other_rank() -> bool {
    OTHER_RANK.load(std::sync::atomic::Ordering::Relaxed)
}

/// Prints a one-line notice (rank 0 only).
fn notice(text: &str) {
    if !other_rank() {
        eprintln!("note: {text}");
    }
}

/// The notices for flags without meaning here; returns whether TensorBoard is wanted.
fn meaningless_flags(args: &TrainArgs) -> Result<bool> {
    if args.enable_xformers_memory_efficient_attention {
        notice(
            "--enable_xformers_memory_efficient_attention: xformers is a CUDA library; the CPU attention already runs without the full score matrix where no gradient is needed",
        );
    }
    if args.allow_tf32 {
        notice("--allow_tf32 has no effect here (an NVIDIA Ampere setting)");
    }
    if args.non_ema_revision.is_some() {
        notice("--non_ema_revision is not used: training and the EMA start from --revision");
    }
    if args.dataloader_num_workers > 0 {
        notice("--dataloader_num_workers: examples are read on the training thread");
    }
    if !args.push_to_hub && (args.hub_token.is_some() || args.hub_model_id.is_some()) {
        notice("--hub_token/--hub_model_id are used only with --push_to_hub: nothing is uploaded");
    }
    if args.logging_dir.is_some() {
        notice(&format!(
            "--logging_dir is not used: TensorBoard files go to {}",
            args.output_dir
                .join(crate::train::run::TENSORBOARD_DIR)
                .display()
        ));
    }
    if args.local_rank != -1 {
        notice("--local_rank is not used: each process reads LOCAL_RANK, which the launcher sets");
    }
    Ok(match args.report_to.as_str() {
        "tensorboard" => true,
        "all" => {
            notice(
                "--report_to all: TensorBoard and metrics.jsonl (wandb and comet_ml are not available)",
            );
            true
        }
        "none" => false,
        other @ ("wandb" | "comet_ml") => {
            notice(&format!(
                "--report_to {other} is not available: metrics go to metrics.jsonl only"
            ));
            false
        }
        other => bail!("--report_to {other}: must be tensorboard, all, wandb, comet_ml or none"),
    })
}

/// Reads `--val_image_url`: an http(s) URL is downloaded, anything else is a local file.
fn read_validation_image(spec: &str) -> Result<image::RgbImage> {
    if spec.starts_with("http://") || spec.starts_with("https://") {
        let mut response = ureq::get(spec)
            .call()
            .with_context(|| format!("--val_image_url {spec}: download failed"))?;
        let bytes = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .with_context(|| format!("--val_image_url {spec}: download failed"))?;
        Ok(decode_image(&bytes, spec)?)
    } else {
        Ok(load_image(Path::new(spec)).context("--val_image_url")?)
    }
}

/// The seed a resumed run without `--seed` takes: its checkpoint's.
fn checkpoint_seed(output_dir: &Path, resume: &str) -> Option<u64> {
    let dir = resolve_resume(output_dir, resume).ok()??;
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("seed")?
        .as_u64()
}

/// Builds the run's settings from the flags (the library validates the values).
fn config_from_args(
    args: &TrainArgs,
    model_dir: PathBuf,
    tensorboard: bool,
) -> Result<TrainConfig> {
    let data = match (&args.train_data_dir, &args.dataset_name) {
        (Some(dir), None) => DataSource::TrainDataDir(dir.clone()),
        (None, Some(name)) => DataSource::DatasetName {
            name: name.clone(),
            revision: None,
        },
        (Some(_), Some(_)) => bail!("give --dataset_name or --train_data_dir, not both"),
        (None, None) => {
            bail!("give the training data: --train_data_dir DIR or --dataset_name NAME")
        }
    };
    let seed = match args.seed {
        Some(seed) => seed,
        None => match args
            .resume_from_checkpoint
            .as_deref()
            .and_then(|r| checkpoint_seed(&args.output_dir, r))
        {
            Some(seed) => seed,
            None => {
                let seed = u64::from(rand::random::<u32>());
                notice(&format!(
                    "seed {seed} (pass --seed {seed} to repeat this run)"
                ));
                seed
            }
        },
    };
    let validation = match (&args.validation_prompt, &args.val_image_url) {
        (Some(prompt), Some(url)) => Some(ValidationConfig {
            prompt: prompt.clone(),
            image: read_validation_image(url)?,
            num_images: args.num_validation_images,
            every_epochs: args.validation_epochs,
        }),
        (Some(_), None) | (None, Some(_)) => {
            notice(
                "validation needs both --validation_prompt and --val_image_url; no validation edits",
            );
            None
        }
        (None, None) => None,
    };
    let lr_scheduler: LrScheduleKind = args
        .lr_scheduler
        .parse()
        .with_context(|| format!("--lr_scheduler {}", args.lr_scheduler))?;
    let variant = match args.variant.as_deref() {
        None => Variant::Default,
        Some("fp16") => Variant::Fp16,
        Some(other) => bail!("--variant {other}: the weight variants read are fp16 (or none)"),
    };
    let mixed_precision = match args.mixed_precision.as_deref() {
        None | Some("no") => MixedPrecision::No,
        Some("fp16") => MixedPrecision::Fp16,
        Some("bf16") => MixedPrecision::Bf16,
        Some(other) => bail!("--mixed_precision {other}: must be no, fp16 or bf16"),
    };
    let memory_check = if args.skip_memory_check {
        MemoryCheck::Skip
    } else {
        match std::env::var(MEMORY_AVAILABLE_VAR) {
            Ok(text) => MemoryCheck::Available(parse_bytes(&text).with_context(|| {
                format!("{MEMORY_AVAILABLE_VAR}={text}: give a size such as 8GB or 6000MB")
            })?),
            Err(_) => MemoryCheck::Device,
        }
    };
    let mut config = TrainConfig::new(model_dir, data, args.output_dir.clone());
    config.distributed = WorldConfig::from_env(Duration::from_secs(args.ddp_timeout))?;
    config.device = select_device(rank_device(args.device, config.distributed.as_ref()))?;
    config.variant = variant;
    config.mixed_precision = mixed_precision;
    config.memory_check = memory_check;
    config.columns = Columns {
        original_image: args.original_image_column.clone(),
        edit_prompt: args.edit_prompt_column.clone(),
        edited_image: args.edited_image_column.clone(),
    };
    config.max_train_samples = args.max_train_samples;
    config.seed = seed;
    config.resolution = args.resolution;
    config.center_crop = args.center_crop;
    config.random_flip = args.random_flip;
    config.train_batch_size = args.train_batch_size;
    config.num_train_epochs = args.num_train_epochs;
    config.max_train_steps = args.max_train_steps;
    config.gradient_accumulation_steps = args.gradient_accumulation_steps;
    config.learning_rate = args.learning_rate;
    config.scale_lr = args.scale_lr;
    config.lr_scheduler = lr_scheduler;
    config.lr_warmup_steps = args.lr_warmup_steps;
    config.conditioning_dropout_prob = args.conditioning_dropout_prob;
    config.use_ema = args.use_ema;
    config.adam = AdamWConfig {
        beta1: args.adam_beta1,
        beta2: args.adam_beta2,
        eps: args.adam_epsilon,
        weight_decay: args.adam_weight_decay,
    };
    config.max_grad_norm = args.max_grad_norm;
    config.use_8bit_adam = args.use_8bit_adam;
    config.gradient_checkpointing = args.gradient_checkpointing;
    config.cache_latents = args.cache_latents;
    config.checkpointing_steps = args.checkpointing_steps;
    config.checkpoints_total_limit = args.checkpoints_total_limit;
    config.resume_from_checkpoint = args.resume_from_checkpoint.clone();
    config.validation = validation;
    config.report_to_tensorboard = tensorboard;
    config.lora_rank = args.lora_rank;
    config.skip_bad_examples = args.skip_bad_examples;
    config.check_level = if args.decode_check {
        CheckLevel::Decode
    } else {
        CheckLevel::Headers
    };
    Ok(config)
}

/// Resolves the model argument to a local folder (downloading from the Hub when needed).
fn model_folder(args: &TrainArgs, progress: &mut Progress) -> Result<PathBuf> {
    let spec = ModelSpec::parse(
        &args.pretrained_model_name_or_path,
        args.revision.as_deref(),
    )
    .context("--pretrained_model_name_or_path")?;
    let variant = match args.variant.as_deref() {
        Some("fp16") => Variant::Fp16,
        _ => Variant::Default,
    };
    let folder = fetch_model(&spec, variant, &HubSettings::from_env(), &mut |update| {
        progress.on_download(update)
    });
    progress.finish_download();
    Ok(folder?)
}

fn human_seconds(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Where `--push_to_hub` goes, checked before training so that a run is not wasted on a push
/// that cannot start.
struct PushTarget {
    settings: HubSettings,
    /// `owner/name`, or `name` for the token's user.
    repo: String,
}

/// The push target of `--push_to_hub` (`None` without it): a token (the flag, HF_TOKEN or the
/// token file), a usable repo id, and not offline.
fn push_target(args: &TrainArgs) -> Result<Option<PushTarget>> {
    if !args.push_to_hub {
        return Ok(None);
    }
    let repo = match &args.hub_model_id {
        Some(id) => id.trim().to_string(),
        None => args
            .output_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| !n.is_empty())
            .with_context(|| {
                format!(
                    "--push_to_hub: --output_dir {} has no folder name to name the repo after; give --hub_model_id OWNER/NAME",
                    args.output_dir.display()
                )
            })?,
    };
    check_push_repo_id(&repo).map_err(|err| {
        let flag = if args.hub_model_id.is_some() {
            "--hub_model_id"
        } else {
            "--push_to_hub (the repo is named after --output_dir; give --hub_model_id OWNER/NAME)"
        };
        anyhow::anyhow!("{flag}: {err}")
    })?;
    let mut settings = HubSettings::from_env();
    if let Some(token) = args.hub_token.as_deref().map(str::trim) {
        if token.is_empty() {
            bail!("--hub_token is empty");
        }
        settings.token = Some(token.to_string());
    }
    if settings.token.is_none() {
        bail!("{}", PushError::NoToken { repo: repo.clone() });
    }
    if settings.offline {
        bail!("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded to {repo}");
    }
    // A token the Hub refuses, or a read-only one, is found now rather than after the training.
    let not_cancelled = std::sync::atomic::AtomicBool::new(false);
    let repo = match check_push_access(&settings, &repo, &not_cancelled) {
        Ok(full) => full,
        Err(PushError::Network { reason, .. }) => {
            notice(&format!(
                "--push_to_hub: the Hub cannot be reached now ({reason}); the upload to {repo} is tried when training ends"
            ));
            repo
        }
        Err(err) => bail!("{err}"),
    };
    Ok(Some(PushTarget { settings, repo }))
}

/// Uploads the trained `model` as `--push_to_hub` asks, with a progress bar; Ctrl+C (`cancel`)
/// stops it before the commit.
fn push_model(
    target: &PushTarget,
    model: &Path,
    quiet: bool,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<()> {
    let files: Vec<UploadFile> = model_files(model)?
        .into_iter()
        .map(|(path_in_repo, local)| UploadFile {
            path_in_repo,
            local,
        })
        .collect();
    let bar = ProgressBar::with_draw_target(
        Some(0),
        if quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:9} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let result = push_files(
        &target.settings,
        &target.repo,
        &files,
        "End of training",
        &mut |update| {
            bar.set_message(match update.stage {
                PushStage::Hashing => "hashing",
                PushStage::Uploading => "uploading",
            });
            bar.set_length(update.total);
            bar.set_position(update.done);
        },
        cancel,
    );
    bar.finish_and_clear();
    match result {
        Ok(outcome) => {
            println!(
                "pushed {} file{} to {}{}",
                outcome.files,
                if outcome.files == 1 { "" } else { "s" },
                outcome.url,
                outcome
                    .commit
                    .map(|c| format!(" (commit {c})"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        Err(err) => bail!("{err}; the trained model stays in {}", model.display()),
    }
}

/// The device of one process of a data-parallel run: the GPU the launcher gave it, else GPU
/// `LOCAL_RANK` (as torchrun's processes take), when the choice is a GPU (or auto in a CUDA
/// build); the choice itself otherwise.
fn rank_device(choice: DeviceChoice, world: Option<&WorldConfig>) -> DeviceChoice {
    let Some(world) = world else {
        return choice;
    };
    let ordinal = std::env::var(super::launch::CUDA_DEVICE_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(world.local_rank);
    match choice {
        DeviceChoice::Cuda(_) => DeviceChoice::Cuda(ordinal),
        DeviceChoice::Auto if crate::model::device::cuda_device_count() > ordinal => {
            DeviceChoice::Cuda(ordinal)
        }
        other => other,
    }
}

/// Runs `train` with the flags (or, with `--num_processes`/`--multi_gpu`, launches the processes
/// that do).
pub fn run(args: TrainArgs) -> Result<()> {
    if super::launch::wants_launch(&args) {
        return super::launch::launch(&args);
    }
    let rank = std::env::var(crate::train::distributed::RANK_VAR)
        .ok()
        .and_then(|r| r.trim().parse::<usize>().ok())
        .filter(|_| std::env::var_os(crate::train::distributed::WORLD_SIZE_VAR).is_some());
    if let Some(rank) = rank.filter(|&r| r > 0) {
        OTHER_RANK.store(true, Ordering::Relaxed);
        RANK.store(rank, Ordering::Relaxed);
    }
    let tensorboard = meaningless_flags(&args)?;
    let push = if other_rank() {
        None
    } else {
        push_target(&args)?
    };
    let quiet = args.quiet || other_rank();
    let mut progress = Progress::new(quiet);
    let model_dir = model_folder(&args, &mut progress)?;
    let mut config = config_from_args(&args, model_dir, tensorboard)?;
    config.validate()?;

    let control = TrainControl::new();
    let interrupted = sigint::install();
    let watcher_done = std::sync::atomic::AtomicBool::new(false);
    let outcome = std::thread::scope(|scope| {
        let control_ref = &control;
        let done_ref = &watcher_done;
        scope.spawn(move || {
            while !done_ref.load(std::sync::atomic::Ordering::SeqCst) {
                if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
                    if !other_rank() {
                        eprintln!("\nstopping: saving a checkpoint and the model so far (Ctrl+C again to quit at once)");
                    }
                    control_ref.request_stop();
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let result = run_with_prompt(&mut config, &control, quiet);
        watcher_done.store(true, std::sync::atomic::Ordering::SeqCst);
        result
    })?;
    if other_rank() {
        return Ok(());
    }
    match &outcome.model {
        Some(model) => println!(
            "{} after {} steps; model: {}",
            if outcome.stopped {
                "stopped"
            } else {
                "trained"
            },
            outcome.step,
            model.display()
        ),
        None => println!("stopped before the first step; nothing saved"),
    }
    if let Some(target) = &push {
        match &outcome.model {
            Some(model) if !outcome.stopped => push_model(target, model, args.quiet, interrupted)?,
            _ => notice(&format!(
                "--push_to_hub: the run was stopped before its end, so nothing was uploaded to {}",
                target.repo
            )),
        }
    }
    Ok(())
}

/// Trains, asking on a terminal whether to skip bad examples when the check finds some.
fn run_with_prompt(
    config: &mut TrainConfig,
    control: &TrainControl,
    quiet: bool,
) -> Result<crate::train::run::TrainOutcome> {
    loop {
        let mut bar: Option<ProgressBar> = None;
        let mut resumed = false;
        let result = train(config, control, &mut |event| {
            handle_event(event, &mut bar, &mut resumed, quiet);
        });
        if let Some(bar) = bar.take() {
            bar.finish_and_clear();
        }
        match result {
            Err(RunError::BadExamples { report })
                if !config.skip_bad_examples
                    && config.distributed.is_none()
                    && !report.good.is_empty()
                    && std::io::stdin().is_terminal()
                    && std::io::stderr().is_terminal() =>
            {
                eprint!(
                    "{} bad examples (listed above). Train on the {} good ones? [y/N] ",
                    report.problems.len(),
                    report.good.len()
                );
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if matches!(answer.trim(), "y" | "Y" | "yes") {
                    config.skip_bad_examples = true;
                    continue;
                }
                bail!(
                    "stopped: the dataset has bad examples ({})",
                    report.summary()
                );
            }
            other => return Ok(other?),
        }
    }
}

/// The warning for trained parameters that got no gradient in a run's first step, on one line
/// with a count and a few names; `None` when there is nothing unexpected. In a LoRA run that
/// starts from scratch every `lora_B` is zero, so every `lora_A` gets exactly zero gradient in
/// the first step (dL/dA = Bᵀ·…): expected, and not reported. A resumed run has trained `lora_B`s,
/// so there a `lora_A` without gradient is reported like any other parameter.
fn gradient_warning(missing: &[String], resumed: bool) -> Option<String> {
    const SHOWN: usize = 3;
    let unexpected: Vec<&str> = missing
        .iter()
        .map(String::as_str)
        .filter(|name| resumed || !name.ends_with("lora_A.weight"))
        .collect();
    if unexpected.is_empty() {
        return None;
    }
    let more = unexpected.len().saturating_sub(SHOWN);
    Some(format!(
        "warning: {} trained parameters got no gradient in the first step: {}{}",
        unexpected.len(),
        unexpected[..unexpected.len().min(SHOWN)].join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    ))
}

fn handle_event(event: TrainEvent, bar: &mut Option<ProgressBar>, resumed: &mut bool, quiet: bool) {
    if other_rank() {
        // Rank 0 reports the run; the others only what happened to them alone.
        if let TrainEvent::Notice(text) = event {
            eprintln!("note (rank {}): {text}", RANK.load(Ordering::Relaxed));
        }
        return;
    }
    let say = |bar: &Option<ProgressBar>, text: String| match bar {
        Some(bar) if !bar.is_hidden() => bar.println(text),
        _ => eprintln!("{text}"),
    };
    match event {
        TrainEvent::Notice(text) => say(bar, format!("note: {text}")),
        TrainEvent::DatasetChecked(report) => {
            eprintln!("dataset: {}", report.summary());
            for problem in &report.problems {
                eprintln!("  bad: {}: {}", problem.name, problem.reason);
            }
        }
        TrainEvent::CachingLatents { done, total } => {
            if done == 0 {
                let target = if quiet {
                    ProgressDrawTarget::hidden()
                } else {
                    ProgressDrawTarget::stderr()
                };
                let new_bar = ProgressBar::with_draw_target(Some(total as u64), target);
                new_bar.set_style(
                    ProgressStyle::with_template(
                        "[{bar:30}] {pos}/{len} examples: caching latents",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                *bar = Some(new_bar);
            } else if let Some(caching) = bar {
                caching.set_position(done as u64);
                if done == total {
                    caching.finish_and_clear();
                    *bar = None;
                }
            }
        }
        TrainEvent::Started(plan) => {
            *resumed = plan.resumed_from.is_some();
            eprintln!(
                "training {} parameters on {} examples on {}: {} steps ({} per epoch, {} epochs), learning rate {:e}{}",
                if plan.trainable_parameters > 0 {
                    plan.trainable_parameters.to_string()
                } else {
                    "no".into()
                },
                plan.examples,
                plan.device,
                plan.total_steps,
                plan.updates_per_epoch,
                plan.epochs,
                plan.learning_rate,
                match &plan.resumed_from {
                    Some(dir) => format!(
                        ", resuming from {} at step {}",
                        dir.display(),
                        plan.first_step
                    ),
                    None => String::new(),
                }
            );
            if plan.processes > 1 {
                eprintln!(
                    "{} processes summing gradients over {}: effective batch {} ({} per process × {} processes × {} accumulation steps)",
                    plan.processes,
                    plan.backend.unwrap_or("tcp"),
                    plan.effective_batch,
                    plan.per_process_batch,
                    plan.processes,
                    plan.accumulation_steps,
                );
            }
            eprintln!(
                "memory: estimated peak ~{}{}",
                format_bytes(plan.estimated_peak_bytes),
                plan.available_bytes
                    .map(|a| format!(", {} available", format_bytes(a)))
                    .unwrap_or_default()
            );
            let target = if quiet {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            };
            let new_bar = ProgressBar::with_draw_target(Some(plan.total_steps), target);
            new_bar.set_style(
                ProgressStyle::with_template("[{bar:30}] {pos}/{len} steps {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            new_bar.set_position(plan.first_step);
            *bar = Some(new_bar);
        }
        TrainEvent::Step(step) => {
            if let Some(warning) = step
                .params_without_gradient
                .as_deref()
                .and_then(|missing| gradient_warning(missing, *resumed))
            {
                say(bar, warning);
            }
            if let Some(bar) = bar {
                let memory = step
                    .rss_bytes
                    .map(|b| format!(", {:.1} GB", b as f64 / 1e9))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "loss {:.4}, lr {:.2e}, {:.2} s/step, {} left{memory}",
                    step.loss,
                    step.lr,
                    step.seconds_per_step,
                    human_seconds(step.eta_seconds)
                ));
                bar.set_position(step.step);
            }
        }
        TrainEvent::CheckpointSaved {
            step,
            path,
            removed,
        } => {
            let removed = if removed.is_empty() {
                String::new()
            } else {
                format!(
                    " (removed {})",
                    removed
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            say(
                bar,
                format!("step {step}: saved {}{removed}", path.display()),
            );
        }
        TrainEvent::Paused => say(bar, "paused".into()),
        TrainEvent::Resumed => say(bar, "resumed".into()),
        TrainEvent::Validation(v) => say(
            bar,
            format!(
                "step {}: validation edits of {:?}: {}",
                v.step,
                v.prompt,
                v.paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        TrainEvent::Finished(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::super::{Cli, Command};

    #[test]
    fn every_long_flag_answers_to_its_other_spelling() {
        let cli = Cli::command();
        let train = cli.find_subcommand("train").unwrap();
        let mut both_spellings = 0;
        for arg in train.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let aliases: Vec<&str> = arg.get_all_aliases().unwrap_or_default();
            if long.contains('_') {
                assert_eq!(aliases, [long.replace('_', "-")], "--{long}");
                both_spellings += 1;
            } else if long.contains('-') {
                assert_eq!(aliases, [long.replace('-', "_")], "--{long}");
                both_spellings += 1;
            } else {
                assert!(aliases.is_empty(), "--{long}: {aliases:?}");
            }
        }
        // The script's 47 snake_case flags with a second word, --lora-rank, this program's
        // --skip_memory_check and --cache_latents, and the 7 launcher flags accelerate names
        // (--multi_gpu, --num_processes, --gpu_ids, --num_machines, --machine_rank,
        // --main_process_ip, --main_process_port) with --ddp_timeout.
        assert_eq!(both_spellings, 58);
        assert!(
            train
                .get_arguments()
                .any(|arg| arg.get_long() == Some("enable_xformers_memory_efficient_attention"))
        );
    }

    /// Issue 16 item 10: a fresh LoRA run's zero `lora_A` gradients are expected and not
    /// reported; anything else is one line with a count, however many parameters.
    #[test]
    fn the_no_gradient_warning_is_quiet_when_expected_and_one_line_otherwise() {
        let lora_a: Vec<String> = (0..128)
            .map(|i| format!("down_blocks.{i}.attn1.to_q.lora_A.weight"))
            .collect();
        assert_eq!(super::gradient_warning(&lora_a, false), None);
        assert_eq!(super::gradient_warning(&[], true), None);
        let resumed = super::gradient_warning(&lora_a, true).unwrap();
        assert!(
            resumed.starts_with("warning: 128 trained parameters"),
            "{resumed}"
        );
        assert!(resumed.ends_with("and 125 more"), "{resumed}");
        assert!(!resumed.contains('\n') && resumed.len() < 300, "{resumed}");
        let mut full: Vec<String> = lora_a.clone();
        full.push("mid_block.attentions.0.norm.weight".to_string());
        let warning = super::gradient_warning(&full, false).unwrap();
        assert_eq!(
            warning,
            "warning: 1 trained parameters got no gradient in the first step: mid_block.attentions.0.norm.weight"
        );
    }

    #[test]
    fn kebab_and_snake_spellings_parse_alike() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(
                [
                    "instruct-pix2pix",
                    "train",
                    "--pretrained_model_name_or_path",
                    "m",
                ]
                .iter()
                .chain(args),
            )
            .unwrap();
            match cli.command {
                Some(Command::Train(args)) => args,
                other => panic!("not train: {other:?}"),
            }
        };
        let snake = parse(&["--learning_rate", "0.5", "--lora_rank", "4", "--use_ema"]);
        let kebab = parse(&["--learning-rate", "0.5", "--lora-rank", "4", "--use-ema"]);
        for args in [snake, kebab] {
            assert_eq!(args.learning_rate, 0.5);
            assert_eq!(args.lora_rank, Some(4));
            assert!(args.use_ema);
        }
    }
}
