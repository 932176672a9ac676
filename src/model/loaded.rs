//! The one loader of a pipeline folder in diffusers' layout, for editing and for training:
//! [`PipelineFolder`] checks the component folders and reads the configs (checked against each
//! other before any weight is read), then builds the tokenizer, text encoder, VAE and UNet on one
//! device in one dtype, or hands training the UNet's weights as named tensors to make trainable.
//! [`InstructPix2PixModel`] is the whole model loaded for editing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::clip::{ClipConfigError, ClipTextConfig, ClipTextModel};
use super::config::{ConfigError, ModelIndex};
use super::cpu_precision::CpuPrecision;
use super::hub::{
    DownloadProgress, HubError, HubSettings, ModelSpec, Variant, fetch_configs_with_cancel,
    fetch_model_with_cancel,
};
use super::lora::{LoraChoice, LoraError, LoraWeights, ModelWeights, Network};
use super::nn;
use super::single_file::ldm::Shapes;
use super::single_file::{SingleFile, SingleFileError, Templates};
use super::tokenizer::{ClipTokenizer, TokenizerError};
use super::torch_file::TorchFile;
use super::unet::{PerBlock, UNet2DConditionModel, UNetConfig, UNetConfigError};
use super::vae::{AutoencoderKL, VaeConfig, VaeConfigError};
use super::weights::{
    DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, WeightFormat, WeightsError, component_weights,
    component_weights_detailed, safetensors_shapes, var_builder, weights_backend,
};

/// The UNet's input channels in InstructPix2Pix: 4 noisy latents and 4 latents of the input image.
pub const INSTRUCT_PIX2PIX_IN_CHANNELS: usize = 8;

/// The component folders every pipeline folder needs.
const COMPONENTS: [&str; 5] = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"];

/// Why a model could not be loaded; every message names the folder or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Hub(Box<HubError>),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    UNetConfig(#[from] UNetConfigError),
    #[error(transparent)]
    VaeConfig(#[from] VaeConfigError),
    #[error(transparent)]
    TextEncoderConfig(#[from] ClipConfigError),
    #[error(transparent)]
    SingleFile(Box<SingleFileError>),
    #[error(transparent)]
    Lora(Box<LoraError>),
    #[error(
        "{folder}: missing the `{component}` component folder (a diffusers pipeline needs {component}/)"
    )]
    MissingComponent {
        folder: PathBuf,
        component: &'static str,
    },
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    /// `folder` is the component's folder.
    #[error("{folder}: building the {component} from its weights failed: {source}")]
    Build {
        folder: PathBuf,
        component: &'static str,
        source: candle_core::Error,
    },
    /// The UNet's weight files lack weights its config needs (`names` comma-separated).
    #[error("{dir}: the weights lack {names} that the UNet config needs")]
    MissingWeights { dir: PathBuf, names: String },
    /// `stated` is false when `unet/config.json` lacks `in_channels` (diffusers' default, 4,
    /// applies). Paths in the message are relative to `folder`, which it names first.
    #[error(
        "{folder}: not an InstructPix2Pix model: its UNet takes {in_channels} input channels, it needs {expected} ({})",
        if *stated {
            "`in_channels` in unet/config.json"
        } else {
            "unet/config.json has no `in_channels`: diffusers' default is 4"
        }
    )]
    NotInstructPix2Pix {
        folder: PathBuf,
        in_channels: usize,
        expected: usize,
        stated: bool,
    },
    /// The config folder or repo of a single-file checkpoint is not at hand.
    #[error(
        "{file} takes its tokenizer and scheduler config from {config}{}: {source}",
        if *default {
            " (the default; give another config folder or Hub repo with --config, or in the model manager)"
        } else {
            ""
        }
    )]
    SingleFileConfig {
        file: PathBuf,
        config: String,
        default: bool,
        source: Box<HubError>,
    },
    /// `--config` was given with a pipeline, which has its own configs.
    #[error(
        "a config folder applies to single-file checkpoints (.safetensors, .ckpt) only; {model} is a pipeline with its own"
    )]
    ConfigWithPipeline { model: String },
    #[error(
        "{folder}: the text encoder's width (`hidden_size` {text_width} in text_encoder/config.json) does not match the UNet's `cross_attention_dim` ({cross_attention_dim} in unet/config.json)"
    )]
    TextWidthMismatch {
        folder: PathBuf,
        text_width: usize,
        cross_attention_dim: usize,
    },
}

