//! Where and in which precision the models run: parsing the user's device (`auto`, `cpu`,
//! `cuda:1`, `metal`) and dtype (`f32`, `f16`, `bf16`) choices, opening the candle [`Device`] with
//! a clear error when this build lacks the backend, and judging a dtype on a device.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// Why a device or dtype choice cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The text is not a device name.
    #[error("unknown device {text:?}: use auto, cpu, cuda, cuda:N, metal or metal:N")]
    UnknownDevice {
        /// What was given.
        text: String,
    },
    /// The text is not a dtype name.
    #[error("unknown dtype {text:?}: use auto, f32, f16 or bf16")]
    UnknownDType {
        /// What was given.
        text: String,
    },
    /// The dtype cannot run on the device at all.
    #[error("{dtype} is not supported on {device}: {reason}")]
    UnsupportedDType {
        /// The dtype asked for.
        dtype: &'static str,
        /// The device, as the user would write it.
        device: &'static str,
        /// What to do instead.
        reason: &'static str,
    },
    /// The binary was built without the backend asked for.
    #[error("this build has no {backend} support: rebuild with --features {feature}")]
    NotBuilt {
        /// "CUDA" or "Metal".
        backend: &'static str,
        /// The Cargo feature that enables it.
        feature: &'static str,
    },
    /// The backend is built in but the device could not be opened.
    #[error("cannot open {device}: {source}")]
    Open {
        /// The device asked for, as the user would write it.
        device: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// The device the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The first GPU this build supports and finds, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
    /// The Metal GPU with this ordinal.
    Metal(usize),
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    /// Accepts `auto`, `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N` (any case).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let unknown = || DeviceError::UnknownDevice {
            text: text.to_string(),
        };
        let lower = text.trim().to_ascii_lowercase();
        let (name, ordinal) = match lower.split_once(':') {
            Some((name, n)) => (name, Some(n.parse::<usize>().map_err(|_| unknown())?)),
            None => (lower.as_str(), None),
        };
        match (name, ordinal) {
            ("auto", None) => Ok(DeviceChoice::Auto),
            ("cpu", None) => Ok(DeviceChoice::Cpu),
            ("cuda" | "gpu", n) => Ok(DeviceChoice::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(DeviceChoice::Metal(n.unwrap_or(0))),
            _ => Err(unknown()),
        }
    }
}

/// Whether an error's message says the device ran out of memory (CUDA's
/// `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS's allocation failure, Metal's or the allocator's
/// "out of memory"): candle wraps the drivers' errors in several ways, so the text is read.
pub fn is_out_of_memory(message: &str) -> bool {
    let text = message.to_ascii_lowercase();
    [
        "out_of_memory",
        "out of memory",
        "cublas_status_alloc_failed",
        "failed to allocate",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// Memory in use on a device, for display: the process's resident memory on the CPU (of the
/// machine's total), the device's memory in use on a GPU (all processes', as the driver counts
/// it, of its total).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub used: u64,
    pub total: Option<u64>,
}

impl DeviceMemory {
    /// "3.1 of 80.0 GB" (or "3.1 GB").
    pub fn describe(&self) -> String {
        let gb = |bytes: u64| bytes as f64 / 1e9;
        match self.total {
            Some(total) => format!("{:.1} of {:.1} GB", gb(self.used), gb(total)),
            None => format!("{:.1} GB", gb(self.used)),
        }
    }
}

/// What [`DeviceMemory`] says for `device` now (None where the platform does not say).
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    match device {
        Device::Cpu => Some(DeviceMemory {
            used: resident_bytes()?,
            total: machine_memory_bytes(),
        }),
        _ => gpu_memory(device),
    }
}

/// This process's resident memory (Linux; None elsewhere).
pub fn resident_bytes() -> Option<u64> {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(pages * page_size())
}

fn machine_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(target_os = "linux")]
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

#[cfg(not(target_os = "linux"))]
fn page_size() -> u64 {
    4096
}

#[cfg(feature = "cuda")]
fn gpu_memory(device: &Device) -> Option<DeviceMemory> {
    use candle_core::cuda_backend::cudarc;
    let Device::Cuda(cuda) = device else {
        return None;
    };
    cuda.cuda_stream().context().bind_to_thread().ok()?;
    let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
    Some(DeviceMemory {
        used: (total - free) as u64,
        total: Some(total as u64),
    })
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory(_device: &Device) -> Option<DeviceMemory> {
    None
}

/// The CUDA GPUs this machine has (0 without a driver, or in a build without CUDA).
#[cfg(feature = "cuda")]
pub fn cuda_device_count() -> usize {
    use candle_core::cuda_backend::cudarc;
    if cudarc::driver::result::init().is_err() {
        return 0;
    }
    cudarc::driver::result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

/// The CUDA GPUs this machine has (0 without a driver, or in a build without CUDA).
#[cfg(not(feature = "cuda"))]
pub fn cuda_device_count() -> usize {
    0
}

/// A device as the command line names it: `cpu`, `cuda:0`, `metal:0`.
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Opens the chosen device. `Auto` tries CUDA then Metal (when built in) and falls back to the
/// CPU when no GPU opens; an explicit GPU choice fails with a clear error instead.
pub fn select_device(choice: DeviceChoice) -> Result<Device, DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(ordinal) => open_cuda(ordinal),
        DeviceChoice::Metal(ordinal) => open_metal(ordinal),
        DeviceChoice::Auto => Ok(open_cuda(0)
            .or_else(|_| open_metal(0))
            .unwrap_or(Device::Cpu)),
    }
}

