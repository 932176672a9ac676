//! The loop's side of data-parallel training ([`crate::train::distributed`]): the processes agree
//! on the seed, the dataset and the checkpoint they start from; each takes its slice of every
//! global batch (`train_batch_size` examples, by rank, as accelerate shards a batch); they agree
//! on stopping; and before each optimizer step their gradients and losses are summed, so every
//! rank applies the same update.

use std::ops::Range;
use std::sync::atomic::AtomicBool;

use super::RunError;
use crate::train::distributed::gradients::all_reduce_gradients;
use crate::train::distributed::{DistributedError, ProcessGroup, WorldConfig};
use crate::train::step::Trainer;

/// This process's connection to the others.
pub(super) struct Parallel {
    group: ProcessGroup,
}

impl Parallel {
    /// Meets the other processes (nothing for a single process); a stop request (`cancel`)
    /// ends the wait.
    pub(super) fn connect(
        world: Option<&WorldConfig>,
        device: &candle_core::Device,
        cancel: &AtomicBool,
    ) -> Result<Option<Self>, RunError> {
        match world {
            Some(world) => Ok(Some(Self {
                group: ProcessGroup::connect(world, device, cancel)?,
            })),
            None => Ok(None),
        }
    }

    pub(super) fn rank(&self) -> usize {
        self.group.rank()
    }

    pub(super) fn world_size(&self) -> usize {
        self.group.world_size()
    }

    pub(super) fn backend_name(&self) -> &'static str {
        self.group.backend_name()
    }

    /// Rank 0's `value` (every rank takes it), and whether this rank's differed.
    pub(super) fn adopt_rank0(&mut self, value: u64) -> Result<(u64, bool), RunError> {
        let values = self.group.all_gather_u64(value)?;
        Ok((values[0], values[self.rank()] != values[0]))
    }

    /// Refuses to go on when the ranks disagree on `value` (`what` names it; `hint` says what
    /// to do).
    pub(super) fn check_same(
        &mut self,
        what: &str,
        value: u64,
        hint: &str,
    ) -> Result<(), RunError> {
        let values = self.group.all_gather_u64(value)?;
        if let Some((rank, other)) = values.iter().enumerate().find(|(_, v)| **v != values[0]) {
            return Err(DistributedError::Mismatch(format!(
                "{what}: rank 0 has {}, rank {rank} has {other} ({hint})",
                values[0]
            ))
            .into());
        }
        Ok(())
    }

    /// For each flag, whether any rank's is set (the same answers on every rank, from one sum).
    pub(super) fn any<const N: usize>(&mut self, flags: [bool; N]) -> Result<[bool; N], RunError> {
        let mut values = flags.map(|flag| if flag { 1.0f32 } else { 0.0 });
        self.group.all_reduce_host(&mut values)?;
        Ok(values.map(|value| value > 0.0))
    }

    /// Sums the accumulated gradients and loss across the ranks (see the module doc).
    pub(super) fn reduce(&mut self, trainer: &mut Trainer) -> Result<(), RunError> {
        let group = &mut self.group;
        trainer.reduce_accumulated(|params, grads, loss| {
            let mut controls = [*loss as f32];
            all_reduce_gradients(group, params, grads, &mut controls)?;
            *loss = f64::from(controls[0]);
            Ok::<(), RunError>(())
        })
    }

    /// Waits for every rank.
    pub(super) fn barrier(&mut self) -> Result<(), RunError> {
        Ok(self.group.barrier()?)
    }

    /// The rows of a global batch of `global_len` examples this rank takes, `per_rank` each.
    pub(super) fn local_rows(&self, global_len: usize, per_rank: usize) -> Range<usize> {
        local_rows(self.rank(), global_len, per_rank)
    }
}

/// Rank `rank`'s rows of a global batch of `global_len` (the last ranks get fewer, or none, in
/// an epoch's short last batch).
pub(super) fn local_rows(rank: usize, global_len: usize, per_rank: usize) -> Range<usize> {
    let start = (rank * per_rank).min(global_len);
    start..((rank + 1) * per_rank).min(global_len)
}

#[cfg(test)]
mod tests {
    use super::local_rows;

    #[test]
    fn a_global_batch_is_cut_by_rank() {
        assert_eq!(local_rows(0, 4, 2), 0..2);
        assert_eq!(local_rows(1, 4, 2), 2..4);
        // A short last batch of 3: rank 1 gets one, of 1: rank 1 none.
        assert_eq!(local_rows(1, 3, 2), 2..3);
        assert_eq!(local_rows(1, 1, 2), 1..1);
        assert_eq!(local_rows(2, 5, 2), 4..5);
    }
}
