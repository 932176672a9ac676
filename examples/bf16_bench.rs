//! Timings of the CPU's bf16 products (`model::nn`'s bf16 kernels, issue 14) against the
//! float32 path, interleaved in one process so that load from other programs hits both alike.
//!
//! ```text
//! cargo run --release --locked --example bf16_bench -- gemm [REPS]
//! cargo run --release --locked --example bf16_bench -- unet MODEL_DIR [REPS]
//! ```
//!
//! `gemm` times matrix products through a linear layer, `x [M, K] · W [N, K]ᵀ`, with W in bf16
//! (activations converted to bf16 as they are packed) and in float32 (candle's product), at
//! 2048³ and at Stable Diffusion 1.5's shapes, in GFLOP/s of 2·M·N·K, and six 3×3 convolutions
//! of the UNet and the VAE (GFLOP/s of the direct convolution's multiply-adds, whatever
//! algorithm runs). `unet` times one forward pass of the UNet in MODEL_DIR/unet on a batch
//! of 3 latents of 8×32×32 (a 256×256 edit), loaded once in float32 and once for bf16 products,
//! and prints the two outputs' relative distance.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor};
use instruct_pix2pix::model::cpu_precision::relative_distance;
use instruct_pix2pix::model::nn::{self, Conv2d, Linear};
use instruct_pix2pix::model::unet::{PerBlock, UNet2DConditionModel, UNetConfig};
use instruct_pix2pix::model::weights;

fn main() -> Result<()> {
    if !nn::cpu_bf16_enabled() {
        eprintln!(
            "note: the bf16 kernels do not run here (no avx512_bf16 or INSTRUCT_PIX2PIX_CPU_BF16=0): the bf16 side is the portable fallback"
        );
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("gemm") => {
            let reps = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(5);
            bench_gemm(reps)
        }
        Some("unet") => {
            let dir = args.get(1).context("unet needs MODEL_DIR")?;
            let reps = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3);
            bench_unet(Path::new(dir), reps)
        }
        _ => bail!("usage: bf16_bench gemm [REPS] | unet MODEL_DIR [REPS]"),
    }
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let start = Instant::now();
    let value = f()?;
    Ok((start.elapsed().as_secs_f64(), value))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn bench_gemm(reps: usize) -> Result<()> {
    // (name, M, N, K)
    let shapes = [
        ("square 2048", 2048, 2048, 2048),
        ("ff in, 32² ×3", 3072, 2560, 320),
        ("ff out, 32² ×3", 3072, 320, 1280),
        ("attn proj, 16² ×3", 768, 640, 640),
        ("ff in, 8² ×3", 192, 10240, 1280),
    ];
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "linear", "f32 GFLOP/s", "bf16 GFLOP/s", "speed-up"
    );
    for (name, m, n, k) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let f32_layer = Linear::new(w.clone(), None);
        let bf16_layer = Linear::new(w.to_dtype(DType::BF16)?, None);
        let flops = 2.0 * (m * n * k) as f64;
        compare(name, flops, reps, &x, &f32_layer, &bf16_layer)?;
    }
    // 3×3 convolutions of the UNet (batch 3: a 256×256 edit) and of the VAE at 256×256.
    for (name, batch, c_in, c_out, side) in [
        ("conv 320, 32² ×3", 3, 320, 320, 32),
        ("conv 960→320, 32² ×3", 3, 960, 320, 32),
        ("conv 640, 16² ×3", 3, 640, 640, 16),
        ("conv 1280→640, 16² ×3", 3, 1280, 640, 16),
        ("vae conv 128, 256²", 1, 128, 128, 256),
        ("vae conv 512, 64²", 1, 512, 512, 64),
    ] {
        let x = Tensor::randn(0f32, 1.0, (batch, c_in, side, side), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 0.05, (c_out, c_in, 3, 3), &Device::Cpu)?;
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let f32_conv = Conv2d::new(w.clone(), None, cfg);
        let bf16_conv = Conv2d::new(w.to_dtype(DType::BF16)?, None, cfg);
        let flops = 2.0 * (c_out * c_in * 9 * batch * side * side) as f64;
        compare(name, flops, reps, &x, &f32_conv, &bf16_conv)?;
    }
    Ok(())
}

/// Times `f32_layer` and `bf16_layer` on `x` alternately (one untimed call each first) and
/// prints the medians as GFLOP/s of `flops` and the speed-up.
fn compare(
    name: &str,
    flops: f64,
    reps: usize,
    x: &Tensor,
    f32_layer: &impl Module,
    bf16_layer: &impl Module,
) -> Result<()> {
    let (mut f32_times, mut bf16_times) = (Vec::new(), Vec::new());
    f32_layer.forward(x)?;
    bf16_layer.forward(x)?;
    for _ in 0..reps {
        f32_times.push(timed(|| Ok(f32_layer.forward(x)?))?.0);
        bf16_times.push(timed(|| Ok(bf16_layer.forward(x)?))?.0);
    }
    let (a, b) = (median(f32_times), median(bf16_times));
    println!(
        "{name:<22} {:>12.1} {:>12.1} {:>7.2}×",
        flops / a / 1e9,
        flops / b / 1e9,
        a / b
    );
    Ok(())
}

fn bench_unet(dir: &Path, reps: usize) -> Result<()> {
    let unet_dir = dir.join("unet");
    let config = UNetConfig::from_file(&unet_dir.join("config.json"))?;
    let files = weights::component_weights(
        &unet_dir,
        weights::DIFFUSERS_WEIGHTS,
        instruct_pix2pix::model::hub::Variant::Default,
    )?;
    let load = || -> Result<UNet2DConditionModel> {
        let vb = weights::var_builder(&files, DType::F32, &Device::Cpu)?;
        Ok(UNet2DConditionModel::load(vb, &config)?)
    };
    let context_dim = match &config.cross_attention_dim {
        PerBlock::Same(dim) => *dim,
        PerBlock::Each(dims) => dims[0],
    };
    let sample = Tensor::randn(0f32, 1.0, (3, config.in_channels, 32, 32), &Device::Cpu)?;
    let context = Tensor::randn(0f32, 1.0, (3, 77, context_dim), &Device::Cpu)?;
    let t = Tensor::new(&[500f32], &Device::Cpu)?;
    let f32_unet = load()?;
    let bf16_unet = nn::with_bf16_products(load)?;
    let reference = f32_unet.forward(&sample, &t, &context)?;
    let candidate = bf16_unet.forward(&sample, &t, &context)?;
    println!(
        "bf16 vs f32 output distance: {:.3}%",
        100.0 * relative_distance(&candidate, &reference)?
    );
    let (mut f32_times, mut bf16_times) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        f32_times.push(timed(|| Ok(f32_unet.forward(&sample, &t, &context)?))?.0);
        bf16_times.push(timed(|| Ok(bf16_unet.forward(&sample, &t, &context)?))?.0);
    }
    let (a, b) = (median(f32_times), median(bf16_times));
    println!(
        "UNet forward, batch 3, 32×32: f32 {a:.3} s, bf16 {b:.3} s ({:.2}×)",
        a / b
    );
    Ok(())
}
