//! The schedulers against diffusers 0.42.1's own numbers (tests/fixtures/schedulers, made by
//! tests/fixtures/scripts/scheduler_refs.py): timesteps exactly; sigmas, init_noise_sigma and
//! every `scale_model_input` / `step` output of full denoising loops to float32 rounding, feeding
//! the very noise diffusers drew.
//!
//! Why not bit-exact everywhere: torch's CPU `sqrt`, `log` and `exp` on float32 (MKL/SLEEF, also
//! for 0-d tensors) are faithful but not correctly rounded: about 0.5% of `sqrt` results are one
//! ulp below the correctly rounded value Rust gives. Everything without them (linspace, cumprod,
//! timesteps) is compared bit for bit.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use instruct_pix2pix::pipeline::scheduler::{
    NoiseSchedule, NoiseSource, SchedulerConfig, SchedulerError, SchedulerKind, build_scheduler,
};
use serde_json::Value;

/// Step outputs differ from torch's by a few float32 roundings (one-ulp sqrt/log/exp
/// differences in the coefficients, compounded over up to 50 steps); this bounds
/// |actual − expected| / max(|expected|, 1), i.e. relative for values above 1.
const STEP_TOLERANCE: f32 = 1e-6;

/// Sigma tables: each value is a few float32 operations (one of them a torch sqrt) away from the
/// betas, so a few ulps (float32 epsilon is 1.2e-7) relative.
const SIGMA_TOLERANCE: f64 = 5e-7;

/// The step tolerance for a loop case. `dpm_cos_karras` is ill-conditioned on purpose: cosine
/// betas with Karras sigmas start at sigma ≈ 2·10⁴, the fixture's toy model (not a denoiser)
/// makes x0 predictions of order 10⁵, and DPM-Solver++'s second-order term divides by the
/// lambda step, so torch's one-ulp-low sqrt of sigma²+1 at sigma = 1773.39 (checked in Python)
/// grows to ~7e-4 over the later steps. Every other case is within `STEP_TOLERANCE` (most are
/// bit-exact).
fn step_tolerance(case: &str) -> f32 {
    if case == "dpm_cos_karras" {
        1e-3
    } else {
        STEP_TOLERANCE
    }
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

struct Fixtures {
    meta: Value,
    tensors: HashMap<String, Tensor>,
}

fn fixtures() -> Fixtures {
    let dir = fixture_dir();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("tensors.safetensors"), &Device::Cpu).unwrap();
    Fixtures { meta, tensors }
}

impl Fixtures {
    fn tensor(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("fixture tensor {key} missing"))
    }

    /// A fixture array as float64 (timesteps are stored as float64, sigmas as float32).
    fn f64s(&self, key: &str) -> Vec<f64> {
        self.tensor(key)
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}

fn config_of(value: &Value) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&value.to_string()).unwrap()
}

