//! The edit itself: schedulers, classifier-free guidance over text and image, image pre- and
//! post-processing, latent previews. Takes images and settings, returns images; reports progress
//! through a callback and stops when cancelled.

pub mod image;
pub mod preview;
pub mod rng;
pub mod scheduler;
