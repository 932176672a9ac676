//! Mutation fuzzing of every file reader for a fixed time (issue 16): the safetensors header,
//! the config JSONs (model index, UNet, VAE, text encoder, scheduler), the tokenizer files,
//! images, `.npy` latents, and a checkpoint's manifest and state. Each starts from a valid fixture file and
//! feeds the reader seeded random damage (bit flips, overwritten and inserted bytes, truncation,
//! numbers swapped for huge or negative ones, duplicated spans). A reader must answer Ok or Err:
//! a panic, an abort on a huge allocation or a hang is a finding.
//!
//! Time per reader: `IP2P_FUZZ_SECONDS` (CI sets it; 2 s by default so a local `cargo test`
//! stays quick). `IP2P_FUZZ_SEED` picks the seed (printed on failure, to replay a finding).

use crate::common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use instruct_pix2pix::model::clip::ClipTextConfig;
use instruct_pix2pix::model::config::ModelIndex;
use instruct_pix2pix::model::tokenizer::ClipTokenizer;
use instruct_pix2pix::model::unet::UNetConfig;
use instruct_pix2pix::model::vae::VaeConfig;
use instruct_pix2pix::model::weights::{check_safetensors, safetensors_shapes};
use instruct_pix2pix::pipeline::image::load_image;
use instruct_pix2pix::pipeline::npy::read_f32_npy;
use instruct_pix2pix::pipeline::scheduler::SchedulerConfig;
use instruct_pix2pix::train::checkpoint::{TensorGroup, load_checkpoint, save_checkpoint};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn budget() -> Duration {
    let seconds = std::env::var("IP2P_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(2.0);
    Duration::from_secs_f64(seconds)
}

fn base_seed() -> u64 {
    std::env::var("IP2P_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1b2_0a5)
}

/// Numbers that break size arithmetic, as text (for JSON and headers) and as bytes.
const NASTY_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1e308",
    "-1e308",
    "NaN",
    "4294967296",
    "18446744073709551615",
    "9223372036854775807",
    "100000",
    "1e-300",
];

/// One random damage of `bytes`.
fn mutate(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = [0x00, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b'9'][rng.random_range(0..8)];
            }
            2 if len > 0 => {
                out.truncate(rng.random_range(0..len));
            }
            3 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(i..i, junk);
            }
            4 => {
                // A run of digits swapped for a nasty number (JSON values, header sizes).
                let digits: Vec<usize> = out
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.is_ascii_digit())
                    .map(|(i, _)| i)
                    .collect();
                if !digits.is_empty() {
                    let start = digits[rng.random_range(0..digits.len())];
                    let mut end = start;
                    while end < out.len() && (out[end].is_ascii_digit() || out[end] == b'.') {
                        end += 1;
                    }
                    let nasty = NASTY_NUMBERS[rng.random_range(0..NASTY_NUMBERS.len())];
                    out.splice(start..end, nasty.bytes());
                }
            }
            5 if len >= 8 => {
                // A little-endian u64 at a random place (the safetensors header length).
                let i = rng.random_range(0..=len - 8);
                let value: u64 =
                    [0, 1, u64::MAX, 1 << 40, len as u64 * 2, rng.random()][rng.random_range(0..6)];
                out[i..i + 8].copy_from_slice(&value.to_le_bytes());
            }
            6 if len > 1 => {
                // A span duplicated elsewhere (repeated keys, overlapping ranges).
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..64)).min(len);
                let span = out[a..b].to_vec();
                let at = rng.random_range(0..=len);
                out.splice(at..at, span);
            }
            _ => {
                out.clear();
            }
        }
    }
    out
}

/// Runs `read` on mutations of `seed_bytes` written to `target` for the time budget; panics
/// (with the seed and the case) on the first reader panic.
fn fuzz(name: &str, seed_bytes: &[u8], target: &Path, read: &Reader<'_>) {
    let seed = base_seed()
        ^ name
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut rng = StdRng::seed_from_u64(seed);
    let deadline = Instant::now() + budget();
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let case = mutate(seed_bytes, &mut rng);
        std::fs::write(target, &case).unwrap();
        let started = Instant::now();
        if catch_unwind(AssertUnwindSafe(|| read(target))).is_err() {
            let file_name: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            let saved = std::env::temp_dir().join(format!("fuzz-finding-{file_name}-{cases}"));
            let _ = std::fs::write(&saved, &case);
            panic!(
                "{name}: the reader panicked on case {cases} (seed {seed}); the input is saved as {}",
                saved.display()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: case {cases} took {:?} (seed {seed})",
            started.elapsed()
        );
        cases += 1;
    }
    // Restore the valid file for whatever shares the folder.
    std::fs::write(target, seed_bytes).unwrap();
    eprintln!("fuzz {name}: {cases} cases");
    assert!(cases > 0);
}

