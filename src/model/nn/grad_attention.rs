//! Differentiable CPU attention in the flash-attention-2 scheme: the forward pass is `cpu.rs`'s
//! blocked kernel, which also keeps each score row's log-sum-exp (L); the backward pass
//! rebuilds the softmax block by block of query rows from it, never holding the whole
//! [B, H, N_q, N_kv] score tensor. Per block of rows, for one head, with dO the output's
//! gradient and Δ_i = Σ_d dO_id · O_id:
//!
//! - P = exp(scale · Q Kᵀ − L),
//! - dV += Pᵀ dO,
//! - dS = P ∘ (dO Vᵀ − Δ),
//! - dQ = scale · dS K, dK += scale · dSᵀ Q.
//!
//! Tasks are (image, head) pairs. Gradients are computed only for the inputs tracked when the
//! forward pass ran (e.g. no dK, dV for a frozen text projection in cross-attention).

use std::sync::Mutex;

use candle_core::{CpuStorage, Device, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{self, AttentionShape, QUERY_BLOCK_ROWS};
use super::fused_op::{Fused, FusedKernel, Grads3};
use super::product::{Product, Threads};

/// Multi-head attention of `q` [B, N_q, H·D] over `k`, `v` [B, N_kv, H·D] as a differentiable
/// op, when the kernel applies (CPU, f32).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    let Some(dims) = AttentionShape::of(q, k, v, heads)? else {
        return Ok(None);
    };
    let op = AttentionOp {
        dims,
        q_tracked: q.track_op(),
        k_tracked: k.track_op(),
        v_tracked: v.track_op(),
        log_sum_exp: Mutex::new(Vec::new()),
    };
    let out = q
        .contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, Fused(op))?;
    Ok(Some(out))
}

struct AttentionOp {
    dims: AttentionShape,
    q_tracked: bool,
    k_tracked: bool,
    v_tracked: bool,
    /// Each score row's log-sum-exp [B, N_q, H], written by the forward pass.
    log_sum_exp: Mutex<Vec<f32>>,
}

/// One (image, head)'s gradients: dQ [N_q, D], dK and dV [N_kv, D] (empty when not needed).
struct HeadGrads {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl FusedKernel<3> for AttentionOp {
    type Grads = Grads3;

    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn forward(&self, [q, k, v]: [&[f32]; 3], _: &Shape) -> Result<(CpuStorage, Shape)> {
        let d = &self.dims;
        let mut log_sum_exp = vec![0f32; d.batch * d.q_len * d.heads];
        let out = cpu::attention_forward(q, k, v, d, &mut log_sum_exp)?;
        *self
            .log_sum_exp
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned lock".into()))? = log_sum_exp;
        Ok((
            CpuStorage::F32(out),
            Shape::from((d.batch, d.q_len, d.inner())),
        ))
    }

    fn backward(&self, [q, k, v]: [&Tensor; 3], res: &Tensor, grad: &Tensor) -> Result<Grads3> {
        let d = self.dims;
        let log_sum_exp = self
            .log_sum_exp
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention: poisoned lock".into()))?;
        if log_sum_exp.len() != d.batch * d.q_len * d.heads {
            candle_core::bail!("attention backward without its forward pass");
        }
        let grad = grad.contiguous()?;
        let tensors = [q, k, v, res, &grad];
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let slices = guards
            .iter()
            .map(|(storage, layout)| cpu::contiguous_slice::<f32>(storage, layout))
            .collect::<Result<Vec<_>>>()?;
        let [q_data, k_data, v_data, out_data, out_grad] = slices[..] else {
            unreachable!("five tensors");
        };
        let inputs = BackwardInputs {
            q: q_data,
            k: k_data,
            v: v_data,
            out: out_data,
            out_grad,
            log_sum_exp: &log_sum_exp,
        };
        let tasks = d.batch * d.heads;
        let threads = if tasks >= super::product::thread_count() {
            Threads::One
        } else {
            Threads::All
        };
        let head_grads = (0..tasks)
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(probs, prob_grads), task| {
                    self.head_backward(&inputs, task, probs, prob_grads, threads)
                },
            )
            .collect::<Result<Vec<_>>>()?;
        drop(guards);

        let merge = |len: usize, pick: fn(&HeadGrads) -> &[f32]| -> Result<Tensor> {
            let inner = d.inner();
            let mut merged = vec![0f32; d.batch * len * inner];
            merged
                .par_chunks_mut(len * inner)
                .enumerate()
                .for_each(|(image, dst)| {
                    for head in 0..d.heads {
                        let src = pick(&head_grads[image * d.heads + head]);
                        let column = head * d.head_dim;
                        for (dst_row, src_row) in dst
                            .chunks_exact_mut(inner)
                            .zip(src.chunks_exact(d.head_dim))
                        {
                            dst_row[column..column + d.head_dim].copy_from_slice(src_row);
                        }
                    }
                });
            Tensor::from_vec(merged, (d.batch, len, inner), &Device::Cpu)
        };
        Ok((
            self.q_tracked
                .then(|| merge(d.q_len, |g| &g.q))
                .transpose()?,
            self.k_tracked
                .then(|| merge(d.kv_len, |g| &g.k))
                .transpose()?,
            self.v_tracked
                .then(|| merge(d.kv_len, |g| &g.v))
                .transpose()?,
        ))
    }
}

