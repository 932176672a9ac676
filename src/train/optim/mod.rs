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
//! parameters; the loops are `ip2p_kernels::adamw`'s, on the CPU's widest vectors); elsewhere
//! the same formula runs as candle tensor ops.
//!
//! With [`MomentStorage::Blockwise8Bit`] (`--use_8bit_adam`), the moments are stored as
//! bitsandbytes' `AdamW8bit` stores them (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
//! Quantization"): one byte per element, an index into a dynamic quantisation map (signed for m,
//! unsigned for v, [`dynamic_map`]), scaled by the absolute maximum of its block of
//! [`BLOCK_SIZE_8BIT`] elements. Each step dequantises a block, updates it in f32, applies the
//! update with the new moments, and quantises them again to the nearest map value (m keeping its
//! sign), as bitsandbytes' blockwise kernel does, weight decay after the update included.
//! Parameters of fewer than [`MIN_8BIT_SIZE`] elements keep f32 moments and the update above
//! (bitsandbytes' `min_8bit_size`). The 8-bit state lives in host memory whatever the device:
//! 2 bytes per parameter instead of 8.
//!
//! This file owns [`AdamW`] (state, checkpoint tensors, the step), the fused f32 CPU passes and
//! gradient clipping; the 8-bit maps, block-wise quantisation and the 8-bit update live in
//! `adam8bit`, re-exported here.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use ip2p_kernels::adamw;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

mod adam8bit;

use adam8bit::{Adam8BitScalars, Adam8BitUpdate};
pub use adam8bit::{
    BLOCK_SIZE_8BIT, BlockwiseQuantized, MIN_8BIT_SIZE, dynamic_map, quantize_to_map,
};

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

/// How AdamW stores its moments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentStorage {
    /// f32, as torch's AdamW.
    #[default]
    Float32,
    /// bitsandbytes' `AdamW8bit`: block-wise dynamic 8-bit quantisation (see the module doc).
    Blockwise8Bit,
}

impl std::fmt::Display for MomentStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Float32 => "32-bit AdamW",
            Self::Blockwise8Bit => "8-bit AdamW (--use_8bit_adam)",
        })
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
    /// How the moments are stored (checkpoints written before 8-bit moments existed are f32).
    #[serde(default)]
    pub moments: MomentStorage,
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

/// torch's AdamW over a list of named parameters (or bitsandbytes' `AdamW8bit`, see
/// [`MomentStorage`]).
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    storage: MomentStorage,
    params: Vec<(String, Var)>,
    moments: Vec<Moments>,
}

/// One parameter's moments.
#[derive(Debug)]
enum Moments {
    Float32 { exp_avg: Tensor, exp_avg_sq: Tensor },
    Quantized(Box<QuantizedMoments>),
}

/// One parameter's 8-bit moments: m on the signed map, v on the unsigned one.
#[derive(Debug)]
struct QuantizedMoments {
    exp_avg: BlockwiseQuantized,
    exp_avg_sq: BlockwiseQuantized,
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
/// Checkpoint names of the 8-bit state: codes (u8, the parameter's shape) and block maxima (f32).
const EXP_AVG_CODES: &str = "exp_avg_q8";
const EXP_AVG_ABSMAX: &str = "exp_avg_absmax";
const EXP_AVG_SQ_CODES: &str = "exp_avg_sq_q8";
const EXP_AVG_SQ_ABSMAX: &str = "exp_avg_sq_absmax";

/// Whether a parameter of `elements` elements gets 8-bit moments under `storage`.
fn quantized(storage: MomentStorage, elements: usize) -> bool {
    storage == MomentStorage::Blockwise8Bit && elements >= MIN_8BIT_SIZE
}

impl AdamW {
    /// A fresh optimizer: zero moments, step 0.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self, OptimError> {
        Self::with_storage(params, config, MomentStorage::Float32)
    }