impl From<SingleFileError> for LoadError {
    fn from(error: SingleFileError) -> Self {
        Self::SingleFile(Box::new(error))
    }
}

impl From<LoraError> for LoadError {
    fn from(error: LoraError) -> Self {
        Self::Lora(Box::new(error))
    }
}

impl From<HubError> for LoadError {
    fn from(error: HubError) -> Self {
        Self::Hub(Box::new(error))
    }
}

/// A pipeline folder whose component folders are all there and whose network configs fit an
/// InstructPix2Pix model; no weight is read until a component is asked for.
#[derive(Debug, Clone)]
pub struct PipelineFolder {
    /// The folder (a local folder or a Hub cache snapshot).
    pub path: PathBuf,
    /// Which weight files the components are read from.
    pub variant: Variant,
    /// `unet/config.json`. Its `in_channels` is left to the caller: editing needs 8, training
    /// also grows a plain Stable Diffusion UNet's 4.
    pub unet_config: UNetConfig,
    /// `vae/config.json`.
    pub vae_config: VaeConfig,
    /// `text_encoder/config.json`.
    pub text_encoder_config: ClipTextConfig,
}

impl PipelineFolder {
    /// Checks that `path` has every component folder, reads the three network configs and checks
    /// that they fit together: 4 latent channels (half the InstructPix2Pix UNet's input) and a
    /// text encoder as wide as the UNet's cross-attention.
    pub fn open(path: &Path, variant: Variant) -> Result<Self, LoadError> {
        let path = path.to_path_buf();
        if let Some(component) = COMPONENTS.into_iter().find(|c| !path.join(c).is_dir()) {
            return Err(LoadError::MissingComponent {
                folder: path,
                component,
            });
        }
        // Read through each network's own reader, which checks the numbers (ranges named with
        // the file and the key) before anything is built from them.
        let unet_config = UNetConfig::from_file(&path.join("unet").join("config.json"))?;
        let vae_config_path = path.join("vae").join("config.json");
        let vae_config = VaeConfig::from_file(&vae_config_path)?;
        if vae_config.latent_channels * 2 != INSTRUCT_PIX2PIX_IN_CHANNELS {
            return Err(LoadError::BadConfig {
                path: vae_config_path,
                reason: format!(
                    "latent_channels {}: InstructPix2Pix needs {} (half the UNet's {INSTRUCT_PIX2PIX_IN_CHANNELS} input channels)",
                    vae_config.latent_channels,
                    INSTRUCT_PIX2PIX_IN_CHANNELS / 2
                ),
            });
        }
        let text_encoder_config =
            ClipTextConfig::from_file(&path.join("text_encoder").join("config.json"))?;
        let cross_attention_dims = match &unet_config.cross_attention_dim {
            PerBlock::Same(dim) => vec![*dim],
            PerBlock::Each(dims) => dims.clone(),
        };
        let text_width = text_encoder_config.hidden_size;
        if let Some(&cross_attention_dim) = cross_attention_dims.iter().find(|&&d| d != text_width)
        {
            return Err(LoadError::TextWidthMismatch {
                folder: path,
                text_width,
                cross_attention_dim,
            });
        }
        Ok(Self {
            path,
            variant,
            unet_config,
            vae_config,
            text_encoder_config,
        })
    }

    /// The prompts' tokenizer (`tokenizer/`), checked against the text encoder: no id beyond its
    /// vocabulary, no sequence longer than its positions.
    pub fn tokenizer(&self) -> Result<ClipTokenizer, LoadError> {
        let encoder_config = self.path.join("text_encoder").join("config.json");
        checked_tokenizer(
            &self.path.join("tokenizer"),
            &self.text_encoder_config,
            &encoder_config.display().to_string(),
        )
    }

    /// The CLIP text encoder (`text_encoder/`) in `dtype` on `device`.
    pub fn text_encoder(&self, dtype: DType, device: &Device) -> Result<ClipTextModel, LoadError> {
        self.text_encoder_with(dtype, device, &LoraWeights::default())
    }

    /// The VAE (`vae/`) in `dtype` on `device`.
    pub fn vae(&self, dtype: DType, device: &Device) -> Result<AutoencoderKL, LoadError> {
        let folder = self.path.join("vae");
        let files = component_weights(&folder, DIFFUSERS_WEIGHTS, self.variant)?;
        AutoencoderKL::load(var_builder(&files, dtype, device)?, &self.vae_config)
            .map_err(build_error(folder, "VAE"))
    }

