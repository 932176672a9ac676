//! Fine-tuning: datasets, the training loop, LoRA, EMA, checkpoints, validation.

pub mod checkpoint;
pub mod data;
pub mod distributed;
mod draws;
pub mod ema;
pub mod latent_cache;
pub mod lora;
pub mod loss_scale;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod output;
/// Pillow-exact resampling (shared with the edit path).
pub use crate::pipeline::resize;
pub mod run;
pub mod schedule;
pub mod step;
mod trainable_unet;
