//! diffusers' `EulerDiscreteScheduler` (deterministic: `s_churn` = 0 as the pipelines call it),
//! with linear sigma interpolation or Karras sigmas.

use candle_core::Tensor;

use super::schedule::{
    Spacing, alphas_cumprod, check_num_steps, check_step_index, div_scalar, euler_init_noise_sigma,
    euler_scale_model_input, euler_timesteps, karras_sigmas, mul_scalar,
    numpy_interp_on_index_grid, sigma_to_t, to_f32, train_sigmas,
};
use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerError, reject_if_true,
};

const CLASS: &str = "EulerDiscreteScheduler";

/// Euler sampling, after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    timesteps: Vec<f64>,
    /// One per timestep plus the final sigma (float32, as diffusers stores them).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction_type: PredictionType,
    pred_original_sample: Option<Tensor>,
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
        Some(other) => Err(SchedulerError::Unsupported {
            class,
            option: "final_sigmas_type",
            value: other.to_owned(),
        }),
    }
}

impl EulerDiscreteScheduler {
    /// Builds the schedule for `num_inference_steps` steps from a (possibly other class's) config.
    pub fn new(
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        check_num_steps(num_inference_steps)?;
        let prediction_type = PredictionType::parse(&config.prediction_type, CLASS)?;
        match config.interpolation_type.as_deref() {
            None | Some("linear") => {}
            Some(other) => {
                return Err(SchedulerError::Unsupported {
                    class: CLASS,
                    option: "interpolation_type",
                    value: other.to_owned(),
                });
            }
        }
        reject_if_true(
            config.use_exponential_sigmas,
            CLASS,
            "use_exponential_sigmas",
        )?;
        reject_if_true(config.use_beta_sigmas, CLASS, "use_beta_sigmas")?;
        if config.timestep_type.as_deref() == Some("continuous")
            && prediction_type == PredictionType::VPrediction
        {
            return Err(SchedulerError::Unsupported {
                class: CLASS,
                option: "timestep_type",
                value: "continuous".to_owned(),
            });
        }
        let alphas_cumprod = alphas_cumprod(config, CLASS, true)?;
        let spacing = Spacing::resolve(config, CLASS, Spacing::Linspace)?;
        let mut timesteps = euler_timesteps(
            spacing,
            config.num_train_timesteps,
            config.steps_offset,
            num_inference_steps,
        );
        let train_sigmas = train_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| numpy_interp_on_index_grid(t as f64, &train_sigmas))
            .collect();
        if config.use_karras_sigmas == Some(true) {
            // np.log of the float32 table stays float32.
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let sigma_min = config.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let sigma_max = config.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
                .collect();
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(final_sigma(config, CLASS, &alphas_cumprod)?);
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

impl Scheduler for EulerDiscreteScheduler {
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
        _noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps.len())?;
        let sample = to_f32(sample)?;
        let output = to_f32(model_output)?;
        let sigma = self.sigmas[step_index];
        // gamma = 0 (s_churn = 0), so sigma_hat = sigma * (0 + 1) = sigma and no noise is drawn.
        let sigma_hat = sigma;
        let pred_original_sample = match self.prediction_type {
            PredictionType::Sample => output.clone(),
            PredictionType::Epsilon => (&sample - mul_scalar(&output, sigma_hat)?)?,
            PredictionType::VPrediction => {
                let sigma_sq_plus_one = sigma * sigma + 1.0;
                let output_coeff = -sigma / sigma_sq_plus_one.sqrt();
                (mul_scalar(&output, output_coeff)? + div_scalar(&sample, sigma_sq_plus_one)?)?
            }
        };
        let derivative = div_scalar(&(&sample - &pred_original_sample)?, sigma_hat)?;
        let dt = self.sigmas[step_index + 1] - sigma_hat;
        let prev_sample = (&sample + mul_scalar(&derivative, dt)?)?;
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
