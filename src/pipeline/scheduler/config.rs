//! `scheduler/scheduler_config.json`: parsing, and resolving each setting for the scheduler class
//! that will use it, the way diffusers' `XScheduler.from_config(config)` does.
//!
//! diffusers passes every key present in the file to the target class (when the class takes it)
//! and falls back to the *target* class's default for keys the file does not have. Settings whose
//! default differs between classes (`timestep_spacing`) or that only some classes take are
//! therefore kept as `Option` here ("present in the file or not") and resolved per class.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use super::SchedulerError;

/// Parsed `scheduler/scheduler_config.json` (with `_class_name`). Serde defaults are diffusers'
/// defaults where all five supported classes share one; class-dependent settings are `Option`
/// (absent or `null` in the file) and resolved by the scheduler that is built.
///
/// Unknown keys (`_diffusers_version`, `skip_prk_steps`, ...) are ignored, as diffusers does.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// diffusers class that saved the file, e.g. `EulerAncestralDiscreteScheduler`.
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// Number of diffusion steps the model was trained with.
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    /// First beta of the `linear` / `scaled_linear` schedules.
    #[serde(default = "default_beta_start", deserialize_with = "lenient_f64")]
    pub beta_start: f64,
    /// Last beta of the `linear` / `scaled_linear` schedules.
    #[serde(default = "default_beta_end", deserialize_with = "lenient_f64")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(
        default = "default_beta_schedule",
        deserialize_with = "string_or_default_linear"
    )]
    pub beta_schedule: String,
    /// Explicit betas, replacing `beta_schedule` when given.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(
        default = "default_prediction_type",
        deserialize_with = "string_or_default_epsilon"
    )]
    pub prediction_type: String,
    /// `linspace`, `leading` or `trailing`; default `linspace` for Euler, Euler ancestral and
    /// DPM-Solver, `leading` for DDIM and DDPM.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// Offset added to the `leading` timesteps.
    #[serde(default, deserialize_with = "null_as_default")]
    pub steps_offset: usize,
    /// Rescale betas to zero terminal SNR (arXiv 2305.08891).
    #[serde(default, deserialize_with = "null_as_default")]
    pub rescale_betas_zero_snr: bool,
    /// DDIM/DDPM: clamp the predicted x0 to `±clip_sample_range` (default true).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// DDIM/DDPM: clamp range (default 1).
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    /// DDIM: the "previous" alpha product past the first timestep is 1 (else `alphas_cumprod[0]`);
    /// default true.
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM/DDPM/DPM-Solver dynamic thresholding (not implemented: rejected when true).
    #[serde(default)]
    pub thresholding: Option<bool>,
    /// DDPM: `fixed_small` (default), `fixed_small_log`, `fixed_large`. DPM-Solver: must be unset.
    #[serde(default)]
    pub variance_type: Option<String>,
    /// Euler/DPM-Solver: Karras et al. sigmas.
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    /// Euler/DPM-Solver: exponential sigmas (not implemented: rejected when true).
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    /// Euler/DPM-Solver: beta sigmas (not implemented: rejected when true).
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    /// DPM-Solver: Lu et al. lambdas (not implemented: rejected when true).
    #[serde(default)]
    pub use_lu_lambdas: Option<bool>,
    /// DPM-Solver: flow-matching sigmas (not implemented: rejected when true).
    #[serde(default)]
    pub use_flow_sigmas: Option<bool>,
    /// DPM-Solver: dynamic shifting (not implemented: rejected when true).
    #[serde(default)]
    pub use_dynamic_shifting: Option<bool>,
    /// Karras sigmas: smallest sigma (default: the schedule's).
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub sigma_min: Option<f64>,
    /// Karras sigmas: largest sigma (default: the schedule's).
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub sigma_max: Option<f64>,
    /// Euler/DPM-Solver: last sigma `zero` (default) or `sigma_min`.
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    /// Euler: `linear` (default); `log_linear` is not implemented.
    #[serde(default)]
    pub interpolation_type: Option<String>,
    /// Euler: `discrete` (default); `continuous` is not implemented.
    #[serde(default)]
    pub timestep_type: Option<String>,
    /// DPM-Solver: 1 or 2 (default 2).
    #[serde(default)]
    pub solver_order: Option<usize>,
    /// DPM-Solver: `dpmsolver++` (default; `deis` maps to it as in diffusers).
    #[serde(default)]
    pub algorithm_type: Option<String>,
    /// DPM-Solver: `midpoint` (default) or `heun`.
    #[serde(default)]
    pub solver_type: Option<String>,
    /// DPM-Solver: lower-order steps at the end for short schedules (default true).
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    /// DPM-Solver: first-order final step (default false).
    #[serde(default)]
    pub euler_at_final: Option<bool>,
    /// DPM-Solver: clip lambda from below, shortening the schedule (default -inf).
    #[serde(default, deserialize_with = "lenient_opt_f64")]
    pub lambda_min_clipped: Option<f64>,
}

/// Most training timesteps accepted from a config (Stable Diffusion: 1000); schedules are
/// allocated at this length.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".to_owned()
}
fn default_prediction_type() -> String {
    "epsilon".to_owned()
}

