//! diffusers' `DDIMScheduler` with eta = 0 (deterministic; the pipelines' default), integer
//! timesteps, optional x0 clipping.

use candle_core::Tensor;

use super::schedule::{
    Spacing, alphas_cumprod, check_num_steps, check_step_index, div_scalar, leading, mul_scalar,
    numpy_linspace, round_half_even, to_f32, trailing,
};
use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerError, reject_if_true,
};

const CLASS: &str = "DDIMScheduler";

/// The integer timesteps of DDIM's and DDPM's `set_timesteps` (they share the code).
pub(crate) fn integer_timesteps(
    config: &SchedulerConfig,
    class: &'static str,
    num_inference_steps: usize,
) -> Result<Vec<i64>, SchedulerError> {
    let train = config.num_train_timesteps;
    if num_inference_steps > train {
        return Err(SchedulerError::InvalidValue {
            option: "num_inference_steps",
            value: num_inference_steps.to_string(),
            reason: "cannot be larger than num_train_timesteps",
        });
    }
    let spacing = Spacing::resolve(config, class, Spacing::Leading)?;
    Ok(match spacing {
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
    })
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
    let beta_prod_t = 1.0 - alpha_prod_t;
    Ok(match prediction_type {
        PredictionType::Epsilon => {
            let x0 = div_scalar(
                &(sample - mul_scalar(output, beta_prod_t.sqrt())?)?,
                alpha_prod_t.sqrt(),
            )?;
            (x0, output.clone())
        }
        PredictionType::Sample => {
            let eps = div_scalar(
                &(sample - mul_scalar(output, alpha_prod_t.sqrt())?)?,
                beta_prod_t.sqrt(),
            )?;
            (output.clone(), eps)
        }
        PredictionType::VPrediction => {
            let x0 = (mul_scalar(sample, alpha_prod_t.sqrt())?
                - mul_scalar(output, beta_prod_t.sqrt())?)?;
            let eps = (mul_scalar(output, alpha_prod_t.sqrt())?
                + mul_scalar(sample, beta_prod_t.sqrt())?)?;
            (x0, eps)
        }
    })
}

/// DDIM sampling (eta = 0), after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    timesteps_i64: Vec<i64>,
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    step_ratio: i64,
    clip_sample: Option<f32>,
    prediction_type: PredictionType,
    pred_original_sample: Option<Tensor>,
}

impl DdimScheduler {
    /// Builds the schedule for `num_inference_steps` steps from a (possibly other class's) config.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        check_num_steps(num_inference_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        reject_if_true(config.thresholding, CLASS, "thresholding")?;
        let alphas_cumprod = alphas_cumprod(config, CLASS, false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps_i64 = integer_timesteps(config, CLASS, num_inference_steps)?;
        let clip_sample = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Self {
            timesteps: timesteps_i64.iter().map(|&t| t as f64).collect(),
            timesteps_i64,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: (config.num_train_timesteps / num_inference_steps) as i64,
            clip_sample,
            prediction_type,
            pred_original_sample: None,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let timestep = self.timesteps_i64[step_index];
        // diffusers uses num_train_timesteps // num_inference_steps whatever the spacing.
        let prev_timestep = timestep - self.step_ratio;
        let alpha_prod_t = alpha_at(&self.alphas_cumprod, timestep)?;
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            alpha_at(&self.alphas_cumprod, prev_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let sample = to_f32(sample)?;
        let output = to_f32(model_output)?;
        let (mut pred_original_sample, pred_epsilon) =
            predict(self.prediction_type, &output, &sample, alpha_prod_t)?;
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
        self.pred_original_sample = Some(pred_original_sample);
        prev_sample.to_dtype(model_output.dtype())
    }

    fn pred_original_sample(&self) -> Option<&Tensor> {
        self.pred_original_sample.as_ref()
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }
}
