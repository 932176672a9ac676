//! The denoising UNet: diffusers' `UNet2DConditionModel` as Stable Diffusion 1.x/2.x and
//! InstructPix2Pix use it, read from diffusers' `unet/config.json` and weight names.
//!
//! This file owns the config ([`UNetConfig`], with diffusers' defaults and a clear refusal of the
//! features it does not implement), the network and its blocks (resnets, transformers, down/mid/up
//! blocks, the sinusoidal timestep embedding), and the forward pass, including diffusers' handling
//! of latent sizes that are not a multiple of the total downscale factor.
//!
//! Every operation is differentiable (built on [`super::nn`]), so the same module trains. Attention
//! projections are public [`Linear`]s under the same path as diffusers' weight names
//! (`down_blocks[i].attentions[j].transformer_blocks[k].attn1.to_q`), so adapters can wrap them.
//!
//! With gradient checkpointing on ([`UNet2DConditionModel::enable_gradient_checkpointing`]),
//! every resnet and transformer of the blocks (as diffusers checkpoints them), every up- and
//! downsampler and the output head run as [`super::grad_checkpoint`] segments: a backward pass
//! recomputes them one at a time instead of keeping their activations from the forward pass.

#![warn(missing_docs)]

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::grad_checkpoint::{SegmentGradients, checkpoint};
use super::nn::{self, Conv2d, GroupNorm, LayerNorm, Linear};

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// A config value given either once for every block or as one value per down block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    Same(T),
    /// One value per down block (up blocks read the list reversed).
    Each(Vec<T>),
}

impl<T: Clone + fmt::Debug> PerBlock<T> {
    /// The value for each of `blocks` blocks, or an error naming `field` when a list has the
    /// wrong length.
    fn resolve(
        &self,
        field: &'static str,
        blocks: usize,
    ) -> std::result::Result<Vec<T>, UNetConfigError> {
        match self {
            Self::Same(value) => Ok(vec![value.clone(); blocks]),
            Self::Each(values) if values.len() == blocks => Ok(values.clone()),
            Self::Each(values) => Err(UNetConfigError::Invalid {
                field,
                message: format!(
                    "has {} entries ({values:?}) but there are {blocks} down blocks",
                    values.len()
                ),
            }),
        }
    }
}

/// `sample_size`: the latent size the model was trained at, square or (height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// Height = width.
    Square(usize),
    /// `[height, width]`.
    Rect([usize; 2]),
}

/// The fields of diffusers' `UNet2DConditionModel` config (`unet/config.json`), with diffusers'
/// defaults. Fields only meaningful for features this module refuses are kept so that
/// [`UNetConfig::validate`] can refuse them by name instead of ignoring them.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    /// Latent size the model was trained at (informational).
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    /// Channels of the sample (8 for InstructPix2Pix: noisy latents + image latents).
    #[serde(default = "default_4")]
    pub in_channels: usize,
    /// Channels of the prediction.
    #[serde(default = "default_4")]
    pub out_channels: usize,
    /// `sample = 2·sample − 1` before `conv_in`.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Timestep embedding order `cos, sin` (true) or `sin, cos`.
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// diffusers' `downscale_freq_shift` of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// `CrossAttnDownBlock2D` or `DownBlock2D`, one per level.
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    /// `UNetMidBlock2DCrossAttn`, or `null` for none.
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    /// `CrossAttnUpBlock2D` or `UpBlock2D`, one per level (deepest first).
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    /// Self-attention layers attend to the text instead (per block or for all).
    #[serde(default = "default_false_per_block")]
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each level; the length is the number of levels.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the stride-2 downsampling convolutions (0: pad bottom/right by one).
    #[serde(default = "default_1")]
    pub downsample_padding: usize,
    /// The mid block's resnets divide their output by this.
    #[serde(default = "default_1_f64")]
    pub mid_block_scale_factor: f64,
    /// Dropout probability; this module runs with inference semantics and never drops.
    #[serde(default)]
    pub dropout: f64,
    /// Activation of resnets, time embedding and output (`silu`/`swish`, `gelu`, `relu`).
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Groups of every group norm (`null` is refused).
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    /// Epsilon of the resnets' and the output's group norms.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Width of `encoder_hidden_states` (768 for SD 1.x, 1024 for SD 2.x).
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks inside each `Transformer2DModel`.
    #[serde(default = "default_1_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Refused when set (SDXL-style per-layer depths).
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Refused when set (projection of the encoder states).
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Refused when set.
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// In diffusers' legacy naming this is the *number of heads* per block (not their size).
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    /// diffusers itself refuses this field (naming issue #2011); so does this module.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Refused when true.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Transformer `proj_in`/`proj_out` are linear layers (SD 2.x) instead of 1×1 convolutions.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Refused when set (class embeddings).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Refused when set (SDXL's text/time addition embeddings).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Only used with `addition_embed_type`.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Refused when set (class embeddings).
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Attention scores in f32; this module always computes them in f32 for half precision.
    #[serde(default)]
    pub upcast_attention: bool,
    /// Only `default` (the time embedding is added) is implemented.
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    /// Refused when true.
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    /// Used by diffusers only in block types this module does not support.
    #[serde(default = "default_1_f64")]
    pub resnet_out_scale_factor: f64,
    /// Only `positional` (sinusoidal) is implemented.
    #[serde(default = "default_time_embedding_type")]
    pub time_embedding_type: String,
    /// Width of the time embedding; `block_out_channels[0] * 4` when absent.
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Refused when set.
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Refused when set.
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Refused when set (LCM-style timestep conditioning).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel size of `conv_in` (odd).
    #[serde(default = "default_3")]
    pub conv_in_kernel: usize,
    /// Kernel size of `conv_out` (odd).
    #[serde(default = "default_3")]
    pub conv_out_kernel: usize,
    /// Only used with class embeddings.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Only `default` is implemented (no GLIGEN).
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    /// Only used with class embeddings.
    #[serde(default)]
    pub class_embeddings_concat: bool,
    /// `only_cross_attention` of the mid block (defaults to the global bool).
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    /// Used by diffusers only in block types this module does not support.
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

