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
    /// one would have. Each example of the batch draws from its own stream
    /// ([`StepDraws::seeded_rows`]).
    pub fn seeded(
        seed: u64,
        micro_batch_index: u64,
        latent_shape: [usize; 4],
        num_train_timesteps: usize,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let [batch, c, h, w] = latent_shape;
        let rows: Vec<usize> = (0..batch).collect();
        Self::seeded_rows(
            seed,
            micro_batch_index,
            &rows,
            [c, h, w],
            num_train_timesteps,
            device,
        )
    }

    /// The draws of examples `rows` (indices into the global batch) of micro-batch `micro_batch_index`'s global batch: every
    /// example draws from a stream of its own, (seed, micro-batch, row), so a process holding
    /// rows 2..4 of a batch split across processes draws exactly what one process holding the
    /// whole batch draws for those rows. `example_latent_shape` is one example's [4, h, w].
    pub fn seeded_rows(
        seed: u64,
        micro_batch_index: u64,
        rows: &[usize],
        example_latent_shape: [usize; 3],
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
        let [c, h, w] = example_latent_shape;
        let batch_stream = mix_seed(seed, micro_batch_index);
        let mut sample_noises = Vec::with_capacity(rows.len());
        let mut noises = Vec::with_capacity(rows.len());
        let mut timesteps = Vec::with_capacity(rows.len());
        let mut dropout_draws = Vec::with_capacity(rows.len());
        for &row in rows {
            let stream = mix_seed(batch_stream, row as u64);
            let mut normal = TorchGenerator::new(stream & 0xffff_ffff);
            sample_noises.push(
                normal
                    .randn(&[1, c, h, w], DType::F32, device)
                    .stage("drawing noise")?,
            );
            noises.push(
                normal
                    .randn(&[1, c, h, w], DType::F32, device)
                    .stage("drawing noise")?,
            );
            let mut uniform = rand::rngs::StdRng::seed_from_u64(stream.rotate_left(32));
            timesteps.push(uniform.random_range(0..num_train_timesteps as u32));
            dropout_draws.push(uniform.random::<f32>());
        }
        let cat = |parts: &[Tensor]| -> Result<Tensor, TrainError> {
            if parts.is_empty() {
                Tensor::zeros((0, c, h, w), DType::F32, device).stage("drawing noise")
            } else {
                Tensor::cat(parts, 0).stage("drawing noise")
            }
        };
        Ok(Self {
            latent_sample_noise: cat(&sample_noises)?,
            noise: cat(&noises)?,
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

    #[test]
    fn a_slice_of_a_batch_draws_what_the_whole_batch_draws_for_those_rows() {
        let device = Device::Cpu;
        let whole = StepDraws::seeded(9, 3, [4, 4, 2, 3], 1000, &device).unwrap();
        let part = StepDraws::seeded_rows(9, 3, &[2, 3], [4, 2, 3], 1000, &device).unwrap();
        let rows = |t: &Tensor, r: std::ops::Range<usize>| {
            t.narrow(0, r.start, r.len())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(rows(&whole.noise, 2..4), rows(&part.noise, 0..2));
        assert_eq!(
            rows(&whole.latent_sample_noise, 2..4),
            rows(&part.latent_sample_noise, 0..2)
        );
        assert_eq!(whole.timesteps[2..], part.timesteps[..]);
        assert_eq!(whole.dropout_draws[2..], part.dropout_draws[..]);
        // Rows of one batch are not copies of each other.
        assert_ne!(rows(&whole.noise, 0..1), rows(&whole.noise, 1..2));
    }
}
