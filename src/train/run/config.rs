//! The settings of a training run: [`TrainConfig`] (the script's flags by their meaning, with
//! the script's defaults from [`TrainConfig::new`]), where the examples come from
//! ([`DataSource`]), the validation edits ([`ValidationConfig`]), the accepted limits and
//! learning-rate presets, and [`TrainConfig::validate`], which refuses every nonsense value with
//! a message naming the flag.

use std::path::PathBuf;

use candle_core::Device;
use image::RgbImage;

use super::RunError;
use crate::model::weights::Variant;
use crate::train::data::{CheckLevel, Columns};
use crate::train::distributed::WorldConfig;
use crate::train::optim::AdamWConfig;
use crate::train::schedule::LrScheduleKind;

/// The largest resolution accepted (a typo guard; 1024² is already far beyond a CPU).
pub const MAX_RESOLUTION: u32 = 4096;
/// The script's own `--learning_rate` default: what the command line and [`TrainConfig`] start
/// from, so a run without the flag matches the script's.
pub const DEFAULT_LEARNING_RATE: f64 = 1e-4;
/// The learning rate of the script's documented example run (diffusers' InstructPix2Pix README:
/// `--learning_rate=5e-05`, with the 15000 steps, batch 4 and 4 accumulation steps that go with
/// it). The window's fine-tuning dialog presets that whole example recipe, so it takes this value
/// rather than [`DEFAULT_LEARNING_RATE`].
pub const RECOMMENDED_LEARNING_RATE: f64 = 5e-5;

/// Where the training examples come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// `--train_data_dir`: an imagefolder or a folder of pairs.
    TrainDataDir(PathBuf),
    /// `--dataset_name`: a local folder (Parquet, imagefolder, pairs) or a Hub dataset id
    /// (downloaded into the Hugging Face cache).
    DatasetName {
        /// The folder or `owner/name`.
        name: String,
        /// `--revision` of a Hub dataset (`main` when `None`).
        revision: Option<String>,
    },
}

/// `--mixed_precision`, on a GPU: the frozen VAE and text encoder stored and run in 16 bits, and
/// the UNet's forward and backward passes computed in 16 bits over float32 master weights and
/// optimizer state (a LoRA run keeps its frozen base in 16 bits), with dynamic loss scaling for
/// float16 ([`crate::train::loss_scale`]). On a CPU with avx512_bf16, bf16 holds the frozen
/// weights in bf16 (the text encoder, the VAE and a LoRA run's UNet base: half their memory)
/// with float32 activations, their products on the CPU's bf16 kernels (or widened to float32
/// where a gradient flows); the trained weights stay float32. Elsewhere on the CPU, float32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MixedPrecision {
    /// float32 throughout (`no`).
    #[default]
    No,
    /// float16, with loss scaling.
    Fp16,
    /// bfloat16.
    Bf16,
}

impl MixedPrecision {
    /// The flag's value: `no`, `fp16`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Fp16 => "fp16",
            MixedPrecision::Bf16 => "bf16",
        }
    }

    /// The dtype the frozen networks get, and the UNet computes in, on `device` (float32 on the
    /// CPU).
    pub fn frozen_dtype(self, device: &Device) -> candle_core::DType {
        match self {
            _ if device.is_cpu() => candle_core::DType::F32,
            MixedPrecision::No => candle_core::DType::F32,
            MixedPrecision::Fp16 => candle_core::DType::F16,
            MixedPrecision::Bf16 => candle_core::DType::BF16,
        }
    }

    /// Whether the frozen weights are held in bf16 on the CPU (see the type's doc): bf16 asked
    /// for on a CPU with avx512_bf16 (and `INSTRUCT_PIX2PIX_CPU_BF16` not `0`).
    pub fn cpu_bf16(self, device: &Device) -> bool {
        self == MixedPrecision::Bf16 && device.is_cpu() && crate::model::nn::cpu_bf16_enabled()
    }

    /// The one line a CPU run with this setting announces (`None` when there is nothing to say).
    pub fn cpu_notice(self, device: &Device, lora: bool) -> Option<String> {
        if !device.is_cpu() || self == MixedPrecision::No {
            return None;
        }
        if self == MixedPrecision::Fp16 {
            return Some(
                "--mixed_precision fp16: training on the CPU runs in float32 (bf16 holds the frozen weights in half there)"
                    .into(),
            );
        }
        if !self.cpu_bf16(device) {
            return Some(
                "--mixed_precision bf16: this CPU has no avx512_bf16 (or INSTRUCT_PIX2PIX_CPU_BF16=0): training runs in float32"
                    .into(),
            );
        }
        let held = if lora {
            "the text encoder, the VAE and the UNet's frozen base"
        } else {
            "the frozen text encoder and VAE"
        };
        Some(format!(
            "--mixed_precision bf16 on the CPU: {held} held in bf16 (avx512_bf16 products); the trained weights, gradients and optimizer state stay float32"
        ))
    }
}

