//! The memory estimate's unit tests: each setting moves it the right way, savings and fit.

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipelines")
        .join(name)
}

/// timbrooks/instruct-pix2pix's shapes: the SD 1.5 UNet with 8 input channels, its VAE and
/// CLIP ViT-L/14's text encoder (their parameter counts, conv_in grown to 8 channels).
fn full_size() -> ModelSizes {
    let unet: UNetConfig = serde_json::from_str(
        r#"{"in_channels": 8, "block_out_channels": [320, 640, 1280, 1280],
            "attention_head_dim": 8, "cross_attention_dim": 768, "layers_per_block": 2}"#,
    )
    .unwrap();
    let vae: VaeConfig = serde_json::from_str(
        r#"{"block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"],
            "layers_per_block": 2}"#,
    )
    .unwrap();
    let text: ClipTextConfig = serde_json::from_str(
        r#"{"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77}"#,
    )
    .unwrap();
    let mut sizes = ModelSizes::from_configs(&unet, &vae, &text, Path::new("unet")).unwrap();
    sizes.unet_params = 859_532_484;
    sizes.unet_small_params = 1_200_000;
    sizes.vae_params = 83_653_863;
    sizes.text_encoder_params = 123_060_480;
    sizes
}

fn settings() -> MemorySettings {
    MemorySettings::example()
}

#[test]
fn sizes_of_the_fixture_come_from_its_files_and_configs() {
    let sizes = ModelSizes::from_folder(&fixture("sd1-tiny"), Variant::Default).unwrap();
    // The fixture's UNet has 0.56 M parameters (docs/benchmarks.md), in float32.
    let unet_file = fixture("sd1-tiny").join("unet/diffusion_pytorch_model.safetensors");
    let file_params = std::fs::metadata(unet_file).unwrap().len() / 4;
    assert!(sizes.unet_params <= file_params && sizes.unet_params > file_params * 9 / 10);
    assert!(sizes.unet_small_params > 0 && sizes.unet_small_params < sizes.unet_params);
    assert!(sizes.vae_params > 0 && sizes.text_encoder_params > 0);
    assert_eq!(sizes.vae_scale, 8);
    // Down: 2 levels × 2 × (resnet + transformer) + 2 resnets, 2 samplers; mid: 3; up: 3
    // levels × 3 × (concat + resnet) + 2 × 3 transformers + 2 samplers.
    let transformers = sizes
        .unet_segments
        .iter()
        .filter(|s| matches!(s.kind, SegmentKind::Transformer(_)))
        .count();
    assert_eq!(transformers, 4 + 1 + 6);
    // LoRA's four target projections in each of a layer's two attentions.
    assert_eq!(
        sizes.lora_projections.len(),
        2 * crate::train::lora::TARGET_MODULES.len() * transformers
    );
}

#[test]
fn full_size_parts_are_the_known_byte_counts() {
    let sizes = full_size();
    let e = estimate(&sizes, &settings());
    // Weights, gradients and two AdamW moments of 860 M parameters: 13.8 GB
    // (docs/benchmarks.md).
    let fixed = e.unet_weights + e.gradients + e.optimizer;
    assert_eq!(fixed, 16 * sizes.unet_params);
    assert!((13.7e9..13.9e9).contains(&(fixed as f64)), "{fixed}");
    // LoRA rank 4 on SD 1.5's attention projections: 797,184 parameters (peft's count).
    assert_eq!(sizes.lora_params(4), 797_184);
    // 8-bit AdamW: about 1.7 GB instead of 6.9 GB.
    let eight = estimate(
        &sizes,
        &MemorySettings {
            use_8bit_adam: true,
            ..settings()
        },
    );
    assert!(
        (1.70e9..1.75e9).contains(&(eight.optimizer as f64)),
        "{eight:?}"
    );
}

