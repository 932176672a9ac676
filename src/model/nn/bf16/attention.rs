//! Multi-head attention with bf16 products for inference: as `nn/cpu/attention.rs` (blocks of
//! query rows, softmax in place in float32, never the whole score tensor), with q·kᵀ and p·v as
//! bf16 products. Each head's keys and values are packed once per image and shared by all its
//! query blocks.

use candle_core::{Device, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::super::cpu::{AttentionShape, QUERY_BLOCK_ROWS, exp_minus_max_in_place};
use super::super::product::Threads;
use super::super::values::with_slices;
use super::gemm::{Bf16Product, Lhs, PackedRhs, Rhs, convert_row};

/// `q` [B, N_q, H·D], `k` and `v` [B, N_kv, H·D] (float32) → [B, N_q, H·D], when the kernel
/// applies (CPU, f32, matching shapes); `None` otherwise.
pub(in crate::model::nn) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Option<Tensor>> {
    let Some(dims) = AttentionShape::of(q, k, v, heads)? else {
        return Ok(None);
    };
    let out = with_slices([q, k, v], |[q_data, k_data, v_data]| {
        attention_forward(q_data, k_data, v_data, &dims)
    })?;
    Tensor::from_vec(out, (dims.batch, dims.q_len, dims.inner()), &Device::Cpu).map(Some)
}

/// The attention of contiguous `q`, `k`, `v` in [`AttentionShape`]'s layouts.
pub(in crate::model::nn) fn attention_forward(
    q_data: &[f32],
    k_data: &[f32],
    v_data: &[f32],
    dims: &AttentionShape,
) -> Result<Vec<f32>> {
    let AttentionShape {
        batch,
        q_len,
        kv_len,
        heads,
        head_dim,
    } = *dims;
    let inner = dims.inner();
    let scale = dims.scale();
    let block_rows = QUERY_BLOCK_ROWS.min(q_len);
    let score_stride = dims.score_stride();
    let mut out = vec![0f32; batch * q_len * inner];
    for (image, out_image) in out.chunks_mut(q_len * inner).enumerate() {
        let q_image = &q_data[image * q_len * inner..][..q_len * inner];
        let k_image = &k_data[image * kv_len * inner..][..kv_len * inner];
        let v_image = &v_data[image * kv_len * inner..][..kv_len * inner];
        // Per head: kᵀ [D, N_kv] and v [N_kv, D], packed once for every query block.
        let packed = (0..heads)
            .into_par_iter()
            .map(|head| {
                let column = head * head_dim;
                let keys = Rhs::F32 {
                    data: &k_image[column..],
                    strides: (1, inner),
                };
                let values = Rhs::F32 {
                    data: &v_image[column..],
                    strides: (inner, 1),
                };
                Ok((
                    PackedRhs::pack(&keys, head_dim, kv_len, Threads::One)?,
                    PackedRhs::pack(&values, kv_len, head_dim, Threads::One)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        out_image
            .par_chunks_mut(block_rows * inner)
            .enumerate()
            .try_for_each_init(
                || (Vec::new(), Vec::new()),
                |(scores, probabilities), (block, out_block)| {
                    let rows = out_block.len() / inner;
                    let q_block = &q_image[block * block_rows * inner..][..rows * inner];
                    // Buffers reused block after block (fresh ones are page faults).
                    scores.resize(rows * score_stride, 0f32);
                    probabilities.resize(rows * score_stride, bf16::ZERO);
                    for (head, (keys, values)) in packed.iter().enumerate() {
                        let column = head * head_dim;
                        let qk = Bf16Product {
                            m: rows,
                            n: kv_len,
                            k: head_dim,
                            dst_row_stride: score_stride,
                        };
                        qk.run(
                            scores,
                            Lhs::F32 {
                                data: &q_block[column..],
                                strides: (inner, 1),
                            },
                            Rhs::Packed(keys),
                            scale,
                            false,
                            Threads::One,
                        )?;
                        let mut sums = Vec::with_capacity(rows);
                        for (row, dst) in scores
                            .chunks_exact_mut(score_stride)
                            .zip(probabilities.chunks_exact_mut(score_stride))
                        {
                            let (_, sum) = exp_minus_max_in_place(&mut row[..kv_len]);
                            convert_row(&mut dst[..kv_len], &row[..kv_len]);
                            sums.push(sum);
                        }
                        let pv = Bf16Product {
                            m: rows,
                            n: head_dim,
                            k: kv_len,
                            dst_row_stride: inner,
                        };
                        pv.run(
                            &mut out_block[column..],
                            Lhs::Bf16 {
                                data: probabilities,
                                row_stride: score_stride,
                            },
                            Rhs::Packed(values),
                            1.0,
                            false,
                            Threads::One,
                        )?;
                        for (row, sum) in out_block.chunks_exact_mut(inner).zip(&sums) {
                            for value in &mut row[column..column + head_dim] {
                                *value /= sum;
                            }
                        }
                    }
                    Ok::<(), candle_core::Error>(())
                },
            )?;
    }
    Ok(out)
}