    /// The UNet (`unet/`) in `dtype` on `device`, for inference.
    pub fn unet(&self, dtype: DType, device: &Device) -> Result<UNet2DConditionModel, LoadError> {
        self.unet_with(dtype, device, &LoraWeights::default())
    }

    /// The text encoder with LoRA updates fused into its weights.
    fn text_encoder_with(
        &self,
        dtype: DType,
        device: &Device,
        loras: &LoraWeights,
    ) -> Result<ClipTextModel, LoadError> {
        let (folder, vb) = self.fused_weights(Network::TextEncoder, dtype, device, loras)?;
        ClipTextModel::load(vb, &self.text_encoder_config)
            .map_err(build_error(folder, "text encoder"))
    }

    /// The UNet with LoRA updates fused into its weights.
    fn unet_with(
        &self,
        dtype: DType,
        device: &Device,
        loras: &LoraWeights,
    ) -> Result<UNet2DConditionModel, LoadError> {
        let (folder, vb) = self.fused_weights(Network::Unet, dtype, device, loras)?;
        UNet2DConditionModel::load(vb, &self.unet_config).map_err(build_error(folder, "UNet"))
    }

    /// The weights of `network` with `loras`' updates fused in, and its folder (for errors).
    fn fused_weights(
        &self,
        network: Network,
        dtype: DType,
        device: &Device,
        loras: &LoraWeights,
    ) -> Result<(PathBuf, VarBuilder<'static>), LoadError> {
        let (folder, base_name) = match network {
            Network::Unet => ("unet", DIFFUSERS_WEIGHTS),
            Network::TextEncoder => ("text_encoder", TRANSFORMERS_WEIGHTS),
        };
        let folder = self.path.join(folder);
        let files = component_weights(&folder, base_name, self.variant)?;
        let backend = loras.wrap(network, weights_backend(&files)?);
        Ok((
            folder,
            VarBuilder::from_backend(backend, dtype, device.clone()),
        ))
    }

    /// What LoRAs may change: the UNet's and the text encoder's weight names and shapes.
    fn lora_targets(&self) -> Result<ModelWeights, LoadError> {
        let unet = component_weights(&self.path.join("unet"), DIFFUSERS_WEIGHTS, self.variant)?;
        let text = component_weights(
            &self.path.join("text_encoder"),
            TRANSFORMERS_WEIGHTS,
            self.variant,
        )?;
        Ok(ModelWeights {
            unet: super::weights::weight_shapes(&unet)?,
            text_encoder: without_text_model(super::weights::weight_shapes(&text)?),
            unet_ldm: ldm_layout_of(&self.unet_config),
        })
    }

