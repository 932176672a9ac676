//! Helpers shared by the integration tests: the binary, the committed fixtures, temp copies, image
//! comparison, a fake Hugging Face Hub and a tiny diffusers pipeline made at test time.

#![allow(dead_code)] // each test binary uses a different subset

pub mod fake_hub;
pub mod pipeline;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The committed fixtures folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// A tiny pipeline saved by diffusers (`tests/fixtures/pipelines/NAME`).
pub fn fixture_pipeline(name: &str) -> PathBuf {
    fixtures().join("pipelines").join(name)
}

/// `train` of the committed tiny SD 1.x pipeline on `data` into `out`, then `flags`: how every
/// training command line of the tests begins (model, data and output are always arguments 2–7).
pub fn train_args(data: &Path, out: &Path, flags: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "train".into(),
        "--pretrained_model_name_or_path".into(),
        fixture_pipeline("sd1-tiny").display().to_string(),
        "--train_data_dir".into(),
        data.display().to_string(),
        "--output_dir".into(),
        out.display().to_string(),
    ];
    args.extend(flags.iter().map(|flag| flag.to_string()));
    args
}

/// The program under test, with a Hugging Face home that is empty and offline, so no test ever
/// reaches the network or a developer's real cache.
pub fn program(hf_home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_instruct-pix2pix"));
    command
        .env("HF_HOME", hf_home)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    command
}

/// Runs the program with `args` and returns its output.
pub fn run(hf_home: &Path, args: &[&str]) -> Output {
    program(hf_home)
        .args(args)
        .output()
        .expect("the test binary starts")
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Copies a folder tree (fixtures are small).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Largest and mean absolute difference, in levels of 255, between two equally sized RGB images.
pub fn pixel_difference(a: &image::RgbImage, b: &image::RgbImage) -> (u8, f64) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.as_raw().len() as f64)
}

/// Files in `dir` (not recursive), sorted.
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
