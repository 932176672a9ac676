//! instruct-pix2pix: edit images from written instructions with InstructPix2Pix diffusion models.
//!
//! Rooms, with dependencies pointing one way (`cli` → `pipeline` → `model`):
//! - [`model`]: finding and loading a model (local folder or Hub repo), configs, tokenizer,
//!   weights, the networks themselves, device and dtype.
//! - [`pipeline`]: the edit (schedulers, guidance, image pre/post-processing, previews).
//! - [`cli`]: the command-line subcommands.
//! - [`worker`]: the background thread that owns the model for the window (jobs in, events out).
//! - [`train`]: fine-tuning (datasets, the training loop, LoRA, EMA, checkpoints, validation).

pub mod cli;
pub mod gui;
pub mod model;
pub mod pipeline;
pub mod train;
pub mod worker;
