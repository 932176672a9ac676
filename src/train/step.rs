//! One training step of `train_instruct_pix2pix.py` (diffusers 0.42.1), exactly: the models it
//! trains and freezes, the conv_in growth of a plain Stable Diffusion UNet, the loss of one
//! micro-batch, gradient accumulation, clipping, the AdamW update, the learning-rate schedule and
//! the EMA update.
//!
//! The micro-batch, as the script's loop body computes it:
//! 1. `latents = vae.encode(edited).latent_dist.sample() · scaling_factor`;
//! 2. `noisy = DDPM.add_noise(latents, ε, t)`, `t` uniform in `[0, num_train_timesteps)`;
//! 3. text embeddings of the prompts (frozen text encoder);
//! 4. `image_latents = vae.encode(original).latent_dist.mode()` (not scaled);
//! 5. conditioning dropout with probability p and a uniform draw r per sample: the text
//!    embedding becomes that of `""` when `r < 2p`, the image latents become 0 when
//!    `p ≤ r < 3p` (so r < p drops the text only, p ≤ r < 2p both, 2p ≤ r < 3p the image only);
//! 6. `loss = mse(unet(cat[noisy, image_latents], t, text), ε or v)` in f32.
//!
//! The random draws of a micro-batch (the VAE's sampling noise, ε, t, r) are a [`StepDraws`]
//! value, so a test can pin them; [`StepDraws::seeded`] draws them from a seed.
//!
//! The frozen encoders' part (the posterior of step 1, steps 3 and 4), which draws nothing, is
//! [`TrainingModels::encode_batch`] giving an [`EncodedBatch`]; the rest is
//! [`TrainingModels::loss_of_encoded`]. `--cache_latents` keeps the encoded examples
//! ([`crate::train::latent_cache`]) and runs only the second part; the VAE and text encoder can
//! then be freed ([`TrainingModels::release_frozen_encoders`]). The encoders run on plain
//! tensors: no graph is built and their buffers are gone before the UNet's forward pass.
//!
//! [`Trainer`] runs micro-batches and optimizer steps as accelerate does with
//! `gradient_accumulation_steps = k`: each micro-batch back-propagates `loss / k` into the
//! accumulated gradients; after k of them (or earlier, at the end of an epoch, through
//! [`Trainer::optimizer_step`]) the gradients are clipped to `max_grad_norm`, AdamW steps at the
//! schedule's rate and the EMA follows.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::data::TrainBatch;
use super::ema::{EmaConfig, EmaError, EmaModel};
use super::optim::{AdamW, AdamWConfig, OptimError, clip_coefficient};
use super::schedule::LrSchedule;
use crate::model::clip::ClipTextModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};
use crate::model::weights::Variant;
use crate::model::{LoadError, PipelineFolder};
use crate::pipeline::scheduler::{NoiseSchedule, PredictionType, SchedulerConfig, SchedulerError};
use crate::train::loss_scale::{LossScaleState, LossScaler, MIN_SCALE as MIN_LOSS_SCALE};

pub use super::draws::{DroppedConditioning, StepDraws};
pub use super::trainable_unet::{
    TrainableUNet, bf16_product_weights, grow_conv_in_weight, grown_conv_in_bias,
};

/// The input channels of a plain Stable Diffusion UNet, which conv_in grows from.
pub const PLAIN_SD_IN_CHANNELS: usize = 4;

