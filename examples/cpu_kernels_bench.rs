//! A/B timings of the fused CPU kernels (`model::nn`) against candle's ops, interleaved in one
//! process so that load from other programs on the machine hits both sides alike.
//!
//! ```text
//! cargo run --release --locked --example cpu_kernels_bench -- ops [REPS]
//! cargo run --release --locked --example cpu_kernels_bench -- direct [REPS]
//! cargo run --release --locked --example cpu_kernels_bench -- winograd [REPS]
//! cargo run --release --locked --example cpu_kernels_bench -- attention [REPS] [NAME_PART]
//! cargo run --release --locked --example cpu_kernels_bench -- unet MODEL_DIR [REPS] [fast|candle|isa]
//! ```
//!
//! `attention` times the fused attention at the 256² and 512² edits' shapes (GFLOP/s of the two
//! products) and checks it once against the composed ops. `ops` times single convolutions and group norms at Stable Diffusion 1.5 shapes and checks
//! that both sides agree; `unet` times one forward of the UNet in MODEL_DIR/unet (a diffusers
//! folder) on a batch of 3 latents of 8×32×32 (a 256×256 edit), timestep 500, a 3×77×768
//! context. With `fast` or `candle` it runs only that side (for a profiler); with `isa` it
//! compares the fused kernels on this CPU's best instructions with the same on portable code.
//! `direct` times the fused convolutions of `ops` with the direct kernel against the same with
//! it off (im2col and gemm), interleaved; `winograd` the 3×3 convolutions of stride 1 with
//! Winograd's algorithm against the same with it off (the direct kernel or im2col), interleaved,
//! also with a gradient flowing back to the input (training's forward and input gradient).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor};
use instruct_pix2pix::model::nn::{self, Conv2d, GroupNorm};
use instruct_pix2pix::model::unet::{PerBlock, UNet2DConditionModel, UNetConfig};
use instruct_pix2pix::model::weights;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ops") => {
            let reps = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(5);
            bench_ops(reps)
        }
        Some("direct") => {
            let reps = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(5);
            bench_direct(reps)
        }
        Some("winograd") => {
            let reps = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(5);
            bench_winograd(reps)
        }
        Some("attention") => {
            let reps = args.get(1).map(|r| r.parse()).transpose()?.unwrap_or(3);
            bench_attention(reps, args.get(2).map(String::as_str))
        }
        Some("unet") => {
            let dir = args.get(1).context("unet needs MODEL_DIR")?;
            let reps = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3);
            bench_unet(Path::new(dir), reps, args.get(3).map(String::as_str))
        }
        _ => bail!(
            "usage: cpu_kernels_bench ops [REPS] | direct [REPS] | winograd [REPS] | attention [REPS] [NAME_PART] | unet MODEL_DIR [REPS] [fast|candle|isa]"
        ),
    }
}

/// Seconds `f` takes.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let start = Instant::now();
    let value = f()?;
    Ok((start.elapsed().as_secs_f64(), value))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// max |a − b| / max |b|.
fn relative_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(diff / scale.max(f32::MIN_POSITIVE))
}

/// Interleaved A/B timing: runs `reference` then `candidate` `reps` times and returns their
/// median seconds and the largest relative difference of the candidate's output.
fn compare(
    reps: usize,
    reference: impl Fn() -> Result<Tensor>,
    candidate: impl Fn() -> Result<Tensor>,
) -> Result<(f64, f64, f32)> {
    let (mut reference_times, mut candidate_times) = (vec![], vec![]);
    let mut diff = 0f32;
    for _ in 0..reps {
        let (t_reference, y_reference) = timed(&reference)?;
        let (t_candidate, y_candidate) = timed(&candidate)?;
        reference_times.push(t_reference);
        candidate_times.push(t_candidate);
        diff = diff.max(relative_diff(&y_candidate, &y_reference)?);
    }
    Ok((median(reference_times), median(candidate_times), diff))
}