fn open_cuda(ordinal: usize) -> Result<Device, DeviceError> {
    open_gpu(
        DeviceChoice::Cuda(ordinal),
        cfg!(feature = "cuda"),
        ("CUDA", "cuda"),
        || Device::new_cuda(ordinal),
    )
}

fn open_metal(ordinal: usize) -> Result<Device, DeviceError> {
    open_gpu(
        DeviceChoice::Metal(ordinal),
        cfg!(feature = "metal"),
        ("Metal", "metal"),
        || Device::new_metal(ordinal),
    )
}

/// Opens `choice` with `open` when its backend is `built` in, else says which Cargo feature
/// would add it (`backend` names it in the message).
fn open_gpu(
    choice: DeviceChoice,
    built: bool,
    (backend, feature): (&'static str, &'static str),
    open: impl FnOnce() -> candle_core::Result<Device>,
) -> Result<Device, DeviceError> {
    if !built {
        return Err(DeviceError::NotBuilt { backend, feature });
    }
    open().map_err(|source| DeviceError::Open {
        device: choice.to_string(),
        source,
    })
}

/// The floating-point precision the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// float32, except on a CPU with avx512_bf16 for a large model whose bf16 probe stays close
    /// to float32 (see `model::cpu_precision`), where it is bf16.
    #[default]
    Auto,
    /// float32: what diffusers uses by default; the reference for exact results.
    F32,
    /// float16: half the memory; for GPUs.
    F16,
    /// bfloat16: half the memory, float32's range; fast on GPUs and on CPUs with bf16
    /// instructions.
    Bf16,
}

impl DTypeChoice {
    /// The candle dtype asked for (float32 for `auto`, whose bf16 is decided at load).
    pub fn dtype(self) -> DType {
        match self {
            DTypeChoice::Auto | DTypeChoice::F32 => DType::F32,
            DTypeChoice::F16 => DType::F16,
            DTypeChoice::Bf16 => DType::BF16,
        }
    }

    /// The dtype to load with on `device`: [`Self::dtype`], except bf16 on a CPU whose bf16
    /// kernels do not run (no avx512_bf16, or `INSTRUCT_PIX2PIX_CPU_BF16=0`): float32.
    pub fn load_dtype(self, device: &Device) -> DType {
        match (self, device) {
            (DTypeChoice::Bf16, Device::Cpu) if !crate::model::nn::cpu_bf16_enabled() => DType::F32,
            _ => self.dtype(),
        }
    }

    /// Whether `auto` may still pick bf16 at load: `auto` on the CPU.
    pub fn chooses_at_load(self, device: &Device) -> bool {
        self == DTypeChoice::Auto && device.is_cpu()
    }

    /// Whether this dtype suits `device`: `Ok(None)` when it does, `Ok(Some(notice))` when it
    /// works but differently or badly. bf16 on a CPU without avx512_bf16 runs in float32 (one
    /// line says so); float16 on the CPU runs its matrix products through a slow path (several
    /// times slower than float32), so it is allowed with a warning: the results are still
    /// right. Nothing is refused today; the error is for dtypes a device cannot run at all.
    pub fn check_on(self, device: &Device) -> Result<Option<String>, DeviceError> {
        Ok(match (self, device) {
            (DTypeChoice::Bf16, Device::Cpu) if !crate::model::nn::cpu_bf16_enabled() => {
                Some(if crate::model::nn::cpu_has_bf16_instructions() {
                    format!(
                        "{}=0: running in float32 instead of bf16",
                        crate::model::nn::CPU_BF16_VAR
                    )
                } else {
                    "this CPU has no avx512_bf16 instructions: running in float32 instead of bf16"
                        .to_string()
                })
            }
            (DTypeChoice::F16, Device::Cpu) => Some(
                "float16 on the CPU is several times slower than float32; \
                 use bf16 (or f32) for speed"
                    .to_string(),
            ),
            _ => None,
        })
    }

    /// A sensible default for a device: float16 on GPUs, `auto` on the CPU.
    pub fn default_for(device: &Device) -> Self {
        match device {
            Device::Cpu => DTypeChoice::Auto,
            _ => DTypeChoice::F16,
        }
    }
}

