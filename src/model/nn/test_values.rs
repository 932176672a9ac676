//! Deterministic test tensors and comparisons shared by the kernels' unit tests.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

/// `count` values in [-1, 1) from a 64-bit LCG seeded by `seed`: varied enough to catch index
/// mix-ups, the same on every run.
pub(super) fn lcg_values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A float32 CPU tensor of `shape` filled by [`lcg_values`].
pub(super) fn values(shape: &[usize], seed: u64) -> Tensor {
    let count: usize = shape.iter().product();
    Tensor::from_vec(lcg_values(count, seed), shape, &Device::Cpu).expect("shape matches the data")
}

/// The largest absolute difference between two tensors of the same shape.
pub(super) fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("difference")
}

/// The gradients of `Σ y · r` (r: random weights, so that every output's gradient differs).
pub(super) fn weighted_sum_gradients(y: &Tensor, r: &Tensor) -> GradStore {
    (y * r)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .expect("backward")
}
