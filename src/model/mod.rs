//! Finding and loading a model: local folders and Hub repos, configs, tokenizer, weights,
//! the networks (CLIP text encoder, VAE, UNet) built from diffusers' weight names, device and dtype.
//! Knows nothing of the window or the edit loop.

pub mod catalog;
pub mod clip;
pub mod config;
pub mod cpu_precision;
pub mod device;
pub mod files;
pub mod grad_checkpoint;
pub mod hub;
mod loaded;
pub mod lora;
pub mod nn;
pub mod single_file;
pub mod tokenizer;
pub mod torch_file;
pub mod unet;
pub mod vae;
pub mod weights;

pub use loaded::{
    INSTRUCT_PIX2PIX_IN_CHANNELS, InstructPix2PixModel, LoadError, LoadOptions, LocalModel,
    PipelineFolder, PreparedModel, SingleFileSource, build_error,
};

/// Largest absolute element difference of two f32 tensors of one shape, for unit tests.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("largest absolute difference")
}
