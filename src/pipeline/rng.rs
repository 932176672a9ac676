//! torch's CPU random generator, bit for bit, so that `--seed 42` draws the same latents and
//! noise as diffusers with `generator=torch.Generator("cpu").manual_seed(42)`.
//!
//! What torch does (ATen: `MT19937RNGEngine.h`, `CPUGeneratorImpl`, `DistributionsHelper.h`,
//! `TransformationHelper.h`, `native/cpu/DistributionTemplates.h`), reproduced here:
//! - a 32-bit Mersenne Twister seeded with the low 32 bits of the seed;
//! - a float uniform in [0, 1) from the low 24 bits of one 32-bit draw; a double uniform from the
//!   low 53 bits of a 64-bit draw (first 32-bit draw high, second low);
//! - `randn` of 16 or more elements: all uniforms first, then Box-Muller in float on blocks of 16
//!   (element j and j+8 of a block are one pair); when the size is not a multiple of 16 the last
//!   16 elements are drawn afresh and transformed again;
//! - `randn` of fewer than 16 elements: one double Box-Muller pair per two values, the second value
//!   of a pair kept in the generator for the next scalar draw (even across calls).
//!
//! torch's float block kernel depends on the CPU: on x86 with AVX2 (AVX-512 machines included:
//! measured with torch 2.15, its AVX512 dispatch gives the AVX2 kernel's values) it uses the
//! polynomial `log256_ps`/`sincos256_ps` of `avx_mathfun.h`; without AVX2 (and on ARM) it uses
//! libm's `logf`/`sinf`/`cosf`. The two differ in the last bits of about half the values.
//! [`BoxMullerKernel`] names both; [`TorchGenerator::new`] picks the one torch picks on this CPU.

use candle_core::{DType, Device, Result, Tensor};

const STATE_N: usize = 624;
const STATE_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The Mersenne Twister MT19937 as ATen's `mt19937_engine` seeds and steps it.
#[derive(Debug, Clone)]
struct Mt19937 {
    state: [u32; STATE_N],
    /// Draws left before the next twist (torch's `left_`, starting at 1).
    left: usize,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; STATE_N];
        // torch keeps only the low 32 bits of the seed here.
        state[0] = (seed & 0xffff_ffff) as u32;
        for j in 1..STATE_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            left: 1,
            next: 0,
        }
    }

    fn twist(u: u32, v: u32) -> u32 {
        let mixed = (u & UPPER_MASK) | (v & LOWER_MASK);
        (mixed >> 1) ^ if v & 1 == 1 { MATRIX_A } else { 0 }
    }

    fn next_state(&mut self) {
        let s = &mut self.state;
        for i in 0..STATE_N - STATE_M {
            s[i] = s[i + STATE_M] ^ Self::twist(s[i], s[i + 1]);
        }
        for i in STATE_N - STATE_M..STATE_N - 1 {
            s[i] = s[i + STATE_M - STATE_N] ^ Self::twist(s[i], s[i + 1]);
        }
        s[STATE_N - 1] = s[STATE_M - 1] ^ Self::twist(s[STATE_N - 1], s[0]);
        self.left = STATE_N;
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.next_state();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }
}

/// Which of torch's float Box-Muller block kernels to reproduce (they differ in the last bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoxMullerKernel {
    /// libm's `logf`/`cosf`/`sinf`: torch on x86 without AVX2 (`ATEN_CPU_CAPABILITY=default`)
    /// and on ARM.
    Libm,
    /// `avx_mathfun.h`'s polynomials: torch on x86 with AVX2 and FMA, AVX-512 machines included.
    Avx2Polynomial,
}

impl BoxMullerKernel {
    /// The kernel torch uses on this CPU: the AVX2 one wherever x86 has AVX2 and FMA (torch's
    /// AVX2 and AVX512 capabilities), libm otherwise. A user's `ATEN_CPU_CAPABILITY` override is
    /// not consulted.
    pub fn native() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Self::Avx2Polynomial;
            }
        }
        Self::Libm
    }
}

