//! An exponential moving average of the trained weights: diffusers' `EMAModel`
//! (`diffusers.training_utils`) as `train_instruct_pix2pix.py --use_ema` uses it.
//!
//! Each optimizer step counts `optimization_step` up by one, then moves every shadow weight
//! toward its parameter: `shadow −= (1 − decay) · (shadow − param)` with
//! `decay = get_decay(optimization_step)`. With the script's settings (`use_ema_warmup` off,
//! `update_after_step` 0, `min_decay` 0) the first step's decay is 0 (the shadow becomes the
//! weights) and then `min(decay, (1 + s) / (10 + s))` with `s = optimization_step − 1`.
//! `store` / `copy_to` / `restore` swap the averaged weights in for validation and back.

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

/// `EMAModel`'s settings, with its defaults (those the training script uses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmaConfig {
    /// The largest decay (0.9999).
    pub decay: f64,
    /// The smallest decay once updates start (0).
    pub min_decay: f64,
    /// Optimizer steps before the average starts to move (0).
    pub update_after_step: u64,
    /// `1 − (1 + s/inv_gamma)^−power` instead of `(1 + s)/(10 + s)` (off in the script).
    pub use_ema_warmup: bool,
    /// Warm-up's inverse multiplicative factor (1).
    pub inv_gamma: f64,
    /// Warm-up's exponent (2/3).
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_ema_warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

impl EmaConfig {
    /// `EMAModel.get_decay(optimization_step)`.
    pub fn decay_at(&self, optimization_step: u64) -> f64 {
        let step = optimization_step.saturating_sub(self.update_after_step + 1);
        if step == 0 {
            return 0.0;
        }
        let step = step as f64;
        let value = if self.use_ema_warmup {
            1.0 - (1.0 + step / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + step) / (10.0 + step)
        };
        value.min(self.decay).max(self.min_decay)
    }
}

/// The EMA's scalar state for a checkpoint (the shadow weights go beside it as named tensors,
/// see [`EmaModel::shadow_tensors`]); `EMAModel.state_dict()` without `shadow_params`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmaState {
    /// The settings.
    pub config: EmaConfig,
    /// Optimizer steps averaged so far.
    pub optimization_step: u64,
}

/// Why EMA weights could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EmaError {
    /// `restore` without a `store` before it.
    #[error("the EMA model has no stored weights to restore (call store before copy_to)")]
    NothingStored,
    /// The shadow weights and the parameters do not correspond.
    #[error("EMA weights do not match the model: {reason}")]
    Mismatch {
        /// Which name or shape differs.
        reason: String,
    },
    /// A tensor operation failed.
    #[error("EMA update: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// The moving average of a list of named parameters (same order as the model's).
#[derive(Debug, Clone)]
pub struct EmaModel {
    config: EmaConfig,
    optimization_step: u64,
    shadow: Vec<(String, Tensor)>,
    stored: Option<Vec<Tensor>>,
    last_decay: Option<f64>,
}

