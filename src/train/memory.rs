//! How much memory a training run will need at its peak, before it starts: [`estimate`] adds up
//! the parts from the model's configs and weight-file headers ([`ModelSizes`], nothing loaded)
//! and the run's settings ([`MemorySettings`]); [`available_memory`] says what the training
//! device has free; [`savings`] lists the settings that would bring the peak down, largest saving
//! first; [`fit`] turns on what is needed to fit (the window's preset). The run's preflight and
//! its out-of-memory message ([`OutOfMemory`]) are built from these.
//!
//! # The parts
//! - **Weights**: the UNet in float32 (one copy: LoRA freezes it in place); the frozen VAE and
//!   text encoder in float32, or in 16 bits when the run stores them in half precision
//!   (`--mixed_precision` on a GPU).
//! - **Gradients**: 4 bytes per trained parameter, twice when micro-batches accumulate (the
//!   running sum beside the new backward pass's gradients).
//! - **Optimizer**: AdamW's two float32 moments, 8 bytes per trained parameter; with
//!   `--use_8bit_adam` 2 bytes plus one float32 scale per moment and block of
//!   [`BLOCK_SIZE_8BIT`] for tensors of at least [`MIN_8BIT_SIZE`] elements (smaller ones keep
//!   float32 moments, as bitsandbytes does).
//! - **EMA**: one float32 copy of the trained parameters.
//! - **Cached latents** (`--cache_latents`): per example, the edited image's latent mean and
//!   standard deviation and the original's mode (both flips with `--random_flip`) and the
//!   prompt's embedding, in float32.
//! - **Activations** of the UNet's forward pass kept for its backward pass. The UNet is walked
//!   from its config as the segments it runs (resnets, transformers, down/up samplers, the skip
//!   concatenations), each counted as how many tensors of its width and its level's latent size
//!   the graph keeps: a resnet [`RESNET_TENSORS`], a transformer layer [`TRANSFORMER_LAYER_TENSORS`]
//!   (its feed-forward is 4× wide) plus [`TRANSFORMER_BLOCK_TENSORS`] around the layers. With
//!   `--gradient_checkpointing` a segment keeps only [`CHECKPOINT_KEPT_TENSORS`] (its input and
//!   output) and the backward pass holds one recomputed segment at a time (the largest counts).
//!   The count times 4 bytes times the batch, times a factor calibrated on measured runs
//!   ([`ALLOCATOR_SLACK`]: candle's temporaries, the allocator's reuse of larger blocks).
//!   LoRA adds [`LORA_LAYER_TENSORS`] per transformer layer (the adapters' products).
//! - **Frozen work**: the VAE encodes the edited and original images at full resolution without
//!   a graph: [`ENCODE_TENSORS`] tensors of its first width alive at once, plus a convolution's
//!   scratch: on a CPU with AVX-512 the direct kernel's zero-bordered copy of one image, elsewhere
//!   im2col columns (9× its input, in blocks of at most [`ENCODE_COLUMN_BLOCK`] elements), times
//!   [`ALLOCATOR_SLACK`]. It is not held during the UNet's pass, so the peak takes the larger
//!   of the two. Cached latents are
//!   encoded one example at a time, before the first step.
//! - **Runtime**: the process itself (code, tokenizer, thread stacks, allocator arenas):
//!   [`CPU_RUNTIME_BYTES`] measured; on a GPU [`GPU_RUNTIME_BYTES`] for cuBLAS's workspaces.
//!
//! # Calibration (2026-12-06, this 2-core machine, `sd1-tiny` fixture)
//! Peak resident memory (`/usr/bin/time -v`, maximum resident set size) of the dev-profile
//! binary (dependencies at opt-level 3, as the tests run it), with the direct convolution
//! (AVX-512): `instruct-pix2pix train --pretrained_model_name_or_path
//! tests/fixtures/pipelines/sd1-tiny --train_data_dir tests/fixtures/train_data/imagefolder
//! --output_dir OUT --max_train_steps 2 --lr_warmup_steps 0 --seed 3 --report_to none
//! --checkpointing_steps 1000 --quiet --resolution R --train_batch_size B [FLAGS]`, beside the
//! estimate the run prints:
//!
//! | R | B | flags | measured | estimate | off by |
//! |---|---|---|---|---|---|
//! | 64 | 1 | | 44 MB | 49 MB | +13% |
//! | 128 | 1 | | 54 MB | 55 MB | +1% |
//! | 256 | 1 | | 87 MB | 77 MB | −11% |
//! | 256 | 2 | | 112 MB | 106 MB | −5% |
//! | 256 | 3 | | 147 MB | 135 MB | −8% |
//! | 256 | 3 | `--gradient_checkpointing` | 114 MB | 100 MB | −12% |
//! | 256 | 3 | `--lora-rank 4` | 159 MB | 163 MB | +3% |
//! | 512 | 1 | | 162 MB | 165 MB | +2% |
//! | 512 | 1 | `--gradient_checkpointing` | 144 MB | 131 MB | −9% |
//!
//! [`ALLOCATOR_SLACK`] (hence [`ACTIVATION_FACTOR`]) and [`CPU_RUNTIME_BYTES`] are fitted to
//! the 128² and 512² rows (the slope between them, then the intercept); the segment and encoder
//! tensor counts are op counts, not fitted. The small runs' peaks are not linear in the
//! activations (the allocator keeps small freed blocks, hands large ones back), hence
//! [`ESTIMATE_MARGIN`]. With checkpointing, the encoder's work sets this fixture's peak. The
//! integration test `train_cli::the_memory_estimate_is_near_the_measured_peak` measures a
//! further setting (256², batch 2, one step) and holds the estimate within that margin. Before
//! the direct convolution (im2col columns in the encoder, 2026-12-05) the same runs took 62–233
//! MB and the slack was fitted at 2.
//!
//! The full-size model (timbrooks' shapes, random weights, `scripts/make_bench_model.py`), the
//! benchmark build (docs/benchmarks.md, "Direct convolution and narrow products"), 256², batch
//! 1, the same command with `--device cpu`, not fitted:
//!
//! | flags | measured | estimate | off by |
//! |---|---|---|---|
//! | (full fine-tuning, 3 steps) | 14.81 GB | 15.3 GB | +3% |
//! | `--gradient_checkpointing --use_8bit_adam` (full, 1 step) | 9.23 GB | 9.6 GB | +4% |
//! | `--lora-rank 4` (3 steps) | 4.72 GB | 5.2 GB | +10% |
//!
//! Before the backward pass stopped computing gradients of frozen layers, LoRA took 7.60 GB at
//! batch 1 and 8.93 GB at batch 2: 1.33 GB more per example (the estimate's 1.5 GB then), plus
//! 1.8 GB of frozen weights' gradients whatever the batch, which the estimate never counted.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::model::clip::ClipTextConfig;
use crate::model::unet::{PerBlock, UNetConfig};
use crate::model::vae::VaeConfig;
use crate::model::weights::{
    DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, Variant, WeightFormat, component_weights_detailed,
    safetensors_shapes,
};
use crate::model::{LoadError, PipelineFolder};
use crate::train::optim::{BLOCK_SIZE_8BIT, MIN_8BIT_SIZE};

