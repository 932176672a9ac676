//! Noise schedulers, numerically matching diffusers' classes of the same names (0.42.1):
//! `EulerAncestralDiscreteScheduler`, `EulerDiscreteScheduler`, `DDIMScheduler`,
//! `DDPMScheduler` and `DPMSolverMultistepScheduler` (DPM-Solver++ 2M), for inference, plus the
//! DDPM forward process ([`NoiseSchedule`]) for training.
//!
//! Timesteps and sigmas are computed in the same dtypes as diffusers (float32 torch for betas,
//! float64 numpy for spacings, float32 storage) and the steps do their arithmetic in float32 in
//! the same order, so results agree with diffusers to float32 rounding. Options diffusers has
//! but this module does not implement are rejected with [`SchedulerError::Unsupported`] instead of
//! being ignored.

mod common;
mod config;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod euler_ancestral;
mod noise_schedule;
mod schedule;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::Tensor;

use common::{SchedulerCore, StepInput, StepOutput};
use schedule::{check_step_index, euler_scale_model_input};

pub use config::SchedulerConfig;
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use dpm_solver::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralDiscreteScheduler;
pub use noise_schedule::NoiseSchedule;

/// Why a scheduler could not be read or built.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The config file could not be read.
    #[error("cannot read scheduler config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON of the expected shape.
    #[error("scheduler config {path} is not valid: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A number of the config file outside what a noise schedule can be made of.
    #[error("scheduler config {path}: `{key}` is {value}: {reason}")]
    OutOfRange {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: String,
    },
    /// A scheduler name that is neither a short name nor a supported diffusers class.
    #[error("unknown scheduler {0:?}; expected one of: {list}", list = SchedulerKind::help_list())]
    UnknownKind(String),
    /// A diffusers option value this implementation does not support.
    #[error("{class}: {option} = {value} is not supported")]
    Unsupported {
        class: &'static str,
        option: &'static str,
        value: String,
    },
    /// A value that makes no sense (e.g. zero steps).
    #[error("invalid {option} = {value}: {reason}")]
    InvalidValue {
        option: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl SchedulerError {
    /// `class` does not implement `option` = `value`.
    pub(crate) fn unsupported(
        class: &'static str,
        option: &'static str,
        value: impl ToString,
    ) -> Self {
        Self::Unsupported {
            class,
            option,
            value: value.to_string(),
        }
    }
}

/// What the model predicts, from `prediction_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀.
    VPrediction,
    /// The clean sample x₀ itself.
    Sample,
}

impl PredictionType {
    pub(crate) fn parse(value: &str, class: &'static str) -> Result<Self, SchedulerError> {
        match value {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            other => Err(SchedulerError::unsupported(class, "prediction_type", other)),
        }
    }
}

/// The user-facing scheduler choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `EulerAncestralDiscreteScheduler` ("euler-ancestral"), stochastic.
    EulerAncestral,
    /// `EulerDiscreteScheduler` ("euler").
    Euler,
    /// `DDIMScheduler` ("ddim"), eta = 0.
    Ddim,
    /// `DDPMScheduler` ("ddpm"), stochastic.
    Ddpm,
    /// `DPMSolverMultistepScheduler` ("dpm++2m"), DPM-Solver++ of order 2.
    DpmSolverMultistep,
}

impl SchedulerKind {
    /// Every kind, in the order shown in help texts.
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::EulerAncestral,
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
        SchedulerKind::Ddpm,
        SchedulerKind::DpmSolverMultistep,
    ];

    /// The short name accepted on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "euler-ancestral",
            SchedulerKind::Euler => "euler",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::DpmSolverMultistep => "dpm++2m",
        }
    }

    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// "euler-ancestral, euler, ddim, ddpm, dpm++2m", for `--help`.
    pub fn help_list() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    /// Accepts the short names (case-insensitive, `_` for `-`), a few common aliases, and the
    /// diffusers class names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if let Some(kind) = Self::ALL.into_iter().find(|k| k.class_name() == trimmed) {
            return Ok(kind);
        }
        let normalized = trimmed.to_ascii_lowercase().replace('_', "-");
        match normalized.as_str() {
            "euler-ancestral" | "euler-a" | "eulerancestraldiscretescheduler" => {
                Ok(Self::EulerAncestral)
            }
            "euler" | "eulerdiscretescheduler" => Ok(Self::Euler),
            "ddim" | "ddimscheduler" => Ok(Self::Ddim),
            "ddpm" | "ddpmscheduler" => Ok(Self::Ddpm),
            "dpm++2m" | "dpmpp2m" | "dpm-solver++" | "dpmsolvermultistepscheduler" => {
                Ok(Self::DpmSolverMultistep)
            }
            _ => Err(SchedulerError::UnknownKind(s.to_owned())),
        }
    }
}

