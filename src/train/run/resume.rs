//! Resuming a run: a checkpoint's `state.json` checked against this run's settings, and its
//! weights put back into the UNet or the LoRA adapters.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{GROUP_LORA, GROUP_UNET, LoopState, RunError, TrainConfig};
use crate::train::checkpoint::LoadedCheckpoint;
use crate::train::lora::UNetLora;
use crate::train::optim::MomentStorage;
use crate::train::step::{TrainError, TrainingModels};

/// Reads a checkpoint's `state.json` and checks that it belongs to a run with these settings.
pub(super) fn check_resume_state(
    loaded: &LoadedCheckpoint,
    config: &TrainConfig,
    examples: usize,
    processes: usize,
) -> Result<LoopState, RunError> {
    let mismatch = |reason: String| RunError::ResumeMismatch {
        path: loaded.path.clone(),
        reason,
    };
    let state: LoopState = serde_json::from_value(loaded.state.clone())
        .map_err(|e| mismatch(format!("its state.json is not this program's: {e}")))?;
    let describe = |rank: Option<usize>| match rank {
        Some(r) => format!("LoRA of rank {r}"),
        None => "full fine-tuning".to_string(),
    };
    if state.lora_rank != config.lora_rank {
        return Err(mismatch(format!(
            "it is a {}, this run a {}",
            describe(state.lora_rank),
            describe(config.lora_rank)
        )));
    }
    if state.ema.is_some() != config.use_ema {
        return Err(mismatch(format!(
            "it was made {} --use_ema",
            if state.ema.is_some() {
                "with"
            } else {
                "without"
            }
        )));
    }
    let moments = if config.use_8bit_adam {
        MomentStorage::Blockwise8Bit
    } else {
        MomentStorage::Float32
    };
    if state.optimizer.moments != moments {
        return Err(mismatch(format!(
            "its optimizer is {}, this run asks for {} ({} --use_8bit_adam to resume it)",
            state.optimizer.moments,
            moments,
            if config.use_8bit_adam { "drop" } else { "add" }
        )));
    }
    // The data position counts global batches: any number of processes may resume a run
    // whose global batch (per-process batch × processes) is the same.
    let theirs = state.train_batch_size * state.processes;
    let ours = config.train_batch_size * processes;
    if state.examples != examples || theirs != ours {
        let describe = |batch: usize, processes: usize| {
            if processes == 1 {
                format!("batches of {batch}")
            } else {
                format!(
                    "batches of {} ({batch} on each of {processes} processes)",
                    batch * processes
                )
            }
        };
        return Err(mismatch(format!(
            "it was made with {} examples in {}, this run has {examples} in {}",
            state.examples,
            describe(state.train_batch_size, state.processes),
            describe(config.train_batch_size, processes)
        )));
    }
    if state.seed != config.seed {
        return Err(mismatch(format!(
            "it was made with --seed {}, this run has --seed {}",
            state.seed, config.seed
        )));
    }
    Ok(state)
}

/// Sets the UNet's (or the LoRA adapters') variables to a checkpoint's weights.
pub(super) fn restore_weights(
    loaded: &LoadedCheckpoint,
    models: &TrainingModels,
    lora: Option<&UNetLora>,
) -> Result<(), RunError> {
    if let Some(lora) = lora {
        lora.restore(loaded.group(GROUP_LORA)?)?;
        return Ok(());
    }
    let tensors: HashMap<&str, &Tensor> = loaded
        .group(GROUP_UNET)?
        .iter()
        .map(|(n, t)| (n.as_str(), t))
        .collect();
    for (name, var) in models.unet.params() {
        let Some(tensor) = tensors.get(name.as_str()) else {
            return Err(RunError::ResumeMismatch {
                path: loaded.path.clone(),
                reason: format!("it has no UNet weight {name}"),
            });
        };
        if tensor.dims() != var.dims() {
            return Err(RunError::ResumeMismatch {
                path: loaded.path.clone(),
                reason: format!(
                    "its {name} has shape {:?}, the model {:?}",
                    tensor.dims(),
                    var.dims()
                ),
            });
        }
        var.set(tensor).map_err(|source| TrainError::Compute {
            stage: "restoring the UNet",
            source,
        })?;
    }
    Ok(())
}
