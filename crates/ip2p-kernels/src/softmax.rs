//! The softmax numerator, `e^(x − max)` over a row, and the exponential it is made of: in
//! AVX-512 intrinsics, in AVX2 + FMA (the portable loop compiled for those instructions: most
//! desktop CPUs, which lack AVX-512), or portable. LLVM does not vectorise the float → int
//! conversion of a scalar exp written with a saturating cast nor fuse its multiply-adds, which
//! made the exp cost as much as both attention products; the portable version is written so that
//! it vectorises, and the AVX-512 one by hand.

use crate::Isa;

/// `row[i] = exp(row[i] − max(row))`; returns the max and the sum of the new values (gathered
/// in f64): softmax before its division. On the best instructions this CPU has.
pub fn exp_minus_max_in_place(row: &mut [f32]) -> (f32, f32) {
    exp_minus_max_in_place_on(crate::isa(), row)
}

/// [`exp_minus_max_in_place`] on the given instructions (falling back to portable code when
/// this CPU lacks them).
pub fn exp_minus_max_in_place_on(isa: Isa, row: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    match crate::usable(isa) {
        // SAFETY: `usable` checked that the CPU has each function's instructions.
        Isa::Avx512 => return unsafe { avx512::exp_minus_max_in_place(row) },
        Isa::Avx2Fma => return unsafe { avx2_fma::exp_minus_max_in_place(row) },
        Isa::Portable => {}
    }
    let _ = isa;
    exp_minus_max_in_place_portable(row)
}

/// `row[i] = exp(row[i] − shift)` where the values are at most `shift` (above it counts as
/// equal): attention's probabilities recomputed from the scores and each row's log-sum-exp in
/// the backward pass.
pub fn exp_minus_in_place(row: &mut [f32], shift: f32) {
    exp_minus_in_place_on(crate::isa(), row, shift)
}

/// [`exp_minus_in_place`] on the given instructions (see [`exp_minus_max_in_place_on`]).
pub fn exp_minus_in_place_on(isa: Isa, row: &mut [f32], shift: f32) {
    #[cfg(target_arch = "x86_64")]
    match crate::usable(isa) {
        // SAFETY: as in `exp_minus_max_in_place_on`.
        Isa::Avx512 => return unsafe { avx512::exp_minus_in_place(row, shift) },
        Isa::Avx2Fma => return unsafe { avx2_fma::exp_minus_in_place(row, shift) },
        Isa::Portable => {}
    }
    let _ = isa;
    exp_minus_in_place_portable(row, shift)
}

/// [`exp_minus_max_in_place`] in plain Rust (three passes: max, exp, sum).
#[inline(always)]
fn exp_minus_max_in_place_portable(row: &mut [f32]) -> (f32, f32) {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for value in row.iter_mut() {
        *value = exp_non_positive(*value - max);
    }
    (max, crate::sum_f64(row, |v| v) as f32)
}

#[inline(always)]
fn exp_minus_in_place_portable(row: &mut [f32], shift: f32) {
    for value in row {
        *value = exp_non_positive(*value - shift);
    }
}

/// e^x for x ≤ 0 (NaN stays NaN), within about one ulp: Cephes' `expf` (x = n·ln 2 + r,
/// |r| ≤ ln 2 / 2, a degree-6 polynomial for e^r, then 2^n through the exponent bits), written
/// without branches so that loops over it vectorise, unlike libm's `expf`.
#[inline(always)]
pub fn exp_non_positive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding and subtracting it rounds to the nearest integer.
    const ROUNDER: f32 = 12_582_912.0;
    // Below this, e^x is under f32's smallest normal number.
    const LOWEST: f32 = -87.33;
    let clamped = x.clamp(LOWEST, 0.0);
    let n = (clamped * LOG2_E + ROUNDER) - ROUNDER;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // SAFETY: `clamped` ∈ [−87.33, 0], so n is an integer in [−126, 0]: the conversion is
    // exact (a plain `as` would add a saturation check that stops the loop vectorising).
    let n_int: i32 = unsafe { n.to_int_unchecked() };
    let two_to_n = f32::from_bits(((n_int + 127) as u32) << 23);
    let y = e_r * two_to_n;
    if x.is_nan() {
        x
    } else if x < LOWEST {
        0.0
    } else {
        y
    }
}

