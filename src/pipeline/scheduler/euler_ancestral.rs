//! diffusers' `EulerAncestralDiscreteScheduler`: Euler steps in sigma space with fresh noise
//! added each step (timbrooks/instruct-pix2pix's scheduler).

use candle_core::Tensor;

use super::schedule::{
    Spacing, alphas_cumprod, check_num_steps, check_step_index, div_scalar, draw_noise,
    euler_init_noise_sigma, euler_scale_model_input, euler_timesteps, mul_scalar,
    numpy_interp_on_index_grid, to_f32, train_sigmas,
};
use super::{NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerError};

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// Euler ancestral sampling, after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    timesteps: Vec<f64>,
    /// One per timestep plus the final 0 (float32, as diffusers stores them).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    pred_original_sample: Option<Tensor>,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the schedule for `num_inference_steps` steps from a (possibly other class's) config.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        check_num_steps(num_inference_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        if prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError for it in `step`.
            return Err(SchedulerError::Unsupported {
                class: CLASS,
                option: "prediction_type",
                value: "sample".to_owned(),
            });
        }
        let alphas_cumprod = alphas_cumprod(config, CLASS, true)?;
        let spacing = Spacing::resolve(config, CLASS, Spacing::Linspace)?;
        let timesteps = euler_timesteps(
            spacing,
            config.num_train_timesteps,
            config.steps_offset,
            num_inference_steps,
        );
        let train_sigmas = train_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| numpy_interp_on_index_grid(t as f64, &train_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let init_noise_sigma = euler_init_noise_sigma(&sigmas, spacing);
        Ok(Self {
            timesteps: timesteps.into_iter().map(f64::from).collect(),
            sigmas,
            init_noise_sigma,
            prediction_type,
            pred_original_sample: None,
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        euler_scale_model_input(sample, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        let sample = to_f32(sample)?;
        let output = to_f32(model_output)?;
        let pred_original_sample = match self.prediction_type {
            PredictionType::Epsilon => (&sample - mul_scalar(&output, sigma)?)?,
            PredictionType::VPrediction => {
                let sigma_sq_plus_one = sigma * sigma + 1.0;
                let output_coeff = -sigma / sigma_sq_plus_one.sqrt();
                (mul_scalar(&output, output_coeff)? + div_scalar(&sample, sigma_sq_plus_one)?)?
            }
            PredictionType::Sample => candle_core::bail!("{CLASS}: sample prediction"),
        };
        let sigma_from = sigma;
        let sigma_to = self.sigmas[step_index + 1];
        let from_sq = sigma_from * sigma_from;
        let to_sq = sigma_to * sigma_to;
        let sigma_up = (to_sq * (from_sq - to_sq) / from_sq).sqrt();
        let sigma_down = (to_sq - sigma_up * sigma_up).sqrt();
        let derivative = div_scalar(&(&sample - &pred_original_sample)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev_sample = (&sample + mul_scalar(&derivative, dt)?)?;
        let noise = draw_noise(noise, model_output)?;
        let prev_sample = (prev_sample + mul_scalar(&noise, sigma_up)?)?;
        self.pred_original_sample = Some(pred_original_sample);
        prev_sample.to_dtype(model_output.dtype())
    }

    fn pred_original_sample(&self) -> Option<&Tensor> {
        self.pred_original_sample.as_ref()
    }

    fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }
}
