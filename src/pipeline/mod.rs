//! The edit itself: schedulers, classifier-free guidance over text and image, image pre- and
//! post-processing, latent previews. Takes images and settings, returns images; reports progress
//! through a callback and stops when cancelled.

pub mod edit;
pub mod image;
pub mod metadata;
pub mod preview;
pub mod resize;
pub mod rng;
pub mod scheduler;

pub use edit::{EditError, EditOutput, EditPipeline, EditSettings, InitialLatents, StepInfo};
