//! The denoising UNet: diffusers' `UNet2DConditionModel` as Stable Diffusion 1.x/2.x and
//! InstructPix2Pix use it, read from diffusers' `unet/config.json` and weight names.
//!
//! This module owns the network ([`UNet2DConditionModel`]: its construction from the config and
//! weights, and the forward pass, including diffusers' handling of latent sizes that are not a
//! multiple of the total downscale factor). Its parts live in submodules: `config` (the config
//! [`UNetConfig`], with diffusers' defaults and a clear refusal of the features it does not
//! implement), `attention` (attention and the transformer blocks) and `blocks` (resnets, samplers,
//! down/mid/up blocks, the sinusoidal timestep embedding, checkpoint segments); their public
//! types are re-exported here.
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

mod attention;
mod blocks;
mod config;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::grad_checkpoint::{SegmentGradients, checkpoint};
use super::nn::{self, Conv2d, GroupNorm, Linear};

pub use attention::{Attention, BasicTransformerBlock, FeedForward, Transformer2DModel};
pub use blocks::{DownBlock, Downsample2D, MidBlock, ResnetBlock2D, UpBlock, Upsample2D};
pub use config::{PerBlock, SampleSize, UNetConfig, UNetConfigError};

use attention::TransformerSpec;
use blocks::{ResnetSettings, Segments, timestep_embedding};
use config::Activation;

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
                let (resnet, attention) = load_block_layer(
                    &vb_block,
                    j,
                    (resnet_in, output_channels),
                    settings,
                    resolved.down_has_attention[i].then_some(&spec),
                )?;
                resnets.push(resnet);
                attentions.extend(attention);
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
                let (resnet, attention) = load_block_layer(
                    &vb_block,
                    j,
                    (resnet_in + skip_channels, output_channels),
                    settings,
                    resolved.up_has_attention[i].then_some(&spec),
                )?;
                resnets.push(resnet);
                attentions.extend(attention);
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

    /// Whether the network was loaded for bf16 products on the CPU
    /// ([`nn::with_bf16_products`]): its convolution and linear weights are bf16.
    pub fn uses_bf16_products(&self) -> bool {
        self.conv_in.weight().dtype() == candle_core::DType::BF16
            && self.conv_in.weight().device().is_cpu()
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

    /// Checkpoints as `other` does, into the same store (a copy of the network built over other
    /// weights, e.g. their half-precision casts, then trains exactly as `other` would).
    pub fn share_gradient_checkpointing(&mut self, other: &Self) {
        self.checkpointing = other.checkpointing.clone();
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
                block.forward(segments, &h, &temb_activated, encoder_hidden_states)?;
            h = out;
            skips.extend(states);
        }

        // 3. Mid.
        if let Some(mid) = &self.mid_block {
            h = mid.forward(segments, &h, &temb_activated, encoder_hidden_states)?;
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
            h = block.forward(
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

/// Layer `j` of a down or up block: its resnet (`channels`: in, out) and, in a block with
/// attention (`attention` given), the transformer after it.
fn load_block_layer(
    vb_block: &VarBuilder,
    j: usize,
    (in_channels, out_channels): (usize, usize),
    settings: ResnetSettings,
    attention: Option<&TransformerSpec>,
) -> Result<(ResnetBlock2D, Option<Transformer2DModel>)> {
    let resnet = ResnetBlock2D::load(
        vb_block.pp("resnets").pp(j),
        in_channels,
        out_channels,
        settings,
        1.0,
    )?;
    let attention = attention
        .map(|spec| Transformer2DModel::load(vb_block.pp("attentions").pp(j), out_channels, spec))
        .transpose()?;
    Ok((resnet, attention))
}
