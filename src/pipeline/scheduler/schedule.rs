//! The numbers every scheduler starts from (betas, cumulative alpha products, timestep spacings,
//! sigma interpolation, Karras sigmas), computed with the same dtypes and the same rounding as
//! diffusers' torch/numpy code, plus the few tensor operations the steps are written with and the predicted-x0 and
//! Euler-update formulas more than one scheduler steps with.
//!
//! diffusers builds betas in float32 torch, then works in float64 numpy for the inference
//! timesteps/sigmas and stores them as float32; each helper here notes which one it mirrors.

use candle_core::{DType, Tensor};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

use super::config::SchedulerConfig;
use super::{PredictionType, SchedulerError};

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on CPU: the ends are rounded to f32,
/// the step is an f32 division, and the elements are `start + step*i` for the first half and
/// `end - step*(steps-1-i)` for the second, each one fused multiply-add (one rounding), which is
/// what torch's compiled kernel does (checked bit for bit against torch 2.15).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if steps == 0 {
        return Vec::new();
    }
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64: `i * step + start`, the last element exactly `stop`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut out: Vec<f64> = if step == 0.0 {
        (0..num).map(|i| (i as f64 / div) * delta + start).collect()
    } else {
        (0..num).map(|i| i as f64 * step + start).collect()
    };
    out[num - 1] = stop;
    out
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, elements
/// `start + i * delta` with `delta = (start + step) - start` as numpy's fill computes it.
pub(crate) fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let length = ((stop - start) / step).ceil();
    // Also catches NaN (a zero step).
    if length.is_nan() || length <= 0.0 {
        return Vec::new();
    }
    let length = length as usize;
    let delta = (start + step) - start;
    (0..length)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64, for an increasing integer grid.
