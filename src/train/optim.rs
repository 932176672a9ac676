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

use std::sync::Mutex;

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
        let scalars_8bit = Adam8BitScalars::new(c, lr, self.step);
        for (i, grad) in grads.iter().enumerate() {
            let Some(grad) = grad else { continue };
            let var = &self.params[i].1;
            let param = var.as_tensor();
            let grad = grad.to_dtype(param.dtype())?;
            match &mut self.moments[i] {
                Moments::Float32 {
                    exp_avg: m,
                    exp_avg_sq: v,
                } => {
                    if fused_cpu_allowed(&[param, &grad, m, v]) {
                        m.inplace_op2(&grad, &LerpFirstMoment(scalars))?;
                        v.inplace_op2(&grad, &UpdateSecondMoment(scalars))?;
                        param.inplace_op3(m, v, &AdamUpdate(scalars))?;
                    } else {
                        let (new_m, new_v, new_p) = scalars.composed(param, &grad, m, v)?;
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
                        param.inplace_op2(&grad, &op)?;
                    } else {
                        // Other devices and dtypes: the same update on a host copy.
                        let mut p = param
                            .to_dtype(DType::F32)?
                            .flatten_all()?
                            .to_vec1::<f32>()?;
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

// ---------------------------------------------------------------------------------------------
// 8-bit moments
// ---------------------------------------------------------------------------------------------

/// Elements per quantisation block of the 8-bit moments (bitsandbytes' `AdamW8bit` of the
/// Dettmers et al. paper and up to bitsandbytes 0.44; later releases use 256).
pub const BLOCK_SIZE_8BIT: usize = 2048;
/// Parameters with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// `torch.linspace(start, end, steps)` in f32 (torch fills the two halves from either end).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// bitsandbytes' dynamic quantisation map (`create_dynamic_map(signed)` with 7 exponent bits):
/// 256 values sorted ascending in [-1, 1] (signed) or [0, 1], dense near zero. For each exponent
/// `e` in −6..=0 it holds the midpoints of `2^k + 1` evenly spaced points on [0.1, 1] scaled by
/// 10^e (k = 0..6 signed, with both signs; k = 1..7 unsigned), plus 0 and 1.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    const EXPONENT_BITS: i32 = 7;
    let mut values: Vec<f32> = Vec::with_capacity(256);
    for i in 0..EXPONENT_BITS {
        let points = if signed {
            (1usize << i) + 1
        } else {
            (1usize << (i + 1)) + 1
        };
        let boundaries = linspace_f32(0.1, 1.0, points);
        let scale = 10f64.powi(i - (EXPONENT_BITS - 1)) as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            if signed {
                values.push(-(scale * mean));
            }
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&values);
    map
}

/// The index of the map value nearest to `x` (the lower one on a tie).
pub fn quantize_to_map(map: &[f32; 256], x: f32) -> u8 {
    let upper = map.partition_point(|&v| v < x);
    if upper == 0 {
        return 0;
    }
    if upper == map.len() {
        return 255;
    }
    let lower = upper - 1;
    if x - map[lower] <= map[upper] - x {
        lower as u8
    } else {
        upper as u8
    }
}

/// The signed and unsigned maps, built once.
fn maps() -> &'static ([f32; 256], [f32; 256]) {
    static MAPS: std::sync::OnceLock<([f32; 256], [f32; 256])> = std::sync::OnceLock::new();
    MAPS.get_or_init(|| (dynamic_map(true), dynamic_map(false)))
}

/// A tensor quantised block-wise on a dynamic map: each block of `block_size` elements stores
/// its absolute maximum, and each element the index of the map value nearest to
/// `element / absmax`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockwiseQuantized {
    /// One map index per element.
    pub codes: Vec<u8>,
    /// One absolute maximum per block.
    pub absmax: Vec<f32>,
    /// The signed map (for m) or the unsigned one (for v).
    pub signed: bool,
    /// Elements per block.
    pub block_size: usize,
}

impl BlockwiseQuantized {
    /// `elements` zeros.
    pub fn zeros(elements: usize, signed: bool, block_size: usize) -> Self {
        let zero = quantize_to_map(Self::map_of(signed), 0.0);
        Self {
            codes: vec![zero; elements],
            absmax: vec![0.0; elements.div_ceil(block_size)],
            signed,
            block_size,
        }
    }

    fn map_of(signed: bool) -> &'static [f32; 256] {
        let (signed_map, unsigned_map) = maps();
        if signed { signed_map } else { unsigned_map }
    }

    /// The map the codes index.
    pub fn map(&self) -> &'static [f32; 256] {
        Self::map_of(self.signed)
    }

    /// Quantises `values` (non-negative ones when `signed` is false).
    pub fn quantize(values: &[f32], signed: bool, block_size: usize) -> Self {
        let map = Self::map_of(signed);
        let mut out = Self::zeros(values.len(), signed, block_size);
        out.codes
            .par_chunks_mut(block_size)
            .zip(out.absmax.par_iter_mut())
            .zip(values.par_chunks(block_size))
            .for_each(|((codes, absmax), block)| {
                *absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                encode_block(map, block, *absmax, signed, codes);
            });
        out
    }

    /// The values the codes stand for: `map[code] · absmax` of the element's block.
    pub fn dequantize(&self) -> Vec<f32> {
        let map = self.map();
        self.codes
            .chunks(self.block_size)
            .zip(&self.absmax)
            .flat_map(|(codes, &absmax)| codes.iter().map(move |&c| map[c as usize] * absmax))
            .collect()
    }
}

