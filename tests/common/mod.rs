//! Helpers shared by the integration tests: a fake Hugging Face Hub and a tiny diffusers
//! pipeline made at test time.

#![allow(dead_code)] // each test binary uses a different subset

pub mod fake_hub;
pub mod pipeline;
