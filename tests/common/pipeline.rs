//! A tiny diffusers-layout pipeline built at test time: real JSON configs, small safetensors
//! weights with known values (default and fp16 variants, a sharded VAE), a BPE tokenizer's
//! files, and files an edit does not need (which must never be downloaded).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// Tensors of a component: name → values, with a shape.
pub type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Deterministic values that are not all representable in f16 (so fp16 files differ).
fn values(count: usize, seed: f32) -> Vec<f32> {
    (0..count)
        .map(|i| ((i as f32 + seed) * 0.137).sin() * 0.731)
        .collect()
}

fn tensor(name: &str, shape: &[usize], seed: f32) -> (String, Vec<usize>, Vec<f32>) {
    let count = shape.iter().product();
    (name.to_string(), shape.to_vec(), values(count, seed))
}

/// The UNet's tensors (8 input channels, as InstructPix2Pix has).
pub fn unet_tensors() -> Tensors {
    vec![
        tensor("conv_in.weight", &[4, 8, 3, 3], 1.0),
        tensor("conv_in.bias", &[4], 2.0),
    ]
}

/// The VAE's tensors, split over two shards.
pub fn vae_shards() -> [Tensors; 2] {
    [
        vec![tensor("encoder.conv_in.weight", &[2, 3, 3, 3], 3.0)],
        vec![tensor("decoder.conv_out.weight", &[3, 2, 3, 3], 4.0)],
    ]
}

/// The text encoder's tensors.
pub fn text_encoder_tensors() -> Tensors {
    vec![tensor(
        "text_model.embeddings.token_embedding.weight",
        &[10, 4],
        5.0,
    )]
}

/// Serialises tensors to safetensors bytes in `dtype`.
pub fn safetensors_bytes(tensors: &Tensors, dtype: DType) -> Vec<u8> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let t = Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu)
                .and_then(|t| t.to_dtype(dtype))
                .expect("tensor");
            (name.clone(), t)
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("t.safetensors");
    candle_core::safetensors::save(&map, &path).expect("save safetensors");
    std::fs::read(&path).expect("read back")
}

fn json(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

/// Every file of the tiny pipeline repo, repo-relative path → content.
pub fn pipeline_files() -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut add = |path: &str, content: Vec<u8>| {
        files.insert(path.to_string(), content);
    };
    add(
        "model_index.json",
        json(
            r#"{
  "_class_name": "StableDiffusionInstructPix2PixPipeline",
  "_diffusers_version": "0.42.1",
  "feature_extractor": ["transformers", "CLIPImageProcessor"],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}"#,
        ),
    );
    add(
        "unet/config.json",
        json(r#"{"_class_name": "UNet2DConditionModel", "in_channels": 8, "out_channels": 4}"#),
    );
    add(
        "unet/diffusion_pytorch_model.safetensors",
        safetensors_bytes(&unet_tensors(), DType::F32),
    );
    add(
        "unet/diffusion_pytorch_model.fp16.safetensors",
        safetensors_bytes(&unet_tensors(), DType::F16),
    );
    add(
        "vae/config.json",
        json(r#"{"_class_name": "AutoencoderKL", "scaling_factor": 0.18215}"#),
    );
    let [shard1, shard2] = vae_shards();
    add(
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        safetensors_bytes(&shard1, DType::F32),
    );
    add(
        "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
        safetensors_bytes(&shard2, DType::F32),
    );
    add(
        "vae/diffusion_pytorch_model.safetensors.index.json",
        json(
            r#"{"metadata": {"total_size": 432}, "weight_map": {
  "encoder.conv_in.weight": "diffusion_pytorch_model-00001-of-00002.safetensors",
  "decoder.conv_out.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#,
        ),
    );
    add(
        "text_encoder/config.json",
        json(r#"{"architectures": ["CLIPTextModel"], "hidden_size": 4, "vocab_size": 10}"#),
    );
    add(
        "text_encoder/model.safetensors",
        safetensors_bytes(&text_encoder_tensors(), DType::F32),
    );
    add(
        "text_encoder/model.fp16.safetensors",
        safetensors_bytes(&text_encoder_tensors(), DType::F16),
    );
    add(
        "tokenizer/vocab.json",
        json(r#"{"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}"#),
    );
    add("tokenizer/merges.txt", json("#version: 0.2\na </w>\n"));
    add(
        "tokenizer/special_tokens_map.json",
        json(r#"{"pad_token": "<|endoftext|>"}"#),
    );
    add(
        "tokenizer/tokenizer_config.json",
        json(r#"{"model_max_length": 77}"#),
    );
    add(
        "scheduler/scheduler_config.json",
        json(r#"{"_class_name": "EulerAncestralDiscreteScheduler", "num_train_timesteps": 1000}"#),
    );
    // Files an edit does not need: never downloaded.
    add(".gitattributes", json("*.safetensors filter=lfs\n"));
    add("README.md", json("# tiny pipeline\n"));
    add(
        "unet/diffusion_pytorch_model.bin",
        b"not a real pickle".to_vec(),
    );
    add(
        "text_encoder/pytorch_model.bin",
        b"not a real pickle".to_vec(),
    );
    add(
        "safety_checker/model.safetensors",
        safetensors_bytes(&text_encoder_tensors(), DType::F32),
    );
    add(
        "feature_extractor/preprocessor_config.json",
        json(r#"{"crop_size": 224}"#),
    );
    files
}

/// The files an edit needs with the default variant.
pub fn needed_default() -> Vec<&'static str> {
    vec![
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors.index.json",
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ]
}

/// Writes `files` under `dir` (a local pipeline folder).
pub fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (path, content) in files {
        let target = dir.join(path);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::write(target, content).expect("write fixture file");
    }
}
