//! Bad input to `edit`: each case gives one clear line naming the file or value, a non-zero exit,
//! no panic, and no output file.

use crate::common;

use std::path::{Path, PathBuf};

use common::{copy_dir, files_in, fixture_pipeline, fixtures, run, stderr};

struct Case {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Case {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("out")).unwrap();
        std::fs::create_dir_all(root.join("hf")).unwrap();
        Self { _dir: dir, root }
    }

    fn out(&self) -> String {
        self.root
            .join("out")
            .join("result.png")
            .display()
            .to_string()
    }

    fn input(&self) -> String {
        fixtures()
            .join("edits")
            .join("sd1-plain")
            .join("input.png")
            .display()
            .to_string()
    }

    /// A private copy of a fixture pipeline, to break.
    fn pipeline_copy(&self, name: &str) -> PathBuf {
        let target = self.root.join(name);
        copy_dir(&fixture_pipeline(name), &target);
        target
    }

    /// Runs `edit` with the given model, input and extra flags; asserts the failure is clean and
    /// returns the one error line.
    fn fails(&self, model: &str, image: &str, extra: &[&str]) -> String {
        let out = self.out();
        let mut args = vec![
            "edit",
            "--model",
            model,
            "--image",
            image,
            "--prompt",
            "make it snowy",
            "--output",
            &out,
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let output = run(&self.root.join("hf"), &args);
        let text = stderr(&output);
        assert!(
            !output.status.success(),
            "expected failure, got success; stderr: {text}"
        );
        assert!(!text.contains("panicked"), "panic: {text}");
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one line, got: {text}");
        assert!(lines[0].starts_with("error"), "unexpected message: {text}");
        assert!(
            files_in(&self.root.join("out")).is_empty(),
            "left files behind: {:?}",
            files_in(&self.root.join("out"))
        );
        lines[0].to_string()
    }
}

fn sd1() -> String {
    fixture_pipeline("sd1-tiny").display().to_string()
}

