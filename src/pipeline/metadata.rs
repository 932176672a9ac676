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
    /// This image's place (0-based) in the edit that made it: diffusers' `.images[image_index]`.
    /// Records written before this field existed read as 0.
    #[serde(default)]
    pub image_index: usize,
    /// How many images that edit made from the seed (diffusers' `num_images_per_prompt`,
    /// `edit --num-images`): the seed reproduces this image only with the same count. Records
    /// written before this field existed read as 1.
    #[serde(default = "one")]
    pub num_images: usize,
}

fn one() -> usize {
    1
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
            image_index: 0,
            num_images: 1,
        }
    }

    /// The record of image `index` (0-based) of an edit that made `count` images from one seed.
    pub fn for_image(mut self, index: usize, count: usize) -> Self {
        self.image_index = index;
        self.num_images = count;
        self
    }

    /// How to make this image again, for people: "seed 7" or "seed 7, image 2 of 3".
    pub fn reproduce_hint(&self) -> String {
        if self.num_images > 1 {
            format!(
                "seed {}, image {} of {}",
                self.seed,
                self.image_index + 1,
                self.num_images
            )
        } else {
            format!("seed {}", self.seed)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_image_records_its_place_and_old_records_read_as_single_images() {
        let settings = EditSettings {
            prompt: "make it snowy".into(),
            seed: 7,
            ..EditSettings::default()
        };
        let record = EditRecord::new("m", &settings, 64, 48, "f32").for_image(1, 3);
        assert_eq!(record.reproduce_hint(), "seed 7, image 2 of 3");
        let back = EditRecord::from_text_chunks(&record.to_text_chunks()).unwrap();
        assert_eq!(back, record);
        assert_eq!((back.image_index, back.num_images), (1, 3));

        // A record written before the batch fields existed.
        let mut json: serde_json::Value = serde_json::to_value(&record).unwrap();
        let object = json.as_object_mut().unwrap();
        object.remove("image_index");
        object.remove("num_images");
        let chunks = vec![(SETTINGS_KEY.to_string(), json.to_string())];
        let old = EditRecord::from_text_chunks(&chunks).unwrap();
        assert_eq!((old.image_index, old.num_images), (0, 1));
        assert_eq!(old.reproduce_hint(), "seed 7");
    }
}