    /// A fresh optimizer with moments stored as `storage` says: zero moments, step 0.
    pub fn with_storage(
        params: Vec<(String, Var)>,
        config: AdamWConfig,
        storage: MomentStorage,
    ) -> Result<Self, OptimError> {
        let moments = params
            .iter()
            .map(|(_, var)| -> Result<Moments, OptimError> {
                let elements = var.elem_count();
                Ok(if quantized(storage, elements) {
                    Moments::Quantized(Box::new(QuantizedMoments {
                        exp_avg: BlockwiseQuantized::zeros(elements, true, BLOCK_SIZE_8BIT),
                        exp_avg_sq: BlockwiseQuantized::zeros(elements, false, BLOCK_SIZE_8BIT),
                    }))
                } else {
                    Moments::Float32 {
                        exp_avg: var.as_tensor().zeros_like()?,
                        exp_avg_sq: var.as_tensor().zeros_like()?,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            config,
            step: 0,
            storage,
            params,
            moments,
        })
    }

    /// Restores a checkpointed optimizer: `tensors` must hold, for every parameter with f32
    /// moments, `exp_avg.NAME` and `exp_avg_sq.NAME` of its shape, and for every parameter with
    /// 8-bit moments (`state.moments`), `exp_avg_q8.NAME` / `exp_avg_sq_q8.NAME` (u8, its shape)
    /// and `exp_avg_absmax.NAME` / `exp_avg_sq_absmax.NAME` (f32, one per block).
    pub fn from_state(
        params: Vec<(String, Var)>,
        state: AdamWState,
        tensors: Vec<(String, Tensor)>,
    ) -> Result<Self, OptimError> {
        let mut by_name: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let mut take = |kind: &str, name: &str, dims: &[usize]| -> Result<Tensor, OptimError> {
            let key = format!("{kind}.{name}");
            let tensor = by_name.remove(&key).ok_or_else(|| OptimError::BadState {
                reason: format!(
                    "no {key} for parameter {name} (a checkpoint of {} has it)",
                    state.moments
                ),
            })?;
            if tensor.dims() != dims {
                return Err(OptimError::BadState {
                    reason: format!("{key} has shape {:?} where {dims:?} belongs", tensor.dims()),
                });
            }
            Ok(tensor)
        };
        let mut moments = Vec::with_capacity(params.len());
        for (name, var) in &params {
            let elements = var.elem_count();
            if quantized(state.moments, elements) {
                let blocks = elements.div_ceil(BLOCK_SIZE_8BIT);
                let mut restore = |codes: &str, absmax: &str, signed: bool| {
                    let codes = take(codes, name, var.dims())?;
                    let absmax = take(absmax, name, &[blocks])?;
                    Ok::<_, OptimError>(BlockwiseQuantized {
                        codes: codes.flatten_all()?.to_dtype(DType::U8)?.to_vec1::<u8>()?,
                        absmax: absmax.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                        signed,
                        block_size: BLOCK_SIZE_8BIT,
                    })
                };
                let exp_avg = restore(EXP_AVG_CODES, EXP_AVG_ABSMAX, true)?;
                let exp_avg_sq = restore(EXP_AVG_SQ_CODES, EXP_AVG_SQ_ABSMAX, false)?;
                moments.push(Moments::Quantized(Box::new(QuantizedMoments {
                    exp_avg,
                    exp_avg_sq,
                })));
            } else {
                let mut restore = |kind: &str| -> Result<Tensor, OptimError> {
                    Ok(take(kind, name, var.dims())?
                        .to_dtype(var.dtype())?
                        .to_device(var.device())?
                        .copy()?)
                };
                let exp_avg = restore(EXP_AVG)?;
                let exp_avg_sq = restore(EXP_AVG_SQ)?;
                moments.push(Moments::Float32 {
                    exp_avg,
                    exp_avg_sq,
                });
            }
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(OptimError::BadState {
                reason: format!(
                    "{extra} belongs to no parameter's moments of {}",
                    state.moments
                ),
            });
        }
        Ok(Self {
            config: state.config,
            step: state.step,
            storage: state.moments,
            params,
            moments,
        })
    }

    /// How the moments are stored.
    pub fn moment_storage(&self) -> MomentStorage {
        self.storage
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
            moments: self.storage,
        }
    }

    /// The moments for a checkpoint (copies: the optimizer updates its own in place): f32
    /// moments named `exp_avg.NAME` and `exp_avg_sq.NAME`; 8-bit ones as their codes
    /// `exp_avg_q8.NAME`, `exp_avg_sq_q8.NAME` (u8, the parameter's shape) and block maxima
    /// `exp_avg_absmax.NAME`, `exp_avg_sq_absmax.NAME` (f32).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>, OptimError> {
        let mut out = Vec::with_capacity(4 * self.params.len());
        for ((name, var), moments) in self.params.iter().zip(&self.moments) {
            match moments {
                Moments::Float32 {
                    exp_avg,
                    exp_avg_sq,
                } => {
                    out.push((format!("{EXP_AVG}.{name}"), exp_avg.copy()?));
                    out.push((format!("{EXP_AVG_SQ}.{name}"), exp_avg_sq.copy()?));
                }
                Moments::Quantized(q) => {
                    for (codes, absmax, state) in [
                        (EXP_AVG_CODES, EXP_AVG_ABSMAX, &q.exp_avg),
                        (EXP_AVG_SQ_CODES, EXP_AVG_SQ_ABSMAX, &q.exp_avg_sq),
                    ] {
                        let codes_tensor =
                            Tensor::from_slice(&state.codes, var.dims(), &Device::Cpu)?;
                        let absmax_tensor =
                            Tensor::from_slice(&state.absmax, state.absmax.len(), &Device::Cpu)?;
                        out.push((format!("{codes}.{name}"), codes_tensor));
                        out.push((format!("{absmax}.{name}"), absmax_tensor));
                    }
                }
            }
        }
        Ok(out)
    }

    /// The f32 first and second moments of parameter `index` (`None` for 8-bit ones: see
    /// [`AdamW::dequantized_moments`]).
    pub fn moments(&self, index: usize) -> Option<(&Tensor, &Tensor)> {
        match self.moments.get(index)? {
            Moments::Float32 {
                exp_avg,
                exp_avg_sq,
            } => Some((exp_avg, exp_avg_sq)),
            Moments::Quantized(_) => None,
        }
    }

    /// The first and second moments of parameter `index` as f32 tensors on the CPU, whatever
    /// their storage.
    pub fn dequantized_moments(
        &self,
        index: usize,
    ) -> Result<Option<(Tensor, Tensor)>, OptimError> {
        let Some((_, var)) = self.params.get(index) else {
            return Ok(None);
        };
        Ok(Some(match &self.moments[index] {
            Moments::Float32 {
                exp_avg,
                exp_avg_sq,
            } => (
                exp_avg.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
                exp_avg_sq.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
            ),
            Moments::Quantized(q) => (
                Tensor::from_vec(q.exp_avg.dequantize(), var.dims(), &Device::Cpu)?,
                Tensor::from_vec(q.exp_avg_sq.dequantize(), var.dims(), &Device::Cpu)?,
            ),
        }))
    }

    /// One `optimizer.step()` at learning rate `lr`. `grads[i]` belongs to `params()[i]`; a
    /// parameter whose gradient is `None` is skipped entirely, as torch skips `grad is None`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<(), OptimError> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] on the gradients times `grad_scale` (the factor of
    /// [`clip_coefficient`]), as `clip_grad_norm_`'s in-place `grad.mul_(coef)` followed by
    /// the step: the same float32 product, taken inside the update on the CPU, so that no
    /// scaled copy of the gradients is ever made.
    pub fn step_scaled(
        &mut self,
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: f32,
    ) -> Result<(), OptimError> {
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
            grad_scale,
        };
        let scalars_8bit = Adam8BitScalars::new(c, lr, self.step, grad_scale);
        for (i, grad) in grads.iter().enumerate() {
            let Some(grad) = grad else { continue };
            let var = &self.params[i].1;
            let param = var.as_tensor();
            let grad = grad.to_dtype(param.dtype())?;
            // Off the fused CPU passes: the scaled gradient as its own tensor.
            let scaled_grad = || -> candle_core::Result<Tensor> {
                if grad_scale == 1.0 {
                    return Ok(grad.clone());
                }
                let scale = Tensor::new(grad_scale, grad.device())?.to_dtype(grad.dtype())?;
                grad.broadcast_mul(&scale)
            };
            match &mut self.moments[i] {
                Moments::Float32 {
                    exp_avg: m,
                    exp_avg_sq: v,
                } => {
                    if fused_cpu_allowed(&[param, &grad, m, v]) {
                        m.inplace_op2(&grad, &OnCpuF32(LerpFirstMoment(scalars)))?;
                        v.inplace_op2(&grad, &OnCpuF32(UpdateSecondMoment(scalars)))?;
                        param.inplace_op3(m, v, &AdamUpdate(scalars))?;
                    } else {
                        let (new_m, new_v, new_p) =
                            scalars.composed(param, &scaled_grad()?, m, v)?;
                        *m = new_m;
                        *v = new_v;
                        var.set(&new_p)?;
                    }
                }
                Moments::Quantized(q) => {
                    if fused_cpu_allowed(&[param, &grad]) {
                        let op = Adam8BitUpdate {
                            scalars: scalars_8bit,
                            moments: Mutex::new(q),
                        };
                        param.inplace_op2(&grad, &OnCpuF32(op))?;
                    } else {
                        // Other devices and dtypes: the same update on a host copy.
                        let mut p = param
                            .to_dtype(DType::F32)?
                            .flatten_all()?
                            .to_vec1::<f32>()?;
                        // The host copy is unscaled: the update scales it as the CPU's does.
                        let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        scalars_8bit.update(&mut p, &g, q);
                        let updated = Tensor::from_vec(p, param.dims(), &Device::Cpu)?
                            .to_dtype(param.dtype())?
                            .to_device(param.device())?;
                        var.set(&updated)?;
                    }
                }
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
    /// The clipping factor the gradient is multiplied by first (1 when not clipped).
    grad_scale: f32,
}

impl AdamScalars {
    /// The scalars the CPU passes take, rounded to f32 as the parameters are.
    fn kernel_step(&self) -> adamw::AdamStep {
        adamw::AdamStep {
            decay_mul: self.decay_mul as f32,
            apply_decay: self.apply_decay,
            beta1_weight: self.beta1_weight as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: self.one_minus_beta2 as f32,
            neg_step_size: self.neg_step_size as f32,
            bias_correction2_sqrt: self.bias_correction2_sqrt as f32,
            eps: self.eps as f32,
            grad_scale: self.grad_scale,
        }
    }

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

/// An update of a contiguous f32 CPU tensor in place from another of the same length (the
/// gradient); [`OnCpuF32`] makes it a candle in-place op.
pub(super) trait F32GradUpdate {
    /// The op's name in candle's errors.
    const NAME: &'static str;

    fn apply(&self, dst: &mut [f32], grad: &[f32]) -> candle_core::Result<()>;
}

/// Runs an [`F32GradUpdate`] as candle's `InplaceOp2` on the CPU storages.
pub(super) struct OnCpuF32<U>(pub(super) U);

impl<U: F32GradUpdate> InplaceOp2 for OnCpuF32<U> {
    fn name(&self) -> &'static str {
        U::NAME
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        self.0
            .apply(f32_slice_mut(dst, dst_l)?, f32_slice(grad, grad_l)?)
    }
}

/// `exp_avg.lerp_(grad, 1 − β1)` as torch's vectorised CPU lerp computes it (one fused
/// multiply-add from the nearer end).
struct LerpFirstMoment(AdamScalars);

impl F32GradUpdate for LerpFirstMoment {
    const NAME: &'static str = "adamw-exp-avg";

    fn apply(&self, m: &mut [f32], g: &[f32]) -> candle_core::Result<()> {
        let (step, isa) = (self.0.kernel_step(), ip2p_kernels::isa());
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| adamw::first_moment_on(isa, &step, m, g));
        Ok(())
    }
}

/// `exp_avg_sq.mul_(β2).addcmul_(grad, grad, value=1 − β2)`.
struct UpdateSecondMoment(AdamScalars);

impl F32GradUpdate for UpdateSecondMoment {
    const NAME: &'static str = "adamw-exp-avg-sq";

    fn apply(&self, v: &mut [f32], g: &[f32]) -> candle_core::Result<()> {
        let (step, isa) = (self.0.kernel_step(), ip2p_kernels::isa());
        v.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(v, g)| adamw::second_moment_on(isa, &step, v, g));
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
        let (step, isa) = (self.0.kernel_step(), ip2p_kernels::isa());
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| adamw::update_param_on(isa, &step, p, m, v));
        Ok(())
    }
}

