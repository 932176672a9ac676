//! The Stable Diffusion VAE: diffusers' `AutoencoderKL` (encoder, `quant_conv`, diagonal Gaussian
//! posterior, `post_quant_conv`, decoder), read from diffusers' `vae/config.json` and weight names.
//!
//! Any number of blocks is supported (the downscale factor is 2^(blocks−1)), as are the options
//! `use_quant_conv`, `use_post_quant_conv` and `mid_block_add_attention`, and the legacy attention
//! weight names (`query`/`key`/`value`/`proj_attn`) that older diffusers checkpoints carry, which
//! are mapped like diffusers maps them (`to_q`/`to_k`/`to_v`/`to_out.0`).
//!
//! The encoder's downsampling pads one zero row and column at the bottom/right before a stride-2
//! convolution, as diffusers does, so sizes that are not multiples of the factor give diffusers'
//! shapes. Everything stays differentiable.

use std::path::{Path, PathBuf};

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::nn::{Conv2d, GroupNorm, Linear, attention, attention_bf16, conv2d, group_norm};

/// diffusers builds every VAE norm with this epsilon.
const NORM_EPS: f64 = 1e-6;
/// diffusers clamps the posterior's log-variance to this range.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);
const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

/// Errors reading a VAE `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum VaeConfigError {
    /// The file could not be read.
    #[error("cannot read the VAE config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON for a VAE config (syntax, wrong type of a field).
    #[error("the VAE config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The values parse but describe a VAE this crate cannot build.
    #[error("the VAE config {path} is not usable: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

fn default_channels() -> usize {
    3
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".to_owned()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// diffusers' `AutoencoderKL` config (`vae/config.json`); missing fields take diffusers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    /// The model class diffusers recorded; only `AutoencoderKL` is accepted when present.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Image channels taken by the encoder (3).
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Image channels produced by the decoder (3).
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    /// One `DownEncoderBlock2D` per entry of `block_out_channels` (empty: assumed so).
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// One `UpDecoderBlock2D` per entry of `block_out_channels` (empty: assumed so).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels of each encoder block (the decoder mirrors them); blocks − 1 downsamplings.
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (the decoder's blocks have one more).
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    /// Only `silu` is supported (every Stable Diffusion VAE).
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    /// Channels of the latents (4 for Stable Diffusion).
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    /// Groups of every group norm; must divide every entry of `block_out_channels`.
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding (training targets) and divided by it before
    /// decoding.
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// Absent (None) for Stable Diffusion; SD3/Flux VAEs set it.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some newer VAEs record; unused by Stable Diffusion.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// See `latents_mean`.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs a float16 VAE in float32 when this is set.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    /// Whether a 1×1 `quant_conv` follows the encoder.
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    /// Whether a 1×1 `post_quant_conv` precedes the decoder.
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have their self-attention.
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Reads and checks `vae/config.json`.
    pub fn from_file(path: &Path) -> std::result::Result<Self, VaeConfigError> {
        let text = crate::model::files::read_to_string_limited(
            path,
            crate::model::files::MAX_CONFIG_BYTES,
        )
        .map_err(|source| VaeConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|source| VaeConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        config.check().map_err(|problem| VaeConfigError::Invalid {
            path: path.to_path_buf(),
            problem,
        })?;
        Ok(config)
    }

    /// How much smaller the latents are than the image, per side: 2^(blocks−1).
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// Whether the values describe a VAE this module builds; the problem in words otherwise.
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        if let Some(class) = &self.class_name
            && class != "AutoencoderKL"
        {
            return Err(format!("_class_name is {class:?}, not \"AutoencoderKL\""));
        }
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return Err("block_out_channels is empty".to_owned());
        }
        if blocks > 16 {
            return Err(format!("{blocks} blocks is more than this VAE supports"));
        }
        for (field, types, expected) in [
            ("down_block_types", &self.down_block_types, DOWN_BLOCK),
            ("up_block_types", &self.up_block_types, UP_BLOCK),
        ] {
            if types.is_empty() {
                continue;
            }
            if types.len() != blocks {
                return Err(format!(
                    "{field} has {} entries but block_out_channels has {blocks}",
                    types.len()
                ));
            }
            if let Some(other) = types.iter().find(|t| t.as_str() != expected) {
                return Err(format!(
                    "{field} contains {other:?}; only {expected} is supported"
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn {:?} is not supported (only \"silu\")",
                self.act_fn
            ));
        }
        let groups = self.norm_num_groups;
        if groups == 0 {
            return Err("norm_num_groups is 0".to_owned());
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || !c.is_multiple_of(groups))
        {
            return Err(format!(
                "block_out_channels entry {c} is not a positive multiple of norm_num_groups {groups}"
            ));
        }
        for (field, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
        ] {
            if value == 0 {
                return Err(format!("{field} is 0"));
            }
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(format!(
                "scaling_factor {} is not a positive number",
                self.scaling_factor
            ));
        }
        Ok(())
    }
}

/// `diffusers.models.resnet.ResnetBlock2D` without time embedding:
/// `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`, with a 1×1 shortcut when channels change.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        groups: usize,
    ) -> Result<Self> {
        let conv_shortcut = (in_channels != out_channels)
            .then(|| conv2d(vb.pp("conv_shortcut"), in_channels, out_channels, 1, 1, 0))
            .transpose()?;
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), groups, in_channels, NORM_EPS)?,
            conv1: conv2d(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1)?,
            norm2: group_norm(vb.pp("norm2"), groups, out_channels, NORM_EPS)?,
            conv2: conv2d(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The mid block's single-head spatial self-attention (diffusers' `Attention` with
/// `residual_connection`, group norm and `_from_deprecated_attn_block`).
#[derive(Debug, Clone)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn load(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // Older checkpoints name the projections query/key/value/proj_attn; diffusers renames
        // them on load. A builder that holds neither (a fresh VarMap) gets the current names.
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q, k, v, out) = if legacy {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        let linear = |name: &str| Linear::load(vb.pp(name), channels, channels, true);
        Ok(Self {
            group_norm: group_norm(vb.pp("group_norm"), groups, channels, NORM_EPS)?,
            to_q: linear(q)?,
            to_k: linear(k)?,
            to_v: linear(v)?,
            to_out: linear(out)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        // [B, C, H, W] → [B, H·W, C], made contiguous once for the three projections.
        let h = self
            .group_norm
            .forward(x)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&h)?;
        let k = self.to_k.forward(&h)?;
        let v = self.to_v.forward(&h)?;
        let attended = if self.to_q.uses_bf16_products() {
            attention_bf16(&q, &k, &v, 1)?
        } else {
            attention(&q, &k, &v, 1)?
        };
        let out = self.to_out.forward(&attended)?;
        let out = out
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        out + x
    }
}

