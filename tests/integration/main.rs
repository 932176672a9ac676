//! The integration tests, one binary (ripgrep's layout): each module is what used to be a test
//! binary of its own. Linking one binary instead of nineteen saves CI most of its link time and
//! disk. `tests/real_window.rs` stays apart: it starts a real X server and a window.
//!
//! Run one group with its module name as filter, e.g. `cargo test --test integration train_step::`.

#[path = "../common/mod.rs"]
mod common;
mod train_dataset;

mod catalog;
mod cli_errors;
mod edit_batch;
mod edit_bf16;
mod edit_folder;
mod edit_from_hub;
mod edit_options;
mod edit_parity;
mod fuzz_readers;
mod hub;
mod hub_downloads;
mod hub_push;
mod image;
mod image_decode;
mod lora_edit;
mod nn_grad;
mod pipeline_api;
mod rng;
mod schedulers;
mod single_file;
mod tokenizer;
mod train_adam8bit;
mod train_cache;
mod train_checkpointing;
mod train_cli;
mod train_cpu_bf16;
mod train_data;
mod train_guards;
mod train_hygiene;
mod train_mixed_precision;
mod train_parallel;
mod train_persist;
mod train_run;
mod train_step;
mod unet;
mod window;
mod window_folder;
mod worker;
