//! AdamW's elementwise passes over the f32 parameters, gradients and moments, with torch's
//! arithmetic (see `train::optim` for the update and its order), and the squared sum of a
//! gradient that gradient clipping's norm is made of.
//!
//! Each pass is one plain loop, compiled three times: for AVX-512F, for AVX2 + FMA and for
//! baseline x86-64. Rust does not contract a multiply and an add into an FMA nor reorder a sum
//! on its own, so the three give the same values bit for bit; the wider ones only run more
//! lanes at once. The first moment's `lerp` is an FMA in torch: on baseline code `mul_add` is
//! a call into libm per element (3.5% of a full-size fine-tuning run before these loops), on
//! the others one instruction.

use crate::Isa;

/// The scalars of one AdamW step, rounded to f32 (the parameters' dtype) from the f64 values
/// Python computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamStep {
    /// `1 − lr·weight_decay`, the decoupled decay's factor.
    pub decay_mul: f32,
    /// Whether the decay applies (weight decay ≠ 0: torch skips the multiply then).
    pub apply_decay: bool,
    /// `1 − β1`, the weight of `lerp(m, g, 1 − β1)`.
    pub beta1_weight: f32,
    /// β2.
    pub beta2: f32,
    /// `1 − β2`.
    pub one_minus_beta2: f32,
    /// `−lr / (1 − β1ᵗ)`.
    pub neg_step_size: f32,
    /// `√(1 − β2ᵗ)`.
    pub bias_correction2_sqrt: f32,
    /// ε.
    pub eps: f32,
    /// The clipping factor each gradient is multiplied by first (1 when not clipped).
    pub grad_scale: f32,
}

/// `m ← lerp(m, g·scale, 1 − β1)` as torch's vectorised CPU `lerp_` computes it: one fused
/// multiply-add from the nearer end.
pub fn first_moment_on(isa: Isa, step: &AdamStep, m: &mut [f32], g: &[f32]) {
    assert_eq!(
        m.len(),
        g.len(),
        "first moment and gradient differ in length"
    );
    #[cfg(target_arch = "x86_64")]
    match crate::usable(isa) {
        // SAFETY: `usable` checked that the CPU has each function's instructions.
        Isa::Avx512 => return unsafe { avx512::first_moment(step, m, g) },
        Isa::Avx2Fma => return unsafe { avx2_fma::first_moment(step, m, g) },
        Isa::Portable => {}
    }
    let _ = isa;
    first_moment_portable(step, m, g)
}

/// `v ← v·β2 + (1 − β2)·g·g` (torch's `mul_(β2).addcmul_(g, g, value=1 − β2)`), with g the
/// scaled gradient.
pub fn second_moment_on(isa: Isa, step: &AdamStep, v: &mut [f32], g: &[f32]) {
    assert_eq!(
        v.len(),
        g.len(),
        "second moment and gradient differ in length"
    );
    #[cfg(target_arch = "x86_64")]
    match crate::usable(isa) {
        // SAFETY: as in `first_moment_on`.
        Isa::Avx512 => return unsafe { avx512::second_moment(step, v, g) },
        Isa::Avx2Fma => return unsafe { avx2_fma::second_moment(step, v, g) },
        Isa::Portable => {}
    }
    let _ = isa;
    second_moment_portable(step, v, g)
}

/// `p ← p·(1 − lr·wd)`, then `p ← p + (−step_size)·m / (√v / √bc2 + ε)` (torch's
/// `addcdiv_`), from the already updated moments.
pub fn update_param_on(isa: Isa, step: &AdamStep, p: &mut [f32], m: &[f32], v: &[f32]) {
    assert!(
        p.len() == m.len() && p.len() == v.len(),
        "parameter and moments differ in length"
    );
    #[cfg(target_arch = "x86_64")]
    match crate::usable(isa) {
        // SAFETY: as in `first_moment_on`.
        Isa::Avx512 => return unsafe { avx512::update_param(step, p, m, v) },
        Isa::Avx2Fma => return unsafe { avx2_fma::update_param(step, p, m, v) },
        Isa::Portable => {}
    }
    let _ = isa;
    update_param_portable(step, p, m, v)
}

/// Σ g² in f64, in a fixed order (8 lanes, then the lanes and the tail): the same value on
/// every instruction set and for any split of the work that keeps the same slices.
pub fn squares_sum_on(isa: Isa, values: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    match crate::usable(isa) {
        // SAFETY: as in `first_moment_on`.
        Isa::Avx512 => return unsafe { avx512::squares_sum(values) },
        Isa::Avx2Fma => return unsafe { avx2_fma::squares_sum(values) },
        Isa::Portable => {}
    }
    let _ = isa;
    squares_sum_portable(values)
}

#[inline(always)]
fn first_moment_portable(step: &AdamStep, m: &mut [f32], g: &[f32]) {
    let w = step.beta1_weight;
    let scale = step.grad_scale;
    // Two loops rather than a branch per element, so that each vectorises.
    if w < 0.5 {
        for (m, &g) in m.iter_mut().zip(g) {
            let diff = g * scale - *m;
            *m = w.mul_add(diff, *m);
        }
    } else {
        for (m, &g) in m.iter_mut().zip(g) {
            let g = g * scale;
            let diff = g - *m;
            *m = (w - 1.0).mul_add(diff, g);
        }
    }
}

#[inline(always)]
fn second_moment_portable(step: &AdamStep, v: &mut [f32], g: &[f32]) {
    let (beta2, value, scale) = (step.beta2, step.one_minus_beta2, step.grad_scale);
    for (v, &g) in v.iter_mut().zip(g) {
        let g = g * scale;
        *v = *v * beta2 + value * g * g;
    }
}