/// Writes the codes of `block` (of absolute maximum `absmax`) into `codes`: the nearest map value
/// of `x / absmax`, except that on the signed map a non-zero value whose nearest code has the
/// other sign bit moves one code outwards (bitsandbytes' rule, so that a small negative momentum
/// does not become zero or positive; 0 has a positive sign bit).
fn encode_block(map: &[f32; 256], block: &[f32], absmax: f32, signed: bool, codes: &mut [u8]) {
    if absmax == 0.0 || !absmax.is_finite() {
        let zero = quantize_to_map(map, 0.0);
        codes.iter_mut().for_each(|c| *c = zero);
        return;
    }
    for (code, &x) in codes.iter_mut().zip(block) {
        let mut c = quantize_to_map(map, x / absmax);
        if signed && x != 0.0 && map[c as usize].is_sign_negative() != x.is_sign_negative() {
            c = if x > 0.0 { c + 1 } else { c - 1 };
        }
        *code = c;
    }
}

/// The per-step scalars of the 8-bit update, in f32 as bitsandbytes' kernel computes them.
#[derive(Debug, Clone, Copy)]
struct Adam8BitScalars {
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// `sqrt(1 − β2ᵗ)`.
    correction2: f32,
    /// `−lr · correction2 / (1 − β1ᵗ)`.
    step_size: f32,
    /// `1 − lr·wd`, applied after the update when the decay is non-zero.
    decay_mul: Option<f32>,
}

impl Adam8BitScalars {
    fn new(config: &AdamWConfig, lr: f64, step: u64) -> Self {
        let t = step as f64;
        let correction1 = 1.0 - config.beta1.powf(t);
        let correction2 = (1.0 - config.beta2.powf(t)).sqrt();
        Self {
            beta1: config.beta1 as f32,
            beta2: config.beta2 as f32,
            eps: config.eps as f32,
            correction2: correction2 as f32,
            step_size: (-lr * correction2 / correction1) as f32,
            decay_mul: (config.weight_decay > 0.0)
                .then_some((1.0 - lr * config.weight_decay) as f32),
        }
    }

    /// One step of the 8-bit AdamW on `param` with gradient `grad` (same length as the codes).
    fn update(&self, param: &mut [f32], grad: &[f32], moments: &mut QuantizedMoments) {
        let (signed_map, unsigned_map) = maps();
        let block_size = moments.exp_avg.block_size;
        let m = &mut moments.exp_avg;
        let v = &mut moments.exp_avg_sq;
        param
            .par_chunks_mut(block_size)
            .zip(grad.par_chunks(block_size))
            .zip(m.codes.par_chunks_mut(block_size))
            .zip(m.absmax.par_iter_mut())
            .zip(v.codes.par_chunks_mut(block_size))
            .zip(v.absmax.par_iter_mut())
            .for_each(|(((((p, g), m_codes), m_absmax), v_codes), v_absmax)| {
                let n = p.len();
                let mut m_vals = vec![0f32; n];
                let mut v_vals = vec![0f32; n];
                for j in 0..n {
                    if g[j].is_finite() {
                        let v_old = unsigned_map[v_codes[j] as usize] * *v_absmax;
                        v_vals[j] = v_old * self.beta2 + (1.0 - self.beta2) * g[j] * g[j];
                        let m_old = signed_map[m_codes[j] as usize] * *m_absmax;
                        m_vals[j] = m_old * self.beta1 + (1.0 - self.beta1) * g[j];
                    }
                }
                *m_absmax = m_vals.iter().fold(0f32, |a, x| a.max(x.abs()));
                *v_absmax = v_vals.iter().fold(0f32, |a, x| a.max(x.abs()));
                for j in 0..n {
                    if g[j].is_finite() {
                        let denom = v_vals[j].sqrt() + self.correction2 * self.eps;
                        p[j] += self.step_size * (m_vals[j] / denom);
                        if let Some(decay) = self.decay_mul {
                            p[j] *= decay;
                        }
                    }
                }
                encode_block(signed_map, &m_vals, *m_absmax, true, m_codes);
                encode_block(unsigned_map, &v_vals, *v_absmax, false, v_codes);
            });
    }
}

