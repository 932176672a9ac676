//! GEGLU's activation, `value · gelu(gate)` (GELU in its exact erf form), as one CPU pass with a
//! fused backward: candle's composed version is a GELU, a product and, in the backward pass,
//! about a dozen elementwise ops over the feed-forward's widest tensors (4 × the model width).
//!
//! With u = gate/√2, gelu(g) = g·(1 + erf(u))/2 and gelu′(g) = (1 + erf(u))/2 + g·e^(−g²/2)/√(2π):
//! d value = dy · gelu(gate), d gate = dy · value · gelu′(gate). The forward values equal
//! candle's `value * gate.gelu_erf()` bit for bit (the same erf, the same order of operations).

use candle_core::cpu::erf::erf_f32;
use candle_core::{CpuStorage, DType, Device, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu;
use super::fused_op::{Fused, FusedKernel, Grads2};

/// Elements per parallel task: small tensors run on the calling thread.
const CHUNK: usize = 1 << 14;

/// `value · gelu(gate)` for two tensors of one shape, when the kernel applies (CPU, f32);
/// differentiable in both.
pub fn geglu(value: &Tensor, gate: &Tensor) -> Result<Option<Tensor>> {
    let applies = [value, gate]
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.device().is_cpu());
    if !applies || value.shape() != gate.shape() {
        return Ok(None);
    }
    let op = GegluOp {
        value_tracked: value.track_op(),
        gate_tracked: gate.track_op(),
    };
    value
        .contiguous()?
        .apply_op2(&gate.contiguous()?, Fused(op))
        .map(Some)
}

struct GegluOp {
    value_tracked: bool,
    gate_tracked: bool,
}

#[inline(always)]
fn gelu_erf(g: f32) -> f32 {
    (erf_f32(g * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * g
}

/// gelu(g) and gelu′(g).
#[inline(always)]
fn gelu_and_derivative(g: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let half_one_plus_erf = (erf_f32(g * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5;
    let density = cpu::exp_non_positive(-0.5 * g * g) * FRAC_1_SQRT_2PI;
    (half_one_plus_erf * g, half_one_plus_erf + g * density)
}

impl FusedKernel<2> for GegluOp {
    type Grads = Grads2;

    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn forward(&self, [value, gate]: [&[f32]; 2], shape: &Shape) -> Result<(CpuStorage, Shape)> {
        let mut out = vec![0f32; value.len()];
        out.par_chunks_mut(CHUNK)
            .zip(value.par_chunks(CHUNK).zip(gate.par_chunks(CHUNK)))
            .for_each(|(out, (value, gate))| {
                for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
                    *o = v * gelu_erf(g);
                }
            });
        Ok((CpuStorage::F32(out), shape.clone()))
    }

    fn backward(&self, [value, gate]: [&Tensor; 2], _: &Tensor, grad: &Tensor) -> Result<Grads2> {
        let len = value.elem_count();
        let (value, gate, grad) = (value.contiguous()?, gate.contiguous()?, grad.contiguous()?);
        let guards = [&value, &gate, &grad].map(|t| t.storage_and_layout());
        let [v, g, dy] = [0, 1, 2].map(|i| cpu::contiguous_slice::<f32>(&guards[i].0, guards[i].1));
        let (v, g, dy) = (v?, g?, dy?);
        let mut value_grad = vec![0f32; if self.value_tracked { len } else { 0 }];
        let mut gate_grad = vec![0f32; if self.gate_tracked { len } else { 0 }];
        // Each task fills its chunk of whichever gradients are wanted.
        let fill = |start: usize, dv: Option<&mut [f32]>, dg: Option<&mut [f32]>| {
            let end = (start + CHUNK).min(len);
            match (dv, dg) {
                (Some(dv), Some(dg)) => {
                    for (i, (dv, dg)) in (start..end).zip(dv.iter_mut().zip(dg.iter_mut())) {
                        let (gelu, derivative) = gelu_and_derivative(g[i]);
                        *dv = dy[i] * gelu;
                        *dg = dy[i] * v[i] * derivative;
                    }
                }
                (Some(dv), None) => {
                    for (i, dv) in (start..end).zip(dv.iter_mut()) {
                        *dv = dy[i] * gelu_erf(g[i]);
                    }
                }
                (None, Some(dg)) => {
                    for (i, dg) in (start..end).zip(dg.iter_mut()) {
                        *dg = dy[i] * v[i] * gelu_and_derivative(g[i]).1;
                    }
                }
                (None, None) => {}
            }
        };
        match (self.value_tracked, self.gate_tracked) {
            (true, true) => value_grad
                .par_chunks_mut(CHUNK)
                .zip(gate_grad.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(task, (dv, dg))| fill(task * CHUNK, Some(dv), Some(dg))),
            (true, false) => value_grad
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(task, dv)| fill(task * CHUNK, Some(dv), None)),
            (false, true) => gate_grad
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(task, dg)| fill(task * CHUNK, None, Some(dg))),
            (false, false) => {}
        }
        drop(guards);
        let shape = value.shape();
        let tensor = |data: Vec<f32>| Tensor::from_vec(data, shape, &Device::Cpu);
        Ok((
            self.value_tracked.then(|| tensor(value_grad)).transpose()?,
            self.gate_tracked.then(|| tensor(gate_grad)).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{max_difference, values};
    use super::*;
    use candle_core::Var;

    /// Values, and gradients of both inputs, equal candle's composed `value * gelu_erf(gate)`
    /// (odd sizes, more than one parallel chunk, gates far into both tails).
    #[test]
    fn values_and_gradients_match_candles_ops() {
        let shape = [3, 7, 1201];
        let value = Var::from_tensor(&values(&shape, 1)).expect("value");
        let gate = Var::from_tensor(&(values(&shape, 2) * 6.0).expect("scale")).expect("gate");
        let r = values(&shape, 3);
        let fused = geglu(value.as_tensor(), gate.as_tensor())
            .expect("forward")
            .expect("applies");
        let reference =
            (value.as_tensor() * gate.as_tensor().gelu_erf().expect("gelu")).expect("product");
        assert_eq!(max_difference(&fused, &reference), 0.0, "bit for bit");
        let grads = |y: &Tensor| {
            (y * &r)
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("backward")
        };
        let (fused_grads, reference_grads) = (grads(&fused), grads(&reference));
        for var in [&value, &gate] {
            let a = fused_grads.get(var.as_tensor()).expect("fused gradient");
            let e = reference_grads.get(var.as_tensor()).expect("gradient");
            assert!(max_difference(a, e) < 1e-5, "{}", max_difference(a, e));
        }
    }

    /// Only the tracked input gets a gradient.
    #[test]
    fn an_untracked_input_gets_no_gradient() {
        let value = Var::from_tensor(&values(&[2, 5], 4)).expect("value");
        let gate = values(&[2, 5], 5);
        let y = geglu(value.as_tensor(), &gate)
            .expect("forward")
            .expect("applies");
        let grads = y.sum_all().and_then(|l| l.backward()).expect("backward");
        assert!(grads.get(value.as_tensor()).is_some());
        assert!(grads.get(&gate).is_none());
        let expected = gate.gelu_erf().expect("gelu");
        let got = grads.get(value.as_tensor()).expect("gradient");
        assert_eq!(max_difference(got, &expected), 0.0);
    }
}
