//! The UNet's building blocks other than attention: diffusers' `ResnetBlock2D`, the down- and
//! upsamplers, the down/mid/up blocks, the sinusoidal timestep embedding, and [`Segments`], which
//! runs a block's parts either directly or as gradient-checkpoint segments.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::Transformer2DModel;
use super::config::Activation;
use crate::model::grad_checkpoint::{SegmentGradients, checkpoint};
use crate::model::nn::{self, Conv2d, GroupNorm, Linear};

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
pub(super) struct ResnetSettings {
    pub(super) groups: usize,
    pub(super) eps: f64,
    pub(super) temb_channels: usize,
    pub(super) act: Activation,
}

impl ResnetBlock2D {
    pub(super) fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        settings: ResnetSettings,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let conv_shortcut = (in_channels != out_channels)
            .then(|| nn::conv2d(vb.pp("conv_shortcut"), in_channels, out_channels, 1, 1, 0))
            .transpose()?;
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
        let h = nn::add(&h, &temb)?;
        let h = self.act.apply_after_norm(&self.norm2, &h)?;
        let h = self.conv2.forward(&h)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = nn::add(&shortcut, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
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
    pub(super) fn load(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
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
    pub(super) fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
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
    /// the downsampled output). `segments` says whether the blocks' insides are kept for
    /// backward or recomputed (gradient checkpointing).
    pub(super) fn forward(
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
    pub(super) fn forward(
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
    pub(super) fn forward(
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
pub(super) fn timestep_embedding(
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
pub(super) enum Segments<'a> {
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
                resnet.forward(&nn::cat_pair(x, skip, 1)?, temb_activated)
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
                    resnet.forward(&nn::cat_pair(&i[0], &i[1], 1)?, &i[2])
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
