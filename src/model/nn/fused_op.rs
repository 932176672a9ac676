//! The candle custom-op plumbing shared by the differentiable CPU kernels (convolution,
//! normalisations, attention): a kernel states its forward on its arguments' contiguous f32
//! values (a frozen bf16 weight widened for the call) and its backward on the argument tensors
//! ([`FusedKernel`]); [`Fused`] makes that a `CustomOp2` or `CustomOp3`.

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
