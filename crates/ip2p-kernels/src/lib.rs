//! Float32 kernels on plain slices (no tensors): the direct convolution of stride 1
//! ([`direct_conv`], AVX-512 or AVX2 + FMA), products with one narrow side ([`skinny`],
//! AVX-512), the softmax numerator ([`softmax`]), the group norm's rows ([`norm`]) and AdamW's
//! elementwise passes ([`adamw`]) (those three on AVX-512, AVX2 + FMA or portable code), and
//! the transforms of the Winograd 3×3 convolution ([`winograd`], whose products the caller runs).
//! [`isa`] is what the CPU has, as far as [`ISA_VAR`] or [`cap_isa`] allow.
//! instruct-pix2pix's CPU backend (`src/model/nn/`) decides when they apply and calls them.
//!
//! They are a crate of their own so that debug builds optimise them as they do every
//! dependency: unoptimised, each intrinsic is a function call and each register array a
//! memory copy, and a tiny training step at 512² took minutes instead of seconds.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

pub mod adamw;
pub mod direct_conv;
pub mod norm;
pub mod skinny;
pub mod softmax;
pub mod winograd;

/// Pixels (float32 lanes) per AVX-512 vector.
const LANES: usize = 16;

/// An output buffer that parallel tasks write at disjoint places (each kernel says which).
#[derive(Clone, Copy)]
struct DisjointOut<T = f32>(*mut T);

// SAFETY: the tasks that share one write disjoint elements of a buffer that outlives them (see
// each user).
unsafe impl<T> Send for DisjointOut<T> {}
unsafe impl<T> Sync for DisjointOut<T> {}

/// The vector instructions a kernel is written for, ordered best first (the lesser of two is
/// the more capable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Isa {
    /// AVX-512F: Intel Skylake-SP and later server chips, AMD Zen 4 and later.
    Avx512,
    /// AVX2 and FMA: nearly every x86-64 desktop and laptop CPU since 2013 (Intel's consumer
    /// chips since Alder Lake have no AVX-512).
    Avx2Fma,
    /// Plain Rust, compiled for the target's baseline.
    Portable,
}

impl Isa {
    /// Whether this CPU can run code written for `self`.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2Fma => false,
            Isa::Portable => true,
        }
    }

    /// Every instruction set this CPU can run, best first (the kernels' tests run each).
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }
}

/// The environment variable that caps the instructions the kernels use: `avx512` (no cap),
/// `avx2` or `portable`, to measure or test what a CPU without AVX-512 runs on one that has it.
pub const ISA_VAR: &str = "INSTRUCT_PIX2PIX_CPU_ISA";

/// What [`ISA_VAR`] asks for: `Ok(None)` when it is unset, an error naming the variable for a
/// value it does not know.
pub fn isa_cap_from_env() -> Result<Option<Isa>, String> {
    match std::env::var(ISA_VAR) {
        Err(_) => Ok(None),
        Ok(value) => match value.trim() {
            "avx512" => Ok(Some(Isa::Avx512)),
            "avx2" => Ok(Some(Isa::Avx2Fma)),
            "portable" => Ok(Some(Isa::Portable)),
            other => Err(format!(
                "{ISA_VAR}={other:?}: use avx512, avx2 or portable (the most the CPU kernels may use)"
            )),
        },
    }
}

/// The best instructions this CPU has, capped by [`ISA_VAR`] (read once; a bad value was
/// refused by the command line) or, once it is called, by [`cap_isa`].
pub fn isa() -> Isa {
    let cap = match cap().load(Ordering::Relaxed) {
        0 => Isa::Avx512,
        1 => Isa::Avx2Fma,
        _ => Isa::Portable,
    };
    usable(cap)
}

/// Makes [`isa`] (and every kernel's choice) no better than `cap` from now on, for the whole
/// process: A/B measurements of a kernel against the path it replaces, in one process.
pub fn cap_isa(cap_to: Isa) {
    cap().store(cap_to as u8, Ordering::Relaxed);
}

