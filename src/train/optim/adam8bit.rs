//! The 8-bit block-wise AdamW state of [`MomentStorage::Blockwise8Bit`] (`--use_8bit_adam`), as
//! bitsandbytes' `AdamW8bit` keeps it: the dynamic quantisation maps ([`dynamic_map`]),
//! quantising to and dequantising from them block by block ([`BlockwiseQuantized`]), and the
//! fused in-place 8-bit update on a CPU parameter. [`super::AdamW`] owns the step and the
//! checkpoint names.

use std::sync::Mutex;

use rayon::prelude::*;

#[cfg(doc)]
use super::MomentStorage;
use super::{AdamWConfig, F32GradUpdate, QuantizedMoments};

/// Elements per quantisation block of the 8-bit moments (bitsandbytes' `AdamW8bit` of the
/// Dettmers et al. paper and up to bitsandbytes 0.44; later releases use 256).
pub const BLOCK_SIZE_8BIT: usize = 2048;
/// Parameters with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// `torch.linspace(start, end, steps)` in f32 (torch fills the two halves from either end).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// bitsandbytes' dynamic quantisation map (`create_dynamic_map(signed)` with 7 exponent bits):
/// 256 values sorted ascending in [-1, 1] (signed) or [0, 1], dense near zero. For each exponent
/// `e` in −6..=0 it holds the midpoints of `2^k + 1` evenly spaced points on [0.1, 1] scaled by
/// 10^e (k = 0..6 signed, with both signs; k = 1..7 unsigned), plus 0 and 1.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    const EXPONENT_BITS: i32 = 7;
    let mut values: Vec<f32> = Vec::with_capacity(256);
    for i in 0..EXPONENT_BITS {
        let points = if signed {
            (1usize << i) + 1
        } else {
            (1usize << (i + 1)) + 1
        };
        let boundaries = linspace_f32(0.1, 1.0, points);
        let scale = 10f64.powi(i - (EXPONENT_BITS - 1)) as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            if signed {
                values.push(-(scale * mean));
            }
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f32::total_cmp);
    let mut map = [0f32; 256];
    map.copy_from_slice(&values);
    map
}

/// The index of the map value nearest to `x` (the lower one on a tie).
pub fn quantize_to_map(map: &[f32; 256], x: f32) -> u8 {
    let upper = map.partition_point(|&v| v < x);
    if upper == 0 {
        return 0;
    }
    if upper == map.len() {
        return 255;
    }
    let lower = upper - 1;
    if x - map[lower] <= map[upper] - x {
        lower as u8
    } else {
        upper as u8
    }
}

/// The signed and unsigned maps, built once.
fn maps() -> &'static ([f32; 256], [f32; 256]) {
    static MAPS: std::sync::OnceLock<([f32; 256], [f32; 256])> = std::sync::OnceLock::new();
    MAPS.get_or_init(|| (dynamic_map(true), dynamic_map(false)))
}

/// A tensor quantised block-wise on a dynamic map: each block of `block_size` elements stores
/// its absolute maximum, and each element the index of the map value nearest to
/// `element / absmax`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockwiseQuantized {
    /// One map index per element.
    pub codes: Vec<u8>,
    /// One absolute maximum per block.
    pub absmax: Vec<f32>,
    /// The signed map (for m) or the unsigned one (for v).
    pub signed: bool,
    /// Elements per block.
    pub block_size: usize,
}

impl BlockwiseQuantized {
    /// `elements` zeros.
    pub fn zeros(elements: usize, signed: bool, block_size: usize) -> Self {
        let zero = quantize_to_map(Self::map_of(signed), 0.0);
        Self {
            codes: vec![zero; elements],
            absmax: vec![0.0; elements.div_ceil(block_size)],
            signed,
            block_size,
        }
    }

    fn map_of(signed: bool) -> &'static [f32; 256] {
        let (signed_map, unsigned_map) = maps();
        if signed { signed_map } else { unsigned_map }
    }

    /// The map the codes index.
    pub fn map(&self) -> &'static [f32; 256] {
        Self::map_of(self.signed)
    }

    /// Quantises `values` (non-negative ones when `signed` is false).
    pub fn quantize(values: &[f32], signed: bool, block_size: usize) -> Self {
        let map = Self::map_of(signed);
        let mut out = Self::zeros(values.len(), signed, block_size);
        out.codes
            .par_chunks_mut(block_size)
            .zip(out.absmax.par_iter_mut())
            .zip(values.par_chunks(block_size))
            .for_each(|((codes, absmax), block)| {
                *absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                encode_block(map, block, *absmax, signed, codes);
            });
        out
    }

    /// The values the codes stand for: `map[code] · absmax` of the element's block.
    pub fn dequantize(&self) -> Vec<f32> {
        let map = self.map();
        self.codes
            .chunks(self.block_size)
            .zip(&self.absmax)
            .flat_map(|(codes, &absmax)| codes.iter().map(move |&c| map[c as usize] * absmax))
            .collect()
    }
}

