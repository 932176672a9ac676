//! Gradient checkpointing: a segment of a network (a resnet, a transformer...) runs forward
//! without keeping its insides for the backward pass; the backward pass recomputes it from its
//! saved inputs, one segment at a time, and releases it again.
//!
//! candle has no helper for this, so [`checkpoint`] builds one from a custom op:
//! - forward: the segment runs on detached copies of its inputs, and only its output is kept
//!   (the graph it built is dropped at once). The custom op's forward returns a copy of that
//!   output, on whatever device it lives (no device-specific kernel).
//! - backward (candle calls a custom op's `bwd` once per backward pass): the segment runs again
//!   on fresh variables holding the saved inputs, `(output · grad_output).sum()` is
//!   differentiated, the inputs' gradients go back to the outer graph, and the gradients of
//!   every variable inside the segment (the weights, which the outer graph never sees through the
//!   op) are added to a shared [`SegmentGradients`] store. Whoever runs the outer `backward()`
//!   merges that store with the outer gradients (the trainer does).
//!
//! A custom op takes at most three tensors, so a segment has at most three inputs. Inputs that
//! need no gradient are kept aside rather than passed to the op; a segment whose inputs need no
//! gradient but whose weights do is tied into the graph through one of its own variables (the
//! "anchor"), whose gradient then flows through the op instead of the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape,
    Storage, Tensor, TensorId, Var,
};

/// The gradients of the variables inside checkpointed segments, produced while a backward pass
/// runs. Clones share the same store.
#[derive(Debug, Clone, Default)]
pub struct SegmentGradients {
    store: Arc<Mutex<HashMap<TensorId, Tensor>>>,
}

impl SegmentGradients {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes every gradient gathered so far (by variable id), leaving the store empty.
    pub fn take(&self) -> HashMap<TensorId, Tensor> {
        std::mem::take(&mut *self.lock())
    }