struct ConvCase {
    name: &'static str,
    input: (usize, usize, usize, usize),
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

/// Stable Diffusion 1.5's convolutions at a 256² edit's sizes (the VAE's at 512² too).
fn conv_cases() -> Vec<ConvCase> {
    vec![
        ConvCase {
            name: "unet 320→320 3×3 @32²",
            input: (3, 320, 32, 32),
            out_channels: 320,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "unet 640→640 3×3 @16²",
            input: (3, 640, 16, 16),
            out_channels: 640,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "unet 1280→1280 3×3 @8²",
            input: (3, 1280, 8, 8),
            out_channels: 1280,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "unet 1280→1280 3×3 @4²",
            input: (3, 1280, 4, 4),
            out_channels: 1280,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "unet 640 down s2 @16²",
            input: (3, 640, 16, 16),
            out_channels: 640,
            kernel: 3,
            stride: 2,
            padding: 1,
        },
        ConvCase {
            name: "unet 960→640 1×1 @16²",
            input: (3, 960, 16, 16),
            out_channels: 640,
            kernel: 1,
            stride: 1,
            padding: 0,
        },
        ConvCase {
            name: "unet 8→320 conv_in @32²",
            input: (3, 8, 32, 32),
            out_channels: 320,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "vae 128→128 3×3 @256²",
            input: (1, 128, 256, 256),
            out_channels: 128,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "vae 128→128 3×3 @512²",
            input: (1, 128, 512, 512),
            out_channels: 128,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "vae 256→256 3×3 @256²",
            input: (1, 256, 256, 256),
            out_channels: 256,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "vae 512→512 3×3 @64²",
            input: (1, 512, 64, 64),
            out_channels: 512,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
        ConvCase {
            name: "vae 512→512 3×3 @32²",
            input: (1, 512, 32, 32),
            out_channels: 512,
            kernel: 3,
            stride: 1,
            padding: 1,
        },
    ]
}

/// A case's input and its `Conv2d` (random weights scaled to unit variance, small bias), with
/// the convolution's FLOPs.
fn conv_case(case: &ConvCase, device: &Device) -> Result<(Tensor, Conv2d, f64)> {
    let (b, c, h, w) = case.input;
    let x = Tensor::randn(0f32, 1.0, case.input, device)?;
    let weight = (Tensor::randn(
        0f32,
        1.0,
        (case.out_channels, c, case.kernel, case.kernel),
        device,
    )? / ((c * case.kernel * case.kernel) as f64).sqrt())?;
    let bias = Tensor::randn(0f32, 0.1, case.out_channels, device)?;
    let cfg = candle_nn::Conv2dConfig {
        padding: case.padding,
        stride: case.stride,
        ..Default::default()
    };
    let conv = Conv2d::new(weight, Some(bias), cfg);
    let out_h = (h + 2 * case.padding - case.kernel) / case.stride + 1;
    let out_w = (w + 2 * case.padding - case.kernel) / case.stride + 1;
    let flop = 2.0 * (b * case.out_channels * out_h * out_w * c * case.kernel * case.kernel) as f64;
    Ok((x, conv, flop))
}

/// The direct kernel against im2col + gemm, on this CPU's best instructions.
fn bench_direct(reps: usize) -> Result<()> {
    let device = Device::Cpu;
    let best = ip2p_kernels::isa();
    println!("direct kernel on {best:?}");
    println!(
        "{:<28} {:>10} {:>10} {:>9} {:>9} {:>8} {:>9}",
        "conv", "im2col ms", "direct ms", "im2col GF", "direct GF", "speedup", "rel diff"
    );
    for case in conv_cases() {
        if case.stride != 1 || case.kernel == 1 {
            continue;
        }
        let (x, conv, flop) = conv_case(&case, &device)?;
        let (ti, td, diff) = compare(
            reps,
            || {
                ip2p_kernels::cap_isa(ip2p_kernels::Isa::Portable);
                let y = conv.forward(&x);
                // No cap: the best this CPU has.
                ip2p_kernels::cap_isa(ip2p_kernels::Isa::Avx512);
                Ok(y?)
            },
            || Ok(conv.forward(&x)?),
        )?;
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>9.1} {:>9.1} {:>7.2}× {:>9.1e}",
            case.name,
            ti * 1e3,
            td * 1e3,
            flop / ti / 1e9,
            flop / td / 1e9,
            ti / td,
            diff
        );
    }
    Ok(())
}

