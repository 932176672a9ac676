//! Learning-rate schedules: diffusers' `get_scheduler` (`diffusers.optimization`) as plain
//! functions of the optimizer step, with the same arithmetic as its `lr_lambda`s and torch's
//! `LambdaLR` (`lr = base_lr · λ(step)`).
//!
//! `step` is the number of optimizer steps already taken: the learning rate of the first update
//! is `lr(0)`, as `LambdaLR` gives it before its first `step()`. The training script passes
//! `num_warmup_steps · num_processes` and `num_training_steps · num_processes`; this program runs
//! one process, so they are the flags' values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The schedule names `--lr_scheduler` accepts (diffusers' `SchedulerType`, without
/// `piecewise_constant`, which the training script cannot configure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduleKind {
    /// The base learning rate throughout (warm-up ignored, as in diffusers).
    Constant,
    /// Linear warm-up from 0, then constant.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at `training_steps`.
    Linear,
    /// Linear warm-up, then a half cosine down to 0 (`num_cycles` 0.5).
    Cosine,
    /// Linear warm-up, then `num_cycles` cosines, each restarting from the base rate.
    CosineWithRestarts,
    /// Linear warm-up, then `(1 − progress)^power` decay to `lr_end`.
    Polynomial,
}

impl LrScheduleKind {
    /// Every kind, in diffusers' order.
    pub const ALL: [LrScheduleKind; 6] = [
        Self::Linear,
        Self::Cosine,
        Self::CosineWithRestarts,
        Self::Polynomial,
        Self::Constant,
        Self::ConstantWithWarmup,
    ];

    /// The name as `--lr_scheduler` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::CosineWithRestarts => "cosine_with_restarts",
            Self::Polynomial => "polynomial",
        }
    }
}

impl fmt::Display for LrScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A schedule name or setting that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// Not one of the names of [`LrScheduleKind`].
    #[error(
        "unknown learning-rate schedule {name:?}: use one of constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial"
    )]
    UnknownName {
        /// What was given.
        name: String,
    },
    /// `piecewise_constant` needs step rules the training script has no flag for.
    #[error(
        "the piecewise_constant schedule needs step rules, which train_instruct_pix2pix.py cannot pass; use another --lr_scheduler"
    )]
    PiecewiseConstant,
    /// diffusers refuses a polynomial schedule whose end rate is not below the base rate.
    #[error(
        "polynomial schedule: lr_end ({lr_end}) must be smaller than the learning rate ({base_lr})"
    )]
    EndAboveBase {
        /// The final learning rate.
        lr_end: f64,
        /// The base learning rate.
        base_lr: f64,
    },
    /// diffusers would divide by zero at the last step.
    #[error(
        "polynomial schedule: the warm-up ({warmup_steps} steps) must be shorter than the training ({training_steps} steps)"
    )]
    NoDecaySteps {
        /// `--lr_warmup_steps`.
        warmup_steps: u64,
        /// `--max_train_steps`.
        training_steps: u64,
    },
    /// A learning rate that is negative or not finite.
    #[error("the learning rate must be a finite number ≥ 0, got {value}")]
    BadLearningRate {
        /// What was given.
        value: f64,
    },
}

impl FromStr for LrScheduleKind {
    type Err = ScheduleError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name == "piecewise_constant" {
            return Err(ScheduleError::PiecewiseConstant);
        }
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| ScheduleError::UnknownName {
                name: name.to_string(),
            })
    }
}

/// A learning-rate schedule as `get_scheduler(name, optimizer, num_warmup_steps,
/// num_training_steps)` builds it, with its defaults (`num_cycles` 0.5 for `cosine`, 1 for
/// `cosine_with_restarts`; `power` 1 and `lr_end` 1e-7 for `polynomial`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Which schedule.
    pub kind: LrScheduleKind,
    /// The optimizer's learning rate (`--learning_rate`, after `--scale_lr`).
    pub base_lr: f64,
    /// `--lr_warmup_steps`.
    pub warmup_steps: u64,
    /// `--max_train_steps`.
    pub training_steps: u64,
    /// Cosine periods (`cosine`: 0.5, a half period; `cosine_with_restarts`: restarts).
    pub num_cycles: f64,
    /// Exponent of the polynomial decay.
    pub power: f64,
    /// The polynomial schedule's final learning rate.
    pub lr_end: f64,
}

impl LrSchedule {
    /// The schedule `get_scheduler` builds for these arguments, with its defaults.
    pub fn new(
        kind: LrScheduleKind,
        base_lr: f64,
        warmup_steps: u64,
        training_steps: u64,
    ) -> Result<Self, ScheduleError> {
        let num_cycles = match kind {
            LrScheduleKind::Cosine => 0.5,
            _ => 1.0,
        };
        let schedule = Self {
            kind,
            base_lr,
            warmup_steps,
            training_steps,
            num_cycles,
            power: 1.0,
            lr_end: 1e-7,
        };
        schedule.check()?;
        Ok(schedule)
    }