/// How the run checks, before its first step, that its estimated peak memory fits
/// ([`crate::train::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryCheck {
    /// Against what the training device has free.
    #[default]
    Device,
    /// Against this many bytes (a share of a machine others use too).
    Available(u64),
    /// Not at all (`--skip_memory_check`).
    Skip,
}

/// The validation edits (`--validation_prompt`, `--val_image_url`, `--num_validation_images`,
/// `--validation_epochs`).
#[derive(Debug, Clone)]
pub struct ValidationConfig {
    /// The instruction.
    pub prompt: String,
    /// The image to edit (already read or downloaded).
    pub image: RgbImage,
    /// Edits per validation (`--num_validation_images`, 4).
    pub num_images: usize,
    /// Validate after every this many epochs (`--validation_epochs`, 1).
    pub every_epochs: u64,
}

/// Every setting of a training run, the script's flags by their meaning. Build it with
/// [`TrainConfig::new`] (the script's defaults) and set fields; [`train`](super::train)
/// validates it first.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// `--pretrained_model_name_or_path`, resolved to a local pipeline folder (diffusers'
    /// layout; an InstructPix2Pix model, or plain Stable Diffusion whose conv_in grows).
    pub pretrained_model: PathBuf,
    /// `--variant`.
    pub variant: Variant,
    /// `--train_data_dir` or `--dataset_name`.
    pub data: DataSource,
    /// `--original_image_column --edit_prompt_column --edited_image_column`.
    pub columns: Columns,
    /// `--max_train_samples`.
    pub max_train_samples: Option<usize>,
    /// `--output_dir` (checkpoints, logs, validation images and the final model).
    pub output_dir: PathBuf,
    /// `--seed` (every random draw of the run follows from it).
    pub seed: u64,
    /// `--resolution` (256).
    pub resolution: u32,
    /// `--center_crop`.
    pub center_crop: bool,
    /// `--random_flip`.
    pub random_flip: bool,
    /// `--train_batch_size` (16).
    pub train_batch_size: usize,
    /// `--num_train_epochs` (100).
    pub num_train_epochs: u64,
    /// `--max_train_steps` (overrides the epochs).
    pub max_train_steps: Option<u64>,
    /// `--gradient_accumulation_steps` (1).
    pub gradient_accumulation_steps: usize,
    /// `--learning_rate` (1e-4).
    pub learning_rate: f64,
    /// `--scale_lr`.
    pub scale_lr: bool,
    /// `--lr_scheduler` (constant).
    pub lr_scheduler: LrScheduleKind,
    /// `--lr_warmup_steps` (500).
    pub lr_warmup_steps: u64,
    /// `--conditioning_dropout_prob`.
    pub conditioning_dropout_prob: Option<f64>,
    /// `--use_ema`.
    pub use_ema: bool,
    /// `--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay`.
    pub adam: AdamWConfig,
    /// `--max_grad_norm` (1).
    pub max_grad_norm: f64,
    /// `--use_8bit_adam`: AdamW keeps block-wise 8-bit moments (bitsandbytes' `AdamW8bit`).
    pub use_8bit_adam: bool,
    /// `--gradient_checkpointing`: the UNet recomputes its blocks in backward instead of keeping
    /// their activations.
    pub gradient_checkpointing: bool,
    /// `--mixed_precision` (no).
    pub mixed_precision: MixedPrecision,
    /// `--cache_latents`: encode every example's images and prompt once and train from the cache.
    pub cache_latents: bool,
    /// Whether and against what the estimated peak memory is checked before step 1.
    pub memory_check: MemoryCheck,
    /// `--checkpointing_steps` (500).
    pub checkpointing_steps: u64,
    /// `--checkpoints_total_limit`.
    pub checkpoints_total_limit: Option<usize>,
    /// `--resume_from_checkpoint` (`latest` or a checkpoint folder or name).
    pub resume_from_checkpoint: Option<String>,
    /// The validation edits, when both a prompt and an image are given.
    pub validation: Option<ValidationConfig>,
    /// `--report_to tensorboard` (the script's default).
    pub report_to_tensorboard: bool,
    /// `--lora-rank`: train LoRA adapters of this rank instead of the whole UNet.
    pub lora_rank: Option<usize>,
    /// Train on the good examples when the check finds bad ones (else refuse).
    pub skip_bad_examples: bool,
    /// How thoroughly the dataset is checked before training.
    pub check_level: CheckLevel,
    /// Where training runs.
    pub device: Device,
    /// This process's place in a data-parallel run (`RANK`, `WORLD_SIZE`, ... set by a
    /// launcher), or `None` for a single process.
    pub distributed: Option<WorldConfig>,
}

