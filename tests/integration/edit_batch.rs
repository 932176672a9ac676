//! Several images from one seed (`edit --seed 7 --num-images N`) against diffusers' own
//! `num_images_per_prompt=N` with `generator=torch.Generator().manual_seed(7)`
//! (tests/fixtures/edits/batch/CASE, made by tests/fixtures/scripts/batch_refs.py): every image
//! within 3 levels of 255 at every pixel and 0.3 on average, as the single-image parity cases;
//! each PNG records the seed, its index and the count. The random draws themselves (one
//! `randn([N, 4, h, w])` for the initial latents, one per stochastic step) are compared bit for
//! bit with torch's.

use crate::common;

use common::{files_in, fixture_pipeline, fixtures, pixel_difference, run, stderr};
use instruct_pix2pix::pipeline::image::read_png_text;
use instruct_pix2pix::pipeline::metadata::EditRecord;
use instruct_pix2pix::pipeline::npy::read_f32_npy;
use instruct_pix2pix::pipeline::rng::{BoxMullerKernel, TorchGenerator};
use serde_json::Value;

const MAX_LEVELS: u8 = 3;
const MEAN_LEVELS: f64 = 0.3;

fn case_dir(case: &str) -> std::path::PathBuf {
    fixtures().join("edits").join("batch").join(case)
}

fn settings(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(case_dir(case).join("settings.json")).unwrap())
        .unwrap()
}