/// Tensors of its width a resnet's graph keeps (group norm + SiLU, conv, time embedding add,
/// group norm + SiLU, conv, shortcut, sum).
pub const RESNET_TENSORS: u64 = 7;
/// Tensors of the block's width one transformer layer keeps: self-attention (norm, q, k, v,
/// output, projection, residual: 7), cross-attention (norm, q, output, projection, residual: 5),
/// feed-forward (norm 1, GEGLU projection 8, gate 4, product 4, output 1, residual 1: 19).
pub const TRANSFORMER_LAYER_TENSORS: u64 = 31;
/// Tensors a transformer block keeps around its layers (group norm, projection in, the two
/// layout copies, projection out, residual).
pub const TRANSFORMER_BLOCK_TENSORS: u64 = 6;
/// Tensors a checkpointed segment keeps: its output (its input is the previous one's output,
/// counted once more for the copy the custom op holds).
pub const CHECKPOINT_KEPT_TENSORS: u64 = 2;
/// Tensors a LoRA adapter adds per transformer layer: `A x`'s product `B (A x)`, its scaling
/// and the sum with `W x`, for the six projections that see every latent position (attn1's q,
/// k, v and out, attn2's q and out).
pub const LORA_LAYER_TENSORS: u64 = 18;
/// Tensors of the VAE encoder's first width alive at once while it encodes (no graph): input,
/// normalised input and output of a convolution.
pub const ENCODE_TENSORS: u64 = 3;
/// The largest im2col block of the encoder's convolutions, in elements (32 Mi: the CPU
/// kernel's block; a 3×3 convolution's columns are 9× its input).
pub const ENCODE_COLUMN_BLOCK: u64 = 32 << 20;
/// What the allocator's reuse of freed blocks adds to a step's working memory, fitted (see the
/// module doc's calibration): a cached block may serve a request of up to 1.5× less, and
/// candle's short-lived temporaries come and go between the counted tensors.
pub const ALLOCATOR_SLACK: f64 = 1.25;
/// Bytes per counted activation element: 4 (float32) times [`ALLOCATOR_SLACK`].
pub const ACTIVATION_FACTOR: f64 = 4.0 * ALLOCATOR_SLACK;
/// The training process without its model and activations, measured on the CPU (see the
/// module doc).
pub const CPU_RUNTIME_BYTES: u64 = 37_000_000;
/// cuBLAS and candle's kernels' workspaces on a GPU (not measured; the CUDA context itself is
/// already outside the free memory the driver reports).
pub const GPU_RUNTIME_BYTES: u64 = 400_000_000;
/// How far the estimate may be from a measured peak, as a fraction of the measurement (what the
/// integration test holds it to).
pub const ESTIMATE_MARGIN: f64 = 0.25;
/// The LoRA rank suggested when memory is short (the dialog's and diffusers' examples' 4).
pub const SUGGESTED_LORA_RANK: usize = 4;
/// Tokens of a prompt's embedding (CLIP's context).
const TEXT_TOKENS: u64 = 77;