/// Why training could not be set up or a step could not run; messages name the file or value.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The pipeline folder could not be loaded, or its UNet cannot be trained.
    #[error(transparent)]
    Load(Box<LoadError>),
    /// The scheduler config is unusable.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// A batch or its random draws do not fit the model or each other.
    #[error("training batch: {reason}")]
    Batch {
        /// Which shapes or values disagree.
        reason: String,
    },
    /// A setting out of range.
    #[error("{setting} = {value}: {reason}")]
    BadSetting {
        /// The flag.
        setting: &'static str,
        /// Its value.
        value: String,
        /// The allowed range.
        reason: &'static str,
    },
    /// The VAE or text encoder was asked for after being released (`--cache_latents`).
    #[error(
        "the {component} was released after the latents were cached; encode before releasing it"
    )]
    EncoderReleased {
        /// "VAE" or "text encoder".
        component: &'static str,
    },
    /// `optimizer_step` with no micro-batch accumulated.
    #[error("an optimizer step needs at least one accumulated micro-batch")]
    NothingAccumulated,
    /// The loss or the gradients of a step are NaN or infinite: the step was not applied (the
    /// weights, the optimizer state and the schedule are as before it; its gradients dropped).
    #[error(
        "the loss or the gradients are not finite (loss {loss}, gradient norm {grad_norm}); the step was skipped"
    )]
    NonFiniteStep {
        /// The step's loss (the script's `train_loss`).
        loss: f64,
        /// The gradients' total 2-norm.
        grad_norm: f32,
    },
    /// float16 gradients overflowed at this loss scale (the loss itself was finite): the step
    /// was skipped and the scale halved, as torch's `GradScaler` does.
    #[error(
        "the float16 gradients overflowed at loss scale {scale}; the step was skipped and the scale is now {new_scale}"
    )]
    LossScaleOverflow {
        /// The scale the step ran at.
        scale: f64,
        /// The halved scale the next step runs at.
        new_scale: f64,
    },
    /// A tensor operation of the step failed.
    #[error("{stage}: {source}")]
    Compute {
        /// Which part of the step.
        stage: &'static str,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The optimizer failed.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// The EMA failed.
    #[error(transparent)]
    Ema(#[from] EmaError),
}

impl From<LoadError> for TrainError {
    fn from(error: LoadError) -> Self {
        TrainError::Load(Box::new(error))
    }
}

/// Attaches the stage name to candle errors.
pub(super) trait Stage<T> {
    fn stage(self, stage: &'static str) -> Result<T, TrainError>;
}

impl<T> Stage<T> for candle_core::Result<T> {
    fn stage(self, stage: &'static str) -> Result<T, TrainError> {
        self.map_err(|source| TrainError::Compute { stage, source })
    }
}

/// The class whose noise schedule training uses (`DDPMScheduler.from_pretrained`).
const NOISE_SCHEDULER_CLASS: &str = "DDPMScheduler";
/// What training accepts as `prediction_type`.
const TRAINABLE_PREDICTION_TYPES: &str =
    "training supports \"epsilon\" and \"v_prediction\" (as train_instruct_pix2pix.py)";

/// How to load the models for training.
#[derive(Debug, Clone)]
pub struct TrainLoadOptions {
    /// Weight variant (`--variant`).
    pub variant: Variant,
    /// The frozen VAE's and text encoder's dtype (`--mixed_precision`'s `weight_dtype`); their
    /// outputs are used in f32 (the UNet's compute dtype is [`TrainableUNet::set_compute_dtype`]'s).
    pub frozen_dtype: DType,
    /// Where everything runs.
    pub device: Device,
    /// The run's seed (`--seed`): draws the grown conv_in's new bias.
    pub seed: u64,
    /// Keep the VAE's decoder (validation edits decode); training itself only encodes, so
    /// without validation its weights are freed right after loading.
    pub keep_vae_decoder: bool,
    /// Hold the frozen text encoder's and VAE's convolution and linear weights in bf16
    /// (`--mixed_precision bf16` on the CPU): their activations stay float32, and their products
    /// run the CPU's bf16 kernels where it has them.
    pub bf16_frozen_encoders: bool,
    /// Hold the UNet's frozen base in bf16 ([`TrainableUNet::frozen_bf16`]: LoRA with
    /// `--mixed_precision bf16` on the CPU).
    pub bf16_frozen_unet: bool,
}

impl Default for TrainLoadOptions {
    fn default() -> Self {
        Self {
            variant: Variant::Default,
            frozen_dtype: DType::F32,
            device: Device::Cpu,
            seed: 0,
            keep_vae_decoder: true,
            bf16_frozen_encoders: false,
            bf16_frozen_unet: false,
        }
    }
}

/// Everything one training step uses: the frozen tokenizer, text encoder and VAE, the trainable
/// UNet, the DDPM noise schedule and the prediction type.
pub struct TrainingModels {
    /// The pipeline folder.
    pub folder: PathBuf,
    /// The prompts' tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Frozen; `None` once released ([`TrainingModels::release_frozen_encoders`]).
    text_encoder: Option<ClipTextModel>,
    /// Frozen; `None` once released.
    vae: Option<AutoencoderKL>,
    /// The VAE's config (kept when the VAE is released: latent shapes, scaling factor).
    vae_config: VaeConfig,
    /// The UNet being trained.
    pub unet: TrainableUNet,
    /// `DDPMScheduler.from_pretrained(folder, subfolder="scheduler")`'s ᾱ.
    pub noise_schedule: NoiseSchedule,
    /// The loss target: ε or v (loading refuses a model that predicts the sample).
    pub prediction_type: PredictionType,
    /// The text embedding of `""` [1, 77, width], for conditioning dropout (f32).
    pub null_text_embedding: Tensor,
    /// Where everything runs.
    pub device: Device,
}

impl TrainingModels {
    /// Loads a pipeline folder in diffusers' layout (an InstructPix2Pix model, or a plain Stable
    /// Diffusion one whose conv_in grows to 8 channels).
    pub fn load(folder: &Path, options: &TrainLoadOptions) -> Result<Self, TrainError> {
        let pipeline = PipelineFolder::open(folder, options.variant)?;
        let device = &options.device;
        let scheduler_path = folder.join("scheduler").join("scheduler_config.json");
        let scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;
        let noise_schedule = NoiseSchedule::from_config(&scheduler_config)?;
        let prediction_type =
            match PredictionType::parse(&scheduler_config.prediction_type, NOISE_SCHEDULER_CLASS) {
                Ok(trainable @ (PredictionType::Epsilon | PredictionType::VPrediction)) => {
                    trainable
                }
                Ok(PredictionType::Sample) | Err(_) => {
                    return Err(LoadError::BadConfig {
                        path: scheduler_path,
                        reason: format!(
                            "prediction_type {:?}: {TRAINABLE_PREDICTION_TYPES}",
                            scheduler_config.prediction_type
                        ),
                    }
                    .into());
                }
            };
        let tokenizer = pipeline.tokenizer()?;
        let (text_encoder, vae) = {
            let load = || -> Result<_, LoadError> {
                let text_encoder = pipeline.text_encoder(options.frozen_dtype, device)?;
                let vae = pipeline.vae(options.frozen_dtype, device)?;
                Ok((text_encoder, vae))
            };
            if options.bf16_frozen_encoders {
                crate::model::nn::with_bf16_products(load)?
            } else {
                load()?
            }
        };
        let vae = if options.keep_vae_decoder {
            vae
        } else {
            vae.without_decoder()
        };
        let unet_folder = pipeline.path.join("unet");
        let unet = if options.bf16_frozen_unet {
            TrainableUNet::frozen_bf16(
                pipeline.unet_weights_mapped(DType::F32, device, &bf16_product_weights)?,
                pipeline.unet_config.clone(),
                &unet_folder,
                options.seed,
            )?
        } else {
            TrainableUNet::from_tensors(
                pipeline.unet_weights(DType::F32, device)?,
                pipeline.unet_config.clone(),
                &unet_folder,
                options.seed,
            )?
        };
        let null_ids = Tensor::new(tokenizer.encode_for_model("").as_slice(), device)
            .and_then(|t| t.unsqueeze(0))
            .stage("tokenizing the empty prompt")?;
        let null_text_embedding = text_encoder
            .forward(&null_ids)
            .and_then(|t| t.to_dtype(DType::F32))
            .stage("encoding the empty prompt")?;
        Ok(Self {
            folder: folder.to_path_buf(),
            tokenizer,
            text_encoder: Some(text_encoder),
            vae_config: vae.config().clone(),
            vae: Some(vae),
            unet,
            noise_schedule,
            prediction_type,
            null_text_embedding,
            device: device.clone(),
        })
    }

    /// The prompts as the script's `tokenize_captions` gives them: u32 ids [B, 77] (padded to
    /// `model_max_length`, truncated keeping the final end token).
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Tensor, TrainError> {
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| self.tokenizer.encode_for_model(p))
            .collect();
        let len = self.tokenizer.model_max_length();
        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        Tensor::from_vec(flat, (prompts.len(), len), &self.device).stage("tokenizing prompts")
    }

    /// The frozen text encoder, unless released.
    pub fn text_encoder(&self) -> Result<&ClipTextModel, TrainError> {
        self.text_encoder
            .as_ref()
            .ok_or(TrainError::EncoderReleased {
                component: "text encoder",
            })
    }

    /// The frozen VAE, unless released.
    pub fn vae(&self) -> Result<&AutoencoderKL, TrainError> {
        self.vae
            .as_ref()
            .ok_or(TrainError::EncoderReleased { component: "VAE" })
    }

    /// The VAE's config (also after the VAE is released).
    pub fn vae_config(&self) -> &VaeConfig {
        &self.vae_config
    }

    /// Whether the VAE and text encoder are still loaded.
    pub fn holds_frozen_encoders(&self) -> bool {
        self.vae.is_some() && self.text_encoder.is_some()
    }

    /// Frees the VAE and the text encoder (their weights go with them): after the latents are
    /// cached, training steps need neither ([`TrainingModels::loss_of_encoded`]).
    pub fn release_frozen_encoders(&mut self) {
        self.vae = None;
        self.text_encoder = None;
    }

    /// The latent shape [B, 4, R/f, R/f] of a batch of `batch` images of `resolution`².
    pub fn latent_shape(&self, batch: usize, resolution: usize) -> [usize; 4] {
        let factor = self.vae_config.downscale_factor();
        let size = resolution / factor;
        [batch, self.vae_config.latent_channels, size, size]
    }

    /// The loss of one micro-batch (see the module doc), with what went into the UNet: the
    /// frozen encoders' part ([`TrainingModels::encode_batch`]), then the UNet's
    /// ([`TrainingModels::loss_of_encoded`]). The loss depends on the UNet's variables only.
    pub fn micro_batch_loss(
        &self,
        batch: &TrainBatch,
        draws: &StepDraws,
        conditioning_dropout_prob: Option<f64>,
    ) -> Result<MicroBatchLoss, TrainError> {
        let encoded = self.encode_batch(batch)?;
        self.loss_of_encoded(&encoded, draws, conditioning_dropout_prob)
    }

    /// Steps 1, 3 and 4 of the module doc without their random draws: the edited images'
    /// posterior, the prompts' text embeddings and the original images' latent mode. The frozen
    /// networks run without a graph (their weights are plain tensors, nothing is tracked), so
    /// their intermediate buffers are freed when this returns, before the UNet's forward pass.
    pub fn encode_batch(&self, batch: &TrainBatch) -> Result<EncodedBatch, TrainError> {
        let (bsz, channels, height, width) =
            batch
                .edited_pixel_values
                .dims4()
                .map_err(|_| TrainError::Batch {
                    reason: format!(
                        "edited pixels must be [B, 3, H, W], got {:?}",
                        batch.edited_pixel_values.dims()
                    ),
                })?;
        if batch.original_pixel_values.dims() != [bsz, channels, height, width] {
            return Err(TrainError::Batch {
                reason: format!(
                    "original pixels {:?} and edited pixels {:?} differ in shape",
                    batch.original_pixel_values.dims(),
                    batch.edited_pixel_values.dims()
                ),
            });
        }
        if batch.prompts.len() != bsz {
            return Err(TrainError::Batch {
                reason: format!(
                    "{} prompts for a batch of {bsz} images",
                    batch.prompts.len()
                ),
            });
        }
        let prompts: Vec<&str> = batch.prompts.iter().map(String::as_str).collect();
        let (edited_posterior, image_latents) = self.encode_images(batch)?;
        let encoder_hidden_states = self.encode_prompts(&prompts)?;
        Ok(EncodedBatch {
            edited_posterior,
            image_latents,
            encoder_hidden_states,
        })
    }

    /// The VAE's part of [`TrainingModels::encode_batch`]: the edited images' posterior and the
    /// original images' latent mode (f32).
    pub fn encode_images(
        &self,
        batch: &TrainBatch,
    ) -> Result<(DiagonalGaussian, Tensor), TrainError> {
        let vae = self.vae()?;
        let edited_posterior = vae
            .encode(&batch.edited_pixel_values)
            .stage("encoding the edited images")?;
        let image_latents = vae
            .encode(&batch.original_pixel_values)
            .stage("encoding the original images")?
            .mode()
            .to_dtype(DType::F32)
            .stage("image latents")?;
        Ok((edited_posterior, image_latents))
    }

    /// The text encoder's part of [`TrainingModels::encode_batch`]: the prompts' embeddings,
    /// f32 [B, 77, width].
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<Tensor, TrainError> {
        let input_ids = self.tokenize(prompts)?;
        self.text_encoder()?
            .forward(&input_ids)
            .and_then(|t| t.to_dtype(DType::F32))
            .stage("encoding the prompts")
    }

    /// The loss of one micro-batch from its encoded form (steps 1, 2, 5 and 6 of the module
    /// doc: the latent sample, the forward diffusion, conditioning dropout, the UNet and the
    /// loss). Needs neither the VAE nor the text encoder.
    pub fn loss_of_encoded(
        &self,
        encoded: &EncodedBatch,
        draws: &StepDraws,
        conditioning_dropout_prob: Option<f64>,
    ) -> Result<MicroBatchLoss, TrainError> {
        let bsz = encoded.batch_size()?;
        if draws.timesteps.len() != bsz {
            return Err(TrainError::Batch {
                reason: format!("{} timesteps for a batch of {bsz}", draws.timesteps.len()),
            });
        }
        if let Some(p) = conditioning_dropout_prob {
            check_dropout_prob(p)?;
            if draws.dropout_draws.len() != bsz {
                return Err(TrainError::Batch {
                    reason: format!(
                        "{} dropout draws for a batch of {bsz}",
                        draws.dropout_draws.len()
                    ),
                });
            }
        }

        // 1. Target latents: a sample of the edited image's posterior, scaled.
        let posterior = &encoded.edited_posterior;
        if posterior.mean.dims() != draws.latent_sample_noise.dims()
            || posterior.mean.dims() != draws.noise.dims()
        {
            return Err(TrainError::Batch {
                reason: format!(
                    "latents are {:?}; the sampling noise is {:?} and the noise {:?}",
                    posterior.mean.dims(),
                    draws.latent_sample_noise.dims(),
                    draws.noise.dims()
                ),
            });
        }
        let scaling_factor = self.vae_config.scaling_factor;
        let latents = (posterior
            .sample_with(&draws.latent_sample_noise)
            .and_then(|t| t.to_dtype(DType::F32))
            .stage("sampling the latents")?
            * scaling_factor)
            .stage("scaling the latents")?;
        let noise = draws.noise.to_dtype(DType::F32).stage("noise")?;

        // 2. The forward diffusion.
        let noisy_latents = self
            .noise_schedule
            .add_noise(&latents, &noise, &draws.timesteps)
            .stage("adding noise")?;

        // 3.–4. Conditioning: text embeddings and the original image's latent mode.
        let mut encoder_hidden_states = encoded.encoder_hidden_states.clone();
        let mut image_latents = encoded.image_latents.clone();

        // 5. Conditioning dropout.
        let dropped: Vec<DroppedConditioning> = match conditioning_dropout_prob {
            Some(p) => draws
                .dropout_draws
                .iter()
                .map(|&r| DroppedConditioning::from_draw(r, p))
                .collect(),
            None => vec![DroppedConditioning::default(); bsz],
        };
        if conditioning_dropout_prob.is_some() {
            let rows = dropped
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    if d.text {
                        Ok(self.null_text_embedding.clone())
                    } else {
                        encoder_hidden_states.narrow(0, i, 1)
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()
                .stage("text dropout")?;
            encoder_hidden_states = Tensor::cat(&rows, 0).stage("text dropout")?;
            let keep: Vec<f32> = dropped
                .iter()
                .map(|d| if d.image { 0.0 } else { 1.0 })
                .collect();
            let image_mask =
                Tensor::from_vec(keep, (bsz, 1, 1, 1), &self.device).stage("image dropout")?;
            image_latents = image_mask
                .broadcast_mul(&image_latents)
                .stage("image dropout")?;
        }

        // 6. The prediction and the loss.
        let unet_input =
            Tensor::cat(&[&noisy_latents, &image_latents], 1).stage("concatenating latents")?;
        let target = match self.prediction_type {
            PredictionType::Epsilon => noise.clone(),
            PredictionType::VPrediction => self
                .noise_schedule
                .velocity(&latents, &noise, &draws.timesteps)
                .stage("v-prediction target")?,
            PredictionType::Sample => {
                return Err(TrainError::BadSetting {
                    setting: "prediction_type",
                    value: "sample".into(),
                    reason: TRAINABLE_PREDICTION_TYPES,
                });
            }
        };
        // Only what the UNet reads stays alive through its forward and backward passes.
        drop((latents, noisy_latents, image_latents));
        let timesteps: Vec<f32> = draws.timesteps.iter().map(|&t| t as f32).collect();
        let timesteps = Tensor::from_vec(timesteps, bsz, &self.device).stage("timesteps")?;
        let unet = self.unet.compute_unet()?;
        let dtype = self.unet.compute_dtype();
        let prediction = unet
            .forward(
                &unet_input.to_dtype(dtype).stage("UNet input")?,
                &timesteps,
                &encoder_hidden_states.to_dtype(dtype).stage("UNet input")?,
            )
            .stage("UNet forward")?;
        drop(unet);
        let loss = prediction
            .to_dtype(DType::F32)
            .and_then(|p| p - &target)
            .and_then(|d| d.sqr())
            .and_then(|d| d.mean_all())
            .stage("loss")?;
        Ok(MicroBatchLoss {
            loss,
            encoder_hidden_states,
            unet_input,
            target,
            dropped,
        })
    }
}

/// A micro-batch after the frozen encoders (steps 1, 3 and 4 of the module doc before any
/// random draw): what [`TrainingModels::loss_of_encoded`] takes, encoded for this step
/// ([`TrainingModels::encode_batch`]) or read from the latent cache
/// ([`crate::train::latent_cache`]). Plain tensors, no graph.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    /// The edited images' posterior (in the VAE's dtype) [B, 4, h, w]: the target latents are
    /// `sample_with(noise)` of it, so each step still draws its own sample.
    pub edited_posterior: DiagonalGaussian,
    /// The original images' latent mode, f32 [B, 4, h, w].
    pub image_latents: Tensor,
    /// The prompts' text embeddings, f32 [B, 77, width].
    pub encoder_hidden_states: Tensor,
}

impl EncodedBatch {
    /// The batch size, checked to agree across the parts.
    pub fn batch_size(&self) -> Result<usize, TrainError> {
        let sizes = [
            self.edited_posterior.mean.dims().first().copied(),
            self.edited_posterior.logvar.dims().first().copied(),
            self.image_latents.dims().first().copied(),
            self.encoder_hidden_states.dims().first().copied(),
        ];
        match sizes {
            [Some(n), rest @ ..] if n > 0 && rest.iter().all(|&s| s == Some(n)) => Ok(n),
            _ => Err(TrainError::Batch {
                reason: format!(
                    "encoded batch parts disagree: posterior {:?}, image latents {:?}, text {:?}",
                    self.edited_posterior.mean.dims(),
                    self.image_latents.dims(),
                    self.encoder_hidden_states.dims()
                ),
            }),
        }
    }

    /// The batches one after another (dim 0), e.g. cached single examples into a micro-batch.
    pub fn cat(parts: &[&EncodedBatch]) -> Result<EncodedBatch, TrainError> {
        let stack = |pick: fn(&EncodedBatch) -> &Tensor| {
            let tensors: Vec<&Tensor> = parts.iter().map(|p| pick(p)).collect();
            Tensor::cat(&tensors, 0).stage("stacking cached latents")
        };
        let out = EncodedBatch {
            edited_posterior: DiagonalGaussian {
                mean: stack(|p| &p.edited_posterior.mean)?,
                logvar: stack(|p| &p.edited_posterior.logvar)?,
            },
            image_latents: stack(|p| &p.image_latents)?,
            encoder_hidden_states: stack(|p| &p.encoder_hidden_states)?,
        };
        out.batch_size()?;
        Ok(out)
    }

    /// Bytes held by the tensors (the text embedding counted too, even when shared).
    pub fn bytes(&self) -> usize {
        [
            &self.edited_posterior.mean,
            &self.edited_posterior.logvar,
            &self.image_latents,
            &self.encoder_hidden_states,
        ]
        .iter()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum()
    }
}

fn check_dropout_prob(p: f64) -> Result<(), TrainError> {
    if !(0.0..=1.0).contains(&p) {
        return Err(TrainError::BadSetting {
            setting: "conditioning_dropout_prob",
            value: p.to_string(),
            reason: "must be between 0 and 1",
        });
    }
    Ok(())
}

/// A micro-batch's loss and what the UNet saw.
#[derive(Debug, Clone)]
pub struct MicroBatchLoss {
    /// The f32 scalar loss, differentiable with respect to the UNet's variables.
    pub loss: Tensor,
    /// The text conditioning after dropout [B, 77, width].
    pub encoder_hidden_states: Tensor,
    /// `cat[noisy latents, image latents (after dropout)]` [B, 8, h, w].
    pub unet_input: Tensor,
    /// ε or v [B, 4, h, w].
    pub target: Tensor,
    /// What each sample lost to dropout.
    pub dropped: Vec<DroppedConditioning>,
}

/// The step settings (`--gradient_accumulation_steps --max_grad_norm
/// --conditioning_dropout_prob`).
#[derive(Debug, Clone, PartialEq)]
pub struct StepConfig {
    /// Micro-batches per optimizer step (k ≥ 1).
    pub gradient_accumulation_steps: usize,
    /// Gradients are scaled to at most this total 2-norm.
    pub max_grad_norm: f64,
    /// p, or `None` for no dropout.
    pub conditioning_dropout_prob: Option<f64>,
}

impl Default for StepConfig {
    /// The script's defaults.
    fn default() -> Self {
        Self {
            gradient_accumulation_steps: 1,
            max_grad_norm: 1.0,
            conditioning_dropout_prob: None,
        }
    }
}

/// What one micro-batch gave.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatchReport {
    /// Its loss (before division by k).
    pub loss: f32,
    /// What each sample lost to dropout.
    pub dropped: Vec<DroppedConditioning>,
}

