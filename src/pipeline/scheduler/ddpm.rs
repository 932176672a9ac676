//! diffusers' `DDPMScheduler` for inference: ancestral DDPM steps over a subset of the training
//! timesteps, drawing noise for every step whose timestep is above 0.

use candle_core::Tensor;

use super::ddim::{alpha_at, integer_timesteps};
use super::schedule::{
    alphas_cumprod, check_num_steps, check_step_index, div_scalar, draw_noise, mul_scalar, to_f32,
};
use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerError, reject_if_true,
};

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
    timesteps_i64: Vec<i64>,
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    variance_type: VarianceType,
    clip_sample: Option<f32>,
    prediction_type: PredictionType,
    pred_original_sample: Option<Tensor>,
}

impl DdpmScheduler {
    /// Builds the schedule for `num_inference_steps` steps from a (possibly other class's) config.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        check_num_steps(num_inference_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        reject_if_true(config.thresholding, CLASS, "thresholding")?;
        let variance_type = match config.variance_type.as_deref() {
            None | Some("fixed_small") => VarianceType::Small,
            Some("fixed_small_log") => VarianceType::SmallLog,
            Some("fixed_large") => VarianceType::Large,
            Some(other) => {
                return Err(SchedulerError::Unsupported {
                    class: CLASS,
                    option: "variance_type",
                    value: other.to_owned(),
                });
            }
        };
        let alphas_cumprod = alphas_cumprod(config, CLASS, false)?;
        let timesteps_i64 = integer_timesteps(config, CLASS, num_inference_steps)?;
        let clip_sample = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Self {
            timesteps: timesteps_i64.iter().map(|&t| t as f64).collect(),
            timesteps_i64,
            alphas_cumprod,
            variance_type,
            clip_sample,
            prediction_type,
            pred_original_sample: None,
        })
    }
}

impl Scheduler for DdpmScheduler {
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
        noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let t = self.timesteps_i64[step_index];
        // `previous_timestep`: the next entry of the schedule, -1 after the last.
        let prev_t = self
            .timesteps_i64
            .get(step_index + 1)
            .copied()
            .unwrap_or(-1);
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

        let sample = to_f32(sample)?;
        let output = to_f32(model_output)?;
        let mut pred_original_sample = match self.prediction_type {
            PredictionType::Epsilon => div_scalar(
                &(&sample - mul_scalar(&output, beta_prod_t.sqrt())?)?,
                alpha_prod_t.sqrt(),
            )?,
            PredictionType::Sample => output.clone(),
            PredictionType::VPrediction => {
                (mul_scalar(&sample, alpha_prod_t.sqrt())?
                    - mul_scalar(&output, beta_prod_t.sqrt())?)?
            }
        };
        if let Some(range) = self.clip_sample {
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }
        let original_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let mut prev_sample = (mul_scalar(&pred_original_sample, original_coeff)?
            + mul_scalar(&sample, sample_coeff)?)?;
        if t > 0 {
            let variance_noise = draw_noise(noise, model_output)?;
            let variance = (beta_prod_t_prev / beta_prod_t * current_beta_t).max(1e-20);
            let noise_scale = match self.variance_type {
                VarianceType::Small => variance.sqrt(),
                VarianceType::SmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::Large => current_beta_t.sqrt(),
            };
            prev_sample = (prev_sample + mul_scalar(&variance_noise, noise_scale)?)?;
        }
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