/// Writes the codes of `block` (of absolute maximum `absmax`) into `codes`: the nearest map value
/// of `x / absmax`, except that on the signed map a non-zero value whose nearest code has the
/// other sign bit moves one code outwards (bitsandbytes' rule, so that a small negative momentum
/// does not become zero or positive; 0 has a positive sign bit).
fn encode_block(map: &[f32; 256], block: &[f32], absmax: f32, signed: bool, codes: &mut [u8]) {
    if absmax == 0.0 || !absmax.is_finite() {
        let zero = quantize_to_map(map, 0.0);
        codes.iter_mut().for_each(|c| *c = zero);
        return;
    }
    for (code, &x) in codes.iter_mut().zip(block) {
        let mut c = quantize_to_map(map, x / absmax);
        if signed && x != 0.0 && map[c as usize].is_sign_negative() != x.is_sign_negative() {
            c = if x > 0.0 { c + 1 } else { c - 1 };
        }
        *code = c;
    }
}

/// The per-step scalars of the 8-bit update, in f32 as bitsandbytes' kernel computes them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Adam8BitScalars {
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// `sqrt(1 − β2ᵗ)`.
    correction2: f32,
    /// `−lr · correction2 / (1 − β1ᵗ)`.
    step_size: f32,
    /// `1 − lr·wd`, applied after the update when the decay is non-zero.
    decay_mul: Option<f32>,
    /// The clipping factor the gradient is multiplied by first.
    grad_scale: f32,
}

impl Adam8BitScalars {
    pub(super) fn new(config: &AdamWConfig, lr: f64, step: u64, grad_scale: f32) -> Self {
        let t = step as f64;
        let correction1 = 1.0 - config.beta1.powf(t);
        let correction2 = (1.0 - config.beta2.powf(t)).sqrt();
        Self {
            beta1: config.beta1 as f32,
            beta2: config.beta2 as f32,
            eps: config.eps as f32,
            correction2: correction2 as f32,
            step_size: (-lr * correction2 / correction1) as f32,
            decay_mul: (config.weight_decay > 0.0)
                .then_some((1.0 - lr * config.weight_decay) as f32),
            grad_scale,
        }
    }

    /// One step of the 8-bit AdamW on `param` with gradient `grad` (same length as the codes).
    pub(super) fn update(&self, param: &mut [f32], grad: &[f32], moments: &mut QuantizedMoments) {
        let (signed_map, unsigned_map) = maps();
        let block_size = moments.exp_avg.block_size;
        let m = &mut moments.exp_avg;
        let v = &mut moments.exp_avg_sq;
        param
            .par_chunks_mut(block_size)
            .zip(grad.par_chunks(block_size))
            .zip(m.codes.par_chunks_mut(block_size))
            .zip(m.absmax.par_iter_mut())
            .zip(v.codes.par_chunks_mut(block_size))
            .zip(v.absmax.par_iter_mut())
            .for_each(|(((((p, g), m_codes), m_absmax), v_codes), v_absmax)| {
                let n = p.len();
                let mut m_vals = vec![0f32; n];
                let mut v_vals = vec![0f32; n];
                let grad = |j: usize| g[j] * self.grad_scale;
                for j in 0..n {
                    let g = grad(j);
                    if g.is_finite() {
                        let v_old = unsigned_map[v_codes[j] as usize] * *v_absmax;
                        v_vals[j] = v_old * self.beta2 + (1.0 - self.beta2) * g * g;
                        let m_old = signed_map[m_codes[j] as usize] * *m_absmax;
                        m_vals[j] = m_old * self.beta1 + (1.0 - self.beta1) * g;
                    }
                }
                *m_absmax = m_vals.iter().fold(0f32, |a, x| a.max(x.abs()));
                *v_absmax = v_vals.iter().fold(0f32, |a, x| a.max(x.abs()));
                for j in 0..n {
                    if grad(j).is_finite() {
                        let denom = v_vals[j].sqrt() + self.correction2 * self.eps;
                        p[j] += self.step_size * (m_vals[j] / denom);
                        if let Some(decay) = self.decay_mul {
                            p[j] *= decay;
                        }
                    }
                }
                encode_block(signed_map, &m_vals, *m_absmax, true, m_codes);
                encode_block(unsigned_map, &v_vals, *v_absmax, false, v_codes);
            });
    }
}