/// What one optimizer step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// The global step after this one (1 for the first).
    pub step: u64,
    /// The script's logged `train_loss`: the sum of the micro-batch losses divided by k.
    pub loss: f64,
    /// The learning rate this step used.
    pub lr: f64,
    /// The gradients' total 2-norm before clipping.
    pub grad_norm: f32,
    /// Micro-batches accumulated into this step (k, or fewer at the end of an epoch).
    pub micro_batches: usize,
    /// The decay the EMA used, when there is one.
    pub ema_decay: Option<f64>,
}

/// The training state between steps: models, optimizer, schedule, EMA and the gradients being
/// accumulated.
pub struct Trainer {
    models: TrainingModels,
    optimizer: AdamW,
    schedule: LrSchedule,
    ema: Option<EmaModel>,
    config: StepConfig,
    grads: Vec<Option<Tensor>>,
    micro_batches: usize,
    train_loss: f64,
    /// The dynamic loss scale, when the UNet computes in float16.
    loss_scaler: Option<LossScaler>,
}

impl Trainer {
    /// A fresh run training every UNet weight: zero optimizer moments, and an EMA starting at
    /// the current weights when `ema` is given.
    pub fn new(
        models: TrainingModels,
        optimizer: AdamWConfig,
        schedule: LrSchedule,
        ema: Option<EmaConfig>,
        config: StepConfig,
    ) -> Result<Self, TrainError> {
        let params = models.unet.params().to_vec();
        Self::with_trainable(models, params, optimizer, schedule, ema, config)
    }

