//! The candle custom-op plumbing shared by the differentiable CPU kernels (convolution,
//! normalisations, attention): a kernel states its forward on its arguments' contiguous f32
//! values and its backward on the argument tensors ([`FusedKernel`]); [`Fused`] makes that a
//! `CustomOp2` or `CustomOp3`.

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

impl<K: FusedKernel<2, Grads = Grads2>> CustomOp2 for Fused<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = [
            cpu::cpu_storage_slice(a, a_layout)?,
            cpu::cpu_storage_slice(b, b_layout)?,
        ];
        self.0.forward(args, a_layout.shape())
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Grads2> {
        self.0.backward([a, b], res, grad)
    }
}

impl<K: FusedKernel<3, Grads = Grads3>> CustomOp3 for Fused<K> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
        c: &CpuStorage,
        c_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = [
            cpu::cpu_storage_slice(a, a_layout)?,
            cpu::cpu_storage_slice(b, b_layout)?,
            cpu::cpu_storage_slice(c, c_layout)?,
        ];
        self.0.forward(args, a_layout.shape())
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        self.0.backward([a, b, c], res, grad)
    }
}
