//! Fine-tuning: datasets, the training loop, LoRA, EMA, checkpoints, validation.

pub mod checkpoint;
pub mod data;
pub mod ema;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod output;
pub mod resize;
pub mod run;
pub mod schedule;
pub mod step;
