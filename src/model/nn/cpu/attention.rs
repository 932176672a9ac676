//! The fused CPU attention kernel for inference: multi-head scaled dot-product attention over
//! blocks of query rows (scores, softmax in place and the product with v, never the full score
//! tensor), with its exponential (`ip2p_kernels::softmax`). The blocks, shape checks and the
//! exponential are shared with the differentiable kernel of `grad_attention.rs`.

use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

use super::super::product::{Product, Threads};
use super::contiguous_slice;
pub(in crate::model::nn) use ip2p_kernels::softmax::{
    exp_minus_in_place, exp_minus_max_in_place, exp_non_positive,
};

/// Query rows per attention task: a multiple of the f32 GEMM micro-kernel's 48 rows, and enough
/// rows that packing k and v (done anew for each block) costs little next to the products.
/// Measured at 4096 keys on the 2-core AVX-512 machine: 48 rows 480 ms, 96 410 ms, 192 356 ms
/// for the UNet's 8×40 self-attention (batch 3); the 512-wide VAE attention needs ≥ 144 rows.
pub(in crate::model::nn) const QUERY_BLOCK_ROWS: usize = 192;

/// Multi-head scaled dot-product attention, `q` [B, N_q, H·D], `k` and `v` [B, N_kv, H·D] →
/// [B, N_q, H·D], when the fused kernel applies (CPU, f32).
///
/// Each task takes a block of query rows of one image and, head after head, computes the block
/// of scores (one GEMM reading q and k in place, no head split or transpose), its softmax in
/// place, and the product with v written straight into the merged-heads output. The full
/// [B, H, N_q, N_kv] score tensor (100 MB for a 32×32 latent) is never built.
pub(in crate::model::nn) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Option<Tensor>> {
    let Some(dims) = AttentionShape::of(q, k, v, heads)? else {
        return Ok(None);
    };
    let (batch, q_len, inner) = (dims.batch, dims.q_len, dims.inner());
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (q_storage, q_layout) = q.storage_and_layout();
    let (k_storage, k_layout) = k.storage_and_layout();
    let (v_storage, v_layout) = v.storage_and_layout();
    let q_data = contiguous_slice::<f32>(&q_storage, q_layout)?;
    let k_data = contiguous_slice::<f32>(&k_storage, k_layout)?;
    let v_data = contiguous_slice::<f32>(&v_storage, v_layout)?;
    let mut log_sum_exp = vec![0f32; batch * q_len * heads];
    let out = attention_forward(q_data, k_data, v_data, &dims, &mut log_sum_exp)?;
    drop((q_storage, k_storage, v_storage));
    Tensor::from_vec(out, (batch, q_len, inner), &Device::Cpu).map(Some)
}

/// The sizes of one attention: q [batch, q_len, heads·head_dim], k and v
/// [batch, kv_len, heads·head_dim].
#[derive(Debug, Clone, Copy)]
pub(in crate::model::nn) struct AttentionShape {
    pub(in crate::model::nn) batch: usize,
    pub(in crate::model::nn) q_len: usize,
    pub(in crate::model::nn) kv_len: usize,
    pub(in crate::model::nn) heads: usize,
    pub(in crate::model::nn) head_dim: usize,
}

impl AttentionShape {
    /// The sizes of `q`, `k`, `v` split in `heads` when the fused kernels handle them (CPU,
    /// f32, rank 3, matching non-empty shapes); `None` otherwise.
    pub(in crate::model::nn) fn of(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
    ) -> Result<Option<Self>> {
        let all_f32 = [q, k, v].iter().all(|t| t.dtype() == DType::F32);
        let on_cpu = [q, k, v].iter().all(|t| t.device().is_cpu());
        if !all_f32 || !on_cpu || [q, k, v].iter().any(|t| t.rank() != 3) || heads == 0 {
            return Ok(None);
        }
        let (batch, q_len, inner) = q.dims3()?;
        let (kv_batch, kv_len, kv_inner) = k.dims3()?;
        if v.dims() != k.dims()
            || kv_batch != batch
            || kv_inner != inner
            || !inner.is_multiple_of(heads)
            || q_len == 0
            || kv_len == 0
            || batch == 0
        {
            return Ok(None);
        }
        Ok(Some(Self {
            batch,
            q_len,
            kv_len,
            heads,
            head_dim: inner / heads,
        }))
    }

