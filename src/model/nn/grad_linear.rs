//! The differentiable CPU linear layer `y = x Wᵀ (+ b)` as a candle custom op whose backward
//! pass computes only the gradients of the tensors tracked when the forward pass ran:
//! dx = dy · W, dW = dyᵀ · x, db = Σ_rows dy.
//!
//! Why not candle's `matmul` + `broadcast_add`: their backward computes a gradient for both
//! operands whatever they are, and keeps it until `backward()` returns. A frozen layer (every
//! base layer in LoRA training) then costs a weight-sized GEMM and buffer for its weight, and an
//! output-sized buffer for its bias; an untracked input (the text conditioning entering to_k and
//! to_v, the timestep embedding) an input-sized one.

use candle_core::{CpuStorage, DType, Device, Result, Shape, Tensor};

use super::cpu;
use super::fused_op::{FrozenBf16Kernel, Grads3, apply_frozen_bf16, apply_weight_bias};
use super::product::{Product, Threads};

/// `x` [rows, in] times `weight` [out, in] transposed, plus `bias` [out], as a differentiable op,
/// when the kernel applies (CPU, f32, those shapes; a frozen weight may be held in bf16, and is
/// then widened to f32 for each product).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let on_cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if !on_cpu_f32(x) || !usable_weight(weight) || !bias.is_none_or(on_cpu_f32) {
        return Ok(None);
    }
    let (Ok((rows, in_features)), Ok((out_features, weight_in))) = (x.dims2(), weight.dims2())
    else {
        return Ok(None);
    };
    if weight_in != in_features || bias.is_some_and(|b| b.dims() != [out_features]) {
        return Ok(None);
    }
    if weight.dtype() == DType::BF16
        && super::bf16::cpu_bf16_enabled()
        && !bias.is_some_and(Tensor::track_op)
    {
        let op = FrozenBf16Linear {
            rows,
            in_features,
            out_features,
        };
        return apply_frozen_bf16(op, x, weight, bias).map(Some);
    }
    let op = LinearOp {
        rows,
        in_features,
        out_features,
        input_tracked: x.track_op(),
        weight_tracked: weight.track_op(),
        bias_tracked: bias.is_some_and(Tensor::track_op),
    };
    apply_weight_bias(op, x, weight, bias).map(Some)
}

/// Whether the differentiable kernels take `weight`: f32 on the CPU, or a frozen (untracked)
/// bf16 one (LoRA's base in bf16 mixed precision).
pub(super) fn usable_weight(weight: &Tensor) -> bool {
    weight.device().is_cpu()
        && (weight.dtype() == DType::F32 || (weight.dtype() == DType::BF16 && !weight.track_op()))
}

/// The layer's sizes and which inputs need a gradient.
struct LinearOp {
    rows: usize,
    in_features: usize,
    out_features: usize,
    input_tracked: bool,
    weight_tracked: bool,
    bias_tracked: bool,
}

impl LinearOp {
    fn forward_values(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, n_in, n_out) = (self.rows, self.in_features, self.out_features);
        // Each row starts as the bias and the product is added onto it (in the GEMM: no
        // element loop of this crate, which a debug build leaves unoptimised).
        let mut y = match bias {
            Some(bias) => bias.repeat(rows),
            None => vec![0f32; rows * n_out],
        };
        // y [rows, out] (+)= x [rows, in] · Wᵀ [in, out] (W read with its strides swapped).
        Product::new(rows, n_out, n_in, (n_out, 1), (n_in, 1), (1, n_in)).run(
            &mut y,
            x,
            weight,
            1.0,
            bias.is_some(),
            Threads::All,
        )?;
        Ok((CpuStorage::F32(y), Shape::from((rows, n_out))))
    }

    fn gradients(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
        has_bias: bool,
    ) -> Result<Grads3> {
        let (rows, n_in, n_out) = (self.rows, self.in_features, self.out_features);
        let grad = grad.contiguous()?;
        let (g_storage, g_layout) = grad.storage_and_layout();
        let dy = cpu::contiguous_slice::<f32>(&g_storage, g_layout)?;
        let input_grad = if self.input_tracked {
            let (w_storage, w_layout) = weight.storage_and_layout();
            let w = cpu::contiguous_f32(&w_storage, w_layout)?;
            let mut dx = vec![0f32; rows * n_in];
            // dx [rows, in] = dy [rows, out] · W [out, in].
            Product::new(rows, n_in, n_out, (n_in, 1), (n_out, 1), (n_in, 1)).run(
                &mut dx,
                dy,
                &w,
                1.0,
                false,
                Threads::All,
            )?;
            Some(Tensor::from_vec(dx, (rows, n_in), &Device::Cpu)?)
        } else {
            None
        };
        let weight_grad = if self.weight_tracked {
            let (x_storage, x_layout) = x.storage_and_layout();
            let x = cpu::contiguous_slice::<f32>(&x_storage, x_layout)?;
            let mut dw = vec![0f32; n_out * n_in];
            // dW [out, in] = dyᵀ [out, rows] · x [rows, in].
            Product::new(n_out, n_in, rows, (n_in, 1), (1, n_out), (n_in, 1)).run(
                &mut dw,
                dy,
                x,
                1.0,
                false,
                Threads::All,
            )?;
            Some(Tensor::from_vec(dw, (n_out, n_in), &Device::Cpu)?)
        } else {
            None
        };
        let bias_grad = if has_bias && self.bias_tracked {
            // db [1, out] = 1 [1, rows] · dy [rows, out].
            let ones = vec![1f32; rows];
            let mut db = vec![0f32; n_out];
            Product::new(1, n_out, rows, (n_out, 1), (rows, 1), (n_out, 1)).run(
                &mut db,
                &ones,
                dy,
                1.0,
                false,
                Threads::All,
            )?;
            Some(Tensor::from_vec(db, n_out, &Device::Cpu)?)
        } else {
            None
        };
        Ok((input_grad, weight_grad, bias_grad))
    }
}

