//! Where a tracked tensor meets an untracked one (the edge of the graph: in LoRA training, the
//! frozen network's activations entering the first adapted block, the timestep embedding added
//! in every resnet, skip connections from before the first adapter): a sum or a concatenation
//! whose backward gives the untracked side nothing.
//!
//! candle's `add`, `broadcast_add` and `cat` differentiate every operand: the untracked one gets
//! a gradient buffer (output-sized for a broadcast) that nothing reads and that lives until
//! `backward()` returns. Here the untracked operand is captured by the op, released once the
//! forward pass has read it, and the backward pass only hands the gradient through (or narrows
//! it) to the tracked side. The values are candle's: the same f32 additions, the same copies.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

/// `tracked + other` with `other` untracked and broadcastable to `tracked`'s shape (the result
/// has `tracked`'s shape), when the op applies (CPU, f32).
pub fn add(tracked: &Tensor, other: &Tensor) -> Result<Option<Tensor>> {
    if !applies(tracked, other) {
        return Ok(None);
    }
    // The broadcast view (stride 0 on the broadcast dims) is read in place.
    let Ok(other) = other.broadcast_as(tracked.shape()) else {
        return Ok(None);
    };
    let op = AddUntracked {
        other: Mutex::new(Some(other)),
    };
    tracked.apply_op1(op).map(Some)
}

/// `cat([tracked, other], dim)` (or `[other, tracked]` when `other_first`) with `other`
/// untracked, when the op applies (CPU, f32, the same dims but `dim`).
pub fn cat(
    tracked: &Tensor,
    other: &Tensor,
    other_first: bool,
    dim: usize,
) -> Result<Option<Tensor>> {
    if !applies(tracked, other) || tracked.rank() != other.rank() || dim >= tracked.rank() {
        return Ok(None);
    }
    let same_elsewhere = tracked
        .dims()
        .iter()
        .zip(other.dims())
        .enumerate()
        .all(|(d, (a, b))| d == dim || a == b);
    if !same_elsewhere {
        return Ok(None);
    }
    let op = CatUntracked {
        other: Mutex::new(Some(other.clone())),
        other_dims: other.dims().to_vec(),
        other_first,
        dim,
    };
    tracked.apply_op1(op).map(Some)
}

fn applies(tracked: &Tensor, other: &Tensor) -> bool {
    [tracked, other]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// The untracked operand, taken out of the op by its (single) forward pass.
fn take_other(slot: &Mutex<Option<Tensor>>) -> Result<Tensor> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg("join op: poisoned lock".into()))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg("join op: forward pass run twice".into()))
}

/// The f32 values of `storage` under `layout` in row-major order.
fn values(storage: &Storage, layout: &Layout) -> Result<Vec<f32>> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("join op given a tensor on {:?}", storage.device());
    };
    cpu_values(cpu, layout)
}

fn cpu_values(storage: &CpuStorage, layout: &Layout) -> Result<Vec<f32>> {
    let data = storage.as_slice::<f32>()?;
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Ok(data[start..end].to_vec());
    }
    let mut out = Vec::with_capacity(layout.shape().elem_count());
    for_each_offset(layout, |offset| out.push(data[offset]));
    Ok(out)
}

/// Calls `f` with the storage offset of each element of `layout`, in row-major order.
fn for_each_offset(layout: &Layout, mut f: impl FnMut(usize)) {
    let dims = layout.dims();
    let stride = layout.stride();
    if dims.contains(&0) {
        return;
    }
    let mut index = vec![0usize; dims.len()];
    let mut offset = layout.start_offset();
    loop {
        f(offset);
        // Odometer step over the dims, last fastest.
        let mut d = dims.len();
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            offset += stride[d];
            if index[d] < dims[d] {
                break;
            }
            offset -= stride[d] * dims[d];
            index[d] = 0;
        }
    }
}

struct AddUntracked {
    other: Mutex<Option<Tensor>>,
}

impl CustomOp1 for AddUntracked {
    fn name(&self) -> &'static str {
        "add-untracked"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = cpu_values(storage, layout)?;
        let other = take_other(&self.other)?;
        let (other_storage, other_layout) = other.storage_and_layout();
        let Storage::Cpu(cpu) = &*other_storage else {
            candle_core::bail!("join op given a tensor on {:?}", other.device());
        };
        let data = cpu.as_slice::<f32>()?;
        match other_layout.contiguous_offsets() {
            Some((start, end)) => {
                for (v, o) in out.iter_mut().zip(&data[start..end]) {
                    *v += o;
                }
            }
            None => {
                let mut values = out.iter_mut();
                for_each_offset(other_layout, |offset| {
                    if let Some(v) = values.next() {
                        *v += data[offset];
                    }
                });
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.clone()))
    }
}

struct CatUntracked {
    other: Mutex<Option<Tensor>>,
    other_dims: Vec<usize>,
    other_first: bool,
    dim: usize,
}

impl CustomOp1 for CatUntracked {
    fn name(&self) -> &'static str {
        "cat-untracked"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let tracked = cpu_values(storage, layout)?;
        let other = take_other(&self.other)?;
        let (other_storage, other_layout) = other.storage_and_layout();
        let other_values = values(&other_storage, other_layout)?;
        let dims = layout.dims();
        let outer: usize = dims[..self.dim].iter().product();
        let inner: usize = dims[self.dim + 1..].iter().product();
        let tracked_run = dims[self.dim] * inner;
        let other_run = self.other_dims[self.dim] * inner;
        let mut out = Vec::with_capacity(tracked.len() + other_values.len());
        for i in 0..outer {
            let a = &tracked[i * tracked_run..][..tracked_run];
            let b = &other_values[i * other_run..][..other_run];
            if self.other_first {
                out.extend_from_slice(b);
                out.extend_from_slice(a);
            } else {
                out.extend_from_slice(a);
                out.extend_from_slice(b);
            }
        }
        let mut out_dims = dims.to_vec();
        out_dims[self.dim] += self.other_dims[self.dim];
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let len = arg.dim(self.dim)?;
        let start = if self.other_first {
            self.other_dims[self.dim]
        } else {
            0
        };
        Ok(Some(grad.narrow(self.dim, start, len)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

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
        let grads = (&fused * &r)
            .and_then(|l| l.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        // (r, untracked, gets one from candle's product: the loss's own doing.)
        let ids: Vec<_> = grads
            .get_ids()
            .filter(|id| **id != r.id())
            .copied()
            .collect();
        assert_eq!(ids, [x.as_tensor().id()]);
        let expected = r.permute((0, 1, 3, 2)).expect("permute");
        assert_eq!(flat(grads.get(x.as_tensor()).expect("dx")), flat(&expected));
        // candle keeps an output-sized gradient for the broadcast embedding.
        let candle_grads = (&reference * &r)
            .and_then(|l| l.sum_all())
            .and_then(|l| l.backward())
            .expect("backward");
        assert_eq!(
            candle_grads.get_ids().filter(|id| **id != r.id()).count(),
            2
        );

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
            let grads = (&fused * &r)
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("backward");
            let ids: Vec<_> = grads
                .get_ids()
                .filter(|id| **id != r.id())
                .copied()
                .collect();
            assert_eq!(ids, [x.as_tensor().id()]);
            let start = if other_first { 2 } else { 0 };
            let expected = r.narrow(1, start, 3).expect("narrow");
            assert_eq!(flat(grads.get(x.as_tensor()).expect("dx")), flat(&expected));
        }
    }
}