fn bench_winograd(reps: usize) -> Result<()> {
    let device = Device::Cpu;
    println!(
        "Winograd F(2×2, 3×3) against the direct kernel or im2col, on {:?}",
        ip2p_kernels::isa()
    );
    println!(
        "{:<28} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9}",
        "conv", "off ms", "on ms", "speedup", "off+dx ms", "on+dx ms", "speedup", "rel diff"
    );
    for case in conv_cases() {
        if (case.kernel, case.stride, case.padding) != (3, 1, 1) {
            continue;
        }
        let (x, conv, _) = conv_case(&case, &device)?;
        let with = |enabled: bool, f: &dyn Fn() -> Result<Tensor>| -> Result<Tensor> {
            nn::set_winograd_conv(enabled);
            let y = f();
            nn::set_winograd_conv(true);
            y
        };
        let forward = || Ok(conv.forward(&x)?);
        let (t_off, t_on, diff) = compare(reps, || with(false, &forward), || with(true, &forward))?;
        // Forward and the input's gradient (a frozen layer in LoRA training).
        let tracked = candle_core::Var::from_tensor(&x)?;
        let input_gradient = || -> Result<Tensor> {
            let y = conv.forward(tracked.as_tensor())?;
            let grads = y.sum_all()?.backward()?;
            Ok(grads
                .get(tracked.as_tensor())
                .context("no input gradient")?
                .clone())
        };
        let (g_off, g_on, g_diff) = compare(
            reps,
            || with(false, &input_gradient),
            || with(true, &input_gradient),
        )?;
        println!(
            "{:<28} {:>9.2} {:>9.2} {:>7.2}× {:>9.2} {:>9.2} {:>7.2}× {:>9.1e}",
            case.name,
            t_off * 1e3,
            t_on * 1e3,
            t_off / t_on,
            g_off * 1e3,
            g_on * 1e3,
            g_off / g_on,
            diff.max(g_diff)
        );
    }
    Ok(())
}