fn default_4() -> usize {
    4
}
fn default_3() -> usize {
    3
}
fn default_1() -> usize {
    1
}
fn default_1_f64() -> f64 {
    1.0
}
fn default_true() -> bool {
    true
}
fn default_down_block_types() -> Vec<String> {
    [
        CROSS_ATTN_DOWN,
        CROSS_ATTN_DOWN,
        CROSS_ATTN_DOWN,
        PLAIN_DOWN,
    ]
    .map(String::from)
    .to_vec()
}
fn default_up_block_types() -> Vec<String> {
    [PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP]
        .map(String::from)
        .to_vec()
}
fn default_mid_block_type() -> Option<String> {
    Some(CROSS_ATTN_MID.to_string())
}
fn default_false_per_block() -> PerBlock<bool> {
    PerBlock::Same(false)
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::Same(2)
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_norm_num_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::Same(1280)
}
fn default_1_per_block() -> PerBlock<usize> {
    PerBlock::Same(1)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::Same(8)
}
fn default_resnet_time_scale_shift() -> String {
    "default".to_string()
}
fn default_time_embedding_type() -> String {
    "positional".to_string()
}
fn default_attention_type() -> String {
    "default".to_string()
}

const CROSS_ATTN_DOWN: &str = "CrossAttnDownBlock2D";
const PLAIN_DOWN: &str = "DownBlock2D";
const CROSS_ATTN_UP: &str = "CrossAttnUpBlock2D";
const PLAIN_UP: &str = "UpBlock2D";
const CROSS_ATTN_MID: &str = "UNetMidBlock2DCrossAttn";

/// Why a UNet config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UNetConfigError {
    /// The file could not be read.
    #[error("cannot read UNet config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not JSON of the expected shape.
    #[error("UNet config {path} is not a valid UNet2DConditionModel config: {source}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A feature this module does not implement.
    #[error("UNet config field `{field}` = {value} is not supported: {reason}")]
    Unsupported {
        /// The config field.
        field: &'static str,
        /// Its value, as JSON-ish text.
        value: String,
        /// What is not implemented.
        reason: &'static str,
    },
    /// A value that cannot describe a UNet.
    #[error("UNet config field `{field}` {message}")]
    Invalid {
        /// The config field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// A problem found in a config file.
    #[error("UNet config {path}: {source}")]
    InFile {
        /// The config file.
        path: PathBuf,
        /// The problem.
        source: Box<UNetConfigError>,
    },
}

/// The activation functions diffusers' `get_activation` offers that this module implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    Silu,
    Gelu,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => nn::gelu(x),
            Self::Relu => x.relu(),
        }
    }

    /// `self.apply(norm.forward(x))`, with SiLU fused into the group norm's kernel.
    fn apply_after_norm(self, norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => norm.forward_silu(x),
            _ => self.apply(&norm.forward(x)?),
        }
    }
}

/// The config with every per-block value spelled out, as the constructor needs it.
#[derive(Debug, Clone)]
struct ResolvedConfig {
    down_has_attention: Vec<bool>,
    up_has_attention: Vec<bool>,
    has_mid_block: bool,
    /// Attention heads per down block (diffusers' `attention_head_dim`).
    heads: Vec<usize>,
    cross_attention_dim: Vec<usize>,
    layers_per_block: Vec<usize>,
    transformer_layers: Vec<usize>,
    only_cross_attention: Vec<bool>,
    mid_only_cross_attention: bool,
    groups: usize,
    act: Activation,
    time_embed_dim: usize,
}

fn unsupported(
    field: &'static str,
    value: impl fmt::Debug,
    reason: &'static str,
) -> UNetConfigError {
    UNetConfigError::Unsupported {
        field,
        value: format!("{value:?}"),
        reason,
    }
}

