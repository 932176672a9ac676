//! Differentiable CPU normalisations: group norm (+ SiLU), as the forward kernel of `cpu.rs`,
//! and layer norm over the last dimension, each a candle custom op with a fused backward pass
//! (two passes over each group or row: the sums, then the input gradient) instead of the
//! backward of candle's eight or so composed ops.
//!
//! With x̂ = (x − mean)·inv_std, y = x̂·w + b and g = dL/dy (times SiLU′(y) when fused):
//! dL/db = Σ g, dL/dw = Σ g·x̂ (per channel or feature), and
//! dL/dx = inv_std · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)), the means over the group or row.
//! Gradients are computed only for the tensors tracked when the forward pass ran.

use candle_core::{CpuStorage, DType, Device, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, GroupNormShape};
use super::fused_op::{Fused, FusedKernel, Grads3};
use super::values::{with_slice, with_slices};

/// Group normalisation of `x` [B, C, ...] (+ SiLU when `silu`) as a differentiable op, when the
/// kernel applies (CPU, f32).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    let Some(shape) = GroupNormShape::of(x, weight, bias, groups, eps) else {
        return Ok(None);
    };
    let op = GroupNormOp {
        shape,
        silu,
        tracked: Tracked::of(x, weight, bias),
    };
    apply_norm(op, x, weight, bias).map(Some)
}

/// Layer normalisation of `x` over its last dimension, `· weight + bias` ([features] each), as
/// a differentiable op, when the kernel applies (CPU, f32).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Option<Tensor>> {
    if !applies(&[x, weight, bias]) || x.rank() == 0 || x.elem_count() == 0 {
        return Ok(None);
    }
    let features = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [features] || bias.dims() != [features] {
        return Ok(None);
    }
    let op = LayerNormOp {
        features,
        eps,
        tracked: Tracked::of(x, weight, bias),
    };
    apply_norm(op, x, weight, bias).map(Some)
}

/// Runs a normalisation kernel on contiguous copies of its arguments.
fn apply_norm<K>(op: K, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor>
where
    K: FusedKernel<3, Grads = Grads3> + Send + Sync + 'static,
{
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Fused(op))
}

fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// Which of (input, weight, bias) needed a gradient when the forward pass ran.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    input: bool,
    weight: bool,
    bias: bool,
}

impl Tracked {
    fn of(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Self {
        Self {
            input: x.track_op(),
            weight: weight.track_op(),
            bias: bias.track_op(),
        }
    }

    /// The gradients as tensors shaped like (input, weight, bias), `None` where not tracked.
    fn into_tensors(
        self,
        input_grad: Vec<f32>,
        weight_grad: Vec<f32>,
        bias_grad: Vec<f32>,
        input_shape: &Shape,
    ) -> Result<Grads3> {
        let vector = |data: Vec<f32>| {
            let len = data.len();
            Tensor::from_vec(data, len, &Device::Cpu)
        };
        Ok((
            self.input
                .then(|| Tensor::from_vec(input_grad, input_shape, &Device::Cpu))
                .transpose()?,
            self.weight.then(|| vector(weight_grad)).transpose()?,
            self.bias.then(|| vector(bias_grad)).transpose()?,
        ))
    }
}

/// d silu(y) / dy = σ(y) · (1 + y · (1 − σ(y))), with the forward pass's σ.
#[inline(always)]
fn silu_derivative(y: f32) -> f32 {
    let sigmoid = ip2p_kernels::norm::sigmoid(y);
    sigmoid * (1.0 + y * (1.0 - sigmoid))
}

struct GroupNormOp {
    shape: GroupNormShape,
    silu: bool,
    tracked: Tracked,
}

impl FusedKernel<3> for GroupNormOp {
    type Grads = Grads3;

    fn name(&self) -> &'static str {
        if self.silu {
            "fused-group-norm-silu"
        } else {
            "fused-group-norm"
        }
    }

