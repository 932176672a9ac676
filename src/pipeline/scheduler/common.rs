//! What the five schedulers share: [`Schedule`], the state each keeps after `set_timesteps`
//! (which [`super::Scheduler`]'s provided methods read), and [`SchedulerCore`], the part each
//! class writes itself: its step. The trait lives in this private module, so only this module's
//! schedulers implement `Scheduler`.

use candle_core::Tensor;

use super::schedule::{Spacing, draw_noise, euler_init_noise_sigma, to_f32};
use super::{NoiseSource, PredictionType};

/// What every scheduler keeps after `set_timesteps`.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// As diffusers' `scheduler.timesteps`.
    pub(crate) timesteps: Vec<f64>,
    /// The sigma-space schedulers' sigmas (Euler, Euler ancestral, DPM-Solver: one per timestep
    /// plus the final one, float32 as diffusers stores them); empty for DDIM and DDPM.
    pub(crate) sigmas: Vec<f32>,
    /// The factor the initial N(0, 1) latents are multiplied by.
    pub(crate) init_noise_sigma: f64,
    /// Whether `scale_model_input` divides by `sqrt(σ² + 1)` (the Euler schedulers) rather than
    /// passing the sample through.
    pub(crate) scales_model_input: bool,
    pub(crate) prediction_type: PredictionType,
    /// The predicted x0 of the last step.
    pub(crate) pred_original_sample: Option<Tensor>,
}

impl Schedule {
    /// A schedule without sigmas whose latents start at N(0, 1) and enter the model unscaled.
    pub(crate) fn new(timesteps: Vec<f64>, prediction_type: PredictionType) -> Self {
        Self {
            timesteps,
            sigmas: Vec::new(),
            init_noise_sigma: 1.0,
            scales_model_input: false,
            prediction_type,
            pred_original_sample: None,
        }
    }

    /// The Euler schedulers' schedule: float32 `timesteps`, `sigmas` (with the final one), the
    /// initial sigma `spacing` gives and the model input scaled by the sigma.
    pub(crate) fn euler(
        timesteps: Vec<f32>,
        sigmas: Vec<f32>,
        spacing: Spacing,
        prediction_type: PredictionType,
    ) -> Self {
        Self {
            init_noise_sigma: f64::from(euler_init_noise_sigma(&sigmas, spacing)),
            scales_model_input: true,
            sigmas,
            ..Self::new(
                timesteps.into_iter().map(f64::from).collect(),
                prediction_type,
            )
        }
    }
}

/// One step's input: the model output and the sample in float32, at a step index already
/// checked against the schedule.
pub struct StepInput<'a> {
    pub(crate) step_index: usize,
    pub(crate) output: Tensor,
    pub(crate) sample: Tensor,
    /// The model output as the model gave it (its dtype rounds the noise).
    model_output: &'a Tensor,
    noise: &'a mut dyn NoiseSource,
}

impl<'a> StepInput<'a> {
    /// Converts `model_output` and `sample` to float32 for the step arithmetic.
    pub(crate) fn new(
        model_output: &'a Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &'a mut dyn NoiseSource,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            step_index,
            output: to_f32(model_output)?,
            sample: to_f32(sample)?,
            model_output,
            noise,
        })
    }

    /// The noise a stochastic step adds, drawn as diffusers draws it: shaped like the model
    /// output and rounded to its dtype, then float32.
    pub(crate) fn draw_noise(&mut self) -> candle_core::Result<Tensor> {
        draw_noise(self.noise, self.model_output)
    }
}

/// What one step computed, in float32.
pub struct StepOutput {
    /// The sample of the previous (less noisy) timestep.
    pub(crate) prev_sample: Tensor,
    /// The predicted x0.
    pub(crate) pred_original_sample: Tensor,
}

/// The part of a scheduler its class writes: access to its [`Schedule`] (a `schedule` field,
/// [`schedule_field_access`]) and its step.
pub trait SchedulerCore {
    fn schedule(&self) -> &Schedule;

    fn schedule_mut(&mut self) -> &mut Schedule;

    /// The step of this class, in float32.
    fn step_f32(&mut self, input: StepInput<'_>) -> candle_core::Result<StepOutput>;
}

/// [`SchedulerCore`]'s access to the implementing scheduler's `schedule` field.
macro_rules! schedule_field_access {
    () => {
        fn schedule(&self) -> &Schedule {
            &self.schedule
        }

        fn schedule_mut(&mut self) -> &mut Schedule {
            &mut self.schedule
        }
    };
}
pub(crate) use schedule_field_access;
