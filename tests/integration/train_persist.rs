//! Persistence of fine-tuning: LoRA adapters (forward pass against peft, the file against what
//! diffusers writes and loads), checkpoints (round trip, crash safety, total limit, resume
//! resolution), the final model folder, `metrics.jsonl` and TensorBoard event files.
//!
//! Python references: tests/fixtures/scripts/lora_refs.py (tests/fixtures/train_persist/lora_py).
//! With `INSTRUCT_PIX2PIX_EXPORT_DIR=DIR` set, the tests also leave in DIR what the scripts in
//! scripts/ check in diffusers and TensorBoard: `DIR/lora` (a LoRA written by this crate with an
//! input and this crate's output), `DIR/final_model` (a written model folder) and `DIR/tensorboard`
//! (an event file).

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use instruct_pix2pix::model::nn::LowRankAdapter;
use instruct_pix2pix::model::unet::{UNet2DConditionModel, UNetConfig};
use instruct_pix2pix::model::weights::Variant;
use instruct_pix2pix::model::{InstructPix2PixModel, LoadOptions};
use instruct_pix2pix::pipeline::rng::TorchGenerator;
use instruct_pix2pix::train::checkpoint::{
    self, CheckpointError, TensorGroup, latest_checkpoint, load_checkpoint, resolve_resume,
    resolve_resume_choice, save_checkpoint,
};
use instruct_pix2pix::train::lora::{self, LoraConfig, UNetLora};
use instruct_pix2pix::train::metrics::{self, MetricsLog, StepMetrics, TensorBoardWriter};
use instruct_pix2pix::train::output;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn train_fixture(name: &str) -> PathBuf {
    common::fixtures().join("train_persist").join(name)
}

fn unet_dir(pipeline: &str) -> PathBuf {
    common::fixture_pipeline(pipeline).join("unet")
}