#[inline(always)]
fn update_param_portable(step: &AdamStep, p: &mut [f32], m: &[f32], v: &[f32]) {
    let (bc2_sqrt, eps, value) = (step.bias_correction2_sqrt, step.eps, step.neg_step_size);
    let decay_mul = if step.apply_decay {
        Some(step.decay_mul)
    } else {
        None
    };
    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
        let decayed = match decay_mul {
            Some(decay_mul) => *p * decay_mul,
            None => *p,
        };
        let denom = v.sqrt() / bc2_sqrt + eps;
        *p = decayed + value * m / denom;
    }
}

#[inline(always)]
fn squares_sum_portable(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut runs = values.chunks_exact(8);
    for run in &mut runs {
        for (lane, &g) in lanes.iter_mut().zip(run) {
            *lane += f64::from(g) * f64::from(g);
        }
    }
    let rest: f64 = runs
        .remainder()
        .iter()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum();
    lanes.iter().sum::<f64>() + rest
}

/// Generates one module of the passes compiled for a set of instructions.
macro_rules! compiled_for {
    ($module:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::AdamStep;

            /// # Safety
            /// The CPU has the module's instructions.
            #[target_feature(enable = $features)]
            pub unsafe fn first_moment(step: &AdamStep, m: &mut [f32], g: &[f32]) {
                super::first_moment_portable(step, m, g)
            }

            /// # Safety
            /// The CPU has the module's instructions.
            #[target_feature(enable = $features)]
            pub unsafe fn second_moment(step: &AdamStep, v: &mut [f32], g: &[f32]) {
                super::second_moment_portable(step, v, g)
            }

            /// # Safety
            /// The CPU has the module's instructions.
            #[target_feature(enable = $features)]
            pub unsafe fn update_param(step: &AdamStep, p: &mut [f32], m: &[f32], v: &[f32]) {
                super::update_param_portable(step, p, m, v)
            }

            /// # Safety
            /// The CPU has the module's instructions.
            #[target_feature(enable = $features)]
            pub unsafe fn squares_sum(values: &[f32]) -> f64 {
                super::squares_sum_portable(values)
            }
        }
    };
}

compiled_for!(avx2_fma, "avx2,fma");
compiled_for!(avx512, "avx512f,avx2,fma");

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        crate::test_support::hashed_values(len, seed, 0.02)
    }

    fn step(beta1_weight: f32, apply_decay: bool, grad_scale: f32) -> AdamStep {
        AdamStep {
            decay_mul: 1.0 - 1e-4 * 1e-2,
            apply_decay,
            beta1_weight,
            beta2: 0.999,
            one_minus_beta2: 1.0 - 0.999,
            neg_step_size: -1e-4 / 0.1,
            bias_correction2_sqrt: 0.001f64.sqrt() as f32,
            eps: 1e-8,
            grad_scale,
        }
    }

    #[test]
    fn every_instruction_set_gives_the_portable_values_bit_for_bit() {
        for len in [0, 1, 7, 8, 15, 16, 17, 100, 1027] {
            let g = values(len, 1);
            for s in [step(0.1, true, 1.0), step(0.7, false, 0.37)] {
                let mut reference = None;
                for isa in Isa::all_supported() {
                    let mut m = values(len, 2);
                    let mut v: Vec<f32> = values(len, 3).iter().map(|x| x * x).collect();
                    let mut p = values(len, 4);
                    first_moment_on(isa, &s, &mut m, &g);
                    second_moment_on(isa, &s, &mut v, &g);
                    update_param_on(isa, &s, &mut p, &m, &v);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    let got = (
                        bits(&m),
                        bits(&v),
                        bits(&p),
                        squares_sum_on(isa, &g).to_bits(),
                    );
                    match &reference {
                        None => reference = Some(got),
                        Some(expected) => assert_eq!(&got, expected, "{isa:?}, length {len}"),
                    }
                }
            }
        }
    }

    #[test]
    fn the_passes_compute_adamw_s_formulas() {
        let g = values(33, 5);
        let s = step(0.1, true, 0.5);
        let m0 = values(33, 6);
        let v0: Vec<f32> = values(33, 7).iter().map(|x| x * x).collect();
        let p0 = values(33, 8);
        let (mut m, mut v, mut p) = (m0.clone(), v0.clone(), p0.clone());
        first_moment_on(Isa::Portable, &s, &mut m, &g);
        second_moment_on(Isa::Portable, &s, &mut v, &g);
        update_param_on(Isa::Portable, &s, &mut p, &m, &v);
        for i in 0..33 {
            let g = f64::from(g[i]) * 0.5;
            let m_expected = f64::from(m0[i]) + 0.1 * (g - f64::from(m0[i]));
            let v_expected = f64::from(v0[i]) * 0.999 + 0.001 * g * g;
            let denom = f64::from(v[i]).sqrt() / 0.001f64.sqrt() + 1e-8;
            let p_expected = f64::from(p0[i]) * (1.0 - 1e-6) - 1e-3 * f64::from(m[i]) / denom;
            assert!((f64::from(m[i]) - m_expected).abs() <= 1e-6 * m_expected.abs().max(1e-6));
            assert!((f64::from(v[i]) - v_expected).abs() <= 1e-5 * v_expected.abs().max(1e-12));
            assert!((f64::from(p[i]) - p_expected).abs() <= 1e-6 * p_expected.abs().max(1e-3));
        }
        let squares: f64 = g_squares(&values(33, 5));
        assert!((squares_sum_on(Isa::Portable, &values(33, 5)) - squares).abs() <= 1e-15);
    }

    fn g_squares(values: &[f32]) -> f64 {
        values.iter().map(|&g| f64::from(g) * f64::from(g)).sum()
    }
}