/// What one segment of the UNet's forward pass is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentKind {
    /// A resnet.
    Resnet,
    /// A transformer block of this many layers.
    Transformer(usize),
    /// A downsampling conv (its output is a quarter of its input) or an upsampler (nearest
    /// upsampling, then a conv), counted as two tensors of the larger size.
    Sampler,
    /// An up block's concatenation with a skip connection (two widths).
    Concat,
}

/// One segment of the UNet's forward pass: what it is, its width and its level (the latent size
/// is halved once per level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub kind: SegmentKind,
    pub channels: usize,
    pub level: usize,
}

impl Segment {
    /// Tensors of the segment's width and level that the graph keeps.
    fn tensors(&self) -> u64 {
        match self.kind {
            SegmentKind::Resnet => RESNET_TENSORS,
            SegmentKind::Transformer(layers) => {
                TRANSFORMER_BLOCK_TENSORS + TRANSFORMER_LAYER_TENSORS * layers as u64
            }
            SegmentKind::Sampler | SegmentKind::Concat => 2,
        }
    }

    /// Elements of one of its tensors for one sample with a `latent`×`latent` input.
    fn elements(&self, latent: u64) -> u64 {
        let side = latent.div_ceil(1 << self.level);
        self.channels as u64 * side * side
    }
}

/// The sizes of a model that decide a run's memory, read without loading any weight.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSizes {
    /// Parameters of the UNet (after conv_in grows to 8 channels).
    pub unet_params: u64,
    /// Of those, the parameters in tensors too small for 8-bit moments.
    pub unet_small_params: u64,
    /// Parameters of the VAE.
    pub vae_params: u64,
    /// Parameters of the text encoder.
    pub text_encoder_params: u64,
    /// (in, out) features of every attention projection LoRA adapts.
    pub lora_projections: Vec<(usize, usize)>,
    /// The UNet's forward pass, segment by segment.
    pub unet_segments: Vec<Segment>,
    /// Pixels per latent side.
    pub vae_scale: usize,
    /// The VAE encoder's first width.
    pub vae_first_channels: usize,
    /// Channels of a latent.
    pub latent_channels: usize,
    /// Width of a prompt's embedding.
    pub text_width: usize,
}

impl ModelSizes {
    /// Reads a pipeline folder's configs and weight-file headers (safetensors; a `.bin` file's
    /// parameters are counted from its size).
    pub fn from_folder(folder: &Path, variant: Variant) -> Result<Self, LoadError> {
        let pipeline = PipelineFolder::open(folder, variant)?;
        let count = |component: &str, base: &str| -> Result<(u64, u64), LoadError> {
            let dir = folder.join(component);
            let weights =
                component_weights_detailed(&dir, base, variant).map_err(LoadError::from)?;
            match weights.format {
                WeightFormat::SafeTensors => {
                    let shapes = safetensors_shapes(&weights.files).map_err(LoadError::from)?;
                    let mut total = 0;
                    let mut small = 0;
                    for shape in shapes.values() {
                        let n: u64 = shape.iter().product();
                        total += n;
                        if (n as usize) < MIN_8BIT_SIZE {
                            small += n;
                        }
                    }
                    Ok((total, small))
                }
                WeightFormat::PyTorch => {
                    let bytes: u64 = weights
                        .files
                        .iter()
                        .filter_map(|f| std::fs::metadata(f).ok())
                        .map(|m| m.len())
                        .sum();
                    let per = if weights.variant == Variant::Fp16 {
                        2
                    } else {
                        4
                    };
                    Ok((bytes / per, 0))
                }
            }
        };
        let (mut unet_params, unet_small_params) = count("unet", DIFFUSERS_WEIGHTS)?;
        let (vae_params, _) = count("vae", DIFFUSERS_WEIGHTS)?;
        let (text_encoder_params, _) = count("text_encoder", TRANSFORMERS_WEIGHTS)?;
        let unet_config = &pipeline.unet_config;
        // A plain Stable Diffusion UNet's conv_in grows from 4 to 8 input channels.
        if unet_config.in_channels < 8 {
            let kernel = unet_config.conv_in_kernel.pow(2) as u64;
            let first = unet_config.block_out_channels.first().copied().unwrap_or(0) as u64;
            unet_params += (8 - unet_config.in_channels as u64) * first * kernel;
        }
        let mut sizes = Self::from_configs(
            unet_config,
            &pipeline.vae_config,
            &pipeline.text_encoder_config,
            &folder.join("unet").join("config.json"),
        )?;
        sizes.unet_params = unet_params;
        sizes.unet_small_params = unet_small_params;
        sizes.vae_params = vae_params;
        sizes.text_encoder_params = text_encoder_params;
        Ok(sizes)
    }

