//! `--cache_latents` (kohya's option; not in diffusers' script): every example goes through the
//! frozen encoders once, before the first step, and the training steps read the result instead
//! of running the VAE and the text encoder again.
//!
//! What is kept per example ([`EncodedBatch`] of one): the edited image's VAE posterior (its mean
//! and log-variance, so every step still draws its own `latent_dist.sample()` from the step's
//! noise, as the uncached run does), the original image's latent mode, and the instruction's
//! text embedding (one tensor per distinct instruction, shared by the examples that have it).
//! With `--random_flip`, the images of both flips. The random crop needs nothing: after the
//! square resize it is the identity, as in the script ([`crate::train::data::crop_to`]), so the
//! flip is the only augmentation and a cached run draws and computes exactly what an uncached
//! one does (one example at a time through the encoders; the same values for a batch of one).
//!
//! The cache lives in memory only: a resumed run builds it again. Its size is
//! [`LatentCache::bytes`] (about 0.3 MB per example at 256² with SD-1.5's 77×768 text
//! embeddings, which dominate; a few GB for tens of thousands of distinct instructions).
//! An example that cannot be read is remembered with its error and skipped, with a notice, each
//! time the sampler picks it, as the uncached loop does.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::data::{CropMode, DataError, Dataset, prepare_batch};
use super::step::{EncodedBatch, TrainError, TrainingModels};

/// One example's encodings.
#[derive(Debug, Clone)]
struct CachedExample {
    /// As read.
    plain: EncodedBatch,
    /// Input and edited image mirrored (with `--random_flip`).
    flipped: Option<EncodedBatch>,
}

/// Why [`LatentCache::build`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Preparing an example's pixels failed (not a bad file: those are skipped).
    #[error("caching latents: {0}")]
    Data(#[from] DataError),
    /// The encoders failed.
    #[error("caching latents: {0}")]
    Train(#[from] TrainError),
}

/// The encoded examples of a dataset, by dataset index.
#[derive(Debug, Clone)]
pub struct LatentCache {
    examples: Vec<Result<CachedExample, String>>,
    both_flips: bool,
    bytes: usize,
}

/// How [`LatentCache::build`] prepares the examples: as the training loop would.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// `--resolution`.
    pub resolution: u32,
    /// `--center_crop` or the random crop.
    pub crop: CropMode,
    /// `--random_flip`: cache the mirrored images too.
    pub both_flips: bool,
    /// Where the tensors live.
    pub device: Device,
}

impl LatentCache {
    /// Encodes every example of `dataset` with `models`' frozen encoders. `progress(done, total)`
    /// is called after each example; `stop()` is asked before each, and a `true` ends the
    /// build early with `Ok(None)`.
    pub fn build(
        dataset: &Dataset,
        models: &TrainingModels,
        options: &CacheOptions,
        stop: &dyn Fn() -> bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Option<Self>, CacheError> {
        let total = dataset.len();
        let mut texts: HashMap<String, Tensor> = HashMap::new();
        let mut examples = Vec::with_capacity(total);
        let mut bytes = 0;
        for index in 0..total {
            if stop() {
                return Ok(None);
            }
            let example = match dataset.load(index) {
                Ok(example) => example,
                Err(error) => {
                    examples.push(Err(error.to_string()));
                    progress(index + 1, total);
                    continue;
                }
            };
            let flips: &[bool] = if options.both_flips {
                &[false, true]
            } else {
                &[false]
            };
            let mut encoded = Vec::with_capacity(flips.len());
            for &flip in flips {
                let batch = prepare_batch(
                    std::slice::from_ref(&example),
                    &[flip],
                    options.resolution,
                    options.crop,
                    &options.device,
                )?;
                let (mut edited_posterior, image_latents) = models.encode_images(&batch)?;
                // The mean is a view into the encoder's output of twice its size: keep a copy.
                edited_posterior.mean = edited_posterior
                    .mean
                    .copy()
                    .map_err(compute("copying latents"))?;
                // The text embedding does not depend on the image: one per distinct instruction.
                let encoder_hidden_states = match texts.get(&example.prompt) {
                    Some(text) => text.clone(),
                    None => {
                        let text = models.encode_prompts(&[example.prompt.as_str()])?;
                        bytes += tensor_bytes(&text);
                        texts.insert(example.prompt.clone(), text.clone());
                        text
                    }
                };
                let one = EncodedBatch {
                    edited_posterior,
                    image_latents,
                    encoder_hidden_states,
                };
                bytes += one.bytes() - tensor_bytes(&one.encoder_hidden_states);
                encoded.push(one);
            }
            let mut encoded = encoded.into_iter();
            let plain = encoded.next().ok_or_else(|| TrainError::Batch {
                reason: "no encoding of an example".into(),
            })?;
            examples.push(Ok(CachedExample {
                plain,
                flipped: encoded.next(),
            }));
            progress(index + 1, total);
        }
        Ok(Some(Self {
            examples,
            both_flips: options.both_flips,
            bytes,
        }))
    }

    /// Examples in the cache (readable or not).
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether the dataset had no examples.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// Examples that could not be read (skipped whenever picked).
    pub fn unreadable(&self) -> usize {
        self.examples.iter().filter(|e| e.is_err()).count()
    }

    /// The reader's message for the first example that could not be read.
    pub fn first_unreadable(&self) -> Option<&str> {
        self.examples
            .iter()
            .find_map(|e| e.as_ref().err().map(String::as_str))
    }

    /// Bytes of tensors held (each distinct text embedding once).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The encodings of dataset example `index`, mirrored when `flip`; the error message of an
    /// example that could not be read.
    pub fn get(&self, index: usize, flip: bool) -> Result<&EncodedBatch, CacheMiss> {
        match self.examples.get(index) {
            None => Err(CacheMiss::OutOfRange {
                index,
                len: self.examples.len(),
            }),
            Some(Err(message)) => Err(CacheMiss::Unreadable(message.clone())),
            Some(Ok(example)) if !flip => Ok(&example.plain),
            Some(Ok(example)) => example.flipped.as_ref().ok_or(CacheMiss::NoFlip {
                index,
                both_flips: self.both_flips,
            }),
        }
    }
}

/// Why [`LatentCache::get`] has no encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheMiss {
    /// The example could not be read when the cache was built (the reader's message).
    #[error("{0}")]
    Unreadable(String),
    /// No such example.
    #[error("example {index} is not in the latent cache of {len} examples")]
    OutOfRange {
        /// Asked for.
        index: usize,
        /// Cached.
        len: usize,
    },
    /// A flipped example from a cache built without `--random_flip`.
    #[error("example {index} was cached without its mirrored images (both flips: {both_flips})")]
    NoFlip {
        /// Asked for.
        index: usize,
        /// Whether the cache was built with both flips.
        both_flips: bool,
    },
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

fn compute(stage: &'static str) -> impl Fn(candle_core::Error) -> TrainError {
    move |source| TrainError::Compute { stage, source }
}