/// `UNetMidBlock2D`: resnet, (attention, resnet).
#[derive(Debug, Clone)]
struct MidBlock {
    first: ResnetBlock,
    attention: Option<SpatialAttention>,
    second: ResnetBlock,
}

impl MidBlock {
    fn load(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let resnets = vb.pp("resnets");
        let attention = if add_attention {
            Some(SpatialAttention::load(
                vb.pp("attentions").pp(0),
                channels,
                groups,
            )?)
        } else {
            None
        };
        Ok(Self {
            first: ResnetBlock::load(resnets.pp(0), channels, channels, groups)?,
            attention,
            second: ResnetBlock::load(resnets.pp(1), channels, channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(&h)?;
        }
        self.second.forward(&h)
    }
}

/// Which way a VAE block resamples after its resnets.
#[derive(Debug, Clone, Copy)]
enum Resampling {
    /// `DownEncoderBlock2D`: a stride-2 convolution after padding one zero row/column at the
    /// bottom/right.
    Down,
    /// `UpDecoderBlock2D`: nearest ×2 upsampling and a 3×3 convolution.
    Up,
}

/// `DownEncoderBlock2D` or `UpDecoderBlock2D`: resnets, then (except in the last block) the
/// resampling convolution.
#[derive(Debug, Clone)]
struct ResampleBlock {
    resnets: Vec<ResnetBlock>,
    resampling: Resampling,
    resample_conv: Option<Conv2d>,
}

impl ResampleBlock {
    /// The blocks under `vb` (`down_blocks` or `up_blocks`), block `i` with `resnet_count`
    /// resnets to `channels[i]` channels, the first block taking `channels[0]`; every block but
    /// the last ends with its resampling convolution.
    fn load_chain(
        vb: VarBuilder,
        resampling: Resampling,
        resnet_count: usize,
        channels: &[usize],
        groups: usize,
    ) -> Result<Vec<Self>> {
        let mut blocks = Vec::with_capacity(channels.len());
        let mut in_channels = channels[0];
        for (i, &out_channels) in channels.iter().enumerate() {
            let block_vb = vb.pp(i);
            let resnets = (0..resnet_count)
                .map(|j| {
                    let from = if j == 0 { in_channels } else { out_channels };
                    ResnetBlock::load(block_vb.pp("resnets").pp(j), from, out_channels, groups)
                })
                .collect::<Result<Vec<_>>>()?;
            let resample_conv = if i + 1 < channels.len() {
                let (folder, stride, padding) = match resampling {
                    Resampling::Down => ("downsamplers", 2, 0),
                    Resampling::Up => ("upsamplers", 1, 1),
                };
                let conv_vb = block_vb.pp(folder).pp(0).pp("conv");
                Some(conv2d(
                    conv_vb,
                    out_channels,
                    out_channels,
                    3,
                    stride,
                    padding,
                )?)
            } else {
                None
            };
            blocks.push(Self {
                resnets,
                resampling,
                resample_conv,
            });
            in_channels = out_channels;
        }
        Ok(blocks)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h)?;
        }
        let Some(conv) = &self.resample_conv else {
            return Ok(h);
        };
        match self.resampling {
            Resampling::Down => {
                let padded = h
                    .pad_with_zeros(D::Minus1, 0, 1)?
                    .pad_with_zeros(D::Minus2, 0, 1)?;
                conv.forward(&padded)
            }
            Resampling::Up => {
                let (_, _, height, width) = h.dims4()?;
                conv.forward(&h.upsample_nearest2d(height * 2, width * 2)?)
            }
        }
    }
}

