//! Gradient checkpointing of the UNet (`--gradient_checkpointing`): with it on, every UNet
//! parameter, the input and the text conditioning get the same gradients as without (the
//! segments' weight gradients merged from their store), for full fine-tuning and for LoRA
//! adapters, in the trainer's step too; and the graph kept between forward and backward is a
//! fraction of the size.

use crate::common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, TensorId, Var};
use instruct_pix2pix::model::PipelineFolder;
use instruct_pix2pix::model::unet::UNet2DConditionModel;
use instruct_pix2pix::model::weights::Variant;
use instruct_pix2pix::train::data::TrainBatch;
use instruct_pix2pix::train::lora::{LoraConfig, UNetLora};
use instruct_pix2pix::train::optim::AdamWConfig;
use instruct_pix2pix::train::schedule::{LrSchedule, LrScheduleKind};
use instruct_pix2pix::train::step::{
    StepConfig, StepDraws, TrainLoadOptions, TrainableUNet, Trainer, TrainingModels,
};

fn tiny_unet() -> TrainableUNet {
    let pipeline =
        PipelineFolder::open(&common::fixture_pipeline("sd1-tiny"), Variant::Default).unwrap();
    TrainableUNet::from_tensors(
        pipeline.unet_weights(DType::F32, &Device::Cpu).unwrap(),
        pipeline.unet_config.clone(),
        &pipeline.path.join("unet"),
        0,
    )
    .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a − b| / max |a|.
fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap()) / max_abs(a).max(f32::MIN_POSITIVE)
}

// Same operations in the same order; only where the forward pass of a segment takes a fused
// inference kernel (an input without gradient, as the first resnets under LoRA) do values differ
// by float32 rounding, then propagated through the backward.
const TOLERANCE: f32 = 1e-4;

/// The inputs of one UNet call: the sample and the text as variables (to get their gradients),
/// timesteps, and fixed weights turning the prediction into a scalar.
struct Case {
    sample: Var,
    timesteps: Tensor,
    context: Var,
    weights: Tensor,
}

impl Case {
    fn new(batch: usize, height: usize, width: usize) -> Self {
        let device = Device::Cpu;
        let sample = Var::randn(0f32, 1., (batch, 8, height, width), &device).unwrap();
        let timesteps = Tensor::new(&[37f32, 912.][..batch], &device).unwrap();
        let context = Var::randn(0f32, 1., (batch, 7, 32), &device).unwrap();
        let weights = Tensor::randn(0f32, 1., (batch, 4, height, width), &device).unwrap();
        Self {
            sample,
            timesteps,
            context,
            weights,
        }
    }

    /// `sum(unet(sample) · weights)`.
    fn loss(&self, unet: &UNet2DConditionModel) -> Tensor {
        let out = unet
            .forward(
                self.sample.as_tensor(),
                &self.timesteps,
                self.context.as_tensor(),
            )
            .unwrap();
        (out * &self.weights).unwrap().sum_all().unwrap()
    }
}

/// The gradients of `vars` (and of the inputs) after `loss.backward()`, merged with the
/// segments' store when checkpointing is on. Every variable must get one.
fn gradients(
    case: &Case,
    unet: &UNet2DConditionModel,
    vars: &[(String, Var)],
) -> (HashMap<String, Tensor>, usize) {
    let loss = case.loss(unet);
    let graph_nodes = loss.sorted_nodes().len();
    let grads = loss.backward().unwrap();
    let mut inner: HashMap<TensorId, Tensor> = unet
        .segment_gradients()
        .map(|s| s.take())
        .unwrap_or_default();
    let mut out = HashMap::new();
    for (name, var) in vars {
        let outer = grads.get(var.as_tensor()).cloned();
        let segment = inner.remove(&var.as_tensor().id());
        let grad = match (outer, segment) {
            (Some(a), Some(b)) => (a + b).unwrap(),
            (Some(g), None) | (None, Some(g)) => g,
            (None, None) => panic!(
                "{name} got no gradient (checkpointing: {})",
                unet.segment_gradients().is_some()
            ),
        };
        out.insert(name.clone(), grad);
    }
    assert!(
        inner.is_empty(),
        "gradients of unknown variables were stored"
    );
    for (name, var) in [("sample", &case.sample), ("context", &case.context)] {
        out.insert(name.into(), grads.get(var.as_tensor()).unwrap().clone());
    }
    (out, graph_nodes)
}

fn compare(
    plain: &HashMap<String, Tensor>,
    checkpointed: &HashMap<String, Tensor>,
    what: &str,
) -> f32 {
    assert_eq!(plain.len(), checkpointed.len());
    let mut worst = 0f32;
    for (name, a) in plain {
        let rel = relative_diff(a, &checkpointed[name]);
        assert!(
            rel < TOLERANCE,
            "{what}: gradient of {name} differs by {rel}"
        );
        worst = worst.max(rel);
    }
    println!(
        "{what}: {} gradients, worst relative difference {worst:.2e}",
        plain.len()
    );
    worst
}

