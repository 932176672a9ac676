//! The training side: diffusers' `DDPMScheduler.add_noise` and `get_velocity` (the forward
//! diffusion process and the v-prediction target) for per-sample integer timesteps.

use candle_core::{DType, Tensor};

type Result<T, E = candle_core::Error> = std::result::Result<T, E>;

use super::schedule::alphas_cumprod;
use super::{SchedulerConfig, SchedulerError};

/// `alphas_cumprod` of a `DDPMScheduler` built from the model's scheduler config (as
/// `train_instruct_pix2pix.py` does with `DDPMScheduler.from_pretrained`).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f32>,
}

/// Rounds a value computed in f64 to what torch stores for `dtype` (half types are computed in
/// float32 and rounded once more, as torch's CPU kernels do).
fn round_to(value: f64, dtype: DType) -> f64 {
    let as_f32 = value as f32;
    match dtype {
        DType::F64 => value,
        DType::F16 => half::f16::from_f32(as_f32).to_f64(),
        DType::BF16 => half::bf16::from_f32(as_f32).to_f64(),
        _ => as_f32 as f64,
    }
}

impl NoiseSchedule {
    /// Betas and their cumulative products from the config (DDPM semantics: no terminal fix-up
    /// under zero-terminal-SNR rescaling).
    pub fn from_config(c: &SchedulerConfig) -> Result<Self, SchedulerError> {
        Ok(Self {
            alphas_cumprod: alphas_cumprod(c, "DDPMScheduler", false)?,
        })
    }

    /// Number of training timesteps (timesteps are drawn from `0..num_train_timesteps()`).
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The cumulative alpha products, float32 as diffusers stores them.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// Per-sample (sqrt(ᾱ), sqrt(1 − ᾱ)) as `[B, 1, ..]` tensors in `like`'s dtype, computed the
    /// way diffusers does after `alphas_cumprod.to(dtype)`.
    fn coefficients(&self, like: &Tensor, timesteps: &[u32]) -> Result<(Tensor, Tensor)> {
        let dims = like.dims();
        if dims.first() != Some(&timesteps.len()) {
            candle_core::bail!(
                "{} timesteps for a batch of shape {:?}",
                timesteps.len(),
                dims
            );
        }
        let dtype = like.dtype();
        let mut sqrt_alpha = Vec::with_capacity(timesteps.len());
        let mut sqrt_one_minus_alpha = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let alpha = self
                .alphas_cumprod
                .get(t as usize)
                .copied()
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "timestep {t} is outside the {} training timesteps",
                        self.alphas_cumprod.len()
                    ))
                })?;
            let alpha = round_to(alpha as f64, dtype);
            sqrt_alpha.push(round_to(alpha.sqrt(), dtype));
            sqrt_one_minus_alpha.push(round_to(round_to(1.0 - alpha, dtype).sqrt(), dtype));
        }
        let mut shape = vec![1usize; dims.len()];
        shape[0] = timesteps.len();
        let as_tensor = |values: Vec<f64>| {
            Tensor::from_vec(values, shape.as_slice(), like.device())?.to_dtype(dtype)
        };
        Ok((as_tensor(sqrt_alpha)?, as_tensor(sqrt_one_minus_alpha)?))
    }

    /// diffusers' `DDPMScheduler.add_noise` with per-sample integer timesteps `[B]`:
    /// `sqrt(ᾱ_t)·original + sqrt(1 − ᾱ_t)·noise`.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[u32],
    ) -> Result<Tensor> {
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(original, timesteps)?;
        original.broadcast_mul(&sqrt_alpha)? + noise.broadcast_mul(&sqrt_one_minus_alpha)?
    }

    /// diffusers' `get_velocity`, the v-prediction target: `sqrt(ᾱ_t)·noise − sqrt(1 − ᾱ_t)·sample`.
    pub fn velocity(&self, sample: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
        let (sqrt_alpha, sqrt_one_minus_alpha) = self.coefficients(sample, timesteps)?;
        noise.broadcast_mul(&sqrt_alpha)? - sample.broadcast_mul(&sqrt_one_minus_alpha)?
    }
}
