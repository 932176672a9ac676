//! One InstructPix2Pix edit, step for step as diffusers' `StableDiffusionInstructPix2PixPipeline`:
//! prompt embeddings `[prompt, negative, negative]`, image latents `[img, img, zeros]` (the VAE
//! posterior's mode, unscaled), three-way guidance, the scheduler's steps, VAE decode.
//!
//! The pipeline keeps the prompt embeddings and image latents of the last edit, so changing only the
//! seed, the scales, the steps or the scheduler re-runs only the denoising loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::image_tensor::{to_images, to_tensor};
use super::preview::latents_to_preview;
use super::rng::TorchGenerator;
use super::scheduler::{NoiseSource, SchedulerConfig, SchedulerError, build_scheduler};
use super::settings::{EditSettings, InvalidSetting, check_num_images};
use crate::model::InstructPix2PixModel;
use crate::model::device::is_out_of_memory;

/// What went wrong in an edit.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("the edit was cancelled")]
    Cancelled,
    #[error("invalid {name} {value}: {reason}")]
    InvalidSetting {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error(
        "the input image is {width}×{height}: both sides must be positive multiples of {multiple} (the VAE's factor); resize it first"
    )]
    ImageSize {
        width: u32,
        height: u32,
        multiple: u32,
    },
    #[error("the given latents have shape {given:?}, but this image and model need {expected:?}")]
    LatentsShape {
        given: Vec<usize>,
        expected: Vec<usize>,
    },
    /// The numbers became NaN or infinite: broken weights, a config value out of range, or
    /// latents too large. An error instead of a black picture.
    #[error(
        "the edit turned to NaN or infinity in {stage} ({count} of {total} values); the model's weights, its config or the given latents are out of range, so no image was made"
    )]
    NonFinite {
        stage: &'static str,
        count: usize,
        total: usize,
    },
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// The device's memory ran out (a GPU's, usually): what to change, never an abort.
    #[error(
        "the device ran out of memory during the edit ({detail}): edit a smaller image, use --dtype f16 or bf16 on a GPU, or close other programs using its memory"
    )]
    OutOfMemory { detail: String },
    #[error("the model failed during the edit: {0}")]
    Model(candle_core::Error),
}

impl From<candle_core::Error> for EditError {
    /// candle's errors, with the driver's out-of-memory failures told apart.
    fn from(error: candle_core::Error) -> Self {
        let message = error.to_string();
        if is_out_of_memory(&message) {
            let detail = message
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            EditError::OutOfMemory { detail }
        } else {
            EditError::Model(error)
        }
    }
}

impl From<InvalidSetting> for EditError {
    fn from(
        InvalidSetting {
            name,
            value,
            reason,
        }: InvalidSetting,
    ) -> Self {
        EditError::InvalidSetting {
            name,
            value,
            reason,
        }
    }
}

/// Progress of a running edit, given to the callback after each denoising step.
pub struct StepInfo<'a> {
    /// Steps done so far (1 after the first).
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    pub elapsed: Duration,
    latents: &'a Tensor,
}

impl StepInfo<'_> {
    /// A cheap RGB approximation of the current latents at `width`×`height` (no VAE decode).
    pub fn preview(&self, width: u32, height: u32) -> candle_core::Result<RgbImage> {
        latents_to_preview(self.latents, width, height)
    }
}

/// The result of one edit.
#[derive(Debug, Clone)]
pub struct EditOutput {
    pub image: RgbImage,
    pub seed: u64,
    /// Whether the prompt embeddings / image latents came from the previous edit.
    pub reused_prompt_embeddings: bool,
    pub reused_image_latents: bool,
    /// The text encoder and the VAE encoder (next to nothing for what came from the previous
    /// edit).
    pub encode_time: Duration,
    pub denoise_time: Duration,
    /// The VAE decoder.
    pub decode_time: Duration,
    pub total_time: Duration,
}

/// The result of [`EditPipeline::edit_batch`]: `images[i]` is diffusers' `.images[i]` for
/// `num_images_per_prompt = images.len()`.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub images: Vec<RgbImage>,
    pub seed: u64,
    /// Whether the prompt embeddings / image latents came from the previous edit.
    pub reused_prompt_embeddings: bool,
    pub reused_image_latents: bool,
    /// The text encoder and the VAE encoder (next to nothing for what came from the previous
    /// edit).
    pub encode_time: Duration,
    pub denoise_time: Duration,
    /// The VAE decoder.
    pub decode_time: Duration,
    pub total_time: Duration,
}

