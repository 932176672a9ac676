//! The optimizer: torch's `torch.optim.AdamW` (the single-tensor path torch takes on the CPU)
//! and `torch.nn.utils.clip_grad_norm_`, with their arithmetic order.
//!
//! One AdamW step for a parameter `p` with gradient `g`, at step `t` (counted from 1), learning
//! rate `lr`:
//! ```text
//! p ← p · (1 − lr·wd)                         decoupled weight decay, before the Adam update
//! m ← lerp(m, g, 1 − β1)                       = m + (1 − β1)(g − m)
//! v ← v·β2 + (1 − β2)·g·g
//! p ← p − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//! Scalars are computed in f64 as Python does and applied in the parameter's dtype (f32). On the
//! CPU each of the three lines runs as one in-place pass (no temporaries, which matters at 860 M
//! parameters); elsewhere the same formula runs as candle tensor ops.

use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// AdamW's hyper-parameters (`--adam_beta1 --adam_beta2 --adam_epsilon --adam_weight_decay`);
/// the learning rate comes from the schedule at each step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β1 (0.9).
    pub beta1: f64,
    /// β2 (0.999).
    pub beta2: f64,
    /// ε added to the root of the second moment (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (1e-2).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The training script's defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// The optimizer's scalar state for a checkpoint; the moments go beside it as named tensors
/// ([`AdamW::state_tensors`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    /// The hyper-parameters.
    pub config: AdamWConfig,
    /// Optimizer steps taken (torch's per-parameter `step`, the same for every parameter here).
    pub step: u64,
}

/// Why an optimizer step or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// Gradients and parameters do not line up.
    #[error("{given} gradients for {expected} parameters")]
    GradientCount {
        /// Gradients given.
        given: usize,
        /// Parameters.
        expected: usize,
    },
    /// A gradient's shape is not its parameter's.
    #[error("gradient of {name} has shape {grad:?}, the parameter {param:?}")]
    GradientShape {
        /// The parameter.
        name: String,
        /// The gradient's shape.
        grad: Vec<usize>,
        /// The parameter's shape.
        param: Vec<usize>,
    },
    /// A checkpointed moment is missing or has the wrong shape.
    #[error("optimizer state: {reason}")]
    BadState {
        /// What is wrong, by name.
        reason: String,
    },
    /// A tensor operation failed.
    #[error("optimizer: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// torch's AdamW over a list of named parameters.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    params: Vec<(String, Var)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";