/// The total 2-norm of the gradients, as `clip_grad_norm_` computes it: each gradient's norm,
/// then the norm of those f32 norms (sums taken in f64, results rounded to f32 as torch's are).
pub fn total_grad_norm(grads: &[Option<Tensor>]) -> candle_core::Result<f32> {
    let mut sum_of_squares = 0f64;
    for grad in grads.iter().flatten() {
        let norm = squares_sum(grad)?.sqrt() as f32;
        sum_of_squares += f64::from(norm) * f64::from(norm);
    }
    Ok(sum_of_squares.sqrt() as f32)
}

/// Σ g² of one gradient in f64: read in place on the CPU (the composed way makes two f64 copies,
/// four times the gradient's bytes).
fn squares_sum(grad: &Tensor) -> candle_core::Result<f64> {
    if fused_cpu_allowed(&[grad]) {
        let (storage, layout) = grad.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let values = f32_slice(cpu, layout)?;
            // Chunk sums in a fixed order: the same result on any number of threads.
            let isa = ip2p_kernels::isa();
            let chunk_sums: Vec<f64> = values
                .par_chunks(CHUNK)
                .map(|chunk| adamw::squares_sum_on(isa, chunk))
                .collect();
            return Ok(chunk_sums.iter().sum());
        }
    }
    grad.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()
}