fn bench_ops(reps: usize) -> Result<()> {
    let cases = conv_cases();
    let device = Device::Cpu;
    // The GEMM ceiling right now (the machine is shared): candle's matmul, 2048³.
    let a = Tensor::randn(0f32, 1.0, (2048, 2048), &device)?;
    let gemm_times = (0..reps)
        .map(|_| Ok(timed(|| Ok(a.matmul(&a)?))?.0))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "GEMM 2048³: {:.1} GFLOP/s",
        2.0 * 2048f64.powi(3) / median(gemm_times) / 1e9
    );
    println!(
        "{:<28} {:>10} {:>10} {:>9} {:>9} {:>8} {:>9}",
        "conv", "candle ms", "fused ms", "candle GF", "fused GF", "speedup", "rel diff"
    );
    for case in &cases {
        let (x, conv, flop) = conv_case(case, &device)?;
        let (tc, tf, diff) = compare(
            reps,
            || Ok(conv.forward_candle(&x)?),
            || Ok(conv.forward(&x)?),
        )?;
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>9.1} {:>9.1} {:>7.2}× {:>9.1e}",
            case.name,
            tc * 1e3,
            tf * 1e3,
            flop / tc / 1e9,
            flop / tf / 1e9,
            tc / tf,
            diff
        );
    }

    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>8} {:>9}",
        "group norm (32 groups)", "candle ms", "fused ms", "speedup", "rel diff"
    );
    for (name, shape) in [
        ("unet 320 @32²", (3usize, 320usize, 32usize, 32usize)),
        ("unet 1280 @8²", (3, 1280, 8, 8)),
        ("vae 128 @256²", (1, 128, 256, 256)),
    ] {
        let channels = shape.1;
        let x = (Tensor::randn(0f32, 1.0, shape, &device)? + 0.5)?;
        let norm = GroupNorm::new(
            Tensor::randn(1f32, 0.1, channels, &device)?,
            Tensor::randn(0f32, 0.1, channels, &device)?,
            32,
            1e-5,
        )?;
        let (tc, tf, diff) = compare(
            reps,
            || Ok(norm.forward_composed(&x)?),
            || Ok(norm.forward(&x)?),
        )?;
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>7.2}× {:>9.1e}",
            name,
            tc * 1e3,
            tf * 1e3,
            tc / tf,
            diff
        );
    }

    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>8} {:>9}",
        "group norm + SiLU", "apart ms", "fused ms", "speedup", "rel diff"
    );
    for (name, shape) in [
        ("unet 320 @64²", (3usize, 320usize, 64usize, 64usize)),
        ("vae 256 @256²", (1, 256, 256, 256)),
        ("vae 128 @512²", (1, 128, 512, 512)),
    ] {
        let channels = shape.1;
        let x = (Tensor::randn(0f32, 1.0, shape, &device)? + 0.5)?;
        let norm = GroupNorm::new(
            Tensor::randn(1f32, 0.1, channels, &device)?,
            Tensor::randn(0f32, 0.1, channels, &device)?,
            32,
            1e-6,
        )?;
        // The fused group norm followed by candle's SiLU, against the single fused pass.
        let (ta, tf, diff) = compare(
            reps,
            || Ok(norm.forward(&x)?.silu()?),
            || Ok(norm.forward_silu(&x)?),
        )?;
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>7.2}× {:>9.1e}",
            name,
            ta * 1e3,
            tf * 1e3,
            ta / tf,
            diff
        );
    }

    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>8} {:>9}",
        "attention", "candle ms", "fused ms", "speedup", "rel diff"
    );
    for (name, batch, q_len, kv_len, inner, heads) in [
        (
            "unet self 8×40 @32²",
            3usize,
            1024usize,
            1024usize,
            320usize,
            8usize,
        ),
        ("unet cross 8×40 @32²", 3, 1024, 77, 320, 8),
        ("unet self 8×160 @8²", 3, 64, 64, 1280, 8),
        ("vae mid 1×512 @32²", 1, 1024, 1024, 512, 1),
    ] {
        let q = Tensor::randn(0f32, 1.0, (batch, q_len, inner), &device)?;
        let k = Tensor::randn(0f32, 1.0, (batch, kv_len, inner), &device)?;
        let v = Tensor::randn(0f32, 1.0, (batch, kv_len, inner), &device)?;
        let (tc, tf, diff) = compare(
            reps,
            || Ok(nn::attention_composed(&q, &k, &v, heads)?),
            || Ok(nn::attention(&q, &k, &v, heads)?),
        )?;
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>7.2}× {:>9.1e}",
            name,
            tc * 1e3,
            tf * 1e3,
            tc / tf,
            diff
        );
    }
    Ok(())
}