impl UNetConfig {
    /// Reads and checks diffusers' `unet/config.json`.
    pub fn from_file(path: &Path) -> std::result::Result<Self, UNetConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| UNetConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self =
            serde_json::from_str(&text).map_err(|source| UNetConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })?;
        config.validate().map_err(|e| UNetConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        Ok(config)
    }

    /// Checks that this module implements everything the config asks for.
    pub fn validate(&self) -> std::result::Result<(), UNetConfigError> {
        self.resolve().map(|_| ())
    }

    /// Number of attention heads of each down block (diffusers reads them from
    /// `attention_head_dim`, a legacy naming quirk).
    pub fn attention_heads(&self) -> std::result::Result<Vec<usize>, UNetConfigError> {
        self.attention_head_dim
            .resolve("attention_head_dim", self.block_out_channels.len())
    }

    fn resolve(&self) -> std::result::Result<ResolvedConfig, UNetConfigError> {
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return Err(UNetConfigError::Invalid {
                field: "block_out_channels",
                message: "is empty".to_string(),
            });
        }
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return Err(UNetConfigError::Invalid {
                field: "down_block_types",
                message: format!(
                    "({} entries) and `up_block_types` ({}) must both match `block_out_channels` ({blocks})",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            });
        }
        let down_has_attention = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                CROSS_ATTN_DOWN => Ok(true),
                PLAIN_DOWN => Ok(false),
                _ => Err(unsupported(
                    "down_block_types",
                    t,
                    "only CrossAttnDownBlock2D and DownBlock2D are implemented",
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let up_has_attention = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                CROSS_ATTN_UP => Ok(true),
                PLAIN_UP => Ok(false),
                _ => Err(unsupported(
                    "up_block_types",
                    t,
                    "only CrossAttnUpBlock2D and UpBlock2D are implemented",
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let has_mid_block = match self.mid_block_type.as_deref() {
            Some(CROSS_ATTN_MID) => true,
            None => false,
            Some(other) => {
                return Err(unsupported(
                    "mid_block_type",
                    other,
                    "only UNetMidBlock2DCrossAttn (or none) is implemented",
                ));
            }
        };
        if let Some(heads) = &self.num_attention_heads {
            return Err(unsupported(
                "num_attention_heads",
                heads,
                "diffusers refuses it too; the head count is read from `attention_head_dim`",
            ));
        }
        let refusals: [(&'static str, Option<String>, &'static str); 11] = [
            (
                "class_embed_type",
                self.class_embed_type.clone(),
                "class embeddings are not implemented",
            ),
            (
                "num_class_embeds",
                self.num_class_embeds.map(|n| n.to_string()),
                "class embeddings are not implemented",
            ),
            (
                "addition_embed_type",
                self.addition_embed_type.clone(),
                "addition embeddings (SDXL and others) are not implemented",
            ),
            (
                "encoder_hid_dim",
                self.encoder_hid_dim.map(|n| n.to_string()),
                "encoder hidden-state projections are not implemented",
            ),
            (
                "encoder_hid_dim_type",
                self.encoder_hid_dim_type.clone(),
                "encoder hidden-state projections are not implemented",
            ),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.map(|n| n.to_string()),
                "timestep conditioning projections are not implemented",
            ),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.clone(),
                "an activation after the time embedding is not implemented",
            ),
            (
                "timestep_post_act",
                self.timestep_post_act.clone(),
                "an activation after the time embedding is not implemented",
            ),
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block
                    .as_ref()
                    .filter(|v| !v.is_null())
                    .map(|v| v.to_string()),
                "per-layer transformer depths of up blocks are not implemented",
            ),
            (
                "dual_cross_attention",
                self.dual_cross_attention.then(|| "true".to_string()),
                "dual transformers are not implemented",
            ),
            (
                "resnet_skip_time_act",
                self.resnet_skip_time_act.then(|| "true".to_string()),
                "resnets always apply the activation to the time embedding",
            ),
        ];
        if let Some((field, Some(value), reason)) =
            refusals.into_iter().find(|(_, value, _)| value.is_some())
        {
            return Err(UNetConfigError::Unsupported {
                field,
                value,
                reason,
            });
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "only \"default\" (additive time embedding) is implemented",
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
                "only \"positional\" (sinusoidal) is implemented",
            ));
        }
        if self.attention_type != "default" {
            return Err(unsupported(
                "attention_type",
                &self.attention_type,
                "only \"default\" is implemented (no GLIGEN)",
            ));
        }
        let groups = self.norm_num_groups.ok_or_else(|| {
            unsupported(
                "norm_num_groups",
                None::<usize>,
                "a UNet without group norms is not implemented",
            )
        })?;
        let act = Activation::parse(&self.act_fn).ok_or_else(|| {
            unsupported(
                "act_fn",
                &self.act_fn,
                "only silu/swish, gelu and relu are implemented",
            )
        })?;
        for (field, kernel) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if kernel % 2 == 0 {
                return Err(unsupported(
                    field,
                    kernel,
                    "only odd kernel sizes keep the size",
                ));
            }
        }
        let heads = self.attention_heads()?;
        if let Some(block) = heads.iter().position(|&h| h == 0) {
            return Err(UNetConfigError::Invalid {
                field: "attention_head_dim",
                message: format!("is 0 for block {block}"),
            });
        }
        let only_cross_attention = self
            .only_cross_attention
            .resolve("only_cross_attention", blocks)?;
        let mid_only_cross_attention = match (
            self.mid_block_only_cross_attention,
            &self.only_cross_attention,
        ) {
            (Some(value), _) => value,
            (None, PerBlock::Same(value)) => *value,
            (None, PerBlock::Each(_)) => false,
        };
        Ok(ResolvedConfig {
            down_has_attention,
            up_has_attention,
            has_mid_block,
            heads,
            cross_attention_dim: self
                .cross_attention_dim
                .resolve("cross_attention_dim", blocks)?,
            layers_per_block: self.layers_per_block.resolve("layers_per_block", blocks)?,
            transformer_layers: self
                .transformer_layers_per_block
                .resolve("transformer_layers_per_block", blocks)?,
            only_cross_attention,
            mid_only_cross_attention,
            groups,
            act,
            time_embed_dim: self
                .time_embedding_dim
                .unwrap_or(self.block_out_channels[0] * 4),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// diffusers' `ResnetBlock2D` with the additive ("default") time embedding.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    /// `norm1`: group norm of the input.
    pub norm1: GroupNorm,
    /// `conv1`: 3×3, in → out channels.
    pub conv1: Conv2d,
    /// `time_emb_proj`: time embedding → out channels.
    pub time_emb_proj: Linear,
    /// `norm2`: group norm before `conv2`.
    pub norm2: GroupNorm,
    /// `conv2`: 3×3, out → out channels.
    pub conv2: Conv2d,
    /// 1×1 convolution when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

/// Shared settings of the resnets of one UNet.
#[derive(Debug, Clone, Copy)]
struct ResnetSettings {
    groups: usize,
    eps: f64,
    temb_channels: usize,
    act: Activation,
}

impl ResnetBlock2D {
    fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        settings: ResnetSettings,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = if in_channels != out_channels {
            Some(nn::conv2d(
                vb.pp("conv_shortcut"),
                in_channels,
                out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: nn::group_norm(vb.pp("norm1"), settings.groups, in_channels, settings.eps)?,
            conv1: nn::conv2d(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?,
            time_emb_proj: Linear::load(
                vb.pp("time_emb_proj"),
                settings.temb_channels,
                out_channels,
                true,
            )?,
            norm2: nn::group_norm(vb.pp("norm2"), settings.groups, out_channels, settings.eps)?,
            conv2: nn::conv2d(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            conv_shortcut,
            act: settings.act,
            output_scale_factor,
        })
    }

    /// `x` [B, C_in, H, W]; `temb_activated` is the time embedding [B, T] after the activation
    /// (diffusers applies it inside every resnet; the UNet does it once for all of them).
    pub fn forward(&self, x: &Tensor, temb_activated: &Tensor) -> Result<Tensor> {
        let h = self.act.apply_after_norm(&self.norm1, x)?;
        let h = self.conv1.forward(&h)?;
        let temb = self
            .time_emb_proj
            .forward(temb_activated)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&temb)?;
        let h = self.act.apply_after_norm(&self.norm2, &h)?;
        let h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Attention` as the transformer blocks use it (no bias on q/k/v, biased output).
#[derive(Debug, Clone)]
pub struct Attention {
    /// `to_q`: queries from the hidden states.
    pub to_q: Linear,
    /// `to_k`: keys from the context (or the hidden states).
    pub to_k: Linear,
    /// `to_v`: values from the context (or the hidden states).
    pub to_v: Linear,
    /// `to_out.0` (`to_out.1` is a dropout).
    pub to_out: Linear,
    /// Number of attention heads.
    pub heads: usize,
}

impl Attention {
    fn load(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
        })
    }

    /// The four projections with their diffusers names (`to_q`, `to_k`, `to_v`, `to_out.0`),
    /// in the order diffusers registers them.
    pub fn projections(&self) -> [(&'static str, &Linear); 4] {
        [
            ("to_q", &self.to_q),
            ("to_k", &self.to_k),
            ("to_v", &self.to_v),
            ("to_out.0", &self.to_out),
        ]
    }

    /// [`Attention::projections`], mutable (to attach or remove adapters).
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("to_q", &mut self.to_q),
            ("to_k", &mut self.to_k),
            ("to_v", &mut self.to_v),
            ("to_out.0", &mut self.to_out),
        ]
    }

    /// `x` [B, N, query_dim]; `context` [B, M, context_dim] or `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = attention_in_query_chunks(&q, &k, &v, self.heads, ATTENTION_SCORES_BUDGET)?;
        self.to_out.forward(&out)
    }
}

/// Most attention-score elements one [`nn::attention`] call may hold at inference: 32 Mi f32
/// (128 MiB). At 512×512 a self-attention of the first level has 3·8·4096² scores (1.6 GB, and
/// the scaled and softmaxed copies beside them); split by query rows it stays near this budget.
const ATTENTION_SCORES_BUDGET: usize = 32 << 20;

/// [`nn::attention`], computed for chunks of query rows when the score matrix would exceed
/// `max_scores` elements and no gradient is tracked. Each query row's result depends only on
/// that row, so the chunks concatenate to the same output.
fn attention_in_query_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    max_scores: usize,
) -> Result<Tensor> {
    let (batch, q_len, _) = q.dims3()?;
    let kv_len = k.dim(1)?;
    let scores_per_row = batch * heads * kv_len;
    if scores_per_row * q_len <= max_scores || nn::needs_backward(q) || nn::needs_backward(k) {
        return nn::attention(q, k, v, heads);
    }
    let rows = (max_scores / scores_per_row.max(1)).max(1);
    let chunks = (0..q_len)
        .step_by(rows)
        .map(|start| {
            let q_chunk = q.narrow(1, start, rows.min(q_len - start))?;
            nn::attention(&q_chunk, k, v, heads)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&chunks, 1)
}

/// diffusers' `FeedForward` with its default GEGLU activation: `net.0.proj` (dim → 2·inner, the
/// value half then the gate half), `value · gelu(gate)`, then `net.2` (inner → dim).
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// Rows `0..inner` of `net.0.proj` (a view of the loaded weight, so its gradient reaches it).
    pub value_proj: Linear,
    /// Rows `inner..2·inner` of `net.0.proj`.
    pub gate_proj: Linear,
    /// `net.2`: inner → dim.
    pub proj_out: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner_dim = dim * 4;
        // Two products on the halves of the weight give contiguous value and gate tensors,
        // where slicing one product's output would make the activation and product strided.
        let proj = Linear::load(vb.pp("net").pp("0").pp("proj"), dim, inner_dim * 2, true)?;
        let half = |start: usize| -> Result<Linear> {
            Ok(Linear::new(
                proj.weight.narrow(0, start, inner_dim)?,
                match &proj.bias {
                    Some(bias) => Some(bias.narrow(0, start, inner_dim)?),
                    None => None,
                },
            ))
        };
        Ok(Self {
            value_proj: half(0)?,
            gate_proj: half(inner_dim)?,
            proj_out: Linear::load(vb.pp("net").pp("2"), inner_dim, dim, true)?,
        })
    }

    /// `x` [B, N, dim].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let value = self.value_proj.forward(x)?;
        let gate = nn::gelu(&self.gate_proj.forward(x)?)?;
        self.proj_out.forward(&(value * gate)?)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    /// Layer norm before self-attention.
    pub norm1: LayerNorm,
    /// Self-attention (attends to the text when `only_cross_attention`).
    pub attn1: Attention,
    /// Layer norm before cross-attention.
    pub norm2: LayerNorm,
    /// Cross-attention to the text.
    pub attn2: Attention,
    /// Layer norm before the feed-forward.
    pub norm3: LayerNorm,
    /// GEGLU feed-forward.
    pub ff: FeedForward,
    /// `attn1` attends to the text too (`only_cross_attention`).
    pub only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn load(vb: VarBuilder, dim: usize, spec: &TransformerSpec) -> Result<Self> {
        let self_context_dim = if spec.only_cross_attention {
            spec.cross_attention_dim
        } else {
            dim
        };
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, TRANSFORMER_NORM_EPS)?,
            attn1: Attention::load(
                vb.pp("attn1"),
                dim,
                self_context_dim,
                spec.heads,
                spec.head_dim,
            )?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, TRANSFORMER_NORM_EPS)?,
            attn2: Attention::load(
                vb.pp("attn2"),
                dim,
                spec.cross_attention_dim,
                spec.heads,
                spec.head_dim,
            )?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, TRANSFORMER_NORM_EPS)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
            only_cross_attention: spec.only_cross_attention,
        })
    }

    /// `x` [B, N, dim], `context` [B, M, cross_attention_dim].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let self_context = self.only_cross_attention.then_some(context);
        let x = (self.attn1.forward(&self.norm1.forward(x)?, self_context)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// The transformer blocks' layer-norm epsilon (diffusers' `Transformer2DModel` default; the UNet
/// does not pass its `norm_eps` down).
const TRANSFORMER_NORM_EPS: f64 = 1e-5;
/// The group-norm epsilon of `Transformer2DModel`'s input norm (fixed in diffusers).
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;

/// Shape of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
struct TransformerSpec {
    heads: usize,
    head_dim: usize,
    layers: usize,
    cross_attention_dim: usize,
    only_cross_attention: bool,
    use_linear_projection: bool,
    groups: usize,
}

/// diffusers' `Transformer2DModel` on continuous (latent image) inputs.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    /// Group norm of the input (eps 1e-6).
    pub norm: GroupNorm,
    /// `proj_in`: a linear layer, or a 1×1 convolution applied as the same linear map on the
    /// channels-last layout (its weight is the convolution's, reshaped).
    pub proj_in: Linear,
    /// The transformer blocks, applied in order.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// `proj_out`, like `proj_in`.
    pub proj_out: Linear,
}

