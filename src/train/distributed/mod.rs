//! Data-parallel training across processes, as `accelerate launch --multi_gpu` runs diffusers'
//! script: what a process knows of the run it belongs to ([`WorldConfig`], read from the
//! variables torchrun, SLURM scripts and this program's own launcher set: `RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), the rendezvous that connects the processes
//! ([`rendezvous`]: rank 0 listens on `MASTER_ADDR:MASTER_PORT`), and the [`ProcessGroup`] whose
//! sums keep every rank's weights the same: gradients are summed once per optimizer step in
//! buckets of about 25 MB ([`gradients`]).
//!
//! Two backends behind one interface: on the CPU, a ring all-reduce over TCP ([`ring`]); on
//! CUDA, NCCL (the `cuda` feature; the rendezvous carries NCCL's unique id). Every failure of a
//! peer (its connection closed, or silent for longer than the timeout) is a
//! [`DistributedError`] naming the rank, never a hang.

pub mod gradients;
#[cfg(feature = "cuda")]
mod nccl;
pub mod rendezvous;
pub mod ring;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use candle_core::{Device, Tensor};

use ring::TcpRing;

/// The variable holding a process's global rank (0-based).
pub const RANK_VAR: &str = "RANK";
/// The variable holding the number of processes in the run.
pub const WORLD_SIZE_VAR: &str = "WORLD_SIZE";
/// The variable holding a process's rank on its machine.
pub const LOCAL_RANK_VAR: &str = "LOCAL_RANK";
/// The variable holding the address rank 0 listens on.
pub const MASTER_ADDR_VAR: &str = "MASTER_ADDR";
/// The variable holding the port rank 0 listens on.
pub const MASTER_PORT_VAR: &str = "MASTER_PORT";
/// The rendezvous port when `MASTER_PORT` is not set (torch's and accelerate's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// How long a rank waits for another before the run stops (`--ddp_timeout`; 30 minutes, as
/// torch.distributed's default): long enough for rank 0's checkpoints and validation edits.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);
/// The largest world accepted (a typo guard).
pub const MAX_WORLD_SIZE: usize = 1024;

/// Why the processes of a run could not connect, or a sum across them failed.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// A launcher variable is missing or not a number in range.
    #[error("{var}={value:?}: {reason}")]
    Variable {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is expected.
        reason: String,
    },
    /// Rank 0 could not listen on the rendezvous address.
    #[error(
        "cannot listen on {addr} for the other processes: {source} (another run or program uses the port? pass --main_process_port with a free one)"
    )]
    Listen {
        /// The address.
        addr: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The rendezvous address does not resolve.
    #[error("MASTER_ADDR {addr}: {reason}")]
    Address {
        /// The address given.
        addr: String,
        /// Why it is unusable.
        reason: String,
    },
    /// Ranks missing at the rendezvous when the timeout ran out.
    #[error(
        "rank{} {} did not join the run at {addr} within {seconds} s (started? the same --num_processes/--num_machines on every machine?)",
        if missing.len() == 1 { "" } else { "s" },
        missing.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
    )]
    MissingRanks {
        /// The ranks that never connected.
        missing: Vec<usize>,
        /// The rendezvous address.
        addr: String,
        /// The timeout.
        seconds: u64,
    },
    /// Rank 0 never answered.
    #[error(
        "could not reach rank 0 at {addr} within {seconds} s: {reason} (is rank 0 running, and is --main_process_ip/MASTER_ADDR an address of its machine?)"
    )]
    MasterUnreachable {
        /// The rendezvous address.
        addr: String,
        /// The timeout.
        seconds: u64,
        /// The last error.
        reason: String,
    },
    /// Two processes disagree about the run (world size, a rank twice, a version).
    #[error("the processes of this run disagree: {0}")]
    Mismatch(String),
    /// A peer closed its connection: it stopped or crashed.
    #[error(
        "rank {rank} stopped or crashed ({what}); this rank stops too (resume with --resume_from_checkpoint latest)"
    )]
    PeerClosed {
        /// The peer's rank.
        rank: usize,
        /// What failed.
        what: String,
    },
    /// A peer sent nothing for longer than the timeout.
    #[error(
        "rank {rank} sent nothing for {seconds} s (hung, or much slower than this one); this rank stops (raise --ddp_timeout if that rank is busy on purpose)"
    )]
    PeerTimeout {
        /// The peer's rank.
        rank: usize,
        /// The timeout.
        seconds: u64,
    },
    /// The run was asked to stop while it waited for the others at the rendezvous.
    #[error("stopped while waiting for the other processes at {addr}")]
    Cancelled {
        /// The rendezvous address.
        addr: String,
    },
    /// A sum was asked of a tensor it cannot take.
    #[error("summing across processes: {0}")]
    Tensor(String),
    /// NCCL failed (CUDA).
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// One process's place in a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldConfig {
    /// This process's rank, `0..world_size`; rank 0 logs, checkpoints and writes the model.
    pub rank: usize,
    /// Processes in the run (at least 2; one process needs no [`WorldConfig`]).
    pub world_size: usize,
    /// This process's rank on its machine (which GPU it takes).
    pub local_rank: usize,
    /// Where rank 0 listens (`MASTER_ADDR`, default 127.0.0.1).
    pub master_addr: String,
    /// Its port (`MASTER_PORT`, default 29500).
    pub master_port: u16,
    /// How long to wait for a peer before stopping.
    pub timeout: Duration,
}

