//! Dynamic loss scaling for float16 training, as torch's `GradScaler` (which accelerate uses for
//! `--mixed_precision fp16`): the loss is multiplied by a large scale before backward so that
//! small gradients do not underflow float16; the float32 gradients are divided by it again before
//! clipping. A step whose gradients overflowed (an infinite or NaN norm) is skipped and the scale
//! halved; after `growth_interval` good steps in a row it doubles. bfloat16 has float32's range
//! and needs none of this.

use serde::{Deserialize, Serialize};

/// torch's `GradScaler` defaults.
pub const INITIAL_SCALE: f64 = 65_536.0;
const GROWTH_FACTOR: f64 = 2.0;
const BACKOFF_FACTOR: f64 = 0.5;
const GROWTH_INTERVAL: u32 = 2000;
/// Below this the overflow is not float16's range but the numbers themselves: the step counts
/// as non-finite (and several in a row stop the run as diverged).
pub const MIN_SCALE: f64 = 1.0;

/// The scale and the good steps since it last changed: what a checkpoint saves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaleState {
    pub scale: f64,
    pub good_steps: u32,
}

/// The dynamic loss scale.
#[derive(Debug, Clone, PartialEq)]
pub struct LossScaler {
    state: LossScaleState,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::from_state(LossScaleState {
            scale: INITIAL_SCALE,
            good_steps: 0,
        })
    }
}

impl LossScaler {
    /// A scaler resumed from a checkpoint's state (a scale that is not a positive finite number
    /// starts over at the initial scale).
    pub fn from_state(state: LossScaleState) -> Self {
        let scale = if state.scale.is_finite() && state.scale > 0.0 {
            state.scale
        } else {
            INITIAL_SCALE
        };
        Self {
            state: LossScaleState {
                scale,
                good_steps: state.good_steps.min(GROWTH_INTERVAL),
            },
        }
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// What a checkpoint saves.
    pub fn state(&self) -> LossScaleState {
        self.state
    }

    /// After a step: `overflowed` halves the scale and restarts the count; otherwise the count
    /// grows, and the scale doubles once it reaches the growth interval.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.state.scale *= BACKOFF_FACTOR;
            self.state.good_steps = 0;
        } else {
            self.state.good_steps += 1;
            if self.state.good_steps >= GROWTH_INTERVAL {
                self.state.scale *= GROWTH_FACTOR;
                self.state.good_steps = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_good_steps_double_as_torch_does() {
        let mut scaler = LossScaler::default();
        assert_eq!(scaler.scale(), 65_536.0);
        scaler.update(true);
        scaler.update(true);
        assert_eq!(scaler.scale(), 16_384.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            scaler.update(false);
        }
        assert_eq!(scaler.scale(), 16_384.0);
        scaler.update(false);
        assert_eq!(scaler.scale(), 32_768.0);
        assert_eq!(scaler.state().good_steps, 0);
        // An overflow restarts the count.
        scaler.update(false);
        scaler.update(true);
        assert_eq!(scaler.state().good_steps, 0);
        assert_eq!(scaler.scale(), 16_384.0);
    }

    #[test]
    fn a_damaged_saved_scale_starts_over() {
        for scale in [f64::NAN, f64::INFINITY, 0.0, -4.0] {
            let scaler = LossScaler::from_state(LossScaleState {
                scale,
                good_steps: 7,
            });
            assert_eq!(scaler.scale(), INITIAL_SCALE);
        }
        let scaler = LossScaler::from_state(LossScaleState {
            scale: 512.0,
            good_steps: 99,
        });
        assert_eq!(
            scaler.state(),
            LossScaleState {
                scale: 512.0,
                good_steps: 99
            }
        );
    }
}
