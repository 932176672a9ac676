//! The edit itself: schedulers, classifier-free guidance over text and image, image pre- and
//! post-processing, latent previews. Takes images and settings, returns images; reports progress
//! through a callback and stops when cancelled.
//!
//! [`settings`], [`image`], [`metadata`] and [`npy`] are plain data and files, free of candle: the window
//! reaches them through the worker. [`image_tensor`] is where images become tensors. [`folder`]
//! applies one edit to every image of a folder.

pub mod edit;
pub mod folder;
pub mod image;
pub mod image_tensor;
pub mod metadata;
pub mod npy;
pub mod preview;
pub mod resize;
pub mod rng;
pub mod scheduler;
pub mod settings;

pub use edit::{BatchOutput, EditError, EditOutput, EditPipeline, StepInfo};
pub use settings::{EditSettings, InitialLatents};
