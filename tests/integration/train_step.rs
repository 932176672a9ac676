//! One training step against `train_instruct_pix2pix.py` (diffusers 0.42.1, torch 2.15 CPU):
//! the loss, the conditioning after dropout, the gradients and their total norm, conv_in growth,
//! AdamW with clipping and accumulation, the LR schedules and the EMA. The references are made by
//! tests/fixtures/scripts/train_step_refs.py with the same weights, inputs and random draws.

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use instruct_pix2pix::train::data::TrainBatch;
use instruct_pix2pix::train::ema::{EmaConfig, EmaModel};
use instruct_pix2pix::train::optim::{AdamW, AdamWConfig, clip_coefficient, total_grad_norm};
use instruct_pix2pix::train::schedule::{LrSchedule, LrScheduleKind};
use instruct_pix2pix::train::step::{
    DroppedConditioning, StepConfig, StepDraws, TrainLoadOptions, Trainer, TrainingModels,
};
use serde_json::Value;

fn refs_dir() -> PathBuf {
    common::fixtures().join("train_step")
}

fn load_refs(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(refs_dir().join(file), &Device::Cpu).unwrap()
}

fn load_json(file: &str) -> Value {
    let text = std::fs::read_to_string(refs_dir().join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load_models(pipeline: &str) -> TrainingModels {
    TrainingModels::load(
        &common::fixture_pipeline(pipeline),
        &TrainLoadOptions::default(),
    )
    .unwrap()
}

/// The script's pixels: `2 * (u8 / 255) - 1` in f32.
fn pixels(u8_images: &Tensor) -> Tensor {
    let values: Vec<f32> = u8_images
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .into_iter()
        .map(|v| 2.0 * (v as f32 / 255.0) - 1.0)
        .collect();
    Tensor::from_vec(values, u8_images.dims(), &Device::Cpu).unwrap()
}

/// The script's `PROMPTS` (train_step_refs.py): a case of batch size B uses the first B, micro-batch
/// m of the three-step run `PROMPTS[m % 2 * 2..][..2]`.
const PROMPTS: [&str; 4] = [
    "make it snowy",
    "turn the sky pink",
    "add a red hat please",
    "invert the colors",
];

/// The batch and draws stored under `prefix` (e.g. "" or "mb3."), with `prompts`; the token ids
/// the Rust side makes of them must equal the stored `input_ids`.
fn batch_and_draws(
    models: &TrainingModels,
    refs: &HashMap<String, Tensor>,
    prefix: &str,
    prompts: &[&str],
) -> (TrainBatch, StepDraws) {
    let get = |name: &str| refs[&format!("{prefix}{name}")].clone();
    let ids = models.tokenize(prompts).unwrap();
    assert_eq!(
        ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
        get("input_ids").to_vec2::<i64>().unwrap(),
        "token ids of {prompts:?}"
    );
    let batch = TrainBatch {
        original_pixel_values: pixels(&get("original_u8")),
        edited_pixel_values: pixels(&get("edited_u8")),
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        names: (0..prompts.len()).map(|i| format!("{prefix}{i}")).collect(),
    };
    let draws = StepDraws {
        latent_sample_noise: get("vae_noise"),
        noise: get("noise"),
        timesteps: get("timesteps")
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|t| t as u32)
            .collect(),
        dropout_draws: get("dropout_draws").to_vec1::<f32>().unwrap(),
    };
    (batch, draws)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |actual − expected| / max |expected|.
fn relative_max_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims());
    let diff = max_abs(&(actual.to_dtype(DType::F32).unwrap() - expected).unwrap());
    diff / max_abs(expected).max(f32::MIN_POSITIVE)
}

fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

fn param<'a>(params: &'a [(String, Var)], name: &str) -> &'a Var {
    &params.iter().find(|(n, _)| n == name).unwrap().1
}

/// Names of the gradients stored in a reference file (`grad.NAME`).
fn grad_names(refs: &HashMap<String, Tensor>) -> Vec<String> {
    let mut names: Vec<String> = refs
        .keys()
        .filter_map(|k| k.strip_prefix("grad.").map(str::to_string))
        .collect();
    names.sort();
    names
}