    /// The structure of the networks from their configs; the parameter counts are left 0 for
    /// the caller (they come from the weight files).
    pub fn from_configs(
        unet: &UNetConfig,
        vae: &VaeConfig,
        text: &ClipTextConfig,
        unet_config_path: &Path,
    ) -> Result<Self, LoadError> {
        let bad = |reason: String| LoadError::BadConfig {
            path: unet_config_path.to_path_buf(),
            reason,
        };
        let channels = &unet.block_out_channels;
        let blocks = channels.len();
        if blocks == 0 {
            return Err(bad("block_out_channels is empty".into()));
        }
        let per_block = |value: &PerBlock<usize>, field: &str| -> Result<Vec<usize>, LoadError> {
            match value {
                PerBlock::Same(v) => Ok(vec![*v; blocks]),
                PerBlock::Each(list) if list.len() == blocks => Ok(list.clone()),
                PerBlock::Each(list) => Err(bad(format!(
                    "{field} has {} entries for {blocks} blocks",
                    list.len()
                ))),
            }
        };
        let layers = per_block(&unet.layers_per_block, "layers_per_block")?;
        let transformer_layers = per_block(
            &unet.transformer_layers_per_block,
            "transformer_layers_per_block",
        )?;
        let cross = per_block(&unet.cross_attention_dim, "cross_attention_dim")?;
        let down_attention: Vec<bool> = unet
            .down_block_types
            .iter()
            .map(|t| t.starts_with("CrossAttn"))
            .collect();
        let up_attention: Vec<bool> = unet
            .up_block_types
            .iter()
            .map(|t| t.starts_with("CrossAttn"))
            .collect();
        if down_attention.len() != blocks || up_attention.len() != blocks {
            return Err(bad(
                "down_block_types and up_block_types must match block_out_channels".into(),
            ));
        }

        let mut segments = Vec::new();
        let mut projections = Vec::new();
        let mut transformer =
            |segments: &mut Vec<Segment>, c: usize, level: usize, block: usize| {
                let n = transformer_layers[block];
                segments.push(Segment {
                    kind: SegmentKind::Transformer(n),
                    channels: c,
                    level,
                });
                for _ in 0..n {
                    // attn1: q, k, v, out (c → c); attn2: q (c → c), k and v (cross → c), out.
                    projections.extend([(c, c); 4]);
                    projections.extend([(c, c), (cross[block], c), (cross[block], c), (c, c)]);
                }
            };
        let push = |segments: &mut Vec<Segment>, kind, channels, level| {
            segments.push(Segment {
                kind,
                channels,
                level,
            })
        };
        for (level, &c) in channels.iter().enumerate() {
            for _ in 0..layers[level] {
                push(&mut segments, SegmentKind::Resnet, c, level);
                if down_attention[level] {
                    transformer(&mut segments, c, level, level);
                }
            }
            if level + 1 < blocks {
                push(&mut segments, SegmentKind::Sampler, c, level);
            }
        }
        let deepest = blocks - 1;
        if unet.mid_block_type.is_some() {
            let c = channels[deepest];
            push(&mut segments, SegmentKind::Resnet, c, deepest);
            transformer(&mut segments, c, deepest, deepest);
            push(&mut segments, SegmentKind::Resnet, c, deepest);
        }
        for (i, level) in (0..blocks).rev().enumerate() {
            let c = channels[level];
            for _ in 0..=layers[level] {
                push(&mut segments, SegmentKind::Concat, c, level);
                push(&mut segments, SegmentKind::Resnet, c, level);
                if up_attention[i] {
                    transformer(&mut segments, c, level, level);
                }
            }
            if level > 0 {
                push(&mut segments, SegmentKind::Sampler, c, level - 1);
            }
        }
        Ok(Self {
            unet_params: 0,
            unet_small_params: 0,
            vae_params: 0,
            text_encoder_params: 0,
            lora_projections: projections,
            unet_segments: segments,
            vae_scale: vae.downscale_factor(),
            vae_first_channels: vae.block_out_channels.first().copied().unwrap_or(0),
            latent_channels: vae.latent_channels,
            text_width: text.hidden_size,
        })
    }