super::fused_op::impl_weight_bias_kernels!(LinearOp, "fused-linear", forward_values);

/// The linear layer over a frozen weight held in bf16 (LoRA's base in bf16 mixed precision, on
/// a CPU with avx512_bf16): both of its products on the bf16 kernels
/// ([`super::bf16::FrozenBf16Products`]), the input's gradient alone in the backward pass.
struct FrozenBf16Linear {
    rows: usize,
    in_features: usize,
    out_features: usize,
}

impl FrozenBf16Kernel for FrozenBf16Linear {
    fn name(&self) -> &'static str {
        "frozen-bf16-linear"
    }

    fn forward(
        &self,
        x: &[f32],
        weight: &[half::bf16],
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)> {
        let mut y = match bias {
            Some(bias) => bias.repeat(self.rows),
            None => vec![0f32; self.rows * self.out_features],
        };
        self.products(weight).forward(&mut y, x, bias.is_some())?;
        Ok((y, Shape::from((self.rows, self.out_features))))
    }

    fn input_gradient(&self, weight: &[half::bf16], dy: &[f32]) -> Result<Tensor> {
        let dx = self.products(weight).input_gradient(dy)?;
        Tensor::from_vec(dx, (self.rows, self.in_features), &Device::Cpu)
    }
}

impl FrozenBf16Linear {
    fn products<'a>(&self, w: &'a [half::bf16]) -> super::bf16::FrozenBf16Products<'a> {
        super::bf16::FrozenBf16Products {
            w,
            rows: self.rows,
            in_features: self.in_features,
            out_features: self.out_features,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_values::{max_difference, values, weighted_sum_gradients};
    use super::*;
    use candle_core::Var;

    /// candle's composed layer: what the op must compute.
    fn composed(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.matmul(&w.t().expect("t"))
            .and_then(|y| y.broadcast_add(b))
            .expect("composed")
    }

    #[test]
    fn values_and_gradients_match_candles_matmul() {
        let x = Var::from_tensor(&values(&[5, 7], 1)).expect("x");
        let w = Var::from_tensor(&values(&[3, 7], 2)).expect("w");
        let b = Var::from_tensor(&values(&[3], 3)).expect("b");
        let r = values(&[5, 3], 4);
        let fused = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()))
            .expect("forward")
            .expect("applies");
        let reference = composed(x.as_tensor(), w.as_tensor(), b.as_tensor());
        assert!(max_difference(&fused, &reference) < 1e-6);
        let (fused_grads, reference_grads) = (
            weighted_sum_gradients(&fused, &r),
            weighted_sum_gradients(&reference, &r),
        );
        for var in [&x, &w, &b] {
            let a = fused_grads.get(var.as_tensor()).expect("fused gradient");
            let e = reference_grads.get(var.as_tensor()).expect("gradient");
            assert!(max_difference(a, e) < 1e-5);
        }
    }

    #[test]
    fn a_frozen_weight_and_bias_get_no_gradient_buffer() {
        // x tracked, the layer frozen (LoRA's base layers): backward leaves gradients for x
        // alone. candle's matmul + broadcast_add also leave one for Wᵀ and for the broadcast bias.
        let x = Var::from_tensor(&values(&[5, 7], 1)).expect("x");
        let (w, b) = (values(&[3, 7], 2), values(&[3], 3));
        let loss = |y: Tensor| y.sum_all().and_then(|l| l.backward()).expect("backward");
        let fused = loss(
            linear(x.as_tensor(), &w, Some(&b))
                .expect("forward")
                .expect("applies"),
        );
        let ids: Vec<_> = fused.get_ids().copied().collect();
        assert_eq!(ids, [x.as_tensor().id()]);
        let reference = loss(composed(x.as_tensor(), &w, &b));
        assert_eq!(reference.get_ids().count(), 3);
        let dx = fused.get(x.as_tensor()).expect("dx");
        let expected = reference.get(x.as_tensor()).expect("dx");
        assert!(max_difference(dx, expected) < 1e-5);

        // The reverse: an untracked input into a trained layer (the text conditioning into a
        // cross-attention's to_k) gets no gradient buffer either.
        let x = values(&[5, 7], 1);
        let w = Var::from_tensor(&values(&[3, 7], 2)).expect("w");
        let grads = loss(
            linear(&x, w.as_tensor(), None)
                .expect("forward")
                .expect("applies"),
        );
        let ids: Vec<_> = grads.get_ids().copied().collect();
        assert_eq!(ids, [w.as_tensor().id()]);
    }

    /// On a CPU with avx512_bf16 a frozen bf16 weight's products run the bf16 kernels: the
    /// forward pass equals the inference kernel's, and the input's gradient is the float32 one
    /// to bf16's rounding of the output gradient (8 bits of mantissa).
    #[test]
    fn a_frozen_bf16_weight_runs_the_bf16_kernels_where_the_cpu_has_them() {
        if !super::super::bf16::cpu_bf16_enabled() {
            return;
        }
        let x = Var::from_tensor(&values(&[37, 70], 1)).expect("x");
        let held = values(&[45, 70], 2).to_dtype(DType::BF16).expect("bf16");
        let b = values(&[45], 3);
        let y = linear(x.as_tensor(), &held, Some(&b))
            .expect("forward")
            .expect("applies");
        let inference = super::super::bf16::linear(&x.as_tensor().detach(), &held, Some(&b))
            .expect("inference")
            .expect("applies");
        assert_eq!(max_difference(&y, &inference), 0.0);
        let r = values(&[37, 45], 4);
        let dx = weighted_sum_gradients(&y, &r)
            .get(x.as_tensor())
            .expect("dx")
            .clone();
        let widened = held.to_dtype(DType::F32).expect("f32");
        let expected = r.matmul(&widened).expect("dy · W");
        let scale = expected
            .abs()
            .and_then(|e| e.max_all())
            .and_then(|e| e.to_scalar::<f32>())
            .expect("scale");
        assert!(max_difference(&dx, &expected) <= 1e-2 * scale);
    }

    /// A frozen weight held in bf16 is widened to float32 for its products where the bf16
    /// kernels do not run it (here: a trained bias beside it; likewise a CPU without
    /// avx512_bf16): the same values and gradients as its values in f32, none for the weight; a
    /// tracked bf16 weight is not the kernel's (candle's ops take it).
    #[test]
    fn a_frozen_bf16_weight_computes_as_its_f32_values() {
        let x = Var::from_tensor(&values(&[5, 7], 1)).expect("x");
        let held = values(&[3, 7], 2).to_dtype(DType::BF16).expect("bf16");
        let widened = held.to_dtype(DType::F32).expect("f32");
        let b = Var::from_tensor(&values(&[3], 3)).expect("b");
        let run = |w: &Tensor| {
            let y = linear(x.as_tensor(), w, Some(b.as_tensor()))
                .expect("forward")
                .expect("applies");
            let grads = y.sum_all().and_then(|l| l.backward()).expect("backward");
            assert!(grads.get(w).is_none());
            let dx = grads.get(x.as_tensor()).expect("dx").clone();
            let db = grads.get(b.as_tensor()).expect("db").clone();
            (y, dx, db)
        };
        let (y_held, dx_held, db_held) = run(&held);
        let (y_f32, dx_f32, db_f32) = run(&widened);
        assert_eq!(max_difference(&y_held, &y_f32), 0.0);
        assert_eq!(max_difference(&dx_held, &dx_f32), 0.0);
        assert_eq!(max_difference(&db_held, &db_f32), 0.0);
        let trained = Var::from_tensor(&held).expect("var");
        assert!(
            linear(x.as_tensor(), trained.as_tensor(), None)
                .expect("checked")
                .is_none()
        );
    }
}