impl TrainConfig {
    /// The script's defaults for a model, a dataset and an output folder.
    pub fn new(pretrained_model: PathBuf, data: DataSource, output_dir: PathBuf) -> Self {
        Self {
            pretrained_model,
            variant: Variant::Default,
            data,
            columns: Columns::default(),
            max_train_samples: None,
            output_dir,
            seed: 0,
            resolution: 256,
            center_crop: false,
            random_flip: false,
            train_batch_size: 16,
            num_train_epochs: 100,
            max_train_steps: None,
            gradient_accumulation_steps: 1,
            learning_rate: DEFAULT_LEARNING_RATE,
            scale_lr: false,
            lr_scheduler: LrScheduleKind::Constant,
            lr_warmup_steps: 500,
            conditioning_dropout_prob: None,
            use_ema: false,
            adam: AdamWConfig::default(),
            max_grad_norm: 1.0,
            use_8bit_adam: false,
            gradient_checkpointing: false,
            mixed_precision: MixedPrecision::No,
            cache_latents: false,
            memory_check: MemoryCheck::Device,
            checkpointing_steps: 500,
            checkpoints_total_limit: None,
            resume_from_checkpoint: None,
            validation: None,
            report_to_tensorboard: true,
            lora_rank: None,
            skip_bad_examples: false,
            check_level: CheckLevel::Headers,
            device: Device::Cpu,
            distributed: None,
        }
    }