struct CachedPrompt {
    prompt: String,
    negative_prompt: String,
    /// [prompt, negative] embeddings, each [1, 77, width].
    text: Tensor,
    negative: Tensor,
}

struct CachedImage {
    width: u32,
    height: u32,
    pixels_hash: u64,
    /// The VAE posterior's mode, unscaled: [1, C, h, w].
    latents: Tensor,
}

/// A loaded model ready for editing; load once, edit many times.
pub struct EditPipeline {
    model: InstructPix2PixModel,
    scheduler_config: SchedulerConfig,
    cached_prompt: Option<CachedPrompt>,
    cached_image: Option<CachedImage>,
}

impl EditPipeline {
    /// Wraps a loaded model; reads its `scheduler/scheduler_config.json` (whose
    /// `prediction_type` gives way to a single-file checkpoint's own, when it states one).
    pub fn new(model: InstructPix2PixModel) -> Result<Self, EditError> {
        let path = model.folder.join("scheduler").join("scheduler_config.json");
        let mut scheduler_config = SchedulerConfig::from_file(&path)?;
        if let Some(prediction) = model.single_file.as_ref().and_then(|s| s.prediction_type) {
            scheduler_config.prediction_type = prediction.to_string();
        }
        Ok(Self {
            model,
            scheduler_config,
            cached_prompt: None,
            cached_image: None,
        })
    }

