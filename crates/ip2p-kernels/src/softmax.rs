//! The softmax numerator in AVX-512 intrinsics: LLVM does not vectorise the float → int
//! conversion of the scalar exp (a saturating cast in Rust) nor fuse its multiply-adds, which
//! made the exp cost as much as both attention products. The caller keeps a portable version
//! for CPUs without AVX-512F.

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
