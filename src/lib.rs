//! instruct-pix2pix: edit images from written instructions with InstructPix2Pix diffusion models.
//!
//! Rooms, with dependencies pointing one way (`gui`, `cli` → `worker` → `train`, `pipeline` →
//! `model`):
//! - [`model`]: finding and loading a model (local folder or Hub repo), configs, tokenizer,
//!   weights, the networks themselves, device and dtype.
//! - [`pipeline`]: the edit (schedulers, guidance, image pre/post-processing, previews).
//! - [`train`]: fine-tuning as `train_instruct_pix2pix.py` does it (datasets, the training step,
//!   optimizer, schedules, EMA, LoRA, checkpoints, metrics).
//! - [`worker`]: the background thread that owns the model for the window (jobs in, events out).
//! - [`gui`]: the editor window.
//! - [`cli`]: the command-line subcommands.
//!
//! [`heap`], the process's allocator (it keeps large freed blocks for reuse), stands apart.

pub mod cli;
pub mod gui;
pub mod heap;
pub mod model;
pub mod pipeline;
pub mod train;
pub mod worker;

#[cfg(test)]
mod test_support;