    /// Parameters of LoRA adapters of this rank on every adapted projection.
    pub fn lora_params(&self, rank: usize) -> u64 {
        self.lora_projections
            .iter()
            .map(|&(i, o)| (rank * (i + o)) as u64)
            .sum()
    }
}

/// Where the run trains, as far as memory goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The CPU: the estimate is the process's peak resident memory.
    Cpu,
    /// A GPU: the estimate is the device memory the run allocates.
    Gpu,
}

impl DeviceKind {
    /// The kind of a candle device.
    pub fn of(device: &Device) -> Self {
        if device.is_cpu() {
            DeviceKind::Cpu
        } else {
            DeviceKind::Gpu
        }
    }
}

/// The settings of a run that decide its memory.
#[derive(Debug, Clone, PartialEq)]
pub struct MemorySettings {
    pub resolution: u32,
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    /// Some(rank): LoRA adapters train; None: the whole UNet.
    pub lora_rank: Option<usize>,
    pub gradient_checkpointing: bool,
    pub use_8bit_adam: bool,
    pub use_ema: bool,
    pub cache_latents: bool,
    pub random_flip: bool,
    /// Mixed precision on a GPU: the frozen VAE and text encoder stored in 16 bits, and the
    /// UNet computing in 16 bits (activations in 16 bits, a 16-bit copy of its weights).
    pub half_precision_frozen: bool,
    /// Examples trained on (the latent cache's size).
    pub examples: usize,
    pub device: DeviceKind,
}

/// The parts of a run's peak memory, in bytes (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    pub runtime: u64,
    pub unet_weights: u64,
    pub frozen_weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub ema: u64,
    pub latent_cache: u64,
    pub activations: u64,
    pub frozen_work: u64,
}

impl MemoryEstimate {
    /// The peak: everything held for the whole run, plus the larger of the UNet's activations
    /// and the frozen networks' work (they are not alive together).
    pub fn total(&self) -> u64 {
        self.runtime
            + self.unet_weights
            + self.frozen_weights
            + self.gradients
            + self.optimizer
            + self.ema
            + self.latent_cache
            + self.activations.max(self.frozen_work)
    }
}

/// Bytes of AdamW's moments for `tensors` (element counts of each trained tensor).
fn optimizer_bytes(tensors: impl Iterator<Item = u64>, eight_bit: bool) -> u64 {
    tensors
        .map(|n| {
            if eight_bit && n as usize >= MIN_8BIT_SIZE {
                // Two moments of one byte, each with a float32 scale per block.
                2 * n + 2 * 4 * n.div_ceil(BLOCK_SIZE_8BIT as u64)
            } else {
                8 * n
            }
        })
        .sum()
}