impl AdamW {
    /// A fresh optimizer: zero moments, step 0.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self, OptimError> {
        let zeros = |var: &Var| var.as_tensor().zeros_like();
        let exp_avg = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<Vec<_>, _>>()?;
        let exp_avg_sq = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            step: 0,
            params,
            exp_avg,
            exp_avg_sq,
        })
    }

    /// Restores a checkpointed optimizer: `tensors` must hold `exp_avg.NAME` and
    /// `exp_avg_sq.NAME` for every parameter, with its shape.
    pub fn from_state(
        params: Vec<(String, Var)>,
        state: AdamWState,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<Self, OptimError> {
        let mut by_name: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let mut take = |kind: &str, name: &str, var: &Var| -> Result<Tensor, OptimError> {
            let key = format!("{kind}.{name}");
            let tensor = by_name.remove(&key).ok_or_else(|| OptimError::BadState {
                reason: format!("no {key} for parameter {name}"),
            })?;
            if tensor.dims() != var.dims() {
                return Err(OptimError::BadState {
                    reason: format!(
                        "{key} has shape {:?}, the parameter {:?}",
                        tensor.dims(),
                        var.dims()
                    ),
                });
            }
            Ok(tensor
                .to_dtype(var.dtype())?
                .to_device(var.device())?
                .copy()?)
        };
        let mut exp_avg = Vec::with_capacity(params.len());
        let mut exp_avg_sq = Vec::with_capacity(params.len());
        for (name, var) in &params {
            exp_avg.push(take(EXP_AVG, name, var)?);
            exp_avg_sq.push(take(EXP_AVG_SQ, name, var)?);
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(OptimError::BadState {
                reason: format!("{extra} belongs to no parameter of the model"),
            });
        }
        Ok(Self {
            config: state.config,
            step: state.step,
            params,
            exp_avg,
            exp_avg_sq,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The parameters, in the order gradients are given.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The scalar state for a checkpoint.
    pub fn state(&self) -> AdamWState {
        AdamWState {
            config: self.config.clone(),
            step: self.step,
        }
    }

    /// The moments for a checkpoint, named `exp_avg.NAME` and `exp_avg_sq.NAME` (copies: the
    /// optimizer updates its own in place).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>, OptimError> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{EXP_AVG}.{name}"), self.exp_avg[i].copy()?));
            out.push((format!("{EXP_AVG_SQ}.{name}"), self.exp_avg_sq[i].copy()?));
        }
        Ok(out)
    }

    /// The first and second moments of parameter `index`.
    pub fn moments(&self, index: usize) -> Option<(&Tensor, &Tensor)> {
        Some((self.exp_avg.get(index)?, self.exp_avg_sq.get(index)?))
    }

    /// One `optimizer.step()` at learning rate `lr`. `grads[i]` belongs to `params()[i]`; a
    /// parameter whose gradient is `None` is skipped entirely, as torch skips `grad is None`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<(), OptimError> {
        if grads.len() != self.params.len() {
            return Err(OptimError::GradientCount {
                given: grads.len(),
                expected: self.params.len(),
            });
        }
        for ((name, var), grad) in self.params.iter().zip(grads) {
            if let Some(grad) = grad
                && grad.dims() != var.dims()
            {
                return Err(OptimError::GradientShape {
                    name: name.clone(),
                    grad: grad.dims().to_vec(),
                    param: var.dims().to_vec(),
                });
            }
        }
        self.step += 1;
        let c = &self.config;
        // Python: `beta ** step` with the step as a float, `bias_correction2 ** 0.5`.
        let t = self.step as f64;
        let bias_correction1 = 1.0 - c.beta1.powf(t);
        let bias_correction2 = 1.0 - c.beta2.powf(t);
        let scalars = AdamScalars {
            decay_mul: 1.0 - lr * c.weight_decay,
            apply_decay: c.weight_decay != 0.0,
            beta1_weight: 1.0 - c.beta1,
            beta2: c.beta2,
            one_minus_beta2: 1.0 - c.beta2,
            neg_step_size: -(lr / bias_correction1),
            bias_correction2_sqrt: bias_correction2.powf(0.5),
            eps: c.eps,
        };
        for (i, grad) in grads.iter().enumerate() {
            let Some(grad) = grad else { continue };
            let param = self.params[i].1.as_tensor();
            let (m, v) = (&self.exp_avg[i], &self.exp_avg_sq[i]);
            let grad = grad.to_dtype(param.dtype())?;
            if fused_cpu_allowed(&[param, &grad, m, v]) {
                m.inplace_op2(&grad, &LerpFirstMoment(scalars))?;
                v.inplace_op2(&grad, &UpdateSecondMoment(scalars))?;
                param.inplace_op3(m, v, &AdamUpdate(scalars))?;
            } else {
                let (new_m, new_v, new_p) = scalars.composed(param, &grad, m, v)?;
                self.exp_avg[i] = new_m;
                self.exp_avg_sq[i] = new_v;
                self.params[i].1.set(&new_p)?;
            }
        }
        Ok(())
    }
}

/// The per-step scalars, in f64 as Python computes them.
#[derive(Debug, Clone, Copy)]
struct AdamScalars {
    decay_mul: f64,
    apply_decay: bool,
    beta1_weight: f64,
    beta2: f64,
    one_minus_beta2: f64,
    neg_step_size: f64,
    bias_correction2_sqrt: f64,
    eps: f64,
}