fn read_tensors(path: &Path) -> Vec<(String, Tensor)> {
    checkpoint::read_safetensors(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn tensor_map(path: &Path) -> BTreeMap<String, Tensor> {
    read_tensors(path).into_iter().collect()
}

fn load_unet(pipeline: &str) -> UNet2DConditionModel {
    let dir = unet_dir(pipeline);
    let config = UNetConfig::from_file(&dir.join("config.json")).expect("fixture config");
    let weights = read_tensors(&dir.join("diffusion_pytorch_model.safetensors"))
        .into_iter()
        .collect();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    UNet2DConditionModel::load(vb, &config).expect("fixture weights")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The inputs and outputs of tests/fixtures/scripts/lora_refs.py.
struct LoraCase {
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    base_output: Tensor,
    lora_output: Tensor,
}

fn lora_case() -> LoraCase {
    let t = tensor_map(&train_fixture("lora_py").join("cases.safetensors"));
    let get = |name: &str| t.get(name).unwrap_or_else(|| panic!("{name}")).clone();
    LoraCase {
        sample: get("sample"),
        timesteps: get("timesteps"),
        context: get("encoder_hidden_states"),
        base_output: get("base_output"),
        lora_output: get("lora_output"),
    }
}

fn forward(unet: &UNet2DConditionModel, case: &LoraCase) -> Tensor {
    unet.forward(&case.sample, &case.timesteps, &case.context)
        .expect("forward")
}

/// Where to leave files for the Python checks (scripts/), when asked.
fn export_dir(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("INSTRUCT_PIX2PIX_EXPORT_DIR")?).join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    Some(dir)
}

/// The UNet fixture's same-architecture float32 tolerance (tests/unet.rs): about 40 layers of
/// float32 rounding in a different order than torch's, relative to the output's scale.
const F32_TOLERANCE: f32 = 1e-4;

// ---------------------------------------------------------------------------------------------
// LoRA
// ---------------------------------------------------------------------------------------------

#[test]
fn fresh_lora_leaves_the_output_unchanged_and_only_adapters_are_trainable() {
    let case = lora_case();
    let mut unet = load_unet("sd1-tiny");
    let base = forward(&unet, &case);
    // The adapter-free forward pass is diffusers' (this is the UNet parity of tests/unet.rs on
    // this fixture's input).
    let rel = max_abs_diff(&base, &case.base_output) / max_abs(&case.base_output);
    assert!(rel < F32_TOLERANCE, "base output vs diffusers: {rel}");

    let adapters = UNetLora::attach(&mut unet, LoraConfig::new(4).with_alpha(8.0), 7).unwrap();
    // 11 transformers × 2 attentions × 4 projections.
    assert_eq!(adapters.adapters().len(), 88);
    for adapter in adapters.adapters() {
        let (rank, in_features) = adapter.down.dims2().unwrap();
        assert_eq!(rank, 4);
        // peft's kaiming-uniform(a=√5) bound: 1/√in.
        let bound = 1.0 / (in_features as f32).sqrt();
        let a_max = max_abs(adapter.down.as_tensor());
        assert!(a_max <= bound && a_max > 0.5 * bound, "{a_max} vs {bound}");
        assert_eq!(max_abs(adapter.up.as_tensor()), 0.0);
        assert_eq!(adapter.scale, 2.0);
    }
    // B = 0: the adapters add exactly zero. With variables in the graph, the whole UNet runs
    // candle's differentiable ops instead of the fused inference kernels, so the output is the
    // base model's up to float32 rounding of those two paths (measured ~1.5e-6 of the scale).
    let with_adapters = forward(&unet, &case);
    let rel = max_abs_diff(&with_adapters, &base) / max_abs(&base);
    eprintln!("B = 0, tracked vs fused path: relative max difference {rel:.3e}");
    assert!(rel < 1e-5, "{rel}");

    // Backward from the adapted model: every adapter variable is reached, no base weight is a
    // variable (the VarBuilder hands out plain tensors), so only adapters can train.
    let loss = with_adapters.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut reached = 0;
    for (key, var) in adapters.named_vars() {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        // With B = 0, only B's gradient is non-zero (A's is Bᵀ·… = 0), as in peft.
        if key.ends_with("lora_B.weight") {
            assert!(max_abs(grad) > 0.0, "zero gradient for {key}");
            reached += 1;
        }
    }
    assert_eq!(reached, 88);
    assert!(!unet.conv_in.weight().is_variable());
    assert_eq!(
        adapters.parameter_count(),
        adapters
            .vars()
            .iter()
            .map(|v| v.elem_count())
            .sum::<usize>()
    );

    // Removing the adapters gives back the base model.
    assert_eq!(lora::remove_adapters(&mut unet), 88);
    assert_eq!(max_abs_diff(&forward(&unet, &case), &base), 0.0);

    // The hook itself, with plain (untracked) tensors as at inference: A random, B zero gives
    // the base output bit for bit (same kernels, and y + 0 = y).
    let mut generator = TorchGenerator::new(11);
    for (_, attention) in unet.attentions_mut() {
        for (_, linear) in attention.projections_mut() {
            let (out_features, in_features) = linear.weight.dims2().unwrap();
            linear.adapter = Some(LowRankAdapter {
                down: generator
                    .randn(&[3, in_features], DType::F32, &Device::Cpu)
                    .unwrap(),
                up: Tensor::zeros((out_features, 3), DType::F32, &Device::Cpu).unwrap(),
                scale: 0.5,
            });
        }
    }
    assert_eq!(max_abs_diff(&forward(&unet, &case), &base), 0.0);
}

#[test]
fn lora_saved_by_diffusers_loads_and_matches_peft_output() {
    let case = lora_case();
    let mut unet = load_unet("sd1-tiny");
    let adapters = UNetLora::load(&mut unet, &train_fixture("lora_py"), true)
        .expect("diffusers' LoRA file loads");
    // lora_alpha 8 over rank 4, read from the file's adapter metadata.
    assert_eq!(adapters.config(), LoraConfig::new(4).with_alpha(8.0));
    assert_eq!(adapters.adapters().len(), 88);
    let out = forward(&unet, &case);
    let scale = max_abs(&case.lora_output);
    let rel = max_abs_diff(&out, &case.lora_output) / scale;
    eprintln!("LoRA UNet output vs peft: relative max difference {rel:.3e}");
    assert!(rel < F32_TOLERANCE, "LoRA output vs peft: {rel}");
    // The adapter moves the output by ~7% of its scale, so the tolerance tells a LoRA applied
    // with the wrong scale or to the wrong module from the right one.
    let effect = max_abs_diff(&case.lora_output, &case.base_output) / scale;
    assert!(effect > 100.0 * F32_TOLERANCE, "{effect}");
}

#[test]
fn saved_lora_has_the_keys_shapes_and_config_diffusers_writes() {
    let mut unet = load_unet("sd1-tiny");
    let adapters = UNetLora::attach(&mut unet, LoraConfig::new(4).with_alpha(8.0), 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = adapters.save(dir.path()).unwrap();
    assert_eq!(path, dir.path().join("pytorch_lora_weights.safetensors"));

    let expected: BTreeMap<String, Vec<usize>> = serde_json::from_str(
        &fs::read_to_string(train_fixture("lora_py").join("keys.json")).unwrap(),
    )
    .unwrap();
    let ours: BTreeMap<String, Vec<usize>> = read_tensors(&path)
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    assert_eq!(ours, expected);

    let written = checkpoint::read_safetensors_metadata(&path).unwrap();
    assert_eq!(written.get("format").map(String::as_str), Some("pt"));
    let config: Value = serde_json::from_str(&written[lora::ADAPTER_METADATA_KEY]).unwrap();
    let python = checkpoint::read_safetensors_metadata(
        &train_fixture("lora_py").join("pytorch_lora_weights.safetensors"),
    )
    .unwrap();
    let python: Value = serde_json::from_str(&python[lora::ADAPTER_METADATA_KEY]).unwrap();
    for field in [
        "unet.r",
        "unet.lora_alpha",
        "unet.init_lora_weights",
        "unet.bias",
    ] {
        assert_eq!(config[field], python[field], "{field}");
    }
    let targets = |v: &Value| {
        let mut t: Vec<String> = serde_json::from_value(v["unet.target_modules"].clone()).unwrap();
        t.sort();
        t
    };
    assert_eq!(targets(&config), targets(&python));
}

/// Sets every B to deterministic non-zero values (as if trained).
fn perturb_up(adapters: &UNetLora, seed: u64) {
    let mut generator = TorchGenerator::new(seed);
    for adapter in adapters.adapters() {
        let values = generator
            .randn(adapter.up.dims(), DType::F32, &Device::Cpu)
            .unwrap();
        adapter.up.set(&(values * 0.05).unwrap()).unwrap();
    }
}

#[test]
fn saved_lora_loads_back_to_the_same_output() {
    let case = lora_case();
    let mut unet = load_unet("sd1-tiny");
    let adapters = UNetLora::attach(&mut unet, LoraConfig::new(2).with_alpha(3.0), 3).unwrap();
    perturb_up(&adapters, 5);
    // The forward pass sees the variables' new values (shared storage, as an optimizer step).
    let trained = forward(&unet, &case);
    let base = &case.base_output;
    assert!(max_abs_diff(&trained, base) / max_abs(base) > 1e-2);

    let dir = tempfile::tempdir().unwrap();
    adapters.save(dir.path()).unwrap();
    let mut fresh = load_unet("sd1-tiny");
    let loaded = UNetLora::load(&mut fresh, dir.path(), true).unwrap();
    assert_eq!(loaded.config(), LoraConfig::new(2).with_alpha(3.0));
    assert_eq!(max_abs_diff(&forward(&fresh, &case), &trained), 0.0);
    // Frozen (for editing): the fused kernels run, so equal up to float32 rounding.
    let mut frozen = load_unet("sd1-tiny");
    UNetLora::load(&mut frozen, dir.path(), false).unwrap();
    let rel = max_abs_diff(&forward(&frozen, &case), &trained) / max_abs(&trained);
    assert!(rel < 1e-5, "{rel}");

    // Restoring from named tensors (resume from a checkpoint) gives the same too.
    let mut resumed = load_unet("sd1-tiny");
    let restored = UNetLora::attach(&mut resumed, LoraConfig::new(2).with_alpha(3.0), 99).unwrap();
    restored
        .restore(&adapters.named_tensors().unwrap())
        .unwrap();
    assert_eq!(max_abs_diff(&forward(&resumed, &case), &trained), 0.0);
    // A restore with a missing tensor is refused, naming it.
    let mut partial = adapters.named_tensors().unwrap();
    let (dropped, _) = partial.pop().unwrap();
    let err = restored.restore(&partial).unwrap_err().to_string();
    assert!(err.contains("176") || err.contains(&dropped), "{err}");

    // A LoRA for another architecture is refused, and leaves no adapter behind.
    let mut other = load_unet("sd2-tiny");
    let err = UNetLora::load(&mut other, dir.path(), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit"), "{err}");
    assert_eq!(lora::remove_adapters(&mut other), 0);

    if let Some(export) = export_dir("lora") {
        adapters.save(&export).unwrap();
        checkpoint::write_safetensors(
            &export.join("cases.safetensors"),
            &[
                ("sample".into(), case.sample.clone()),
                ("timesteps".into(), case.timesteps.clone()),
                ("encoder_hidden_states".into(), case.context.clone()),
                ("output".into(), trained.clone()),
            ],
            None,
        )
        .unwrap();
    }
}

#[test]
fn lora_file_applies_to_a_loaded_model_for_editing() {
    let options = LoadOptions {
        variant: Variant::Default,
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let mut model =
        InstructPix2PixModel::load(&common::fixture_pipeline("sd1-tiny"), &options).unwrap();
    let config = lora::apply_lora_file(&mut model, &train_fixture("lora_py")).unwrap();
    assert_eq!(config.rank, 4);
    let case = lora_case();
    let rel =
        max_abs_diff(&forward(&model.unet, &case), &case.lora_output) / max_abs(&case.lora_output);
    eprintln!("frozen LoRA (fused kernels) vs peft: relative max difference {rel:.3e}");
    assert!(rel < F32_TOLERANCE, "{rel}");
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

fn groups(step: u64) -> Vec<TensorGroup> {
    let device = Device::Cpu;
    let value = step as f32;
    vec![
        TensorGroup::new(
            "lora",
            vec![
                (
                    "unet.a.lora_A.weight".into(),
                    Tensor::arange(0f32, 12., &device)
                        .unwrap()
                        .affine(1.0, f64::from(value))
                        .unwrap()
                        .reshape((3, 4))
                        .unwrap(),
                ),
                (
                    "unet.a.lora_B.weight".into(),
                    Tensor::full(value, (4, 3), &device).unwrap(),
                ),
            ],
        ),
        TensorGroup::new(
            "optimizer",
            vec![
                (
                    "exp_avg.0".into(),
                    Tensor::new(&[1.5f32, -2.25, value], &device).unwrap(),
                ),
                (
                    "half".into(),
                    Tensor::new(&[0.5f32, 3.0], &device)
                        .unwrap()
                        .to_dtype(DType::F16)
                        .unwrap(),
                ),
                (
                    "count".into(),
                    Tensor::new(&[step as i64], &device).unwrap(),
                ),
            ],
        ),
    ]
}

fn state(step: u64) -> Value {
    json!({"step": step, "epoch": step / 10, "data_position": 3, "rng": [1u64, 2, u64::MAX]})
}

fn assert_checkpoint_equals(dir: &Path, step: u64) {
    let loaded = load_checkpoint(dir, &Device::Cpu).unwrap();
    assert_eq!(loaded.step, step);
    assert_eq!(loaded.state, state(step));
    for group in groups(step) {
        let mut expected = group.tensors.clone();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        let got = loaded.group(&group.name).unwrap();
        assert_eq!(got.len(), expected.len());
        for ((name, tensor), (expected_name, expected_tensor)) in got.iter().zip(&expected) {
            assert_eq!(name, expected_name);
            assert_eq!(tensor.dtype(), expected_tensor.dtype(), "{name}");
            assert_eq!(tensor.dims(), expected_tensor.dims(), "{name}");
            let same = tensor
                .eq(expected_tensor)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .min(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(same, 1.0, "{name} differs");
        }
    }
}

#[test]
fn checkpoint_round_trip() {
    let out = tempfile::tempdir().unwrap();
    let saved = save_checkpoint(out.path(), 250, &groups(250), &state(250), None).unwrap();
    assert_eq!(saved.path, out.path().join("checkpoint-250"));
    assert!(saved.removed.is_empty());
    for file in [
        "lora.safetensors",
        "optimizer.safetensors",
        "state.json",
        "checkpoint.json",
    ] {
        assert!(saved.path.join(file).is_file(), "{file}");
    }
    assert_checkpoint_equals(&saved.path, 250);
    let missing = load_checkpoint(&saved.path, &Device::Cpu)
        .unwrap()
        .group("ema")
        .map(|_| ())
        .unwrap_err();
    assert!(missing.to_string().contains("ema"), "{missing}");

    // Saving the same step again (a resumed run) replaces it.
    save_checkpoint(out.path(), 250, &groups(251), &state(251), None).unwrap();
    let loaded = load_checkpoint(&saved.path, &Device::Cpu).unwrap();
    assert_eq!(loaded.state, state(251));

    // Bad group names are refused before anything is written.
    let bad = [TensorGroup::new("../x", vec![])];
    assert!(matches!(
        save_checkpoint(out.path(), 300, &bad, &state(300), None),
        Err(CheckpointError::BadName { .. })
    ));
    assert!(!out.path().join("checkpoint-300").exists());
}

#[test]
fn resume_resolution() {
    let out = tempfile::tempdir().unwrap();
    // No checkpoint yet: `latest` starts a new run, as diffusers' script does.
    assert_eq!(resolve_resume(out.path(), "latest").unwrap(), None);
    assert_eq!(
        resolve_resume(&out.path().join("not-yet-created"), "latest").unwrap(),
        None
    );
    for step in [5, 40, 300] {
        save_checkpoint(out.path(), step, &groups(step), &state(step), None).unwrap();
    }
    // Numeric order, not name order ("checkpoint-40" > "checkpoint-300" as text).
    let latest = resolve_resume(out.path(), "latest").unwrap().unwrap();
    assert_eq!(latest, out.path().join("checkpoint-300"));
    assert_eq!(
        resolve_resume(out.path(), "checkpoint-40")
            .unwrap()
            .unwrap(),
        out.path().join("checkpoint-40")
    );
    let elsewhere = out.path().join("checkpoint-5");
    assert_eq!(
        resolve_resume(Path::new("/nonexistent"), elsewhere.to_str().unwrap())
            .unwrap()
            .unwrap(),
        elsewhere
    );
    let err = resolve_resume(out.path(), "checkpoint-41").unwrap_err();
    assert!(err.to_string().contains("checkpoint-41"), "{err}");
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn an_interrupted_write_never_breaks_latest() {
    let out = tempfile::tempdir().unwrap();
    save_checkpoint(out.path(), 100, &groups(100), &state(100), None).unwrap();
    save_checkpoint(out.path(), 200, &groups(200), &state(200), None).unwrap();

    // A kill during the write of checkpoint 300: its temporary folder with a truncated file and
    // no manifest.
    let temp = out.path().join(".tmp-checkpoint-300-4242");
    copy_tree(&out.path().join("checkpoint-200"), &temp);
    fs::remove_file(temp.join("checkpoint.json")).unwrap();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(temp.join("lora.safetensors"))
        .unwrap();
    file.set_len(40).unwrap();
    // And a checkpoint folder damaged after the fact: a truncated weight file.
    let damaged = out.path().join("checkpoint-400");
    copy_tree(&out.path().join("checkpoint-200"), &damaged);
    let file = fs::OpenOptions::new()
        .write(true)
        .open(damaged.join("optimizer.safetensors"))
        .unwrap();
    file.set_len(20).unwrap();
    // And one without its manifest (a copy by hand interrupted, say).
    let unfinished = out.path().join("checkpoint-500");
    copy_tree(&out.path().join("checkpoint-200"), &unfinished);
    fs::remove_file(unfinished.join("checkpoint.json")).unwrap();

    let latest = latest_checkpoint(out.path()).unwrap().unwrap();
    assert_eq!(latest, out.path().join("checkpoint-200"));
    assert_checkpoint_equals(&latest, 200);
    let err = resolve_resume(out.path(), "checkpoint-400").unwrap_err();
    assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
    assert!(load_checkpoint(&unfinished, &Device::Cpu).is_err());

    // The next save removes the leftover temporary folder and becomes `latest`.
    save_checkpoint(out.path(), 600, &groups(600), &state(600), None).unwrap();
    assert!(!temp.exists());
    assert_eq!(
        latest_checkpoint(out.path()).unwrap().unwrap(),
        out.path().join("checkpoint-600")
    );
}

/// Issue 16 item 9: `latest` says which damaged checkpoint it passes over and which older one it
/// takes; when every checkpoint is damaged it refuses instead of starting over on top of them.
#[test]
fn latest_names_damaged_checkpoints_and_refuses_when_all_are() {
    let out = tempfile::tempdir().unwrap();
    save_checkpoint(out.path(), 100, &groups(100), &state(100), None).unwrap();
    save_checkpoint(out.path(), 200, &groups(200), &state(200), None).unwrap();
    let truncate = |step: u64| {
        let file = fs::OpenOptions::new()
            .write(true)
            .open(
                out.path()
                    .join(format!("checkpoint-{step}/optimizer.safetensors")),
            )
            .unwrap();
        file.set_len(20).unwrap();
    };
    truncate(200);
    let choice = resolve_resume_choice(out.path(), "latest").unwrap();
    assert_eq!(choice.dir, Some(out.path().join("checkpoint-100")));
    let notices = choice.notices();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(
        notices[0].contains("checkpoint-200")
            && notices[0].contains("optimizer.safetensors")
            && notices[0].contains("checkpoint-100"),
        "{}",
        notices[0]
    );

    truncate(100);
    let err = resolve_resume(out.path(), "latest").unwrap_err();
    assert!(matches!(err, CheckpointError::AllDamaged { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("checkpoint-100")
            && message.contains("checkpoint-200")
            && message.contains("damaged"),
        "{message}"
    );
    assert!(!message.contains("Some("), "{message}");
    // Nothing was removed or replaced.
    assert!(out.path().join("checkpoint-100").is_dir());
    assert!(out.path().join("checkpoint-200").is_dir());
}

#[test]
fn total_limit_keeps_the_newest() {
    let out = tempfile::tempdir().unwrap();
    let mut removed_all = Vec::new();
    for step in [10, 20, 30, 40, 50] {
        let saved =
            save_checkpoint(out.path(), step, &groups(step), &state(step), Some(2)).unwrap();
        removed_all.extend(saved.removed);
    }
    let left: Vec<u64> = checkpoint::list_checkpoints(out.path())
        .unwrap()
        .into_iter()
        .map(|(step, _)| step)
        .collect();
    assert_eq!(left, [40, 50]);
    let removed: Vec<PathBuf> = [10, 20, 30]
        .iter()
        .map(|s| out.path().join(format!("checkpoint-{s}")))
        .collect();
    assert_eq!(removed_all, removed);

    // A limit of 1 keeps just the new one (and never removes it).
    let saved = save_checkpoint(out.path(), 60, &groups(60), &state(60), Some(1)).unwrap();
    assert_eq!(saved.removed.len(), 2);
    assert_eq!(
        checkpoint::list_checkpoints(out.path()).unwrap(),
        [(60, out.path().join("checkpoint-60"))]
    );
    assert_checkpoint_equals(&saved.path, 60);
}

// ---------------------------------------------------------------------------------------------
// The final model
// ---------------------------------------------------------------------------------------------

fn load_options() -> LoadOptions {
    LoadOptions {
        variant: Variant::Default,
        dtype: DType::F32,
        device: Device::Cpu,
    }
}

#[test]
fn final_model_folder_loads_and_holds_the_trained_weights() {
    let base = common::fixture_pipeline("sd1-tiny");
    // "Trained" weights: the base UNet's, each shifted a little, so the test tells them apart.
    let trained: Vec<(String, Tensor)> =
        read_tensors(&unet_dir("sd1-tiny").join("diffusion_pytorch_model.safetensors"))
            .into_iter()
            .map(|(name, t)| (name, t.affine(1.0, 0.01).unwrap()))
            .collect();
    let out = tempfile::tempdir().unwrap();
    // The training output folder already holds checkpoints and logs: they stay.
    save_checkpoint(out.path(), 10, &groups(10), &state(10), None).unwrap();
    let model_dir = output::write_final_model(&base, out.path(), &trained).unwrap();
    assert_eq!(model_dir, out.path());
    assert!(out.path().join("checkpoint-10").is_dir());

    let index: Value =
        serde_json::from_str(&fs::read_to_string(out.path().join("model_index.json")).unwrap())
            .unwrap();
    assert_eq!(
        index["_class_name"],
        "StableDiffusionInstructPix2PixPipeline"
    );
    for component in ["vae", "text_encoder", "tokenizer", "scheduler"] {
        assert!(out.path().join(component).is_dir(), "{component}");
    }
    // The written UNet equals the given tensors bit for bit.
    let written = tensor_map(&out.path().join("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(written.len(), trained.len());
    for (name, tensor) in &trained {
        assert_eq!(max_abs_diff(&written[name], tensor), 0.0, "{name}");
    }
    // Copied components are the base's, byte for byte.
    for file in [
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
    ] {
        assert_eq!(
            fs::read(out.path().join(file)).unwrap(),
            fs::read(base.join(file)).unwrap(),
            "{file}"
        );
    }

    // Small files are copies, not links: editing the output's config never changes the base.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let copied = fs::metadata(out.path().join("scheduler/scheduler_config.json")).unwrap();
        assert_eq!(copied.nlink(), 1);
    }

    // This crate loads it, and its UNet computes what a UNet built from the tensors computes.
    let model = InstructPix2PixModel::load(out.path(), &load_options()).unwrap();
    let config = UNetConfig::from_file(&unet_dir("sd1-tiny").join("config.json")).unwrap();
    let vb = VarBuilder::from_tensors(trained.iter().cloned().collect(), DType::F32, &Device::Cpu);
    let reference = UNet2DConditionModel::load(vb, &config).unwrap();
    let case = lora_case();
    assert_eq!(
        max_abs_diff(&forward(&model.unet, &case), &forward(&reference, &case)),
        0.0
    );

    // Writing again (a second run into the same folder) replaces the model.
    let again: Vec<(String, Tensor)> = trained
        .iter()
        .map(|(n, t)| (n.clone(), t.affine(1.0, 0.01).unwrap()))
        .collect();
    output::write_final_model(&base, out.path(), &again).unwrap();
    let written = tensor_map(&out.path().join("unet/diffusion_pytorch_model.safetensors"));
    let conv_in = &again.iter().find(|(n, _)| n == "conv_in.weight").unwrap().1;
    assert_eq!(max_abs_diff(&written["conv_in.weight"], conv_in), 0.0);
    let leftovers: Vec<_> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    if let Some(export) = export_dir("final_model") {
        output::write_final_model(&base, &export, &trained).unwrap();
        checkpoint::write_safetensors(&export.join("source_unet.safetensors"), &trained, None)
            .unwrap();
    }
}

#[test]
fn final_model_from_a_plain_stable_diffusion_base_has_8_input_channels() {
    let base = common::fixture_pipeline("sd-plain-4ch");
    // conv_in grown 4 → 8 as the reference script grows it (new input channels zero).
    let tensors: Vec<(String, Tensor)> =
        read_tensors(&base.join("unet/diffusion_pytorch_model.safetensors"))
            .into_iter()
            .map(|(name, t)| {
                if name == "conv_in.weight" {
                    let zeros = t.zeros_like().unwrap();
                    (name, Tensor::cat(&[&t, &zeros], 1).unwrap())
                } else {
                    (name, t)
                }
            })
            .collect();
    let parent = tempfile::tempdir().unwrap();
    let model_dir = parent.path().join("new-model");
    output::write_final_model(&base, &model_dir, &tensors).unwrap();
    let config: Value =
        serde_json::from_str(&fs::read_to_string(model_dir.join("unet/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["in_channels"], 8);
    let model = InstructPix2PixModel::load(&model_dir, &load_options()).unwrap();
    assert_eq!(model.unet.config().in_channels, 8);
    // Nothing but the model folder was left in the parent.
    let names: Vec<_> = fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["new-model"]);
}

#[test]
fn final_model_refuses_weights_without_conv_in() {
    let base = common::fixture_pipeline("sd1-tiny");
    let out = tempfile::tempdir().unwrap();
    let err = output::write_final_model(&base, &out.path().join("m"), &[]).unwrap_err();
    assert!(err.to_string().contains("conv_in"), "{err}");
    assert!(!out.path().join("m").exists());
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_jsonl_appends_and_resume_drops_later_steps() {
    let out = tempfile::tempdir().unwrap();
    let mut log = MetricsLog::open(out.path()).unwrap();
    for step in 1..=5u64 {
        log.log_step(&StepMetrics {
            step,
            epoch: 0,
            loss: 0.5 / step as f64,
            lr: 1e-4,
            grad_norm: Some(1.25),
            seconds: step as f64 * 0.5,
        })
        .unwrap();
    }
    log.log(&json!({"step": 5, "validation": [{"prompt": "invert", "image": "v.png"}]}))
        .unwrap();
    assert!(log.log(&json!([1, 2])).is_err());
    drop(log);
    // A kill mid-line leaves a cut line at the end.
    let path = out.path().join(metrics::METRICS_FILE);
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("{\"step\": 6, \"lo");
    fs::write(&path, text).unwrap();

    let records = metrics::read_metrics(&path).unwrap();
    assert_eq!(records.len(), 6);
    assert_eq!(records[1]["loss"], 0.25);
    assert_eq!(records[1]["grad_norm"], 1.25);
    assert_eq!(records[5]["validation"][0]["prompt"], "invert");

    // Resuming from step 3: steps 4 and 5 (and the cut line) go, new steps follow.
    let mut log = MetricsLog::resume(out.path(), 3).unwrap();
    log.log_step(&StepMetrics {
        step: 4,
        epoch: 0,
        loss: 0.1,
        lr: 1e-4,
        grad_norm: None,
        seconds: 9.0,
    })
    .unwrap();
    let steps: Vec<u64> = metrics::read_metrics(&path)
        .unwrap()
        .iter()
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
}

#[test]
fn crc32c_matches_the_standard_check_value() {
    // The CRC-32C check value (RFC 3720 / iSCSI): crc32c("123456789") = 0xE3069283.
    assert_eq!(metrics::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(metrics::crc32c(b""), 0);
    // 32 zero bytes: RFC 3720 B.4's first vector.
    assert_eq!(metrics::crc32c(&[0u8; 32]), 0x8A91_36AA);
}

/// A minimal reader: TFRecord framing (checking both CRCs) and the Event fields written.
#[derive(Debug, PartialEq)]
struct ParsedEvent {
    wall_time: f64,
    step: i64,
    file_version: Option<String>,
    scalars: Vec<(String, f32)>,
}

fn read_varint(data: &[u8], pos: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = data[*pos];
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return value;
        }
        shift += 7;
    }
}

/// (field number, wire type, payload) of each field of a protobuf message.
fn fields(data: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < data.len() {
        let key = read_varint(data, &mut pos);
        let (field, wire) = (key >> 3, key & 7);
        let payload = match wire {
            0 => read_varint(data, &mut pos).to_le_bytes().to_vec(),
            1 => {
                pos += 8;
                data[pos - 8..pos].to_vec()
            }
            2 => {
                let len = read_varint(data, &mut pos) as usize;
                pos += len;
                data[pos - len..pos].to_vec()
            }
            5 => {
                pos += 4;
                data[pos - 4..pos].to_vec()
            }
            other => panic!("unexpected wire type {other}"),
        };
        out.push((field, wire, payload));
    }
    out
}

fn parse_event_file(path: &Path) -> Vec<ParsedEvent> {
    let data = fs::read(path).unwrap();
    let mut pos = 0;
    let mut events = Vec::new();
    while pos < data.len() {
        let len_bytes = &data[pos..pos + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(data[pos + 8..pos + 12].try_into().unwrap());
        assert_eq!(len_crc, metrics::masked_crc32c(len_bytes), "length CRC");
        let payload = &data[pos + 12..pos + 12 + len];
        let crc = u32::from_le_bytes(data[pos + 12 + len..pos + 16 + len].try_into().unwrap());
        assert_eq!(crc, metrics::masked_crc32c(payload), "payload CRC");
        pos += 16 + len;

        let mut event = ParsedEvent {
            wall_time: 0.0,
            step: 0,
            file_version: None,
            scalars: Vec::new(),
        };
        for (field, wire, bytes) in fields(payload) {
            match (field, wire) {
                (1, 1) => event.wall_time = f64::from_le_bytes(bytes.try_into().unwrap()),
                (2, 0) => event.step = u64::from_le_bytes(bytes.try_into().unwrap()) as i64,
                (3, 2) => event.file_version = Some(String::from_utf8(bytes).unwrap()),
                (5, 2) => {
                    for (value_field, _, value) in fields(&bytes) {
                        assert_eq!(value_field, 1);
                        let mut tag = String::new();
                        let mut simple = f32::NAN;
                        for (f, w, b) in fields(&value) {
                            match (f, w) {
                                (1, 2) => tag = String::from_utf8(b).unwrap(),
                                (2, 5) => simple = f32::from_le_bytes(b.try_into().unwrap()),
                                other => panic!("unexpected Summary.Value field {other:?}"),
                            }
                        }
                        event.scalars.push((tag, simple));
                    }
                }
                other => panic!("unexpected Event field {other:?}"),
            }
        }
        events.push(event);
    }
    events
}

#[test]
fn tensorboard_event_file_parses() {
    let dir = tempfile::tempdir().unwrap();
    let start = 1_764_000_000.25;
    let mut writer = TensorBoardWriter::create_at(dir.path(), start).unwrap();
    let name = writer
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("events.out.tfevents.1764000000."),
        "{name}"
    );
    let losses = [0.75f32, 0.5, 0.125];
    for (i, loss) in losses.iter().enumerate() {
        let step = i as i64 * 200 + 1;
        writer
            .add_scalars_at(
                step,
                &[("train_loss", *loss), ("lr", 5e-5)],
                start + i as f64,
            )
            .unwrap();
    }
    // Step numbers above 127 and 16383 take multi-byte varints; negative ones ten bytes.
    writer
        .add_scalars_at(70_000, &[("x", -1.5)], start + 9.0)
        .unwrap();
    writer
        .add_scalars_at(-2, &[("y", 0.0)], start + 10.0)
        .unwrap();

    let events = parse_event_file(writer.path());
    assert_eq!(events.len(), 6);
    assert_eq!(
        events[0],
        ParsedEvent {
            wall_time: start,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            scalars: vec![],
        }
    );
    for (i, loss) in losses.iter().enumerate() {
        let event = &events[i + 1];
        assert_eq!(event.step, i as i64 * 200 + 1);
        assert_eq!(event.wall_time, start + i as f64);
        assert_eq!(
            event.scalars,
            [("train_loss".to_string(), *loss), ("lr".to_string(), 5e-5)]
        );
    }
    assert_eq!(events[4].step, 70_000);
    assert_eq!(events[5].step, -2);

    // A second writer in the same second gets its own file.
    let other = TensorBoardWriter::create_at(dir.path(), start).unwrap();
    assert_ne!(other.path(), writer.path());

    if let Some(export) = export_dir("tensorboard") {
        let mut writer = TensorBoardWriter::create_at(&export, start).unwrap();
        for (i, loss) in losses.iter().enumerate() {
            writer
                .add_scalars_at(
                    i as i64 * 200 + 1,
                    &[("train_loss", *loss), ("lr", 5e-5)],
                    start + i as f64,
                )
                .unwrap();
        }
    }
}
