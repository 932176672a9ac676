//! Where a tracked tensor meets an untracked one (the edge of the graph: in LoRA training, the
//! frozen network's activations entering the first adapted block, the timestep embedding added
//! in every resnet, skip connections from before the first adapter): a sum or a concatenation
//! whose backward gives the untracked side nothing.
//!
//! candle's `add`, `broadcast_add` and `cat` differentiate every operand: the untracked one gets
//! a gradient buffer (output-sized for a broadcast) that nothing reads and that lives until
//! `backward()` returns. Here candle computes the value from the tracked side's detached values
//! (the same f32 operations), and a one-argument custom op grafts that value onto the tracked
//! side: its backward hands the gradient through (or the tracked side's slice of it), and the
//! graph keeps no reference to the untracked operand.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

/// `tracked + other` with `other` untracked and broadcastable to `tracked`'s shape (the result
/// has `tracked`'s shape), when the op applies (CPU, f32).
pub fn add(tracked: &Tensor, other: &Tensor) -> Result<Option<Tensor>> {
    if !applies(tracked, other) || other.broadcast_as(tracked.shape()).is_err() {
        return Ok(None);
    }
    let value = tracked.detach().broadcast_add(other)?;
    graft(tracked, value, Backward::Whole).map(Some)
}

/// `cat([tracked, other], dim)` (or `[other, tracked]` when `other_first`) with `other`
/// untracked, when the op applies (CPU, f32).
pub fn cat(
    tracked: &Tensor,
    other: &Tensor,
    other_first: bool,
    dim: usize,
) -> Result<Option<Tensor>> {
    if !applies(tracked, other) || dim >= tracked.rank() {
        return Ok(None);
    }
    let detached = tracked.detach();
    let (value, start) = if other_first {
        (Tensor::cat(&[other, &detached], dim)?, other.dim(dim)?)
    } else {
        (Tensor::cat(&[&detached, other], dim)?, 0)
    };
    let len = tracked.dim(dim)?;
    graft(tracked, value, Backward::Slice { dim, start, len }).map(Some)
}

fn applies(tracked: &Tensor, other: &Tensor) -> bool {
    [tracked, other]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// What the tracked side's gradient is, given the result's.
#[derive(Debug, Clone, Copy)]
enum Backward {
    /// All of it (a sum).
    Whole,
    /// Its slice along `dim` (a concatenation).
    Slice {
        dim: usize,
        start: usize,
        len: usize,
    },
}

/// `value` (computed from `tracked`'s values) as the result of an op on `tracked`.
fn graft(tracked: &Tensor, value: Tensor, backward: Backward) -> Result<Tensor> {
    let op = Graft {
        value: Mutex::new(Some(value)),
        backward,
    };
    tracked.apply_op1(op)
}

struct Graft {
    /// Taken by the (single) forward pass, so the graph does not keep it.
    value: Mutex<Option<Tensor>>,
    backward: Backward,
}

impl CustomOp1 for Graft {
    fn name(&self) -> &'static str {
        "graft-untracked"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("graft: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("graft: forward pass run twice".into()))?;
        let value = value.contiguous()?;
        let (storage, layout) = value.storage_and_layout();
        let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("graft: the value is not a contiguous CPU tensor");
        };
        let values = cpu.as_slice::<f32>()?[start..end].to_vec();
        Ok((CpuStorage::F32(values), layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(match self.backward {
            Backward::Whole => grad.clone(),
            Backward::Slice { dim, start, len } => grad.narrow(dim, start, len)?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::backprop::GradStore;
    use candle_core::{Device, TensorId, Var};

    fn values_of(shape: &[usize], seed: u64) -> Tensor {
        let count: usize = shape.iter().product();
        let data: Vec<f32> = (0..count)
            .map(|i| ((i as u64 * 2_654_435_761 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches the data")
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
    }

    /// Backward of Σ y·r: the gradients, and the ids that got one besides `r`'s own (which
    /// candle's product gives it: the loss's doing, not the op's).
    fn backward_of_weighted_sum(y: &Tensor, r: &Tensor) -> (GradStore, Vec<TensorId>) {
        let grads = (y * r)
            .and_then(|l| l.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        let ids = grads
            .get_ids()
            .filter(|id| **id != r.id())
            .copied()
            .collect();
        (grads, ids)
    }

    #[test]
    fn sums_and_concatenations_equal_candles_and_leave_the_untracked_side_no_gradient() {
        let x = Var::from_tensor(&values_of(&[2, 3, 4, 5], 1)).expect("x");
        // A permuted (strided) tracked side, a broadcast untracked side.
        let tracked = x.as_tensor().permute((0, 1, 3, 2)).expect("permute");
        let temb = values_of(&[2, 3, 1, 1], 2);
        let fused = add(&tracked, &temb).expect("add").expect("applies");
        let reference = tracked.broadcast_add(&temb).expect("candle");
        assert_eq!(flat(&fused), flat(&reference));
        let r = values_of(&[2, 3, 5, 4], 3);
        let (grads, ids) = backward_of_weighted_sum(&fused, &r);
        assert_eq!(ids, [x.as_tensor().id()]);
        let expected = r.permute((0, 1, 3, 2)).expect("permute");
        assert_eq!(flat(grads.get(x.as_tensor()).expect("dx")), flat(&expected));
        // candle keeps an output-sized gradient for the broadcast embedding.
        assert_eq!(backward_of_weighted_sum(&reference, &r).1.len(), 2);

        let skip = values_of(&[2, 2, 4, 5], 4);
        for other_first in [false, true] {
            let fused = cat(x.as_tensor(), &skip, other_first, 1)
                .expect("cat")
                .expect("applies");
            let parts = if other_first {
                [&skip, x.as_tensor()]
            } else {
                [x.as_tensor(), &skip]
            };
            let reference = Tensor::cat(&parts, 1).expect("candle");
            assert_eq!(flat(&fused), flat(&reference));
            let r = values_of(&[2, 5, 4, 5], 5);
            let (grads, ids) = backward_of_weighted_sum(&fused, &r);
            assert_eq!(ids, [x.as_tensor().id()]);
            let start = if other_first { 2 } else { 0 };
            let expected = r.narrow(1, start, 3).expect("narrow");
            assert_eq!(flat(grads.get(x.as_tensor()).expect("dx")), flat(&expected));
        }
    }
}