impl Transformer2DModel {
    fn load(vb: VarBuilder, channels: usize, spec: &TransformerSpec) -> Result<Self> {
        let inner = spec.heads * spec.head_dim;
        let projection = |vb: VarBuilder, in_dim: usize, out_dim: usize| -> Result<Linear> {
            if spec.use_linear_projection {
                Linear::load(vb, in_dim, out_dim, true)
            } else {
                let weight = vb
                    .get((out_dim, in_dim, 1, 1), "weight")?
                    .reshape((out_dim, in_dim))?;
                let bias = vb.get(out_dim, "bias")?;
                Ok(Linear::new(weight, Some(bias)))
            }
        };
        let transformer_blocks = (0..spec.layers)
            .map(|i| BasicTransformerBlock::load(vb.pp("transformer_blocks").pp(i), inner, spec))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: nn::group_norm(
                vb.pp("norm"),
                spec.groups,
                channels,
                TRANSFORMER_GROUP_NORM_EPS,
            )?,
            proj_in: projection(vb.pp("proj_in"), channels, inner)?,
            transformer_blocks,
            proj_out: projection(vb.pp("proj_out"), inner, channels)?,
        })
    }

    /// `x` [B, C, H, W], `context` [B, M, cross_attention_dim]; returns [B, C, H, W].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let h = self.norm.forward(x)?;
        // Channels last: [B, H·W, C]. A 1×1 convolution before the permute (diffusers' order for
        // conv projections) is the same linear map as this one after it.
        let h = h
            .permute((0, 2, 3, 1))?
            .reshape((batch, height * width, channels))?;
        let mut h = self.proj_in.forward(&h)?;
        for block in &self.transformer_blocks {
            h = block.forward(&h, context)?;
        }
        let h = self.proj_out.forward(&h)?;
        let h = h
            .reshape((batch, height, width, channels))?
            .permute((0, 3, 1, 2))?;
        h + x
    }
}