/// The cap [`isa`] applies, as an [`Isa`]'s discriminant: at first what [`ISA_VAR`] says.
fn cap() -> &'static AtomicU8 {
    static CAP: OnceLock<AtomicU8> = OnceLock::new();
    CAP.get_or_init(|| {
        let from_env = isa_cap_from_env().ok().flatten();
        AtomicU8::new(from_env.unwrap_or(Isa::Avx512) as u8)
    })
}

/// `wanted`, or the best instructions below it that this CPU has (cheap: called per row).
fn usable(wanted: Isa) -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    let best = *BEST.get_or_init(|| Isa::all_supported()[0]);
    let isa = wanted.max(best);
    // Every AVX-512 CPU has AVX2 and FMA; checked anyway (is_x86_feature_detected caches).
    if isa.supported() { isa } else { Isa::Portable }
}

/// Σ f(v) over `values`: f32 partial sums over short runs in 16 independent lanes (so they
/// vectorise), gathered in f64, which keeps the error far below float32 rounding of the result.
#[inline(always)]
pub fn sum_f64(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    const LANES: usize = 16;
    let mut total = 0f64;
    for run in values.chunks(LANES * 64) {
        let mut lanes = [0f32; LANES];
        let mut chunks = run.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += f(v);
            }
        }
        total += lanes.iter().map(|&v| f64::from(v)).sum::<f64>();
        total += chunks
            .remainder()
            .iter()
            .map(|&v| f64::from(f(v)))
            .sum::<f64>();
    }
    total
}

