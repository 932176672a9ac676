//! Single-file checkpoints: a whole InstructPix2Pix model in one `.safetensors` or `.ckpt` file in
//! the original CompVis/LDM key layout (`model.diffusion_model.*`, `first_stage_model.*`,
//! `cond_stage_model.transformer.*`), as timbrooks' `instruct-pix2pix-00-22000` and most shared
//! fine-tunes and merges come.
//!
//! [`SingleFile::open`] reads the file's tensor names and shapes (a `.ckpt` through the safe pickle
//! reader of [`super::torch_file`]), checks that it is an InstructPix2Pix model (a UNet of 8 input
//! channels), and reads each network's structure from the shapes ([`ldm`]). What shapes cannot
//! tell (attention heads, group-norm groups, the VAE's scaling factor, the text encoder's
//! activation) comes from the config folder's `unet/`, `vae/` and `text_encoder/config.json` when
//! they describe the same sizes, else from the original repo's configs (8 heads for SD 1.x, heads
//! of 64 channels for SD 2.x, 32 groups, 0.18215), as diffusers' `from_single_file` takes them
//! from the model it names. The tokenizer and the scheduler always come from the config folder.
//!
//! The UNet's EMA weights (`model_ema.*`) are used when the file has them, as the original repo's
//! configs do for editing. A file that says it predicts `v` (a `v_pred` tensor, or
//! `modelspec.prediction_type` in its safetensors metadata) sets the scheduler's
//! `prediction_type` to `v_prediction`.
//!
//! Each network is built from a [`candle_nn::var_builder::SimpleBackend`] that renames diffusers'
//! names to the file's and reads each tensor when asked, so nothing is read twice or kept beyond
//! what the networks hold.

pub mod ldm;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use serde_json::Value;

use self::ldm::{ClipLayout, Inner, Rename, Shapes, UNetLayout, VaeLayout};
use super::clip::ClipTextConfig;
use super::unet::UNetConfig;
use super::vae::VaeConfig;
use super::weights::{WeightFile, WeightsError, open_weight_file, single_file_format};

/// The UNet input channels of an InstructPix2Pix model.
const IN_CHANNELS: usize = 8;

/// Why a single file could not be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum SingleFileError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(
        "{path} is not a model file this program reads: use a .safetensors or .ckpt file (or .pt, .pth, .bin)"
    )]
    UnknownFormat { path: PathBuf },
    #[error("{path} is not a Stable Diffusion checkpoint in the original (LDM) layout: {reason}")]
    NotLdm { path: PathBuf, reason: String },
    #[error(
        "{path}: not an InstructPix2Pix model: its UNet takes {in_channels} input channels \
         (model.diffusion_model.input_blocks.0.0.weight has shape {shape:?}), InstructPix2Pix needs \
         {IN_CHANNELS}{hint}"
    )]
    NotInstructPix2Pix {
        path: PathBuf,
        in_channels: usize,
        shape: Vec<usize>,
        hint: &'static str,
    },
    #[error("{path}: its {component} does not have the layout of Stable Diffusion's: {reason}")]
    Layout {
        path: PathBuf,
        component: &'static str,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("{path}: the {component} config read from the file is not usable: {reason}")]
    Config {
        path: PathBuf,
        component: &'static str,
        reason: String,
    },
    #[error("{path} has EMA weights for some of its UNet but not {missing}: the file is damaged")]
    PartialEma { path: PathBuf, missing: String },
}

/// One network of the file: where its tensors are and how diffusers' names map to them.
#[derive(Clone)]
struct Component {
    /// `model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.transformer.`.
    prefix: String,
    /// Diffusers ↔ file names (empty for the text encoder: the same names).
    table: Vec<Rename>,
    /// Read the UNet's `model_ema.*` copy instead.
    ema: bool,
}

/// A single-file checkpoint, checked and with its networks' configs; no weight is read until a
/// network is built.
#[derive(Clone)]
pub struct SingleFile {
    path: PathBuf,
    source: Arc<dyn SimpleBackend>,
    /// Every tensor of the file and its shape.
    shapes: Shapes,
    unet: Component,
    vae: Component,
    clip: Component,
    /// The configs (the tensors' structure, the rest from the templates or the defaults).
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub text_encoder_config: ClipTextConfig,
    /// `Some("v_prediction")` when the file says it predicts v.
    pub prediction_type: Option<&'static str>,
    /// Whether the UNet is read from the EMA weights.
    pub uses_ema: bool,
}