fn kind_of(value: &Value) -> Option<SchedulerKind> {
    value.as_str().map(|name| name.parse().unwrap())
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest |actual − expected| / max(|expected|, 1).
fn max_scaled_error(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims());
    values(actual)
        .iter()
        .zip(values(expected))
        .map(|(a, e)| (a - e).abs() / e.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// Largest relative error (exact zeros must match exactly); lengths must agree.
fn max_relative_error(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "lengths");
    actual
        .iter()
        .zip(expected)
        .map(|(a, e)| if e == a { 0.0 } else { (a - e).abs() / e.abs() })
        .fold(0.0, f64::max)
}

fn as_f64(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// Timesteps must be identical, except the fractional ones of Euler with Karras sigmas: they
/// come from interpolating log-sigmas that numpy (float32 SIMD log) and torch (sqrt) round
/// within an ulp of the correctly rounded values this crate computes, so they may differ by a
/// few float32 ulps (2e-7 relative); integer timesteps (DPM-Solver's rounded Karras ones
/// included) are exact.
fn check_timesteps(actual: &[f64], expected: &[f64], config: &Value, target: &Value, what: &str) {
    let class = target
        .as_str()
        .map(|t| t.parse::<SchedulerKind>().unwrap().class_name())
        .or(config["_class_name"].as_str())
        .unwrap();
    let fractional_karras =
        class == "EulerDiscreteScheduler" && config["use_karras_sigmas"] == Value::Bool(true);
    if fractional_karras {
        let error = max_relative_error(actual, expected);
        assert!(error <= 1e-6, "{what} timesteps: {error}");
    } else {
        assert_eq!(actual, expected, "{what} timesteps");
    }
}

/// Hands out the noise diffusers drew, in order, checking the shapes asked for.
struct RecordedNoise {
    draws: Vec<Tensor>,
    next: usize,
}

impl NoiseSource for RecordedNoise {
    fn standard_normal(&mut self, shape: &[usize]) -> Vec<f32> {
        let draw = self
            .draws
            .get(self.next)
            .unwrap_or_else(|| panic!("scheduler drew more noise than diffusers ({})", self.next));
        assert_eq!(draw.dims(), shape, "noise shape of draw {}", self.next);
        self.next += 1;
        values(draw)
    }
}

#[test]
fn denoising_loops_match_diffusers() {
    let fx = fixtures();
    let mut worst = 0f32;
    let mut worst_sigma = 0f64;
    let mut exact_steps = 0usize;
    let mut total_steps = 0usize;
    for case in fx.meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let key = format!("{name}/{steps}");
        let config = config_of(&case["config"]);
        let mut scheduler = build_scheduler(&config, kind_of(&case["target"]), steps)
            .unwrap_or_else(|e| panic!("{key}: {e}"));

        check_timesteps(
            scheduler.timesteps(),
            &fx.f64s(&format!("{key}/timesteps")),
            &case["config"],
            &case["target"],
            &key,
        );
        let init_error = max_relative_error(
            &[scheduler.init_noise_sigma()],
            &fx.f64s(&format!("{key}/init_noise_sigma")),
        );
        assert!(
            init_error <= SIGMA_TOLERANCE,
            "{key} init_noise_sigma: {init_error}"
        );
        if case["sigma_based"].as_bool().unwrap() {
            let expected = fx.f64s(&format!("{key}/sigmas"));
            let error = max_relative_error(&as_f64(scheduler.sigmas().unwrap()), &expected);
            assert!(error <= SIGMA_TOLERANCE, "{key} sigmas: {error}");
            worst_sigma = worst_sigma.max(error);
        } else {
            assert!(scheduler.sigmas().is_none(), "{key}");
        }

        let scaled = fx.tensor(&format!("{key}/scaled"));
        let outputs = fx.tensor(&format!("{key}/model_output"));
        let prevs = fx.tensor(&format!("{key}/prev_sample"));
        let draws = match fx.tensors.get(&format!("{key}/noise")) {
            Some(noise) => (0..noise.dim(0).unwrap())
                .map(|i| noise.get(i).unwrap())
                .collect(),
            None => Vec::new(),
        };
        let mut noise = RecordedNoise { draws, next: 0 };
        let tolerance = step_tolerance(name);
        let mut sample = fx.tensor(&format!("{key}/sample0")).clone();
        for i in 0..steps {
            let scaled_actual = scheduler.scale_model_input(&sample, i).unwrap();
            let scaled_error = max_scaled_error(&scaled_actual, &scaled.get(i).unwrap());
            assert!(
                scaled_error <= tolerance,
                "{key} scale_model_input {i}: {scaled_error}"
            );
            sample = scheduler
                .step(&outputs.get(i).unwrap(), i, &sample, &mut noise)
                .unwrap();
            let error = max_scaled_error(&sample, &prevs.get(i).unwrap());
            assert!(error <= tolerance, "{key} step {i}: error {error}");
            assert!(scheduler.pred_original_sample().is_some());
            if tolerance == STEP_TOLERANCE {
                worst = worst.max(error);
            }
            exact_steps += usize::from(error == 0.0);
            total_steps += 1;
        }
        assert_eq!(
            noise.next,
            case["noise_draws"].as_u64().unwrap() as usize,
            "{key}: number of noise draws"
        );
    }
    eprintln!(
        "{total_steps} steps, {exact_steps} bit-exact, worst step error {worst:e}, \
         worst sigma error {worst_sigma:e}"
    );
}

#[test]
fn timestep_and_sigma_sweeps_match_diffusers() {
    let fx = fixtures();
    let mut checked = 0;
    let mut worst_sigma = 0f64;
    let mut exact_sigmas = 0usize;
    for sweep in fx.meta["sweeps"].as_array().unwrap() {
        let name = sweep["name"].as_str().unwrap();
        let config = config_of(&sweep["config"]);
        let kind = kind_of(&sweep["target"]);
        for steps in sweep["steps"].as_array().unwrap() {
            let n = steps.as_u64().unwrap() as usize;
            let scheduler = build_scheduler(&config, kind, n).unwrap();
            let expected = fx.f64s(&format!("sweep/{name}/{n}/timesteps"));
            let what = format!("{name} n={n}");
            check_timesteps(
                scheduler.timesteps(),
                &expected,
                &sweep["config"],
                &sweep["target"],
                &what,
            );
            if let Some(sigmas) = fx.tensors.get(&format!("sweep/{name}/{n}/sigmas")) {
                let error = max_relative_error(
                    &as_f64(scheduler.sigmas().unwrap()),
                    &as_f64(&values(sigmas)),
                );
                assert!(error <= SIGMA_TOLERANCE, "{name} n={n} sigmas: {error}");
                worst_sigma = worst_sigma.max(error);
                exact_sigmas += usize::from(error == 0.0);
            }
            checked += 1;
        }
    }
    assert!(checked > 500, "only {checked} schedules checked");
    eprintln!("{checked} schedules, {exact_sigmas} sigma tables bit-exact, worst {worst_sigma:e}");
}

#[test]
fn training_noise_matches_ddpm_add_noise_and_get_velocity() {
    let fx = fixtures();
    let train = &fx.meta["training"];
    let timesteps: Vec<u32> = train["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let original = fx.tensor("train/original");
    let noise = fx.tensor("train/noise");
    for entry in train["configs"].as_array().unwrap() {
        let name = entry["name"].as_str().unwrap();
        let schedule = NoiseSchedule::from_config(&config_of(&entry["config"])).unwrap();
        assert_eq!(schedule.num_train_timesteps(), 1000);
        let expected = values(fx.tensor(&format!("train/{name}/alphas_cumprod")));
        if name.ends_with("zsnr") {
            // Zero-SNR rescaling goes through torch's (not correctly rounded) sqrt.
            let error = max_relative_error(&as_f64(schedule.alphas_cumprod()), &as_f64(&expected));
            assert!(error <= 1e-6, "{name} alphas_cumprod: {error}");
        } else {
            // linspace (fused multiply-add), square and float64-accumulated cumprod: bit-exact.
            assert_eq!(schedule.alphas_cumprod(), expected, "{name} alphas_cumprod");
        }
        for (dtype_name, dtype) in [
            ("f32", DType::F32),
            ("bf16", DType::BF16),
            ("f16", DType::F16),
        ] {
            let o = original.to_dtype(dtype).unwrap();
            let e = noise.to_dtype(dtype).unwrap();
            let noisy = schedule.add_noise(&o, &e, &timesteps).unwrap();
            let velocity = schedule.velocity(&o, &e, &timesteps).unwrap();
            assert_eq!(noisy.dtype(), dtype);
            // Same products and sums in the same dtype; only the coefficients' sqrt (torch's is
            // not correctly rounded) may move a result by about one ulp of the dtype. Measured:
            // bit-exact except cos_zsnr f32 (1.6e-7).
            let tolerance = match dtype {
                DType::F32 => 5e-7,
                DType::F16 => 1e-3,
                _ => 8e-3,
            };
            for (what, actual) in [("add_noise", noisy), ("velocity", velocity)] {
                let expected = fx.tensor(&format!("train/{name}/{dtype_name}/{what}"));
                let error = max_scaled_error(&actual.to_dtype(DType::F32).unwrap(), expected);
                assert!(error <= tolerance, "{name} {dtype_name} {what}: {error}");
            }
        }
    }
    let schedule = NoiseSchedule::from_config(&config_of(&train["configs"][0]["config"])).unwrap();
    assert!(
        schedule
            .add_noise(original, noise, &[0, 1000, 2, 3])
            .is_err()
    );
    assert!(schedule.add_noise(original, noise, &[0, 1]).is_err());
}

/// An SD-style DPM-Solver config with the keys of `extra` (a JSON object's members) added or
/// replaced.
fn config_with(extra: &str) -> SchedulerConfig {
    let mut config: Value = serde_json::from_str(
        r#"{"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012}"#,
    )
    .unwrap();
    let extra: Value =
        serde_json::from_str(&format!("{{{}}}", extra.trim_start_matches(','))).unwrap();
    for (key, value) in extra.as_object().unwrap() {
        config[key] = value.clone();
    }
    config_of(&config)
}

#[test]
fn unsupported_options_are_rejected() {
    let rejected = [
        (
            r#", "algorithm_type": "sde-dpmsolver++""#,
            SchedulerKind::DpmSolverMultistep,
        ),
        (r#", "solver_order": 3"#, SchedulerKind::DpmSolverMultistep),
        (
            r#", "use_lu_lambdas": true"#,
            SchedulerKind::DpmSolverMultistep,
        ),
        (
            r#", "variance_type": "learned_range""#,
            SchedulerKind::DpmSolverMultistep,
        ),
        (r#", "variance_type": "learned_range""#, SchedulerKind::Ddpm),
        (r#", "thresholding": true"#, SchedulerKind::Ddim),
        (
            r#", "interpolation_type": "log_linear""#,
            SchedulerKind::Euler,
        ),
        (r#", "use_exponential_sigmas": true"#, SchedulerKind::Euler),
        (
            r#", "prediction_type": "sample""#,
            SchedulerKind::EulerAncestral,
        ),
        (
            r#", "prediction_type": "flow_prediction""#,
            SchedulerKind::Euler,
        ),
        (r#", "beta_schedule": "sigmoid""#, SchedulerKind::Ddpm),
        (r#", "timestep_spacing": "karras""#, SchedulerKind::Ddim),
        (r#", "final_sigmas_type": "denoised""#, SchedulerKind::Euler),
    ];
    for (extra, kind) in rejected {
        let result = build_scheduler(&config_with(extra), Some(kind), 10);
        assert!(
            matches!(result, Err(SchedulerError::Unsupported { .. })),
            "{kind} {extra} was accepted"
        );
    }
    let unknown_class =
        SchedulerConfig::from_json_str(r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
    assert!(matches!(
        build_scheduler(&unknown_class, None, 10),
        Err(SchedulerError::Unsupported { .. })
    ));
    for kind in SchedulerKind::ALL {
        assert!(matches!(
            build_scheduler(&config_with(""), Some(kind), 0),
            Err(SchedulerError::InvalidValue { .. })
        ));
    }
    assert!(matches!(
        build_scheduler(&config_with(""), Some(SchedulerKind::Ddim), 1001),
        Err(SchedulerError::InvalidValue { .. })
    ));
    let clipped_away =
        config_with(r#""lambda_min_clipped": 100.0, "timestep_spacing": "trailing""#);
    assert!(matches!(
        build_scheduler(&clipped_away, None, 10),
        Err(SchedulerError::InvalidValue { .. })
    ));
}

/// Noise of the wrong length is an error, not a panic or a silent truncation.
struct ShortNoise;

impl NoiseSource for ShortNoise {
    fn standard_normal(&mut self, _shape: &[usize]) -> Vec<f32> {
        vec![0.0; 3]
    }
}

#[test]
fn misuse_is_reported_as_errors() {
    let sample = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut ancestral =
        build_scheduler(&config_with(""), Some(SchedulerKind::EulerAncestral), 5).unwrap();
    assert!(
        ancestral
            .step(&sample, 0, &sample, &mut ShortNoise)
            .is_err()
    );
    assert!(ancestral.scale_model_input(&sample, 5).is_err());

    let mut dpm = build_scheduler(&config_with(""), None, 5).unwrap();
    // Multistep state: steps must come in order.
    assert!(dpm.step(&sample, 1, &sample, &mut ShortNoise).is_err());
    assert!(dpm.step(&sample, 0, &sample, &mut ShortNoise).is_ok());
    assert!(dpm.step(&sample, 5, &sample, &mut ShortNoise).is_err());

    // DDIM with eta = 0 and Euler draw no noise at all.
    for kind in [SchedulerKind::Ddim, SchedulerKind::Euler] {
        let mut scheduler = build_scheduler(&config_with(""), Some(kind), 5).unwrap();
        assert!(scheduler.step(&sample, 0, &sample, &mut ShortNoise).is_ok());
    }
}

#[test]
fn half_precision_outputs_keep_the_model_dtype() {
    let config = config_with("");
    let sample = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let output = sample.to_dtype(DType::BF16).unwrap();
    let mut noise = RecordedNoise {
        draws: vec![Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap(); 4],
        next: 0,
    };
    for kind in SchedulerKind::ALL {
        let mut scheduler = build_scheduler(&config, Some(kind), 4).unwrap();
        let scaled = scheduler
            .scale_model_input(&sample.to_dtype(DType::F16).unwrap(), 0)
            .unwrap();
        assert_eq!(scaled.dtype(), DType::F16, "{kind}");
        let prev = scheduler.step(&output, 0, &sample, &mut noise).unwrap();
        assert_eq!(prev.dtype(), DType::BF16, "{kind}");
        noise.next = 0;
    }
}

#[test]
fn config_files_are_read_with_python_json_quirks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    // As diffusers' save_pretrained writes a DPM-Solver config: bare -Infinity, nulls.
    std::fs::write(
        &path,
        r#"{"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1",
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
            "lambda_min_clipped": -Infinity, "variance_type": null, "trained_betas": null,
            "timestep_spacing": "linspace", "steps_offset": 1}"#,
    )
    .unwrap();
    let config = SchedulerConfig::from_file(&path).unwrap();
    assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
    let scheduler = build_scheduler(&config, None, 5).unwrap();
    assert_eq!(scheduler.timesteps(), [999.0, 799.0, 599.0, 400.0, 200.0]);

    assert!(matches!(
        SchedulerConfig::from_file(&dir.path().join("missing.json")),
        Err(SchedulerError::Io { .. })
    ));
    std::fs::write(&path, "{\"beta_start\": 0.1}").unwrap();
    assert!(matches!(
        SchedulerConfig::from_file(&path),
        Err(SchedulerError::Json { .. })
    ));
}
