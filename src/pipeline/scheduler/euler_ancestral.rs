//! diffusers' `EulerAncestralDiscreteScheduler`: Euler steps in sigma space with fresh noise
//! added each step (timbrooks/instruct-pix2pix's scheduler).

use super::common::{Schedule, SchedulerCore, StepInput, StepOutput, schedule_field_access};
use super::euler::InterpolatedSigmas;
use super::schedule::{check_num_steps, euler_predicted_original, euler_update, mul_scalar};
use super::{PredictionType, SchedulerConfig, SchedulerError};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// Euler ancestral sampling, after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    schedule: Schedule,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the schedule of `num_steps` inference steps from a (possibly other class's) config.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self, SchedulerError> {
        check_num_steps(num_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        if prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError for it in `step`.
            return Err(SchedulerError::unsupported(
                CLASS,
                "prediction_type",
                "sample",
            ));
        }
        let InterpolatedSigmas {
            spacing,
            timesteps,
            sigmas,
            ..
        } = InterpolatedSigmas::new(config, CLASS, num_steps)?;
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Self {
            schedule: Schedule::euler(timesteps, sigmas, spacing, prediction_type),
        })
    }
}

impl SchedulerCore for EulerAncestralDiscreteScheduler {
    schedule_field_access!();

    fn step_f32(&mut self, mut input: StepInput<'_>) -> candle_core::Result<StepOutput> {
        let (step_index, output, sample) = (input.step_index, &input.output, &input.sample);
        let sigmas = &self.schedule.sigmas;
        let (sigma, sigma_to) = (sigmas[step_index], sigmas[step_index + 1]);
        let pred_original_sample =
            euler_predicted_original(self.schedule.prediction_type, output, sample, sigma)?;
        let from_sq = sigma * sigma;
        let to_sq = sigma_to * sigma_to;
        let sigma_up = (to_sq * (from_sq - to_sq) / from_sq).sqrt();
        let sigma_down = (to_sq - sigma_up * sigma_up).sqrt();
        let prev_sample = euler_update(sample, &pred_original_sample, sigma, sigma_down)?;
        let noise = input.draw_noise()?;
        let prev_sample = (prev_sample + mul_scalar(&noise, sigma_up)?)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }
}
