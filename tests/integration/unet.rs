//! The UNet against diffusers: tiny random-weight `UNet2DConditionModel`s saved by diffusers
//! (tests/fixtures/scripts/unet_refs.py), their inputs and diffusers' float32 outputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use instruct_pix2pix::model::unet::{UNet2DConditionModel, UNetConfig, UNetConfigError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet")
        .join(name)
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()))
}

fn load_model(name: &str, dtype: DType) -> UNet2DConditionModel {
    let dir = fixture(name);
    let config = UNetConfig::from_file(&dir.join("config.json")).expect("fixture config");
    let weights = load_tensors(&dir.join("diffusion_pytorch_model.safetensors"));
    let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    UNet2DConditionModel::load(vb, &config).expect("fixture weights")
}

struct Case {
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    output: Tensor,
}

fn load_case(model: &str, case: &str) -> Case {
    let tensors = load_tensors(&fixture(model).join("cases.safetensors"));
    let get = |field: &str| {
        tensors
            .get(&format!("{case}.{field}"))
            .unwrap_or_else(|| panic!("fixture {model}/{case}.{field} missing"))
            .clone()
    };
    Case {
        sample: get("sample"),
        timesteps: get("timesteps"),
        context: get("encoder_hidden_states"),
        output: get("output"),
    }
}

/// max |a − b| / max |b|.
fn relative_max_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims());
    let actual = actual.to_dtype(DType::F32).unwrap();
    let diff = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = expected
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale
}

/// Runs one fixture case in `dtype` and returns max |ours − diffusers| / max |diffusers|.
fn run_case(model: &UNet2DConditionModel, model_name: &str, case: &str, dtype: DType) -> f32 {
    let case_data = load_case(model_name, case);
    let sample = case_data.sample.to_dtype(dtype).unwrap();
    let context = case_data.context.to_dtype(dtype).unwrap();
    let out = model
        .forward(&sample, &case_data.timesteps, &context)
        .unwrap();
    assert_eq!(out.dtype(), dtype);
    let rel = relative_max_diff(&out, &case_data.output);
    println!("{model_name}/{case} {dtype:?}: max|diff| / max|ref| = {rel:.3e}");
    rel
}

// f32 against diffusers' f32: both sum the same products in different orders (im2col/gemm
// blocking, softmax and norm reductions), so differences are a few float32 ulps amplified through
// ~40 layers; 1e-4 of the output scale leaves a margin of ~10× over what is measured while any
// wrong weight, order or index gives errors of order 1.
const F32_TOLERANCE: f32 = 1e-4;

#[test]
fn sd1_shape_batch3_scalar_timestep_odd_latents_matches_diffusers() {
    let model = load_model("sd1", DType::F32);
    assert!(run_case(&model, "sd1", "batch3_scalar_t", DType::F32) < F32_TOLERANCE);
}

#[test]
fn sd1_shape_batch2_fractional_timesteps_matches_diffusers() {
    let model = load_model("sd1", DType::F32);
    assert!(run_case(&model, "sd1", "batch2_fractional_t", DType::F32) < F32_TOLERANCE);
}

#[test]
fn sd2_shape_linear_projection_head_list_matches_diffusers() {
    let model = load_model("sd2", DType::F32);
    assert!(run_case(&model, "sd2", "batch2_t", DType::F32) < F32_TOLERANCE);
    assert!(run_case(&model, "sd2", "batch1_odd", DType::F32) < F32_TOLERANCE);
}

#[test]
fn less_common_settings_match_diffusers() {
    // Two resnets per block, no mid block, downsample_padding 0, only_cross_attention, centred
    // input, custom time_embedding_dim, 1×1 conv_in, gelu, 7×6 latents.
    let model = load_model("variants", DType::F32);
    assert!(run_case(&model, "variants", "batch2_odd", DType::F32) < F32_TOLERANCE);
}

#[test]
fn timesteps_one_per_sample_equal_a_shared_scalar() {
    // The same timestep given as a scalar, as [1] and as [B] must give the same result.
    let model = load_model("sd1", DType::F32);
    let case = load_case("sd1", "batch3_scalar_t");
    let t = case.timesteps.to_scalar::<f32>().unwrap();
    let scalar = model
        .forward(&case.sample, &case.timesteps, &case.context)
        .unwrap();
    for timesteps in [
        Tensor::new(&[t], &Device::Cpu).unwrap(),
        Tensor::new(&[t, t, t], &Device::Cpu).unwrap(),
    ] {
        let out = model
            .forward(&case.sample, &timesteps, &case.context)
            .unwrap();
        assert_eq!(relative_max_diff(&out, &scalar), 0.0);
    }
    let wrong = Tensor::new(&[t, t], &Device::Cpu).unwrap();
    assert!(model.forward(&case.sample, &wrong, &case.context).is_err());
}

