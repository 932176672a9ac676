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

/// Issue 16 item 4: every numeric flag of `train` has a range, refused by the parser (exit 2)
/// naming the flag and the value, before any model or data is read.
#[test]
fn train_nonsense_numbers() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("out");
    for (flag, value) in [
        ("--lora-rank", "100000"),
        ("--lora-rank", "0"),
        ("--train_batch_size", "0"),
        ("--train_batch_size", "1000000"),
        ("--learning_rate", "1e30"),
        ("--learning_rate", "-1"),
        ("--learning_rate", "NaN"),
        ("--adam_beta1", "1"),
        ("--adam_beta2", "-0.1"),
        ("--adam_epsilon", "0"),
        ("--adam_weight_decay", "inf"),
        ("--max_grad_norm", "nan"),
        ("--conditioning_dropout_prob", "2"),
        ("--resolution", "100000"),
        ("--gradient_accumulation_steps", "0"),
        ("--max_train_steps", "0"),
        ("--checkpointing_steps", "0"),
        ("--num_validation_images", "1000"),
        ("--local_rank", "-7"),
    ] {
        let output = run(
            &root.path().join("hf"),
            &[
                "train",
                "--pretrained_model_name_or_path",
                "/no/such/model",
                "--train_data_dir",
                "/no/such/data",
                "--output_dir",
                &out.display().to_string(),
                flag,
                value,
            ],
        );
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {text}");
        assert_eq!(text.trim().lines().count(), 1, "{text}");
        assert!(
            text.contains(flag) && text.contains(value),
            "{flag} {value}: {text}"
        );
        assert!(!out.exists());
    }
}

/// Issue 16 item 4: a `.npy` header declaring 4×10¹⁰ floats in a 192-byte file is refused by its
/// size, naming the file, not allocated.
#[test]
fn latents_declaring_a_huge_shape() {
    let case = Case::new();
    let mut header =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 4, 100000, 100000), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, 64));
    assert_eq!(bytes.len(), 192);
    let latents = write(&case.root.join("huge.npy"), &bytes);
    let line = case.fails(&sd1(), &case.input(), &["--latents", &latents]);
    assert!(line.contains("huge.npy"), "{line}");
    assert!(line.contains("[1, 4, 100000, 100000]"), "{line}");
}

/// Makes a FIFO (named pipe) at `path`.
fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
}

/// Issue 16 item 5: special files as inputs are refused at once, naming them: a FIFO as
/// `--image` or `--latents` (reading one blocks forever), `/dev/zero` (never ends).
#[test]
fn special_files_as_inputs() {
    let case = Case::new();
    let fifo = case.root.join("pipe.png");
    mkfifo(&fifo);
    let fifo = fifo.display().to_string();
    let line = case.fails(&sd1(), &fifo, &[]);
    assert!(line.contains("pipe.png") && line.contains("FIFO"), "{line}");
    let line = case.fails(&sd1(), "/dev/zero", &[]);
    assert!(
        line.contains("/dev/zero") && line.contains("not a regular file"),
        "{line}"
    );
    let line = case.fails(&sd1(), &case.input(), &["--latents", &fifo]);
    assert!(line.contains("pipe.png") && line.contains("FIFO"), "{line}");
}

/// Issue 16 item 5: a model whose config or weight file is a FIFO or `/dev/zero` is refused
/// naming the file, instead of hanging or reading gigabytes.
#[test]
fn special_files_in_the_model_folder() {
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    let config = model.join("unet").join("config.json");
    std::fs::remove_file(&config).unwrap();
    mkfifo(&config);
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("unet") && line.contains("config.json") && line.contains("FIFO"),
        "{line}"
    );

    // A fresh case each time: copying the fixture again onto the FIFO would block on it.
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    let weights = model
        .join("vae")
        .join("diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &weights).unwrap();
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("diffusion_pytorch_model.safetensors") && line.contains("character device"),
        "{line}"
    );

    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    let merges = model.join("tokenizer").join("merges.txt");
    std::fs::remove_file(&merges).unwrap();
    mkfifo(&merges);
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("merges.txt") && line.contains("FIFO"),
        "{line}"
    );
}

/// Issue 16 item 9: a JPEG cut short is refused ("truncated", as PIL says), not edited.
#[test]
fn truncated_jpeg() {
    let case = Case::new();
    let input = image::open(case.input()).unwrap().to_rgb8();
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(&input)
        .unwrap();
    let cut = bytes.len() * 3 / 4;
    let jpeg = write(&case.root.join("cut.jpg"), &bytes[..cut]);
    let line = case.fails(&sd1(), &jpeg, &[]);
    assert!(
        line.contains("cut.jpg") && line.contains("truncated"),
        "{line}"
    );
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

/// Sets `key` to `value` in the JSON file `path`.
fn set_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json[key] = value;
    std::fs::write(path, json.to_string()).unwrap();
}