/// diffusers' `Downsample2D` with a convolution (`downsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Downsample2D {
    /// 3×3 stride-2 convolution.
    pub conv: Conv2d,
    /// `downsample_padding` 0: pad one zero row/column at the bottom/right first.
    pad_bottom_right: bool,
}

impl Downsample2D {
    fn load(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: nn::conv2d(vb.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_bottom_right: padding == 0,
        })
    }

    /// Halves the spatial size (rounding up).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.pad_bottom_right {
            x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?
        } else {
            x.clone()
        };
        // The failing backward runs whenever the convolution is in a differentiated graph, even
        // if only its weight is a variable.
        let x = if nn::needs_backward(&x) || nn::needs_backward(self.conv.weight()) {
            self.pad_for_backward(&x)?
        } else {
            x
        };
        self.conv.forward(&x)
    }

    /// candle's conv2d backward rebuilds the input gradient with a transposed convolution whose
    /// `output_padding` it derives from the height alone, so a stride-2 convolution of, say, a
    /// 4×3 input fails in backward (4×4 gradient). Zero rows/columns at the bottom/right that the
    /// convolution never reads (they only extend its existing zero padding) give both dimensions
    /// the same remainder without changing the output.
    fn pad_for_backward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let cfg = self.conv.config();
        let kernel = self.conv.weight().dim(2)?;
        let remainder = |size: usize| -> usize {
            let padded = size + 2 * cfg.padding;
            let outputs = (padded - kernel) / cfg.stride + 1;
            // The size a transposed convolution would rebuild, without output padding.
            let rebuilt = (outputs - 1) * cfg.stride + kernel;
            padded - rebuilt
        };
        let (rem_h, rem_w) = (remainder(height), remainder(width));
        let target = rem_h.max(rem_w);
        x.pad_with_zeros(2, 0, target - rem_h)?
            .pad_with_zeros(3, 0, target - rem_w)
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour ×2 (or to a given size), then a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    /// 3×3 convolution after the upsampling.
    pub conv: Conv2d,
}

impl Upsample2D {
    fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: nn::conv2d(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// `size`: the output (height, width); twice the input when `None`.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let (out_h, out_w) = size.unwrap_or((height * 2, width * 2));
        self.conv.forward(&upsample_nearest(x, out_h, out_w)?)
    }
}

/// torch's `F.interpolate(mode="nearest")` on [B, C, H, W]: source index
/// `floor(dst · (in / out))` computed in f32, as torch does.
fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (batch, channels, height, width) = x.dims4()?;
    if out_h == height * 2 && out_w == width * 2 {
        if nn::needs_backward(x) {
            // candle's upsample kernel's backward overwrites instead of accumulating; this
            // broadcast form differentiates as a plain sum.
            x.reshape((batch, channels, height, 1, width, 1))?
                .broadcast_as((batch, channels, height, 2, width, 2))?
                .reshape((batch, channels, out_h, out_w))
        } else {
            x.upsample_nearest2d(out_h, out_w)
        }
    } else {
        let indices = |input: usize, output: usize| -> Result<Tensor> {
            let scale = input as f32 / output as f32;
            let idx: Vec<u32> = (0..output)
                .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32)
                .collect();
            Tensor::from_vec(idx, output, x.device())
        };
        x.index_select(&indices(height, out_h)?, 2)?
            .index_select(&indices(width, out_w)?, 3)
    }
}

/// One down block: `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    /// Resnets, in order.
    pub resnets: Vec<ResnetBlock2D>,
    /// One transformer after each resnet, or empty for `DownBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    /// Stride-2 downsampler, absent in the deepest block.
    pub downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Returns the output and the states kept for the skip connections (one per resnet, plus
    /// the downsampled output).
    pub fn forward(
        &self,
        x: &Tensor,
        temb_activated: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        self.forward_segments(Segments::Direct, x, temb_activated, context)
    }

    fn forward_segments(
        &self,
        segments: Segments,
        x: &Tensor,
        temb_activated: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut states = Vec::with_capacity(self.resnets.len() + 1);
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = segments.resnet(resnet, &h, None, temb_activated)?;
            if let Some(attention) = self.attentions.get(i) {
                h = segments.transformer(attention, &h, context)?;
            }
            states.push(h.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            h = segments.downsample(downsampler, &h)?;
            states.push(h.clone());
        }
        Ok((h, states))
    }
}

/// `UNetMidBlock2DCrossAttn`: a resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock {
    /// `resnets.0` then one resnet after each transformer.
    pub resnets: Vec<ResnetBlock2D>,
    /// Transformers between the resnets.
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    /// `x` [B, C, h, w] at the deepest level; returns the same shape.
    pub fn forward(&self, x: &Tensor, temb_activated: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.forward_segments(Segments::Direct, x, temb_activated, context)
    }

    fn forward_segments(
        &self,
        segments: Segments,
        x: &Tensor,
        temb_activated: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let Some((first, rest)) = self.resnets.split_first() else {
            return Ok(x.clone());
        };
        let mut h = segments.resnet(first, x, None, temb_activated)?;
        for (attention, resnet) in self.attentions.iter().zip(rest) {
            h = segments.transformer(attention, &h, context)?;
            h = segments.resnet(resnet, &h, None, temb_activated)?;
        }
        Ok(h)
    }
}