    /// A fresh run training only `params` (e.g. LoRA adapters the UNet reads): they must be
    /// variables the loss depends on; anything else in the graph gets no update.
    pub fn with_trainable(
        models: TrainingModels,
        params: Vec<(String, Var)>,
        optimizer: AdamWConfig,
        schedule: LrSchedule,
        ema: Option<EmaConfig>,
        config: StepConfig,
    ) -> Result<Self, TrainError> {
        let optimizer = AdamW::new(params, optimizer)?;
        Self::with_optimizer(models, optimizer, schedule, ema, config)
    }

    /// A fresh run with a fresh `optimizer` (e.g. one with 8-bit moments), training its
    /// parameters, with an EMA of them starting at their current values when `ema` is given.
    pub fn with_optimizer(
        models: TrainingModels,
        optimizer: AdamW,
        schedule: LrSchedule,
        ema: Option<EmaConfig>,
        config: StepConfig,
    ) -> Result<Self, TrainError> {
        let ema = match ema {
            Some(cfg) => Some(EmaModel::new(optimizer.params(), cfg)?),
            None => None,
        };
        Self::resume(models, optimizer, schedule, ema, config)
    }

    /// Continues a run from a restored optimizer (its step count is the global step; its
    /// parameters are what trains) and EMA (of the same parameters).
    pub fn resume(
        models: TrainingModels,
        optimizer: AdamW,
        schedule: LrSchedule,
        ema: Option<EmaModel>,
        config: StepConfig,
    ) -> Result<Self, TrainError> {
        if config.gradient_accumulation_steps == 0 {
            return Err(TrainError::BadSetting {
                setting: "gradient_accumulation_steps",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        if config.max_grad_norm.is_nan() || config.max_grad_norm <= 0.0 {
            return Err(TrainError::BadSetting {
                setting: "max_grad_norm",
                value: config.max_grad_norm.to_string(),
                reason: "must be a number above 0",
            });
        }
        if let Some(p) = config.conditioning_dropout_prob {
            check_dropout_prob(p)?;
        }
        if let Some(ema) = &ema
            && (ema.shadow().len() != optimizer.params().len()
                || ema
                    .shadow()
                    .iter()
                    .zip(optimizer.params())
                    .any(|((a, _), (b, _))| a != b))
        {
            return Err(TrainError::Ema(EmaError::Mismatch {
                reason: "the EMA does not average the optimizer's parameters".into(),
            }));
        }
        let grads = vec![None; optimizer.params().len()];
        let loss_scaler = (models.unet.compute_dtype() == DType::F16).then(LossScaler::default);
        Ok(Self {
            models,
            optimizer,
            schedule,
            ema,
            config,
            grads,
            micro_batches: 0,
            train_loss: 0.0,
            loss_scaler,
        })
    }

    /// The dynamic loss scale (float16 compute only).
    pub fn loss_scaler(&self) -> Option<&LossScaler> {
        self.loss_scaler.as_ref()
    }

    /// Continues with a checkpoint's loss scale (ignored unless the UNet computes in float16).
    pub fn restore_loss_scale(&mut self, state: LossScaleState) {
        if let Some(scaler) = &mut self.loss_scaler {
            *scaler = LossScaler::from_state(state);
        }
    }

    /// The models (for validation edits: the UNet's variables hold the current weights).
    pub fn models(&self) -> &TrainingModels {
        &self.models
    }

    /// Frees the frozen VAE and text encoder ([`TrainingModels::release_frozen_encoders`]);
    /// afterwards only [`Trainer::accumulate_encoded`] can run.
    pub fn release_frozen_encoders(&mut self) {
        self.models.release_frozen_encoders();
    }

    /// The optimizer (for checkpoints).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The EMA, if enabled (for checkpoints and the final model).
    pub fn ema(&self) -> Option<&EmaModel> {
        self.ema.as_ref()
    }

    /// The schedule.
    pub fn schedule(&self) -> &LrSchedule {
        &self.schedule
    }

    /// The step settings.
    pub fn config(&self) -> &StepConfig {
        &self.config
    }

    /// Optimizer steps taken (the script's `global_step`).
    pub fn global_step(&self) -> u64 {
        self.optimizer.step_count()
    }

    /// Micro-batches accumulated since the last optimizer step.
    pub fn pending_micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The accumulated gradients by parameter (scaled by 1/k), before clipping.
    pub fn accumulated_gradients(&self) -> &[Option<Tensor>] {
        &self.grads
    }

    /// The trained parameters by name.
    pub fn params(&self) -> &[(String, Var)] {
        self.optimizer.params()
    }

    /// Forward and backward of one micro-batch: `loss / k` is differentiated and its gradients
    /// added to the accumulated ones. No optimizer step.
    pub fn accumulate(
        &mut self,
        batch: &TrainBatch,
        draws: &StepDraws,
    ) -> Result<MicroBatchReport, TrainError> {
        let encoded = self.models.encode_batch(batch)?;
        self.accumulate_encoded(&encoded, draws)
    }

    /// [`Trainer::accumulate`] for a batch already through the frozen encoders (the latent
    /// cache's, or [`TrainingModels::encode_batch`]'s).
    pub fn accumulate_encoded(
        &mut self,
        encoded: &EncodedBatch,
        draws: &StepDraws,
    ) -> Result<MicroBatchReport, TrainError> {
        self.accumulate_share(encoded, draws, 1.0)
    }

    /// [`Trainer::accumulate_encoded`] for this process's `share` of a global batch split
    /// across processes (its examples over the global batch's): the loss is weighted by it, so
    /// that the sum of every process's gradients ([`Trainer::reduce_accumulated`]) is the
    /// gradient of the whole batch's mean loss.
    pub fn accumulate_share(
        &mut self,
        encoded: &EncodedBatch,
        draws: &StepDraws,
        share: f64,
    ) -> Result<MicroBatchReport, TrainError> {
        // With gradient checkpointing, the weights inside the UNet's segments get their
        // gradients from the segments' recomputation, into this store, not from `backward()`.
        let segment_grads = self.models.unet.unet.segment_gradients().cloned();
        if let Some(store) = &segment_grads {
            store.clear();
        }
        let MicroBatchLoss { loss, dropped, .. } =
            self.models
                .loss_of_encoded(encoded, draws, self.config.conditioning_dropout_prob)?;
        let k = self.config.gradient_accumulation_steps;
        let loss_value = loss.to_scalar::<f32>().stage("loss")?;
        // accelerator.backward divides by the accumulation steps (and multiplies by the loss
        // scale in float16).
        let loss_scale = self.loss_scaler.as_ref().map_or(1.0, LossScaler::scale);
        let scaled = (&loss * (loss_scale * share / k as f64)).stage("scaling the loss")?;
        let grads = scaled.backward().stage("backward")?;
        // The graph holds every activation: gone before the gradients are summed.
        drop((scaled, loss));
        let mut inner = segment_grads.map(|s| s.take()).unwrap_or_default();
        for (slot, (_, var)) in self.grads.iter_mut().zip(self.optimizer.params()) {
            let outer = grads.get(var.as_tensor()).map(Tensor::detach);
            let grad = match (outer, inner.remove(&var.as_tensor().id())) {
                (Some(a), Some(b)) => Some((a + b).stage("merging segment gradients")?),
                (a, b) => a.or(b),
            };
            if let Some(grad) = grad {
                *slot = Some(match slot.take() {
                    Some(sum) => (sum + grad).stage("accumulating gradients")?,
                    None => grad,
                });
            }
        }
        self.micro_batches += 1;
        self.train_loss += f64::from(loss_value) * share / k as f64;
        Ok(MicroBatchReport {
            loss: loss_value,
            dropped,
        })
    }

    /// Counts a micro-batch in which this process had no examples (an epoch's short last batch
    /// split across processes): it adds nothing, but the processes agree on when to step.
    pub fn count_empty_micro_batch(&mut self) {
        self.micro_batches += 1;
    }

    /// Lets `reduce` replace the accumulated gradients (by parameter, in [`Trainer::params`]'
    /// order) and the accumulated loss, before [`Trainer::optimizer_step`] clips and applies
    /// them: data-parallel training sums them across processes here.
    pub fn reduce_accumulated<E>(
        &mut self,
        reduce: impl FnOnce(&[(String, Var)], &mut [Option<Tensor>], &mut f64) -> Result<(), E>,
    ) -> Result<(), E> {
        reduce(
            self.optimizer.params(),
            &mut self.grads,
            &mut self.train_loss,
        )
    }

    /// One micro-batch; after the k-th since the last optimizer step, also the optimizer step.
    pub fn micro_batch(
        &mut self,
        batch: &TrainBatch,
        draws: &StepDraws,
    ) -> Result<(MicroBatchReport, Option<StepReport>), TrainError> {
        let report = self.accumulate(batch, draws)?;
        let step = if self.micro_batches >= self.config.gradient_accumulation_steps {
            Some(self.optimizer_step()?)
        } else {
            None
        };
        Ok((report, step))
    }

    /// Clips the accumulated gradients, steps AdamW at the schedule's rate, updates the EMA and
    /// clears the gradients. Called by [`Trainer::micro_batch`] after k micro-batches; call it
    /// directly at the end of an epoch whose micro-batch count is not a multiple of k, as
    /// accelerate syncs there.
    pub fn optimizer_step(&mut self) -> Result<StepReport, TrainError> {
        if self.micro_batches == 0 {
            return Err(TrainError::NothingAccumulated);
        }
        let lr = self.schedule.lr(self.optimizer.step_count());
        if let Some(scaler) = &self.loss_scaler {
            // GradScaler.unscale_ before clipping.
            let inverse = 1.0 / scaler.scale();
            for grad in self.grads.iter_mut().flatten() {
                *grad = (&*grad * inverse).stage("unscaling the gradients")?;
            }
        }
        // The clipping factor is applied inside the optimizer's update: no scaled copy.
        let (grad_norm, clip) =
            clip_coefficient(&self.grads, self.config.max_grad_norm).stage("clipping")?;
        if let Some(scaler) = &mut self.loss_scaler {
            let overflowed = !grad_norm.is_finite() && self.train_loss.is_finite();
            let scale = scaler.scale();
            scaler.update(overflowed);
            let new_scale = scaler.scale();
            if overflowed && new_scale >= MIN_LOSS_SCALE {
                self.clear_accumulated();
                return Err(TrainError::LossScaleOverflow { scale, new_scale });
            }
        }
        if !(grad_norm.is_finite() && self.train_loss.is_finite()) {
            // As fp16 loss scaling does: a step whose numbers overflowed changes nothing.
            let loss = self.train_loss;
            self.clear_accumulated();
            return Err(TrainError::NonFiniteStep { loss, grad_norm });
        }
        self.optimizer.step_scaled(&self.grads, lr, clip)?;
        let ema_decay = match &mut self.ema {
            Some(ema) => Some(ema.step(self.optimizer.params())?),
            None => None,
        };
        let report = StepReport {
            step: self.optimizer.step_count(),
            loss: self.train_loss,
            lr,
            grad_norm,
            micro_batches: self.micro_batches,
            ema_decay,
        };
        self.clear_accumulated();
        Ok(report)
    }

    /// Drops the accumulated gradients and loss (after a step, or instead of one).
    fn clear_accumulated(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.micro_batches = 0;
        self.train_loss = 0.0;
    }

    /// Runs `f` with the EMA weights in the UNet (`store`, `copy_to`, then `restore`), as the
    /// script's validation does; without EMA, with the current weights.
    pub fn with_ema_weights<T>(
        &mut self,
        f: impl FnOnce(&TrainingModels) -> T,
    ) -> Result<T, TrainError> {
        let Some(ema) = &mut self.ema else {
            return Ok(f(&self.models));
        };
        let params = self.optimizer.params();
        ema.store(params)?;
        ema.copy_to(params)?;
        let out = f(&self.models);
        ema.restore(params)?;
        Ok(out)
    }

    /// Gives back the models, optimizer and EMA (e.g. to save the final model).
    pub fn into_parts(self) -> (TrainingModels, AdamW, Option<EmaModel>) {
        (self.models, self.optimizer, self.ema)
    }
}
