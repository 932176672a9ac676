//! Summing the accumulated gradients across the ranks once per optimizer step, as DDP does: the
//! gradients are packed into flat float32 buckets of about [`BUCKET_BYTES`], each bucket summed
//! in one all-reduce and unpacked, so no more than two buckets of extra memory are held at once.
//!
//! A rank may hold no gradient for a parameter (none of its examples reached it, or it had no
//! examples in an epoch's short last batch): it sends zeros. Which parameters have a gradient is
//! summed first, with the small control values (the step's loss share), so that a parameter that
//! no rank touched stays without a gradient everywhere.

use candle_core::{DType, Tensor, Var};

use super::{DistributedError, ProcessGroup};

/// The size of one all-reduce (DDP's default bucket is 25 MB).
pub const BUCKET_BYTES: usize = 25 << 20;

fn tensor_error(e: candle_core::Error) -> DistributedError {
    DistributedError::Tensor(e.to_string())
}

/// Replaces every rank's `grads` (one slot per parameter of `params`) by their sum across the
/// ranks, and `controls` likewise (summed in the same first message as the presence flags).
pub fn all_reduce_gradients(
    group: &mut ProcessGroup,
    params: &[(String, Var)],
    grads: &mut [Option<Tensor>],
    controls: &mut [f32],
) -> Result<(), DistributedError> {
    if grads.len() != params.len() {
        return Err(DistributedError::Tensor(format!(
            "{} gradients for {} parameters",
            grads.len(),
            params.len()
        )));
    }
    let mut first: Vec<f32> = grads
        .iter()
        .map(|g| if g.is_some() { 1.0 } else { 0.0 })
        .collect();
    first.extend_from_slice(controls);
    group.all_reduce_host(&mut first)?;
    controls.copy_from_slice(&first[grads.len()..]);
    let present: Vec<bool> = first[..grads.len()].iter().map(|&c| c > 0.0).collect();

    // Buckets of consecutive present parameters, in the optimizer's order on every rank.
    let mut start = 0;
    while start < params.len() {
        if !present[start] {
            start += 1;
            continue;
        }
        let mut end = start;
        let mut bytes = 0;
        while end < params.len() && (end == start || bytes < BUCKET_BYTES) {
            if present[end] {
                bytes += params[end].1.elem_count() * 4;
            }
            end += 1;
        }
        reduce_bucket(
            group,
            &params[start..end],
            &mut grads[start..end],
            &present[start..end],
        )?;
        start = end;
    }
    Ok(())
}

/// One bucket: flatten, sum across ranks, unpack into the parameters' shapes.
fn reduce_bucket(
    group: &mut ProcessGroup,
    params: &[(String, Var)],
    grads: &mut [Option<Tensor>],
    present: &[bool],
) -> Result<(), DistributedError> {
    let mut parts = Vec::new();
    for (((_, var), grad), &present) in params.iter().zip(grads.iter()).zip(present) {
        if !present {
            continue;
        }
        let flat = match grad {
            Some(g) => g
                .to_dtype(DType::F32)
                .and_then(|g| g.flatten_all())
                .map_err(tensor_error)?,
            None => {
                Tensor::zeros(var.elem_count(), DType::F32, var.device()).map_err(tensor_error)?
            }
        };
        parts.push(flat);
    }
    let flat = Tensor::cat(&parts, 0).map_err(tensor_error)?;
    drop(parts);
    let summed = group.all_reduce_sum(&flat)?;
    drop(flat);
    let mut offset = 0;
    for (((_, var), slot), &present) in params.iter().zip(grads.iter_mut()).zip(present) {
        if !present {
            continue;
        }
        let count = var.elem_count();
        let dtype = slot.as_ref().map_or(var.dtype(), Tensor::dtype);
        let grad = summed
            .narrow(0, offset, count)
            .and_then(|g| g.reshape(var.dims()))
            .and_then(|g| g.to_dtype(dtype))
            // Its own storage: the bucket's buffer is freed once every slice is copied out.
            .and_then(|g| g.copy())
            .map_err(tensor_error)?;
        *slot = Some(grad);
        offset += count;
    }
    Ok(())
}