    /// Refuses every value the run cannot use, naming the flag.
    pub fn validate(&self) -> Result<(), RunError> {
        fn bad(flag: &'static str, value: impl ToString, reason: &str) -> RunError {
            RunError::Setting {
                flag,
                value: value.to_string(),
                reason: reason.to_string(),
            }
        }
        fn above_zero(flag: &'static str, value: f64) -> Result<(), RunError> {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(bad(flag, value, "must be a number above 0"))
            }
        }
        if self.resolution < 8 || self.resolution > MAX_RESOLUTION {
            return Err(bad(
                "--resolution",
                self.resolution,
                &format!("must be between 8 and {MAX_RESOLUTION}"),
            ));
        }
        if self.train_batch_size == 0 {
            return Err(bad("--train_batch_size", 0, "must be at least 1"));
        }
        match self.max_train_steps {
            Some(0) => return Err(bad("--max_train_steps", 0, "must be at least 1")),
            None if self.num_train_epochs == 0 => {
                return Err(bad("--num_train_epochs", 0, "must be at least 1"));
            }
            _ => {}
        }
        if self.gradient_accumulation_steps == 0 {
            return Err(bad(
                "--gradient_accumulation_steps",
                0,
                "must be at least 1",
            ));
        }
        above_zero("--learning_rate", self.learning_rate)?;
        if let Some(p) = self.conditioning_dropout_prob
            && !(0.0..=1.0).contains(&p)
        {
            return Err(bad(
                "--conditioning_dropout_prob",
                p,
                "must be between 0 and 1",
            ));
        }
        for (flag, value) in [
            ("--adam_beta1", self.adam.beta1),
            ("--adam_beta2", self.adam.beta2),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(bad(flag, value, "must be at least 0 and below 1"));
            }
        }
        above_zero("--adam_epsilon", self.adam.eps)?;
        if !self.adam.weight_decay.is_finite() || self.adam.weight_decay < 0.0 {
            return Err(bad(
                "--adam_weight_decay",
                self.adam.weight_decay,
                "must be a number of at least 0",
            ));
        }
        above_zero("--max_grad_norm", self.max_grad_norm)?;
        if self.checkpointing_steps == 0 {
            return Err(bad("--checkpointing_steps", 0, "must be at least 1"));
        }
        if self.checkpoints_total_limit == Some(0) {
            return Err(bad("--checkpoints_total_limit", 0, "must be at least 1"));
        }
        if self.max_train_samples == Some(0) {
            return Err(bad("--max_train_samples", 0, "must be at least 1"));
        }
        if let Some(rank) = self.lora_rank
            && !(1..=crate::train::lora::MAX_LORA_RANK).contains(&rank)
        {
            return Err(bad(
                "--lora-rank",
                rank,
                &format!("must be 1 to {}", crate::train::lora::MAX_LORA_RANK),
            ));
        }
        if self.output_dir.as_os_str().is_empty() {
            return Err(bad("--output_dir", "\"\"", "must name a folder"));
        }
        if self.output_dir.is_file() {
            return Err(bad(
                "--output_dir",
                self.output_dir.display(),
                "is a file, not a folder",
            ));
        }
        if let (Ok(output), Ok(model)) = (
            self.output_dir.canonicalize(),
            self.pretrained_model.canonicalize(),
        ) && output == model
        {
            return Err(bad(
                "--output_dir",
                self.output_dir.display(),
                "is the base model's own folder: the trained model would overwrite it; choose another folder",
            ));
        }
        if let Some(v) = &self.validation {
            if v.num_images == 0 {
                return Err(bad("--num_validation_images", 0, "must be at least 1"));
            }
            if v.every_epochs == 0 {
                return Err(bad("--validation_epochs", 0, "must be at least 1"));
            }
            if v.image.width() == 0 || v.image.height() == 0 {
                return Err(bad("--val_image_url", "(empty image)", "has no pixels"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TrainConfig {
        TrainConfig::new(
            PathBuf::from("model"),
            DataSource::TrainDataDir(PathBuf::from("data")),
            PathBuf::from("out"),
        )
    }

    #[test]
    fn nonsense_values_name_their_flag() {
        type Change = Box<dyn Fn(&mut TrainConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("--resolution", Box::new(|c| c.resolution = 0)),
            ("--train_batch_size", Box::new(|c| c.train_batch_size = 0)),
            (
                "--max_train_steps",
                Box::new(|c| c.max_train_steps = Some(0)),
            ),
            ("--num_train_epochs", Box::new(|c| c.num_train_epochs = 0)),
            (
                "--gradient_accumulation_steps",
                Box::new(|c| c.gradient_accumulation_steps = 0),
            ),
            ("--lora-rank", Box::new(|c| c.lora_rank = Some(100_000))),
            ("--learning_rate", Box::new(|c| c.learning_rate = f64::NAN)),
            ("--learning_rate", Box::new(|c| c.learning_rate = -1.0)),
            (
                "--conditioning_dropout_prob",
                Box::new(|c| c.conditioning_dropout_prob = Some(1.5)),
            ),
            ("--adam_beta1", Box::new(|c| c.adam.beta1 = 1.0)),
            ("--adam_beta2", Box::new(|c| c.adam.beta2 = -0.1)),
            ("--adam_epsilon", Box::new(|c| c.adam.eps = 0.0)),
            (
                "--adam_weight_decay",
                Box::new(|c| c.adam.weight_decay = -1.0),
            ),
            ("--max_grad_norm", Box::new(|c| c.max_grad_norm = 0.0)),
            (
                "--checkpointing_steps",
                Box::new(|c| c.checkpointing_steps = 0),
            ),
            (
                "--checkpoints_total_limit",
                Box::new(|c| c.checkpoints_total_limit = Some(0)),
            ),
            ("--lora-rank", Box::new(|c| c.lora_rank = Some(0))),
        ];
        for (flag, change) in cases {
            let mut c = config();
            change(&mut c);
            let message = c.validate().unwrap_err().to_string();
            assert!(message.starts_with(flag), "{flag}: {message}");
        }
        assert!(config().validate().is_ok());
    }
}