    /// The same schedule with another number of cosine cycles (`get_scheduler(num_cycles=…)`
    /// reaches only `cosine_with_restarts`).
    pub fn with_num_cycles(mut self, num_cycles: f64) -> Self {
        self.num_cycles = num_cycles;
        self
    }

    /// The same schedule with another polynomial power (`get_scheduler(power=…)`).
    pub fn with_power(mut self, power: f64) -> Self {
        self.power = power;
        self
    }

    /// Checks what diffusers checks, and what would make it fail later.
    pub fn check(&self) -> Result<(), ScheduleError> {
        if !self.base_lr.is_finite() || self.base_lr < 0.0 {
            return Err(ScheduleError::BadLearningRate {
                value: self.base_lr,
            });
        }
        if self.kind == LrScheduleKind::Polynomial {
            if self.base_lr <= self.lr_end {
                return Err(ScheduleError::EndAboveBase {
                    lr_end: self.lr_end,
                    base_lr: self.base_lr,
                });
            }
            if self.warmup_steps >= self.training_steps {
                return Err(ScheduleError::NoDecaySteps {
                    warmup_steps: self.warmup_steps,
                    training_steps: self.training_steps,
                });
            }
        }
        Ok(())
    }

    /// The multiplier λ(step) of the base learning rate, with diffusers' arithmetic.
    pub fn factor(&self, step: u64) -> f64 {
        // Python ints: differences may be negative.
        let step_i = step as i64;
        let warmup = self.warmup_steps as i64;
        let total = self.training_steps as i64;
        let warming_up = step_i < warmup;
        let warmup_factor = || step_i as f64 / warmup.max(1) as f64;
        match self.kind {
            LrScheduleKind::Constant => 1.0,
            LrScheduleKind::ConstantWithWarmup => {
                if warming_up {
                    warmup_factor()
                } else {
                    1.0
                }
            }
            LrScheduleKind::Linear => {
                if warming_up {
                    // f_max · step / max(1, warmup) with f_max = 1.
                    1.0 * step_i as f64 / warmup.max(1) as f64
                } else {
                    let progress = (total - step_i) as f64 / (total - warmup).max(1) as f64;
                    // f_min + (f_max − f_min) · max(0, progress) with f_min = 0, f_max = 1.
                    0.0 + 1.0 * progress.max(0.0)
                }
            }
            LrScheduleKind::Cosine => {
                if warming_up {
                    warmup_factor()
                } else {
                    let progress = (step_i - warmup) as f64 / (total - warmup).max(1) as f64;
                    let angle = std::f64::consts::PI * self.num_cycles * 2.0 * progress;
                    (0.5 * (1.0 + angle.cos())).max(0.0)
                }
            }
            LrScheduleKind::CosineWithRestarts => {
                if warming_up {
                    warmup_factor()
                } else {
                    let progress = (step_i - warmup) as f64 / (total - warmup).max(1) as f64;
                    if progress >= 1.0 {
                        0.0
                    } else {
                        let angle =
                            std::f64::consts::PI * python_mod(self.num_cycles * progress, 1.0);
                        (0.5 * (1.0 + angle.cos())).max(0.0)
                    }
                }
            }
            LrScheduleKind::Polynomial => {
                let lr_init = self.base_lr;
                if warming_up {
                    warmup_factor()
                } else if step_i > total {
                    self.lr_end / lr_init
                } else {
                    let lr_range = lr_init - self.lr_end;
                    let decay_steps = total - warmup;
                    let pct_remaining = 1.0 - (step_i - warmup) as f64 / decay_steps as f64;
                    let decay = lr_range * pct_remaining.powf(self.power) + self.lr_end;
                    decay / lr_init
                }
            }
        }
    }

    /// The learning rate of the update after `step` optimizer steps (`base_lr · λ(step)`).
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

/// Python's float `%` (the result takes the divisor's sign).
fn python_mod(value: f64, divisor: f64) -> f64 {
    let rem = value % divisor;
    if rem != 0.0 && (rem < 0.0) != (divisor < 0.0) {
        rem + divisor
    } else {
        rem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for kind in LrScheduleKind::ALL {
            assert_eq!(kind.name().parse::<LrScheduleKind>(), Ok(kind));
        }
        let err = "cosine_annealing".parse::<LrScheduleKind>().unwrap_err();
        assert!(err.to_string().contains("cosine_annealing"), "{err}");
        assert_eq!(
            "piecewise_constant".parse::<LrScheduleKind>(),
            Err(ScheduleError::PiecewiseConstant)
        );
    }

    #[test]
    fn polynomial_refuses_what_diffusers_cannot_run() {
        let err = LrSchedule::new(LrScheduleKind::Polynomial, 1e-8, 0, 10).unwrap_err();
        assert!(matches!(err, ScheduleError::EndAboveBase { .. }), "{err}");
        let err = LrSchedule::new(LrScheduleKind::Polynomial, 1e-4, 10, 10).unwrap_err();
        assert!(matches!(err, ScheduleError::NoDecaySteps { .. }), "{err}");
        assert!(LrSchedule::new(LrScheduleKind::Linear, f64::NAN, 0, 10).is_err());
    }
}