    fn forward(&self, args: [&[f32]; 3], x_shape: &Shape) -> Result<(CpuStorage, Shape)> {
        let [x, weight, bias] = args;
        let out = cpu::group_norm_forward(x, weight, bias, &self.shape, self.silu);
        Ok((CpuStorage::F32(out), x_shape.clone()))
    }

    fn backward(&self, args: [&Tensor; 3], _: &Tensor, grad: &Tensor) -> Result<Grads3> {
        let [x, weight, bias] = args;
        let s = self.shape;
        let (cpg, group_len) = (s.channels_per_group(), s.group_len());
        let images = x.elem_count() / (s.channels * s.spatial);
        // Per (image, channel): Σ g and Σ g·x̂, summed over images at the end.
        let mut bias_parts = vec![0f32; images * s.channels];
        let mut weight_parts = vec![0f32; images * s.channels];
        let input_grad = with_slices([x, weight, bias], |[x_data, w_data, b_data]| {
            with_slice(grad, |dy| {
                // Holds g after the first pass, then the input gradient.
                let mut dx = vec![0f32; x_data.len()];
                dx.par_chunks_mut(group_len)
                    .zip(x_data.par_chunks(group_len))
                    .zip(dy.par_chunks(group_len))
                    .zip(bias_parts.par_chunks_mut(cpg))
                    .zip(weight_parts.par_chunks_mut(cpg))
                    .enumerate()
                    .for_each(|(index, ((((dx, x), dy), bias_part), weight_part))| {
                        let group = index % s.groups;
                        let (mean, inv_std) = cpu::mean_and_inv_std(x, s.eps);
                        let inv_std_f32 = inv_std as f32;
                        let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f64, 0f64);
                        for offset in 0..cpg {
                            let channel = group * cpg + offset;
                            let w = w_data[channel];
                            let scale = (inv_std * f64::from(w)) as f32;
                            let shift = b_data[channel];
                            let rows = offset * s.spatial..(offset + 1) * s.spatial;
                            let (mut sum_g, mut sum_g_xhat) = (0f64, 0f64);
                            for ((g, &x), &dy) in dx[rows.clone()]
                                .iter_mut()
                                .zip(&x[rows.clone()])
                                .zip(&dy[rows])
                            {
                                *g = if self.silu {
                                    dy * silu_derivative((x - mean) * scale + shift)
                                } else {
                                    dy
                                };
                                let xhat = (x - mean) * inv_std_f32;
                                sum_g += f64::from(*g);
                                sum_g_xhat += f64::from(*g * xhat);
                            }
                            bias_part[offset] = sum_g as f32;
                            weight_part[offset] = sum_g_xhat as f32;
                            sum_dxhat += f64::from(w) * sum_g;
                            sum_dxhat_xhat += f64::from(w) * sum_g_xhat;
                        }
                        if !self.tracked.input {
                            return;
                        }
                        let n = group_len as f64;
                        let (mean_dxhat, mean_dxhat_xhat) =
                            ((sum_dxhat / n) as f32, (sum_dxhat_xhat / n) as f32);
                        for offset in 0..cpg {
                            let w = w_data[group * cpg + offset];
                            let rows = offset * s.spatial..(offset + 1) * s.spatial;
                            for (g, &x) in dx[rows.clone()].iter_mut().zip(&x[rows]) {
                                let xhat = (x - mean) * inv_std_f32;
                                *g = inv_std_f32 * (*g * w - mean_dxhat - xhat * mean_dxhat_xhat);
                            }
                        }
                    });
                Ok(dx)
            })
        })?;
        let per_channel = |parts: &[f32]| -> Vec<f32> {
            (0..s.channels)
                .map(|c| {
                    (0..images)
                        .map(|i| f64::from(parts[i * s.channels + c]))
                        .sum::<f64>() as f32
                })
                .collect()
        };
        self.tracked.into_tensors(
            input_grad,
            per_channel(&weight_parts),
            per_channel(&bias_parts),
            x.shape(),
        )
    }
}