    /// Every tensor of the UNet's weight files (safetensors or .bin, sharded or not) by its
    /// diffusers name, in `dtype` on `device`: what training makes its variables of.
    pub fn unet_weights(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<BTreeMap<String, Tensor>, LoadError> {
        self.unet_weights_mapped(dtype, device, &|_, tensor| Ok(tensor))
    }

    /// [`PipelineFolder::unet_weights`] with each tensor passed through `map` as it is read
    /// (before the next is read: a conversion never holds two copies of the whole UNet).
    pub fn unet_weights_mapped(
        &self,
        dtype: DType,
        device: &Device,
        map: &dyn Fn(&str, Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<BTreeMap<String, Tensor>, LoadError> {
        let unet_dir = self.path.join("unet");
        let weights = component_weights_detailed(&unet_dir, DIFFUSERS_WEIGHTS, self.variant)?;
        let load_err = |source| WeightsError::Load {
            files: weights
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            source,
        };
        let mut tensors = BTreeMap::new();
        match weights.format {
            WeightFormat::SafeTensors => {
                let shapes = safetensors_shapes(&weights.files)?;
                let vb = var_builder(&weights.files, dtype, device)?;
                for (name, shape) in shapes {
                    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                    let tensor = vb
                        .get(shape, &name)
                        .and_then(|t| map(&name, t))
                        .map_err(load_err)?;
                    tensors.insert(name, tensor);
                }
            }
            WeightFormat::PyTorch => {
                for file in &weights.files {
                    let torch = TorchFile::open(file).map_err(WeightsError::from)?;
                    let names: Vec<String> = torch.shapes().map(|(n, _)| n.to_string()).collect();
                    for name in names {
                        let tensor = torch
                            .load(&name, dtype, device)
                            .and_then(|t| map(&name, t))
                            .map_err(load_err)?;
                        tensors.insert(name, tensor);
                    }
                }
            }
        }
        Ok(tensors)
    }
}

/// A tokenizer folder's tokenizer, checked against the text encoder it feeds: no id beyond its
/// vocabulary, no sequence longer than its positions (`encoder_config` names where those come
/// from, for messages).
fn checked_tokenizer(
    dir: &Path,
    text_encoder_config: &ClipTextConfig,
    encoder_config: &str,
) -> Result<ClipTokenizer, LoadError> {
    let tokenizer = ClipTokenizer::from_dir(dir)?;
    let positions = text_encoder_config.max_position_embeddings;
    if tokenizer.model_max_length() > positions {
        return Err(LoadError::BadConfig {
            path: dir.join("tokenizer_config.json"),
            reason: format!(
                "`model_max_length` is {}, more than the text encoder's {positions} positions (`max_position_embeddings` in {encoder_config})",
                tokenizer.model_max_length(),
            ),
        });
    }
    let vocab_size = text_encoder_config.vocab_size;
    if let Some((token, id)) = tokenizer.largest_id()
        && id as usize >= vocab_size
    {
        return Err(LoadError::BadConfig {
            path: dir.to_path_buf(),
            reason: format!(
                "token {token:?} has id {id}, beyond the text encoder's vocabulary (`vocab_size` {vocab_size} in {encoder_config})"
            ),
        });
    }
    Ok(tokenizer)
}

/// Text encoder weight names without transformers' `text_model.` (files have it or not).
fn without_text_model(shapes: Shapes) -> Shapes {
    shapes
        .into_iter()
        .map(|(name, shape)| match name.strip_prefix("text_model.") {
            Some(rest) => (rest.to_string(), shape),
            None => (name, shape),
        })
        .collect()
}

/// Resnets per level and which up levels have attention, for the LDM names of the UNet's modules
/// (`None` when the levels differ in resnets).
fn ldm_layout_of(config: &UNetConfig) -> Option<(usize, Vec<bool>)> {
    let layers = match &config.layers_per_block {
        PerBlock::Same(n) => *n,
        PerBlock::Each(list) => {
            let first = *list.first()?;
            list.iter().all(|&n| n == first).then_some(first)?
        }
    };
    let up = config
        .up_block_types
        .iter()
        .map(|t| t.starts_with("CrossAttn"))
        .collect();
    Some((layers, up))
}

/// Names the component folder and network in candle's error from building a network.
pub fn build_error(
    folder: PathBuf,
    component: &'static str,
) -> impl FnOnce(candle_core::Error) -> LoadError {
    move |source| LoadError::Build {
        folder,
        component,
        source,
    }
}

/// How to load: the weight variant, the compute dtype and the device.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub variant: Variant,
    pub dtype: DType,
    pub device: Device,
}

/// Every network of an InstructPix2Pix pipeline, loaded once and used for many edits.
pub struct InstructPix2PixModel {
    /// The pipeline folder the model was read from (a local folder or a Hub cache snapshot); for
    /// a single-file checkpoint, the folder its tokenizer and scheduler config came from.
    pub folder: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub vae: AutoencoderKL,
    pub unet: UNet2DConditionModel,
    pub dtype: DType,
    pub device: Device,
    /// Set when the weights came from a single-file checkpoint.
    pub single_file: Option<SingleFileSource>,
}

/// Where a single-file model's weights came from and what the file said.
#[derive(Debug, Clone, PartialEq)]
pub struct SingleFileSource {
    /// The checkpoint.
    pub path: PathBuf,
    /// `Some("v_prediction")` when the file says it predicts v: the scheduler config's
    /// `prediction_type` gives way to it.
    pub prediction_type: Option<&'static str>,
    /// Whether the UNet was read from the file's EMA weights.
    pub ema: bool,
}

/// A model whose files are all on this machine: what a load reads after any download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalModel {
    /// A pipeline folder in diffusers' layout.
    Folder(PathBuf),
    /// A single-file checkpoint and the folder its tokenizer, scheduler and missing config numbers
    /// come from.
    SingleFile { file: PathBuf, config: PathBuf },
}

impl LocalModel {
    /// Makes the model's files present: a pipeline (with `variant`'s weights) for a folder or a
    /// repo; for a single file, the configs of `config` (default: [`super::hub::DEFAULT_REPO`],
    /// whose configs only are downloaded). `config` is refused for a pipeline, which has its own.
    pub fn fetch(
        spec: &ModelSpec,
        config: Option<&ModelSpec>,
        variant: Variant,
        settings: &HubSettings,
        progress: &mut dyn FnMut(&DownloadProgress),
        cancel: &std::sync::atomic::AtomicBool,
    ) -> Result<Self, LoadError> {
        match spec {
            ModelSpec::SingleFile(file) => {
                let is_default = config.is_none();
                let default = ModelSpec::default();
                let config = config.unwrap_or(&default);
                let folder = fetch_configs_with_cancel(config, settings, progress, cancel)
                    .map_err(|source| match source {
                        HubError::Cancelled { .. } => LoadError::from(source),
                        source => LoadError::SingleFileConfig {
                            file: file.clone(),
                            config: config.to_string(),
                            default: is_default,
                            source: Box::new(source),
                        },
                    })?;
                Ok(Self::SingleFile {
                    file: file.clone(),
                    config: folder,
                })
            }
            _ if config.is_some() => Err(LoadError::ConfigWithPipeline {
                model: spec.to_string(),
            }),
            _ => Ok(Self::Folder(fetch_model_with_cancel(
                spec, variant, settings, progress, cancel,
            )?)),
        }
    }
}

impl LocalModel {
    /// Everything a load checks before reading any weight: the configs (a pipeline's, or a single
    /// file's read from its tensors), that it is an InstructPix2Pix model, the tokenizer, and that
    /// every LoRA fits it. Cheap: only headers and small files are read.
    pub fn prepare(
        &self,
        options: &LoadOptions,
        loras: &[LoraChoice],
    ) -> Result<PreparedModel, LoadError> {
        match self {
            LocalModel::Folder(folder) => {
                ModelIndex::read(folder)?;
                let pipeline = PipelineFolder::open(folder, options.variant)?;
                let in_channels = pipeline.unet_config.in_channels;
                if in_channels != INSTRUCT_PIX2PIX_IN_CHANNELS {
                    let config = pipeline.path.join("unet").join("config.json");
                    let stated = super::config::read_json::<serde_json::Value>(&config)
                        .is_ok_and(|c| c.get("in_channels").is_some());
                    return Err(LoadError::NotInstructPix2Pix {
                        folder: pipeline.path,
                        in_channels,
                        expected: INSTRUCT_PIX2PIX_IN_CHANNELS,
                        stated,
                    });
                }
                let loras = if loras.is_empty() {
                    LoraWeights::default()
                } else {
                    LoraWeights::read(loras, &pipeline.lora_targets()?)?
                };
                Ok(PreparedModel {
                    tokenizer: pipeline.tokenizer()?,
                    source: Prepared::Folder(Box::new(pipeline)),
                    loras,
                    options: options.clone(),
                })
            }
            LocalModel::SingleFile { file, config } => {
                let templates = Templates::from_folder(config)?;
                let single = SingleFile::open(file, &templates)?;
                let scheduler = config.join("scheduler").join("scheduler_config.json");
                if !scheduler.is_file() {
                    return Err(LoadError::BadConfig {
                        path: scheduler,
                        reason: format!(
                            "is missing: the config folder of {} needs scheduler/scheduler_config.json",
                            file.display()
                        ),
                    });
                }
                let tokenizer = checked_tokenizer(
                    &config.join("tokenizer"),
                    &single.text_encoder_config,
                    &format!("the text encoder of {}", file.display()),
                )?;
                let loras = if loras.is_empty() {
                    LoraWeights::default()
                } else {
                    LoraWeights::read(
                        loras,
                        &ModelWeights {
                            unet: single.unet_shapes(),
                            text_encoder: single.text_encoder_shapes(),
                            unet_ldm: ldm_layout_of(&single.unet_config),
                        },
                    )?
                };
                Ok(PreparedModel {
                    tokenizer,
                    source: Prepared::SingleFile {
                        single: Box::new(single),
                        config: config.clone(),
                    },
                    loras,
                    options: options.clone(),
                })
            }
        }
    }
}

/// A model checked and ready to read its weights ([`LocalModel::prepare`]).
pub struct PreparedModel {
    source: Prepared,
    tokenizer: ClipTokenizer,
    loras: LoraWeights,
    options: LoadOptions,
}

enum Prepared {
    Folder(Box<PipelineFolder>),
    SingleFile {
        single: Box<SingleFile>,
        config: PathBuf,
    },
}

impl PreparedModel {
    /// Reads the weights (fusing the LoRAs) and builds every network.
    ///
    /// bf16 on the CPU: the networks are built in float32 with the weights of their
    /// convolutions and linear layers converted to bf16 as they are read
    /// ([`nn::with_bf16_products`]); the model's activations, and so its `dtype`, stay float32.
    pub fn load(self) -> Result<InstructPix2PixModel, LoadError> {
        if self.options.dtype == DType::BF16 && self.options.device.is_cpu() {
            let mut options = self.options.clone();
            options.dtype = DType::F32;
            let prepared = PreparedModel { options, ..self };
            return nn::with_bf16_products(|| prepared.load_as_options());
        }
        self.load_as_options()
    }