impl std::fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFile")
            .field("path", &self.path)
            .field("tensors", &self.shapes.len())
            .field("uses_ema", &self.uses_ema)
            .finish()
    }
}

/// The configs a single file's missing numbers are taken from (each `None` when the config folder
/// has no such file).
#[derive(Debug, Clone, Default)]
pub struct Templates {
    pub unet: Option<Value>,
    pub vae: Option<Value>,
    pub text_encoder: Option<Value>,
}

impl Templates {
    /// `unet/config.json`, `vae/config.json`, `text_encoder/config.json` of `folder`, those that
    /// exist (an unreadable one is an error naming it).
    pub fn from_folder(folder: &Path) -> Result<Self, super::config::ConfigError> {
        let read = |component: &str| -> Result<Option<Value>, super::config::ConfigError> {
            let path = folder.join(component).join("config.json");
            if path.exists() {
                super::config::read_json::<Value>(&path).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            unet: read("unet")?,
            vae: read("vae")?,
            text_encoder: read("text_encoder")?,
        })
    }
}

/// Whether `path` names a file in a single-file format (by its extension).
pub fn is_single_file_name(path: &Path) -> bool {
    single_file_format(path).is_some()
}

impl SingleFile {
    /// Opens and checks `path`; `templates` give what the tensors do not say.
    pub fn open(path: &Path, templates: &Templates) -> Result<Self, SingleFileError> {
        let Some(WeightFile {
            source,
            shapes,
            metadata,
        }) = open_weight_file(path)?
        else {
            return Err(SingleFileError::UnknownFormat {
                path: path.to_path_buf(),
            });
        };
        Self::from_shapes(path, source, shapes, &metadata, templates)
    }

    fn from_shapes(
        path: &Path,
        source: Arc<dyn SimpleBackend>,
        shapes: Shapes,
        metadata: &BTreeMap<String, String>,
        templates: &Templates,
    ) -> Result<Self, SingleFileError> {
        let not_ldm = |reason: String| SingleFileError::NotLdm {
            path: path.to_path_buf(),
            reason,
        };
        let unet_shapes = strip(&shapes, ldm::UNET_PREFIX);
        if unet_shapes.is_empty() {
            return Err(not_ldm(what_else(&shapes)));
        }
        // The kind first: a plain Stable Diffusion or inpainting checkpoint is named as such.
        let conv_in = unet_shapes.get("input_blocks.0.0.weight").ok_or_else(|| {
            not_ldm("it has no model.diffusion_model.input_blocks.0.0.weight (conv_in)".into())
        })?;
        if conv_in.len() == 4 && conv_in[1] != IN_CHANNELS {
            return Err(SingleFileError::NotInstructPix2Pix {
                path: path.to_path_buf(),
                in_channels: conv_in[1],
                shape: conv_in.clone(),
                hint: match conv_in[1] {
                    4 => " (it is a text-to-image Stable Diffusion checkpoint)",
                    9 => " (it is an inpainting checkpoint)",
                    _ => "",
                },
            });
        }
        let layout_err = |component: &'static str| {
            move |reason: String| SingleFileError::Layout {
                path: path.to_path_buf(),
                component,
                reason,
            }
        };
        let unet_layout = ldm::unet_layout(&unet_shapes).map_err(layout_err("UNet"))?;

        let vae_prefix = ldm::VAE_PREFIXES
            .into_iter()
            .find(|p| shapes.keys().any(|k| k.starts_with(p)))
            .ok_or_else(|| not_ldm("it has no VAE (first_stage_model.* tensors)".into()))?;
        let vae_layout = ldm::vae_layout(&strip(&shapes, vae_prefix)).map_err(layout_err("VAE"))?;