/// Issue 16 items 3 and 10: config numbers that would make a black edit or an obscure failure
/// are refused at load, the message naming the file and the key (and no Rust `Some(..)`).
#[test]
fn config_numbers_out_of_range() {
    use serde_json::json;
    let case = Case::new();
    let cases = [
        ("unet/config.json", "norm_eps", json!(-1.0)),
        ("unet/config.json", "layers_per_block", json!(0)),
        ("unet/config.json", "attention_head_dim", json!(1000)),
        ("unet/config.json", "block_out_channels", json!([32, 0])),
        ("unet/config.json", "downsample_padding", json!(1000)),
        ("vae/config.json", "scaling_factor", json!(0.0)),
        ("text_encoder/config.json", "layer_norm_eps", json!(-1e-5)),
        ("scheduler/scheduler_config.json", "beta_end", json!(1.5)),
        ("scheduler/scheduler_config.json", "beta_start", json!(-0.1)),
        (
            "scheduler/scheduler_config.json",
            "num_train_timesteps",
            json!(1),
        ),
        (
            "tokenizer/tokenizer_config.json",
            "model_max_length",
            json!(1000),
        ),
        (
            "tokenizer/tokenizer_config.json",
            "model_max_length",
            json!(-5),
        ),
    ];
    for (file, key, value) in cases {
        let model = case.pipeline_copy("sd1-tiny");
        set_json(&model.join(file), key, value.clone());
        let line = case.fails(&model.display().to_string(), &case.input(), &[]);
        let file_name = Path::new(file).file_name().unwrap().to_str().unwrap();
        assert!(
            line.contains(file_name) && line.contains(key),
            "{file} {key}={value}: {line}"
        );
        assert!(!line.contains("Some("), "{line}");
    }
}

/// Issue 16 item 10: an empty UNet config names the file and the missing key, not only "takes 4
/// input channels"; token ids beyond the text encoder's vocabulary name `vocab_size`.
#[test]
fn empty_unet_config_and_ids_beyond_the_vocabulary() {
    let case = Case::new();
    // `{}`: every key takes diffusers' default, whose cross-attention width (1280) is not the
    // text encoder's.
    let model = case.pipeline_copy("sd1-tiny");
    let unet_config = model.join("unet").join("config.json");
    std::fs::write(&unet_config, "{}").unwrap();
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("unet/config.json")
            && line.contains("`cross_attention_dim`")
            && line.contains("`hidden_size`"),
        "{line}"
    );
    std::fs::write(&unet_config, r#"{"cross_attention_dim": 32}"#).unwrap();
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("unet/config.json has no `in_channels`"),
        "{line}"
    );

    let model = case.pipeline_copy("sd1-tiny");
    set_json(
        &model.join("tokenizer").join("vocab.json"),
        "zzzz</w>",
        serde_json::json!(60000),
    );
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("tokenizer") && line.contains("60000") && line.contains("vocab_size"),
        "{line}"
    );
}

/// Issue 16 item 9: an empty merges.txt would tokenize letter by letter; it is refused.
#[test]
fn empty_merges_file() {
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    std::fs::write(
        model.join("tokenizer").join("merges.txt"),
        "#version: 0.2\n",
    )
    .unwrap();
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("merges.txt") && line.contains("no merges"),
        "{line}"
    );
}

