//! What decides an edit apart from the model and the image ([`EditSettings`]), its defaults and
//! its limits, in one place for the pipeline, the command line and the window. Plain data, free
//! of candle, so the window can use it without linking a tensor type.

use super::scheduler::SchedulerKind;

/// Denoising steps when none are given (the `edit` command, the window, diffusers' examples).
pub const DEFAULT_STEPS: usize = 20;
/// Text guidance when none is given (diffusers' InstructPix2Pix default).
pub const DEFAULT_GUIDANCE_SCALE: f64 = 7.5;
/// Image guidance when none is given (diffusers' InstructPix2Pix default).
pub const DEFAULT_IMAGE_GUIDANCE_SCALE: f64 = 1.5;
/// The long side an input is scaled down to, at most, when none is given (`--resolution`, the
/// window's resolution slider): the size Stable Diffusion 1.5 was trained at.
pub const DEFAULT_MAX_SIDE: u32 = 512;

/// The most steps an edit may take (diffusers' schedulers need at most num_train_timesteps).
pub const MAX_STEPS: usize = 1000;
/// Guidance scales beyond this only blow the image up; refuse them as typos.
pub const MAX_GUIDANCE: f64 = 100.0;

/// The most images one edit may make from one seed (`--num-images`, diffusers'
/// `num_images_per_prompt`).
pub const MAX_NUM_IMAGES: usize = 1000;

/// A setting outside what an edit accepts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid {name} {value}: {reason}")]
pub struct InvalidSetting {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// Everything that decides an edit's result apart from the model and the input image.
#[derive(Debug, Clone, PartialEq)]
pub struct EditSettings {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    /// Seed of torch's CPU generator: the same seed gives diffusers' result for
    /// `generator=torch.Generator("cpu").manual_seed(seed)`.
    pub seed: u64,
    /// None uses the model's own `scheduler_config.json`.
    pub scheduler: Option<SchedulerKind>,
    /// Replaces the N(0,1) draw of the initial latents (diffusers' `latents=`): [N, C, h, w]
    /// for an edit of N images (N = 1 for [`crate::pipeline::EditPipeline::edit`]).
    pub initial_latents: Option<InitialLatents>,
}

impl Default for EditSettings {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: DEFAULT_STEPS,
            guidance_scale: DEFAULT_GUIDANCE_SCALE,
            image_guidance_scale: DEFAULT_IMAGE_GUIDANCE_SCALE,
            seed: 0,
            scheduler: None,
            initial_latents: None,
        }
    }
}

/// Latents given by the caller, row-major float32.
#[derive(Debug, Clone, PartialEq)]
pub struct InitialLatents {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Checks a step count: 1 to [`MAX_STEPS`].
pub fn check_steps(steps: usize) -> Result<usize, InvalidSetting> {
    check_count("steps", steps, MAX_STEPS)
}

/// Checks a number of images per edit: 1 to [`MAX_NUM_IMAGES`].
pub fn check_num_images(count: usize) -> Result<usize, InvalidSetting> {
    check_count("number of images", count, MAX_NUM_IMAGES)
}

/// Checks a count (named by `name`): 1 to `max`.
fn check_count(name: &'static str, count: usize, max: usize) -> Result<usize, InvalidSetting> {
    if count == 0 || count > max {
        return Err(InvalidSetting {
            name,
            value: count.to_string(),
            reason: format!("must be between 1 and {max}"),
        });
    }
    Ok(count)
}

/// Checks a guidance scale (text or image, named by `name`): a finite number from 0 to
/// [`MAX_GUIDANCE`].
pub fn check_guidance(name: &'static str, value: f64) -> Result<f64, InvalidSetting> {
    if !value.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&value) {
        return Err(InvalidSetting {
            name,
            value: value.to_string(),
            reason: format!("must be a number between 0 and {MAX_GUIDANCE}"),
        });
    }
    Ok(value)
}

impl EditSettings {
    /// Checks every number before any work starts.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        check_steps(self.steps)?;
        check_guidance("guidance scale", self.guidance_scale)?;
        check_guidance("image guidance scale", self.image_guidance_scale)?;
        if let Some(latents) = &self.initial_latents {
            let count: usize = latents.shape.iter().product();
            if count != latents.values.len() {
                return Err(InvalidSetting {
                    name: "latents",
                    value: format!("{:?}", latents.shape),
                    reason: format!(
                        "holds {} values, the shape needs {count}",
                        latents.values.len()
                    ),
                });
            }
            if latents.values.iter().any(|v| !v.is_finite()) {
                return Err(InvalidSetting {
                    name: "latents",
                    value: format!("{:?}", latents.shape),
                    reason: "contain NaN or infinite values".into(),
                });
            }
        }
        Ok(())
    }

    /// diffusers runs the three-way guided batch only when both scales are in use.
    pub fn uses_guidance(&self) -> bool {
        self.guidance_scale > 1.0 && self.image_guidance_scale >= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_inclusive_and_reject_non_numbers() {
        assert_eq!(check_steps(1), Ok(1));
        assert_eq!(check_steps(MAX_STEPS), Ok(MAX_STEPS));
        assert!(check_steps(0).is_err());
        assert!(check_steps(MAX_STEPS + 1).is_err());
        assert_eq!(check_guidance("guidance scale", 0.0), Ok(0.0));
        assert_eq!(
            check_guidance("guidance scale", MAX_GUIDANCE),
            Ok(MAX_GUIDANCE)
        );
        let error = check_guidance("image guidance scale", f64::NAN).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid image guidance scale NaN: must be a number between 0 and 100"
        );
        assert!(check_guidance("guidance scale", -0.5).is_err());
        assert!(EditSettings::default().validate().is_ok());
        assert_eq!(check_num_images(1), Ok(1));
        assert_eq!(check_num_images(MAX_NUM_IMAGES), Ok(MAX_NUM_IMAGES));
        assert!(check_num_images(0).is_err());
        assert!(check_num_images(MAX_NUM_IMAGES + 1).is_err());
    }
}
