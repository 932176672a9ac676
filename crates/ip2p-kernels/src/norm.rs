//! The rows of a group norm: one group's mean and 1/std, and `(x − mean) · scale + shift`
//! (then SiLU, in the same pass: candle's SiLU is a separate single-threaded pass with libm's
//! `expf`) over a channel's row, compiled for AVX-512F or AVX2 + FMA where the CPU has them
//! (LLVM vectorises the same loop 16 or 8 wide), or portable. Every path gives the same values
//! bit for bit: no multiply-add is fused.

use crate::Isa;
use crate::softmax::exp_non_positive;

/// The mean (rounded to f32, as the normalisation subtracts it) and 1/sqrt(variance + eps) of
/// one group's values, in two passes (no cancellation from E[x²] − E[x]²).
pub fn mean_and_inv_std(values: &[f32], eps: f64) -> (f32, f64) {
    let n = values.len() as f64;
    let mean = (crate::sum_f64(values, |v| v) / n) as f32;
    let variance = crate::sum_f64(values, |v| {
        let d = v - mean;
        d * d
    }) / n;
    (mean, 1.0 / (variance + eps).sqrt())
}

/// `dst = (src − mean) · scale + shift`, then SiLU if `silu`, on the best instructions this CPU
/// has. `dst` and `src` have the same length.
pub fn normalize_row(dst: &mut [f32], src: &[f32], mean: f32, scale: f32, shift: f32, silu: bool) {
    normalize_row_on(crate::isa(), dst, src, mean, scale, shift, silu)
}

/// [`normalize_row`] on the given instructions (portable code where this CPU lacks them).
pub fn normalize_row_on(
    isa: Isa,
    dst: &mut [f32],
    src: &[f32],
    mean: f32,
    scale: f32,
    shift: f32,
    silu: bool,
) {
    let row = Row {
        mean,
        scale,
        shift,
        silu,
    };
    #[cfg(target_arch = "x86_64")]
    match crate::usable(isa) {
        // SAFETY: `usable` checked that the CPU has each function's instructions.
        Isa::Avx512 => return unsafe { row.apply_avx512(dst, src) },
        Isa::Avx2Fma => return unsafe { row.apply_avx2_fma(dst, src) },
        Isa::Portable => {}
    }
    let _ = isa;
    row.apply(dst, src);
}

/// SiLU, `y · sigmoid(y)`. NaN stays NaN.
#[inline(always)]
pub fn silu(y: f32) -> f32 {
    y * sigmoid(y)
}

/// The logistic function from t = e^−|y| (never overflows): 1 / (1 + t) for y ≥ 0, t / (1 + t)
/// below; SiLU's and its derivative's (the group norm's backward pass).
#[inline(always)]
pub fn sigmoid(y: f32) -> f32 {
    let t = exp_non_positive(-y.abs());
    (if y >= 0.0 { 1.0 } else { t }) / (1.0 + t)
}

/// One channel's normalisation.
#[derive(Clone, Copy)]
struct Row {
    mean: f32,
    scale: f32,
    shift: f32,
    silu: bool,
}

impl Row {
    #[inline(always)]
    fn apply(self, dst: &mut [f32], src: &[f32]) {
        let Row {
            mean,
            scale,
            shift,
            silu: with_silu,
        } = self;
        if with_silu {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = silu((s - mean) * scale + shift);
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = (s - mean) * scale + shift;
            }
        }
    }

    /// [`Row::apply`] compiled for AVX-512F.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn apply_avx512(self, dst: &mut [f32], src: &[f32]) {
        self.apply(dst, src);
    }

    /// [`Row::apply`] compiled for AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn apply_avx2_fma(self, dst: &mut [f32], src: &[f32]) {
        self.apply(dst, src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values_of(len: usize, seed: u32) -> Vec<f32> {
        crate::test_support::hashed_values(len, seed, 12.0)
    }

    #[test]
    fn every_instruction_set_normalises_rows_to_the_same_bits_as_portable_code() {
        for len in [1, 7, 8, 15, 16, 17, 33, 1024 + 5] {
            let src = values_of(len, len as u32);
            let (mean, inv_std) = mean_and_inv_std(&src, 1e-5);
            for silu_on in [false, true] {
                let mut expected = vec![0f32; len];
                normalize_row_on(
                    Isa::Portable,
                    &mut expected,
                    &src,
                    mean,
                    inv_std as f32 * 0.7,
                    0.25,
                    silu_on,
                );
                for (&x, &y) in src.iter().zip(&expected).take(3) {
                    let plain = (x - mean) * (inv_std as f32 * 0.7) + 0.25;
                    let want = if silu_on {
                        plain / (1.0 + (-plain).exp())
                    } else {
                        plain
                    };
                    assert!(
                        (y - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{y} vs {want}"
                    );
                }
                for isa in Isa::all_supported() {
                    let mut got = vec![f32::NAN; len];
                    normalize_row_on(
                        isa,
                        &mut got,
                        &src,
                        mean,
                        inv_std as f32 * 0.7,
                        0.25,
                        silu_on,
                    );
                    let same = got
                        .iter()
                        .zip(&expected)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{isa:?}, {len} values, silu {silu_on}");
                }
            }
        }
    }

    #[test]
    fn the_group_statistics_match_the_definition() {
        let values = values_of(4099, 3);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let variance = values
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let (got_mean, got_inv_std) = mean_and_inv_std(&values, 1e-6);
        assert!((f64::from(got_mean) - mean).abs() < 1e-6);
        assert!((got_inv_std - 1.0 / (variance + 1e-6).sqrt()).abs() < 1e-6);
    }
}
