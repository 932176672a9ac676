//! The candle custom-op plumbing shared by the differentiable CPU kernels (convolution,
//! normalisations, attention): a kernel states its forward on its arguments' contiguous f32
//! values (a frozen bf16 weight widened for the call) and its backward on the argument tensors
//! ([`FusedKernel`]); [`Fused`] makes that a `CustomOp2` or `CustomOp3`. A layer over a frozen
//! weight held in bf16 states its forward on the bf16 weight itself and its input's gradient
//! alone ([`FrozenBf16Kernel`], made an op by [`FrozenBf16`]).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu;

/// The gradients of a two-argument op.
pub(super) type Grads2 = (Option<Tensor>, Option<Tensor>);
/// The gradients of a three-argument op.
pub(super) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// A differentiable CPU kernel of `N` f32 arguments.
pub(super) trait FusedKernel<const N: usize> {
    /// [`Grads2`] or [`Grads3`]: one gradient per argument, `None` where none is wanted.
    type Grads;

    /// The op's name in candle's graph.
    fn name(&self) -> &'static str;

    /// The output and its shape, from the arguments' contiguous values; `first` is the first
    /// argument's shape.
    fn forward(&self, args: [&[f32]; N], first: &Shape) -> Result<(CpuStorage, Shape)>;

    /// The arguments' gradients, given the arguments, the result `res` and its gradient.
    fn backward(&self, args: [&Tensor; N], res: &Tensor, grad: &Tensor) -> Result<Self::Grads>;
}

/// A [`FusedKernel`] as a candle custom op (apply it with `apply_op2`/`apply_op3`).
pub(super) struct Fused<K>(pub(super) K);

/// `CustomOp2` and `CustomOp3` differ only in their argument lists: one macro writes both.
macro_rules! impl_custom_op {
    (
        $op:ident,
        $n:literal,
        $grads:ident,
        [$first:ident, $first_layout:ident $(, $arg:ident, $layout:ident)*]
    ) => {
        impl<K: FusedKernel<$n, Grads = $grads>> $op for Fused<K> {
            fn name(&self) -> &'static str {
                self.0.name()
            }

            fn cpu_fwd(
                &self,
                $first: &CpuStorage,
                $first_layout: &Layout,
                $($arg: &CpuStorage, $layout: &Layout),*
            ) -> Result<(CpuStorage, Shape)> {
                let args = [
                    cpu::cpu_storage_slice($first, $first_layout)?,
                    $(cpu::cpu_storage_slice($arg, $layout)?),*
                ];
                self.0.forward(args.each_ref().map(|a| &**a), $first_layout.shape())
            }

            fn bwd(
                &self,
                $first: &Tensor,
                $($arg: &Tensor,)*
                res: &Tensor,
                grad: &Tensor,
            ) -> Result<$grads> {
                self.0.backward([$first, $($arg),*], res, grad)
            }
        }
    };
}

impl_custom_op!(CustomOp2, 2, Grads2, [a, a_layout, b, b_layout]);
impl_custom_op!(
    CustomOp3,
    3,
    Grads3,
    [a, a_layout, b, b_layout, c, c_layout]
);

/// Applies a layer's kernel (see [`impl_weight_bias_kernels`]) to contiguous copies of its
/// input, weight and optional bias.
pub(super) fn apply_weight_bias<K>(
    op: K,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor>
where
    K: Send + Sync + 'static,
    Fused<K>: CustomOp2 + CustomOp3,
{
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(bias) => x.apply_op3(&weight, &bias.contiguous()?, Fused(op)),
        None => x.apply_op2(&weight, Fused(op)),
    }
}