/// A `null` in the file means "use the default", as passing `None` to diffusers mostly does.
fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn string_or_default_linear<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_beta_schedule))
}

fn string_or_default_epsilon<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_prediction_type))
}

/// A float written as a number or, because Python's `json` writes `-Infinity` and `from_file`
/// quotes such bare tokens, as the strings `"Infinity"`, `"-Infinity"`, `"NaN"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum LenientF64 {
    Number(f64),
    Text(String),
}

impl LenientF64 {
    fn value<E: serde::de::Error>(self) -> Result<f64, E> {
        match self {
            LenientF64::Number(v) => Ok(v),
            LenientF64::Text(text) => match text.as_str() {
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                "NaN" => Ok(f64::NAN),
                other => other
                    .parse::<f64>()
                    .map_err(|_| E::custom(format!("expected a number, found {other:?}"))),
            },
        }
    }
}

fn lenient_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    LenientF64::deserialize(d)?.value()
}

fn lenient_opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<LenientF64>::deserialize(d)?
        .map(LenientF64::value)
        .transpose()
}

/// Quotes the bare `Infinity`, `-Infinity` and `NaN` tokens Python's `json` module writes (e.g.
/// DPM-Solver's `"lambda_min_clipped": -Infinity`), which strict JSON parsers reject.
fn quote_python_float_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let token = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|token| rest.starts_with(token));
        if let Some(token) = token {
            out.push('"');
            out.push_str(token);
            out.push('"');
            rest = &rest[token.len()..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

impl SchedulerConfig {
    /// Reads and parses a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let text = crate::model::files::read_to_string_limited(
            path,
            crate::model::files::MAX_CONFIG_BYTES,
        )
        .map_err(|source| SchedulerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Self::from_json_str(&text).map_err(|source| SchedulerError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        config
            .check_numbers()
            .map_err(|(key, value, reason)| SchedulerError::OutOfRange {
                path: path.to_path_buf(),
                key,
                value,
                reason,
            })?;
        Ok(config)
    }

    /// The numbers a noise schedule can be made of: at least 2 training timesteps (and at most
    /// [`MAX_TRAIN_TIMESTEPS`]), betas strictly between 0 and 1 (a beta of 1 or more makes
    /// ᾱ zero or negative and every edit NaN), positive sigmas and clip range. On failure: the key,
    /// its value and what it must be.
    fn check_numbers(&self) -> Result<(), (&'static str, String, String)> {
        let steps = self.num_train_timesteps;
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&steps) {
            return Err((
                "num_train_timesteps",
                steps.to_string(),
                format!("it must be between 2 and {MAX_TRAIN_TIMESTEPS}"),
            ));
        }
        let is_beta = |v: f64| v.is_finite() && v > 0.0 && v < 1.0;
        if self.trained_betas.is_none() && self.beta_schedule != "squaredcos_cap_v2" {
            for (key, value) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                if !is_beta(value) {
                    return Err((
                        key,
                        value.to_string(),
                        "a beta must be above 0 and below 1".to_string(),
                    ));
                }
            }
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() < 2 || betas.len() > MAX_TRAIN_TIMESTEPS {
                return Err((
                    "trained_betas",
                    format!("a list of {}", betas.len()),
                    format!("it must have between 2 and {MAX_TRAIN_TIMESTEPS} betas"),
                ));
            }
            if let Some((index, value)) = betas.iter().enumerate().find(|(_, v)| !is_beta(**v)) {
                return Err((
                    "trained_betas",
                    format!("{value} at index {index}"),
                    "a beta must be above 0 and below 1".to_string(),
                ));
            }
        }
        if self.steps_offset >= steps {
            return Err((
                "steps_offset",
                self.steps_offset.to_string(),
                format!("it must be below num_train_timesteps ({steps})"),
            ));
        }
        for (key, value) in [
            ("clip_sample_range", self.clip_sample_range),
            ("sigma_min", self.sigma_min),
            ("sigma_max", self.sigma_max),
        ] {
            if let Some(v) = value
                && !(v.is_finite() && v > 0.0)
            {
                return Err((
                    key,
                    v.to_string(),
                    "it must be a number above 0".to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Parses the text of a `scheduler_config.json` (accepting Python's `-Infinity`/`NaN`).
    pub fn from_json_str(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(&quote_python_float_tokens(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_infinity_and_nulls_parse() {
        let config = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                "trained_betas": null, "steps_offset": null, "note": "NaN stays -Infinity text",
                "sigma_min": null, "timestep_spacing": "leading"}"#,
        )
        .unwrap();
        assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(config.steps_offset, 0);
        assert_eq!(config.sigma_min, None);
        assert_eq!(config.num_train_timesteps, 1000);
        assert_eq!(config.beta_schedule, "linear");
        assert_eq!(config.timestep_spacing.as_deref(), Some("leading"));
        assert_eq!(config.clip_sample, None);
    }

    #[test]
    fn missing_class_name_is_an_error() {
        assert!(SchedulerConfig::from_json_str(r#"{"beta_start": 0.1}"#).is_err());
    }
}
