//! LoRA files for editing (issue 15 item 3): `edit --lora FILE[:SCALE]` fuses diffusers/peft and
//! kohya LoRAs into the weights at load, giving diffusers' pixels after its `load_lora_weights` +
//! `fuse_lora(lora_scale=...)` (tests/fixtures/lora_edit, made by
//! tests/fixtures/scripts/lora_edit_refs.py on tests/fixtures/pipelines/sd1-tiny); LoRAs that do
//! not fit the model are refused naming the file and the key, and the window's model stays.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use common::{fixture_pipeline, fixtures, pixel_difference, run, stderr};
use instruct_pix2pix::model::device::{DTypeChoice, DeviceChoice};
use instruct_pix2pix::model::hub::Variant;
use instruct_pix2pix::model::lora::LoraChoice;
use instruct_pix2pix::model::{InstructPix2PixModel, LoadOptions};
use instruct_pix2pix::pipeline::image::load_image;
use instruct_pix2pix::pipeline::npy::read_f32_npy;
use instruct_pix2pix::pipeline::settings::InitialLatents;
use instruct_pix2pix::pipeline::{EditPipeline, EditSettings};
use instruct_pix2pix::worker::{Event, Job, LoraChoice as WorkerLora, ModelRequest, Worker};

const MAX_LEVELS: u8 = 3;
const MEAN_LEVELS: f64 = 0.3;

fn dir() -> PathBuf {
    fixtures().join("lora_edit")
}

fn case() -> PathBuf {
    fixtures().join("edits").join("sd1-plain")
}

/// `edit` on sd1-tiny with the fixture's settings (sd1-plain's input and latents, 6 steps) and
/// these `--lora` flags.
fn edit(output: &Path, model: &Path, loras: &[String]) -> Output {
    let (model, input, latents, out) = (
        model.display().to_string(),
        case().join("input.png").display().to_string(),
        case().join("latents.npy").display().to_string(),
        output.display().to_string(),
    );
    let mut args = vec![
        "edit",
        "--model",
        &model,
        "--image",
        &input,
        "--latents",
        &latents,
        "--prompt",
        "make it snowy",
        "--steps",
        "6",
        "--output",
        &out,
        "--quiet",
    ];
    for lora in loras {
        args.extend(["--lora", lora.as_str()]);
    }
    run(&output.with_file_name("hf"), &args)
}

fn check(case: &str, loras: &[(&str, f64)]) {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("result.png");
    let flags: Vec<String> = loras
        .iter()
        .map(|(file, scale)| format!("{}:{scale}", dir().join(file).display()))
        .collect();
    let result = edit(&output, &fixture_pipeline("sd1-tiny"), &flags);
    assert!(result.status.success(), "{case}: {}", stderr(&result));
    let ours = image::open(&output).unwrap().to_rgb8();
    let expected = image::open(dir().join(format!("expected-{case}.png")))
        .unwrap()
        .to_rgb8();
    let (max, mean) = pixel_difference(&ours, &expected);
    eprintln!("{case}: max difference {max} levels, mean {mean:.4}");
    assert!(
        max <= MAX_LEVELS && mean <= MEAN_LEVELS,
        "{case}: max {max}, mean {mean:.4}"
    );
}

/// diffusers' own format with UNet and text encoder adapters, conv LoRA (1×1 and 3×3), an
/// `alpha_pattern`, at lora_scale 0.7.
#[test]
fn a_diffusers_lora_matches_diffusers_fuse_lora() {
    check("peft", &[("peft", 0.7)]);
}

#[test]
fn a_kohya_lora_matches_diffusers_fuse_lora() {
    check("kohya", &[("kohya.safetensors", 1.0)]);
}

/// The same adapters named in the LDM layout (`lora_unet_input_blocks_4_1_proj_in`), as some
/// trainers write them: the same weights, so the same pixels.
#[test]
fn a_kohya_lora_with_ldm_names_fuses_the_same() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("result.png");
    let lora = format!("{}", dir().join("kohya-ldm.safetensors").display());
    let result = edit(&output, &fixture_pipeline("sd1-tiny"), &[lora]);
    assert!(result.status.success(), "{}", stderr(&result));
    let ours = image::open(&output).unwrap().to_rgb8();
    let expected = image::open(dir().join("expected-kohya.png"))
        .unwrap()
        .to_rgb8();
    assert!(pixel_difference(&ours, &expected).0 <= MAX_LEVELS);
}