/// torch's CPU generator (`torch.Generator("cpu").manual_seed(seed)`) and its `randn`.
#[derive(Debug, Clone)]
pub struct TorchGenerator {
    engine: Mt19937,
    /// The second value of the last scalar Box-Muller pair (torch's `next_double_normal_sample_`).
    cached_normal: Option<f64>,
    kernel: BoxMullerKernel,
}

impl TorchGenerator {
    /// A generator seeded as `torch.Generator("cpu").manual_seed(seed)`, with the Box-Muller
    /// kernel torch uses on this CPU ([`BoxMullerKernel::native`]).
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, BoxMullerKernel::native())
    }

    /// As [`TorchGenerator::new`], reproducing a chosen kernel (to match torch on another CPU).
    pub fn with_kernel(seed: u64, kernel: BoxMullerKernel) -> Self {
        Self {
            engine: Mt19937::new(seed),
            cached_normal: None,
            kernel,
        }
    }

    /// The kernel this generator reproduces.
    pub fn kernel(&self) -> BoxMullerKernel {
        self.kernel
    }

    /// Same values and same state advance as torch.randn(n, generator=g, dtype=float32) on CPU.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        if n >= 16 {
            self.normal_fill(n)
        } else {
            (0..n).map(|_| self.scalar_normal() as f32).collect()
        }
    }

    /// A tensor of `shape` (any rank) from randn_f32, on `device` with `dtype` (drawn in f32, then cast).
    pub fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let count = shape.iter().product();
        let values = self.randn_f32(count);
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    /// Float uniform in [0, 1): the low 24 bits of one draw, times 2⁻²⁴.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// Double uniform in [0, 1): the low 53 bits of a 64-bit draw, times 2⁻⁵³.
    fn uniform_f64(&mut self) -> f64 {
        let high = u64::from(self.engine.next_u32());
        let low = u64::from(self.engine.next_u32());
        (((high << 32) | low) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// torch's `normal_distribution<double>` with mean 0 and std 1.
    fn scalar_normal(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// torch's `normal_fill` for float tensors of 16 or more elements.
    fn normal_fill(&mut self, n: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            self.box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = n - 16;
            for value in &mut data[tail..] {
                *value = self.uniform_f32();
            }
            self.box_muller_16(&mut data[tail..]);
        }
        data
    }

    /// Box-Muller on one block: uniforms j and j+8 become normals j and j+8.
    fn box_muller_16(&self, block: &mut [f32]) {
        for j in 0..8 {
            let u1 = 1.0 - block[j]; // [0, 1) → (0, 1] for the log.
            let u2 = block[j + 8];
            let (radius, sin, cos) = match self.kernel {
                BoxMullerKernel::Libm => {
                    let radius = (-2.0 * u1.ln()).sqrt();
                    // torch multiplies in double (2.0f * pi<double> * u2), then stores a float.
                    let theta = (2.0 * std::f64::consts::PI * f64::from(u2)) as f32;
                    (radius, theta.sin(), theta.cos())
                }
                BoxMullerKernel::Avx2Polynomial => {
                    let radius = (-2.0 * avx_mathfun::log(u1)).sqrt();
                    let theta = avx_mathfun::TWO_PI * u2;
                    let (sin, cos) = avx_mathfun::sincos(theta);
                    (radius, sin, cos)
                }
            };
            // torch ends with fma(n, std, mean) = n·1 + 0, which turns -0 into +0.
            block[j] = radius * cos + 0.0;
            block[j + 8] = radius * sin + 0.0;
        }
    }
}

/// Scalar ports of `avx_mathfun.h`'s `log256_ps` and `sincos256_ps` (Cephes polynomials), lane
/// for lane, with the multiply-adds torch's compiler fused kept fused (found by matching torch's
/// output bit for bit: each other choice breaks some values).
// The constants keep the digits the C source writes; they round to f64 then f32 as C does.
#[allow(clippy::excessive_precision)]
mod avx_mathfun {
    /// C initialises these float tables from double literals: round through f64 as it does.
    const fn c(value: f64) -> f32 {
        value as f32
    }

    pub(super) const TWO_PI: f32 = c(2.0 * std::f64::consts::PI);
    const SQRTHF: f32 = c(std::f64::consts::FRAC_1_SQRT_2);
    const LOG_P: [f32; 9] = [
        c(7.037_683_629_2E-2),
        c(-1.151_461_031_0E-1),
        c(1.167_699_874_0E-1),
        c(-1.242_014_084_6E-1),
        c(1.424_932_278_7E-1),
        c(-1.666_805_766_5E-1),
        c(2.000_071_476_5E-1),
        c(-2.499_999_399_3E-1),
        c(3.333_333_117_4E-1),
    ];
    const LOG_Q1: f32 = c(-2.121_944_40e-4);
    const LOG_Q2: f32 = c(0.693_359_375);
    const MINUS_DP1: f32 = c(-0.785_156_25);
    const MINUS_DP2: f32 = c(-2.418_756_484_985_351_562_5e-4);
    const MINUS_DP3: f32 = c(-3.774_894_977_445_941_08e-8);
    const SINCOF: [f32; 3] = [
        c(-1.951_529_589_1E-4),
        c(8.332_160_873_6E-3),
        c(-1.666_665_461_1E-1),
    ];
    const COSCOF: [f32; 3] = [
        c(2.443_315_711_809_948E-5),
        c(-1.388_731_625_493_765E-3),
        c(4.166_664_568_298_827E-2),
    ];
    const FOPI: f32 = c(1.273_239_544_735_16);

    /// `log256_ps` for one lane (NaN for x ≤ 0).
    pub(super) fn log(x: f32) -> f32 {
        let invalid = x <= 0.0;
        let x = x.max(f32::MIN_POSITIVE);
        let bits = x.to_bits();
        let exponent = (bits >> 23) as i32 - 0x7f;
        let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
        let mut e = exponent as f32 + 1.0;
        let below = x < SQRTHF;
        let tmp = if below { x } else { 0.0 };
        x -= 1.0;
        e -= if below { 1.0 } else { 0.0 };
        x += tmp;
        let z = x * x;
        let mut y = LOG_P[0];
        for &p in &LOG_P[1..] {
            y = y.mul_add(x, p);
        }
        y *= x;
        y = y.mul_add(z, e * LOG_Q1);
        y = (-z).mul_add(0.5, y);
        let result = e.mul_add(LOG_Q2, x + y);
        if invalid { f32::NAN } else { result }
    }

    /// `sincos256_ps` for one lane: (sin x, cos x).
    pub(super) fn sincos(x: f32) -> (f32, f32) {
        let sign_sin = x.to_bits() & 0x8000_0000;
        let mut x = x.abs();
        let scaled = x * FOPI;
        let mut j = scaled as i32; // truncation, as _mm256_cvttps_epi32
        j = (j + 1) & !1;
        let y = j as f32;
        let swap_sign_sin = ((j & 4) as u32) << 29;
        let use_sin_poly = j & 2 == 0;
        x = y.mul_add(MINUS_DP1, x);
        x = y.mul_add(MINUS_DP2, x);
        x = y.mul_add(MINUS_DP3, x);
        let sign_cos = ((!(j - 2) & 4) as u32) << 29;
        let sign_sin = sign_sin ^ swap_sign_sin;

        let z = x * x;
        let mut cos_poly = COSCOF[0];
        cos_poly = cos_poly.mul_add(z, COSCOF[1]);
        cos_poly = cos_poly.mul_add(z, COSCOF[2]);
        cos_poly *= z;
        cos_poly = cos_poly.mul_add(z, -(z * 0.5));
        cos_poly += 1.0;

        let mut sin_poly = SINCOF[0];
        sin_poly = sin_poly.mul_add(z, SINCOF[1]);
        sin_poly = sin_poly.mul_add(z, SINCOF[2]);
        sin_poly *= z;
        sin_poly = sin_poly.mul_add(x, x);

        // The vector code selects by masking and adds the unselected +0, so -0 becomes +0.
        let (sin, cos) = if use_sin_poly {
            (sin_poly + 0.0, cos_poly + 0.0)
        } else {
            (cos_poly + 0.0, sin_poly + 0.0)
        };
        (
            f32::from_bits(sin.to_bits() ^ sign_sin),
            f32::from_bits(cos.to_bits() ^ sign_cos),
        )
    }
}