impl fmt::Display for DTypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DTypeChoice::Auto => "auto",
            DTypeChoice::F32 => "f32",
            DTypeChoice::F16 => "f16",
            DTypeChoice::Bf16 => "bf16",
        })
    }
}

impl FromStr for DTypeChoice {
    type Err = DeviceError;

    /// Accepts `auto`, `f32`/`fp32`/`float32`, `f16`/`fp16`/`float16`/`half`,
    /// `bf16`/`bfloat16`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DTypeChoice::Auto),
            "f32" | "fp32" | "float32" | "float" => Ok(DTypeChoice::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(DTypeChoice::F16),
            "bf16" | "bfloat16" => Ok(DTypeChoice::Bf16),
            _ => Err(DeviceError::UnknownDType {
                text: text.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        let cases = [
            ("auto", DeviceChoice::Auto),
            ("CPU", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:1", DeviceChoice::Cuda(1)),
            ("metal", DeviceChoice::Metal(0)),
            ("metal:2", DeviceChoice::Metal(2)),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<DeviceChoice>().ok(), Some(expected), "{text}");
        }
        for bad in ["", "tpu", "cuda:x", "cpu:1", "cuda:-1"] {
            let err = bad.parse::<DeviceChoice>().expect_err(bad);
            assert!(err.to_string().contains("unknown device"), "{err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for choice in [
            DeviceChoice::Auto,
            DeviceChoice::Cpu,
            DeviceChoice::Cuda(3),
            DeviceChoice::Metal(1),
        ] {
            assert_eq!(
                choice.to_string().parse::<DeviceChoice>().ok(),
                Some(choice)
            );
        }
        for choice in [
            DTypeChoice::Auto,
            DTypeChoice::F32,
            DTypeChoice::F16,
            DTypeChoice::Bf16,
        ] {
            assert_eq!(choice.to_string().parse::<DTypeChoice>().ok(), Some(choice));
        }
    }

    #[test]
    fn cpu_and_auto_open() {
        assert!(matches!(select_device(DeviceChoice::Cpu), Ok(Device::Cpu)));
        // Without a GPU backend built in (or a GPU present), auto is the CPU.
        if !cfg!(feature = "cuda") && !cfg!(feature = "metal") {
            assert!(matches!(select_device(DeviceChoice::Auto), Ok(Device::Cpu)));
        }
    }

    #[test]
    fn missing_backend_says_how_to_rebuild() {
        if !cfg!(feature = "cuda") {
            let err = select_device(DeviceChoice::Cuda(0)).expect_err("no cuda in this build");
            assert_eq!(
                err.to_string(),
                "this build has no CUDA support: rebuild with --features cuda"
            );
        }
        if !cfg!(feature = "metal") {
            let err = select_device(DeviceChoice::Metal(0)).expect_err("no metal in this build");
            assert_eq!(
                err.to_string(),
                "this build has no Metal support: rebuild with --features metal"
            );
        }
    }

    #[test]
    fn dtypes_parse_and_cpu_f16_warns() {
        assert_eq!(
            "bfloat16".parse::<DTypeChoice>().ok(),
            Some(DTypeChoice::Bf16)
        );
        assert_eq!("FP16".parse::<DTypeChoice>().ok(), Some(DTypeChoice::F16));
        assert_eq!(DTypeChoice::Bf16.dtype(), DType::BF16);
        assert!("f8".parse::<DTypeChoice>().is_err());
        let warning = DTypeChoice::F16.check_on(&Device::Cpu).expect("allowed");
        assert!(warning.is_some_and(|w| w.contains("slower")));
        assert_eq!(
            DTypeChoice::F32.check_on(&Device::Cpu).expect("allowed"),
            None
        );
        assert_eq!(DTypeChoice::default_for(&Device::Cpu), DTypeChoice::Auto);
        assert_eq!(DTypeChoice::default(), DTypeChoice::Auto);
        assert_eq!(DTypeChoice::Auto.dtype(), DType::F32);
    }

    #[test]
    fn bf16_on_the_cpu_runs_or_falls_back_with_one_line() {
        let notice = DTypeChoice::Bf16
            .check_on(&Device::Cpu)
            .expect("never refused");
        let dtype = DTypeChoice::Bf16.load_dtype(&Device::Cpu);
        if crate::model::nn::cpu_bf16_enabled() {
            assert_eq!(notice, None);
            assert_eq!(dtype, DType::BF16);
        } else {
            let notice = notice.expect("a notice where bf16 cannot run");
            assert!(notice.contains("float32"), "{notice}");
            assert_eq!(notice.lines().count(), 1);
            assert_eq!(dtype, DType::F32);
        }
        assert!(DTypeChoice::Auto.chooses_at_load(&Device::Cpu));
        assert!(!DTypeChoice::F32.chooses_at_load(&Device::Cpu));
    }
}