/// Two LoRAs with their own scales: diffusers' `set_adapters(weights=[0.5, 1.5])` + `fuse_lora()`.
#[test]
fn two_loras_with_their_scales_match_diffusers() {
    check("both", &[("peft", 0.5), ("kohya.safetensors", 1.5)]);
}

/// A LoRA written the way `train --lora-rank` writes it (diffusers' `save_lora_weights` layout,
/// here the file diffusers itself saved in tests/fixtures/train_persist/lora_py) fused at load
/// edits as the trainer's unfused adapters do.
#[test]
fn a_fused_training_lora_edits_as_the_unfused_adapters() {
    let options = LoadOptions {
        variant: Variant::Default,
        dtype: DType::F32,
        device: Device::Cpu,
    };
    let lora = fixtures().join("train_persist").join("lora_py");
    let settings = || {
        let latents = read_f32_npy(&case().join("latents.npy")).unwrap();
        EditSettings {
            prompt: "make it snowy".into(),
            steps: 3,
            initial_latents: Some(InitialLatents {
                shape: latents.shape,
                values: latents.values,
            }),
            ..EditSettings::default()
        }
    };
    let image = load_image(&case().join("input.png")).unwrap();
    let cancel = AtomicBool::new(false);
    let fused = InstructPix2PixModel::load_with_loras(
        &fixture_pipeline("sd1-tiny"),
        &options,
        &[LoraChoice::new(&lora)],
    )
    .unwrap();
    let fused = EditPipeline::new(fused)
        .unwrap()
        .edit(&image, &settings(), &mut |_| {}, &cancel)
        .unwrap();
    let mut adapters = InstructPix2PixModel::load(&fixture_pipeline("sd1-tiny"), &options).unwrap();
    instruct_pix2pix::train::lora::apply_lora_file(&mut adapters, &lora).unwrap();
    let unfused = EditPipeline::new(adapters)
        .unwrap()
        .edit(&image, &settings(), &mut |_| {}, &cancel)
        .unwrap();
    let (max, _) = pixel_difference(&fused.image, &unfused.image);
    assert!(max <= 1, "fused and unfused differ by {max} levels");
    let base = InstructPix2PixModel::load(&fixture_pipeline("sd1-tiny"), &options).unwrap();
    let base = EditPipeline::new(base)
        .unwrap()
        .edit(&image, &settings(), &mut |_| {}, &cancel)
        .unwrap();
    assert!(
        pixel_difference(&fused.image, &base.image).0 > 3,
        "the LoRA changes the edit"
    );
}

fn refused(model: &Path, lora: &Path) -> String {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("result.png");
    let result = edit(&output, model, &[lora.display().to_string()]);
    let message = stderr(&result);
    assert_eq!(result.status.code(), Some(1), "{message}");
    assert!(!output.exists());
    assert!(
        message.contains(&lora.display().to_string()),
        "the message names the file: {message}"
    );
    message
}

/// A LoRA made for another model (sd2-tiny's cross-attention is 64 wide, sd1-tiny's 32).
#[test]
fn a_lora_for_another_model_is_refused_naming_the_key() {
    let message = refused(
        &fixture_pipeline("sd1-tiny"),
        &dir().join("for-sd2.safetensors"),
    );
    assert!(
        message.contains("does not fit")
            && message.contains(
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
            ),
        "{message}"
    );
    // sd1-tiny's LoRAs on the single-file model (other widths) are refused the same way.
    let single = fixtures().join("single_file");
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("result.png");
    let (model, config, lora) = (
        single.join("ip2p-tiny.safetensors"),
        single.join("config"),
        dir().join("kohya.safetensors"),
    );
    let result = run(
        &work.path().join("hf"),
        &[
            "edit",
            "--model",
            model.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--lora",
            lora.to_str().unwrap(),
            "--image",
            case().join("input.png").to_str().unwrap(),
            "--prompt",
            "x",
            "--output",
            output.to_str().unwrap(),
        ],
    );
    let message = stderr(&result);
    assert!(
        message.contains("kohya.safetensors") && message.contains("does not fit"),
        "{message}"
    );
}