/// Rows of a layer norm per task (each task sums its weight and bias gradients apart).
const LAYER_NORM_TASK_ROWS: usize = 64;

struct LayerNormOp {
    features: usize,
    eps: f32,
    tracked: Tracked,
}

impl LayerNormOp {
    /// Mean (f32) and 1/sqrt(variance + eps) of one row, as candle's composed layer norm: the
    /// variance is the mean of squared deviations, eps added in f32.
    fn row_stats(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f64;
        let mean = (cpu::sum_f64(row, |v| v) / n) as f32;
        let variance = (cpu::sum_f64(row, |v| {
            let d = v - mean;
            d * d
        }) / n) as f32;
        (mean, 1.0 / (variance + self.eps).sqrt())
    }
}

impl FusedKernel<3> for LayerNormOp {
    type Grads = Grads3;

    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn forward(&self, args: [&[f32]; 3], x_shape: &Shape) -> Result<(CpuStorage, Shape)> {
        let [x, weight, bias] = args;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(self.features)
            .zip(x.par_chunks(self.features))
            .for_each(|(dst, src)| {
                let (mean, inv_std) = self.row_stats(src);
                for (((d, &v), &w), &b) in dst.iter_mut().zip(src).zip(weight).zip(bias) {
                    *d = (v - mean) * inv_std * w + b;
                }
            });
        Ok((CpuStorage::F32(out), x_shape.clone()))
    }

    fn backward(&self, args: [&Tensor; 3], _: &Tensor, grad: &Tensor) -> Result<Grads3> {
        let [x, weight, bias] = args;
        let d = self.features;
        let task_len = LAYER_NORM_TASK_ROWS * d;
        let (input_grad, (weight_grad, bias_grad)) =
            with_slices([x, weight, bias], |[x_data, w_data, _]| {
                with_slice(grad, |dy| {
                    let mut dx = vec![0f32; x_data.len()];
                    let zeros = || (vec![0f64; d], vec![0f64; d]);
                    let sums = dx
                        .par_chunks_mut(task_len)
                        .zip(x_data.par_chunks(task_len))
                        .zip(dy.par_chunks(task_len))
                        .map(|((dx, x), dy)| {
                            let (mut weight_sum, mut bias_sum) = zeros();
                            for ((dx, x), dy) in dx
                                .chunks_exact_mut(d)
                                .zip(x.chunks_exact(d))
                                .zip(dy.chunks_exact(d))
                            {
                                let (mean, inv_std) = self.row_stats(x);
                                let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f64, 0f64);
                                for i in 0..d {
                                    let xhat = (x[i] - mean) * inv_std;
                                    let dxhat = dy[i] * w_data[i];
                                    weight_sum[i] += f64::from(dy[i] * xhat);
                                    bias_sum[i] += f64::from(dy[i]);
                                    sum_dxhat += f64::from(dxhat);
                                    sum_dxhat_xhat += f64::from(dxhat * xhat);
                                }
                                if !self.tracked.input {
                                    continue;
                                }
                                let n = d as f64;
                                let mean_dxhat = (sum_dxhat / n) as f32;
                                let mean_dxhat_xhat = (sum_dxhat_xhat / n) as f32;
                                for i in 0..d {
                                    let xhat = (x[i] - mean) * inv_std;
                                    dx[i] = inv_std
                                        * (dy[i] * w_data[i] - mean_dxhat - xhat * mean_dxhat_xhat);
                                }
                            }
                            (weight_sum, bias_sum)
                        })
                        .reduce(zeros, |(mut wa, mut ba), (wb, bb)| {
                            wa.iter_mut().zip(&wb).for_each(|(a, b)| *a += b);
                            ba.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
                            (wa, ba)
                        });
                    Ok((dx, sums))
                })
            })?;
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect();
        self.tracked.into_tensors(
            input_grad,
            to_f32(weight_grad),
            to_f32(bias_grad),
            x.shape(),
        )
    }
}