    /// Drops whatever a failed or abandoned backward pass left.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Whether no gradient is stored.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Adds `grad` to the gradient of variable `id`.
    fn add(&self, id: TensorId, grad: Tensor) -> Result<()> {
        let mut store = self.lock();
        let sum = match store.remove(&id) {
            Some(previous) => (previous + grad)?.detach(),
            None => grad,
        };
        store.insert(id, sum);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>> {
        // A panic while holding the lock leaves a map that is still valid: keep using it.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A segment's forward computation: its inputs in, its output out.
type SegmentFn = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// Runs `segment` on `inputs` (one to three tensors) as a checkpoint segment: the result has the
/// value `segment(inputs)` and the same gradients, but the outer graph keeps only the inputs,
/// not the segment's intermediate tensors. Parameter gradients of the segment land in `grads`.
///
/// When nothing in the segment needs a gradient (inference), it simply runs.
pub fn checkpoint<F>(inputs: &[&Tensor], grads: &SegmentGradients, segment: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Result<Tensor> + Send + Sync + 'static,
{
    if inputs.is_empty() || inputs.len() > 3 {
        candle_core::bail!(
            "a checkpoint segment takes one to three inputs, got {}",
            inputs.len()
        );
    }
    let saved: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let output = segment(&saved)?;
    let tracked: Vec<usize> = (0..inputs.len())
        .filter(|&i| inputs[i].track_op())
        .collect();
    if tracked.is_empty() && !output.track_op() {
        return Ok(output);
    }
    // No input carries a gradient, but the segment's own variables do: one of them becomes the
    // op's argument so that the op is part of the graph and its backward runs.
    let anchor = if tracked.is_empty() {
        output
            .sorted_nodes()
            .into_iter()
            .find(|node| node.is_variable())
            .cloned()
    } else {
        None
    };
    let value = output.detach();
    // Dropping the output drops the graph the forward built: the segment's insides go here.
    drop(output);
    let mut args: Vec<Tensor> = tracked.iter().map(|&i| inputs[i].clone()).collect();
    if let Some(anchor) = &anchor {
        args.push(anchor.clone());
    }
    let op = Segment {
        forward: Box::new(segment),
        saved,
        tracked,
        anchor: anchor.map(|a| a.id()),
        value: Mutex::new(Some(value)),
        grads: grads.clone(),
    };
    match args.as_slice() {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        // `tracked` is non-empty or the anchor exists (the output tracks, so some variable does).
        _ => candle_core::bail!("checkpoint segment without a differentiable argument"),
    }
}

/// The custom op of one segment.
struct Segment {
    forward: Box<SegmentFn>,
    /// Every input, detached (shares storage with the outer graph's tensors).
    saved: Vec<Tensor>,
    /// Indices into `saved` of the inputs passed to the op (those needing a gradient).
    tracked: Vec<usize>,
    /// The variable passed as the op's only argument when no input needs a gradient.
    anchor: Option<TensorId>,
    /// The forward's output until the op's forward hands out its copy.
    value: Mutex<Option<Tensor>>,
    grads: SegmentGradients,
}

/// A fresh contiguous copy of `layout`'s elements of `storage`, on its device.
fn copy_of<S>(storage: &S, layout: &Layout) -> Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element of the new buffer is written by the strided copy below.
    let mut out = unsafe {
        storage
            .device()
            .alloc_uninit(layout.shape(), storage.dtype())?
    };
    storage.copy_strided_src(&mut out, 0, layout)?;
    Ok(out)
}

impl Segment {
    /// The op's forward on any device: a copy of the output computed in [`checkpoint`].
    fn output<S>(&self, pick: impl FnOnce(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let value = self
            .value
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpoint segment ran twice".into()))?;
        let (storage, layout) = value.storage_and_layout();
        let Some(storage) = pick(&storage) else {
            candle_core::bail!("checkpoint segment: the output is on another device")
        };
        Ok((copy_of(storage, layout)?, layout.shape().clone()))
    }

    /// Recomputes the segment with gradients; returns the gradient of each op argument (the
    /// tracked inputs, or the anchor) and stores the other variables' gradients.
    fn backward(&self, grad_output: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let mut input_vars = Vec::with_capacity(self.tracked.len());
        let mut inputs = self.saved.clone();
        for &i in &self.tracked {
            let var = Var::from_tensor(&self.saved[i])?;
            inputs[i] = var.as_tensor().clone();
            input_vars.push(var);
        }
        let output = (self.forward)(&inputs)?;
        let dot = (output * grad_output.detach())?.sum_all()?;
        let grads = dot.backward()?;
        let gradient_of = |t: &Tensor| -> Result<Tensor> {
            match grads.get(t) {
                Some(g) => Ok(g.detach()),
                None => t.zeros_like(),
            }
        };
        let mut arg_grads = Vec::with_capacity(self.tracked.len() + 1);
        for var in &input_vars {
            arg_grads.push(Some(gradient_of(var.as_tensor())?));
        }
        let input_ids: Vec<TensorId> = input_vars.iter().map(|v| v.as_tensor().id()).collect();
        for node in dot.sorted_nodes() {
            if !node.is_variable() || input_ids.contains(&node.id()) {
                continue;
            }
            if Some(node.id()) == self.anchor {
                arg_grads.push(Some(gradient_of(node)?));
            } else if let Some(grad) = grads.get(node) {
                self.grads.add(node.id(), grad.detach())?;
            }
        }
        Ok(arg_grads)
    }
}

const NAME: &str = "checkpoint-segment";

/// The op of each arity (one to three arguments) does the same: its forward hands out the stored
/// output whatever the arguments, its backward the gradients from [`Segment::backward`] in
/// argument order. Only the argument lists differ, so one macro writes the three impls; `$take`
/// builds the `bwd` result from the gradient iterator `$grads`.
macro_rules! impl_segment_op {
    (
        $op:ident,
        [$(($storage:ident, $layout:ident, $arg:ident)),+],
        $result:ty,
        |$grads:ident| $take:expr
    ) => {
        impl $op for Segment {
            fn name(&self) -> &'static str {
                NAME
            }

            impl_segment_op!(@fwd cpu_fwd, Cpu, CpuStorage, [$($storage, $layout),+]);
            impl_segment_op!(@fwd cuda_fwd, Cuda, CudaStorage, [$($storage, $layout),+]);
            impl_segment_op!(@fwd metal_fwd, Metal, MetalStorage, [$($storage, $layout),+]);

            fn bwd(
                &self,
                $($arg: &Tensor,)+
                _res: &Tensor,
                grad_res: &Tensor,
            ) -> Result<$result> {
                let mut $grads = self.backward(grad_res)?.into_iter();
                Ok($take)
            }
        }
    };
    // A device's forward: the stored output, taken from that device's storage.
    (@fwd $fwd:ident, $device:ident, $storage_type:ident, [$($storage:ident, $layout:ident),+]) => {
        fn $fwd(
            &self,
            $($storage: &$storage_type, $layout: &Layout),+
        ) -> Result<($storage_type, Shape)> {
            self.output(|s| match s {
                Storage::$device(s) => Some(s),
                _ => None,
            })
        }
    };
}

impl_segment_op!(CustomOp1, [(_s1, _l1, _a1)], Option<Tensor>, |grads| grads
    .next()
    .flatten());
impl_segment_op!(
    CustomOp2,
    [(_s1, _l1, _a1), (_s2, _l2, _a2)],
    (Option<Tensor>, Option<Tensor>),
    |grads| (grads.next().flatten(), grads.next().flatten())
);
impl_segment_op!(
    CustomOp3,
    [(_s1, _l1, _a1), (_s2, _l2, _a2), (_s3, _l3, _a3)],
    (Option<Tensor>, Option<Tensor>, Option<Tensor>),
    |grads| (
        grads.next().flatten(),
        grads.next().flatten(),
        grads.next().flatten()
    )
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    /// The weights of a two-layer segment 4 → 6 → 3, as variables.
    fn two_layer_weights(device: &Device) -> (Var, Var) {
        let w1 = Var::randn(0f32, 0.5, (6, 4), device).unwrap();
        let w2 = Var::randn(0f32, 0.5, (3, 6), device).unwrap();
        (w1, w2)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f32>().unwrap()
    }

    /// A two-layer segment `tanh(x W1ᵀ) W2ᵀ + c` with weights as variables: its gradients with
    /// and without checkpointing agree, for the input, the side input and both weights.
    #[test]
    fn checkpointed_segment_has_the_same_gradients() {
        let device = Device::Cpu;
        let (w1, w2) = two_layer_weights(&device);
        let x = Var::randn(0f32, 1., (5, 4), &device).unwrap();
        let c = Var::randn(0f32, 1., (5, 3), &device).unwrap();
        let weights = (w1.as_tensor().clone(), w2.as_tensor().clone());
        let segment = move |i: &[Tensor]| -> Result<Tensor> {
            let l1 = candle_nn::Linear::new(weights.0.clone(), None);
            let l2 = candle_nn::Linear::new(weights.1.clone(), None);
            l2.forward(&l1.forward(&i[0])?.tanh()?)? + &i[1]
        };
        let target = Tensor::randn(0f32, 1., (5, 3), &device).unwrap();
        let loss = |out: Tensor| (out - &target).unwrap().sqr().unwrap().sum_all().unwrap();

        let plain = loss(segment(&[x.as_tensor().clone(), c.as_tensor().clone()]).unwrap());
        let plain_grads = plain.backward().unwrap();

        let store = SegmentGradients::new();
        let out = checkpoint(&[x.as_tensor(), c.as_tensor()], &store, segment).unwrap();
        let checkpointed = loss(out);
        let diff =
            (checkpointed.to_scalar::<f32>().unwrap() - plain.to_scalar::<f32>().unwrap()).abs();
        assert!(diff < 1e-5, "{diff}");
        let outer = checkpointed.backward().unwrap();
        let mut inner = store.take();
        // The outer graph sees the inputs, the store the weights.
        for var in [&x, &c] {
            let a = plain_grads.get(var.as_tensor()).unwrap();
            let b = outer.get(var.as_tensor()).unwrap();
            assert!(max_abs_diff(a, b) < 1e-5);
        }
        for var in [&w1, &w2] {
            assert!(outer.get(var.as_tensor()).is_none());
            let a = plain_grads.get(var.as_tensor()).unwrap();
            let b = inner.remove(&var.as_tensor().id()).unwrap();
            assert!(max_abs_diff(a, &b) < 1e-5);
        }
        assert!(inner.is_empty());
    }

    /// Inputs without gradient but trainable weights inside: the weights still get gradients,
    /// one through the op (the anchor), the other through the store.
    #[test]
    fn segment_with_frozen_inputs_still_trains_its_weights() {
        let device = Device::Cpu;
        let (w1, w2) = two_layer_weights(&device);
        let x = Tensor::randn(0f32, 1., (5, 4), &device).unwrap();
        let weights = (w1.as_tensor().clone(), w2.as_tensor().clone());
        let segment = move |i: &[Tensor]| -> Result<Tensor> {
            i[0].matmul(&weights.0.t()?)?
                .tanh()?
                .matmul(&weights.1.t()?)
        };
        let plain = segment(std::slice::from_ref(&x))
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let plain_grads = plain.backward().unwrap();
        let store = SegmentGradients::new();
        let loss = checkpoint(&[&x], &store, segment)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let outer = loss.backward().unwrap();
        let mut inner = store.take();
        for var in [&w1, &w2] {
            let got = match outer.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => inner.remove(&var.as_tensor().id()).unwrap(),
            };
            let a = plain_grads.get(var.as_tensor()).unwrap();
            assert!(max_abs_diff(a, &got) < 1e-5);
        }
    }

    /// Frozen weights, an input that needs a gradient: the forward on the detached input builds
    /// no graph, yet the gradient must still reach the input.
    #[test]
    fn gradient_reaches_the_input_through_frozen_weights() {
        let device = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (3, 4), &device).unwrap();
        let x = Var::randn(0f32, 1., (5, 4), &device).unwrap();
        let segment = move |i: &[Tensor]| i[0].matmul(&w.t()?)?.tanh();
        let plain = segment(&[x.as_tensor().clone()])
            .unwrap()
            .sum_all()
            .unwrap();
        let expected = plain.backward().unwrap();
        let store = SegmentGradients::new();
        let out = checkpoint(&[x.as_tensor()], &store, segment).unwrap();
        assert!(out.track_op());
        let grads = out.sum_all().unwrap().backward().unwrap();
        let a = expected.get(x.as_tensor()).unwrap();
        let b = grads.get(x.as_tensor()).unwrap();
        assert!(max_abs_diff(a, b) < 1e-6);
        assert!(store.is_empty());
    }

    #[test]
    fn untracked_segment_just_runs() {
        let x = Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let store = SegmentGradients::new();
        let out = checkpoint(&[&x], &store, |i| i[0].affine(2.0, 1.0)).unwrap();
        assert!(!out.track_op());
        assert_eq!(out.to_vec2::<f32>().unwrap(), vec![vec![3.0; 2]; 2]);
    }
}
