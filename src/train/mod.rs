//! Fine-tuning: datasets, the training loop, LoRA, EMA, checkpoints, validation.

pub mod checkpoint;
pub mod lora;
pub mod metrics;
pub mod output;
