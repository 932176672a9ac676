//! A whole InstructPix2Pix model loaded for editing: tokenizer, text encoder, VAE and UNet read
//! from one pipeline folder in diffusers' layout, on one device in one dtype.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::clip::{ClipTextConfig, ClipTextModel};
use super::config::{ConfigError, ModelIndex, read_json};
use super::hub::{DownloadProgress, HubError, HubSettings, ModelSpec, Variant, fetch_model};
use super::tokenizer::{ClipTokenizer, TokenizerError};
use super::unet::{PerBlock, UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, VaeConfig};
use super::weights::{WeightsError, component_weights, var_builder};

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
    #[error(
        "{folder}: missing the `{component}` component folder (a diffusers pipeline needs {component}/)"
    )]
    MissingComponent {
        folder: PathBuf,
        component: &'static str,
    },
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("{folder}: building the {component} from its weights failed: {source}")]
    Build {
        folder: PathBuf,
        component: &'static str,
        source: candle_core::Error,
    },
    #[error(
        "{folder}: not an InstructPix2Pix model: its UNet takes {in_channels} input channels, it needs {expected}"
    )]
    NotInstructPix2Pix {
        folder: PathBuf,
        in_channels: usize,
        expected: usize,
    },
    #[error(
        "{folder}: the text encoder's width ({text_width}) does not match the UNet's cross_attention_dim ({cross_attention_dim})"
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

    /// Loads the pipeline in `folder` (diffusers' layout). Configs are checked before any weight is
    /// read, so a model of the wrong kind is refused at once.
    pub fn load(folder: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
        let folder = folder.to_path_buf();
        let _index: ModelIndex = read_json(&folder.join("model_index.json"))?;
        for component in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
            if !folder.join(component).is_dir() {
                return Err(LoadError::MissingComponent { folder, component });
            }
        }
        let unet_config_path = folder.join("unet").join("config.json");
        let unet_config: UNetConfig = read_json(&unet_config_path)?;
        let latent_channels_expected = 8;
        if unet_config.in_channels != latent_channels_expected {
            return Err(LoadError::NotInstructPix2Pix {
                folder,
                in_channels: unet_config.in_channels,
                expected: latent_channels_expected,
            });
        }
        let vae_config: VaeConfig = read_json(&folder.join("vae").join("config.json"))?;
        if vae_config.latent_channels * 2 != unet_config.in_channels {
            return Err(LoadError::BadConfig {
                path: folder.join("vae").join("config.json"),
                reason: format!(
                    "latent_channels {} does not fit the UNet's {} input channels",
                    vae_config.latent_channels, unet_config.in_channels
                ),
            });
        }
        let clip_config: ClipTextConfig =
            read_json(&folder.join("text_encoder").join("config.json"))?;
        let cross_attention_dims = match &unet_config.cross_attention_dim {
            PerBlock::Same(dim) => vec![*dim],
            PerBlock::Each(dims) => dims.clone(),
        };
        if let Some(&cross_attention_dim) = cross_attention_dims
            .iter()
            .find(|&&d| d != clip_config.hidden_size)
        {
            return Err(LoadError::TextWidthMismatch {
                folder,
                text_width: clip_config.hidden_size,
                cross_attention_dim,
            });
        }
        let tokenizer = ClipTokenizer::from_dir(&folder.join("tokenizer"))?;

        let build_err = |component: &'static str| {
            let folder = folder.clone();
            move |source| LoadError::Build {
                folder,
                component,
                source,
            }
        };
        let (dtype, device) = (options.dtype, &options.device);

        let files = component_weights(&folder.join("text_encoder"), "model", options.variant)?;
        let vb = var_builder(&files, dtype, device)?;
        let text_encoder =
            ClipTextModel::load(vb, &clip_config).map_err(build_err("text encoder"))?;

        let files = component_weights(
            &folder.join("vae"),
            "diffusion_pytorch_model",
            options.variant,
        )?;
        let vb = var_builder(&files, dtype, device)?;
        let vae = AutoencoderKL::load(vb, &vae_config).map_err(build_err("VAE"))?;

        let files = component_weights(
            &folder.join("unet"),
            "diffusion_pytorch_model",
            options.variant,
        )?;
        let vb = var_builder(&files, dtype, device)?;
        let unet = UNet2DConditionModel::load(vb, &unet_config).map_err(build_err("UNet"))?;

        Ok(Self {
            folder,
            tokenizer,
            text_encoder,
            vae,
            unet,
            dtype,
            device: device.clone(),
        })
    }

    /// The VAE's spatial downscale factor (8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }
}
