//! diffusers' `EulerDiscreteScheduler` (deterministic: `s_churn` = 0 as the pipelines call it),
//! with linear sigma interpolation or Karras sigmas.

use super::common::{Schedule, SchedulerCore, StepInput, StepOutput, schedule_field_access};
use super::schedule::{
    Spacing, alphas_cumprod, check_num_steps, euler_predicted_original, euler_timesteps,
    euler_update, karras_sigmas, numpy_interp_on_index_grid, sigma_to_t, train_sigmas,
};
use super::{PredictionType, SchedulerConfig, SchedulerError, reject_unimplemented_sigmas};

const CLASS: &str = "EulerDiscreteScheduler";

/// Euler sampling, after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    schedule: Schedule,
}

/// `final_sigmas_type` of the Euler and DPM-Solver schedulers: the sigma after the last step.
pub(crate) fn final_sigma(
    config: &SchedulerConfig,
    class: &'static str,
    alphas_cumprod: &[f32],
) -> Result<f32, SchedulerError> {
    match config.final_sigmas_type.as_deref() {
        None | Some("zero") => Ok(0.0),
        Some("sigma_min") => Ok(((1.0 - alphas_cumprod[0]) / alphas_cumprod[0]).sqrt()),
        Some(other) => Err(SchedulerError::unsupported(
            class,
            "final_sigmas_type",
            other,
        )),
    }
}

/// The Euler schedulers' `set_timesteps` up to the training sigmas interpolated at the
/// timesteps (before Karras sigmas and the final sigma).
pub(crate) struct InterpolatedSigmas {
    pub alphas_cumprod: Vec<f32>,
    pub spacing: Spacing,
    /// float32, as diffusers' Euler schedulers keep them.
    pub timesteps: Vec<f32>,
    /// `((1 − ᾱ) / ᾱ)^½` of every training timestep (float32).
    pub train_sigmas: Vec<f32>,
    /// One per timestep (float64, numpy's interpolation).
    pub sigmas: Vec<f64>,
}

impl InterpolatedSigmas {
    pub(crate) fn new(
        config: &SchedulerConfig,
        class: &'static str,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let alphas_cumprod = alphas_cumprod(config, class, true)?;
        let spacing = Spacing::resolve(config, class, Spacing::Linspace)?;
        let timesteps = euler_timesteps(
            spacing,
            config.num_train_timesteps,
            config.steps_offset,
            num_inference_steps,
        );
        let train_sigmas = train_sigmas(&alphas_cumprod);
        let sigmas = timesteps
            .iter()
            .map(|&t| numpy_interp_on_index_grid(t as f64, &train_sigmas))
            .collect();
        Ok(Self {
            alphas_cumprod,
            spacing,
            timesteps,
            train_sigmas,
            sigmas,
        })
    }
}

impl EulerDiscreteScheduler {
    /// Builds the schedule of `num_steps` inference steps from a (possibly other class's) config.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self, SchedulerError> {
        check_num_steps(num_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        match config.interpolation_type.as_deref() {
            None | Some("linear") => {}
            Some(other) => {
                return Err(SchedulerError::unsupported(
                    CLASS,
                    "interpolation_type",
                    other,
                ));
            }
        }
        reject_unimplemented_sigmas(config, CLASS)?;
        if config.timestep_type.as_deref() == Some("continuous")
            && prediction_type == PredictionType::VPrediction
        {
            return Err(SchedulerError::unsupported(
                CLASS,
                "timestep_type",
                "continuous",
            ));
        }
        let InterpolatedSigmas {
            alphas_cumprod,
            spacing,
            mut timesteps,
            train_sigmas,
            mut sigmas,
        } = InterpolatedSigmas::new(config, CLASS, num_steps)?;
        if config.use_karras_sigmas == Some(true) {
            // np.log of the float32 table stays float32.
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, num_steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(final_sigma(config, CLASS, &alphas_cumprod)?);
        Ok(Self {
            schedule: Schedule::euler(timesteps, sigmas, spacing, prediction_type),
        })
    }
}

impl SchedulerCore for EulerDiscreteScheduler {
    schedule_field_access!();

    fn step_f32(&mut self, input: StepInput<'_>) -> candle_core::Result<StepOutput> {
        let (step_index, output, sample) = (input.step_index, &input.output, &input.sample);
        let sigmas = &self.schedule.sigmas;
        // gamma = 0 (s_churn = 0), so sigma_hat = sigma * (0 + 1) = sigma and no noise is drawn.
        let sigma_hat = sigmas[step_index];
        let pred_original_sample =
            euler_predicted_original(self.schedule.prediction_type, output, sample, sigma_hat)?;
        let prev_sample = euler_update(
            sample,
            &pred_original_sample,
            sigma_hat,
            sigmas[step_index + 1],
        )?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }
}