        let clip_shapes = strip(&shapes, ldm::CLIP_PREFIX);
        if clip_shapes.is_empty() {
            let reason = if shapes.keys().any(|k| k.starts_with(ldm::OPEN_CLIP_PREFIX)) {
                "its text encoder is Stable Diffusion 2's OpenCLIP (cond_stage_model.model.*), \
                 which this program reads from diffusers folders only: convert the file with \
                 diffusers (from_single_file, then save_pretrained) and use the folder"
            } else {
                "it has no text encoder (cond_stage_model.transformer.* tensors)"
            };
            return Err(SingleFileError::Unsupported {
                path: path.to_path_buf(),
                reason: reason.into(),
            });
        }
        let clip_names = strip(&clip_shapes, "text_model.");
        let clip_layout = ldm::clip_layout(if clip_names.is_empty() {
            &clip_shapes
        } else {
            &clip_names
        })
        .map_err(layout_err("text encoder"))?;

        let config_err = |component: &'static str| {
            move |reason: String| SingleFileError::Config {
                path: path.to_path_buf(),
                component,
                reason,
            }
        };
        let unet_config =
            unet_config(&unet_layout, templates.unet.as_ref()).map_err(config_err("UNet"))?;
        let vae_config =
            vae_config(&vae_layout, templates.vae.as_ref()).map_err(config_err("VAE"))?;
        let text_encoder_config = clip_config(&clip_layout, templates.text_encoder.as_ref())
            .map_err(config_err("text encoder"))?;
        if text_encoder_config.hidden_size != unet_layout.cross_attention_dim {
            return Err(SingleFileError::Layout {
                path: path.to_path_buf(),
                component: "text encoder",
                reason: format!(
                    "it is {} wide but the UNet's cross-attention takes {}",
                    text_encoder_config.hidden_size, unet_layout.cross_attention_dim
                ),
            });
        }
        if vae_layout.latent_channels * 2 != IN_CHANNELS {
            return Err(SingleFileError::Layout {
                path: path.to_path_buf(),
                component: "VAE",
                reason: format!(
                    "its latents have {} channels, InstructPix2Pix needs {}",
                    vae_layout.latent_channels,
                    IN_CHANNELS / 2
                ),
            });
        }

        // EMA: every UNet weight's copy, or none.
        let unet_table = ldm::unet_table(&unet_layout);
        let ema_count = unet_shapes
            .keys()
            .filter(|k| shapes.contains_key(&ldm::ema_name(k)))
            .count();
        let uses_ema = ema_count > 0;
        if uses_ema && ema_count < unet_shapes.len() {
            let missing = unet_shapes
                .keys()
                .find(|k| !shapes.contains_key(&ldm::ema_name(k)))
                .map(|k| ldm::ema_name(k))
                .unwrap_or_default();
            return Err(SingleFileError::PartialEma {
                path: path.to_path_buf(),
                missing,
            });
        }
        let prediction_type = says_v_prediction(&shapes, metadata).then_some("v_prediction");
        Ok(Self {
            path: path.to_path_buf(),
            source,
            shapes,
            unet: Component {
                prefix: ldm::UNET_PREFIX.into(),
                table: unet_table,
                ema: uses_ema,
            },
            vae: Component {
                prefix: vae_prefix.into(),
                table: ldm::vae_table(&vae_layout),
                ema: false,
            },
            clip: Component {
                prefix: ldm::CLIP_PREFIX.into(),
                table: Vec::new(),
                ema: false,
            },
            unet_config,
            vae_config,
            text_encoder_config,
            prediction_type,
            uses_ema,
        })
    }

    /// Whether `path` is an InstructPix2Pix checkpoint this program reads, looking at its tensor
    /// names and shapes only (what the model manager lists). The configs, which depend on the
    /// config folder, are not judged.
    pub fn check(path: &Path) -> Result<(), SingleFileError> {
        match Self::open(path, &Templates::default()) {
            Ok(_) | Err(SingleFileError::Config { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The UNet's weights, by diffusers' names.
    pub fn unet_backend(&self) -> Box<dyn SimpleBackend> {
        self.backend(&self.unet, "UNet")
    }

    /// The VAE's weights, by diffusers' names.
    pub fn vae_backend(&self) -> Box<dyn SimpleBackend> {
        self.backend(&self.vae, "VAE")
    }

    /// The text encoder's weights, by transformers' names (with or without `text_model.`).
    pub fn text_encoder_backend(&self) -> Box<dyn SimpleBackend> {
        self.backend(&self.clip, "text encoder")
    }

    /// The UNet's weight names (diffusers') and shapes, for LoRA checks.
    pub fn unet_shapes(&self) -> Shapes {
        self.diffusers_shapes(&self.unet)
    }

    /// The text encoder's weight names (without `text_model.`) and shapes.
    pub fn text_encoder_shapes(&self) -> Shapes {
        let mut out = Shapes::new();
        for (name, shape) in strip(&self.shapes, &self.clip.prefix) {
            let name = name
                .strip_prefix("text_model.")
                .unwrap_or(&name)
                .to_string();
            out.insert(name, shape);
        }
        out
    }

    fn diffusers_shapes(&self, component: &Component) -> Shapes {
        strip(&self.shapes, &component.prefix)
            .into_iter()
            .filter_map(|(name, shape)| {
                ldm::to_diffusers(&component.table, &name).map(|d| (d, shape))
            })
            .collect()
    }

    fn backend(&self, component: &Component, what: &'static str) -> Box<dyn SimpleBackend> {
        Box::new(Renamed {
            path: self.path.clone(),
            source: self.source.clone(),
            component: component.clone(),
            what,
        })
    }
}

/// The names under `prefix`, without it.
fn strip(shapes: &Shapes, prefix: &str) -> Shapes {
    shapes
        .range(prefix.to_string()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k[prefix.len()..].to_string(), v.clone()))
        .collect()
}

/// What a file without LDM UNet tensors is, for the message.
fn what_else(shapes: &Shapes) -> String {
    let has = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    if shapes
        .keys()
        .any(|k| k.starts_with("lora_") || k.contains(".lora_A.") || k.contains(".lora_down."))
    {
        "it is a LoRA file (give it to --lora)".into()
    } else if has("conditioner.embedders.") {
        "it is a Stable Diffusion XL checkpoint, which InstructPix2Pix models are not".into()
    } else if has("conv_in.") && has("down_blocks.") {
        "it holds one diffusers network (conv_in, down_blocks, ...), not a whole model: use its \
         diffusers folder"
            .into()
    } else if has("double_blocks.")
        || has("joint_blocks.")
        || has("model.diffusion_model.double_blocks.")
    {
        "it is a transformer-based model (Flux, SD 3), not Stable Diffusion 1.x/2.x".into()
    } else if shapes.is_empty() {
        "it holds no tensors".into()
    } else {
        "it has no model.diffusion_model.* tensors (the UNet)".into()
    }
}

/// A `v_pred` marker tensor (ComfyUI's convention) or `modelspec.prediction_type` = v.
fn says_v_prediction(shapes: &Shapes, metadata: &BTreeMap<String, String>) -> bool {
    shapes.contains_key("v_pred")
        || metadata
            .get("modelspec.prediction_type")
            .is_some_and(|p| matches!(p.trim(), "v" | "v_prediction" | "v-prediction"))
}

/// The template's value of `key`, if it is an object with it.
fn template_field<'a>(template: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    template.and_then(|t| t.get(key))
}

fn divides_all(groups: Option<&Value>, channels: &[usize]) -> Option<Value> {
    let groups = groups?.as_u64()? as usize;
    (groups > 0 && channels.iter().all(|c| c % groups == 0)).then(|| Value::from(groups))
}

/// A template's group count as a config, where it divides every block's channels: a template of
/// other sizes still knows its family's group count.
fn template_groups(template: Option<&Value>, channels: &[usize]) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    if let Some(groups) = divides_all(template_field(template, "norm_num_groups"), channels) {
        map.insert("norm_num_groups".into(), groups);
    }
    map
}