// Half precision: weights, activations and the conv/matmul outputs are rounded to 11 (f16) or 8
// (bf16) mantissa bits at every layer; against the f32 reference the error is then about 1e-3
// (f16) / 1e-2 (bf16) of the output scale. The bounds catch a broken half path (NaN, a missing
// cast, wrong ordering) without flaking on rounding.
#[test]
fn f16_runs_close_to_the_f32_reference() {
    let model = load_model("sd1", DType::F16);
    let rel = run_case(&model, "sd1", "batch2_fractional_t", DType::F16);
    assert!(rel < 1e-2, "sd1 f16: {rel}");
    let model = load_model("sd2", DType::F16);
    let rel = run_case(&model, "sd2", "batch2_t", DType::F16);
    assert!(rel < 1e-2, "sd2 f16: {rel}");
}

/// bf16 on the CPU: candle 0.11.1's CPU matmul (and so its conv2d) accepts only F16/F32/F64, so a
/// bf16 forward there must fail with that dtype error (not panic); wherever candle runs it
/// (CUDA, or a later CPU backend) it must be close to the reference.
#[test]
fn bf16_is_close_to_the_f32_reference_or_refused_by_candle() {
    let model = load_model("sd2", DType::BF16);
    let case = load_case("sd2", "batch2_t");
    let sample = case.sample.to_dtype(DType::BF16).unwrap();
    let context = case.context.to_dtype(DType::BF16).unwrap();
    match model.forward(&sample, &case.timesteps, &context) {
        Ok(out) => {
            let rel = relative_max_diff(&out, &case.output);
            println!("sd2/batch2_t BF16: {rel:.3e}");
            assert!(rel < 5e-2, "bf16: {rel}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains("BF16") && message.contains("matmul"),
                "unexpected bf16 error: {message}"
            );
        }
    }
}

fn sd1_config_with(field: &str, value: serde_json::Value) -> Result<UNetConfig, UNetConfigError> {
    let text = std::fs::read_to_string(fixture("sd1").join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[field] = value;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, json.to_string()).unwrap();
    UNetConfig::from_file(&path)
}

#[test]
fn unsupported_features_are_refused_by_name() {
    use serde_json::json;
    let cases = [
        ("class_embed_type", json!("timestep")),
        ("addition_embed_type", json!("text_time")),
        ("num_attention_heads", json!(8)),
        (
            "down_block_types",
            json!(["AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
        ),
        ("mid_block_type", json!("UNetMidBlock2DSimpleCrossAttn")),
        ("resnet_time_scale_shift", json!("scale_shift")),
        ("time_embedding_type", json!("fourier")),
        ("encoder_hid_dim", json!(64)),
        ("dual_cross_attention", json!(true)),
        ("act_fn", json!("mish")),
    ];
    for (field, value) in cases {
        match sd1_config_with(field, value.clone()) {
            Err(UNetConfigError::InFile { path, source }) => {
                assert!(path.ends_with("config.json"));
                match *source {
                    UNetConfigError::Unsupported { field: named, .. } => {
                        assert_eq!(named, field, "{field} = {value}")
                    }
                    other => panic!("{field} = {value}: unexpected error {other}"),
                }
            }
            other => panic!("{field} = {value}: expected a refusal, got {other:?}"),
        }
    }
    // A per-block list of the wrong length is an invalid config, not a crash.
    assert!(matches!(
        sd1_config_with("attention_head_dim", json!([2, 2])),
        Err(UNetConfigError::InFile { .. })
    ));
    // Sizes that would overflow the arithmetic (a fuzz finding) are refused by name.
    match sd1_config_with("block_out_channels", json!([4611686018427387904_u64, 64])) {
        Err(error) => assert!(error.to_string().contains("block_out_channels"), "{error}"),
        Ok(_) => panic!("a block of 2^62 channels was accepted"),
    }
    // The unchanged fixture is accepted, and load() refuses an invalid config too.
    let mut config = sd1_config_with("sample_size", json!(8)).unwrap();
    config.class_embed_type = Some("timestep".into());
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let err = UNet2DConditionModel::load(vb, &config).unwrap_err();
    assert!(err.to_string().contains("class_embed_type"), "{err}");
}

#[test]
fn missing_or_malformed_config_names_the_file() {
    let missing = fixture("nope").join("config.json");
    let err = UNetConfig::from_file(&missing).unwrap_err();
    assert!(matches!(err, UNetConfigError::Read { .. }));
    assert!(err.to_string().contains("nope"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"block_out_channels": "wide"}"#).unwrap();
    let err = UNetConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, UNetConfigError::Parse { .. }));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

/// Builds fixture `name` with every weight a `Var` of `varmap`.
fn load_trainable(name: &str, varmap: &VarMap) -> UNet2DConditionModel {
    let dir = fixture(name);
    let weights = load_tensors(&dir.join("diffusion_pytorch_model.safetensors"));
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, tensor) in weights {
            data.insert(name, Var::from_tensor(&tensor).unwrap());
        }
    }
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    UNet2DConditionModel::load(vb, &config).unwrap()
}