/// The two ops of a layer with a weight and an optional bias (convolution, linear): without a
/// bias a [`FusedKernel<2>`] named `$name`, with one a [`FusedKernel<3>`] named `$name-bias`.
/// The type provides `$forward(x, weight, bias: Option<&[f32]>)` and
/// `gradients(x, weight, grad, has_bias) -> Grads3`.
macro_rules! impl_weight_bias_kernels {
    ($op:ty, $name:literal, $forward:ident) => {
        impl $crate::model::nn::fused_op::FusedKernel<2> for $op {
            type Grads = $crate::model::nn::fused_op::Grads2;

            fn name(&self) -> &'static str {
                $name
            }

            fn forward(
                &self,
                [x, weight]: [&[f32]; 2],
                _: &candle_core::Shape,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.$forward(x, weight, None)
            }

            fn backward(
                &self,
                [x, weight]: [&candle_core::Tensor; 2],
                _: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<Self::Grads> {
                let (input_grad, weight_grad, _) = self.gradients(x, weight, grad, false)?;
                Ok((input_grad, weight_grad))
            }
        }

        impl $crate::model::nn::fused_op::FusedKernel<3> for $op {
            type Grads = $crate::model::nn::fused_op::Grads3;

            fn name(&self) -> &'static str {
                concat!($name, "-bias")
            }

            fn forward(
                &self,
                [x, weight, bias]: [&[f32]; 3],
                _: &candle_core::Shape,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                self.$forward(x, weight, Some(bias))
            }

            fn backward(
                &self,
                [x, weight, _]: [&candle_core::Tensor; 3],
                _: &candle_core::Tensor,
                grad: &candle_core::Tensor,
            ) -> candle_core::Result<Self::Grads> {
                self.gradients(x, weight, grad, true)
            }
        }
    };
}
pub(super) use impl_weight_bias_kernels;

/// A layer (linear, convolution) over a frozen weight held in bf16, on the CPU's bf16 kernels:
/// its forward reads the bf16 weight as it is; its backward gives the input's gradient alone
/// (the weight and the bias are frozen).
pub(super) trait FrozenBf16Kernel {
    /// The op's name in candle's graph.
    fn name(&self) -> &'static str;

    /// The output and its shape from the input's values, the weight's and the bias's.
    fn forward(
        &self,
        x: &[f32],
        weight: &[half::bf16],
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)>;

    /// The input's gradient from the weight and the output's gradient.
    fn input_gradient(&self, weight: &[half::bf16], dy: &[f32]) -> Result<Tensor>;
}

/// A [`FrozenBf16Kernel`] as a candle custom op (`apply_op2` without a bias, `apply_op3` with).
pub(super) struct FrozenBf16<K>(pub(super) K);

impl<K: FrozenBf16Kernel> FrozenBf16<K> {
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let x = cpu::cpu_storage_slice(x.0, x.1)?;
        let Some((start, end)) = w.1.contiguous_offsets() else {
            candle_core::bail!("fused CPU kernel given a non-contiguous weight");
        };
        let weight = &w.0.as_slice::<half::bf16>()?[start..end];
        let bias = bias
            .map(|(b, l)| cpu::cpu_storage_slice(b, l))
            .transpose()?;
        let (out, shape) = self.0.forward(&x, weight, bias.as_deref())?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn input_gradient(&self, weight: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let grad = grad.contiguous()?;
        let (g_storage, g_layout) = grad.storage_and_layout();
        let dy = cpu::contiguous_slice::<f32>(&g_storage, g_layout)?;
        let (w_storage, w_layout) = weight.storage_and_layout();
        let weight = cpu::contiguous_slice::<half::bf16>(&w_storage, w_layout)?;
        self.0.input_gradient(weight, dy)
    }
}

impl<K: FrozenBf16Kernel> CustomOp2 for FrozenBf16<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((x, x_layout), (w, w_layout), None)
    }

    fn bwd(&self, _: &Tensor, weight: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Grads2> {
        Ok((Some(self.input_gradient(weight, grad)?), None))
    }
}

impl<K: FrozenBf16Kernel> CustomOp3 for FrozenBf16<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((x, x_layout), (w, w_layout), Some((b, b_layout)))
    }

    fn bwd(
        &self,
        _: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        Ok((Some(self.input_gradient(weight, grad)?), None, None))
    }
}

/// Applies a [`FrozenBf16Kernel`] to contiguous copies of its input, bf16 weight and bias.
pub(super) fn apply_frozen_bf16<K: FrozenBf16Kernel + Send + Sync + 'static>(
    kernel: K,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(bias) => x.apply_op3(&weight, &bias.contiguous()?, FrozenBf16(kernel)),
        None => x.apply_op2(&weight, FrozenBf16(kernel)),
    }
}