/// A reader under test, given the damaged file's path.
type Reader<'a> = dyn Fn(&Path) + 'a;

fn sd1_tiny() -> PathBuf {
    common::fixture_pipeline("sd1-tiny")
}

#[test]
fn fuzz_safetensors_header() {
    let work = tempfile::tempdir().unwrap();
    let seed = std::fs::read(sd1_tiny().join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let target = work.path().join("model.safetensors");
    fuzz("safetensors", &seed, &target, &|path| {
        let _ = check_safetensors(path);
        let _ = safetensors_shapes(&[path.to_path_buf()]);
    });
}

#[test]
fn fuzz_config_json() {
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    common::copy_dir(&sd1_tiny(), &model);
    let cases: [(&str, &Reader<'_>); 5] = [
        ("model_index.json", &|_: &Path| {
            let _ = ModelIndex::read(&model);
        }),
        ("unet/config.json", &|path: &Path| {
            let _ = UNetConfig::from_file(path);
        }),
        ("vae/config.json", &|path: &Path| {
            let _ = VaeConfig::from_file(path);
        }),
        ("text_encoder/config.json", &|path: &Path| {
            let _ = ClipTextConfig::from_file(path);
        }),
        ("scheduler/scheduler_config.json", &|path: &Path| {
            let _ = SchedulerConfig::from_file(path);
        }),
    ];
    for (file, read) in cases {
        let target = model.join(file);
        let seed = std::fs::read(&target).unwrap();
        fuzz(file, &seed, &target, read);
    }
}

#[test]
fn fuzz_tokenizer_files() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("tokenizer");
    common::copy_dir(&sd1_tiny().join("tokenizer"), &dir);
    for file in [
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        let target = dir.join(file);
        let seed = std::fs::read(&target).unwrap();
        fuzz(file, &seed, &target, &|_| {
            if let Ok(tokenizer) = ClipTokenizer::from_dir(&dir) {
                let _ = tokenizer.encode_for_model("turn the sky into a starry night, café");
            }
        });
    }
}

#[test]
fn fuzz_images() {
    let work = tempfile::tempdir().unwrap();
    let png = std::fs::read(common::fixtures().join("edits/sd1-plain/input.png")).unwrap();
    fuzz("png", &png, &work.path().join("input.png"), &|path| {
        let _ = load_image(path);
    });
    let decoded = image::load_from_memory(&png).unwrap();
    let mut jpeg = Vec::new();
    decoded
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    fuzz("jpeg", &jpeg, &work.path().join("input.jpg"), &|path| {
        let _ = load_image(path);
    });
    // The JPEG decoder's other paths (issue 15): progressive scans with restart markers, 4:2:2,
    // CMYK, 4:4:0 written by hand.
    let decode = common::fixtures().join("image/decode");
    for name in [
        "restart_progressive_420_37x29.jpg",
        "restart_rows_422_37x29.jpg",
        "cmyk_progressive_37x29.jpg",
        "hand_440_37x29.jpg",
    ] {
        let seed = std::fs::read(decode.join(name)).unwrap();
        fuzz(name, &seed, &work.path().join(name), &|path| {
            let _ = load_image(path);
        });
    }
}

#[test]
fn fuzz_checkpoint_manifest_and_state() {
    let work = tempfile::tempdir().unwrap();
    let tensor = candle_core::Tensor::arange(0f32, 12.0, &Device::Cpu)
        .unwrap()
        .reshape((3, 4))
        .unwrap();
    let saved = save_checkpoint(
        work.path(),
        1,
        &[TensorGroup::new("unet", vec![("w".to_string(), tensor)])],
        &serde_json::json!({ "global_step": 1 }),
        None,
    )
    .unwrap();
    for file in std::fs::read_dir(&saved.path).unwrap() {
        let target = file.unwrap().path();
        let name = target.file_name().unwrap().to_string_lossy().into_owned();
        let seed = std::fs::read(&target).unwrap();
        fuzz(&format!("checkpoint {name}"), &seed, &target, &|_| {
            let _ = load_checkpoint(&saved.path, &Device::Cpu);
        });
    }
}

#[test]
fn fuzz_npy_latents() {
    let work = tempfile::tempdir().unwrap();
    let seed = std::fs::read(common::fixtures().join("edits/sd1-plain/latents.npy")).unwrap();
    fuzz("npy", &seed, &work.path().join("latents.npy"), &|path| {
        let _ = read_f32_npy(path);
    });
}