impl AdamScalars {
    /// The update as candle tensor ops (any device and dtype). Returns (m, v, p).
    fn composed(
        &self,
        param: &Tensor,
        grad: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let param = param.detach();
        let param = if self.apply_decay {
            (param * self.decay_mul)?
        } else {
            param
        };
        let m = if self.beta1_weight < 0.5 {
            (m + ((grad - m)? * self.beta1_weight)?)?
        } else {
            (grad - ((grad - m)? * (1.0 - self.beta1_weight))?)?
        };
        let v = ((v * self.beta2)? + ((grad * self.one_minus_beta2)? * grad)?)?;
        let bc2 =
            Tensor::new(self.bias_correction2_sqrt as f32, v.device())?.to_dtype(v.dtype())?;
        let denom = (v.sqrt()?.broadcast_div(&bc2)? + self.eps)?;
        let p = (&param + ((&m * self.neg_step_size)? / denom)?)?;
        Ok((m, v, p))
    }
}

/// Whether the fused in-place CPU passes apply: f32 on the CPU, contiguous.
fn fused_cpu_allowed(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && t.is_contiguous())
}

const CHUNK: usize = 1 << 15;

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("AdamW: non-contiguous operand".into()))?;
    match storage {
        CpuStorage::F32(data) => Ok(&data[start..end]),
        _ => candle_core::bail!("AdamW: operand is not f32"),
    }
}

fn f32_slice_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("AdamW: non-contiguous operand".into()))?;
    match storage {
        CpuStorage::F32(data) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("AdamW: operand is not f32"),
    }
}

/// `exp_avg.lerp_(grad, 1 − β1)` as torch's vectorised CPU lerp computes it (one fused
/// multiply-add from the nearer end).
struct LerpFirstMoment(AdamScalars);

impl InplaceOp2 for LerpFirstMoment {
    fn name(&self) -> &'static str {
        "adamw-exp-avg"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        let m = f32_slice_mut(dst, dst_l)?;
        let g = f32_slice(grad, grad_l)?;
        let w = self.0.beta1_weight as f32;
        let small = w < 0.5;
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let diff = g - *m;
                    *m = if small {
                        w.mul_add(diff, *m)
                    } else {
                        (w - 1.0).mul_add(diff, g)
                    };
                }
            });
        Ok(())
    }
}

/// `exp_avg_sq.mul_(β2).addcmul_(grad, grad, value=1 − β2)`.
struct UpdateSecondMoment(AdamScalars);

impl InplaceOp2 for UpdateSecondMoment {
    fn name(&self) -> &'static str {
        "adamw-exp-avg-sq"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        let v = f32_slice_mut(dst, dst_l)?;
        let g = f32_slice(grad, grad_l)?;
        let beta2 = self.0.beta2 as f32;
        let value = self.0.one_minus_beta2 as f32;
        v.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(v, g)| {
                for (v, &g) in v.iter_mut().zip(g) {
                    *v = *v * beta2 + value * g * g;
                }
            });
        Ok(())
    }
}

/// `param.mul_(1 − lr·wd)`, then `denom = sqrt(v) / √bc2 + ε` and
/// `param.addcdiv_(m, denom, value=−step_size)`.
struct AdamUpdate(AdamScalars);

impl InplaceOp3 for AdamUpdate {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32_slice_mut(dst, dst_l)?;
        let m = f32_slice(m, m_l)?;
        let v = f32_slice(v, v_l)?;
        let s = self.0;
        let decay_mul = s.decay_mul as f32;
        let bc2_sqrt = s.bias_correction2_sqrt as f32;
        let eps = s.eps as f32;
        let value = s.neg_step_size as f32;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    let decayed = if s.apply_decay { *p * decay_mul } else { *p };
                    let denom = v.sqrt() / bc2_sqrt + eps;
                    *p = decayed + value * m / denom;
                }
            });
        Ok(())
    }
}