/// What `torch.nn.utils.clip_grad_norm_(params, max_norm)` computes: the total norm before
/// clipping and the factor `min(1, max_norm / (total_norm + 1e-6))` every gradient is then
/// multiplied by (always, as torch does, even when the factor is 1): give that factor to
/// [`AdamW::step_scaled`].
pub fn clip_coefficient(
    grads: &[Option<Tensor>],
    max_norm: f64,
) -> candle_core::Result<(f32, f32)> {
    let total_norm = total_grad_norm(grads)?;
    // torch: `max_norm / (total_norm + 1e-6)` on an f32 tensor is `reciprocal() * max_norm`.
    let clip_coef = (1.0f32 / (total_norm + 1e-6f32)) * max_norm as f32;
    Ok((total_norm, clip_coef.min(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;

    /// The clipping factor applied inside the update equals the step on gradients scaled
    /// beforehand, bit for bit, on the fused, composed and 8-bit paths.
    #[test]
    fn a_scaled_step_equals_a_step_on_the_scaled_gradients_on_every_path() {
        let device = Device::Cpu;
        let start = Tensor::arange(0f32, 4096., &device)
            .unwrap()
            .affine(1e-3, -1.0)
            .unwrap();
        let grad = Tensor::arange(0f32, 4096., &device)
            .unwrap()
            .affine(-3e-4, 0.7)
            .unwrap()
            .sin()
            .unwrap();
        let scale = 0.3791f32;
        let scaled = (&grad * f64::from(scale)).unwrap();
        // f32 fused, f64 composed (not the fused dtype) and 8-bit (4096 values is its minimum).
        for (dtype, use_8bit) in [(DType::F32, false), (DType::F64, false), (DType::F32, true)] {
            let run = |grad: &Tensor, grad_scale: f32| {
                let var = Var::from_tensor(&start.to_dtype(dtype).unwrap()).unwrap();
                let storage = if use_8bit {
                    MomentStorage::Blockwise8Bit
                } else {
                    MomentStorage::Float32
                };
                let mut adam = AdamW::with_storage(
                    vec![("p".into(), var.clone())],
                    Default::default(),
                    storage,
                )
                .unwrap();
                for lr in [1e-2, 5e-3] {
                    let grad = grad.to_dtype(dtype).unwrap();
                    adam.step_scaled(&[Some(grad)], lr, grad_scale).unwrap();
                }
                var.as_tensor().to_dtype(DType::F32).unwrap()
            };
            let inside = run(&grad, scale);
            let outside = run(&scaled, 1.0);
            assert_eq!(
                max_abs_diff(&inside, &outside),
                0.0,
                "{dtype:?}, 8-bit {use_8bit}"
            );
            assert!(max_abs_diff(&inside, &start) > 1e-3);
        }
    }

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
                grad_scale: 1.0,
            };
            (m, v, p) = scalars.composed(&p, &grad, &m, &v).unwrap();
        }
        let diff = max_abs_diff(var.as_tensor(), &p);
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