    /// The dtype the networks will compute in: `options.dtype` (BF16 on the CPU means float32
    /// activations with bf16 products).
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// For `--dtype auto` on the CPU: switches this load to bf16 products where
    /// [`super::cpu_precision`]'s rules say so (the CPU has avx512_bf16, the UNet is large and
    /// a short probe stays close to float32), and says what was chosen and why. A load that is
    /// not float32 on the CPU is left as it is.
    pub fn choose_cpu_precision(&mut self) -> Result<CpuPrecision, LoadError> {
        if self.options.dtype != DType::F32 || !self.options.device.is_cpu() {
            return Ok(CpuPrecision::unchanged(self.options.dtype));
        }
        let parameters = self.unet_parameters()?;
        let choice = super::cpu_precision::choose(parameters, |bf16| {
            let unet = self.probe_unet(bf16)?;
            super::cpu_precision::probe_output(&unet)
                .map_err(build_error(self.weights_path(), "UNet"))
        })?;
        if choice.dtype == DType::BF16 {
            self.options.dtype = DType::BF16;
        }
        Ok(choice)
    }

    /// The UNet's number of parameters, from the weight files' headers.
    fn unet_parameters(&self) -> Result<usize, LoadError> {
        let shapes = match &self.source {
            Prepared::Folder(pipeline) => pipeline.lora_targets()?.unet,
            Prepared::SingleFile { single, .. } => single.unet_shapes(),
        };
        Ok(shapes
            .values()
            .map(|shape| shape.iter().product::<usize>())
            .sum())
    }