impl EmaModel {
    /// Starts the average at the current values of `params` (`EMAModel(unet.parameters())`).
    pub fn new(params: &[(String, Var)], config: EmaConfig) -> Result<Self, EmaError> {
        let shadow = params
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().detach().copy()?)))
            .collect::<Result<Vec<_>, candle_core::Error>>()?;
        Ok(Self {
            config,
            optimization_step: 0,
            shadow,
            stored: None,
            last_decay: None,
        })
    }

    /// Restores a checkpointed average; `shadow` must hold every parameter's name with its shape.
    pub fn from_state(
        state: EmaState,
        shadow: Vec<(String, Tensor)>,
        params: &[(String, Var)],
    ) -> Result<Self, EmaError> {
        let mut by_name: std::collections::HashMap<String, Tensor> = shadow.into_iter().collect();
        let mut ordered = Vec::with_capacity(params.len());
        for (name, var) in params {
            let tensor = by_name.remove(name).ok_or_else(|| EmaError::Mismatch {
                reason: format!("no EMA weight for parameter {name}"),
            })?;
            if tensor.dims() != var.dims() {
                return Err(EmaError::Mismatch {
                    reason: format!(
                        "EMA weight {name} has shape {:?}, the parameter {:?}",
                        tensor.dims(),
                        var.dims()
                    ),
                });
            }
            let tensor = tensor
                .to_dtype(var.dtype())?
                .to_device(var.device())?
                .copy()?;
            ordered.push((name.clone(), tensor));
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(EmaError::Mismatch {
                reason: format!("EMA weight {extra} is not a parameter of the model"),
            });
        }
        Ok(Self {
            config: state.config,
            optimization_step: state.optimization_step,
            shadow: ordered,
            stored: None,
            last_decay: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &EmaConfig {
        &self.config
    }

    /// Optimizer steps averaged so far.
    pub fn optimization_step(&self) -> u64 {
        self.optimization_step
    }

    /// The decay the last `step` used (`cur_decay_value`).
    pub fn last_decay(&self) -> Option<f64> {
        self.last_decay
    }

    /// The averaged weights, by parameter name.
    pub fn shadow(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    /// The averaged weights for a checkpoint (shared storage; they are replaced, never written
    /// in place, by later steps).
    pub fn shadow_tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow.clone()
    }

    /// The scalar state for a checkpoint.
    pub fn state(&self) -> EmaState {
        EmaState {
            config: self.config.clone(),
            optimization_step: self.optimization_step,
        }
    }

    fn check_names(&self, params: &[(String, Var)]) -> Result<(), EmaError> {
        if params.len() != self.shadow.len() {
            return Err(EmaError::Mismatch {
                reason: format!(
                    "{} parameters for {} EMA weights",
                    params.len(),
                    self.shadow.len()
                ),
            });
        }
        for ((name, _), (shadow_name, _)) in params.iter().zip(&self.shadow) {
            if name != shadow_name {
                return Err(EmaError::Mismatch {
                    reason: format!("parameter {name} where the EMA has {shadow_name}"),
                });
            }
        }
        Ok(())
    }

    /// `EMAModel.step(parameters)`: one more optimization step, then every shadow weight moves
    /// toward its parameter. Returns the decay used.
    pub fn step(&mut self, params: &[(String, Var)]) -> Result<f64, EmaError> {
        self.check_names(params)?;
        self.optimization_step += 1;
        let decay = self.config.decay_at(self.optimization_step);
        let one_minus_decay = 1.0 - decay;
        for ((_, shadow), (_, var)) in self.shadow.iter_mut().zip(params) {
            // s − (1 − decay)·(s − p), in the parameter dtype as torch's `sub_` does it.
            let delta = ((&*shadow - var.as_detached_tensor())? * one_minus_decay)?;
            *shadow = (&*shadow - delta)?.detach();
        }
        self.last_decay = Some(decay);
        Ok(decay)
    }

    /// Writes the averaged weights into `params` (`copy_to`).
    pub fn copy_to(&self, params: &[(String, Var)]) -> Result<(), EmaError> {
        self.check_names(params)?;
        for ((_, shadow), (_, var)) in self.shadow.iter().zip(params) {
            var.set(shadow)?;
        }
        Ok(())
    }

    /// Keeps a copy of the current `params` for [`EmaModel::restore`] (`store`).
    pub fn store(&mut self, params: &[(String, Var)]) -> Result<(), EmaError> {
        self.check_names(params)?;
        let copies = params
            .iter()
            .map(|(_, var)| var.as_tensor().detach().copy())
            .collect::<Result<Vec<_>, _>>()?;
        self.stored = Some(copies);
        Ok(())
    }

    /// Puts back the weights kept by [`EmaModel::store`] and forgets them (`restore`).
    pub fn restore(&mut self, params: &[(String, Var)]) -> Result<(), EmaError> {
        self.check_names(params)?;
        let stored = self.stored.take().ok_or(EmaError::NothingStored)?;
        for (copy, (_, var)) in stored.iter().zip(params) {
            var.set(copy)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn params(values: &[f32]) -> Vec<(String, Var)> {
        vec![(
            "w".to_string(),
            Var::from_slice(values, values.len(), &Device::Cpu).unwrap(),
        )]
    }

    #[test]
    fn store_copy_to_restore_swaps_the_weights_and_back() {
        let params = params(&[1.0, 2.0]);
        let mut ema = EmaModel::new(&params, EmaConfig::default()).unwrap();
        params[0]
            .1
            .set(&Tensor::new(&[3f32, 5.0], &Device::Cpu).unwrap())
            .unwrap();
        ema.step(&params).unwrap(); // decay 0: the shadow becomes [3, 5]
        params[0]
            .1
            .set(&Tensor::new(&[7f32, 9.0], &Device::Cpu).unwrap())
            .unwrap();
        assert!(matches!(ema.restore(&params), Err(EmaError::NothingStored)));
        ema.store(&params).unwrap();
        ema.copy_to(&params).unwrap();
        assert_eq!(params[0].1.to_vec1::<f32>().unwrap(), [3.0, 5.0]);
        ema.restore(&params).unwrap();
        assert_eq!(params[0].1.to_vec1::<f32>().unwrap(), [7.0, 9.0]);
        assert!(matches!(ema.restore(&params), Err(EmaError::NothingStored)));
    }

    #[test]
    fn mismatched_parameters_are_refused_by_name() {
        let ema = EmaModel::new(&params(&[1.0]), EmaConfig::default()).unwrap();
        let other = vec![(
            "v".to_string(),
            Var::from_slice(&[1f32], 1, &Device::Cpu).unwrap(),
        )];
        let err = ema.copy_to(&other).unwrap_err();
        assert!(err.to_string().contains("parameter v"), "{err}");
        let err = EmaModel::from_state(ema.state(), ema.shadow_tensors(), &other).unwrap_err();
        assert!(
            err.to_string().contains("no EMA weight for parameter v"),
            "{err}"
        );
    }
}
