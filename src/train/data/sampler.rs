//! The seeded epoch sampler: a fixed generator, the `--max_train_samples` shuffle, and the
//! per-epoch order cut into batches with their flip draws, resumable from a saved position.

use serde::{Deserialize, Serialize};

use super::DataError;

/// SplitMix64: a small generator whose output is fixed forever (unlike `rand`'s `StdRng`), so a
/// resumed run shuffles exactly as the first one did.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), without modulo bias.
    fn below(&mut self, bound: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }
}

/// A generator for one purpose (`stream`) and position, independent of the others.
fn stream(seed: u64, stream: u64, a: u64, b: u64) -> SplitMix64 {
    let mut mix = SplitMix64::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    let x = mix.next_u64() ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut mix = SplitMix64::new(x);
    let y = mix.next_u64() ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    SplitMix64::new(y)
}

const STREAM_SELECT: u64 = 1;
const STREAM_EPOCH: u64 = 2;
const STREAM_FLIP: u64 = 3;

fn permutation(len: usize, mut rng: SplitMix64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    // Fisher–Yates.
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// `0..len` shuffled by `seed`: the order `--max_train_samples` takes its first N from.
pub fn shuffled_indices(len: usize, seed: u64) -> Vec<usize> {
    permutation(len, stream(seed, STREAM_SELECT, 0, 0))
}

/// Where the sampler is: the epoch, and how many batches of it were already given out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerPosition {
    /// The epoch (0-based).
    pub epoch: u64,
    /// Batches of this epoch already given out (0-based index of the next one).
    pub batch: usize,
}

/// How images are flipped (the script's `--random_flip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlipMode {
    /// No flips (no `--random_flip`).
    Never,
    /// One draw per batch, as the script does (see the `train::data` module doc).
    PerBatch,
    /// One draw per example.
    PerExample,
}

/// One batch from [`EpochSampler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The position this batch was taken at (resuming there gives this batch again).
    pub position: SamplerPosition,
    /// Dataset indices, `batch_size` of them (fewer in an epoch's last batch).
    pub indices: Vec<usize>,
    /// Whether to flip each example (input and edited together), one per index.
    pub flips: Vec<bool>,
}

/// The script's `DataLoader(shuffle=True, batch_size)`: every epoch a new order of the dataset
/// drawn from `(seed, epoch)`, cut into batches (the last one may be short). Everything follows
/// from `(seed, position)`, so a sampler rebuilt at a saved [`SamplerPosition`] gives the same
/// batches as the one that saved it. Endless: the caller stops after the steps it wants.
#[derive(Debug, Clone)]
pub struct EpochSampler {
    len: usize,
    batch_size: usize,
    seed: u64,
    flip: FlipMode,
    position: SamplerPosition,
    /// The order of `position.epoch`.
    order: Vec<usize>,
}

impl EpochSampler {
    /// A sampler at the start of epoch 0. `len` and `batch_size` must be at least 1.
    pub fn new(
        len: usize,
        batch_size: usize,
        seed: u64,
        flip: FlipMode,
    ) -> Result<Self, DataError> {
        Self::resume(len, batch_size, seed, flip, SamplerPosition::default())
    }

    /// A sampler continuing at `position` (from [`Self::position`] of an earlier run with the
    /// same dataset, batch size, seed and flip mode).
    pub fn resume(
        len: usize,
        batch_size: usize,
        seed: u64,
        flip: FlipMode,
        position: SamplerPosition,
    ) -> Result<Self, DataError> {
        if len == 0 {
            return Err(DataError::InvalidSetting(
                "the dataset has no examples to train on".to_string(),
            ));
        }
        if batch_size == 0 {
            return Err(DataError::InvalidSetting(
                "the batch size must be at least 1".to_string(),
            ));
        }
        let batches = len.div_ceil(batch_size);
        if position.batch > batches {
            return Err(DataError::InvalidSetting(format!(
                "cannot resume at batch {} of epoch {}: an epoch has {batches} batches",
                position.batch, position.epoch
            )));
        }
        Ok(EpochSampler {
            len,
            batch_size,
            seed,
            flip,
            position,
            order: Self::epoch_order(len, seed, position.epoch),
        })
    }

    /// The order of the dataset in `epoch`.
    pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
        permutation(len, stream(seed, STREAM_EPOCH, epoch, 0))
    }

    /// Batches per epoch: `ceil(len / batch_size)` (the script's `len(train_dataloader)`).
    pub fn batches_per_epoch(&self) -> usize {
        self.len.div_ceil(self.batch_size)
    }

    /// Where the next batch comes from (save it with a checkpoint).
    pub fn position(&self) -> SamplerPosition {
        self.position
    }

    /// The next batch; moves to the next epoch after its last batch.
    pub fn next_batch(&mut self) -> Batch {
        if self.position.batch >= self.batches_per_epoch() {
            self.position = SamplerPosition {
                epoch: self.position.epoch + 1,
                batch: 0,
            };
            self.order = Self::epoch_order(self.len, self.seed, self.position.epoch);
        }
        let position = self.position;
        let start = position.batch * self.batch_size;
        let end = (start + self.batch_size).min(self.len);
        let indices = self.order[start..end].to_vec();
        let flips = self.flips(position, indices.len());
        self.position.batch += 1;
        Batch {
            position,
            indices,
            flips,
        }
    }

    fn flips(&self, position: SamplerPosition, n: usize) -> Vec<bool> {
        let mut rng = stream(
            self.seed,
            STREAM_FLIP,
            position.epoch,
            position.batch as u64,
        );
        match self.flip {
            FlipMode::Never => vec![false; n],
            FlipMode::PerBatch => vec![rng.next_u64() >> 63 == 1; n],
            FlipMode::PerExample => (0..n).map(|_| rng.next_u64() >> 63 == 1).collect(),
        }
    }
}

impl Iterator for EpochSampler {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutations_are_permutations_and_depend_on_the_seed() {
        let a = shuffled_indices(50, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(a, shuffled_indices(50, 2));
        assert_eq!(a, shuffled_indices(50, 1));
        assert_ne!(
            EpochSampler::epoch_order(50, 1, 0),
            EpochSampler::epoch_order(50, 1, 1)
        );
    }
}