    /// heads·head_dim: the row length of q, k, v and the output.
    pub(in crate::model::nn) fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// The softmax scale 1/sqrt(head_dim).
    pub(in crate::model::nn) fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Distance between score rows in a block buffer: a multiple of 16 values but not of 256,
    /// as a power-of-two stride (4096 keys at 64² latents) maps every row of a block to the
    /// same cache sets.
    pub(in crate::model::nn) fn score_stride(&self) -> usize {
        match self.kv_len.next_multiple_of(16) {
            stride if stride % 256 == 0 => stride + 16,
            stride => stride,
        }
    }

    /// `rows` rows of one head's queries (or output gradients) times the head's keys (or
    /// values) transposed, [rows, head_dim] · [kv_len, head_dim]ᵀ, into rows of a score
    /// buffer ([`Self::score_stride`]); both operands are read in place in the merged-heads
    /// layout.
    pub(in crate::model::nn) fn scores_product(&self, rows: usize) -> Product {
        Product {
            m: rows,
            n: self.kv_len,
            k: self.head_dim,
            dst: (self.score_stride(), 1),
            lhs: (self.inner(), 1),
            rhs: (1, self.inner()),
        }
    }
}

/// The attention of contiguous `q`, `k`, `v` ([`AttentionShape`]'s layouts), merged heads
/// [batch, q_len, heads·head_dim]; writes each score row's log-sum-exp (of the scaled scores)
/// to `log_sum_exp` [batch, q_len, heads], which a backward pass needs to rebuild the softmax.
///
/// Each task takes a block of query rows of one image and, head after head, computes the block
/// of scores (one GEMM reading q and k in place, no head split or transpose), its softmax in
/// place, and the product with v written straight into the merged-heads output. The full
/// [B, H, N_q, N_kv] score tensor (100 MB for a 32×32 latent) is never built.
pub(in crate::model::nn) fn attention_forward(
    q_data: &[f32],
    k_data: &[f32],
    v_data: &[f32],
    dims: &AttentionShape,
    log_sum_exp: &mut [f32],
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
    if log_sum_exp.len() != batch * q_len * heads {
        candle_core::bail!("attention kernel: log-sum-exp buffer of the wrong size");
    }
    let mut out = vec![0f32; batch * q_len * inner];
    out.par_chunks_mut(q_len * inner)
        .zip(log_sum_exp.par_chunks_mut(q_len * heads))
        .enumerate()
        .try_for_each(|(image, (out_image, lse_image))| {
            let q_image = &q_data[image * q_len * inner..][..q_len * inner];
            let k_image = &k_data[image * kv_len * inner..][..kv_len * inner];
            let v_image = &v_data[image * kv_len * inner..][..kv_len * inner];
            out_image
                .par_chunks_mut(block_rows * inner)
                .zip(lse_image.par_chunks_mut(block_rows * heads))
                .enumerate()
                .try_for_each_init(Vec::new, |scores, (block, (out_block, lse_block))| {
                    let rows = out_block.len() / inner;
                    let q_block = &q_image[block * block_rows * inner..][..rows * inner];
                    // One buffer per worker, reused block after block (a fresh one is a
                    // megabyte of page faults each time).
                    scores.resize(rows * score_stride, 0f32);
                    for head in 0..heads {
                        let column = head * head_dim;
                        // scores = scale · q_h · k_hᵀ.
                        let qk = dims.scores_product(rows);
                        // One thread per product: the blocks run in parallel.
                        qk.run(
                            scores,
                            &q_block[column..],
                            &k_image[column..],
                            scale,
                            false,
                            Threads::One,
                        )?;
                        let mut sums = Vec::with_capacity(rows);
                        for (row, lse) in scores
                            .chunks_exact_mut(score_stride)
                            .zip(lse_block[head..].iter_mut().step_by(heads))
                        {
                            let (max, sum) = exp_minus_max_in_place(&mut row[..kv_len]);
                            *lse = max + sum.ln();
                            sums.push(sum);
                        }
                        // out_h = exp(scores) · v_h, then each row divided by its sum.
                        let pv = Product::new(
                            rows,
                            head_dim,
                            kv_len,
                            (inner, 1),
                            (score_stride, 1),
                            (inner, 1),
                        );
                        pv.run(
                            &mut out_block[column..],
                            scores,
                            &v_image[column..],
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
                })
        })?;
    Ok(out)
}