/// The total 2-norm of the gradients, as `clip_grad_norm_` computes it: each gradient's norm,
/// then the norm of those f32 norms (sums taken in f64, results rounded to f32 as torch's are).
pub fn total_grad_norm(grads: &[Option<Tensor>]) -> candle_core::Result<f32> {
    let mut sum_of_squares = 0f64;
    for grad in grads.iter().flatten() {
        let norm = grad
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?
            .sqrt() as f32;
        sum_of_squares += f64::from(norm) * f64::from(norm);
    }
    Ok(sum_of_squares.sqrt() as f32)
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: scales every gradient by
/// `min(1, max_norm / (total_norm + 1e-6))` (always, as torch does, even when the factor is 1)
/// and returns the total norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> candle_core::Result<f32> {
    let total_norm = total_grad_norm(grads)?;
    // torch: `max_norm / (total_norm + 1e-6)` on an f32 tensor is `reciprocal() * max_norm`.
    let clip_coef = (1.0f32 / (total_norm + 1e-6f32)) * max_norm as f32;
    let clip_coef_clamped = clip_coef.min(1.0);
    for grad in grads.iter_mut().flatten() {
        let scale = Tensor::new(clip_coef_clamped, grad.device())?.to_dtype(grad.dtype())?;
        *grad = grad.broadcast_mul(&scale)?;
    }
    Ok(total_norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps through the fused CPU passes and through the composed tensor ops (the path
    /// other devices take) from the same start.
    #[test]
    fn fused_and_composed_updates_agree() {
        let device = Device::Cpu;
        let start = Tensor::arange(0f32, 24., &device)
            .unwrap()
            .affine(0.1, -1.0)
            .unwrap();
        let grad = Tensor::arange(0f32, 24., &device)
            .unwrap()
            .affine(-0.03, 0.2)
            .unwrap();
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let var = Var::from_tensor(&start).unwrap();
        let mut fused = AdamW::new(vec![("p".into(), var.clone())], config.clone()).unwrap();
        let lrs = [1e-2, 5e-3];
        for lr in lrs {
            fused.step(&[Some(grad.clone())], lr).unwrap();
        }

        let (mut p, mut m, mut v) = (
            start.clone(),
            grad.zeros_like().unwrap(),
            grad.zeros_like().unwrap(),
        );
        for (t, lr) in lrs.into_iter().enumerate() {
            let t = t as f64 + 1.0;
            let scalars = AdamScalars {
                decay_mul: 1.0 - lr * config.weight_decay,
                apply_decay: true,
                beta1_weight: 1.0 - config.beta1,
                beta2: config.beta2,
                one_minus_beta2: 1.0 - config.beta2,
                neg_step_size: -(lr / (1.0 - config.beta1.powf(t))),
                bias_correction2_sqrt: (1.0 - config.beta2.powf(t)).sqrt(),
                eps: config.eps,
            };
            (m, v, p) = scalars.composed(&p, &grad, &m, &v).unwrap();
        }
        let diff = (var.as_tensor() - &p)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Same formula; only the lerp's fused multiply-add rounds differently (an f32 ulp of
        // the moment, far below the 1e-2 step).
        assert!(diff < 1e-6, "{diff}");
        assert!(
            (var.as_tensor() - &start)
                .unwrap()
                .abs()
                .unwrap()
                .min_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1e-3
        );
        assert_eq!(fused.step_count(), 2);
    }

    #[test]
    fn restoring_needs_every_moment() {
        let var = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let params = vec![("w".to_string(), var)];
        let optim = AdamW::new(params.clone(), AdamWConfig::default()).unwrap();
        let mut tensors = optim.state_tensors().unwrap();
        tensors.retain(|(name, _)| name != "exp_avg_sq.w");
        let err = AdamW::from_state(params, optim.state(), tensors).unwrap_err();
        assert!(err.to_string().contains("exp_avg_sq.w"), "{err}");
    }
}
