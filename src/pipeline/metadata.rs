//! The settings of an edit as text for a saved image (PNG text chunks), so every result can be made
//! again and the window can restore settings from a saved file.

use serde::{Deserialize, Serialize};

use super::settings::EditSettings;

/// PNG text key holding the JSON form of [`EditRecord`].
pub const SETTINGS_KEY: &str = "instruct-pix2pix";

/// What made an image: model, input size and every setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditRecord {
    pub software: String,
    pub model: String,
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    pub seed: u64,
    /// None means the model's own scheduler.
    pub scheduler: Option<String>,
    pub width: u32,
    pub height: u32,
    pub dtype: String,
    /// True when the initial latents came from a file instead of the seed.
    pub latents_from_file: bool,
}

impl EditRecord {
    pub fn new(model: &str, settings: &EditSettings, width: u32, height: u32, dtype: &str) -> Self {
        Self {
            software: format!("instruct-pix2pix {}", env!("CARGO_PKG_VERSION")),
            model: model.to_string(),
            prompt: settings.prompt.clone(),
            negative_prompt: settings.negative_prompt.clone(),
            steps: settings.steps,
            guidance_scale: settings.guidance_scale,
            image_guidance_scale: settings.image_guidance_scale,
            seed: settings.seed,
            scheduler: settings.scheduler.map(|s| s.to_string()),
            width,
            height,
            dtype: dtype.to_string(),
            latents_from_file: settings.initial_latents.is_some(),
        }
    }

    /// Key/value pairs for PNG text chunks: the readable basics plus the whole record as JSON.
    pub fn to_text_chunks(&self) -> Vec<(String, String)> {
        let json = serde_json::to_string(self).unwrap_or_default();
        vec![
            ("Software".into(), self.software.clone()),
            ("Description".into(), self.prompt.clone()),
            (SETTINGS_KEY.into(), json),
        ]
    }

    /// Finds and parses the record among a PNG's text chunks.
    pub fn from_text_chunks(chunks: &[(String, String)]) -> Option<Self> {
        chunks
            .iter()
            .find(|(key, _)| key == SETTINGS_KEY)
            .and_then(|(_, value)| serde_json::from_str(value).ok())
    }
}