/// Where randomness comes from for ancestral/stochastic steps, so the pipeline can pass torch's
/// generator.
pub trait NoiseSource {
    /// `shape.iter().product()` standard-normal values, in torch's `randn(shape)` order.
    fn standard_normal(&mut self, shape: &[usize]) -> Vec<f32>;
}

/// One configured inference schedule (diffusers' scheduler after `set_timesteps`). The five
/// schedulers of this module implement it by their step alone; the other methods read the
/// schedule they share.
pub trait Scheduler: Send + SchedulerCore {
    /// As diffusers' `scheduler.timesteps` (floats for the Euler schedulers, integers otherwise).
    fn timesteps(&self) -> &[f64] {
        &self.schedule().timesteps
    }

    /// The factor the initial N(0, 1) latents are multiplied by.
    fn init_noise_sigma(&self) -> f64 {
        self.schedule().init_noise_sigma
    }

    /// `scale_model_input` for step `step_index` (0-based position in `timesteps()`).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let schedule = self.schedule();
        check_step_index(step_index, schedule.timesteps.len())?;
        if schedule.scales_model_input {
            euler_scale_model_input(sample, schedule.sigmas[step_index])
        } else {
            Ok(sample.clone())
        }
    }

    /// One step; `noise` is used only by stochastic schedulers, drawing exactly what diffusers
    /// draws (same shape, same order) so a torch-compatible [`NoiseSource`] reproduces diffusers.
    /// The result has `model_output`'s dtype; the arithmetic is float32.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> candle_core::Result<Tensor> {
        check_step_index(step_index, self.timesteps().len())?;
        let StepOutput {
            prev_sample,
            pred_original_sample,
        } = self.step_f32(StepInput::new(model_output, step_index, sample, noise)?)?;
        self.schedule_mut().pred_original_sample = Some(pred_original_sample);
        prev_sample.to_dtype(model_output.dtype())
    }

    /// The predicted x0 of the last step, for previews (None before the first step).
    fn pred_original_sample(&self) -> Option<&Tensor> {
        self.schedule().pred_original_sample.as_ref()
    }

    /// What the model is expected to predict.
    fn prediction_type(&self) -> PredictionType {
        self.schedule().prediction_type
    }

    /// The sigmas (one per timestep plus the final one) of the sigma-based schedulers (Euler,
    /// Euler ancestral, DPM-Solver), float32 as diffusers stores them; None for DDIM and DDPM.
    fn sigmas(&self) -> Option<&[f32]> {
        let sigmas = &self.schedule().sigmas;
        (!sigmas.is_empty()).then_some(sigmas.as_slice())
    }
}

impl<T: SchedulerCore + Send> Scheduler for T {}

/// Builds the scheduler for an edit: `kind` None = the config's own class; Some = convert as
/// diffusers' `XScheduler.from_config(pipe.scheduler.config)` does (keeps betas,
/// prediction_type, spacing... present in the file; the target class's defaults otherwise).
pub fn build_scheduler(
    config: &SchedulerConfig,
    kind: Option<SchedulerKind>,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let kind = match kind {
        Some(kind) => kind,
        None => SchedulerKind::ALL
            .into_iter()
            .find(|k| k.class_name() == config.class_name)
            .ok_or_else(|| {
                SchedulerError::unsupported(
                    "scheduler_config.json",
                    "_class_name",
                    &config.class_name,
                )
            })?,
    };
    Ok(match kind {
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralDiscreteScheduler::new(
            config,
            num_inference_steps,
        )?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, num_inference_steps)?),
        SchedulerKind::Ddpm => Box::new(DdpmScheduler::new(config, num_inference_steps)?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistepScheduler::new(
            config,
            num_inference_steps,
        )?),
    })
}

/// Rejects a boolean option that is set to true but not implemented.
pub(crate) fn reject_if_true(
    value: Option<bool>,
    class: &'static str,
    option: &'static str,
) -> Result<(), SchedulerError> {
    if value == Some(true) {
        return Err(SchedulerError::unsupported(class, option, "true"));
    }
    Ok(())
}

/// Rejects the sigma options that the Euler and DPM-Solver schedulers take and this module does
/// not implement.
pub(crate) fn reject_unimplemented_sigmas(
    config: &SchedulerConfig,
    class: &'static str,
) -> Result<(), SchedulerError> {
    reject_if_true(
        config.use_exponential_sigmas,
        class,
        "use_exponential_sigmas",
    )?;
    reject_if_true(config.use_beta_sigmas, class, "use_beta_sigmas")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_from_names_and_classes() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(kind.class_name().parse::<SchedulerKind>().unwrap(), kind);
            assert_eq!(kind.to_string(), kind.name());
        }
        assert_eq!(
            "Euler_Ancestral".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::EulerAncestral
        );
        assert!(matches!(
            "pndm".parse::<SchedulerKind>(),
            Err(SchedulerError::UnknownKind(_))
        ));
        assert_eq!(
            SchedulerKind::help_list(),
            "euler-ancestral, euler, ddim, ddpm, dpm++2m"
        );
    }
}