    /// Where the UNet's weights are read from, for error messages.
    fn weights_path(&self) -> PathBuf {
        match &self.source {
            Prepared::Folder(pipeline) => pipeline.path.join("unet"),
            Prepared::SingleFile { single, .. } => single.path().to_path_buf(),
        }
    }

    /// The UNet alone, in float32 on the CPU, its products in bf16 when `bf16` is set (the LoRAs
    /// fused as in the real load): what the precision probe runs.
    fn probe_unet(&self, bf16: bool) -> Result<UNet2DConditionModel, LoadError> {
        let device = Device::Cpu;
        let build = || match &self.source {
            Prepared::Folder(pipeline) => pipeline.unet_with(DType::F32, &device, &self.loras),
            Prepared::SingleFile { single, .. } => UNet2DConditionModel::load(
                VarBuilder::from_backend(
                    self.loras.wrap(Network::Unet, single.unet_backend()),
                    DType::F32,
                    device.clone(),
                ),
                &single.unet_config,
            )
            .map_err(build_error(single.path().to_path_buf(), "UNet")),
        };
        if bf16 {
            nn::with_bf16_products(build)
        } else {
            build()
        }
    }

    /// [`Self::load`] with `options.dtype` as the networks' dtype.
    fn load_as_options(self) -> Result<InstructPix2PixModel, LoadError> {
        let (dtype, device) = (self.options.dtype, &self.options.device);
        let loras = &self.loras;
        match self.source {
            Prepared::Folder(pipeline) => Ok(InstructPix2PixModel {
                tokenizer: self.tokenizer,
                text_encoder: pipeline.text_encoder_with(dtype, device, loras)?,
                vae: pipeline.vae(dtype, device)?,
                unet: pipeline.unet_with(dtype, device, loras)?,
                folder: pipeline.path,
                dtype,
                device: device.clone(),
                single_file: None,
            }),
            Prepared::SingleFile { single, config } => {
                let file = single.path().to_path_buf();
                let builder = |backend: Box<dyn SimpleBackend>| {
                    VarBuilder::from_backend(backend, dtype, device.clone())
                };
                let text_encoder = ClipTextModel::load(
                    builder(loras.wrap(Network::TextEncoder, single.text_encoder_backend())),
                    &single.text_encoder_config,
                )
                .map_err(build_error(file.clone(), "text encoder"))?;
                let vae = AutoencoderKL::load(builder(single.vae_backend()), &single.vae_config)
                    .map_err(build_error(file.clone(), "VAE"))?;
                let unet = UNet2DConditionModel::load(
                    builder(loras.wrap(Network::Unet, single.unet_backend())),
                    &single.unet_config,
                )
                .map_err(build_error(file.clone(), "UNet"))?;
                Ok(InstructPix2PixModel {
                    folder: config,
                    tokenizer: self.tokenizer,
                    text_encoder,
                    vae,
                    unet,
                    dtype,
                    device: device.clone(),
                    single_file: Some(SingleFileSource {
                        path: file,
                        prediction_type: single.prediction_type,
                        ema: single.uses_ema,
                    }),
                })
            }
        }
    }
}

impl InstructPix2PixModel {
    /// Resolves `spec` (fetching from the Hub when needed) and loads every component.
    pub fn fetch_and_load(
        spec: &ModelSpec,
        settings: &HubSettings,
        options: &LoadOptions,
        progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<Self, LoadError> {
        Self::fetch_and_load_with(spec, None, &[], settings, options, progress)
    }

    /// [`Self::fetch_and_load`] with a config folder or repo for a single-file `spec`, and LoRA
    /// files fused into the weights.
    pub fn fetch_and_load_with(
        spec: &ModelSpec,
        config: Option<&ModelSpec>,
        loras: &[LoraChoice],
        settings: &HubSettings,
        options: &LoadOptions,
        progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<Self, LoadError> {
        let never = std::sync::atomic::AtomicBool::new(false);
        let local = LocalModel::fetch(spec, config, options.variant, settings, progress, &never)?;
        Self::load_local(&local, options, loras)
    }

    /// Loads a model whose files are present, with `loras` fused into its weights.
    pub fn load_local(
        local: &LocalModel,
        options: &LoadOptions,
        loras: &[LoraChoice],
    ) -> Result<Self, LoadError> {
        local.prepare(options, loras)?.load()
    }

    /// Loads the pipeline in `folder` (diffusers' layout, with `model_index.json`). Configs are
    /// checked before any weight is read, so a model of the wrong kind is refused at once.
    pub fn load(folder: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
        Self::load_with_loras(folder, options, &[])
    }

    /// [`Self::load`] with LoRA files fused into the UNet's and the text encoder's weights; every
    /// LoRA is checked against the model before any weight is read.
    pub fn load_with_loras(
        folder: &Path,
        options: &LoadOptions,
        loras: &[LoraChoice],
    ) -> Result<Self, LoadError> {
        Self::load_local(&LocalModel::Folder(folder.to_path_buf()), options, loras)
    }

    /// Loads a single-file checkpoint in the LDM layout; `config` is the folder of its tokenizer
    /// and scheduler config (and of the network configs' numbers the tensors do not tell).
    pub fn load_single_file(
        file: &Path,
        config: &Path,
        options: &LoadOptions,
        loras: &[LoraChoice],
    ) -> Result<Self, LoadError> {
        let local = LocalModel::SingleFile {
            file: file.to_path_buf(),
            config: config.to_path_buf(),
        };
        Self::load_local(&local, options, loras)
    }

    /// The precision as the user names it: `bf16` for a model whose UNet runs bf16 products
    /// on the CPU (its activations float32), else its dtype (`f32`, `f16`, `bf16`).
    pub fn precision_label(&self) -> &'static str {
        if self.unet.uses_bf16_products() {
            return "bf16";
        }
        match self.dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            _ => "f32",
        }
    }

    /// The VAE's spatial downscale factor (8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }
}