/// Full fine-tuning: every weight of the UNet, at a size the downsampling divides and at one it
/// does not (the upsamplers then take the skip states' sizes).
#[test]
fn every_unet_gradient_is_the_same_with_checkpointing() {
    let trainable = tiny_unet();
    let params = trainable.params().to_vec();
    for (batch, height, width) in [(2, 8, 8), (1, 6, 10)] {
        let case = Case::new(batch, height, width);
        let (plain, plain_nodes) = gradients(&case, &trainable.unet, &params);

        let mut unet = trainable.unet.clone();
        unet.enable_gradient_checkpointing();
        let (checkpointed, checkpointed_nodes) = gradients(&case, &unet, &params);
        compare(
            &plain,
            &checkpointed,
            &format!("full, {batch}×{height}×{width}"),
        );
        // The graph kept for backward: each segment is one node instead of its insides.
        println!("graph nodes kept: {plain_nodes} plain, {checkpointed_nodes} checkpointed");
        assert!(
            checkpointed_nodes * 4 < plain_nodes,
            "{checkpointed_nodes} vs {plain_nodes}"
        );
        assert!(unet.segment_gradients().unwrap().is_empty());
    }
}

/// LoRA: only the adapters train (the base weights are plain tensors), so the first segments
/// have inputs without gradient; the adapters get the same gradients either way.
#[test]
fn lora_gradients_are_the_same_with_checkpointing() {
    let mut trainable = tiny_unet();
    trainable.freeze_base().unwrap();
    let lora = UNetLora::attach(&mut trainable.unet, LoraConfig::new(4), 3).unwrap();
    // B starts at zero (so would A's gradient): give both values.
    for var in lora.vars() {
        let values = Tensor::randn(0f32, 0.2, var.dims(), &Device::Cpu).unwrap();
        var.set(&values).unwrap();
    }
    let vars = lora.named_vars();
    let case = Case::new(2, 8, 8);
    let (plain, _) = gradients(&case, &trainable.unet, &vars);
    let mut unet = trainable.unet.clone();
    unet.enable_gradient_checkpointing();
    let (checkpointed, _) = gradients(&case, &unet, &vars);
    compare(&plain, &checkpointed, "LoRA");
    assert!(plain.values().all(|g| max_abs(g) > 0.0));
}

/// Without a graph (inference), checkpointing changes nothing: the same output bit for bit.
#[test]
fn inference_is_unchanged_by_checkpointing() {
    let trainable = tiny_unet();
    let unet = trainable.frozen_unet(&trainable.named_tensors()).unwrap();
    let mut checkpointed = unet.clone();
    checkpointed.enable_gradient_checkpointing();
    let device = Device::Cpu;
    let sample = Tensor::randn(0f32, 1., (1, 8, 8, 8), &device).unwrap();
    let context = Tensor::randn(0f32, 1., (1, 7, 32), &device).unwrap();
    let t = Tensor::new(&[500f32], &device).unwrap();
    let a = unet.forward(&sample, &t, &context).unwrap();
    let b = checkpointed.forward(&sample, &t, &context).unwrap();
    assert!(!b.track_op());
    assert_eq!(max_abs(&(a - b).unwrap()), 0.0);
}

/// The trainer merges the segments' gradients into its accumulated ones: one micro-batch of the
/// fixture pipeline gives the same accumulated gradients with and without checkpointing.
#[test]
fn trainer_accumulates_the_same_gradients_with_checkpointing() {
    let folder = common::fixture_pipeline("sd1-tiny");
    let device = Device::Cpu;
    let batch = TrainBatch {
        original_pixel_values: Tensor::rand(-1f32, 1., (2, 3, 32, 32), &device).unwrap(),
        edited_pixel_values: Tensor::rand(-1f32, 1., (2, 3, 32, 32), &device).unwrap(),
        prompts: vec!["make it snowy".into(), "turn the sky pink".into()],
        names: vec!["a".into(), "b".into()],
    };
    let run = |checkpointing: bool| -> Vec<Option<Tensor>> {
        let mut models = TrainingModels::load(&folder, &TrainLoadOptions::default()).unwrap();
        if checkpointing {
            models.unet.unet.enable_gradient_checkpointing();
        }
        let shape = models.latent_shape(2, 32);
        let schedule = LrSchedule::new(LrScheduleKind::Constant, 1e-4, 0, 1).unwrap();
        let config = StepConfig {
            gradient_accumulation_steps: 2,
            max_grad_norm: 1.0,
            conditioning_dropout_prob: Some(0.1),
        };
        let mut trainer =
            Trainer::new(models, AdamWConfig::default(), schedule, None, config).unwrap();
        // Two micro-batches: the store is emptied after each and the sums accumulate.
        for index in 0..2 {
            let draws = StepDraws::seeded(5, index, shape, 1000, &device).unwrap();
            trainer.accumulate(&batch, &draws).unwrap();
        }
        trainer.accumulated_gradients().to_vec()
    };
    let plain = run(false);
    let checkpointed = run(true);
    assert_eq!(plain.len(), checkpointed.len());
    let mut worst = 0f32;
    for (a, b) in plain.iter().zip(&checkpointed) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        let rel = relative_diff(a, b);
        assert!(rel < TOLERANCE, "{rel}");
        worst = worst.max(rel);
    }
    println!(
        "trainer: {} accumulated gradients, worst relative difference {worst:.2e}",
        plain.len()
    );
    // Not a degenerate comparison: the gradients are there and not zero.
    let total: f32 = plain
        .iter()
        .map(|g| {
            g.as_ref()
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum();
    assert!(total > 0.0);
}