/// Runs `edit --num-images N` as the case's settings.json says and compares every image.
fn check_case(case: &str) {
    let dir = case_dir(case);
    let settings = settings(case);
    let count = settings["num_images_per_prompt"].as_u64().unwrap() as usize;
    let seed = settings["seed"].as_u64().unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let model = fixture_pipeline(settings["pipeline"].as_str().unwrap());
    let mut args: Vec<String> = [
        "edit",
        "--model",
        &model.display().to_string(),
        "--image",
        &dir.join("input.png").display().to_string(),
        "--prompt",
        settings["prompt"].as_str().unwrap(),
        "--steps",
        &settings["num_inference_steps"].to_string(),
        "--guidance-scale",
        &settings["guidance_scale"].to_string(),
        "--image-guidance-scale",
        &settings["image_guidance_scale"].to_string(),
        "--seed",
        &seed.to_string(),
        "--num-images",
        &count.to_string(),
        "--output",
        &out.join("result.png").display().to_string(),
        "--quiet",
    ]
    .map(String::from)
    .to_vec();
    if let Some(scheduler) = settings["scheduler_flag"].as_str() {
        args.extend(["--scheduler".into(), scheduler.into()]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = run(&work.path().join("hf"), &arg_refs);
    assert!(
        result.status.success(),
        "{case}: edit failed: {}",
        stderr(&result)
    );
    let names: Vec<String> = (1..=count).map(|i| format!("result-{i}.png")).collect();
    assert_eq!(files_in(&out), names, "{case}");
    let stdout = String::from_utf8_lossy(&result.stdout);
    for (index, name) in names.iter().enumerate() {
        let ours = image::open(out.join(name)).unwrap().to_rgb8();
        let expected = image::open(dir.join(format!("expected-{}.png", index + 1)))
            .unwrap()
            .to_rgb8();
        let (max, mean) = pixel_difference(&ours, &expected);
        eprintln!(
            "{case} image {}: max difference {max} levels, mean {mean:.4}",
            index + 1
        );
        assert!(
            max <= MAX_LEVELS && mean <= MEAN_LEVELS,
            "{case}: image {} of {count} differs from diffusers' by up to {max} levels (mean {mean:.4})",
            index + 1
        );
        let record = EditRecord::from_text_chunks(&read_png_text(&out.join(name)).unwrap())
            .expect("settings chunk");
        assert_eq!(
            (record.seed, record.image_index, record.num_images),
            (seed, index, count),
            "{case}: {name}"
        );
        let hint = format!("seed {seed}, image {} of {count}", index + 1);
        assert!(stdout.contains(&hint), "{case}: {stdout}");
    }
    // The images of a batch are different pictures.
    let first = image::open(out.join(&names[0])).unwrap().to_rgb8();
    let second = image::open(out.join(&names[1])).unwrap().to_rgb8();
    assert!(pixel_difference(&first, &second).0 > 0, "{case}");
}

#[test]
fn euler_ancestral_two_images_from_one_seed() {
    check_case("ancestral-n2");
}

/// 3 × 4 × 6 × 7 = 504 values: torch's randn recomputes the last 16 of the batched draw.
#[test]
fn euler_ancestral_three_images_with_an_odd_latent_size() {
    check_case("ancestral-n3");
}

#[test]
fn dpm_solver_two_images_from_one_seed() {
    check_case("dpm-n2");
}

#[test]
fn dpm_solver_three_images_with_an_odd_latent_size() {
    check_case("dpm-n3");
}

/// DDPM adds noise in every step but the last, drawn for the whole batch.
#[test]
fn ddpm_two_images_from_one_seed() {
    check_case("ddpm-n2");
}

/// diffusers' draws for a batch are successive `torch.randn([N, 4, h, w])` on one generator; the
/// project's generator gives them bit for bit, the tail of a size that is not a multiple of 16
/// included.
#[test]
fn batched_draws_are_torchs_bit_for_bit() {
    for case in ["ancestral-n2", "ancestral-n3", "dpm-n3", "ddpm-n2"] {
        let settings = settings(case);
        let draws = read_f32_npy(&case_dir(case).join("randn_draws.npy")).unwrap();
        let count = settings["random_draws"].as_u64().unwrap() as usize;
        assert_eq!(draws.shape[0], count, "{case}");
        assert_eq!(
            draws.shape[1],
            settings["num_images_per_prompt"].as_u64().unwrap() as usize
        );
        let per_draw: usize = draws.shape[1..].iter().product();
        // The fixtures were made on an x86 CPU with AVX2, where torch uses this kernel.
        let mut generator = TorchGenerator::with_kernel(
            settings["seed"].as_u64().unwrap(),
            BoxMullerKernel::Avx2Polynomial,
        );
        for (index, expected) in draws.values.chunks_exact(per_draw).enumerate() {
            let got = generator.randn_f32(per_draw);
            let differing = got
                .iter()
                .zip(expected)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differing, 0, "{case}: draw {index} of {count}");
        }
    }
}

/// `--latents` takes one initial-noise block per image: [N, 4, h, w] with N = --num-images.
#[test]
fn latents_for_a_batch_need_one_block_per_image() {
    let work = tempfile::tempdir().unwrap();
    let dir = case_dir("dpm-n2");
    let latents = work.path().join("latents.npy");
    // The case's own initial draw, given as latents: the same images as from the seed.
    let draws = read_f32_npy(&dir.join("randn_draws.npy")).unwrap();
    let first: Vec<f32> = draws.values[..2 * 4 * 8 * 8].to_vec();
    write_npy(&latents, &[2, 4, 8, 8], &first);
    let model = fixture_pipeline("sd1-tiny").display().to_string();
    let input = dir.join("input.png").display().to_string();
    let output = work.path().join("given.png").display().to_string();
    let latents_arg = latents.display().to_string();
    let base = [
        "edit",
        "--model",
        &model,
        "--image",
        &input,
        "--prompt",
        "make it snowy",
        "--steps",
        "5",
        "--scheduler",
        "dpm++2m",
        "--latents",
        &latents_arg,
        "--output",
        &output,
        "--quiet",
    ];
    let mut args = base.to_vec();
    args.extend(["--num-images", "2"]);
    let result = run(&work.path().join("hf"), &args);
    assert!(result.status.success(), "{}", stderr(&result));
    for i in 1..=2 {
        let ours = image::open(work.path().join(format!("given-{i}.png")))
            .unwrap()
            .to_rgb8();
        let expected = image::open(dir.join(format!("expected-{i}.png")))
            .unwrap()
            .to_rgb8();
        let (max, mean) = pixel_difference(&ours, &expected);
        assert!(
            max <= MAX_LEVELS && mean <= MEAN_LEVELS,
            "image {i}: {max} {mean}"
        );
    }

    // Two blocks for three images: refused before the model loads, naming the file.
    let mut args = base.to_vec();
    args.extend(["--num-images", "3"]);
    let result = run(&work.path().join("hf"), &args);
    assert!(!result.status.success());
    let text = stderr(&result);
    assert!(
        text.contains("latents.npy") && text.contains("[2, 4, 8, 8]") && text.contains("[3, C"),
        "{text}"
    );
}

/// A float32 .npy file, C order.
fn write_npy(path: &std::path::Path, shape: &[usize], values: &[f32]) {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    );
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}