/// One up block: `CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock {
    /// Resnets, each taking the previous output concatenated with a skip state.
    pub resnets: Vec<ResnetBlock2D>,
    /// One transformer after each resnet, or empty for `UpBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    /// Upsampler, absent in the last (full-resolution) block.
    pub upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `skips`: this block's skip states in the order they were produced (one per resnet; the
    /// last is concatenated first). `upsample_size` forces the upsampler's output size.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &[Tensor],
        temb_activated: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        self.forward_segments(
            Segments::Direct,
            x,
            skips,
            temb_activated,
            context,
            upsample_size,
        )
    }

    fn forward_segments(
        &self,
        segments: Segments,
        x: &Tensor,
        skips: &[Tensor],
        temb_activated: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        if skips.len() != self.resnets.len() {
            candle_core::bail!(
                "UNet up block needs {} skip states, got {}",
                self.resnets.len(),
                skips.len()
            );
        }
        let mut h = x.clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = segments.resnet(resnet, &h, Some(skip), temb_activated)?;
            if let Some(attention) = self.attentions.get(i) {
                h = segments.transformer(attention, &h, context)?;
            }
        }
        match &self.upsampler {
            Some(upsampler) => segments.upsample(upsampler, &h, upsample_size),
            None => Ok(h),
        }
    }
}

/// diffusers' sinusoidal `get_timestep_embedding` with `scale` 1 and `max_period` 10000:
/// timesteps [B] (f32) → [B, dim] (f32).
fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    // As torch: exponent = -ln(10000)·i in f32, divided by (half − shift), exp in f32.
    let log_period = -(10000f64.ln()) as f32;
    let denominator = (half as f64 - freq_shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_period * i as f32) / denominator).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[&cos, &sin], 1)?
    } else {
        Tensor::cat(&[&sin, &cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoint segments
// ---------------------------------------------------------------------------------------------

/// How the blocks run their parts: directly, or each resnet, transformer and sampler as a
/// gradient-checkpoint segment whose weight gradients go to the given store.
#[derive(Clone, Copy)]
enum Segments<'a> {
    Direct,
    Checkpointed(&'a SegmentGradients),
}

impl Segments<'_> {
    /// `resnet(cat[x, skip])` (the skip concatenated on the channels, as up blocks do); the
    /// concatenation is inside the segment, so the outer graph keeps only `x` and `skip`.
    fn resnet(
        self,
        resnet: &ResnetBlock2D,
        x: &Tensor,
        skip: Option<&Tensor>,
        temb_activated: &Tensor,
    ) -> Result<Tensor> {
        match (self, skip) {
            (Self::Direct, None) => resnet.forward(x, temb_activated),
            (Self::Direct, Some(skip)) => {
                resnet.forward(&Tensor::cat(&[x, skip], 1)?, temb_activated)
            }
            (Self::Checkpointed(grads), None) => {
                let resnet = resnet.clone();
                checkpoint(&[x, temb_activated], grads, move |i| {
                    resnet.forward(&i[0], &i[1])
                })
            }
            (Self::Checkpointed(grads), Some(skip)) => {
                let resnet = resnet.clone();
                checkpoint(&[x, skip, temb_activated], grads, move |i| {
                    resnet.forward(&Tensor::cat(&[&i[0], &i[1]], 1)?, &i[2])
                })
            }
        }
    }

    fn transformer(
        self,
        transformer: &Transformer2DModel,
        x: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Self::Direct => transformer.forward(x, context),
            Self::Checkpointed(grads) => {
                let transformer = transformer.clone();
                checkpoint(&[x, context], grads, move |i| {
                    transformer.forward(&i[0], &i[1])
                })
            }
        }
    }

    fn downsample(self, downsampler: &Downsample2D, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Direct => downsampler.forward(x),
            Self::Checkpointed(grads) => {
                let downsampler = downsampler.clone();
                checkpoint(&[x], grads, move |i| downsampler.forward(&i[0]))
            }
        }
    }

    fn upsample(
        self,
        upsampler: &Upsample2D,
        x: &Tensor,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        match self {
            Self::Direct => upsampler.forward(x, size),
            Self::Checkpointed(grads) => {
                let upsampler = upsampler.clone();
                checkpoint(&[x], grads, move |i| upsampler.forward(&i[0], size))
            }
        }
    }
}

/// The UNet's output head as one segment: group norm, activation, `conv_out`.
struct OutputHead {
    norm: GroupNorm,
    conv: Conv2d,
    act: Activation,
}

impl OutputHead {
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        self.conv
            .forward(&self.act.apply_after_norm(&self.norm, h)?)
    }
}

// ---------------------------------------------------------------------------------------------
// The UNet
// ---------------------------------------------------------------------------------------------

/// diffusers' `UNet2DConditionModel` (Stable Diffusion 1.x/2.x, InstructPix2Pix).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    /// `conv_in`: in_channels → `block_out_channels[0]`.
    pub conv_in: Conv2d,
    /// `time_embedding.linear_1`.
    pub time_linear_1: Linear,
    /// `time_embedding.linear_2`.
    pub time_linear_2: Linear,
    /// Down blocks, highest resolution first.
    pub down_blocks: Vec<DownBlock>,
    /// The mid block, if the config has one.
    pub mid_block: Option<MidBlock>,
    /// Up blocks, lowest resolution first.
    pub up_blocks: Vec<UpBlock>,
    /// `conv_norm_out`: group norm before the output convolution.
    pub conv_norm_out: GroupNorm,
    /// `conv_out`: `block_out_channels[0]` → out_channels.
    pub conv_out: Conv2d,
    config: UNetConfig,
    act: Activation,
    /// Where checkpointed segments put their weights' gradients; `None`: no checkpointing.
    checkpointing: Option<SegmentGradients>,
}

