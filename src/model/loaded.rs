//! The one loader of a pipeline folder in diffusers' layout, for editing and for training:
//! [`PipelineFolder`] checks the component folders and reads the configs (checked against each
//! other before any weight is read), then builds the tokenizer, text encoder, VAE and UNet on one
//! device in one dtype, or hands training the UNet's weights as named tensors to make trainable.
//! [`InstructPix2PixModel`] is the whole model loaded for editing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::clip::{ClipConfigError, ClipTextConfig, ClipTextModel};
use super::config::{ConfigError, ModelIndex};
use super::hub::{DownloadProgress, HubError, HubSettings, ModelSpec, Variant, fetch_model};
use super::tokenizer::{ClipTokenizer, TokenizerError};
use super::torch_file::TorchFile;
use super::unet::{PerBlock, UNet2DConditionModel, UNetConfig, UNetConfigError};
use super::vae::{AutoencoderKL, VaeConfig, VaeConfigError};
use super::weights::{
    DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, WeightFormat, WeightsError, component_weights,
    component_weights_detailed, safetensors_shapes, var_builder,
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
    #[error(
        "{folder}: the text encoder's width (`hidden_size` {text_width} in text_encoder/config.json) does not match the UNet's `cross_attention_dim` ({cross_attention_dim} in unet/config.json)"
    )]
    TextWidthMismatch {
        folder: PathBuf,
        text_width: usize,
        cross_attention_dim: usize,
    },
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
        let dir = self.path.join("tokenizer");
        let tokenizer = ClipTokenizer::from_dir(&dir)?;
        let encoder_config = self.path.join("text_encoder").join("config.json");
        let positions = self.text_encoder_config.max_position_embeddings;
        if tokenizer.model_max_length() > positions {
            return Err(LoadError::BadConfig {
                path: dir.join("tokenizer_config.json"),
                reason: format!(
                    "`model_max_length` is {}, more than the text encoder's {positions} positions (`max_position_embeddings` in {})",
                    tokenizer.model_max_length(),
                    encoder_config.display()
                ),
            });
        }
        let vocab_size = self.text_encoder_config.vocab_size;
        if let Some((token, id)) = tokenizer.largest_id()
            && id as usize >= vocab_size
        {
            return Err(LoadError::BadConfig {
                path: dir,
                reason: format!(
                    "token {token:?} has id {id}, beyond the text encoder's vocabulary (`vocab_size` {vocab_size} in {})",
                    encoder_config.display()
                ),
            });
        }
        Ok(tokenizer)
    }

    /// The CLIP text encoder (`text_encoder/`) in `dtype` on `device`.
    pub fn text_encoder(&self, dtype: DType, device: &Device) -> Result<ClipTextModel, LoadError> {
        let folder = self.path.join("text_encoder");
        let files = component_weights(&folder, TRANSFORMERS_WEIGHTS, self.variant)?;
        ClipTextModel::load(
            var_builder(&files, dtype, device)?,
            &self.text_encoder_config,
        )
        .map_err(build_error(folder, "text encoder"))
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
        let folder = self.path.join("unet");
        let files = component_weights(&folder, DIFFUSERS_WEIGHTS, self.variant)?;
        UNet2DConditionModel::load(var_builder(&files, dtype, device)?, &self.unet_config)
            .map_err(build_error(folder, "UNet"))
    }

    /// Every tensor of the UNet's weight files (safetensors or .bin, sharded or not) by its
    /// diffusers name, in `dtype` on `device`: what training makes its variables of.
    pub fn unet_weights(
        &self,
        dtype: DType,
        device: &Device,
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
                    let tensor = vb.get(shape, &name).map_err(load_err)?;
                    tensors.insert(name, tensor);
                }
            }
            WeightFormat::PyTorch => {
                for file in &weights.files {
                    let torch = TorchFile::open(file).map_err(WeightsError::from)?;
                    let names: Vec<String> = torch.shapes().map(|(n, _)| n.to_string()).collect();
                    for name in names {
                        let tensor = torch.load(&name, dtype, device).map_err(load_err)?;
                        tensors.insert(name, tensor);
                    }
                }
            }
        }
        Ok(tensors)
    }
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
    /// The pipeline folder the model was read from (a local folder or a Hub cache snapshot).
    pub folder: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub vae: AutoencoderKL,
    pub unet: UNet2DConditionModel,
    pub dtype: DType,
    pub device: Device,
}

impl InstructPix2PixModel {
    /// Resolves `spec` (fetching from the Hub when needed) and loads every component.
    pub fn fetch_and_load(
        spec: &ModelSpec,
        settings: &HubSettings,
        options: &LoadOptions,
        progress: &mut dyn FnMut(&DownloadProgress),
    ) -> Result<Self, LoadError> {
        let folder = fetch_model(spec, options.variant, settings, progress)?;
        Self::load(&folder, options)
    }

    /// Loads the pipeline in `folder` (diffusers' layout, with `model_index.json`). Configs are
    /// checked before any weight is read, so a model of the wrong kind is refused at once.
    pub fn load(folder: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
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
        let (dtype, device) = (options.dtype, &options.device);
        Ok(Self {
            tokenizer: pipeline.tokenizer()?,
            text_encoder: pipeline.text_encoder(dtype, device)?,
            vae: pipeline.vae(dtype, device)?,
            unet: pipeline.unet(dtype, device)?,
            folder: pipeline.path,
            dtype,
            device: device.clone(),
        })
    }

    /// The VAE's spatial downscale factor (8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }
}