/// The portable loops compiled for AVX2 and FMA: LLVM vectorises them 8 wide. Rust does not
/// contract a multiply and an add into an FMA on its own, so the values are the portable ones
/// bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx2_fma {
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_minus_max_in_place(row: &mut [f32]) -> (f32, f32) {
        super::exp_minus_max_in_place_portable(row)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_minus_in_place(row: &mut [f32], shift: f32) {
        super::exp_minus_in_place_portable(row, shift)
    }
}

/// The numerator in AVX-512 intrinsics, with 2^n applied by `scalef`.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::LANES;

    /// The lanes of `row[start..]` that exist, at most 16, as a load/store mask.
    #[inline(always)]
    fn tail_mask(len: usize, start: usize) -> __mmask16 {
        let left = (len - start).min(LANES);
        ((1u32 << left) - 1) as __mmask16
    }

    /// `row[i] = exp(row[i] − max(row))`; returns the max and the sum of the new values (f32
    /// partial sums over 256 values, gathered in f64): softmax before its division. Two passes:
    /// max, then exp and sum together.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub fn exp_minus_max_in_place(row: &mut [f32]) -> (f32, f32) {
        let len = row.len();
        let ptr = row.as_mut_ptr();
        let mut max_lanes = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < len {
            let mask = tail_mask(len, i);
            // SAFETY: the mask covers only the lanes i..min(i + 16, len) inside `row`.
            let v = unsafe { _mm512_mask_loadu_ps(max_lanes, mask, ptr.add(i)) };
            max_lanes = _mm512_max_ps(max_lanes, v);
            i += LANES;
        }
        let row_max = _mm512_reduce_max_ps(max_lanes);
        let max = _mm512_set1_ps(row_max);
        let mut total = 0f64;
        let mut i = 0;
        while i < len {
            let run_end = (i + LANES * 16).min(len);
            let mut sum_lanes = _mm512_setzero_ps();
            while i < run_end {
                let mask = tail_mask(run_end, i);
                // SAFETY: as above, only lanes inside `row` are read and written.
                unsafe {
                    let v = _mm512_maskz_loadu_ps(mask, ptr.add(i));
                    let e = exp_non_positive(_mm512_sub_ps(v, max));
                    _mm512_mask_storeu_ps(ptr.add(i), mask, e);
                    sum_lanes = _mm512_add_ps(sum_lanes, _mm512_maskz_mov_ps(mask, e));
                }
                i += LANES;
            }
            let low = _mm512_castps512_ps256(sum_lanes);
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(sum_lanes)));
            let wide = _mm512_add_pd(_mm512_cvtps_pd(low), _mm512_cvtps_pd(high));
            total += _mm512_reduce_add_pd(wide);
        }
        (row_max, total as f32)
    }

    /// `row[i] = exp(row[i] − shift)` where the values are at most `shift` (above it counts as
    /// equal).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub fn exp_minus_in_place(row: &mut [f32], shift: f32) {
        let len = row.len();
        let ptr = row.as_mut_ptr();
        let shift = _mm512_set1_ps(shift);
        let mut i = 0;
        while i < len {
            let mask = tail_mask(len, i);
            // SAFETY: the mask covers only the lanes i..min(i + 16, len) inside `row`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, ptr.add(i));
                let e = exp_non_positive(_mm512_sub_ps(v, shift));
                _mm512_mask_storeu_ps(ptr.add(i), mask, e);
            }
            i += LANES;
        }
    }

    /// e^x for x ≤ 0, 16 lanes: the scalar `exp_non_positive`'s method (Cephes' polynomial),
    /// with 2^n applied by `scalef`. 0 below −87.33 (as the scalar version), NaN stays NaN.
    #[target_feature(enable = "avx512f")]
    fn exp_non_positive(x: __m512) -> __m512 {
        let lowest = _mm512_set1_ps(-87.33);
        let clamped = _mm512_min_ps(_mm512_max_ps(x, lowest), _mm512_setzero_ps());
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(clamped, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), clamped);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm512_set1_ps(1.987_569_2e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let e_r = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let y = _mm512_scalef_ps(e_r, n);
        let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lowest);
        let y = _mm512_mask_mov_ps(y, underflow, _mm512_setzero_ps());
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_mov_ps(y, nan, x)
    }
}