/// A config: the template's fields where it `fits` the file, else `fallback`'s, with the file's
/// own `fields` over them.
fn config_from<T: serde::de::DeserializeOwned>(
    template: Option<&Value>,
    fits: bool,
    fields: serde_json::Map<String, Value>,
    fallback: impl FnOnce() -> Result<serde_json::Map<String, Value>, String>,
) -> Result<T, String> {
    let mut config = match template {
        Some(Value::Object(map)) if fits => map.clone(),
        _ => fallback()?,
    };
    config.extend(fields);
    serde_json::from_value(Value::Object(config)).map_err(|e| e.to_string())
}

fn unet_config(layout: &UNetLayout, template: Option<&Value>) -> Result<UNetConfig, String> {
    let fields = ldm::unet_config_fields(layout);
    let fits = template.is_some_and(|t| {
        t.get("block_out_channels") == fields.get("block_out_channels")
            && t.get("cross_attention_dim") == fields.get("cross_attention_dim")
            && t.get("use_linear_projection")
                .and_then(Value::as_bool)
                .unwrap_or(false)
                == layout.use_linear_projection
    });
    let config: UNetConfig = config_from(template, fits, fields, || {
        let mut map = template_groups(template, &layout.block_out_channels);
        map.insert(
            "attention_head_dim".into(),
            ldm::default_attention_heads(layout),
        );
        Ok(map)
    })?;
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

fn vae_config(layout: &VaeLayout, template: Option<&Value>) -> Result<VaeConfig, String> {
    let fields = ldm::vae_config_fields(layout);
    let fits = template.is_some_and(|t| {
        t.get("block_out_channels") == fields.get("block_out_channels")
            && t.get("latent_channels") == fields.get("latent_channels")
    });
    let config: VaeConfig = config_from(template, fits, fields, || {
        Ok(template_groups(template, &layout.block_out_channels))
    })?;
    config.check()?;
    Ok(config)
}

fn clip_config(layout: &ClipLayout, template: Option<&Value>) -> Result<ClipTextConfig, String> {
    let fields = ldm::clip_config_fields(layout);
    let fits = template.is_some_and(|t| t.get("hidden_size") == fields.get("hidden_size"));
    let config: ClipTextConfig = config_from(template, fits, fields, || {
        if !layout.hidden_size.is_multiple_of(64) {
            return Err(format!(
                "its width {} is not a multiple of 64, so its attention heads cannot be told; \
                 give a --config folder whose text_encoder/config.json has this width",
                layout.hidden_size
            ));
        }
        let mut map = serde_json::Map::new();
        map.insert(
            "num_attention_heads".into(),
            Value::from(layout.hidden_size / 64),
        );
        map.insert("hidden_act".into(), Value::from("quick_gelu"));
        Ok(map)
    })?;
    config.check()?;
    Ok(config)
}

/// A network's weights by diffusers' names, read from the file's names.
struct Renamed {
    path: PathBuf,
    source: Arc<dyn SimpleBackend>,
    component: Component,
    what: &'static str,
}

impl Renamed {
    /// The file's full name of a diffusers name, and how its inner names were mapped.
    fn file_name(&self, name: &str) -> Option<(String, Inner)> {
        let (inner_name, inner) = if self.component.table.is_empty() {
            (name.to_string(), Inner::Same)
        } else {
            ldm::to_ldm(&self.component.table, name)?
        };
        let full = if self.component.ema {
            ldm::ema_name(&inner_name)
        } else {
            format!("{}{inner_name}", self.component.prefix)
        };
        Some((full, inner))
    }

    fn read(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let Some((file_name, inner)) = self.file_name(name) else {
            return Err(candle_core::Error::Msg(format!(
                "{}: the {} needs {name}, which has no name in the LDM layout",
                self.path.display(),
                self.what
            )));
        };
        if !self.source.contains_tensor(&file_name) {
            return Err(candle_core::Error::Msg(format!(
                "{} has no {file_name} (the {}'s {name})",
                self.path.display(),
                self.what
            )));
        }
        let tensor = self.source.get_unchecked(&file_name, dtype, device)?;
        // LDM's VAE attention projections are 1×1 convolutions; diffusers' are linear.
        if inner == Inner::VaeAttention && tensor.rank() == 4 {
            let (out, inp, h, w) = tensor.dims4()?;
            if h == 1 && w == 1 {
                return tensor.reshape((out, inp));
            }
        }
        Ok(tensor)
    }
}

impl SimpleBackend for Renamed {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.read(name, dtype, device)?;
        if tensor.shape() != &shape {
            let file_name = self.file_name(name).map(|f| f.0).unwrap_or_default();
            return Err(candle_core::Error::Msg(format!(
                "{}: {file_name} (the {}'s {name}) has shape {:?}, the config needs {:?}",
                self.path.display(),
                self.what,
                tensor.dims(),
                shape.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.read(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file_name(name)
            .is_some_and(|(file_name, _)| self.source.contains_tensor(&file_name))
    }
}
