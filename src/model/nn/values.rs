//! The values of CPU float32 tensors read in place: each tensor made contiguous and its
//! storage borrowed while a callback runs on the values (the kernels' entry points share this).

use candle_core::{Result, Tensor};

use super::cpu;

/// The values of three contiguous tensors, in a callback (the storages stay borrowed for it).
pub(super) fn with_slices<R>(
    tensors: [&Tensor; 3],
    f: impl FnOnce([&[f32]; 3]) -> Result<R>,
) -> Result<R> {
    let contiguous = [
        tensors[0].contiguous()?,
        tensors[1].contiguous()?,
        tensors[2].contiguous()?,
    ];
    let guards = contiguous.each_ref().map(|t| t.storage_and_layout());
    let slices = [
        cpu::contiguous_slice::<f32>(&guards[0].0, guards[0].1)?,
        cpu::contiguous_slice::<f32>(&guards[1].0, guards[1].1)?,
        cpu::contiguous_slice::<f32>(&guards[2].0, guards[2].1)?,
    ];
    f(slices)
}

/// The values of a tensor (made contiguous), in a callback.
pub(super) fn with_slice<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let tensor = tensor.contiguous()?;
    let (storage, layout) = tensor.storage_and_layout();
    f(cpu::contiguous_slice::<f32>(&storage, layout)?)
}
