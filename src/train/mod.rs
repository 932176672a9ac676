//! Fine-tuning: datasets, the training loop, LoRA, EMA, checkpoints, validation.

pub mod data;
pub mod resize;
