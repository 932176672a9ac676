//! The random draws of a training micro-batch ([`StepDraws`]: the VAE sample's noise, the
//! diffusion noise, timesteps and conditioning-dropout draws, all derived from the run's seed and
//! the micro-batch's index, so that a resumed run draws what the uninterrupted one would have)
//! and the script's conditioning-dropout masks ([`DroppedConditioning`]).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use super::step::{Stage, TrainError};
use crate::pipeline::rng::TorchGenerator;

/// The random draws of one micro-batch.
#[derive(Debug, Clone)]
pub struct StepDraws {
    /// N(0, 1) noise for `latent_dist.sample()` of the edited images [B, 4, h, w].
    pub latent_sample_noise: Tensor,
    /// The diffusion noise ε [B, 4, h, w].
    pub noise: Tensor,
    /// Per-sample timesteps in `[0, num_train_timesteps)`.
    pub timesteps: Vec<u32>,
    /// Per-sample uniform draws in [0, 1) for conditioning dropout.
    pub dropout_draws: Vec<f32>,
}

/// splitmix64: independent-looking seeds from (seed, index).
pub(super) fn mix_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl StepDraws {
    /// The draws of micro-batch number `micro_batch_index` of a run seeded with `seed`: normal
    /// noises from torch's CPU generator algorithm, timesteps and dropout draws uniform. The same
    /// (seed, index) always gives the same draws, so a resumed run draws what the uninterrupted
    /// one would have.
    pub fn seeded(
        seed: u64,
        micro_batch_index: u64,
        latent_shape: [usize; 4],
        num_train_timesteps: usize,
        device: &Device,
    ) -> Result<Self, TrainError> {
        if num_train_timesteps == 0 {
            return Err(TrainError::BadSetting {
                setting: "num_train_timesteps",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        let stream = mix_seed(seed, micro_batch_index);
        let mut normal = TorchGenerator::new(stream & 0xffff_ffff);
        let latent_sample_noise = normal
            .randn(&latent_shape, DType::F32, device)
            .stage("drawing noise")?;
        let noise = normal
            .randn(&latent_shape, DType::F32, device)
            .stage("drawing noise")?;
        let mut uniform = rand::rngs::StdRng::seed_from_u64(stream.rotate_left(32));
        let batch = latent_shape[0];
        let timesteps = (0..batch)
            .map(|_| uniform.random_range(0..num_train_timesteps as u32))
            .collect();
        let dropout_draws = (0..batch).map(|_| uniform.random::<f32>()).collect();
        Ok(Self {
            latent_sample_noise,
            noise,
            timesteps,
            dropout_draws,
        })
    }
}

/// Which conditioning a sample loses to dropout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DroppedConditioning {
    /// The prompt embedding is replaced by that of `""`.
    pub text: bool,
    /// The image latents are zeroed.
    pub image: bool,
}

impl DroppedConditioning {
    /// The script's masks for draw `r` and probability `p`: text when `r < 2p`, image when
    /// `p ≤ r < 3p`, compared in f32 as torch compares a float32 tensor with a Python float.
    pub fn from_draw(r: f32, p: f64) -> Self {
        let text = r < (2.0 * p) as f32;
        let image = r >= p as f32 && r < (3.0 * p) as f32;
        Self { text, image }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_follow_the_script() {
        // p = 0.2: text below 0.4, image in [0.2, 0.6); the edges compared in f32.
        let p = 0.2;
        let cases = [
            (0.0, true, false),
            (0.19, true, false),
            (0.2, true, true),
            (0.39, true, true),
            (0.4, false, true),
            (0.59, false, true),
            (0.6, false, false),
            (0.99, false, false),
        ];
        for (r, text, image) in cases {
            assert_eq!(
                DroppedConditioning::from_draw(r, p),
                DroppedConditioning { text, image },
                "r = {r}"
            );
        }
        // Zero probability drops nothing, one drops the text always.
        assert_eq!(
            DroppedConditioning::from_draw(0.0, 0.0),
            DroppedConditioning::default()
        );
    }

    #[test]
    fn seeded_draws_repeat_and_differ_by_index() {
        let device = Device::Cpu;
        let a = StepDraws::seeded(42, 7, [2, 4, 3, 3], 1000, &device).unwrap();
        let b = StepDraws::seeded(42, 7, [2, 4, 3, 3], 1000, &device).unwrap();
        let c = StepDraws::seeded(42, 8, [2, 4, 3, 3], 1000, &device).unwrap();
        let values = |d: &StepDraws| d.noise.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values(&a), values(&b));
        assert_eq!(a.timesteps, b.timesteps);
        assert_eq!(a.dropout_draws, b.dropout_draws);
        assert_ne!(values(&a), values(&c));
        assert!(a.timesteps.iter().all(|&t| t < 1000));
        assert!(a.dropout_draws.iter().all(|&r| (0.0..1.0).contains(&r)));
    }
}
