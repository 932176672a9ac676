//! diffusers' `DDPMScheduler` for inference: ancestral DDPM steps over a subset of the training
//! timesteps, drawing noise for every step whose timestep is above 0.

use super::common::{Schedule, SchedulerCore, StepInput, StepOutput, schedule_field_access};
use super::ddim::{alpha_at, clip_sample_range, integer_timesteps};
use super::schedule::{alphas_cumprod, check_num_steps, mul_scalar, predicted_original};
use super::{PredictionType, SchedulerConfig, SchedulerError, reject_if_true};

const CLASS: &str = "DDPMScheduler";

/// The implemented `variance_type`s (all `fixed_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VarianceType {
    /// `fixed_small`: the posterior variance.
    Small,
    /// `fixed_small_log`: the same through log/exp.
    SmallLog,
    /// `fixed_large`: beta_t.
    Large,
}

/// DDPM sampling, after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    schedule: Schedule,
    alphas_cumprod: Vec<f32>,
    variance_type: VarianceType,
    clip_sample: Option<f32>,
}

impl DdpmScheduler {
    /// Builds the schedule of `num_steps` inference steps from a (possibly other class's) config.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self, SchedulerError> {
        check_num_steps(num_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        reject_if_true(config.thresholding, CLASS, "thresholding")?;
        let variance_type = match config.variance_type.as_deref() {
            None | Some("fixed_small") => VarianceType::Small,
            Some("fixed_small_log") => VarianceType::SmallLog,
            Some("fixed_large") => VarianceType::Large,
            Some(other) => {
                return Err(SchedulerError::unsupported(CLASS, "variance_type", other));
            }
        };
        let alphas_cumprod = alphas_cumprod(config, CLASS, false)?;
        let timesteps = integer_timesteps(config, CLASS, num_steps)?;
        Ok(Self {
            schedule: Schedule::new(timesteps, prediction_type),
            alphas_cumprod,
            variance_type,
            clip_sample: clip_sample_range(config),
        })
    }
}

impl SchedulerCore for DdpmScheduler {
    schedule_field_access!();

    fn step_f32(&mut self, mut input: StepInput<'_>) -> candle_core::Result<StepOutput> {
        let (step_index, output, sample) = (input.step_index, &input.output, &input.sample);
        let timesteps = &self.schedule.timesteps;
        let t = timesteps[step_index] as i64;
        // `previous_timestep`: the next entry of the schedule, -1 after the last.
        let prev_t = timesteps.get(step_index + 1).map_or(-1, |&t| t as i64);
        let alpha_prod_t = alpha_at(&self.alphas_cumprod, t)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            alpha_at(&self.alphas_cumprod, prev_t)?
        } else {
            1.0
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        let mut pred_original_sample = predicted_original(
            self.schedule.prediction_type,
            output,
            sample,
            alpha_prod_t.sqrt(),
            beta_prod_t.sqrt(),
        )?;
        if let Some(range) = self.clip_sample {
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }
        let original_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev_sample = (mul_scalar(&pred_original_sample, original_coeff)?
            + mul_scalar(sample, sample_coeff)?)?;
        if t > 0 {
            let variance_noise = input.draw_noise()?;
            let variance = (beta_prod_t_prev / beta_prod_t * current_beta_t).max(1e-20);
            let noise_scale = match self.variance_type {
                VarianceType::Small => variance.sqrt(),
                VarianceType::SmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::Large => current_beta_t.sqrt(),
            };
            prev_sample = (prev_sample + mul_scalar(&variance_noise, noise_scale)?)?;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }
}
