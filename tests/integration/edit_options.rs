//! The `edit` command's options beyond the parity cases: scheduler override, random seeds that are
//! printed and reproduce, numbered images of one seed, output formats, the resolution cap.

use crate::common;

use common::{files_in, fixture_pipeline, fixtures, pixel_difference, program, run, stderr};

fn sd1_plain(file: &str) -> String {
    fixtures()
        .join("edits")
        .join("sd1-plain")
        .join(file)
        .display()
        .to_string()
}

fn edit(work: &std::path::Path, model: &str, extra: &[&str]) -> std::process::Output {
    let input = sd1_plain_input();
    let mut args = vec![
        "edit",
        "--model",
        model,
        "--image",
        &input,
        "--prompt",
        "make it snowy",
    ];
    args.extend_from_slice(extra);
    run(&work.join("hf"), &args)
}

fn sd1_plain_input() -> String {
    sd1_plain("input.png")
}

fn seed_from_stdout(stdout: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(stdout);
    let after = text
        .split("seed ")
        .nth(1)
        .unwrap_or_else(|| panic!("no seed printed: {text}"));
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// timbrooks' Euler-ancestral config converted with `--scheduler euler` is the Euler config the
/// sd1-plain case was made with (diffusers' `from_config`), so it reproduces diffusers' pixels.
#[test]
fn scheduler_override_converts_like_from_config() {
    let work = tempfile::tempdir().unwrap();
    let output = work.path().join("euler.png").display().to_string();
    let model = fixture_pipeline("sd1-tiny-ancestral").display().to_string();
    let latents = sd1_plain("latents.npy");
    let result = edit(
        work.path(),
        &model,
        &[
            "--scheduler",
            "euler",
            "--latents",
            &latents,
            "--steps",
            "10",
            "--output",
            &output,
            "--quiet",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let ours = image::open(&output).unwrap().to_rgb8();
    let expected = image::open(sd1_plain("expected.png")).unwrap().to_rgb8();
    let (max, mean) = pixel_difference(&ours, &expected);
    assert!(max <= 3 && mean <= 0.3, "max {max}, mean {mean}");
}

#[test]
fn every_scheduler_runs() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture_pipeline("sd1-tiny").display().to_string();
    let mut images = Vec::new();
    for name in ["euler-ancestral", "euler", "ddim", "ddpm", "dpm++2m"] {
        let output = work
            .path()
            .join(format!("{name}.png"))
            .display()
            .to_string();
        let result = edit(
            work.path(),
            &model,
            &[
                "--scheduler",
                name,
                "--seed",
                "7",
                "--steps",
                "4",
                "--output",
                &output,
                "--quiet",
            ],
        );
        assert!(result.status.success(), "{name}: {}", stderr(&result));
        images.push(image::open(&output).unwrap().to_rgb8());
    }
    // Different samplers give different images from the same seed.
    for pair in images.windows(2) {
        assert!(pixel_difference(&pair[0], &pair[1]).0 > 0);
    }
    let result = edit(
        work.path(),
        &model,
        &["--scheduler", "lms", "--output", "x.png"],
    );
    assert!(!result.status.success());
    assert!(stderr(&result).contains("lms"), "{}", stderr(&result));
}

#[test]
fn random_seed_is_printed_and_reproduces() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture_pipeline("sd1-tiny-ancestral").display().to_string();
    let first = work.path().join("first.png").display().to_string();
    let result = edit(
        work.path(),
        &model,
        &["--steps", "3", "--output", &first, "--quiet"],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let seed = seed_from_stdout(&result.stdout).to_string();
    let again = work.path().join("again.png").display().to_string();
    let result = edit(
        work.path(),
        &model,
        &[
            "--steps", "3", "--seed", &seed, "--output", &again, "--quiet",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let (a, b) = (
        image::open(&first).unwrap().to_rgb8(),
        image::open(&again).unwrap().to_rgb8(),
    );
    assert_eq!(
        pixel_difference(&a, &b).0,
        0,
        "seed {seed} did not reproduce the image"
    );
}

/// `--num-images` makes a batch from one seed as diffusers' `num_images_per_prompt` does
/// (compared with diffusers' pixels in `edit_batch`): numbered files, each recording its place.
#[test]
fn num_images_are_numbered_and_record_their_place() {
    let work = tempfile::tempdir().unwrap();
    let out_dir = work.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let model = fixture_pipeline("sd1-tiny-ancestral").display().to_string();
    let output = out_dir.join("v.png").display().to_string();
    let result = edit(
        work.path(),
        &model,
        &[
            "--steps",
            "3",
            "--seed",
            "41",
            "--num-images",
            "2",
            "--output",
            &output,
            "--quiet",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(files_in(&out_dir), ["v-1.png", "v-2.png"]);
    let second = image::open(out_dir.join("v-2.png")).unwrap().to_rgb8();
    let first = image::open(out_dir.join("v-1.png")).unwrap().to_rgb8();
    assert!(
        pixel_difference(&first, &second).0 > 0,
        "variations are identical"
    );
    let chunks =
        instruct_pix2pix::pipeline::image::read_png_text(&out_dir.join("v-2.png")).unwrap();
    let record =
        instruct_pix2pix::pipeline::metadata::EditRecord::from_text_chunks(&chunks).unwrap();
    assert_eq!(
        (record.seed, record.image_index, record.num_images),
        (41, 1, 2)
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("seed 41, image 2 of 2"), "{stdout}");
}

#[test]
fn jpeg_and_webp_outputs() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture_pipeline("sd1-tiny").display().to_string();
    for (name, format) in [
        ("out.jpg", image::ImageFormat::Jpeg),
        ("out.webp", image::ImageFormat::WebP),
    ] {
        let output = work.path().join(name);
        let result = edit(
            work.path(),
            &model,
            &[
                "--steps",
                "2",
                "--seed",
                "1",
                "--output",
                &output.display().to_string(),
                "--quiet",
            ],
        );
        assert!(result.status.success(), "{name}: {}", stderr(&result));
        let bytes = std::fs::read(&output).unwrap();
        assert_eq!(image::guess_format(&bytes).unwrap(), format, "{name}");
        assert_eq!(
            image::load_from_memory(&bytes)
                .unwrap()
                .to_rgb8()
                .dimensions(),
            (64, 64)
        );
    }
}

/// The long side is scaled down to the cap, keeping the aspect ratio, then floored to 8.
#[test]
fn resolution_caps_the_long_side() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture_pipeline("sd1-tiny").display().to_string();
    // The sd1-exif-resize input is 64×48 once its EXIF orientation is applied.
    let input = fixtures()
        .join("edits/sd1-exif-resize/input.png")
        .display()
        .to_string();
    let output = work.path().join("small.png");
    let args = [
        "edit",
        "--model",
        &model,
        "--image",
        &input,
        "--prompt",
        "x",
        "--steps",
        "1",
        "--resolution",
        "40",
        "--output",
        &output.display().to_string(),
        "--quiet",
    ];
    let result = run(&work.path().join("hf"), &args);
    assert!(result.status.success(), "{}", stderr(&result));
    assert_eq!(
        image::open(&output).unwrap().to_rgb8().dimensions(),
        (40, 24)
    );
}

/// `bench` reports its timings (the encoders', the steps' and the decoder's within the edit's),
/// and the re-edit after a slider moves (the same image and instruction, their encodings cached)
/// reaches its first preview sooner than a whole edit.
#[test]
fn bench_times_the_re_edit_s_first_preview() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture_pipeline("sd1-tiny").display().to_string();
    let result = run(
        work.path(),
        &[
            "bench", "--model", &model, "--size", "64", "--steps", "4", "--runs", "1",
        ],
    );
    assert!(result.status.success(), "{}", stderr(&result));
    let line = String::from_utf8_lossy(&result.stdout);
    let report: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let first_preview = report["reedit_first_preview_s"].as_f64().unwrap();
    let edit = report["s_per_edit"].as_f64().unwrap();
    let step = report["s_per_step"].as_f64().unwrap();
    assert!(first_preview > 0.0 && step > 0.0);
    // The phases of an edit: encoders, 4 steps and the decoder fit inside the whole edit.
    let encode = report["encode_s"].as_f64().unwrap();
    let decode = report["vae_decode_s"].as_f64().unwrap();
    assert!(
        encode > 0.0 && decode > 0.0,
        "encode {encode} s, decode {decode} s"
    );
    assert!(
        encode + 4.0 * step + decode <= edit,
        "encode {encode} + 4 × {step} + decode {decode} s > the edit's {edit} s"
    );
    assert!(
        first_preview < edit,
        "first preview of a re-edit {first_preview} s, a whole edit {edit} s"
    );
    let kernels = report["cpu_kernels"].as_str().unwrap();
    assert!(
        ["avx512", "avx2", "portable", "generic"].contains(&kernels),
        "{kernels}"
    );
}

/// The report names the kernels that ran: capped to portable code, it says so; with the
/// Winograd convolution turned off, it says that too.
#[test]
fn bench_names_the_cpu_kernels_it_ran() {
    let work = tempfile::tempdir().unwrap();
    let model = fixture_pipeline("sd1-tiny").display().to_string();
    for (winograd, expected) in [(None, true), (Some("off"), false)] {
        let mut command = program(work.path());
        command
            .env("INSTRUCT_PIX2PIX_CPU_ISA", "portable")
            .env_remove("INSTRUCT_PIX2PIX_KERNELS")
            .env_remove("INSTRUCT_PIX2PIX_WINOGRAD");
        if let Some(value) = winograd {
            command.env("INSTRUCT_PIX2PIX_WINOGRAD", value);
        }
        let result = command
            .args([
                "bench", "--model", &model, "--size", "64", "--steps", "1", "--runs", "1",
            ])
            .output()
            .unwrap();
        assert!(result.status.success(), "{}", stderr(&result));
        let report: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&result.stdout).trim()).unwrap();
        assert_eq!(report["cpu_kernels"], "portable");
        assert_eq!(report["winograd_conv"], expected, "{winograd:?}");
    }
}