impl UNet2DConditionModel {
    /// Builds the network from diffusers' weight names under `vb` (the root of
    /// `diffusion_pytorch_model.safetensors`). The dtype and device are `vb`'s.
    pub fn load(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let resolved = config.resolve().map_err(candle_core::Error::wrap)?;
        let channels = &config.block_out_channels;
        let blocks = channels.len();
        let settings = ResnetSettings {
            groups: resolved.groups,
            eps: config.norm_eps,
            temb_channels: resolved.time_embed_dim,
            act: resolved.act,
        };
        let transformer_spec =
            |block: usize, out_channels: usize, heads: usize, layers: usize, only_cross: bool| {
                TransformerSpec {
                    heads,
                    head_dim: out_channels / heads,
                    layers,
                    cross_attention_dim: resolved.cross_attention_dim[block],
                    only_cross_attention: only_cross,
                    use_linear_projection: config.use_linear_projection,
                    groups: resolved.groups,
                }
            };

        let conv_in = nn::conv2d(
            vb.pp("conv_in"),
            config.in_channels,
            channels[0],
            config.conv_in_kernel,
            1,
            (config.conv_in_kernel - 1) / 2,
        )?;
        let time_linear_1 = Linear::load(
            vb.pp("time_embedding").pp("linear_1"),
            channels[0],
            resolved.time_embed_dim,
            true,
        )?;
        let time_linear_2 = Linear::load(
            vb.pp("time_embedding").pp("linear_2"),
            resolved.time_embed_dim,
            resolved.time_embed_dim,
            true,
        )?;

        let mut down_blocks = Vec::with_capacity(blocks);
        let mut output_channels = channels[0];
        for (i, &block_channels) in channels.iter().enumerate() {
            let vb_block = vb.pp("down_blocks").pp(i);
            let input_channels = output_channels;
            output_channels = block_channels;
            let is_final = i == blocks - 1;
            let layers = resolved.layers_per_block[i];
            let spec = transformer_spec(
                i,
                output_channels,
                resolved.heads[i],
                resolved.transformer_layers[i],
                resolved.only_cross_attention[i],
            );
            let mut resnets = Vec::with_capacity(layers);
            let mut attentions = Vec::new();
            for j in 0..layers {
                let resnet_in = if j == 0 {
                    input_channels
                } else {
                    output_channels
                };
                resnets.push(ResnetBlock2D::load(
                    vb_block.pp("resnets").pp(j),
                    resnet_in,
                    output_channels,
                    settings,
                    1.0,
                )?);
                if resolved.down_has_attention[i] {
                    attentions.push(Transformer2DModel::load(
                        vb_block.pp("attentions").pp(j),
                        output_channels,
                        &spec,
                    )?);
                }
            }
            let downsampler = if is_final {
                None
            } else {
                Some(Downsample2D::load(
                    vb_block.pp("downsamplers").pp(0),
                    output_channels,
                    config.downsample_padding,
                )?)
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let last = blocks - 1;
        let mid_block = if resolved.has_mid_block {
            let vb_mid = vb.pp("mid_block");
            let mid_channels = channels[last];
            let spec = transformer_spec(
                last,
                mid_channels,
                resolved.heads[last],
                resolved.transformer_layers[last],
                resolved.mid_only_cross_attention,
            );
            let resnet = |j: usize| {
                ResnetBlock2D::load(
                    vb_mid.pp("resnets").pp(j),
                    mid_channels,
                    mid_channels,
                    settings,
                    config.mid_block_scale_factor,
                )
            };
            Some(MidBlock {
                resnets: vec![resnet(0)?, resnet(1)?],
                attentions: vec![Transformer2DModel::load(
                    vb_mid.pp("attentions").pp(0),
                    mid_channels,
                    &spec,
                )?],
            })
        } else {
            None
        };

        let mut up_blocks = Vec::with_capacity(blocks);
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut output_channels = reversed[0];
        for i in 0..blocks {
            let vb_block = vb.pp("up_blocks").pp(i);
            let down_index = last - i;
            let prev_output_channels = output_channels;
            output_channels = reversed[i];
            let input_channels = reversed[(i + 1).min(last)];
            let is_final = i == last;
            let layers = resolved.layers_per_block[down_index] + 1;
            let spec = transformer_spec(
                down_index,
                output_channels,
                resolved.heads[down_index],
                resolved.transformer_layers[down_index],
                resolved.only_cross_attention[down_index],
            );
            let mut resnets = Vec::with_capacity(layers);
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip_channels = if j == layers - 1 {
                    input_channels
                } else {
                    output_channels
                };
                let resnet_in = if j == 0 {
                    prev_output_channels
                } else {
                    output_channels
                };
                resnets.push(ResnetBlock2D::load(
                    vb_block.pp("resnets").pp(j),
                    resnet_in + skip_channels,
                    output_channels,
                    settings,
                    1.0,
                )?);
                if resolved.up_has_attention[i] {
                    attentions.push(Transformer2DModel::load(
                        vb_block.pp("attentions").pp(j),
                        output_channels,
                        &spec,
                    )?);
                }
            }
            let upsampler = if is_final {
                None
            } else {
                Some(Upsample2D::load(
                    vb_block.pp("upsamplers").pp(0),
                    output_channels,
                )?)
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        let conv_norm_out = nn::group_norm(
            vb.pp("conv_norm_out"),
            resolved.groups,
            channels[0],
            config.norm_eps,
        )?;
        let conv_out = nn::conv2d(
            vb.pp("conv_out"),
            channels[0],
            config.out_channels,
            config.conv_out_kernel,
            1,
            (config.conv_out_kernel - 1) / 2,
        )?;
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: config.clone(),
            act: resolved.act,
            checkpointing: None,
        })
    }

    /// The config this network was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Turns gradient checkpointing on (diffusers' `enable_gradient_checkpointing`): forward
    /// passes that build a graph keep only the inputs of each resnet, transformer, sampler and
    /// the output head, and backward recomputes them. The gradients of the weights inside those
    /// segments do not appear in the outer `backward()`'s store but in the returned
    /// [`SegmentGradients`] (also [`UNet2DConditionModel::segment_gradients`]): add them to the
    /// outer ones. Forward passes without a graph (inference) are unaffected.
    pub fn enable_gradient_checkpointing(&mut self) -> SegmentGradients {
        self.checkpointing
            .get_or_insert_with(SegmentGradients::new)
            .clone()
    }

    /// Turns gradient checkpointing off.
    pub fn disable_gradient_checkpointing(&mut self) {
        self.checkpointing = None;
    }

    /// The store of the checkpointed segments' weight gradients, when checkpointing is on.
    pub fn segment_gradients(&self) -> Option<&SegmentGradients> {
        self.checkpointing.as_ref()
    }

    /// Every attention of the transformers with its diffusers module path
    /// (`down_blocks.0.attentions.1.transformer_blocks.0.attn2`), in the order diffusers
    /// registers the modules: down blocks, up blocks, then the mid block.
    pub fn attentions(&self) -> Vec<(String, &Attention)> {
        let mut out = Vec::new();
        for (path, transformer) in self.transformers() {
            for (k, block) in transformer.transformer_blocks.iter().enumerate() {
                let prefix = format!("{path}.transformer_blocks.{k}");
                out.push((format!("{prefix}.attn1"), &block.attn1));
                out.push((format!("{prefix}.attn2"), &block.attn2));
            }
        }
        out
    }

    /// [`UNet2DConditionModel::attentions`], mutable (to attach or remove adapters).
    pub fn attentions_mut(&mut self) -> Vec<(String, &mut Attention)> {
        let mut out = Vec::new();
        for (path, transformer) in self.transformers_mut() {
            for (k, block) in transformer.transformer_blocks.iter_mut().enumerate() {
                let prefix = format!("{path}.transformer_blocks.{k}");
                out.push((format!("{prefix}.attn1"), &mut block.attn1));
                out.push((format!("{prefix}.attn2"), &mut block.attn2));
            }
        }
        out
    }

    /// Every `Transformer2DModel` with its module path, in diffusers' registration order.
    fn transformers(&self) -> Vec<(String, &Transformer2DModel)> {
        let mut out = Vec::new();
        for (i, block) in self.down_blocks.iter().enumerate() {
            for (j, t) in block.attentions.iter().enumerate() {
                out.push((format!("down_blocks.{i}.attentions.{j}"), t));
            }
        }
        for (i, block) in self.up_blocks.iter().enumerate() {
            for (j, t) in block.attentions.iter().enumerate() {
                out.push((format!("up_blocks.{i}.attentions.{j}"), t));
            }
        }
        if let Some(mid) = &self.mid_block {
            for (j, t) in mid.attentions.iter().enumerate() {
                out.push((format!("mid_block.attentions.{j}"), t));
            }
        }
        out
    }

    /// [`UNet2DConditionModel::transformers`], mutable.
    fn transformers_mut(&mut self) -> Vec<(String, &mut Transformer2DModel)> {
        let mut out = Vec::new();
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            for (j, t) in block.attentions.iter_mut().enumerate() {
                out.push((format!("down_blocks.{i}.attentions.{j}"), t));
            }
        }
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            for (j, t) in block.attentions.iter_mut().enumerate() {
                out.push((format!("up_blocks.{i}.attentions.{j}"), t));
            }
        }
        if let Some(mid) = &mut self.mid_block {
            for (j, t) in mid.attentions.iter_mut().enumerate() {
                out.push((format!("mid_block.attentions.{j}"), t));
            }
        }
        out
    }

    /// Predicts the noise (or v) for `sample` `[B, in_channels, h, w]` at `timesteps` (f32
    /// `[B]`, or a scalar / `[1]` shared by the batch; fractional values allowed), conditioned on
    /// `encoder_hidden_states` `[B, tokens, cross_attention_dim]`. Returns
    /// `[B, out_channels, h, w]` in the sample's dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let (batch, in_channels, height, width) = sample.dims4()?;
        if in_channels != self.config.in_channels {
            candle_core::bail!(
                "UNet sample has {in_channels} channels, the model takes {}",
                self.config.in_channels
            );
        }
        let context_batch = encoder_hidden_states.dims3()?.0;
        if context_batch != batch {
            candle_core::bail!(
                "UNet encoder_hidden_states has batch {context_batch}, the sample has {batch}"
            );
        }
        let dtype = sample.dtype();

        // 1. Time: the sinusoidal embedding in f32, then cast, as diffusers does.
        let timesteps = timesteps
            .to_device(sample.device())?
            .to_dtype(DType::F32)?
            .flatten_all()?;
        let timesteps = match timesteps.dim(0)? {
            1 => timesteps.broadcast_as(batch)?,
            n if n == batch => timesteps,
            n => candle_core::bail!("UNet got {n} timesteps for a batch of {batch}"),
        };
        let t_emb = timestep_embedding(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(dtype)?;
        let emb = self.time_linear_1.forward(&t_emb)?;
        let emb = self.time_linear_2.forward(&self.act.apply(&emb)?)?;
        let temb_activated = self.act.apply(&emb)?;

        // 2. Down.
        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        let segments = match &self.checkpointing {
            Some(grads) => Segments::Checkpointed(grads),
            None => Segments::Direct,
        };
        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, states) =
                block.forward_segments(segments, &h, &temb_activated, encoder_hidden_states)?;
            h = out;
            skips.extend(states);
        }

        // 3. Mid.
        if let Some(mid) = &self.mid_block {
            h = mid.forward_segments(segments, &h, &temb_activated, encoder_hidden_states)?;
        }

        // 4. Up. When the input size is not a multiple of the total downscale factor, each
        // upsampler is told to match the size of the skip state it will be concatenated with.
        let upsamplers = self.up_blocks.len().saturating_sub(1) as u32;
        let factor = 2usize.pow(upsamplers);
        let forward_upsample_size = height % factor != 0 || width % factor != 0;
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            let Some(split) = skips.len().checked_sub(block.resnets.len()) else {
                candle_core::bail!("UNet up block {i} has more resnets than skip states");
            };
            let block_skips = skips.split_off(split);
            let upsample_size = match skips.last() {
                Some(next_skip) if i != last && forward_upsample_size => {
                    let (_, _, h, w) = next_skip.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            h = block.forward_segments(
                segments,
                &h,
                &block_skips,
                &temb_activated,
                encoder_hidden_states,
                upsample_size,
            )?;
        }

        // 5. Out.
        match segments {
            Segments::Direct => self.forward_head(&h),
            Segments::Checkpointed(grads) => {
                let head = OutputHead {
                    norm: self.conv_norm_out.clone(),
                    conv: self.conv_out.clone(),
                    act: self.act,
                };
                checkpoint(&[&h], grads, move |i| head.forward(&i[0]))
            }
        }
    }

    /// The output head: norm, activation, `conv_out`.
    fn forward_head(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.act.apply_after_norm(&self.conv_norm_out, h)?;
        self.conv_out.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn attention_split_by_query_rows_equals_one_call() {
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 37, 16), &device).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 23, 16), &device).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 23, 16), &device).unwrap();
        let whole = nn::attention(&q, &k, &v, 4).unwrap();
        // 2·4·23 scores per query row: a budget of 5 rows gives 8 chunks, the last one short.
        let chunked = attention_in_query_chunks(&q, &k, &v, 4, 5 * 2 * 4 * 23).unwrap();
        assert_eq!(chunked.dims(), whole.dims());
        let diff = (chunked - &whole)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Row-independent maths; only the matrix products' blocking may differ (f32 ulps).
        assert!(diff < 1e-6, "{diff}");
    }
}
