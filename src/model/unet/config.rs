//! The UNet's config: diffusers' `unet/config.json` as [`UNetConfig`] with diffusers' defaults,
//! its validation ([`UNetConfigError`], a clear refusal of the features this module does not
//! implement), the activation functions it names, and the per-block values resolved for the
//! constructor.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{Module, Result, Tensor};
use serde::Deserialize;

use crate::model::nn::{self, GroupNorm};

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
/// The most channels a block may declare (Stable Diffusion's widest is 1,280): larger numbers
/// are damage, and would overflow the size arithmetic.
pub const MAX_CHANNELS: usize = 1 << 16;

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

/// Largest channel count or width accepted from a config (Stable Diffusion's largest is 1280).
const MAX_WIDTH: usize = 65_536;
/// Most resnets or transformer blocks per level accepted from a config (Stable Diffusion: 2, 1).
const MAX_LAYERS: usize = 64;

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
pub(super) enum Activation {
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

    pub(super) fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => nn::gelu(x),
            Self::Relu => x.relu(),
        }
    }

    /// `self.apply(norm.forward(x))`, with SiLU fused into the group norm's kernel.
    pub(super) fn apply_after_norm(self, norm: &GroupNorm, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => norm.forward_silu(x),
            _ => self.apply(&norm.forward(x)?),
        }
    }
}

/// The config with every per-block value spelled out, as the constructor needs it.
#[derive(Debug, Clone)]
pub(super) struct ResolvedConfig {
    pub(super) down_has_attention: Vec<bool>,
    pub(super) up_has_attention: Vec<bool>,
    pub(super) has_mid_block: bool,
    /// Attention heads per down block (diffusers' `attention_head_dim`).
    pub(super) heads: Vec<usize>,
    pub(super) cross_attention_dim: Vec<usize>,
    pub(super) layers_per_block: Vec<usize>,
    pub(super) transformer_layers: Vec<usize>,
    pub(super) only_cross_attention: Vec<bool>,
    pub(super) mid_only_cross_attention: bool,
    pub(super) groups: usize,
    pub(super) act: Activation,
    pub(super) time_embed_dim: usize,
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
        let text = crate::model::files::read_to_string_limited(
            path,
            crate::model::files::MAX_CONFIG_BYTES,
        )
        .map_err(|source| UNetConfigError::Read {
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

    pub(super) fn resolve(&self) -> std::result::Result<ResolvedConfig, UNetConfigError> {
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return Err(UNetConfigError::Invalid {
                field: "block_out_channels",
                message: "is empty".to_string(),
            });
        }
        if let Some(bad) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c > MAX_CHANNELS)
        {
            return Err(UNetConfigError::Invalid {
                field: "block_out_channels",
                message: format!("has {bad} channels: each must be 1 to {MAX_CHANNELS}"),
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
            // As written in the file: `8` or `[5, 10, 20, 20]`, not Rust's `Same(8)`.
            let value = match heads {
                PerBlock::Same(v) => v.to_string(),
                PerBlock::Each(vs) => format!("{vs:?}"),
            };
            return Err(UNetConfigError::Unsupported {
                field: "num_attention_heads",
                value,
                reason: "diffusers refuses it too; the head count is read from `attention_head_dim`",
            });
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
        let groups = self
            .norm_num_groups
            .ok_or_else(|| UNetConfigError::Unsupported {
                field: "norm_num_groups",
                value: "null".to_string(),
                reason: "a UNet without group norms is not implemented",
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
        let resolved = ResolvedConfig {
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
        };
        self.check_numbers(&resolved)?;
        Ok(resolved)
    }

    /// The numbers a UNet can be built from and run with: sizes at least 1 and at most
    /// [`MAX_WIDTH`] (no allocation sized by a typo), group norms that divide the channels,
    /// attention heads that divide them, and an epsilon that keeps the norms finite.
    fn check_numbers(&self, resolved: &ResolvedConfig) -> std::result::Result<(), UNetConfigError> {
        let invalid =
            |field: &'static str, message: String| UNetConfigError::Invalid { field, message };
        let widths = [
            ("in_channels", vec![self.in_channels]),
            ("out_channels", vec![self.out_channels]),
            ("block_out_channels", self.block_out_channels.clone()),
            ("cross_attention_dim", resolved.cross_attention_dim.clone()),
            ("time_embedding_dim", vec![resolved.time_embed_dim]),
            ("norm_num_groups", vec![resolved.groups]),
        ];
        for (field, values) in widths {
            if let Some(v) = values.iter().find(|&&v| v == 0 || v > MAX_WIDTH) {
                return Err(invalid(
                    field,
                    format!("is {v}: it must be between 1 and {MAX_WIDTH}"),
                ));
            }
        }
        for (field, values) in [
            ("layers_per_block", &resolved.layers_per_block),
            ("transformer_layers_per_block", &resolved.transformer_layers),
        ] {
            if let Some(v) = values.iter().find(|&&v| v == 0 || v > MAX_LAYERS) {
                return Err(invalid(
                    field,
                    format!("is {v}: it must be between 1 and {MAX_LAYERS}"),
                ));
            }
        }
        let groups = resolved.groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| !c.is_multiple_of(groups))
        {
            return Err(invalid(
                "norm_num_groups",
                format!("is {groups}, which does not divide block_out_channels entry {c}"),
            ));
        }
        for (block, (&heads, &channels)) in resolved
            .heads
            .iter()
            .zip(&self.block_out_channels)
            .enumerate()
        {
            if !channels.is_multiple_of(heads) {
                return Err(invalid(
                    "attention_head_dim",
                    format!(
                        "is {heads} heads for block {block}, which has {channels} channels: \
                         the heads must divide the channels"
                    ),
                ));
            }
        }
        // A stride-2, 3×3 downsampling halves the size only with padding 0 (diffusers pads the
        // bottom/right by one itself) or 1; more breaks the skip connections' shapes, and a
        // typo such as 1000 made every convolution a thousand times wider (found by fuzzing).
        if self.downsample_padding > 1 {
            return Err(invalid(
                "downsample_padding",
                format!("is {}: it must be 0 or 1", self.downsample_padding),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps <= 1.0) {
            return Err(invalid(
                "norm_eps",
                format!("is {}: it must be above 0 and at most 1", self.norm_eps),
            ));
        }
        if !(self.mid_block_scale_factor.is_finite() && self.mid_block_scale_factor > 0.0) {
            return Err(invalid(
                "mid_block_scale_factor",
                format!(
                    "is {}: it must be a number above 0",
                    self.mid_block_scale_factor
                ),
            ));
        }
        if !self.freq_shift.is_finite() {
            return Err(invalid(
                "freq_shift",
                format!("is {}: it must be a number", self.freq_shift),
            ));
        }
        if !(0.0..=1.0).contains(&self.dropout) {
            return Err(invalid(
                "dropout",
                format!("is {}: it must be between 0 and 1", self.dropout),
            ));
        }
        Ok(())
    }
}