/// The backward pass's inputs, contiguous: q, k, v, the output and its gradient in the forward
/// pass's layouts, and the saved log-sum-exp.
struct BackwardInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    out_grad: &'a [f32],
    log_sum_exp: &'a [f32],
}

impl AttentionOp {
    /// The gradients of one head of one image, block of query rows after block.
    fn head_backward(
        &self,
        inputs: &BackwardInputs,
        task: usize,
        probs: &mut Vec<f32>,
        prob_grads: &mut Vec<f32>,
        threads: Threads,
    ) -> Result<HeadGrads> {
        let d = &self.dims;
        let (image, head) = (task / d.heads, task % d.heads);
        let (inner, head_dim, kv_len) = (d.inner(), d.head_dim, d.kv_len);
        let column = head * head_dim;
        let scale = d.scale();
        let stride = d.score_stride();
        let q_image = &inputs.q[image * d.q_len * inner..][..d.q_len * inner];
        let out_image = &inputs.out[image * d.q_len * inner..][..d.q_len * inner];
        let dout_image = &inputs.out_grad[image * d.q_len * inner..][..d.q_len * inner];
        let k_image = &inputs.k[image * kv_len * inner..][..kv_len * inner];
        let v_image = &inputs.v[image * kv_len * inner..][..kv_len * inner];
        let lse = |row: usize| inputs.log_sum_exp[(image * d.q_len + row) * d.heads + head];
        let need_scores_grad = self.q_tracked || self.k_tracked;

        let mut grads = HeadGrads {
            q: vec![
                0f32;
                if self.q_tracked {
                    d.q_len * head_dim
                } else {
                    0
                }
            ],
            k: vec![0f32; if self.k_tracked { kv_len * head_dim } else { 0 }],
            v: vec![0f32; if self.v_tracked { kv_len * head_dim } else { 0 }],
        };
        let block_rows = QUERY_BLOCK_ROWS.min(d.q_len);
        let mut first = 0;
        while first < d.q_len {
            let rows = block_rows.min(d.q_len - first);
            let q_block = &q_image[first * inner + column..];
            let dout_block = &dout_image[first * inner + column..];
            probs.resize(rows * stride, 0f32);
            // The scores as the forward pass computed them (same product), then P.
            let scores = d.scores_product(rows);
            scores.run(probs, q_block, &k_image[column..], scale, false, threads)?;
            for (r, row) in probs.chunks_exact_mut(stride).enumerate() {
                cpu::exp_minus_in_place(&mut row[..kv_len], lse(first + r));
            }
            // [kv, rows] views of the block buffers, for the products with their transposes.
            let transposed = Product::new(
                kv_len,
                head_dim,
                rows,
                (head_dim, 1),
                (1, stride),
                (inner, 1),
            );
            if self.v_tracked {
                transposed.run(&mut grads.v, probs, dout_block, 1.0, true, threads)?;
            }
            if !need_scores_grad {
                first += rows;
                continue;
            }
            prob_grads.resize(rows * stride, 0f32);
            let dout_v = d.scores_product(rows);
            dout_v.run(
                prob_grads,
                dout_block,
                &v_image[column..],
                1.0,
                false,
                threads,
            )?;
            for (r, (dp_row, p_row)) in prob_grads
                .chunks_exact_mut(stride)
                .zip(probs.chunks_exact(stride))
                .enumerate()
            {
                let row = (first + r) * inner + column;
                let delta: f32 = dout_image[row..row + head_dim]
                    .iter()
                    .zip(&out_image[row..row + head_dim])
                    .map(|(g, o)| g * o)
                    .sum();
                for (dp, &p) in dp_row[..kv_len].iter_mut().zip(&p_row[..kv_len]) {
                    *dp = p * (*dp - delta);
                }
            }
            if self.q_tracked {
                let query_grad = Product::new(
                    rows,
                    head_dim,
                    kv_len,
                    (head_dim, 1),
                    (stride, 1),
                    (inner, 1),
                );
                let dst = &mut grads.q[first * head_dim..][..rows * head_dim];
                query_grad.run(dst, prob_grads, &k_image[column..], scale, false, threads)?;
            }
            if self.k_tracked {
                transposed.run(&mut grads.k, prob_grads, q_block, scale, true, threads)?;
            }
            first += rows;
        }
        Ok(grads)
    }
}