/// The peak memory of a run of `sizes` with `settings` (see the module doc).
pub fn estimate(sizes: &ModelSizes, settings: &MemorySettings) -> MemoryEstimate {
    let batch = settings.train_batch_size.max(1) as u64;
    let latent = u64::from(settings.resolution) / sizes.vae_scale.max(1) as u64;
    let (trained, optimizer) = match settings.lora_rank {
        Some(rank) => {
            let trained = sizes.lora_params(rank);
            let tensors = sizes
                .lora_projections
                .iter()
                .flat_map(|&(i, o)| [(rank * i) as u64, (rank * o) as u64]);
            (trained, optimizer_bytes(tensors, settings.use_8bit_adam))
        }
        None => {
            // Large tensors get 8-bit moments; the small ones are counted as one.
            let large = sizes.unet_params - sizes.unet_small_params;
            let bytes = optimizer_bytes(std::iter::once(large), settings.use_8bit_adam)
                + 8 * sizes.unet_small_params;
            (sizes.unet_params, bytes)
        }
    };
    let gradient_copies = if settings.gradient_accumulation_steps > 1 {
        2
    } else {
        1
    };
    let frozen_bytes = if settings.half_precision_frozen { 2 } else { 4 };
    // Half-precision computation is a GPU's; on the CPU only the frozen weights are held in bf16.
    let half_compute = settings.half_precision_frozen && settings.device == DeviceKind::Gpu;

    // LoRA's adapters add their products beside every adapted projection's output.
    let lora_tensors = |s: &Segment| match (s.kind, settings.lora_rank) {
        (SegmentKind::Transformer(layers), Some(_)) => LORA_LAYER_TENSORS * layers as u64,
        _ => 0,
    };
    let tensors = |s: &Segment| s.tensors() + lora_tensors(s);
    let per_sample: u64 = if settings.gradient_checkpointing {
        let kept: u64 = sizes
            .unet_segments
            .iter()
            .map(|s| CHECKPOINT_KEPT_TENSORS * s.elements(latent))
            .sum();
        let largest = sizes
            .unet_segments
            .iter()
            .map(|s| tensors(s) * s.elements(latent))
            .max()
            .unwrap_or(0);
        kept + largest
    } else {
        sizes
            .unet_segments
            .iter()
            .map(|s| tensors(s) * s.elements(latent))
            .sum()
    };
    // Half-precision activations take half the bytes.
    let activation_bytes = ACTIVATION_FACTOR * if half_compute { 0.5 } else { 1.0 };
    let activations = (per_sample as f64 * batch as f64 * activation_bytes) as u64;
    let pixels = u64::from(settings.resolution).pow(2);
    // Cached latents are encoded one example at a time before the first step.
    let encoded = if settings.cache_latents { 1 } else { batch };
    let first = sizes.vae_first_channels as u64 * pixels * encoded;
    // A convolution's scratch: the direct kernel's zero-bordered copy of one image where it
    // runs, im2col columns elsewhere.
    let conv_scratch = match settings.device {
        DeviceKind::Cpu if crate::model::nn::direct_conv_available() => first / encoded,
        _ => (9 * first).min(ENCODE_COLUMN_BLOCK),
    };
    let frozen_work = ((ENCODE_TENSORS * first + conv_scratch) * if half_compute { 2 } else { 4 })
        as f64
        * ALLOCATOR_SLACK;
    let frozen_work = frozen_work as u64;
    let latent_cache = if settings.cache_latents {
        let latent_elems = sizes.latent_channels as u64 * latent * latent;
        // Mean and standard deviation of the edited image, mode of the original.
        let images = 3 * latent_elems * if settings.random_flip { 2 } else { 1 };
        let text = TEXT_TOKENS * sizes.text_width as u64;
        4 * (images + text) * settings.examples as u64
    } else {
        0
    };
    MemoryEstimate {
        runtime: match settings.device {
            DeviceKind::Cpu => CPU_RUNTIME_BYTES,
            DeviceKind::Gpu => GPU_RUNTIME_BYTES,
        },
        // In mixed precision full training keeps the float32 weights plus each step's 16-bit
        // casts; LoRA keeps only a 16-bit frozen base.
        unet_weights: match (settings.half_precision_frozen, settings.lora_rank) {
            (false, _) => 4,
            (true, None) if half_compute => 6,
            (true, None) => 4,
            (true, Some(_)) => 2,
        } * sizes.unet_params
            + settings.lora_rank.map_or(0, |r| 4 * sizes.lora_params(r)),
        frozen_weights: frozen_bytes * (sizes.vae_params + sizes.text_encoder_params),
        gradients: 4 * trained * gradient_copies,
        optimizer,
        ema: if settings.use_ema { 4 * trained } else { 0 },
        latent_cache,
        activations,
        frozen_work,
    }
}

/// A change of settings that lowers the peak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryChange {
    GradientCheckpointing,
    Adam8Bit,
    CacheLatents,
    /// The frozen networks in 16 bits (GPUs only).
    HalfPrecision,
    /// LoRA adapters of this rank instead of the whole UNet.
    Lora(usize),
    NoEma,
    /// A smaller batch.
    Batch(usize),
    /// A smaller resolution.
    Resolution(u32),
}

impl MemoryChange {
    /// The command line's flag for it.
    pub fn flag(&self) -> String {
        match self {
            MemoryChange::GradientCheckpointing => "--gradient_checkpointing".into(),
            MemoryChange::Adam8Bit => "--use_8bit_adam".into(),
            MemoryChange::CacheLatents => "--cache_latents".into(),
            MemoryChange::HalfPrecision => "--mixed_precision bf16".into(),
            MemoryChange::Lora(rank) => format!("--lora-rank {rank}"),
            MemoryChange::NoEma => "no --use_ema".into(),
            MemoryChange::Batch(n) => format!("--train_batch_size {n}"),
            MemoryChange::Resolution(r) => format!("--resolution {r}"),
        }
    }

    /// The window's name for it.
    pub fn label(&self) -> String {
        match self {
            MemoryChange::GradientCheckpointing => "Gradient checkpointing".into(),
            MemoryChange::Adam8Bit => "8-bit AdamW".into(),
            MemoryChange::CacheLatents => "Cache latents".into(),
            MemoryChange::HalfPrecision => "Precision bf16".into(),
            MemoryChange::Lora(_) => "LoRA".into(),
            MemoryChange::NoEma => "no EMA weights".into(),
            MemoryChange::Batch(n) => format!("Batch size {n}"),
            MemoryChange::Resolution(r) => format!("Resolution {r}"),
        }
    }