/// The 8-bit update in place on a contiguous f32 CPU parameter.
struct Adam8BitUpdate<'a> {
    scalars: Adam8BitScalars,
    moments: Mutex<&'a mut QuantizedMoments>,
}

impl InplaceOp2 for Adam8BitUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-8bit"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        grad: &CpuStorage,
        grad_l: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32_slice_mut(dst, dst_l)?;
        let g = f32_slice(grad, grad_l)?;
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        if moments.exp_avg.codes.len() != p.len() {
            candle_core::bail!(
                "AdamW 8-bit: {} moment codes for {} elements",
                moments.exp_avg.codes.len(),
                p.len()
            );
        }
        self.scalars.update(p, g, &mut moments);
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

    #[test]
    fn dynamic_maps_are_bitsandbytes_shapes() {
        let signed = dynamic_map(true);
        let unsigned = dynamic_map(false);
        for map in [&signed, &unsigned] {
            assert!(map.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
            assert_eq!(map[255], 1.0);
        }
        // Signed: 127 negatives, 0, 127 positives below 1, then 1.
        assert_eq!(signed[127], 0.0);
        assert_eq!(signed.iter().filter(|v| **v < 0.0).count(), 127);
        assert!((signed[0] + 0.99297).abs() < 1e-4, "{}", signed[0]);
        // The smallest magnitudes: 10⁻⁶ · 0.55 (signed), 10⁻⁶ · 0.325 (unsigned).
        assert!((signed[128] - 5.5e-7).abs() < 1e-12, "{}", signed[128]);
        assert_eq!(unsigned[0], 0.0);
        assert!((unsigned[1] - 3.25e-7).abs() < 1e-12, "{}", unsigned[1]);
        // Dense near zero: half the codes for [0, 0.1), the other half for [0.1, 1].
        assert_eq!(unsigned.iter().filter(|v| **v < 0.1).count(), 127);
        assert_eq!(signed.iter().filter(|v| v.abs() < 0.1).count(), 127);
    }

    /// Quantise-dequantise round trips: every element within the spacing of the two map values
    /// around it (half of it for plain rounding; a whole one where the sign rule moved it), the
    /// block maxima exact, zeros exact.
    #[test]
    fn quantisation_round_trip_error_is_bounded_by_the_map_spacing() {
        let device = Device::Cpu;
        let n = 3 * 2048 + 123;
        let normal = Tensor::randn(0f32, 1., n, &device).unwrap();
        let mut values = normal.to_vec1::<f32>().unwrap();
        // Blocks of very different scales, and exact zeros.
        for (i, v) in values.iter_mut().enumerate() {
            *v *= [1e-3f32, 1.0, 50.0, 1e-6][i / 2048];
        }
        values[5] = 0.0;
        for signed in [true, false] {
            let input: Vec<f32> = if signed {
                values.clone()
            } else {
                values.iter().map(|v| v * v).collect()
            };
            let q = BlockwiseQuantized::quantize(&input, signed, 2048);
            assert_eq!(q.absmax.len(), 4);
            let map = q.map();
            let back = q.dequantize();
            for (i, (&x, &y)) in input.iter().zip(&back).enumerate() {
                let absmax = q.absmax[i / 2048];
                let normalised = x / absmax;
                let upper = map.partition_point(|&v| v < normalised).clamp(1, 255);
                let spacing = (map[upper] - map[upper - 1]) * absmax;
                assert!(
                    (x - y).abs() <= spacing * 1.0001,
                    "{signed} {i}: {x} came back as {y} (spacing {spacing})"
                );
                if signed && x != 0.0 {
                    assert!(y == 0.0 && x > 0.0 || y.signum() == x.signum(), "{x} {y}");
                }
            }
            assert_eq!(back[5], 0.0);
            // The largest positive element of a block is 1.0 on the map: exact.
            for (block, &absmax) in input.chunks(2048).zip(&q.absmax) {
                let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
                if max == absmax {
                    let i = block.iter().position(|&v| v == max).unwrap();
                    let start = (block.as_ptr() as usize - input.as_ptr() as usize) / 4;
                    assert_eq!(back[start + i], max);
                }
            }
        }
    }

    /// One 8-bit step against a float reference: from zero moments, the moments the update uses
    /// are exact, so the parameter moves exactly as bitsandbytes' formula (decay after the
    /// update) computed in f64 says; the stored moments are the float ones within the map's
    /// spacing. A small parameter keeps f32 moments.
    #[test]
    fn one_8bit_step_equals_the_float_formula() {
        let device = Device::Cpu;
        let n = 5000;
        let start = Tensor::randn(0f32, 1., n, &device).unwrap();
        let grad = Tensor::randn(0f32, 1e-2, n, &device).unwrap();
        let small = Var::zeros(100, DType::F32, &device).unwrap();
        let var = Var::from_tensor(&start).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut optim = AdamW::with_storage(
            vec![("big".into(), var.clone()), ("small".into(), small)],
            config.clone(),
            MomentStorage::Blockwise8Bit,
        )
        .unwrap();
        assert!(optim.moments(0).is_none());
        assert!(optim.moments(1).is_some());
        let lr = 1e-3;
        let small_grad = Tensor::ones(100, DType::F32, &device).unwrap();
        optim
            .step(&[Some(grad.clone()), Some(small_grad)], lr)
            .unwrap();

        let p0 = start.to_vec1::<f32>().unwrap();
        let g = grad.to_vec1::<f32>().unwrap();
        let p1 = var.as_tensor().to_vec1::<f32>().unwrap();
        let (b1, b2, eps, wd) = (config.beta1, config.beta2, config.eps, config.weight_decay);
        let mut worst = 0f64;
        for i in 0..n {
            let (p, g) = (f64::from(p0[i]), f64::from(g[i]));
            let m = (1.0 - b1) * g;
            let v = (1.0 - b2) * g * g;
            let c2 = (1.0 - b2).sqrt();
            let expected = (p - lr * c2 / (1.0 - b1) * m / (v.sqrt() + c2 * eps)) * (1.0 - lr * wd);
            worst = worst.max((f64::from(p1[i]) - expected).abs());
        }
        // f32 arithmetic on values of order 1: a few ulps.
        assert!(worst < 1e-6, "{worst}");

        let (m, v) = optim.dequantized_moments(0).unwrap().unwrap();
        let (m, v) = (m.to_vec1::<f32>().unwrap(), v.to_vec1::<f32>().unwrap());
        // The kernel's f32 arithmetic from zero moments: (1 − β1)·g and (1 − β2)·g·g.
        let (w1, w2) = (1.0 - b1 as f32, 1.0 - b2 as f32);
        let m_ref: Vec<f32> = g.iter().map(|g| w1 * g).collect();
        let v_ref: Vec<f32> = g.iter().map(|g| w2 * g * g).collect();
        for (got, want, signed) in [(&m, &m_ref, true), (&v, &v_ref, false)] {
            let q = BlockwiseQuantized::quantize(want, signed, BLOCK_SIZE_8BIT);
            assert_eq!(&q.dequantize(), got);
        }
        // The small parameter took torch's f32 step: p = −lr · sign-ish update of 1.
        let (_, small) = &optim.params()[1];
        let value = small.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((value + 1e-3).abs() < 1e-6, "{value}");
    }

    /// The 8-bit state survives a checkpoint: a restored optimizer takes the same next step.
    #[test]
    fn eight_bit_state_round_trips_through_state_tensors() {
        let device = Device::Cpu;
        let make =
            || Var::from_tensor(&Tensor::randn(0f32, 1., (80, 64), &device).unwrap()).unwrap();
        let (a, b) = (make(), make());
        b.set(a.as_tensor()).unwrap();
        let grads: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1e-2, (80, 64), &device).unwrap())
            .collect();
        let mut first = AdamW::with_storage(
            vec![("w".into(), a.clone())],
            AdamWConfig::default(),
            MomentStorage::Blockwise8Bit,
        )
        .unwrap();
        first.step(&[Some(grads[0].clone())], 1e-3).unwrap();
        first.step(&[Some(grads[1].clone())], 1e-3).unwrap();
        let tensors = first.state_tensors().unwrap();
        let mut names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "exp_avg_absmax.w",
                "exp_avg_q8.w",
                "exp_avg_sq_absmax.w",
                "exp_avg_sq_q8.w"
            ]
        );
        b.set(a.as_tensor()).unwrap();
        let mut restored = AdamW::from_state(
            vec![("w".into(), b.clone())],
            first.state(),
            tensors.clone(),
        )
        .unwrap();
        first.step(&[Some(grads[2].clone())], 1e-3).unwrap();
        restored.step(&[Some(grads[2].clone())], 1e-3).unwrap();
        let diff = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // A 32-bit state cannot read 8-bit tensors, and says which optimizer it expected.
        let mut state = first.state();
        state.moments = MomentStorage::Float32;
        let err = AdamW::from_state(vec![("w".into(), b)], state, tensors).unwrap_err();
        assert!(err.to_string().contains("exp_avg.w"), "{err}");
    }
}