fn bench_unet(model_dir: &Path, reps: usize, only: Option<&str>) -> Result<()> {
    let unet_dir = model_dir.join("unet");
    let config = UNetConfig::from_file(&unet_dir.join("config.json"))?;
    let files = [unet_dir.join("diffusion_pytorch_model.safetensors")];
    let device = Device::Cpu;
    let vb = weights::var_builder(&files, DType::F32, &device)?;
    let (load_s, unet) = timed(|| Ok(UNet2DConditionModel::load(vb, &config)?))?;
    eprintln!("loaded the UNet in {load_s:.1} s");
    let sample = Tensor::randn(0f32, 1.0, (3, config.in_channels, 32, 32), &device)?;
    let timesteps = Tensor::new(&[500f32], &device)?;
    let context_dim = match &config.cross_attention_dim {
        PerBlock::Same(dim) => *dim,
        PerBlock::Each(dims) => *dims.first().context("no down blocks")?,
    };
    let context = Tensor::randn(0f32, 1.0, (3, 77, context_dim), &device)?;
    // A side: the fused kernels or candle's ops, and the cap on the kernels' instructions
    // (`Avx512` caps nothing: the best this CPU has).
    let best = ip2p_kernels::Isa::Avx512;
    let portable = ip2p_kernels::Isa::Portable;
    let sides: Vec<(bool, ip2p_kernels::Isa)> = match only {
        Some("fast") => vec![(true, best)],
        Some("candle") => vec![(false, best)],
        Some("isa") => vec![(true, portable), (true, best)],
        None => vec![(false, best), (true, best)],
        Some(other) => bail!("unknown side {other:?}: fast, candle or isa"),
    };
    let name = |(fast, isa): (bool, ip2p_kernels::Isa)| match (fast, isa) {
        (false, _) => "candle".to_string(),
        (true, ip2p_kernels::Isa::Portable) => "fused, portable".to_string(),
        (true, _) => format!("fused, {:?}", ip2p_kernels::isa()),
    };
    // Warm up (first-touch of the memory-mapped weights, allocator).
    nn::set_fast_cpu_kernels(true);
    unet.forward(&sample, &timesteps, &context)?;
    let mut times = vec![Vec::new(); sides.len()];
    let mut outputs: Vec<Option<Tensor>> = vec![None; sides.len()];
    for rep in 0..reps {
        for (side, &(fast, isa)) in sides.iter().enumerate() {
            nn::set_fast_cpu_kernels(fast);
            ip2p_kernels::cap_isa(isa);
            let (seconds, out) = timed(|| Ok(unet.forward(&sample, &timesteps, &context)?))?;
            eprintln!("rep {rep} {}: {seconds:.3} s", name((fast, isa)));
            times[side].push(seconds);
            outputs[side] = Some(out);
        }
    }
    ip2p_kernels::cap_isa(best);
    for (side, &which) in sides.iter().enumerate() {
        let t = median(times[side].clone());
        println!(
            "{}: median {t:.3} s per UNet forward (batch 3, 32×32 latents)",
            name(which)
        );
    }
    if let [Some(first), Some(second)] = &outputs[..] {
        println!(
            "relative max difference {} vs {}: {:.2e}",
            name(sides[1]),
            name(sides[0]),
            relative_diff(second, first)?
        );
    }
    Ok(())
}

/// The fused attention at the shapes of 256² and 512² edits; the composed ops (which build the
/// whole score tensor) run once per case, as the reference.
fn bench_attention(reps: usize, only: Option<&str>) -> Result<()> {
    let device = Device::Cpu;
    println!(
        "{:<28} {:>10} {:>9} {:>9}",
        "attention", "fused ms", "GFLOP/s", "rel diff"
    );
    for (name, batch, q_len, kv_len, inner, heads) in [
        (
            "unet self 8×40 @32²",
            3usize,
            1024usize,
            1024usize,
            320usize,
            8usize,
        ),
        ("unet self 8×40 @64²", 3, 4096, 4096, 320, 8),
        ("unet cross 8×40 @64²", 3, 4096, 77, 320, 8),
        ("unet self 8×80 @32²", 3, 1024, 1024, 640, 8),
        ("vae mid 1×512 @32²", 1, 1024, 1024, 512, 1),
        ("vae mid 1×512 @64²", 1, 4096, 4096, 512, 1),
    ] {
        if only.is_some_and(|only| !name.contains(only)) {
            continue;
        }
        let q = Tensor::randn(0f32, 1.0, (batch, q_len, inner), &device)?;
        let k = Tensor::randn(0f32, 1.0, (batch, kv_len, inner), &device)?;
        let v = Tensor::randn(0f32, 1.0, (batch, kv_len, inner), &device)?;
        let reference = nn::attention_composed(&q, &k, &v, heads)?;
        let mut times = vec![];
        let mut diff = 0f32;
        for _ in 0..reps {
            let (t, y) = timed(|| Ok(nn::attention(&q, &k, &v, heads)?))?;
            times.push(t);
            diff = diff.max(relative_diff(&y, &reference)?);
        }
        let t = median(times);
        let flop = 4.0 * (batch * q_len * kv_len * inner) as f64;
        println!(
            "{:<28} {:>10.2} {:>9.1} {:>9.1e}",
            name,
            t * 1e3,
            flop / t / 1e9,
            diff
        );
    }
    Ok(())
}
