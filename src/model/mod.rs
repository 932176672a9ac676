//! Finding and loading a model: local folders and Hub repos, configs, tokenizer, weights,
//! the networks (CLIP text encoder, VAE, UNet) built from diffusers' weight names, device and dtype.
//! Knows nothing of the window or the edit loop.

pub mod catalog;
pub mod clip;
pub mod config;
pub mod device;
pub mod grad_checkpoint;
pub mod hub;
mod loaded;
pub mod nn;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use loaded::{
    INSTRUCT_PIX2PIX_IN_CHANNELS, InstructPix2PixModel, LoadError, LoadOptions, PipelineFolder,
    build_error,
};