/// Rewrites one tensor of a safetensors file through `change`.
fn rewrite_tensor(path: &Path, name: &str, change: impl Fn(Vec<f32>) -> Vec<f32>) {
    use candle_core::{Device, Tensor};
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let tensor = &tensors[name];
    let dtype = tensor.dtype();
    let shape = tensor.dims().to_vec();
    let values = tensor
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let changed = Tensor::from_vec(change(values), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    tensors.insert(name.to_string(), changed);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// Issue 16 item 3: a weight file holding NaN is refused at load, naming the file and tensor.
#[test]
fn weights_with_nan() {
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    let weights = model
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    rewrite_tensor(&weights, "conv_out.weight", |mut v| {
        v[3] = f32::NAN;
        v
    });
    let line = case.fails(&model.display().to_string(), &case.input(), &[]);
    assert!(
        line.contains("diffusion_pytorch_model.safetensors")
            && line.contains("conv_out.weight")
            && line.contains("NaN"),
        "{line}"
    );
}

/// Issue 16 item 3: weights so large that the edit overflows give an error naming the stage,
/// not a black picture with exit code 0.
#[test]
fn an_edit_that_overflows_names_the_stage() {
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    let weights = model
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    // Finite (3e38 < f32::MAX), so loading accepts them; their products overflow.
    rewrite_tensor(&weights, "conv_out.weight", |v| vec![3e38; v.len()]);
    let line = case.fails(
        &model.display().to_string(),
        &case.input(),
        &["--steps", "2", "--seed", "1"],
    );
    assert!(line.contains("turned to NaN or infinity in"), "{line}");
    assert!(
        line.contains("denoising") || line.contains("decoded image"),
        "{line}"
    );
}

/// A deterministic fuzz of the config readers and the model built from them: random numbers of
/// each config file replaced by nasty values (0, negative, huge, fractional) or keys removed;
/// loading and a one-step edit must end in an image or an error, never a panic.
#[test]
fn damaged_configs_never_panic() {
    use instruct_pix2pix::model::{InstructPix2PixModel, LoadOptions};
    use instruct_pix2pix::pipeline::image::load_image;
    use instruct_pix2pix::pipeline::{EditPipeline, EditSettings};
    use serde_json::Value;

    const NASTY: [f64; 12] = [
        0.0, 1.0, 2.0, 3.0, 7.0, 1000.0, 100000.0, -1.0, 0.5, 1e-30, 1e30, 2.5e38,
    ];
    let case = Case::new();
    let model = case.pipeline_copy("sd1-tiny");
    let files = [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
        "tokenizer/tokenizer_config.json",
    ];
    let originals: Vec<String> = files
        .iter()
        .map(|f| std::fs::read_to_string(model.join(f)).unwrap())
        .collect();
    let image = load_image(Path::new(&case.input())).unwrap();
    let mut state = 0x5DEE_CE66_D1CE_4E5Bu64;
    let mut next = move |below: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % below as u64) as usize
    };
    // Every numeric leaf of a JSON value, as a path of keys and indices.
    fn number_paths(value: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match value {
            Value::Number(_) => out.push(path.clone()),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(i.to_string());
                    number_paths(item, path, out);
                    path.pop();
                }
            }
            Value::Object(map) => {
                for (key, item) in map {
                    path.push(key.clone());
                    number_paths(item, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    let (mut loaded, mut refused) = (0, 0);
    for _ in 0..40 {
        let which = next(files.len());
        let mut json: Value = serde_json::from_str(&originals[which]).unwrap();
        let mut paths = Vec::new();
        number_paths(&json, &mut Vec::new(), &mut paths);
        if next(4) == 0 {
            let keys: Vec<String> = json.as_object().unwrap().keys().cloned().collect();
            json.as_object_mut()
                .unwrap()
                .remove(&keys[next(keys.len())]);
        } else {
            let path = &paths[next(paths.len())];
            let mut target = &mut json;
            for part in path {
                target = match target {
                    Value::Array(items) => &mut items[part.parse::<usize>().unwrap()],
                    other => &mut other[part.as_str()],
                };
            }
            let nasty = NASTY[next(NASTY.len())];
            *target = serde_json::Number::from_f64(nasty)
                .map(|n| {
                    if nasty.fract() == 0.0 && nasty.abs() < 1e15 {
                        Value::from(nasty as i64)
                    } else {
                        Value::Number(n)
                    }
                })
                .unwrap();
        }
        for (file, original) in files.iter().zip(&originals) {
            std::fs::write(model.join(file), original).unwrap();
        }
        std::fs::write(model.join(files[which]), json.to_string()).unwrap();
        let options = LoadOptions {
            variant: instruct_pix2pix::model::hub::Variant::Default,
            dtype: candle_core::DType::F32,
            device: candle_core::Device::Cpu,
        };
        let edited = InstructPix2PixModel::load(&model, &options)
            .map_err(|e| e.to_string())
            .and_then(|m| EditPipeline::new(m).map_err(|e| e.to_string()))
            .and_then(|mut pipeline| {
                let settings = EditSettings {
                    prompt: "make it snowy".into(),
                    steps: 1,
                    seed: 1,
                    ..EditSettings::default()
                };
                let cancel = std::sync::atomic::AtomicBool::new(false);
                pipeline
                    .edit(&image, &settings, &mut |_| {}, &cancel)
                    .map_err(|e| e.to_string())
            });
        match edited {
            Ok(_) => loaded += 1,
            Err(message) => {
                assert!(!message.contains("Some("), "{message}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 5 && loaded > 5,
        "{loaded} loaded, {refused} refused"
    );
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

/// `--dtype bf16` on the CPU is no longer refused (issue 14): where the bf16 kernels cannot run
/// (here forced with `INSTRUCT_PIX2PIX_CPU_BF16=0`) the edit runs in float32 after one line of
/// notice, with no panic.
#[test]
fn bf16_on_the_cpu_without_its_kernels_runs_float32_with_one_notice() {
    let case = Case::new();
    let out = case.out();
    let output = common::program(&case.root.join("hf"))
        .env("INSTRUCT_PIX2PIX_CPU_BF16", "0")
        .args([
            "edit",
            "--model",
            &sd1(),
            "--image",
            &case.input(),
            "--prompt",
            "make it snowy",
            "--steps",
            "2",
            "--output",
            &out,
            "--quiet",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
        ])
        .output()
        .unwrap();
    let text = stderr(&output);
    assert!(output.status.success(), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert!(text.contains("float32") && text.contains("bf16"), "{text}");
    assert!(Path::new(&out).is_file());
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