// Loss and conditioning: the same f32 operations as torch in different summation orders
// (convolutions, attention, norms, the mean), a few ulps amplified through ~40 layers of VAE and
// text encoder; 1e-5 relative leaves a margin over what is measured (≈1e-6) while any wrong
// mask, scale or index gives errors of order 1.
const FORWARD_TOLERANCE: f32 = 1e-5;
// Gradients run through about twice the layers of the forward and through cancellations in the
// backward of softmax and normalisations: differences of ~1e-6 of the gradient's scale measured;
// 1e-4 of the largest element keeps a wide margin and still fails for any missing term.
const GRAD_TOLERANCE: f32 = 1e-4;
// Weight updates after AdamW: Adam divides by √v + ε, so where a clipped gradient is as small
// as ε (1e-8) the update lr·g/(|g| + ε) turns a gradient difference of 1e-6 of its scale into one
// ~1e5 times larger relative to lr. Measured: at most 7.3e-4 of the largest update (moments agree
// to 1e-5, the arithmetic alone to ulps in `adamw_clipping_and_ema_arithmetic_equal_torch`).
// 2e-3 still fails for a missing weight decay (lr·wd·|w| is ~3e-2 of lr here) or bias correction.
const UPDATE_TOLERANCE: f32 = 2e-3;

/// Runs one micro-batch of `file`'s inputs through the trainer (k = 1, so the accumulated
/// gradients are the micro-batch's) and compares everything with diffusers.
fn check_single_step(pipeline: &str, file: &str) -> (Trainer, HashMap<String, Tensor>) {
    check_single_step_with(pipeline, file, |_, _| {})
}