#[test]
fn each_setting_moves_the_estimate_the_right_way() {
    let sizes = full_size();
    let base = settings();
    let total = |s: &MemorySettings| estimate(&sizes, s).total();
    let parts = |s: &MemorySettings| estimate(&sizes, s);
    let with = |change: MemoryChange| change.apply(&base);

    let ckpt = with(MemoryChange::GradientCheckpointing);
    assert!(parts(&ckpt).activations < parts(&base).activations / 3);
    assert!(total(&ckpt) < total(&base));
    let eight = with(MemoryChange::Adam8Bit);
    assert!(parts(&eight).optimizer < parts(&base).optimizer / 3);
    assert_eq!(parts(&eight).activations, parts(&base).activations);
    let lora = with(MemoryChange::Lora(4));
    assert!(parts(&lora).gradients < parts(&base).gradients / 100);
    assert!(total(&lora) < total(&base));
    let batch = MemorySettings {
        train_batch_size: 4,
        ..base.clone()
    };
    assert_eq!(parts(&batch).activations, 4 * parts(&base).activations);
    let large = MemorySettings {
        resolution: 512,
        ..base.clone()
    };
    assert!(parts(&large).activations > 3 * parts(&base).activations);
    let ema = MemorySettings {
        use_ema: true,
        ..base.clone()
    };
    assert_eq!(total(&ema) - total(&base), 4 * sizes.unet_params);
    let accumulate = MemorySettings {
        gradient_accumulation_steps: 4,
        ..base.clone()
    };
    assert_eq!(parts(&accumulate).gradients, 2 * parts(&base).gradients);
    // Caching encodes one example at a time (once) and holds the cache.
    let cached = MemoryChange::CacheLatents.apply(&batch);
    assert_eq!(parts(&cached).frozen_work, parts(&base).frozen_work);
    assert!(parts(&cached).frozen_work < parts(&batch).frozen_work);
    assert!(parts(&cached).latent_cache > 0);
    // On the CPU, bf16 holds the frozen networks in half and nothing else (activations and
    // the trained UNet stay float32); offered where the CPU has avx512_bf16.
    let half = with(MemoryChange::HalfPrecision);
    assert_eq!(2 * parts(&half).frozen_weights, parts(&base).frozen_weights);
    assert_eq!(parts(&half).unet_weights, parts(&base).unet_weights);
    assert_eq!(parts(&half).activations, parts(&base).activations);
    let lora = MemoryChange::HalfPrecision.apply(&MemoryChange::Lora(4).apply(&base));
    assert_eq!(
        parts(&lora).unet_weights,
        2 * sizes.unet_params + 4 * sizes.lora_params(4),
        "LoRA's frozen base in bf16"
    );
    assert_eq!(
        savings(&sizes, &base)
            .iter()
            .any(|s| s.change == MemoryChange::HalfPrecision),
        crate::model::nn::cpu_bf16_enabled()
    );
    // On a GPU it also halves the activations and adds a 16-bit copy of the UNet's weights
    // (where it saves: at 512², batch 4).
    let gpu = MemorySettings {
        device: DeviceKind::Gpu,
        resolution: 512,
        train_batch_size: 4,
        ..base.clone()
    };
    let gpu_half = MemoryChange::HalfPrecision.apply(&gpu);
    assert_eq!(
        parts(&gpu_half).unet_weights,
        parts(&gpu).unet_weights + 2 * sizes.unet_params
    );
    assert!(parts(&gpu_half).activations < parts(&gpu).activations * 51 / 100);
    assert!(
        savings(&sizes, &gpu)
            .iter()
            .any(|s| s.change == MemoryChange::HalfPrecision)
    );
}

#[test]
fn savings_come_largest_first_and_fit_turns_on_what_is_needed() {
    let sizes = full_size();
    let base = MemorySettings {
        train_batch_size: 4,
        ..settings()
    };
    let list = savings(&sizes, &base);
    assert!(list.windows(2).all(|w| w[0].bytes >= w[1].bytes));
    assert!(list.iter().all(|s| s.bytes > 0));
    let now = estimate(&sizes, &base).total();
    for s in &list {
        assert_eq!(
            estimate(&sizes, &s.change.apply(&base)).total(),
            now - s.bytes
        );
    }
    // Plenty of memory: nothing changes.
    assert_eq!(fit(&sizes, &base, u64::MAX), base);
    // A 12 GB budget: the result-keeping changes come on until it fits.
    let fitted = fit(&sizes, &base, 12_000_000_000);
    assert!(estimate(&sizes, &fitted).total() <= 12_000_000_000);
    assert!(fitted.gradient_checkpointing);
    assert_eq!(fitted.lora_rank, None);
    assert_eq!(fitted.train_batch_size, 4);
}

#[test]
fn the_message_names_the_settings_by_saving() {
    let sizes = full_size();
    let base = settings();
    let oom = OutOfMemory {
        needed: estimate(&sizes, &base).total(),
        available: Some(3_100_000_000),
        device: "cpu".into(),
        savings: savings(&sizes, &base),
        during_step: None,
    };
    let message = oom.to_string();
    assert!(message.starts_with("training needs ~"), "{message}");
    assert!(
        message.contains("3.1 GB available on cpu: try --"),
        "{message}"
    );
    assert!(message.contains("--gradient_checkpointing (−"), "{message}");
    assert!(message.contains("--use_8bit_adam (−"), "{message}");
    assert!(message.contains("--lora-rank 4 (−"), "{message}");
    assert!(message.ends_with("(or --skip_memory_check to try anyway)"));
    assert!(
        oom.message_with_labels()
            .contains("Gradient checkpointing (−")
    );
    let in_step = OutOfMemory {
        during_step: Some((7, Some(PathBuf::from("out/checkpoint-5")))),
        ..oom
    };
    let message = in_step.to_string();
    assert!(
        message.starts_with("out of memory on cpu in step 7"),
        "{message}"
    );
    assert!(message.ends_with("the last checkpoint, out/checkpoint-5, is intact"));
}

#[test]
fn sizes_parse_with_their_units() {
    assert_eq!(parse_bytes("3.5GB"), Some(3_500_000_000));
    assert_eq!(parse_bytes("800 MiB"), Some(800 << 20));
    assert_eq!(parse_bytes("1234"), Some(1234));
    assert_eq!(parse_bytes("lots"), None);
    assert_eq!(parse_bytes("3 parsecs"), None);
    assert_eq!(format_bytes(14_200_000_000), "14.2 GB");
    assert_eq!(format_bytes(850_000_000), "850 MB");
    assert_eq!(format_bytes(12_300), "12 kB");
}

#[test]
fn out_of_memory_errors_are_recognised_by_their_text() {
    let cuda =
        candle_core::Error::Msg("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into());
    assert!(is_out_of_memory(&cuda.to_string()));
    assert!(is_out_of_memory("CUBLAS_STATUS_ALLOC_FAILED"));
    assert!(!is_out_of_memory("shape mismatch in matmul"));
}

#[test]
fn the_cpu_reports_what_it_has() {
    let available = available_memory(&Device::Cpu).unwrap();
    assert!(available.bytes > 0);
}