fn write(path: &Path, bytes: &[u8]) -> String {
    std::fs::write(path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn missing_image() {
    let case = Case::new();
    let missing = case.root.join("nope.jpg").display().to_string();
    let line = case.fails(&sd1(), &missing, &[]);
    assert!(line.contains("nope.jpg"), "{line}");
}

#[test]
fn corrupt_image() {
    let case = Case::new();
    let corrupt = write(
        &case.root.join("corrupt.png"),
        b"\x89PNG\r\n\x1a\nthis is not an image at all",
    );
    let line = case.fails(&sd1(), &corrupt, &[]);
    assert!(line.contains("corrupt.png"), "{line}");
}

#[test]
fn empty_image_file() {
    let case = Case::new();
    let empty = write(&case.root.join("empty.jpg"), b"");
    let line = case.fails(&sd1(), &empty, &[]);
    assert!(line.contains("empty.jpg"), "{line}");
}

/// A PNG whose header claims 100000×100000 pixels must be refused before any allocation.
#[test]
fn gigantic_image() {
    let case = Case::new();
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    bytes.extend_from_slice(&13u32.to_be_bytes());
    bytes.extend_from_slice(&ihdr);
    bytes.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    let huge = write(&case.root.join("huge.png"), &bytes);
    let line = case.fails(&sd1(), &huge, &[]);
    assert!(line.contains("huge.png"), "{line}");
}

#[test]
fn model_folder_missing_a_component() {
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    std::fs::remove_dir_all(model.join("vae")).unwrap();
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(line.contains("vae"), "{line}");
}

#[test]
fn model_folder_missing_a_weight_file() {
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    std::fs::remove_file(
        model
            .join("unet")
            .join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(line.contains("unet"), "{line}");
}

#[test]
fn truncated_safetensors() {
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    let weights = model
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("diffusion_pytorch_model.safetensors"),
        "{line}"
    );
    assert!(line.contains("truncated"), "{line}");
}

#[test]
fn malformed_config() {
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    std::fs::write(
        model.join("unet").join("config.json"),
        "{ \"in_channels\": 8,",
    )
    .unwrap();
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(line.contains("config.json"), "{line}");
}

#[test]
fn plain_stable_diffusion_model_is_refused() {
    let case = Case::new();
    let line = case.fails(
        &fixture_pipeline("sd-plain-4ch").display().to_string(),
        &case.input(),
        &[],
    );
    assert!(
        line.contains("not an InstructPix2Pix model: its UNet takes 4 input channels, it needs 8"),
        "{line}"
    );
}

#[test]
fn offline_with_nothing_cached() {
    let case = Case::new();
    let line = case.fails("timbrooks/instruct-pix2pix", &case.input(), &[]);
    assert!(line.contains("timbrooks/instruct-pix2pix"), "{line}");
    assert!(line.to_lowercase().contains("offline"), "{line}");
}

/// Output paths that cannot be written fail before any model work, naming the path.
#[test]
fn unwritable_output_paths() {
    let case = Case::new();
    let proc_file = "/proc/instruct-pix2pix-cannot-write-here.png";
    let no_folder = case.root.join("no-such-folder").join("x.png");
    let gif = case.root.join("out").join("result.gif");
    for (out, named) in [
        (proc_file.to_string(), proc_file),
        (no_folder.display().to_string(), "no-such-folder"),
        (gif.display().to_string(), "result.gif"),
    ] {
        let args = [
            "edit",
            "--model",
            &sd1(),
            "--image",
            &case.input(),
            "--prompt",
            "x",
            "--output",
            &out,
        ];
        let output = run(&case.root.join("hf"), &args);
        let text = stderr(&output);
        assert!(!output.status.success(), "{out}: succeeded");
        assert!(!text.contains("panicked"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(named), "{text}");
        assert!(!Path::new(&out).exists());
    }
    assert!(files_in(&case.root.join("out")).is_empty());
}

#[test]
fn nonsense_numbers() {
    let case = Case::new();
    for (flag, value) in [
        ("--steps", "-5"),
        ("--steps", "0"),
        ("--steps", "many"),
        ("--guidance-scale", "NaN"),
        ("--guidance-scale", "-1"),
        ("--image-guidance-scale", "inf"),
        ("--resolution", "0"),
        ("--num-images", "0"),
        ("--seed", "-3"),
    ] {
        // Both spellings a user types: `--steps=-5` and `--steps -5`.
        let joined = format!("{flag}={value}");
        for args in [vec![joined.as_str()], vec![flag, value]] {
            let line = case.fails(&sd1(), &case.input(), &args);
            assert!(line.contains(flag), "{flag} {value}: {line}");
            assert!(line.contains(value), "{flag} {value}: {line}");
        }
    }
}

#[test]
fn latents_of_the_wrong_shape() {
    let case = Case::new();
    // A valid float32 .npy of shape [1, 4, 3, 3]: the 64×64 input needs [1, 4, 8, 8].
    let mut header =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 3, 3), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, 36 * 4));
    let latents = write(&case.root.join("latents.npy"), &bytes);
    let line = case.fails(&sd1(), &case.input(), &["--latents", &latents]);
    assert!(line.contains("[1, 4, 3, 3]"), "{line}");
}

/// CRC-32 as PNG chunks use it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in bytes {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn bf16_on_the_cpu_is_refused_before_loading() {
    let case = Case::new();
    let line = case.fails(
        &sd1(),
        &case.input(),
        &["--device", "cpu", "--dtype", "bf16"],
    );
    assert!(line.contains("bf16"), "{line}");
    assert!(line.contains("--dtype f32"), "{line}");
}

/// The window's start-up mistakes: one line, non-zero exit, no window attempted.
#[test]
fn window_without_a_display_or_with_a_missing_image() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("hf");
    let headless = |args: &[&str]| {
        let output = common::program(&hf)
            .env_remove("DISPLAY")
            .env_remove("WAYLAND_DISPLAY")
            .env_remove("WAYLAND_SOCKET")
            .env("INSTRUCT_PIX2PIX_CONFIG_DIR", root.path().join("config"))
            .args(args)
            .output()
            .unwrap();
        let text = stderr(&output);
        assert!(!output.status.success(), "{text}");
        assert!(!text.contains("panicked"), "{text}");
        assert_eq!(text.trim().lines().count(), 1, "{text}");
        (output.status.code(), text)
    };
    let (code, text) = headless(&["--no-settings"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("there is no display"), "{text}");
    let (code, text) = headless(&["holiday.png"]);
    assert_eq!(code, Some(1));
    assert!(text.contains("holiday.png: no such image file"), "{text}");
    // --generate needs an image and an instruction; clap names what is missing.
    let (code, text) = headless(&["--generate"]);
    assert_eq!(code, Some(2));
    assert!(
        text.contains("<IMAGE>") && text.contains("--prompt"),
        "{text}"
    );
    assert!(!root.path().join("config").exists(), "nothing written");
}