    /// Whether it leaves what is learned unchanged (up to rounding): the window's preset turns
    /// these on first.
    pub fn keeps_results(&self) -> bool {
        matches!(
            self,
            MemoryChange::GradientCheckpointing
                | MemoryChange::Adam8Bit
                | MemoryChange::CacheLatents
                | MemoryChange::HalfPrecision
        )
    }

    /// `settings` with the change made.
    pub fn apply(&self, settings: &MemorySettings) -> MemorySettings {
        let mut s = settings.clone();
        match *self {
            MemoryChange::GradientCheckpointing => s.gradient_checkpointing = true,
            MemoryChange::Adam8Bit => s.use_8bit_adam = true,
            MemoryChange::CacheLatents => s.cache_latents = true,
            MemoryChange::HalfPrecision => s.half_precision_frozen = true,
            MemoryChange::Lora(rank) => s.lora_rank = Some(rank),
            MemoryChange::NoEma => s.use_ema = false,
            MemoryChange::Batch(n) => s.train_batch_size = n,
            MemoryChange::Resolution(r) => s.resolution = r,
        }
        s
    }

    /// The changes possible from `settings`, one step each.
    fn candidates(settings: &MemorySettings, vae_scale: usize) -> Vec<MemoryChange> {
        let mut changes = Vec::new();
        if !settings.gradient_checkpointing {
            changes.push(MemoryChange::GradientCheckpointing);
        }
        if !settings.use_8bit_adam {
            changes.push(MemoryChange::Adam8Bit);
        }
        if !settings.cache_latents {
            changes.push(MemoryChange::CacheLatents);
        }
        // bf16 on the CPU only where it has avx512_bf16 (float32 elsewhere).
        let half_possible =
            settings.device == DeviceKind::Gpu || crate::model::nn::cpu_bf16_enabled();
        if !settings.half_precision_frozen && half_possible {
            changes.push(MemoryChange::HalfPrecision);
        }
        if settings.lora_rank.is_none() {
            changes.push(MemoryChange::Lora(SUGGESTED_LORA_RANK));
        }
        if settings.use_ema {
            changes.push(MemoryChange::NoEma);
        }
        if settings.train_batch_size > 1 {
            changes.push(MemoryChange::Batch(settings.train_batch_size / 2));
        }
        // Three quarters of the side, kept a multiple of 8 latents' pixels.
        let step = 8 * vae_scale.max(1) as u32;
        let smaller = settings.resolution * 3 / 4 / step * step;
        if smaller >= step && smaller < settings.resolution {
            changes.push(MemoryChange::Resolution(smaller));
        }
        changes
    }
}

/// A change and the bytes it saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saving {
    pub change: MemoryChange,
    pub bytes: u64,
}

/// Every one-step change that lowers the peak, largest saving first.
pub fn savings(sizes: &ModelSizes, settings: &MemorySettings) -> Vec<Saving> {
    let now = estimate(sizes, settings).total();
    let mut list: Vec<Saving> = MemoryChange::candidates(settings, sizes.vae_scale)
        .into_iter()
        .filter_map(|change| {
            let after = estimate(sizes, &change.apply(settings)).total();
            (after < now).then(|| Saving {
                change,
                bytes: now - after,
            })
        })
        .collect();
    list.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    list
}

/// `settings` with the changes that leave results unchanged turned on, largest saving first,
/// until the estimate fits in `available` bytes (all of them if it never does). The window's
/// preset; LoRA, batch and resolution are left to the user.
pub fn fit(sizes: &ModelSizes, settings: &MemorySettings, available: u64) -> MemorySettings {
    let mut settings = settings.clone();
    while estimate(sizes, &settings).total() > available {
        let Some(best) = savings(sizes, &settings)
            .into_iter()
            .find(|s| s.change.keeps_results())
        else {
            break;
        };
        settings = best.change.apply(&settings);
    }
    settings
}

/// Bytes as the messages show them: "14.2 GB", "850 MB", "12 kB".
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// Reads a size: bytes, or a number with kB, MB, GB, KiB, MiB or GiB ("3.5GB", "800 MiB").
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (number.is_finite() && number >= 0.0).then_some((number * scale) as u64)
}

/// Memory the training device has free, and where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailableMemory {
    pub bytes: u64,
    /// "MemAvailable", "the cgroup's memory.max", "the CUDA driver", or a setting's name.
    pub source: String,
}

/// What the device has free now: on the CPU `/proc/meminfo`'s MemAvailable, or the cgroup's
/// limit minus its use where that is lower; on CUDA the driver's free memory. `None` where the
/// platform does not say (the check is then skipped).
pub fn available_memory(device: &Device) -> Option<AvailableMemory> {
    if device.is_cpu() {
        cpu_available()
    } else {
        gpu_available(device)
    }
}