/// Why a kernel refused its arguments.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{kernel}: {shape} does not match its buffers")]
    ShapeMismatch { kernel: &'static str, shape: String },
    #[error("{kernel} has no {isa:?} kernel, or this CPU lacks those instructions")]
    Unsupported { kernel: &'static str, isa: Isa },
}

/// Test values and the convolution by its definition, shared by the kernels' tests.
#[cfg(test)]
mod test_support {
    use super::direct_conv::Geometry;

    /// `len` values in [−1, 1] (thousandths) from a xorshift generator seeded by `seed`.
    pub fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The convolution by its definition, in f64.
    pub fn reference_conv(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f64> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut out = Vec::with_capacity(g.batch * g.out_channels * oh * ow);
        for b in 0..g.batch {
            for o in 0..g.out_channels {
                for y in 0..oh {
                    for x_out in 0..ow {
                        let mut sum = bias.map_or(0.0, |b| f64::from(b[o]));
                        for c in 0..g.in_channels {
                            for ky in 0..g.k_h {
                                for kx in 0..g.k_w {
                                    let (iy, ix) = (y + ky, x_out + kx);
                                    let (p, h, wd) = (g.padding, g.in_h, g.in_w);
                                    if iy < p || ix < p || iy - p >= h || ix - p >= wd {
                                        continue;
                                    }
                                    let xv =
                                        x[((b * g.in_channels + c) * h + iy - p) * wd + ix - p];
                                    let wv = w[((o * g.in_channels + c) * g.k_h + ky) * g.k_w + kx];
                                    sum += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        out.push(sum);
                    }
                }
            }
        }
        out
    }

    /// `len` values in ±scale/2 from a multiplicative hash of the index: smooth enough to
    /// exercise every lane, the same on every run.
    pub fn hashed_values(len: usize, seed: u32, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x as f32 / (1u32 << 24) as f32 - 0.5) * scale
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Isa;
    use super::direct_conv::{self, Geometry};
    use super::skinny::Skinny;
    use super::test_support::{reference_conv, values};

    /// Partial channel tiles, rows ending inside a vector, the 2 + 2 split of four vectors (rows
    /// of 25 to 32 on AVX2, in 6-channel tiles there; of 64 on AVX-512), more taps than one
    /// chunk, padding 0 to 2, batch 3, with and without bias, one thread or several, on every
    /// instruction set the CPU has: the definition's values to float32 rounding.
    #[test]
    fn direct_conv_matches_its_definition() {
        let isas: Vec<Isa> = Isa::all_supported()
            .into_iter()
            .filter(|&isa| isa != Isa::Portable)
            .collect();
        eprintln!("instruction sets tested: {isas:?}");
        let geometry = |batch, in_channels, in_h, in_w, out_channels, k, padding| Geometry {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            k_h: k,
            k_w: k,
            padding,
        };
        let cases = [
            geometry(1, 3, 11, 37, 11, 3, 1),
            geometry(3, 5, 6, 64, 9, 3, 1),
            geometry(2, 30, 4, 34, 8, 3, 0),
            geometry(1, 4, 7, 33, 3, 5, 2),
            geometry(1, 300, 3, 40, 17, 1, 0),
            geometry(1, 7, 5, 24, 12, 3, 1),
            geometry(2, 3, 4, 32, 5, 3, 1),
            geometry(1, 4, 3, 27, 13, 3, 1),
        ];
        for (n, g) in cases.iter().enumerate() {
            let taps = g.in_channels * g.k_h * g.k_w;
            let x = values(g.batch * g.in_channels * g.in_h * g.in_w, n as u32);
            let w = values(g.out_channels * taps, 100 + n as u32);
            let b = values(g.out_channels, 200 + n as u32);
            for (bias, threads) in [(Some(&b[..]), 4), (None, 1)] {
                let expected = reference_conv(&x, &w, bias, g);
                for &isa in &isas {
                    let actual = direct_conv::conv_on(isa, &x, &w, bias, g, threads).unwrap();
                    assert_eq!(actual.len(), expected.len());
                    for (i, (&a, &e)) in actual.iter().zip(&expected).enumerate() {
                        assert!(
                            (f64::from(a) - e).abs() <= 1e-5 * (taps as f64).sqrt().max(e.abs()),
                            "{isa:?}: case {n} {g:?}: element {i}: {a} vs {e}"
                        );
                    }
                }
            }
        }
        let g = cases[0];
        let x = values(g.batch * g.in_channels * g.in_h * g.in_w, 0);
        for &isa in &isas {
            let error = direct_conv::conv_on(isa, &x[1..], &x, None, &g, 1).unwrap_err();
            assert!(error.to_string().contains("does not match"), "{error}");
        }
        let w = values(g.out_channels * g.in_channels * 9, 1);
        let error = direct_conv::conv_on(Isa::Portable, &x, &w, None, &g, 1).unwrap_err();
        assert!(error.to_string().contains("no Portable kernel"), "{error}");
    }

    /// Narrow widths of 1 to 5 vectors (partial last vectors), a partial last tile of rows,
    /// transposed operands and output, scaling and accumulation, threaded or not.
    #[test]
    fn skinny_product_matches_its_definition() {
        if !super::skinny::available() {
            eprintln!("no AVX-512F: the narrow products do not run on this CPU");
            return;
        }
        // (wide, narrow, k, a transposed, b transposed, out transposed)
        let cases = [
            (131, 16, 20, false, false, false),
            (203, 40, 33, true, false, false),
            (129, 77, 50, false, true, true),
            (150, 80, 17, true, true, false),
            (9, 3, 64, false, false, true),
        ];
        for (n, &(wide, narrow, k, at, bt, ot)) in cases.iter().enumerate() {
            let strides = |rows: usize, cols: usize, t: bool| if t { (1, rows) } else { (cols, 1) };
            let product = Skinny {
                wide,
                narrow,
                k,
                a: strides(wide, k, at),
                b: strides(k, narrow, bt),
                out: strides(wide, narrow, ot),
            };
            let a = values(wide * k, 3 * n as u32);
            let b = values(k * narrow, 3 * n as u32 + 1);
            for (scale, accumulate, threaded) in [(1.0, false, true), (-0.5, true, false)] {
                let mut out = values(wide * narrow, 3 * n as u32 + 2);
                let before = out.clone();
                // SAFETY: AVX-512F checked above; every stride stays inside its buffer.
                unsafe { product.run(&mut out, &a, &b, scale, accumulate, threaded) };
                for i in 0..wide {
                    for j in 0..narrow {
                        let sum: f64 = (0..k)
                            .map(|l| {
                                f64::from(a[i * product.a.0 + l * product.a.1])
                                    * f64::from(b[l * product.b.0 + j * product.b.1])
                            })
                            .sum();
                        let at = i * product.out.0 + j * product.out.1;
                        let kept = if accumulate {
                            f64::from(before[at])
                        } else {
                            0.0
                        };
                        let expected = f64::from(scale) * sum + kept;
                        assert!(
                            (f64::from(out[at]) - expected).abs() <= 1e-5 * (k as f64).sqrt(),
                            "case {n}: ({i}, {j}): {} vs {expected}",
                            out[at]
                        );
                    }
                }
            }
        }
    }

    /// Each instruction set this CPU has against the portable numerator: odd lengths for the
    /// masked tails, values from e^0 to underflow, NaN propagated.
    #[test]
    fn softmax_numerator_matches_the_portable_one_on_every_instruction_set() {
        use super::softmax::{exp_minus_in_place_on, exp_minus_max_in_place_on, exp_non_positive};
        eprintln!("instruction sets tested: {:?}", Isa::all_supported());
        for isa in Isa::all_supported() {
            for len in [1usize, 7, 15, 16, 17, 255, 256, 257, 1000, 4096] {
                let values: Vec<f32> = (0..len)
                    .map(|i| -((i * 7919 % 1013) as f32) * 0.09 + 3.0)
                    .collect();
                let mut vector = values.clone();
                let mut portable = values.clone();
                let (vector_max, vector_sum) = exp_minus_max_in_place_on(isa, &mut vector);
                let (portable_max, portable_sum) =
                    exp_minus_max_in_place_on(Isa::Portable, &mut portable);
                assert_eq!(vector_max, portable_max, "{isa:?}");
                for (v, p) in vector.iter().zip(&portable) {
                    assert!(
                        (v - p).abs() <= 2.5e-7 * p.abs().max(f32::MIN_POSITIVE),
                        "{isa:?}: {v} vs {p}"
                    );
                }
                assert!(
                    (vector_sum - portable_sum).abs() <= 1e-6 * portable_sum,
                    "{isa:?}"
                );
                let exact: f64 = values
                    .iter()
                    .map(|&x| (f64::from(x) - f64::from(vector_max)).exp())
                    .sum();
                assert!(
                    (f64::from(vector_sum) - exact).abs() <= 1e-5 * exact,
                    "{isa:?}: sum {vector_sum} vs {exact}"
                );
            }
            for len in [1usize, 8, 16, 17, 300] {
                let values: Vec<f32> = (0..len).map(|i| (i % 37) as f32 * 0.31 - 9.0).collect();
                let mut vector = values.clone();
                exp_minus_in_place_on(isa, &mut vector, 2.0);
                for (v, x) in vector.iter().zip(&values) {
                    let p = exp_non_positive(x - 2.0);
                    assert!(
                        (v - p).abs() <= 2.5e-7 * p.max(f32::MIN_POSITIVE),
                        "{isa:?}: {v} vs {p}"
                    );
                }
            }
            let mut row = [0.0, -200.0, f32::NEG_INFINITY, -1.0, f32::NAN];
            let (_, sum) = exp_minus_max_in_place_on(isa, &mut row);
            assert!(sum.is_nan() && row[4].is_nan(), "{isa:?}: NaN propagates");
            assert_eq!(row[..3], [1.0, 0.0, 0.0], "{isa:?}");
            assert!((row[3] - (-1f32).exp()).abs() <= 1e-7, "{isa:?}");
        }
    }
}
