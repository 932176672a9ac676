//! `--dtype auto` on the CPU: when to run bf16 products instead of float32.
//!
//! bf16 is chosen only where all of these hold: the CPU has avx512_bf16 (and
//! `INSTRUCT_PIX2PIX_CPU_BF16` is not `0`); the UNet is large ([`MIN_UNET_PARAMETERS`], 200 MB
//! in float32: below that the edit is quick anyway and float32 costs nothing); and a short
//! probe, one UNet forward pass on an 8×8 latent in each precision, gives in bf16 a result
//! within [`PROBE_MAX_DISTANCE`] of float32's, in less time. The time matters: on a CPU whose
//! float32 FMAs issue twice per cycle and `vdpbf16ps` once (Intel's Sapphire Rapids without its
//! AMX tiles), bf16 products are not faster than float32 ones (docs/benchmarks.md). Everything
//! else runs in float32.

use candle_core::{DType, Device, Result, Tensor};

use super::loaded::LoadError;
use super::nn;
use super::unet::{PerBlock, UNet2DConditionModel};

/// The smallest UNet, in parameters, for which `auto` considers bf16: 200 MB of float32.
pub const MIN_UNET_PARAMETERS: usize = 50_000_000;

/// The largest relative distance ‖bf16 − f32‖ / ‖f32‖ of the probe's UNet output for which
/// `auto` keeps bf16: torch's own bf16 UNet is 1.3–1.8% from its float32 on this probe (the
/// fixtures and the full-size shapes; ours 0.9%), see docs/benchmarks.md.
pub const PROBE_MAX_DISTANCE: f64 = 0.02;

/// The precision `auto` chose and why.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuPrecision {
    /// `DType::BF16` for bf16 products (float32 activations), else the load's dtype.
    pub dtype: DType,
    /// One line for the user: what was chosen and why.
    pub reason: String,
}

impl CpuPrecision {
    /// The load's own dtype, nothing to choose.
    pub fn unchanged(dtype: DType) -> Self {
        Self {
            dtype,
            reason: format!("{dtype:?} as asked").to_lowercase(),
        }
    }

    fn float32(reason: String) -> Self {
        Self {
            dtype: DType::F32,
            reason,
        }
    }
}

/// The choice for a UNet of `parameters` parameters; `probe(bf16)` runs the probe's UNet in
/// float32 (`false`) or with bf16 products (`true`) and returns its output and the seconds its
/// forward pass took ([`probe_output`]).
pub fn choose(
    parameters: usize,
    mut probe: impl FnMut(bool) -> std::result::Result<(Tensor, f64), LoadError>,
) -> std::result::Result<CpuPrecision, LoadError> {
    if !nn::cpu_has_bf16_instructions() {
        return Ok(CpuPrecision::float32(
            "f32: this CPU has no avx512_bf16".into(),
        ));
    }
    if !nn::cpu_bf16_allowed() {
        return Ok(CpuPrecision::float32(format!(
            "f32: {}=0",
            nn::CPU_BF16_VAR
        )));
    }
    if parameters < MIN_UNET_PARAMETERS {
        return Ok(CpuPrecision::float32(format!(
            "f32: the UNet is small ({} M parameters)",
            parameters / 1_000_000
        )));
    }
    let (reference, f32_seconds) = probe(false)?;
    let (candidate, bf16_seconds) = probe(true)?;
    let distance =
        relative_distance(&candidate, &reference).map_err(|source| LoadError::Build {
            folder: std::path::PathBuf::from("probe"),
            component: "UNet",
            source,
        })?;
    let percent = 100.0 * distance;
    let times = format!("{bf16_seconds:.3} s against f32's {f32_seconds:.3} s");
    Ok(if distance > PROBE_MAX_DISTANCE {
        CpuPrecision::float32(format!(
            "f32: the bf16 probe is {percent:.2}% from f32 (more than {:.1}%)",
            100.0 * PROBE_MAX_DISTANCE
        ))
    } else if bf16_seconds >= f32_seconds {
        CpuPrecision::float32(format!("f32: the bf16 probe is not faster ({times})"))
    } else {
        CpuPrecision {
            dtype: DType::BF16,
            reason: format!("bf16: the probe is within {percent:.2}% of f32, in {times}"),
        }
    })
}

/// ‖a − b‖ / ‖b‖ (Euclidean norms over every element).
pub fn relative_distance(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let difference = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm > 0.0 {
        difference / norm
    } else {
        difference
    })
}

/// The probe: `unet`'s output for one 8×8 latent at timestep 500 with a fixed context
/// (deterministic values of unit size), on the CPU, and the seconds of its second forward pass
/// (the first one warms the caches and the thread pool).
pub fn probe_output(unet: &UNet2DConditionModel) -> Result<(Tensor, f64)> {
    let config = unet.config();
    let context_dim = match &config.cross_attention_dim {
        PerBlock::Same(dim) => *dim,
        PerBlock::Each(dims) => dims.first().copied().unwrap_or(768),
    };
    let waves = |count: usize, phase: f32| -> Vec<f32> {
        (0..count)
            .map(|i| (i as f32 * 0.7311 + phase).sin() * 1.3)
            .collect()
    };
    let channels = config.in_channels;
    let sample = Tensor::from_vec(waves(channels * 64, 0.1), (1, channels, 8, 8), &Device::Cpu)?;
    let context = Tensor::from_vec(
        waves(77 * context_dim, 1.7),
        (1, 77, context_dim),
        &Device::Cpu,
    )?;
    let timestep = Tensor::new(&[500f32], &Device::Cpu)?;
    unet.forward(&sample, &timestep, &context)?;
    let start = std::time::Instant::now();
    let output = unet.forward(&sample, &timestep, &context)?;
    Ok((output, start.elapsed().as_secs_f64()))
}
