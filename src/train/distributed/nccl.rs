//! The GPU's backend (the `cuda` feature): NCCL's all-reduce on the tensors' own device memory,
//! through cudarc's `nccl` bindings. Rank 0 creates NCCL's unique id and the rendezvous hands it
//! to the others; each rank then joins the communicator on its own GPU's stream.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};

use super::{DistributedError, WorldConfig};

/// The bytes of NCCL's unique id.
const ID_BYTES: usize = 128;

/// A fresh NCCL unique id (rank 0 makes it; the rendezvous carries it).
pub(super) fn unique_id() -> Result<Vec<u8>, DistributedError> {
    let id =
        Id::new().map_err(|e| DistributedError::Nccl(format!("creating the unique id: {e:?}")))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// This rank's NCCL communicator.
pub(super) struct NcclGroup {
    comm: Arc<Comm>,
}

impl NcclGroup {
    /// Joins the communicator of `id` on `device`'s stream.
    pub(super) fn new(
        world: &WorldConfig,
        device: &Device,
        id: &[u8],
    ) -> Result<Self, DistributedError> {
        let Device::Cuda(cuda) = device else {
            return Err(DistributedError::Nccl(
                "NCCL needs a CUDA device".to_string(),
            ));
        };
        if id.len() != ID_BYTES {
            return Err(DistributedError::Mismatch(format!(
                "rank 0 sent an NCCL id of {} bytes, not {ID_BYTES} (is rank 0 training on a GPU too?)",
                id.len()
            )));
        }
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (slot, &byte) in internal.iter_mut().zip(id) {
            *slot = byte as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            world.rank,
            world.world_size,
            Id::uninit(internal),
        )
        .map_err(|e| DistributedError::Nccl(format!("joining the communicator: {e:?}")))?;
        Ok(Self {
            comm: Arc::new(comm),
        })
    }

    /// The sum across the ranks of a flat float32 CUDA tensor.
    pub(super) fn all_reduce_sum(&self, tensor: &Tensor) -> Result<Tensor, DistributedError> {
        tensor
            .apply_op1_no_bwd(&AllReduce {
                comm: self.comm.clone(),
            })
            .map_err(|e| DistributedError::Nccl(e.to_string()))
    }
}

/// NCCL's sum as a candle op, so that it runs on the tensor's storage in place of a copy through
/// host memory.
struct AllReduce {
    comm: Arc<Comm>,
}

// SAFETY: the communicator is only used from the training thread that created it (the op is
// applied there and never stored); candle's op traits ask for Send + Sync regardless.
unsafe impl Send for AllReduce {}
// SAFETY: as above.
unsafe impl Sync for AllReduce {}

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL sums CUDA tensors; CPU processes sum over TCP")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let count = layout.shape().elem_count();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("NCCL sums contiguous tensors")
        };
        let device = storage.device().clone();
        let source = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let mut summed = device.alloc_zeros::<f32>(count)?;
        self.comm
            .all_reduce(&source, &mut summed, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((
            CudaStorage::wrap_cuda_slice(summed, device),
            layout.shape().clone(),
        ))
    }
}