/// Keys that name no module, keys that are no LoRA weight, and adapters of other kinds.
#[test]
fn loras_with_keys_this_model_lacks_are_refused_naming_the_key() {
    let work = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    let write = |name: &str, keys: &[(&str, &[usize])]| {
        let tensors: HashMap<String, Tensor> = keys
            .iter()
            .map(|(k, shape)| {
                (
                    k.to_string(),
                    Tensor::zeros(*shape, DType::F32, &cpu).unwrap(),
                )
            })
            .collect();
        let path = work.path().join(name);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        path
    };
    let model = fixture_pipeline("sd1-tiny");
    let no_module = write(
        "no-module.safetensors",
        &[
            (
                "unet.down_blocks.9.attentions.0.proj_in.lora_A.weight",
                &[2, 16],
            ),
            (
                "unet.down_blocks.9.attentions.0.proj_in.lora_B.weight",
                &[16, 2],
            ),
        ],
    );
    let message = refused(&model, &no_module);
    assert!(
        message.contains("unet.down_blocks.9.attentions.0.proj_in.lora_A.weight")
            && message.contains("names no module"),
        "{message}"
    );
    let kohya = write(
        "kohya-typo.safetensors",
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_proj_inn.lora_down.weight",
                &[2, 16, 1, 1],
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_inn.lora_up.weight",
                &[16, 2, 1, 1],
            ),
        ],
    );
    let message = refused(&model, &kohya);
    assert!(
        message.contains("proj_inn") && message.contains("names no module"),
        "{message}"
    );
    let not_lora = write(
        "weights.safetensors",
        &[("unet.conv_in.weight", &[16, 8, 3, 3])],
    );
    assert!(refused(&model, &not_lora).contains("is not a LoRA weight"));
    let loha = write(
        "loha.safetensors",
        &[(
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a",
            &[2, 16],
        )],
    );
    assert!(refused(&model, &loha).contains("LoHa"));
    // A missing file is named as such.
    let missing = work.path().join("missing.safetensors");
    assert!(refused(&model, &missing).contains("missing.safetensors"));
}

/// The window's model manager, through the worker: a LoRA that does not fit is refused before
/// the model in use is released; one that fits loads and is reported.
#[test]
fn the_window_adds_loras_through_the_worker_and_keeps_its_model_on_a_bad_one() {
    let (handle, events) = Worker::spawn(std::sync::Arc::new(|| {})).unwrap();
    let wait = |what: &str| loop {
        match events
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{what}: {e}"))
        {
            Event::ModelLoaded(info) => return Ok(info),
            Event::Failed { message, .. } => return Err(message),
            _ => {}
        }
    };
    let request = |loras: Vec<WorkerLora>| {
        let mut request = ModelRequest::new(
            fixture_pipeline("sd1-tiny").display().to_string(),
            DeviceChoice::Cpu,
            DTypeChoice::F32,
        );
        request.loras = loras;
        Job::LoadModel(request)
    };
    handle
        .send(request(vec![WorkerLora {
            path: dir().join("kohya.safetensors"),
            scale: 0.5,
        }]))
        .unwrap();
    let info = wait("the load with a LoRA").unwrap();
    assert_eq!(info.loras.len(), 1);
    assert_eq!(info.loras[0].scale, 0.5);
    handle
        .send(request(vec![WorkerLora::new(
            dir().join("for-sd2.safetensors"),
        )]))
        .unwrap();
    let message = wait("the refused LoRA").unwrap_err();
    assert!(message.contains("for-sd2.safetensors"), "{message}");
    assert_eq!(
        handle.loaded_model().map(|m| m.loras),
        Some(info.loras),
        "the model in use stays loaded"
    );
}
