//! diffusers' `DDIMScheduler` with eta = 0 (deterministic; the pipelines' default), integer
//! timesteps, optional x0 clipping.

use candle_core::Tensor;

use super::common::{Schedule, SchedulerCore, StepInput, StepOutput, schedule_field_access};
use super::schedule::{
    Spacing, alphas_cumprod, check_num_steps, div_scalar, leading, mul_scalar, numpy_linspace,
    predicted_original, round_half_even, trailing,
};
use super::{PredictionType, SchedulerConfig, SchedulerError, reject_if_true};

const CLASS: &str = "DDIMScheduler";

/// The integer timesteps of DDIM's and DDPM's `set_timesteps` (they share the code), as the
/// floats [`super::Scheduler::timesteps`] gives.
pub(crate) fn integer_timesteps(
    config: &SchedulerConfig,
    class: &'static str,
    num_inference_steps: usize,
) -> Result<Vec<f64>, SchedulerError> {
    let train = config.num_train_timesteps;
    if num_inference_steps > train {
        return Err(SchedulerError::InvalidValue {
            option: "num_inference_steps",
            value: num_inference_steps.to_string(),
            reason: "cannot be larger than num_train_timesteps",
        });
    }
    let spacing = Spacing::resolve(config, class, Spacing::Leading)?;
    let timesteps: Vec<i64> = match spacing {
        Spacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, num_inference_steps)
            .into_iter()
            .rev()
            .map(|t| round_half_even(t) as i64)
            .collect(),
        Spacing::Leading => leading(num_inference_steps, train / num_inference_steps)
            .into_iter()
            .map(|t| t as i64 + config.steps_offset as i64)
            .collect(),
        Spacing::Trailing => trailing(train as f64, train as f64 / num_inference_steps as f64)
            .into_iter()
            .map(|t| t as i64)
            .collect(),
    };
    Ok(timesteps.into_iter().map(|t| t as f64).collect())
}

/// DDIM's and DDPM's `clip_sample`: the range predicted x0 is clamped to, None for no clamping.
pub(crate) fn clip_sample_range(config: &SchedulerConfig) -> Option<f32> {
    config
        .clip_sample
        .unwrap_or(true)
        .then(|| config.clip_sample_range.unwrap_or(1.0) as f32)
}

/// `alphas_cumprod[t]`, rejecting timesteps outside the table (a `steps_offset` too large).
pub(crate) fn alpha_at(alphas_cumprod: &[f32], t: i64) -> candle_core::Result<f32> {
    usize::try_from(t)
        .ok()
        .and_then(|i| alphas_cumprod.get(i).copied())
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "timestep {t} is outside the {} training timesteps",
                alphas_cumprod.len()
            ))
        })
}

/// Predicted x0 and predicted noise, as DDIM computes them (float32).
fn predict(
    prediction_type: PredictionType,
    output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (alpha_t, sigma_t) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    let x0 = predicted_original(prediction_type, output, sample, alpha_t, sigma_t)?;
    let eps = match prediction_type {
        PredictionType::Epsilon => output.clone(),
        PredictionType::Sample => div_scalar(&(sample - mul_scalar(output, alpha_t)?)?, sigma_t)?,
        PredictionType::VPrediction => {
            (mul_scalar(output, alpha_t)? + mul_scalar(sample, sigma_t)?)?
        }
    };
    Ok((x0, eps))
}

/// DDIM sampling (eta = 0), after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    schedule: Schedule,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: i64,
    clip_sample: Option<f32>,
}

impl DdimScheduler {
    /// Builds the schedule of `num_steps` inference steps from a (possibly other class's) config.
    pub fn new(config: &SchedulerConfig, num_steps: usize) -> Result<Self, SchedulerError> {
        check_num_steps(num_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        reject_if_true(config.thresholding, CLASS, "thresholding")?;
        let alphas_cumprod = alphas_cumprod(config, CLASS, false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps = integer_timesteps(config, CLASS, num_steps)?;
        Ok(Self {
            schedule: Schedule::new(timesteps, prediction_type),
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (config.num_train_timesteps / num_steps) as i64,
            clip_sample: clip_sample_range(config),
        })
    }
}

impl SchedulerCore for DdimScheduler {
    schedule_field_access!();

    fn step_f32(&mut self, input: StepInput<'_>) -> candle_core::Result<StepOutput> {
        let (step_index, output, sample) = (input.step_index, &input.output, &input.sample);
        let timestep = self.schedule.timesteps[step_index] as i64;
        // diffusers uses num_train_timesteps // num_inference_steps whatever the spacing.
        let prev_timestep = timestep - self.step_ratio;
        let alpha_prod_t = alpha_at(&self.alphas_cumprod, timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            alpha_at(&self.alphas_cumprod, prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let (mut pred_original_sample, pred_epsilon) =
            predict(self.schedule.prediction_type, output, sample, alpha_prod_t)?;
        if let Some(range) = self.clip_sample {
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }
        // eta = 0: std_dev_t = 0 * variance.sqrt(), kept for its NaN behaviour.
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = beta_prod_t_prev / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = 0.0 * variance.sqrt();
        let direction_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let pred_sample_direction = mul_scalar(&pred_epsilon, direction_coeff)?;
        let prev_sample =
            (mul_scalar(&pred_original_sample, alpha_prod_t_prev.sqrt())? + pred_sample_direction)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }
}
