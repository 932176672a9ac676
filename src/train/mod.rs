//! Fine-tuning: datasets, the training loop, LoRA, EMA, checkpoints, validation.

pub mod ema;
pub mod optim;
pub mod schedule;
pub mod step;