/// loss = mean(output²) on one fixture case; asserts that every weight of the file gets a
/// nonzero gradient (a weight the network never reads, or an op without backward on its path,
/// leaves it without one). Returns the loss, the gradients and the variables by name.
fn backward_reaches_every_weight(
    name: &str,
    case: &str,
) -> (
    Tensor,
    candle_core::backprop::GradStore,
    HashMap<String, Var>,
) {
    let varmap = VarMap::new();
    let model = load_trainable(name, &varmap);
    let vars = varmap.data().lock().unwrap().clone();
    let case = load_case(name, case);
    let out = model
        .forward(&case.sample, &case.timesteps, &case.context)
        .unwrap();
    let loss = out.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    let mut missing: Vec<&String> = vars
        .iter()
        .filter(|(_, var)| {
            grads.get(var.as_tensor()).is_none_or(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
        })
        .map(|(name, _)| name)
        .collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{name}: {} of {} weights got no gradient: {missing:?}",
        missing.len(),
        vars.len()
    );
    println!("{name}: all {} weights got a gradient", vars.len());
    (loss, grads, vars)
}

#[test]
fn every_weight_gets_a_gradient_matching_torch() {
    let (loss, grads, vars) = backward_reaches_every_weight("sd1", "batch2_fractional_t");
    // The gradients themselves against torch's for the same loss (8×6 latents: the backward of
    // both the odd-size and the ×2 upsample, attention softmax and layer norms).
    let reference = load_tensors(&fixture("sd1").join("grads.safetensors"));
    let loss_rel = relative_max_diff(&loss, &reference["loss"]);
    assert!(loss_rel < F32_TOLERANCE, "loss {loss_rel}");
    for (name, expected) in &reference {
        if name == "loss" {
            continue;
        }
        let grad = grads.get(vars[name].as_tensor()).unwrap();
        let rel = relative_max_diff(grad, expected);
        println!("grad {name}: {rel:.3e}");
        // Gradients pass through ~2× the layers of the forward; same reasoning as F32_TOLERANCE.
        assert!(rel < 1e-3, "gradient of {name}: relative difference {rel}");
    }
}

#[test]
fn every_weight_gets_a_gradient_in_the_other_shapes() {
    // Linear projections, two transformer layers, 5×7 latents.
    backward_reaches_every_weight("sd2", "batch1_odd");
    // Stride-2 convolutions of 7×6 and explicitly padded inputs, only_cross_attention.
    backward_reaches_every_weight("variants", "batch2_odd");
}

/// A weight source that hands out zero tensors (broadcast, no memory) of whatever shape is asked
/// and records every request in `requested`.
struct RecordingBackend {
    requested: Arc<Mutex<HashMap<String, Vec<usize>>>>,
}

impl candle_nn::var_builder::SimpleBackend for RecordingBackend {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let previous = self
            .requested
            .lock()
            .unwrap()
            .insert(name.to_string(), shape.dims().to_vec());
        assert!(previous.is_none(), "{name} requested twice");
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: unchecked access is not expected")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn full_size_models_read_exactly_diffusers_weights() {
    // timbrooks/instruct-pix2pix (SD 1.5, 8 input channels) and SD 2.1: every weight name and
    // shape of diffusers' state dict, none more, none fewer.
    for name in ["ip2p_sd15", "sd21"] {
        let dir = fixture("full_size").join(name);
        let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
        let shapes = std::fs::read_to_string(dir.join("weight_shapes.json")).unwrap();
        let expected: HashMap<String, Vec<usize>> = serde_json::from_str(&shapes).unwrap();
        let requested = Arc::new(Mutex::new(HashMap::new()));
        let backend = RecordingBackend {
            requested: requested.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
        UNet2DConditionModel::load(vb, &config).unwrap();
        let requested = requested.lock().unwrap().clone();
        let mut missing: Vec<_> = expected
            .keys()
            .filter(|k| !requested.contains_key(*k))
            .collect();
        let mut extra: Vec<_> = requested
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .collect();
        missing.sort();
        extra.sort();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: not read {missing:?}, unknown {extra:?}"
        );
        for (weight, shape) in &expected {
            assert_eq!(&requested[weight], shape, "{name}: shape of {weight}");
        }
        println!(
            "{name}: {} weights read with diffusers' shapes",
            expected.len()
        );
    }
}