    pub fn model(&self) -> &InstructPix2PixModel {
        &self.model
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Forgets the cached prompt embeddings and image latents.
    pub fn clear_caches(&mut self) {
        self.cached_prompt = None;
        self.cached_image = None;
    }

    /// The image sides must be multiples of this.
    pub fn size_multiple(&self) -> u32 {
        self.model.vae_scale_factor() as u32
    }

    /// Edits `image`, which must already be at the edit size (see [`super::image::edit_size`]).
    /// `on_step` runs after every denoising step; `cancel` is checked before every step.
    pub fn edit(
        &mut self,
        image: &RgbImage,
        settings: &EditSettings,
        on_step: &mut dyn FnMut(&StepInfo<'_>),
        cancel: &AtomicBool,
    ) -> Result<EditOutput, EditError> {
        let mut batch = self.edit_batch(image, settings, 1, on_step, cancel)?;
        let image = batch
            .images
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("the VAE decoded no image".into()))?;
        Ok(EditOutput {
            image,
            seed: batch.seed,
            reused_prompt_embeddings: batch.reused_prompt_embeddings,
            reused_image_latents: batch.reused_image_latents,
            encode_time: batch.encode_time,
            denoise_time: batch.denoise_time,
            decode_time: batch.decode_time,
            total_time: batch.total_time,
        })
    }

    /// `num_images` edits of `image` from one seed, exactly as diffusers'
    /// `num_images_per_prompt=num_images` with `generator=torch.Generator().manual_seed(seed)`:
    /// the initial latents of all the images are one `randn([num_images, C, h, w])` from one
    /// generator, and a stochastic scheduler draws each step's noise for the whole batch. Image
    /// `i` of the result is diffusers' `.images[i]`.
    ///
    /// The UNet and the VAE decoder run one image at a time (the same numbers as diffusers'
    /// batch of `3 × num_images`, up to float rounding), so memory stays that of one edit;
    /// `cancel` is also checked between the images of a step. Given initial latents must have
    /// shape `[num_images, C, h, w]`.
    pub fn edit_batch(
        &mut self,
        image: &RgbImage,
        settings: &EditSettings,
        num_images: usize,
        on_step: &mut dyn FnMut(&StepInfo<'_>),
        cancel: &AtomicBool,
    ) -> Result<BatchOutput, EditError> {
        let started = Instant::now();
        settings.validate()?;
        check_num_images(num_images)?;
        let multiple = self.size_multiple();
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 || width % multiple != 0 || height % multiple != 0 {
            return Err(EditError::ImageSize {
                width,
                height,
                multiple,
            });
        }
        let guided = settings.uses_guidance();

        let reused_prompt_embeddings = self.ensure_prompt_embeddings(settings)?;
        let reused_image_latents = self.ensure_image_latents(image)?;
        let encode_time = started.elapsed();
        if cancel.load(Ordering::Relaxed) {
            return Err(EditError::Cancelled);
        }
        let (
            Some(prompt),
            Some(CachedImage {
                latents: image_latents,
                ..
            }),
        ) = (&self.cached_prompt, &self.cached_image)
        else {
            return Err(
                candle_core::Error::Msg("the encoders produced no conditioning".into()).into(),
            );
        };
        // One image's conditioning: diffusers' batch of 3·N is these, image by image.
        let (text_embeddings, conditioning_latents) = if guided {
            let text = Tensor::cat(&[&prompt.text, &prompt.negative, &prompt.negative], 0)?;
            let zeros = image_latents.zeros_like()?;
            let cond = Tensor::cat(&[image_latents, image_latents, &zeros], 0)?;
            (text, cond)
        } else {
            (prompt.text.clone(), image_latents.clone())
        };

        let mut scheduler =
            build_scheduler(&self.scheduler_config, settings.scheduler, settings.steps)?;
        let latent_shape = vec![
            num_images,
            self.model.vae.config().latent_channels,
            (height / multiple) as usize,
            (width / multiple) as usize,
        ];
        let dtype = self.model.dtype;
        let device = &self.model.device;
        let mut generator = TorchGenerator::new(settings.seed);
        let noise = match &settings.initial_latents {
            Some(given) => {
                if given.shape != latent_shape {
                    return Err(EditError::LatentsShape {
                        given: given.shape.clone(),
                        expected: latent_shape.clone(),
                    });
                }
                Tensor::from_slice(&given.values, given.shape.as_slice(), device)?
                    .to_dtype(dtype)?
            }
            None => generator.randn(&latent_shape, dtype, device)?,
        };
        let mut latents = (noise * scheduler.init_noise_sigma())?;
        check_finite(
            &latents,
            "the initial latents (noise × the scheduler's sigma)",
        )?;

        let denoise_started = Instant::now();
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let mut noise_source = TorchNoise(&mut generator);
        for (index, &timestep) in timesteps.iter().enumerate() {
            let mut predictions = Vec::with_capacity(num_images);
            for item in 0..num_images {
                if cancel.load(Ordering::Relaxed) {
                    return Err(EditError::Cancelled);
                }
                let item_latents = latents.narrow(0, item, 1)?;
                let model_input = if guided {
                    Tensor::cat(&[&item_latents, &item_latents, &item_latents], 0)?
                } else {
                    item_latents
                };
                let scaled = scheduler.scale_model_input(&model_input, index)?;
                let unet_input = Tensor::cat(&[&scaled, &conditioning_latents], 1)?;
                let batch = unet_input.dim(0)?;
                let t = Tensor::full(timestep as f32, batch, device)?;
                let noise_pred = self.model.unet.forward(&unet_input, &t, &text_embeddings)?;
                let noise_pred = if guided {
                    let chunks = noise_pred.chunk(3, 0)?;
                    let (text, image_branch, uncond) = (&chunks[0], &chunks[1], &chunks[2]);
                    // Same operation order as diffusers so float rounding matches.
                    let text_term = ((text - image_branch)? * settings.guidance_scale)?;
                    let image_term = ((image_branch - uncond)? * settings.image_guidance_scale)?;
                    ((uncond + text_term)? + image_term)?
                } else {
                    noise_pred
                };
                predictions.push(noise_pred);
            }
            let noise_pred = if predictions.len() == 1 {
                predictions.remove(0)
            } else {
                Tensor::cat(&predictions, 0)?
            };
            // The whole batch in one step: a stochastic scheduler draws its noise for all the
            // images at once, as diffusers does.
            latents = scheduler.step(&noise_pred, index, &latents, &mut noise_source)?;
            on_step(&StepInfo {
                step: index + 1,
                total,
                timestep,
                elapsed: denoise_started.elapsed(),
                latents: &latents,
            });
        }
        let denoise_time = denoise_started.elapsed();
        if cancel.load(Ordering::Relaxed) {
            return Err(EditError::Cancelled);
        }
        check_finite(
            &latents,
            "denoising (the UNet's latents after the last step)",
        )?;
        let scaling_factor = self.model.vae.config().scaling_factor;
        let decode_started = Instant::now();
        let mut images = Vec::with_capacity(num_images);
        for item in 0..num_images {
            if cancel.load(Ordering::Relaxed) {
                return Err(EditError::Cancelled);
            }
            let item_latents = latents.narrow(0, item, 1)?;
            let decoded = self.model.vae.decode(&(item_latents / scaling_factor)?)?;
            let decoded = decoded.to_dtype(DType::F32)?;
            check_finite(&decoded, "the decoded image (VAE decoder)")?;
            images.extend(to_images(&decoded)?);
        }
        if images.len() != num_images {
            return Err(candle_core::Error::Msg(format!(
                "the VAE decoded {} images, {num_images} expected",
                images.len()
            ))
            .into());
        }
        Ok(BatchOutput {
            images,
            seed: settings.seed,
            reused_prompt_embeddings,
            reused_image_latents,
            encode_time,
            denoise_time,
            decode_time: decode_started.elapsed(),
            total_time: started.elapsed(),
        })
    }

    /// Encodes the prompts unless the previous edit used the same ones. Returns whether it reused.
    fn ensure_prompt_embeddings(&mut self, settings: &EditSettings) -> Result<bool, EditError> {
        if let Some(cached) = &self.cached_prompt
            && cached.prompt == settings.prompt
            && cached.negative_prompt == settings.negative_prompt
        {
            return Ok(true);
        }
        let text = self.encode_text(&settings.prompt)?;
        check_finite(&text, "the prompt's text embeddings (text encoder)")?;
        let negative = self.encode_text(&settings.negative_prompt)?;
        check_finite(
            &negative,
            "the negative prompt's text embeddings (text encoder)",
        )?;
        self.cached_prompt = Some(CachedPrompt {
            prompt: settings.prompt.clone(),
            negative_prompt: settings.negative_prompt.clone(),
            text,
            negative,
        });
        Ok(false)
    }

    /// CLIP's last hidden state for `text`, padded/truncated to the tokenizer's max length.
    pub fn encode_text(&self, text: &str) -> Result<Tensor, EditError> {
        let ids = self.model.tokenizer.encode_for_model(text);
        let len = ids.len();
        let ids = Tensor::from_vec(ids, (1, len), &self.model.device)?;
        Ok(self
            .model
            .text_encoder
            .forward(&ids)?
            .to_dtype(self.model.dtype)?)
    }

    /// Encodes the image unless the previous edit used the same pixels. Returns whether it reused.
    fn ensure_image_latents(&mut self, image: &RgbImage) -> Result<bool, EditError> {
        let (width, height) = image.dimensions();
        let pixels_hash = hash_pixels(image);
        if let Some(cached) = &self.cached_image
            && cached.width == width
            && cached.height == height
            && cached.pixels_hash == pixels_hash
        {
            return Ok(true);
        }
        let latents = self.encode_image(image)?;
        check_finite(&latents, "the input image's latents (VAE encoder)")?;
        self.cached_image = Some(CachedImage {
            width,
            height,
            pixels_hash,
            latents,
        });
        Ok(false)
    }

    /// The VAE posterior's mode for `image` (not multiplied by the scaling factor).
    pub fn encode_image(&self, image: &RgbImage) -> Result<Tensor, EditError> {
        let pixels = to_tensor(image, &self.model.device)?.to_dtype(self.model.dtype)?;
        Ok(self.model.vae.encode(&pixels)?.mode())
    }
}

/// Refuses a tensor holding NaN or infinity, naming the stage that produced it.
fn check_finite(tensor: &Tensor, stage: &'static str) -> Result<(), EditError> {
    let values = tensor
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let count = values.iter().filter(|v| !v.is_finite()).count();
    if count == 0 {
        return Ok(());
    }
    Err(EditError::NonFinite {
        stage,
        count,
        total: values.len(),
    })
}

fn hash_pixels(image: &RgbImage) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    image.as_raw().hash(&mut hasher);
    hasher.finish()
}

/// Feeds the schedulers' stochastic steps from torch's generator, continuing the stream that drew
/// the initial latents, as diffusers does with one `generator`.
struct TorchNoise<'a>(&'a mut TorchGenerator);

impl NoiseSource for TorchNoise<'_> {
    fn standard_normal(&mut self, shape: &[usize]) -> Vec<f32> {
        self.0.randn_f32(shape.iter().product())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12 item 4: a driver's out-of-memory failure becomes advice, not "the model failed".
    #[test]
    fn running_out_of_device_memory_says_what_to_change() {
        let cuda = candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        );
        let error = EditError::from(cuda);
        assert!(matches!(error, EditError::OutOfMemory { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("ran out of memory")
                && message.contains("smaller image")
                && message.contains("--dtype f16"),
            "{message}"
        );
        let other = EditError::from(candle_core::Error::Msg("shape mismatch".into()));
        assert!(matches!(other, EditError::Model(_)), "{other:?}");
    }
}