impl WorldConfig {
    /// The run this process belongs to, from the launcher's variables: `None` when `WORLD_SIZE`
    /// is unset or 1 (a single process), an error when they are inconsistent.
    pub fn from_env(timeout: Duration) -> Result<Option<Self>, DistributedError> {
        Self::from_vars(|name| std::env::var(name).ok(), timeout)
    }

    /// [`WorldConfig::from_env`] over any source of variables.
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        timeout: Duration,
    ) -> Result<Option<Self>, DistributedError> {
        let number = |name: &'static str, max: usize| -> Result<Option<usize>, DistributedError> {
            let Some(text) = var(name) else {
                return Ok(None);
            };
            match text.trim().parse::<usize>() {
                Ok(n) if n <= max => Ok(Some(n)),
                _ => Err(DistributedError::Variable {
                    var: name,
                    value: text,
                    reason: format!("must be a whole number from 0 to {max}"),
                }),
            }
        };
        let Some(world_size) = number(WORLD_SIZE_VAR, MAX_WORLD_SIZE)? else {
            return Ok(None);
        };
        if world_size <= 1 {
            return Ok(None);
        }
        let rank = number(RANK_VAR, world_size - 1)
            .map_err(|_| DistributedError::Variable {
                var: RANK_VAR,
                value: var(RANK_VAR).unwrap_or_default(),
                reason: format!(
                    "must be a rank from 0 to {} (WORLD_SIZE {world_size})",
                    world_size - 1
                ),
            })?
            .ok_or_else(|| DistributedError::Variable {
                var: RANK_VAR,
                value: String::new(),
                reason: format!("must be set when WORLD_SIZE is {world_size}"),
            })?;
        let local_rank = number(LOCAL_RANK_VAR, world_size - 1)?.unwrap_or(rank);
        let master_addr = var(MASTER_ADDR_VAR)
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "127.0.0.1".to_string());
        let master_port = match var(MASTER_PORT_VAR) {
            None => DEFAULT_MASTER_PORT,
            Some(text) => match text.trim().parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => {
                    return Err(DistributedError::Variable {
                        var: MASTER_PORT_VAR,
                        value: text,
                        reason: "must be a port from 1 to 65535".into(),
                    });
                }
            },
        };
        Ok(Some(Self {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            timeout,
        }))
    }

    /// `MASTER_ADDR:MASTER_PORT` as text (for messages).
    pub fn master(&self) -> String {
        if self.master_addr.contains(':') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }

    /// The rendezvous address, resolved.
    pub fn master_socket_addr(&self) -> Result<SocketAddr, DistributedError> {
        use std::net::ToSocketAddrs;
        let text = self.master();
        let mut addrs = text
            .to_socket_addrs()
            .map_err(|e| DistributedError::Address {
                addr: self.master_addr.clone(),
                reason: e.to_string(),
            })?;
        addrs.next().ok_or_else(|| DistributedError::Address {
            addr: self.master_addr.clone(),
            reason: "resolves to no address".into(),
        })
    }
}

/// The processes of a run, connected: sums across all of them, on the backend of the device.
pub struct ProcessGroup {
    rank: usize,
    world_size: usize,
    /// The CPU's ring (also carries the small control sums on CUDA).
    ring: TcpRing,
    #[cfg(feature = "cuda")]
    nccl: Option<nccl::NcclGroup>,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("backend", &self.backend_name())
            .finish()
    }
}