fn cpu_available() -> Option<AvailableMemory> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)?;
    let mut best = AvailableMemory {
        bytes: available,
        source: "MemAvailable in /proc/meminfo".into(),
    };
    if let Some(free) = cgroup_free()
        && free < best.bytes
    {
        best = AvailableMemory {
            bytes: free,
            source: "the cgroup's memory limit".into(),
        };
    }
    Some(best)
}

/// The cgroup's memory limit minus its use (v2 `memory.max`/`memory.current`, or v1
/// `memory.limit_in_bytes`/`memory.usage_in_bytes`), when there is a limit.
fn cgroup_free() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read =
        |path: PathBuf| -> Option<u64> { std::fs::read_to_string(path).ok()?.trim().parse().ok() };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            let dir = Path::new("/sys/fs/cgroup").join(path);
            if let (Some(max), Some(current)) = (
                read(dir.join("memory.max")),
                read(dir.join("memory.current")),
            ) {
                return Some(max.saturating_sub(current));
            }
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(path);
            if let (Some(max), Some(current)) = (
                read(dir.join("memory.limit_in_bytes")),
                read(dir.join("memory.usage_in_bytes")),
            ) && max < (1 << 60)
            {
                return Some(max.saturating_sub(current));
            }
        }
    }
    None
}

#[cfg(feature = "cuda")]
fn gpu_available(device: &Device) -> Option<AvailableMemory> {
    use candle_core::cuda_backend::cudarc;
    let Device::Cuda(cuda) = device else {
        return None;
    };
    cuda.cuda_stream().context().bind_to_thread().ok()?;
    let (free, _total) = cudarc::driver::result::mem_get_info().ok()?;
    Some(AvailableMemory {
        bytes: free as u64,
        source: "the CUDA driver".into(),
    })
}

#[cfg(not(feature = "cuda"))]
fn gpu_available(_device: &Device) -> Option<AvailableMemory> {
    None
}

/// A run that does not fit, before it starts or when a step ran out of memory: what it needs,
/// what there is, and what to change, largest saving first.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfMemory {
    /// The estimated peak.
    pub needed: u64,
    /// What the device had free (None when the driver ran out without a figure).
    pub available: Option<u64>,
    /// The device ("cpu", "cuda:0").
    pub device: String,
    /// The changes that would lower the peak.
    pub savings: Vec<Saving>,
    /// Set when a step ran out of memory: its number, and the last checkpoint (left intact).
    pub during_step: Option<(u64, Option<PathBuf>)>,
}

impl OutOfMemory {
    /// The changes as the command line names them: "--gradient_checkpointing (−6.0 GB), …".
    pub fn suggestions(&self, name: impl Fn(&MemoryChange) -> String) -> String {
        self.savings
            .iter()
            .map(|s| format!("{} (−{})", name(&s.change), format_bytes(s.bytes)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The message with the window's names for the settings.
    pub fn message_with_labels(&self) -> String {
        self.message(&|c: &MemoryChange| c.label(), "")
    }

    fn message(&self, name: &dyn Fn(&MemoryChange) -> String, override_hint: &str) -> String {
        let available = self
            .available
            .map(|a| format!("{} available", format_bytes(a)))
            .unwrap_or_else(|| "not available".into());
        let head = match &self.during_step {
            None => format!(
                "training needs ~{}, {available} on {}",
                format_bytes(self.needed),
                self.device
            ),
            Some((step, _)) => format!(
                "out of memory on {} in step {step} (estimated peak ~{}, {available} at the start)",
                self.device,
                format_bytes(self.needed)
            ),
        };
        let advice = if self.savings.is_empty() {
            "no setting lowers it further; use a device with more memory".to_string()
        } else {
            format!("try {}", self.suggestions(name))
        };
        let tail = match &self.during_step {
            Some((_, Some(checkpoint))) => {
                format!("; the last checkpoint, {}, is intact", checkpoint.display())
            }
            Some((_, None)) => "; no checkpoint was saved yet".into(),
            None => override_hint.to_string(),
        };
        format!("{head}: {advice}{tail}")
    }
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message(
            &|c: &MemoryChange| c.flag(),
            " (or --skip_memory_check to try anyway)",
        ))
    }
}

pub use crate::model::device::is_out_of_memory;

impl MemorySettings {
    /// 256², batch 1, full fine-tuning in float32 on the CPU, nothing saved: what tests vary.
    #[cfg(test)]
    pub(crate) fn example() -> Self {
        Self {
            resolution: 256,
            train_batch_size: 1,
            gradient_accumulation_steps: 1,
            lora_rank: None,
            gradient_checkpointing: false,
            use_8bit_adam: false,
            use_ema: false,
            cache_latents: false,
            random_flip: false,
            half_precision_frozen: false,
            examples: 1000,
            device: DeviceKind::Cpu,
        }
    }
}

#[cfg(test)]
mod tests;