pub(crate) fn numpy_interp_on_index_grid(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    if x <= 0.0 {
        return fp[0] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// Betas as diffusers' `__init__` makes them (float32 torch), including zero-terminal-SNR
/// rescaling. Only the three schedules all five classes share; DDPM's extra `sigmoid` and
/// `laplace` are rejected.
pub(crate) fn betas(
    config: &SchedulerConfig,
    class: &'static str,
) -> Result<Vec<f32>, SchedulerError> {
    let n = config.num_train_timesteps;
    if n < 2 {
        return Err(SchedulerError::InvalidValue {
            option: "num_train_timesteps",
            value: n.to_string(),
            reason: "must be at least 2",
        });
    }
    let betas: Vec<f32> = if let Some(trained) = &config.trained_betas {
        if trained.len() != n {
            return Err(SchedulerError::InvalidValue {
                option: "trained_betas",
                value: format!("{} values", trained.len()),
                reason: "must hold num_train_timesteps values",
            });
        }
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match config.beta_schedule.as_str() {
            "linear" => torch_linspace_f32(config.beta_start, config.beta_end, n),
            "scaled_linear" => {
                torch_linspace_f32(config.beta_start.powf(0.5), config.beta_end.powf(0.5), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            "squaredcos_cap_v2" => betas_for_cosine_alpha_bar(n),
            other => {
                return Err(SchedulerError::unsupported(class, "beta_schedule", other));
            }
        }
    };
    Ok(if config.rescale_betas_zero_snr {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    })
}

/// diffusers' `betas_for_alpha_bar(n, max_beta=0.999, "cosine")`: Python floats (f64, libm),
/// then `torch.tensor(.., float32)`.
fn betas_for_cosine_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powf(2.0)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod` of float32 on CPU: the running product is kept in float64 (torch's CPU
/// accumulate type for float) and each output rounded to float32.
fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`, float32 torch ops.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    let mut bar_sqrt: Vec<f32> = cumprod_f32(&alphas).into_iter().map(f32::sqrt).collect();
    let first = bar_sqrt[0];
    let last = bar_sqrt[bar_sqrt.len() - 1];
    let scale = first / (first - last);
    for v in bar_sqrt.iter_mut() {
        *v -= last;
    }
    for v in bar_sqrt.iter_mut() {
        *v *= scale;
    }
    let bar: Vec<f32> = bar_sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// `alphas_cumprod` (float32) for the config. `terminal_fix` mirrors the classes (Euler, Euler
/// ancestral, DPM-Solver) that set the last value to 2^-24 under zero-terminal-SNR rescaling so
/// that sigma stays finite.
pub(crate) fn alphas_cumprod(
    config: &SchedulerConfig,
    class: &'static str,
    terminal_fix: bool,
) -> Result<Vec<f32>, SchedulerError> {
    let betas = betas(config, class)?;
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    let mut cumprod = cumprod_f32(&alphas);
    if terminal_fix
        && config.rescale_betas_zero_snr
        && let Some(last) = cumprod.last_mut()
    {
        *last = 2f32.powi(-24);
    }
    Ok(cumprod)
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// The timestep spacings of diffusers' `set_timesteps`, as float64 before any dtype cast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

impl Spacing {
    pub(crate) fn resolve(
        config: &SchedulerConfig,
        class: &'static str,
        default: Spacing,
    ) -> Result<Self, SchedulerError> {
        match config.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("linspace") => Ok(Spacing::Linspace),
            Some("leading") => Ok(Spacing::Leading),
            Some("trailing") => Ok(Spacing::Trailing),
            Some(other) => Err(SchedulerError::unsupported(
                class,
                "timestep_spacing",
                other,
            )),
        }
    }
}

/// `np.round` (half to even).
pub(crate) fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.arange(0, n) * step_ratio` reversed, the "leading" spacing before the offset.
pub(crate) fn leading(n: usize, step_ratio: usize) -> Vec<f64> {
    (0..n).rev().map(|i| (i * step_ratio) as f64).collect()
}

/// `np.round(np.arange(start, 0, -step_ratio)) - 1`, the "trailing" spacing (float64).
pub(crate) fn trailing(start: f64, step_ratio: f64) -> Vec<f64> {
    numpy_arange(start, 0.0, -step_ratio)
        .into_iter()
        .map(|t| round_half_even(t) - 1.0)
        .collect()
}

/// Karras et al. (2022) sigmas, rho = 7, float64 as numpy computes them.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    numpy_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose (log) sigma matches, with
/// numpy's promotions (the log-sigma table is float32, the query float64).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas.len();
    // `cumsum(dists >= 0).argmax()`: the last index with log_sigmas[i] <= log_sigma, else 0.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&ls| log_sigma - ls as f64 >= 0.0)
        .unwrap_or(0)
        .min(count - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The float32 timesteps of the Euler schedulers' `set_timesteps` for a spacing.
pub(crate) fn euler_timesteps(
    spacing: Spacing,
    num_train_timesteps: usize,
    steps_offset: usize,
    n: usize,
) -> Vec<f32> {
    match spacing {
        Spacing::Linspace => numpy_linspace(0.0, (num_train_timesteps - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => leading(n, num_train_timesteps / n)
            .into_iter()
            .map(|t| t as f32 + steps_offset as f32)
            .collect(),
        Spacing::Trailing => trailing(
            num_train_timesteps as f64,
            num_train_timesteps as f64 / n as f64,
        )
        .into_iter()
        .map(|t| t as f32)
        .collect(),
    }
}

/// `init_noise_sigma` of the Euler schedulers: the largest sigma, or `sqrt(max² + 1)` for
/// `leading` spacing (float32).
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// `sample / sqrt(sigma² + 1)`, the Euler schedulers' `scale_model_input`, in float32.
pub(crate) fn euler_scale_model_input(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let scaled = div_scalar(&to_f32(sample)?, (sigma * sigma + 1.0).sqrt())?;
    scaled.to_dtype(sample.dtype())
}

/// The predicted x0 (float32) from the model output at a timestep with `alpha_t = sqrt(ᾱ)` and
/// `sigma_t = sqrt(1 − ᾱ)`, as DDIM, DDPM and DPM-Solver++ compute it.
pub(crate) fn predicted_original(
    prediction_type: PredictionType,
    output: &Tensor,
    sample: &Tensor,
    alpha_t: f32,
    sigma_t: f32,
) -> Result<Tensor> {
    match prediction_type {
        PredictionType::Epsilon => div_scalar(&(sample - mul_scalar(output, sigma_t)?)?, alpha_t),
        PredictionType::Sample => Ok(output.clone()),
        PredictionType::VPrediction => mul_scalar(sample, alpha_t)? - mul_scalar(output, sigma_t)?,
    }
}

/// The predicted x0 (float32) from the model output at noise level `sigma`, as the Euler
/// schedulers compute it (their samples are x0 + σ·ε).
pub(crate) fn euler_predicted_original(
    prediction_type: PredictionType,
    output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    match prediction_type {
        PredictionType::Sample => Ok(output.clone()),
        PredictionType::Epsilon => sample - mul_scalar(output, sigma)?,
        PredictionType::VPrediction => {
            let sigma_sq_plus_one = sigma * sigma + 1.0;
            let output_coeff = -sigma / sigma_sq_plus_one.sqrt();
            mul_scalar(output, output_coeff)? + div_scalar(sample, sigma_sq_plus_one)?
        }
    }
}

/// The Euler schedulers' move from noise level `sigma` to `sigma_to` along the derivative
/// `(sample − x0) / sigma` (float32).
pub(crate) fn euler_update(
    sample: &Tensor,
    pred_original_sample: &Tensor,
    sigma: f32,
    sigma_to: f32,
) -> Result<Tensor> {
    let derivative = div_scalar(&(sample - pred_original_sample)?, sigma)?;
    sample + mul_scalar(&derivative, sigma_to - sigma)?
}

/// `tensor * s` with `s` an f32 (one rounding per element, as torch's scalar multiply).
pub(crate) fn mul_scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    t.affine(s as f64, 0.0)
}

/// `tensor / s` as a true division (candle's `Tensor / f64` multiplies by the reciprocal,
/// which rounds differently from torch).
pub(crate) fn div_scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    let divisor = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_div(&divisor)
}

/// Converts to float32 for the step arithmetic (diffusers' Euler/DPM upcast the sample).
pub(crate) fn to_f32(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        Ok(t.clone())
    } else {
        t.to_dtype(DType::F32)
    }
}

/// Builds a float32 noise tensor shaped like `like` from a [`super::NoiseSource`], rounded to
/// `like`'s dtype first since diffusers draws it in the model output's dtype.
pub(crate) fn draw_noise(noise: &mut dyn super::NoiseSource, like: &Tensor) -> Result<Tensor> {
    let shape = like.dims().to_vec();
    let values = noise.standard_normal(&shape);
    let expected: usize = shape.iter().product();
    if values.len() != expected {
        candle_core::bail!(
            "noise source returned {} values for shape {:?} ({} expected)",
            values.len(),
            shape,
            expected
        );
    }
    let drawn = Tensor::from_vec(values, shape, like.device())?;
    if like.dtype() == DType::F32 {
        Ok(drawn)
    } else {
        drawn.to_dtype(like.dtype())?.to_dtype(DType::F32)
    }
}

/// Rejects an empty schedule (every class divides by the step count).
pub(crate) fn check_num_steps(num_inference_steps: usize) -> Result<(), SchedulerError> {
    if num_inference_steps == 0 {
        return Err(SchedulerError::InvalidValue {
            option: "num_inference_steps",
            value: "0".to_owned(),
            reason: "at least one step is needed",
        });
    }
    Ok(())
}

/// Checks a step index against the schedule length.
pub(crate) fn check_step_index(step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        candle_core::bail!("step index {step_index} is past the schedule's {len} steps");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_arange_matches_known_lengths() {
        // np.arange(1000, 0, -1000/3) -> [1000, 666.67, 333.33]
        let a = numpy_arange(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(a.len(), 3);
        assert_eq!(trailing(1000.0, 1000.0 / 3.0), vec![999.0, 666.0, 332.0]);
    }

    #[test]
    fn round_is_half_even() {
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
    }
}