/// [`check_single_step`], with `prepare` adjusting the loaded models first (given the refs).
fn check_single_step_with(
    pipeline: &str,
    file: &str,
    prepare: impl FnOnce(&TrainingModels, &HashMap<String, Tensor>),
) -> (Trainer, HashMap<String, Tensor>) {
    let refs = load_refs(file);
    let models = load_models(pipeline);
    prepare(&models, &refs);
    let bsz = refs["original_u8"].dims()[0];
    let (batch, draws) = batch_and_draws(&models, &refs, "", &PROMPTS[..bsz]);

    let out = models.micro_batch_loss(&batch, &draws, Some(0.3)).unwrap();
    let loss_rel = (scalar(&out.loss) - scalar(&refs["loss"])).abs() / scalar(&refs["loss"]);
    println!("{file}: loss {} (rel {loss_rel:.2e})", scalar(&out.loss));
    assert!(
        loss_rel < FORWARD_TOLERANCE,
        "loss: relative difference {loss_rel}"
    );
    let rel = relative_max_diff(&out.encoder_hidden_states, &refs["encoder_hidden_states"]);
    assert!(
        rel < FORWARD_TOLERANCE,
        "text conditioning after dropout: {rel}"
    );
    let rel = relative_max_diff(&out.unet_input, &refs["unet_input"]);
    assert!(rel < FORWARD_TOLERANCE, "UNet input after dropout: {rel}");

    let schedule = LrSchedule::new(LrScheduleKind::Constant, 1e-4, 0, 1).unwrap();
    let config = StepConfig {
        gradient_accumulation_steps: 1,
        max_grad_norm: 1.0,
        conditioning_dropout_prob: Some(0.3),
    };
    let mut trainer = Trainer::new(models, AdamWConfig::default(), schedule, None, config).unwrap();
    let started = Instant::now();
    let report = trainer.accumulate(&batch, &draws).unwrap();
    let (b, _, r, _) = batch.edited_pixel_values.dims4().unwrap();
    println!(
        "{file}: forward + backward of {b} samples at {r}² in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(report.loss, scalar(&out.loss));

    let params = trainer.params().to_vec();
    let grads = trainer.accumulated_gradients().to_vec();
    for name in grad_names(&refs) {
        let index = params.iter().position(|(n, _)| *n == name).unwrap();
        let grad = grads[index].as_ref().unwrap();
        let rel = relative_max_diff(grad, &refs[&format!("grad.{name}")]);
        println!("  grad {name}: {rel:.2e}");
        assert!(
            rel < GRAD_TOLERANCE,
            "gradient of {name}: relative difference {rel}"
        );
    }
    let norm = total_grad_norm(&grads).unwrap();
    let norm_rel = (norm - scalar(&refs["grad_norm"])).abs() / scalar(&refs["grad_norm"]);
    println!("  total grad norm {norm} (rel {norm_rel:.2e})");
    assert!(norm_rel < GRAD_TOLERANCE, "total gradient norm: {norm_rel}");
    (trainer, refs)
}

#[test]
fn one_step_matches_diffusers_and_every_parameter_gets_a_gradient() {
    let (trainer, _) = check_single_step("sd1-tiny", "step_sd1.safetensors");
    // Every trainable weight must receive a gradient: an op without backward on its path
    // (candle-nn's fused softmax or layer norm) would leave it at zero and it would never train.
    let mut without: Vec<&str> = trainer
        .params()
        .iter()
        .zip(trainer.accumulated_gradients())
        .filter(|(_, g)| g.as_ref().is_none_or(|g| max_abs(g) == 0.0))
        .map(|((name, _), _)| name.as_str())
        .collect();
    without.sort();
    assert!(
        without.is_empty(),
        "{} of {} parameters got no gradient: {without:?}",
        without.len(),
        trainer.params().len()
    );
    // An InstructPix2Pix UNet keeps its conv_in.
    assert!(!trainer.models().unet.grew_conv_in());
}

#[test]
fn v_prediction_step_matches_diffusers() {
    check_single_step("sd2-tiny", "step_sd2_vpred.safetensors");
}

#[test]
fn conv_in_grows_from_a_plain_model_and_its_step_matches_diffusers() {
    let original_bias = candle_core::safetensors::load(
        common::fixture_pipeline("sd-plain-4ch").join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()["conv_in.bias"]
        .clone();
    // The script's fresh Conv2d keeps torch's default bias init (uniform in ±1/√(8·3·3)); the
    // Rust side draws its own from the seed, then takes diffusers' numbers so the step compares
    // like with like.
    let (trainer, refs) = check_single_step_with(
        "sd-plain-4ch",
        "growth_plain4.safetensors",
        |models, refs| {
            let bias = param(models.unet.params(), "conv_in.bias");
            let drawn = bias
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let bound = 1.0 / 72f32.sqrt();
            assert!(drawn.iter().all(|v| v.abs() <= bound), "{drawn:?}");
            assert!(max_abs(&(bias.as_tensor() - &original_bias).unwrap()) > 0.0);
            let expected = refs["conv_in.bias"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(expected.iter().all(|v| v.abs() <= bound), "{expected:?}");
            bias.set(&refs["conv_in.bias"]).unwrap();
        },
    );
    let unet = &trainer.models().unet;
    assert!(unet.grew_conv_in());
    assert_eq!(unet.config().in_channels, 8);
    let weight = param(unet.params(), "conv_in.weight").as_tensor();
    assert_eq!(weight.dims(), refs["conv_in.weight"].dims());
    // Copies and zeros: exactly equal.
    assert_eq!(max_abs(&(weight - &refs["conv_in.weight"]).unwrap()), 0.0);
    let original = candle_core::safetensors::load(
        common::fixture_pipeline("sd-plain-4ch").join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let first_four = weight.narrow(1, 0, 4).unwrap();
    assert_eq!(
        max_abs(&(first_four - &original["conv_in.weight"]).unwrap()),
        0.0
    );
    assert_eq!(max_abs(&weight.narrow(1, 4, 4).unwrap()), 0.0);
}

#[test]
fn dropout_masks_drop_text_image_or_both() {
    let refs = load_refs("step_sd1.safetensors");
    let models = load_models("sd1-tiny");
    let (batch, mut draws) = batch_and_draws(&models, &refs, "", &PROMPTS);
    let p = 1.0 / 3.0;
    // r < p: text only; p ≤ r < 2p: both; 2p ≤ r < 3p: image only (3p = 1: every r ≥ 2p).
    draws.dropout_draws = vec![0.1, 0.5, 0.8, 0.95];
    let out = models.micro_batch_loss(&batch, &draws, Some(p)).unwrap();
    let none = DroppedConditioning::default();
    let expected = [
        DroppedConditioning {
            text: true,
            image: false,
        },
        DroppedConditioning {
            text: true,
            image: true,
        },
        DroppedConditioning {
            text: false,
            image: true,
        },
        DroppedConditioning {
            text: false,
            image: true,
        },
    ];
    assert_eq!(out.dropped, expected);

    let kept = models.micro_batch_loss(&batch, &draws, None).unwrap();
    assert_eq!(kept.dropped, vec![none; 4]);
    let null = &models.null_text_embedding;
    for (i, dropped) in expected.iter().enumerate() {
        let text = out.encoder_hidden_states.narrow(0, i, 1).unwrap();
        let prompt = kept.encoder_hidden_states.narrow(0, i, 1).unwrap();
        let wanted = if dropped.text { null } else { &prompt };
        assert_eq!(max_abs(&(&text - wanted).unwrap()), 0.0, "sample {i} text");
        assert!(
            max_abs(&(&prompt - null).unwrap()) > 1e-3,
            "prompt {i} differs from \"\""
        );

        let image = out
            .unet_input
            .narrow(0, i, 1)
            .unwrap()
            .narrow(1, 4, 4)
            .unwrap();
        let mode = kept
            .unet_input
            .narrow(0, i, 1)
            .unwrap()
            .narrow(1, 4, 4)
            .unwrap();
        assert!(max_abs(&mode) > 1e-3);
        if dropped.image {
            assert_eq!(max_abs(&image), 0.0, "sample {i} image latents zeroed");
        } else {
            assert_eq!(
                max_abs(&(&image - &mode).unwrap()),
                0.0,
                "sample {i} image kept"
            );
        }
        // The noisy latents never change.
        let noisy = out
            .unet_input
            .narrow(0, i, 1)
            .unwrap()
            .narrow(1, 0, 4)
            .unwrap();
        let noisy_kept = kept
            .unet_input
            .narrow(0, i, 1)
            .unwrap()
            .narrow(1, 0, 4)
            .unwrap();
        assert_eq!(max_abs(&(noisy - noisy_kept).unwrap()), 0.0);
    }
}

/// Three optimizer steps of two micro-batches each (AdamW with weight decay, clipping always
/// active, a cosine schedule, EMA) against the script's loop.
#[test]
fn accumulation_clipping_adamw_and_ema_match_torch_over_three_steps() {
    let refs = load_refs("run_sd1.safetensors");
    let run = load_json("run_sd1.json");
    let settings = &run["settings"];
    let f = |key: &str| settings[key].as_f64().unwrap();
    let models = load_models("sd1-tiny");
    let initial: HashMap<String, Tensor> = models
        .unet
        .params()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    let optimizer = AdamWConfig {
        beta1: f("adam_beta1"),
        beta2: f("adam_beta2"),
        eps: f("adam_epsilon"),
        weight_decay: f("adam_weight_decay"),
    };
    let kind: LrScheduleKind = settings["lr_scheduler"].as_str().unwrap().parse().unwrap();
    let steps = settings["max_train_steps"].as_u64().unwrap();
    let schedule = LrSchedule::new(
        kind,
        f("learning_rate"),
        settings["lr_warmup_steps"].as_u64().unwrap(),
        steps,
    )
    .unwrap();
    let k = settings["gradient_accumulation_steps"].as_u64().unwrap() as usize;
    let config = StepConfig {
        gradient_accumulation_steps: k,
        max_grad_norm: f("max_grad_norm"),
        conditioning_dropout_prob: Some(f("conditioning_dropout_prob")),
    };
    let mut trainer = Trainer::new(
        models,
        optimizer,
        schedule,
        Some(EmaConfig::default()),
        config,
    )
    .unwrap();
    let names = grad_names_of_run(&refs);
    let mut micro = 0;
    for expected in run["steps"].as_array().unwrap() {
        let step = expected["step"].as_u64().unwrap();
        let started = Instant::now();
        let mut report = None;
        for _ in 0..k {
            let start = micro % 2 * 2;
            let (batch, draws) = batch_and_draws(
                trainer.models(),
                &refs,
                &format!("mb{micro}."),
                &PROMPTS[start..start + 2],
            );
            let (_, step_report) = trainer.micro_batch(&batch, &draws).unwrap();
            report = step_report;
            micro += 1;
        }
        let elapsed = started.elapsed();
        let report = report.expect("the k-th micro-batch steps the optimizer");
        println!(
            "step {step}: loss {:.6} lr {:.3e} grad norm {:.5} ({:.2} s for {k} micro-batches of 2 at 32²)",
            report.loss,
            report.lr,
            report.grad_norm,
            elapsed.as_secs_f64()
        );
        assert_eq!(report.step, step);
        assert_eq!(report.micro_batches, k);
        let want_loss = expected["train_loss"].as_f64().unwrap();
        assert!(((report.loss - want_loss) / want_loss).abs() < FORWARD_TOLERANCE as f64);
        let want_norm = expected["grad_norm"].as_f64().unwrap() as f32;
        assert!(((report.grad_norm - want_norm) / want_norm).abs() < GRAD_TOLERANCE);
        let want_lr = expected["lr"].as_f64().unwrap();
        assert!(
            ((report.lr - want_lr) / want_lr).abs() < 1e-12,
            "lr {} vs {want_lr}",
            report.lr
        );

        for name in &names {
            let now = param(trainer.params(), name).as_tensor();
            let want = &refs[&format!("s{step}.param.{name}")];
            // Compare the change since the start: AdamW moves each weight by about lr per step
            // (sign-like for the clipped gradients), so the update is the scale to measure against.
            let moved = (now - &initial[name]).unwrap();
            let want_moved = (want - &initial[name]).unwrap();
            let rel = relative_max_diff(&moved, &want_moved);
            println!("  {name}: update rel {rel:.2e}");
            assert!(rel < UPDATE_TOLERANCE, "step {step} {name}: {rel}");
        }
    }
    let optimizer = trainer.optimizer();
    let ema = trainer.ema().unwrap();
    assert_eq!(
        ema.optimization_step(),
        run["ema_optimization_step"].as_u64().unwrap()
    );
    for name in &names {
        let index = optimizer
            .params()
            .iter()
            .position(|(n, _)| n == name)
            .unwrap();
        let (m, v) = optimizer.moments(index).unwrap();
        let rel_m = relative_max_diff(m, &refs[&format!("exp_avg.{name}")]);
        let rel_v = relative_max_diff(v, &refs[&format!("exp_avg_sq.{name}")]);
        // The moments are gradients (and their squares): the gradient tolerance.
        println!("  moments {name}: {rel_m:.2e} {rel_v:.2e}");
        assert!(
            rel_m < GRAD_TOLERANCE && rel_v < GRAD_TOLERANCE,
            "{name}: {rel_m} {rel_v}"
        );
        let shadow = &ema.shadow()[index].1;
        let moved = (shadow - &initial[name]).unwrap();
        let want = (&refs[&format!("ema.{name}")] - &initial[name]).unwrap();
        let rel = relative_max_diff(&moved, &want);
        println!("  EMA {name}: rel {rel:.2e}");
        assert!(rel < UPDATE_TOLERANCE, "EMA of {name}: {rel}");
    }
}

fn grad_names_of_run(refs: &HashMap<String, Tensor>) -> Vec<String> {
    let mut names: Vec<String> = refs
        .keys()
        .filter_map(|k| k.strip_prefix("exp_avg.").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The optimizer arithmetic alone, on given gradients: torch's AdamW, clip_grad_norm_ and
/// EMAModel. Also restores the optimizer and EMA from their checkpoint state after step 2.
#[test]
fn adamw_clipping_and_ema_arithmetic_equal_torch() {
    let refs = load_refs("optim_synthetic.safetensors");
    let meta = load_json("optim_synthetic.json");
    let s = &meta["settings"];
    let names: Vec<String> = meta["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let params: Vec<(String, Var)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                Var::from_tensor(&refs[&format!("initial.{n}")]).unwrap(),
            )
        })
        .collect();
    let config = AdamWConfig {
        beta1: s["beta1"].as_f64().unwrap(),
        beta2: s["beta2"].as_f64().unwrap(),
        eps: s["eps"].as_f64().unwrap(),
        weight_decay: s["weight_decay"].as_f64().unwrap(),
    };
    let mut optimizer = AdamW::new(params.clone(), config).unwrap();
    let mut ema = EmaModel::new(&params, EmaConfig::default()).unwrap();
    let lrs: Vec<f64> = s["lr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for step in 1..=3 {
        if step == 3 {
            // What a checkpoint holds, restored into fresh objects.
            let state = optimizer.state();
            let tensors = optimizer.state_tensors().unwrap();
            optimizer = AdamW::from_state(params.clone(), state, tensors).unwrap();
            ema = EmaModel::from_state(ema.state(), ema.shadow_tensors(), &params).unwrap();
        }
        let grads: Vec<Option<Tensor>> = names
            .iter()
            .map(|n| Some(refs[&format!("grad{step}.{n}")].clone()))
            .collect();
        let (norm, clip) = clip_coefficient(&grads, s["max_grad_norm"].as_f64().unwrap()).unwrap();
        let want_norm = meta["grad_norms"][step - 1].as_f64().unwrap() as f32;
        assert!(
            (norm - want_norm).abs() <= 2.0 * f32::EPSILON * want_norm,
            "norm {norm} vs {want_norm}"
        );
        optimizer.step_scaled(&grads, lrs[step - 1], clip).unwrap();
        ema.step(&params).unwrap();
        for (i, (name, var)) in params.iter().enumerate() {
            let want = &refs[&format!("s{step}.param.{name}")];
            let diff = max_abs(&(var.as_tensor() - want).unwrap());
            println!("step {step} {name}: max |diff| {diff:.2e}");
            // Same f32 operations in the same order: at most an ulp or two of the weights
            // (|w| < 5) apart; a wrong bias correction or decay is off by ~1e-3.
            assert!(diff <= 1e-6, "step {step} {name}: {diff}");
            let want = &refs[&format!("s{step}.ema.{name}")];
            let diff = max_abs(&(&ema.shadow()[i].1 - want).unwrap());
            assert!(diff <= 1e-6, "EMA step {step} {name}: {diff}");
        }
    }
    for (i, name) in names.iter().enumerate() {
        let (m, v) = optimizer.moments(i).unwrap();
        assert!(relative_max_diff(m, &refs[&format!("exp_avg.{name}")]) < 1e-6);
        assert!(relative_max_diff(v, &refs[&format!("exp_avg_sq.{name}")]) < 1e-6);
    }
}

#[test]
fn learning_rate_schedules_equal_get_scheduler() {
    let cases = load_json("schedules.json");
    let mut checked = std::collections::BTreeSet::new();
    for case in cases.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind: LrScheduleKind = name.parse().unwrap();
        let mut schedule = LrSchedule::new(
            kind,
            case["base_lr"].as_f64().unwrap(),
            case["warmup"].as_u64().unwrap(),
            case["total"].as_u64().unwrap(),
        )
        .unwrap();
        if let Some(cycles) = case["extra"]["num_cycles"].as_f64() {
            schedule = schedule.with_num_cycles(cycles);
        }
        if let Some(power) = case["extra"]["power"].as_f64() {
            schedule = schedule.with_power(power);
        }
        for (step, want) in case["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = schedule.lr(step as u64);
            // The same f64 operations in the same order as diffusers' lambdas and LambdaLR.
            assert!(
                (got - want).abs() <= 1e-15 * want.abs().max(1e-12),
                "{name} {:?} step {step}: {got} vs {want}",
                case["extra"]
            );
        }
        checked.insert(name.to_string());
    }
    assert_eq!(checked.len(), LrScheduleKind::ALL.len());
}

#[test]
fn ema_decay_equals_diffusers() {
    let cases = load_json("ema_decay.json");
    for (label, case) in cases.as_object().unwrap() {
        let kwargs = &case["kwargs"];
        let mut config = EmaConfig::default();
        if let Some(v) = kwargs["use_ema_warmup"].as_bool() {
            config.use_ema_warmup = v;
        }
        if let Some(v) = kwargs["power"].as_f64() {
            config.power = v;
        }
        if let Some(v) = kwargs["update_after_step"].as_u64() {
            config.update_after_step = v;
        }
        if let Some(v) = kwargs["min_decay"].as_f64() {
            config.min_decay = v;
        }
        for (step, want) in case["decays"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = config.decay_at(step as u64);
            assert!(
                (got - want).abs() <= 1e-15,
                "{label} step {step}: {got} vs {want}"
            );
        }
    }
}

/// Training loads a folder with the editor's loader (same folder checks) and refuses what
/// train_instruct_pix2pix.py cannot train, naming the file.
#[test]
fn loading_refuses_a_sample_predicting_model_and_a_missing_component() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::copy_dir(&common::fixture_pipeline("sd1-tiny"), &model);
    let load_error = |model: &std::path::Path| {
        TrainingModels::load(model, &TrainLoadOptions::default())
            .err()
            .expect("the model must be refused")
            .to_string()
    };

    let scheduler_config = model.join("scheduler").join("scheduler_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&scheduler_config).unwrap()).unwrap();
    config["prediction_type"] = "sample".into();
    std::fs::write(&scheduler_config, config.to_string()).unwrap();
    let error = load_error(&model);
    assert!(
        error.contains("scheduler_config.json")
            && error.contains("prediction_type \"sample\": training supports"),
        "{error}"
    );

    std::fs::remove_dir_all(model.join("tokenizer")).unwrap();
    let error = load_error(&model);
    assert!(
        error.contains("missing the `tokenizer` component folder"),
        "{error}"
    );
}
