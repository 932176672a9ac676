//! Memory hygiene of a training step on the tiny fixture pipeline, shown by what can be counted:
//! - the VAE and text encoder run without a graph: their outputs are plain tensors;
//! - backward leaves gradients for the trained variables only (candle's own matmul backward
//!   also leaves one for every frozen weight and bias, and for the untracked text conditioning
//!   and timestep embedding): in LoRA training no frozen layer costs a weight gradient;
//! - no second copy of a frozen weight: the LoRA base network and the validation network read
//!   the very buffers of the UNet's variables;
//! - no frozen weight kept for nothing: without validation edits the VAE's decoder is freed.

use crate::common;
use crate::train_dataset;

use std::collections::HashSet;

use candle_core::{CpuStorage, Device, Storage, Tensor, TensorId, Var};
use instruct_pix2pix::train::data::{CropMode, Example, prepare_batch};
use instruct_pix2pix::train::lora::{LoraConfig, UNetLora};
use instruct_pix2pix::train::step::{StepDraws, TrainLoadOptions, TrainingModels};
use rand::SeedableRng;

fn load_models() -> TrainingModels {
    TrainingModels::load(
        &common::fixture_pipeline("sd1-tiny"),
        &TrainLoadOptions::default(),
    )
    .unwrap()
}

/// A batch of two generated examples at 64² (so attention sees several tokens) and its draws.
fn batch_and_draws(
    models: &TrainingModels,
) -> (instruct_pix2pix::train::data::TrainBatch, StepDraws) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let examples: Vec<Example> = (0..2)
        .map(|i| {
            let original = train_dataset::smooth_image(64, &mut rng);
            Example {
                edited: train_dataset::invert(&original),
                original,
                prompt: format!("{} {i}", train_dataset::INSTRUCTION),
                name: format!("ex{i}"),
            }
        })
        .collect();
    let batch = prepare_batch(
        &examples,
        &[false, true],
        64,
        CropMode::Random,
        &Device::Cpu,
    )
    .unwrap();
    let shape = models.latent_shape(2, 64);
    let draws = StepDraws::seeded(1, 0, shape, 1000, &Device::Cpu).unwrap();
    (batch, draws)
}

/// The ids of the tensors `loss.backward()` left a gradient for, other than `trained` and the
/// loss target (candle's subtraction always differentiates both sides: one latent-sized
/// tensor).
fn untrained_gradients(loss: &Tensor, target: &Tensor, trained: &[(String, Var)]) -> usize {
    let grads = loss.backward().unwrap();
    let trained: HashSet<TensorId> = trained.iter().map(|(_, v)| v.as_tensor().id()).collect();
    let got: HashSet<TensorId> = grads.get_ids().copied().collect();
    assert!(
        trained.iter().any(|id| got.contains(id)),
        "no trained variable got a gradient"
    );
    got.iter()
        .filter(|id| !trained.contains(id) && **id != target.id())
        .count()
}

#[test]
fn the_frozen_encoders_build_no_graph() {
    let models = load_models();
    let (batch, draws) = batch_and_draws(&models);
    let encoded = models.encode_batch(&batch).unwrap();
    for (name, t) in [
        ("posterior mean", &encoded.edited_posterior.mean),
        ("posterior log-variance", &encoded.edited_posterior.logvar),
        ("image latents", &encoded.image_latents),
        ("text embeddings", &encoded.encoder_hidden_states),
    ] {
        assert!(!t.track_op(), "{name} is part of a graph");
    }
    let out = models.loss_of_encoded(&encoded, &draws, Some(0.3)).unwrap();
    assert!(!out.unet_input.track_op());
    assert!(!out.encoder_hidden_states.track_op());
    assert!(out.loss.track_op());
}

#[test]
fn full_fine_tuning_backward_differentiates_only_the_unet_variables() {
    let models = load_models();
    let (batch, draws) = batch_and_draws(&models);
    let out = models.micro_batch_loss(&batch, &draws, None).unwrap();
    let extra = untrained_gradients(&out.loss, &out.target, models.unet.params());
    assert_eq!(
        extra, 0,
        "gradients of untracked tensors were computed and kept"
    );
}

#[test]
fn lora_backward_computes_no_gradient_for_frozen_layers() {
    let mut models = load_models();
    models.unet.freeze_base().unwrap();
    let lora = UNetLora::attach(&mut models.unet.unet, LoraConfig::new(2), 0).unwrap();
    let (batch, draws) = batch_and_draws(&models);
    let out = models.micro_batch_loss(&batch, &draws, None).unwrap();
    let extra = untrained_gradients(&out.loss, &out.target, &lora.named_vars());
    assert_eq!(extra, 0, "frozen weights or inputs got gradients");
}

/// Where a CPU f32 tensor's first element lives.
fn data_address(t: &Tensor) -> usize {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(values)) => values[layout.start_offset()..].as_ptr() as usize,
        _ => panic!("not a CPU f32 tensor"),
    }
}

#[test]
fn frozen_weights_are_the_variables_buffers_not_copies() {
    let mut models = load_models();
    let by_name = |name: &str| {
        models
            .unet
            .params()
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| data_address(v.as_tensor()))
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    let variables: Vec<(String, usize)> = models
        .unet
        .unet
        .attentions()
        .into_iter()
        .flat_map(|(path, attention)| {
            attention.projections().map(|(name, linear)| {
                (
                    format!("{path}.{name}.weight"),
                    data_address(&linear.weight),
                )
            })
        })
        .collect();
    assert!(variables.len() >= 8);
    for (name, address) in &variables {
        assert_eq!(*address, by_name(name), "{name} of the trainable UNet");
    }

    // The validation network over the current weights: the same buffers.
    let validation = models
        .unet
        .frozen_unet(&models.unet.named_tensors())
        .unwrap();
    for (path, attention) in validation.attentions() {
        for (name, linear) in attention.projections() {
            let name = format!("{path}.{name}.weight");
            assert!(!linear.weight.is_variable());
            assert_eq!(
                data_address(&linear.weight),
                by_name(&name),
                "{name} (validation)"
            );
        }
    }

    // LoRA: the frozen base network reads the variables' buffers too.
    models.unet.freeze_base().unwrap();
    let frozen: Vec<(String, usize)> = models
        .unet
        .unet
        .attentions()
        .into_iter()
        .flat_map(|(path, attention)| {
            attention.projections().map(|(name, linear)| {
                (
                    format!("{path}.{name}.weight"),
                    data_address(&linear.weight),
                )
            })
        })
        .collect();
    assert_eq!(frozen, variables);
}

#[test]
fn without_validation_the_vae_decoder_is_not_kept() {
    let models = TrainingModels::load(
        &common::fixture_pipeline("sd1-tiny"),
        &TrainLoadOptions {
            keep_vae_decoder: false,
            ..TrainLoadOptions::default()
        },
    )
    .unwrap();
    let vae = models.vae().unwrap();
    assert!(!vae.has_decoder());
    let error = vae
        .decode(&Tensor::zeros((1, 4, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(error.to_string().contains("decoder was freed"), "{error}");
    // Training only encodes: a step runs as before.
    let (batch, draws) = batch_and_draws(&models);
    let out = models.micro_batch_loss(&batch, &draws, None).unwrap();
    assert!(out.loss.to_scalar::<f32>().unwrap().is_finite());
    // The default (and a run with validation edits) keeps it.
    assert!(load_models().vae().unwrap().has_decoder());
}
