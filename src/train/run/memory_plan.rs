//! A run's memory plan: the estimated peak ([`crate::train::memory`]) checked against what the
//! device has free before the model loads, and a device's out-of-memory error in a step turned
//! into the same message naming what to change.

use std::path::PathBuf;

use super::{MemoryCheck, RunError, TrainConfig};
use crate::train::memory::{
    DeviceKind, MemorySettings, ModelSizes, OutOfMemory, available_memory, estimate,
    is_out_of_memory, savings,
};
use crate::train::step::TrainError;

/// The run's memory estimate, and what the device had free before the model loaded.
pub(super) struct MemoryPlan {
    sizes: ModelSizes,
    settings: MemorySettings,
    /// The estimated peak, in bytes.
    pub(super) estimate: u64,
    /// What the device had free, when known.
    pub(super) available: Option<u64>,
    device: String,
}

impl MemoryPlan {
    /// Estimates the run's peak from the model's configs and weight headers and, unless
    /// `--skip_memory_check`, refuses it when the device has less free.
    pub(super) fn check(config: &TrainConfig, examples: usize) -> Result<Self, RunError> {
        let sizes = ModelSizes::from_folder(&config.pretrained_model, config.variant)
            .map_err(TrainError::from)?;
        let settings = MemorySettings {
            resolution: config.resolution,
            train_batch_size: config.train_batch_size,
            gradient_accumulation_steps: config.gradient_accumulation_steps,
            lora_rank: config.lora_rank,
            gradient_checkpointing: config.gradient_checkpointing,
            use_8bit_adam: config.use_8bit_adam,
            use_ema: config.use_ema,
            cache_latents: config.cache_latents,
            random_flip: config.random_flip,
            half_precision_frozen: config.mixed_precision.frozen_dtype(&config.device)
                != candle_core::DType::F32
                || config.mixed_precision.cpu_bf16(&config.device),
            examples,
            device: DeviceKind::of(&config.device),
        };
        let needed = estimate(&sizes, &settings).total();
        let available = match config.memory_check {
            MemoryCheck::Available(bytes) => Some(bytes),
            MemoryCheck::Device | MemoryCheck::Skip => {
                available_memory(&config.device).map(|a| a.bytes)
            }
        };
        let device = match config.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        let plan = Self {
            sizes,
            settings,
            estimate: needed,
            available,
            device,
        };
        if config.memory_check != MemoryCheck::Skip
            && let Some(available) = available
            && needed > available
        {
            return Err(plan.out_of_memory(None));
        }
        Ok(plan)
    }

    fn out_of_memory(&self, during_step: Option<(u64, Option<PathBuf>)>) -> RunError {
        RunError::OutOfMemory(Box::new(OutOfMemory {
            needed: self.estimate,
            available: self.available,
            device: self.device.clone(),
            savings: savings(&self.sizes, &self.settings),
            during_step,
        }))
    }

    /// A step's out-of-memory error from the device as the same message as the preflight's,
    /// naming the step and the newest checkpoint on disk (checkpoints are renamed into place
    /// whole, so it is intact); any other error as it is.
    /// The driver's error may come through a step's computation or the optimizer, so the
    /// whole message is read.
    pub(super) fn out_of_memory_in_step(
        &self,
        error: RunError,
        step: u64,
        checkpoint: impl FnOnce() -> Option<PathBuf>,
    ) -> RunError {
        if matches!(error, RunError::Train(_)) && is_out_of_memory(&error.to_string()) {
            self.out_of_memory(Some((step, checkpoint())))
        } else {
            error
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::memory::DeviceKind;

    fn plan() -> MemoryPlan {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pipelines/sd1-tiny");
        let sizes = ModelSizes::from_folder(&folder, crate::model::weights::Variant::Default)
            .expect("the fixture's sizes");
        let settings = MemorySettings {
            resolution: 512,
            train_batch_size: 4,
            examples: 10,
            device: DeviceKind::Gpu,
            ..MemorySettings::example()
        };
        MemoryPlan {
            estimate: estimate(&sizes, &settings).total(),
            sizes,
            settings,
            available: Some(300_000_000),
            device: "cuda:0".into(),
        }
    }

    fn compute_error(text: &str) -> RunError {
        TrainError::Compute {
            stage: "backward",
            source: candle_core::Error::Msg(text.into()),
        }
        .into()
    }

    #[test]
    fn a_device_out_of_memory_error_in_a_step_names_what_to_change_and_the_checkpoint() {
        let plan = plan();
        let error = compute_error("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let message = plan
            .out_of_memory_in_step(error, 7, || Some(PathBuf::from("out/checkpoint-5")))
            .to_string();
        assert!(
            message.starts_with("out of memory on cuda:0 in step 7 (estimated peak ~"),
            "{message}"
        );
        assert!(
            message.contains("300 MB available at the start): try --"),
            "{message}"
        );
        for flag in [
            "--gradient_checkpointing (−",
            "--mixed_precision bf16 (−",
            "--train_batch_size 2 (−",
        ] {
            assert!(message.contains(flag), "{flag}: {message}");
        }
        assert!(
            message.ends_with("the last checkpoint, out/checkpoint-5, is intact"),
            "{message}"
        );
        let first = plan
            .out_of_memory_in_step(compute_error("CUDA_ERROR_OUT_OF_MEMORY"), 1, || None)
            .to_string();
        assert!(first.ends_with("no checkpoint was saved yet"), "{first}");
        // Any other failure stays what it was.
        let other = plan
            .out_of_memory_in_step(compute_error("shape mismatch"), 7, || None)
            .to_string();
        assert_eq!(other, "backward: shape mismatch");
    }
}