/// The encoder: image [B, in, H, W] → posterior parameters [B, 2·latent, H/f, W/f].
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<ResampleBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let channels = &config.block_out_channels;
        let groups = config.norm_num_groups;
        let conv_in = conv2d(vb.pp("conv_in"), config.in_channels, channels[0], 3, 1, 1)?;
        let down_blocks = ResampleBlock::load_chain(
            vb.pp("down_blocks"),
            Resampling::Down,
            config.layers_per_block,
            channels,
            groups,
        )?;
        let last = channels[channels.len() - 1];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::load(
                vb.pp("mid_block"),
                last,
                groups,
                config.mid_block_add_attention,
            )?,
            conv_norm_out: group_norm(vb.pp("conv_norm_out"), groups, last, NORM_EPS)?,
            conv_out: conv2d(vb.pp("conv_out"), last, 2 * config.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The decoder: latents [B, latent, h, w] → image [B, out, h·f, w·f].
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<ResampleBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let groups = config.norm_num_groups;
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let deepest = reversed[0];
        let conv_in = conv2d(vb.pp("conv_in"), config.latent_channels, deepest, 3, 1, 1)?;
        let mid_block = MidBlock::load(
            vb.pp("mid_block"),
            deepest,
            groups,
            config.mid_block_add_attention,
        )?;
        let up_blocks = ResampleBlock::load_chain(
            vb.pp("up_blocks"),
            Resampling::Up,
            config.layers_per_block + 1,
            &reversed,
            groups,
        )?;
        let first = config.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(vb.pp("conv_norm_out"), groups, first, NORM_EPS)?,
            conv_out: conv2d(vb.pp("conv_out"), first, config.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The VAE's posterior: a Gaussian with diagonal covariance per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// [B, latent, h, w].
    pub mean: Tensor,
    /// [B, latent, h, w], clamped to [−30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// The distribution's mode, its mean: what InstructPix2Pix uses for the image latents.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }

    /// The standard deviation, `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// A sample for the given N(0, 1) `noise` (same shape as the mean): `mean + std·noise`.
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        let noise = noise.to_dtype(self.mean.dtype())?;
        &self.mean + (self.std()? * noise)?
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    /// `None` once freed ([`AutoencoderKL::without_decoder`]).
    decoder: Option<Decoder>,
    config: VaeConfig,
    dtype: DType,
}

impl AutoencoderKL {
    /// Builds the VAE from `vb` at the weight file's root (`encoder.…`, `decoder.…`,
    /// `quant_conv.…`, `post_quant_conv.…`), in `vb`'s dtype.
    pub fn load(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        config.check().map_err(candle_core::Error::msg)?;
        let latent = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(conv2d(
                vb.pp("quant_conv"),
                2 * latent,
                2 * latent,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv2d(vb.pp("post_quant_conv"), latent, latent, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::load(vb.pp("encoder"), config)?,
            quant_conv,
            post_quant_conv,
            decoder: Some(Decoder::load(vb.pp("decoder"), config)?),
            config: config.clone(),
            dtype: vb.dtype(),
        })
    }

    /// `images`: [B, in_channels, H, W] with values in [−1, 1] → the posterior over latents
    /// [B, latent_channels, h, w], where each downsampling block halves H and W rounding down
    /// (H/f and W/f for multiples of the factor f), as in diffusers.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let (_, channels, _, _) = images.dims4()?;
        if channels != self.config.in_channels {
            candle_core::bail!(
                "VAE encode: the images have {channels} channels, the VAE takes {}",
                self.config.in_channels
            );
        }
        let mut moments = self.encoder.forward(&images.to_dtype(self.dtype)?)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        let latent = self.config.latent_channels;
        let mean = moments.narrow(1, 0, latent)?;
        let logvar = moments
            .narrow(1, latent, latent)?
            .clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?;
        Ok(DiagonalGaussian { mean, logvar })
    }

    /// `latents`: [B, latent_channels, h, w], already divided by `scaling_factor` → images
    /// [B, out_channels, h·f, w·f], unclamped (about [−1, 1]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, channels, _, _) = latents.dims4()?;
        if channels != self.config.latent_channels {
            candle_core::bail!(
                "VAE decode: the latents have {channels} channels, the VAE has {}",
                self.config.latent_channels
            );
        }
        let Some(decoder) = &self.decoder else {
            candle_core::bail!("VAE decode: this VAE encodes only (its decoder was freed)");
        };
        let mut z = latents.to_dtype(self.dtype)?;
        if let Some(conv) = &self.post_quant_conv {
            z = conv.forward(&z)?;
        }
        decoder.forward(&z)
    }

    /// The VAE without its decoder and `post_quant_conv` (their weights freed), for work that
    /// only encodes (training without validation edits); [`AutoencoderKL::decode`] then fails.
    pub fn without_decoder(mut self) -> Self {
        self.decoder = None;
        self.post_quant_conv = None;
        self
    }

    /// Whether [`AutoencoderKL::decode`] can run.
    pub fn has_decoder(&self) -> bool {
        self.decoder.is_some()
    }

    /// The configuration the VAE was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    use candle_core::Device;
    use candle_nn::VarMap;

    /// Tolerance against diffusers, relative to the largest reference magnitude (at least 1):
    /// float32 on both sides; the convolutions' summation orders differ, which measures ~1e-6.
    const TOLERANCE: f32 = 1e-4;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_vae")
    }

    fn weights_path(name: &str) -> PathBuf {
        fixtures()
            .join(name)
            .join("diffusion_pytorch_model.safetensors")
    }

    fn fixture_config(name: &str) -> anyhow::Result<VaeConfig> {
        Ok(VaeConfig::from_file(
            &fixtures().join(name).join("config.json"),
        )?)
    }

    fn load_refs(name: &str) -> anyhow::Result<HashMap<String, Tensor>> {
        let path = fixtures().join(format!("{name}_refs.safetensors"));
        Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
    }

    fn load_vae(name: &str) -> anyhow::Result<AutoencoderKL> {
        let config = fixture_config(name)?;
        // SAFETY: the fixture files are not modified while the test runs.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[weights_path(name)], DType::F32, &Device::Cpu)?
        };
        Ok(AutoencoderKL::load(vb, &config)?)
    }

    /// The largest absolute element.
    fn largest_abs(t: &Tensor) -> anyhow::Result<f32> {
        Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    fn check_close(what: &str, got: &Tensor, want: &Tensor) -> anyhow::Result<()> {
        assert_eq!(got.dims(), want.dims(), "{what}: shape");
        let diff = largest_abs(&(got - want)?)?;
        let scale = largest_abs(want)?.max(1.0);
        eprintln!(
            "{what} {:?}: max abs diff {diff:e} (largest |ref| {scale})",
            got.dims()
        );
        assert!(diff <= TOLERANCE * scale, "{what}: max abs diff {diff}");
        Ok(())
    }

    fn sizes(refs: &HashMap<String, Tensor>) -> Vec<String> {
        let mut tags: Vec<String> = refs
            .keys()
            .filter_map(|k| k.strip_prefix("image_").map(str::to_owned))
            .collect();
        tags.sort();
        tags
    }

    fn compare_with_diffusers(name: &str, vae: &AutoencoderKL) -> anyhow::Result<()> {
        let refs = load_refs(name)?;
        let tags = sizes(&refs);
        assert!(tags.len() >= 2, "{name}: expected several image sizes");
        for tag in tags {
            let posterior = vae.encode(&refs[&format!("image_{tag}")])?;
            check_close(
                &format!("{name} mean {tag}"),
                &posterior.mode(),
                &refs[&format!("mean_{tag}")],
            )?;
            check_close(
                &format!("{name} logvar {tag}"),
                &posterior.logvar,
                &refs[&format!("logvar_{tag}")],
            )?;
            let decoded = vae.decode(&refs[&format!("latents_{tag}")])?;
            check_close(
                &format!("{name} decode {tag}"),
                &decoded,
                &refs[&format!("decoded_{tag}")],
            )?;
        }
        Ok(())
    }

    #[test]
    fn two_block_vae_matches_diffusers() -> anyhow::Result<()> {
        let vae = load_vae("vae_two")?;
        assert_eq!(vae.config().downscale_factor(), 2);
        compare_with_diffusers("vae_two", &vae)
    }

    #[test]
    fn four_block_vae_matches_diffusers_including_sizes_off_the_factor() -> anyhow::Result<()> {
        let vae = load_vae("vae_four")?;
        assert_eq!(vae.config().downscale_factor(), 8);
        compare_with_diffusers("vae_four", &vae)
    }

    #[test]
    fn vae_without_quant_convs_or_mid_attention_matches_diffusers() -> anyhow::Result<()> {
        let vae = load_vae("vae_plain")?;
        assert!(!vae.config().use_quant_conv && !vae.config().use_post_quant_conv);
        assert!(!vae.config().mid_block_add_attention);
        compare_with_diffusers("vae_plain", &vae)
    }

    #[test]
    fn legacy_attention_names_load_to_the_same_model() -> anyhow::Result<()> {
        let name = "vae_two";
        let mut weights = candle_core::safetensors::load(weights_path(name), &Device::Cpu)?;
        let renames = [
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ];
        let attention_keys: Vec<String> = weights
            .keys()
            .filter(|k| k.contains(".attentions."))
            .cloned()
            .collect();
        let mut renamed = 0;
        for key in attention_keys {
            if let Some((new, old)) = renames.iter().find(|(new, _)| key.contains(new)) {
                let tensor = weights.remove(&key).expect("listed key");
                weights.insert(key.replace(new, old), tensor);
                renamed += 1;
            }
        }
        // Two mid-block attentions (encoder, decoder) × four projections × weight and bias.
        assert_eq!(renamed, 16);
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        let legacy = AutoencoderKL::load(vb, &fixture_config(name)?)?;
        let current = load_vae(name)?;
        let refs = load_refs(name)?;
        let image = &refs["image_64x48"];
        let latents = &refs["latents_64x48"];
        let same = |a: &Tensor, b: &Tensor| -> anyhow::Result<bool> {
            Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? == 0.0)
        };
        assert!(same(
            &legacy.encode(image)?.mean,
            &current.encode(image)?.mean
        )?);
        assert!(same(&legacy.decode(latents)?, &current.decode(latents)?)?);
        compare_with_diffusers(name, &legacy)
    }

    /// Tolerance of a float16 run against the float32 reference, relative to the largest value.
    const HALF_TOLERANCE: f32 = 2e-2;

    /// float16 runs (bfloat16 does not: candle 0.11's CPU matmul has no bf16 kernel).
    #[test]
    fn runs_in_half_precision() -> anyhow::Result<()> {
        let name = "vae_four";
        let config = fixture_config(name)?;
        let refs = load_refs(name)?;
        for dtype in [DType::F16] {
            // SAFETY: the fixture files are not modified while the test runs.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&[weights_path(name)], dtype, &Device::Cpu)?
            };
            let vae = AutoencoderKL::load(vb, &config)?;
            let mean = vae.encode(&refs["image_64x48"])?.mode();
            let decoded = vae.decode(&refs["latents_64x48"])?;
            assert_eq!((mean.dtype(), decoded.dtype()), (dtype, dtype));
            for (what, got, want) in [
                ("mean", mean, &refs["mean_64x48"]),
                ("decode", decoded, &refs["decoded_64x48"]),
            ] {
                let got = got.to_dtype(DType::F32)?;
                let diff = largest_abs(&(got - want)?)?;
                let scale = largest_abs(want)?.max(1.0);
                eprintln!("{dtype:?} {what}: max abs diff {diff:e} (largest |ref| {scale})");
                // float16 keeps ~3 significant digits per op; measured 0.1–0.4 % of the range.
                assert!(diff <= HALF_TOLERANCE * scale, "{dtype:?} {what}: {diff}");
            }
        }
        Ok(())
    }

    #[test]
    fn posterior_std_and_samples() -> anyhow::Result<()> {
        let refs = load_refs("vae_two")?;
        let posterior = DiagonalGaussian {
            mean: refs["mean_48x40"].clone(),
            logvar: refs["logvar_48x40"].clone(),
        };
        let want_std = (&posterior.logvar * 0.5)?.exp()?;
        check_close("std", &posterior.std()?, &want_std)?;
        let noise = &refs["latents_48x40"];
        let sample = posterior.sample_with(noise)?;
        let want = (&posterior.mean + (want_std * noise)?)?;
        check_close("sample", &sample, &want)?;
        let zero = posterior.sample_with(&noise.zeros_like()?)?;
        check_close("sample at zero noise", &zero, &posterior.mode())?;
        Ok(())
    }

    #[test]
    fn encode_and_decode_refuse_wrong_channel_counts() -> anyhow::Result<()> {
        let vae = load_vae("vae_plain")?;
        let gray = Tensor::zeros((1, 1, 16, 16), DType::F32, &Device::Cpu)?;
        assert!(vae.encode(&gray).is_err());
        let wrong_latents = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu)?;
        assert!(vae.decode(&wrong_latents).is_err());
        Ok(())
    }

    #[test]
    fn every_weight_gets_a_gradient() -> anyhow::Result<()> {
        let name = "vae_two";
        let config = fixture_config(name)?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let vae = AutoencoderKL::load(vb, &config)?;
        // Fill the variables with the fixture's weights (stored as float16).
        let weights = candle_core::safetensors::load(weights_path(name), &Device::Cpu)?;
        {
            let data = varmap.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?;
            assert_eq!(data.len(), weights.len(), "one variable per stored weight");
            for (key, var) in data.iter() {
                let stored = weights
                    .get(key)
                    .ok_or_else(|| anyhow::anyhow!("{key} is not in the fixture"))?;
                var.set(&stored.to_dtype(DType::F32)?)?;
            }
        }
        let refs = load_refs(name)?;
        let posterior = vae.encode(&refs["image_48x40"])?;
        let latents = posterior.sample_with(&refs["latents_48x40"])?;
        let loss = vae.decode(&latents)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let data = varmap.data().lock().map_err(|e| anyhow::anyhow!("{e}"))?;
        for (key, var) in data.iter() {
            let grad = grads
                .get(var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("{key} got no gradient"))?;
            let largest = grad.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(largest > 0.0, "{key} has an all-zero gradient");
        }
        Ok(())
    }

    fn parse(json: &str) -> std::result::Result<VaeConfig, VaeConfigError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).expect("write config");
        VaeConfig::from_file(&path)
    }

    #[test]
    fn defaults_and_downscale_factor() {
        let config = parse(r#"{"block_out_channels": [128, 256, 512, 512]}"#).expect("valid");
        assert_eq!(config.downscale_factor(), 8);
        assert_eq!(config.scaling_factor, 0.18215);
        assert!(config.use_quant_conv && config.use_post_quant_conv);
        assert!(config.mid_block_add_attention);
        assert_eq!(config.shift_factor, None);
        let config = parse(r#"{"block_out_channels": [32, 32, 64]}"#).expect("valid");
        assert_eq!(config.downscale_factor(), 4);
    }

    #[test]
    fn unusable_configs_are_refused_naming_the_file() {
        for (json, needle) in [
            (r#"{"block_out_channels": []}"#, "empty"),
            (
                r#"{"block_out_channels": [48], "norm_num_groups": 32}"#,
                "multiple",
            ),
            (r#"{"act_fn": "relu"}"#, "act_fn"),
            (
                r#"{"block_out_channels": [64, 64], "down_block_types": ["DownEncoderBlock2D"]}"#,
                "entries",
            ),
            (r#"{"_class_name": "AutoencoderTiny"}"#, "AutoencoderTiny"),
        ] {
            let err = parse(json).expect_err(json);
            assert!(
                matches!(err, VaeConfigError::Invalid { .. }),
                "{json}: {err}"
            );
            let text = err.to_string();
            assert!(
                text.contains("config.json") && text.contains(needle),
                "{text}"
            );
        }
        let err = parse("{not json").expect_err("bad JSON");
        assert!(matches!(err, VaeConfigError::Parse { .. }), "{err}");
    }
}