impl ProcessGroup {
    /// Meets the other ranks at the rendezvous and connects the backend: NCCL when `device` is
    /// a CUDA GPU, the TCP ring otherwise. Setting `cancel` ends the wait for the others.
    pub fn connect(
        world: &WorldConfig,
        device: &Device,
        cancel: &AtomicBool,
    ) -> Result<Self, DistributedError> {
        #[cfg(feature = "cuda")]
        let nccl_id = if device.is_cuda() && world.rank == 0 {
            Some(nccl::unique_id()?)
        } else {
            None
        };
        #[cfg(not(feature = "cuda"))]
        let nccl_id: Option<Vec<u8>> = {
            let _ = device;
            None
        };
        let met = rendezvous::meet(world, nccl_id.as_deref(), cancel)?;
        let ring = TcpRing::connect(world, &met)?;
        #[cfg(feature = "cuda")]
        let nccl = if device.is_cuda() {
            Some(nccl::NcclGroup::new(world, device, &met.nccl_id)?)
        } else {
            None
        };
        Ok(Self {
            rank: world.rank,
            world_size: world.world_size,
            ring,
            #[cfg(feature = "cuda")]
            nccl,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Processes in the run.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// `nccl` or `tcp` (for the plan printed at the start).
    pub fn backend_name(&self) -> &'static str {
        #[cfg(feature = "cuda")]
        if self.nccl.is_some() {
            return "nccl";
        }
        "tcp"
    }

    /// Sums `values` across the ranks in place (every rank ends with the same bits). For small
    /// control values; tensors go through [`ProcessGroup::all_reduce_sum`].
    pub fn all_reduce_host(&mut self, values: &mut [f32]) -> Result<(), DistributedError> {
        self.ring.all_reduce(values)
    }

    /// The sum across the ranks of a flat float32 tensor, on its device: NCCL on CUDA, the ring
    /// (through host memory) on the CPU.
    pub fn all_reduce_sum(&mut self, tensor: &Tensor) -> Result<Tensor, DistributedError> {
        if tensor.dtype() != candle_core::DType::F32 || tensor.rank() != 1 {
            return Err(DistributedError::Tensor(format!(
                "expected a flat float32 tensor, got {:?} {:?}",
                tensor.dtype(),
                tensor.dims()
            )));
        }
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            return nccl.all_reduce_sum(tensor);
        }
        let tensor_error = |e: candle_core::Error| DistributedError::Tensor(e.to_string());
        let mut values = tensor.to_vec1::<f32>().map_err(tensor_error)?;
        self.ring.all_reduce(&mut values)?;
        Tensor::from_vec(values, tensor.elem_count(), tensor.device()).map_err(tensor_error)
    }

    /// Every rank's `value`, in rank order (exact for any u64).
    pub fn all_gather_u64(&mut self, value: u64) -> Result<Vec<u64>, DistributedError> {
        // Four 16-bit limbs per rank, each exact in float32; only this rank's slots are set.
        let mut slots = vec![0f32; self.world_size * 4];
        for limb in 0..4 {
            slots[self.rank * 4 + limb] = ((value >> (16 * limb)) & 0xffff) as f32;
        }
        self.all_reduce_host(&mut slots)?;
        Ok(slots
            .chunks_exact(4)
            .map(|limbs| {
                limbs
                    .iter()
                    .enumerate()
                    .fold(0u64, |acc, (i, &l)| acc | ((l as u64) << (16 * i)))
            })
            .collect())
    }

    /// Waits until every rank has reached this point.
    pub fn barrier(&mut self) -> Result<(), DistributedError> {
        let mut one = [1.0f32];
        self.all_reduce_host(&mut one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<Option<WorldConfig>, DistributedError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        WorldConfig::from_vars(|name| map.get(name).cloned(), DEFAULT_TIMEOUT)
    }

    #[test]
    fn launcher_variables_are_read_and_checked() {
        assert_eq!(world(&[]).unwrap(), None);
        assert_eq!(world(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap(), None);
        let w = world(&[("WORLD_SIZE", "4"), ("RANK", "3"), ("MASTER_PORT", "1234")])
            .unwrap()
            .unwrap();
        assert_eq!((w.rank, w.world_size, w.local_rank), (3, 4, 3));
        assert_eq!(w.master(), "127.0.0.1:1234");
        let w = world(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "1"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.7"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((w.local_rank, w.master_port), (0, DEFAULT_MASTER_PORT));
        assert_eq!(w.master(), "10.0.0.7:29500");

        for (vars, needle) in [
            (vec![("WORLD_SIZE", "2")], "RANK"),
            (vec![("WORLD_SIZE", "2"), ("RANK", "2")], "from 0 to 1"),
            (vec![("WORLD_SIZE", "two"), ("RANK", "0")], "WORLD_SIZE"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "0")],
                "MASTER_PORT",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "70000")],
                "port",
            ),
        ] {
            let error = world(&vars).unwrap_err().to_string();
            assert!(error.contains(needle), "{vars:?}: {error}");
        }
    }
}