/// The 8-bit update in place on a contiguous f32 CPU parameter.
pub(super) struct Adam8BitUpdate<'a> {
    pub(super) scalars: Adam8BitScalars,
    pub(super) moments: Mutex<&'a mut QuantizedMoments>,
}

impl F32GradUpdate for Adam8BitUpdate<'_> {
    const NAME: &'static str = "adamw-8bit";

    fn apply(&self, p: &mut [f32], g: &[f32]) -> candle_core::Result<()> {
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        if moments.exp_avg.codes.len() != p.len() {
            candle_core::bail!(
                "AdamW 8-bit: {} moment codes for {} elements",
                moments.exp_avg.codes.len(),
                p.len()
            );
        }
        self.scalars.update(p, g, &mut moments);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;
    use crate::model::max_abs_diff;
    use crate::train::optim::{AdamW, MomentStorage};

    #[test]
    fn dynamic_maps_are_bitsandbytes_shapes() {
        let signed = dynamic_map(true);
        let unsigned = dynamic_map(false);
        for map in [&signed, &unsigned] {
            assert!(map.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
            assert_eq!(map[255], 1.0);
        }
        // Signed: 127 negatives, 0, 127 positives below 1, then 1.
        assert_eq!(signed[127], 0.0);
        assert_eq!(signed.iter().filter(|v| **v < 0.0).count(), 127);
        assert!((signed[0] + 0.99297).abs() < 1e-4, "{}", signed[0]);
        // The smallest magnitudes: 10⁻⁶ · 0.55 (signed), 10⁻⁶ · 0.325 (unsigned).
        assert!((signed[128] - 5.5e-7).abs() < 1e-12, "{}", signed[128]);
        assert_eq!(unsigned[0], 0.0);
        assert!((unsigned[1] - 3.25e-7).abs() < 1e-12, "{}", unsigned[1]);
        // Dense near zero: half the codes for [0, 0.1), the other half for [0.1, 1].
        assert_eq!(unsigned.iter().filter(|v| **v < 0.1).count(), 127);
        assert_eq!(signed.iter().filter(|v| v.abs() < 0.1).count(), 127);
    }

    /// Quantise-dequantise round trips: every element within the spacing of the two map values
    /// around it (half of it for plain rounding; a whole one where the sign rule moved it), the
    /// block maxima exact, zeros exact.
    #[test]
    fn quantisation_round_trip_error_is_bounded_by_the_map_spacing() {
        let device = Device::Cpu;
        let n = 3 * 2048 + 123;
        let normal = Tensor::randn(0f32, 1., n, &device).unwrap();
        let mut values = normal.to_vec1::<f32>().unwrap();
        // Blocks of very different scales, and exact zeros.
        for (i, v) in values.iter_mut().enumerate() {
            *v *= [1e-3f32, 1.0, 50.0, 1e-6][i / 2048];
        }
        values[5] = 0.0;
        for signed in [true, false] {
            let input: Vec<f32> = if signed {
                values.clone()
            } else {
                values.iter().map(|v| v * v).collect()
            };
            let q = BlockwiseQuantized::quantize(&input, signed, 2048);
            assert_eq!(q.absmax.len(), 4);
            let map = q.map();
            let back = q.dequantize();
            for (i, (&x, &y)) in input.iter().zip(&back).enumerate() {
                let absmax = q.absmax[i / 2048];
                let normalised = x / absmax;
                let upper = map.partition_point(|&v| v < normalised).clamp(1, 255);
                let spacing = (map[upper] - map[upper - 1]) * absmax;
                assert!(
                    (x - y).abs() <= spacing * 1.0001,
                    "{signed} {i}: {x} came back as {y} (spacing {spacing})"
                );
                if signed && x != 0.0 {
                    assert!(y == 0.0 && x > 0.0 || y.signum() == x.signum(), "{x} {y}");
                }
            }
            assert_eq!(back[5], 0.0);
            // The largest positive element of a block is 1.0 on the map: exact.
            for (block, &absmax) in input.chunks(2048).zip(&q.absmax) {
                let max = block.iter().fold(f32::MIN, |m, &v| m.max(v));
                if max == absmax {
                    let i = block.iter().position(|&v| v == max).unwrap();
                    let start = (block.as_ptr() as usize - input.as_ptr() as usize) / 4;
                    assert_eq!(back[start + i], max);
                }
            }
        }
    }

    /// One 8-bit step against a float reference: from zero moments, the moments the update uses
    /// are exact, so the parameter moves exactly as bitsandbytes' formula (decay after the
    /// update) computed in f64 says; the stored moments are the float ones within the map's
    /// spacing. A small parameter keeps f32 moments.
    #[test]
    fn one_8bit_step_equals_the_float_formula() {
        let device = Device::Cpu;
        let n = 5000;
        let start = Tensor::randn(0f32, 1., n, &device).unwrap();
        let grad = Tensor::randn(0f32, 1e-2, n, &device).unwrap();
        let small = Var::zeros(100, DType::F32, &device).unwrap();
        let var = Var::from_tensor(&start).unwrap();
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut optim = AdamW::with_storage(
            vec![("big".into(), var.clone()), ("small".into(), small)],
            config.clone(),
            MomentStorage::Blockwise8Bit,
        )
        .unwrap();
        assert!(optim.moments(0).is_none());
        assert!(optim.moments(1).is_some());
        let lr = 1e-3;
        let small_grad = Tensor::ones(100, DType::F32, &device).unwrap();
        optim
            .step(&[Some(grad.clone()), Some(small_grad)], lr)
            .unwrap();

        let p0 = start.to_vec1::<f32>().unwrap();
        let g = grad.to_vec1::<f32>().unwrap();
        let p1 = var.as_tensor().to_vec1::<f32>().unwrap();
        let (b1, b2, eps, wd) = (config.beta1, config.beta2, config.eps, config.weight_decay);
        let mut worst = 0f64;
        for i in 0..n {
            let (p, g) = (f64::from(p0[i]), f64::from(g[i]));
            let m = (1.0 - b1) * g;
            let v = (1.0 - b2) * g * g;
            let c2 = (1.0 - b2).sqrt();
            let expected = (p - lr * c2 / (1.0 - b1) * m / (v.sqrt() + c2 * eps)) * (1.0 - lr * wd);
            worst = worst.max((f64::from(p1[i]) - expected).abs());
        }
        // f32 arithmetic on values of order 1: a few ulps.
        assert!(worst < 1e-6, "{worst}");

        let (m, v) = optim.dequantized_moments(0).unwrap().unwrap();
        let (m, v) = (m.to_vec1::<f32>().unwrap(), v.to_vec1::<f32>().unwrap());
        // The kernel's f32 arithmetic from zero moments: (1 − β1)·g and (1 − β2)·g·g.
        let (w1, w2) = (1.0 - b1 as f32, 1.0 - b2 as f32);
        let m_ref: Vec<f32> = g.iter().map(|g| w1 * g).collect();
        let v_ref: Vec<f32> = g.iter().map(|g| w2 * g * g).collect();
        for (got, want, signed) in [(&m, &m_ref, true), (&v, &v_ref, false)] {
            let q = BlockwiseQuantized::quantize(want, signed, BLOCK_SIZE_8BIT);
            assert_eq!(&q.dequantize(), got);
        }
        // The small parameter took torch's f32 step: p = −lr · sign-ish update of 1.
        let (_, small) = &optim.params()[1];
        let value = small.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((value + 1e-3).abs() < 1e-6, "{value}");
    }

    /// The 8-bit state survives a checkpoint: a restored optimizer takes the same next step.
    #[test]
    fn eight_bit_state_round_trips_through_state_tensors() {
        let device = Device::Cpu;
        let make =
            || Var::from_tensor(&Tensor::randn(0f32, 1., (80, 64), &device).unwrap()).unwrap();
        let (a, b) = (make(), make());
        b.set(a.as_tensor()).unwrap();
        let grads: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1e-2, (80, 64), &device).unwrap())
            .collect();
        let mut first = AdamW::with_storage(
            vec![("w".into(), a.clone())],
            AdamWConfig::default(),
            MomentStorage::Blockwise8Bit,
        )
        .unwrap();
        first.step(&[Some(grads[0].clone())], 1e-3).unwrap();
        first.step(&[Some(grads[1].clone())], 1e-3).unwrap();
        let tensors = first.state_tensors().unwrap();
        let mut names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "exp_avg_absmax.w",
                "exp_avg_q8.w",
                "exp_avg_sq_absmax.w",
                "exp_avg_sq_q8.w"
            ]
        );
        b.set(a.as_tensor()).unwrap();
        let mut restored = AdamW::from_state(
            vec![("w".into(), b.clone())],
            first.state(),
            tensors.clone(),
        )
        .unwrap();
        first.step(&[Some(grads[2].clone())], 1e-3).unwrap();
        restored.step(&[Some(grads[2].clone())], 1e-3).unwrap();
        assert_eq!(max_abs_diff(a.as_tensor(), b.as_tensor()), 0.0);
        // A 32-bit state cannot read 8-bit tensors, and says which optimizer it expected.
        let mut state = first.state();
        state.moments = MomentStorage::Float32;
        let err = AdamW::from_state(vec![("w".into(), b)], state, tensors).unwrap_err();
        assert!(err.to_string().contains("exp_avg.w"), "{err}");
    }
}
