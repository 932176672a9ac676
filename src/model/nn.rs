//! Building blocks shared by the networks (CLIP text encoder, VAE, UNet), loaded by diffusers'
//! weight names through a `VarBuilder`.
//!
//! Everything here must stay differentiable so the same modules can train: candle-nn's fused
//! `softmax_last_dim` and `layer_norm` have no backward pass, so they are used only when the input
//! is not part of a tracked graph, and the slower composed ops otherwise.
//!
//! On the CPU in float32, fused kernels replace candle's ops (see [`set_fast_cpu_kernels`]):
//! inference runs those of `nn/cpu.rs` (convolution as im2col + GEMM, group norm, blocked
//! attention), and anything tracked for a backward pass runs their differentiable versions,
//! candle custom ops with fused backward passes (`nn/grad_conv.rs`, `nn/grad_norm.rs` with the
//! layer norm too, `nn/grad_attention.rs`, and the linear layer, `nn/grad_linear.rs`, whose
//! backward skips the frozen weights' gradients that candle's matmul would compute). Sums and
//! concatenations where a tracked tensor meets an untracked one ([`add`], [`cat_pair`]) give the
//! untracked side no gradient buffer (`nn/grad_join.rs`). Other devices and dtypes run candle's
//! ops.
//!
//! A model loaded for bfloat16 on the CPU ([`with_bf16_products`]) holds its convolution and
//! linear weights in bf16 and its activations in float32: those layers and the attention then
//! run the bf16 products of `nn/bf16.rs`.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use switch::KernelSwitch;

mod bf16;
mod cpu;
mod fused_op;
mod grad_attention;
mod grad_conv;
mod grad_geglu;
mod grad_join;
mod grad_linear;
mod grad_norm;
mod product;
mod switch;
#[cfg(test)]
mod test_values;
mod values;

pub use bf16::{
    CPU_BF16_VAR, cpu_bf16_allowed, cpu_bf16_enabled, cpu_has_bf16_instructions, with_bf16_products,
};

/// A matrix-product weight (linear or convolution) as the current load wants it: converted to
/// bf16 inside [`with_bf16_products`], unchanged otherwise. For loaders that build a
/// [`Linear`] or [`Conv2d`] from a weight they read themselves.
pub fn product_weight(weight: Tensor) -> Result<Tensor> {
    bf16::product_weight(weight)
}

/// A fully connected layer, `y = x Wᵀ + b`, for inputs of any rank (the last dim is the feature),
/// with an optional low-rank adapter added to its output (LoRA, see [`LowRankAdapter`]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A LoRA adapter whose output is added to the layer's; `None` (the default) leaves the
    /// layer exactly as loaded, at no cost.
    pub adapter: Option<LowRankAdapter>,
}

/// A LoRA adapter on a [`Linear`] layer, as peft's `lora.Linear` computes it:
/// `y = W x + b + scale · B (A x)`, with `down` = A [rank, in] and `up` = B [out, rank].
///
/// The tensors are shared, not copied: when they are a `Var`'s tensors, an optimizer's update of
/// the `Var` is what the next forward pass uses.
#[derive(Debug, Clone)]
pub struct LowRankAdapter {
    /// `lora_A.weight` [rank, in_features].
    pub down: Tensor,
    /// `lora_B.weight` [out_features, rank].
    pub up: Tensor,
    /// `lora_alpha / rank`.
    pub scale: f64,
}

impl LowRankAdapter {
    /// The adapter's contribution `scale · B (A x)` for `x` [rows, in_features].
    fn forward_flat(&self, x: &Tensor) -> Result<Tensor> {
        // Mixed precision: the float32 adapter runs in the activations' dtype, through a cast
        // whose backward brings the gradient back to float32.
        let (down, up) = if x.dtype() == self.down.dtype() {
            (self.down.clone(), self.up.clone())
        } else {
            (self.down.to_dtype(x.dtype())?, self.up.to_dtype(x.dtype())?)
        };
        let low = linear_product(x, &down, None)?;
        let out = linear_product(&low, &up, None)?;
        // peft multiplies after B; a scale of exactly 1 skips the pass (x·1 is x anyway).
        if self.scale == 1.0 {
            Ok(out)
        } else {
            out * self.scale
        }
    }
}

impl Linear {
    /// A layer from its weight `[out, in]` and optional bias `[out]`, without adapter.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapter: None,
        }
    }

    /// Loads `weight` (`[out, in]`) and, when `bias` is set, `bias` (`[out]`).
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = product_weight(vb.get((out_features, in_features), "weight")?)?;
        let bias = if bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// Whether the layer's weight is held in bf16 for the CPU's bf16 products (a model loaded
    /// inside [`with_bf16_products`]).
    pub fn uses_bf16_products(&self) -> bool {
        self.weight.dtype() == DType::BF16 && self.weight.device().is_cpu()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_features = x.dim(D::Minus1)?;
        let mut out_dims = x.dims().to_vec();
        let out_features = self.weight.dim(0)?;
        *out_dims.last_mut().expect("rank >= 1") = out_features;
        let flat = x.reshape(((), in_features))?;
        let y = linear_product(&flat, &self.weight, self.bias.as_ref())?;
        let y = match &self.adapter {
            Some(adapter) => add(&y, &adapter.forward_flat(&flat)?)?,
            None => y,
        };
        y.reshape(out_dims)
    }
}

/// `x` [rows, in] · `weight` [out, in]ᵀ (+ `bias` [out]): when something is tracked, the
/// differentiable kernel whose backward computes only the gradients that are needed (see
/// `nn/grad_linear.rs`); when nothing is, the bf16 kernels for a bf16 weight and the same
/// float32 product as the differentiable kernel's; candle's matrix product where neither
/// applies.
fn linear_product(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut tensors = vec![x, weight];
    tensors.extend(bias);
    match kernel_choice(&tensors) {
        KernelChoice::Differentiable => {
            if let Some(y) = grad_linear::linear(x, weight, bias)? {
                return Ok(y);
            }
        }
        KernelChoice::Inference => {
            if let Some(y) = bf16::linear(x, weight, bias)? {
                return Ok(y);
            }
            // float32: the same threaded product as in training (candle's matmul of a
            // transposed weight ran the text encoder's layers at a fifth of the speed).
            if let Some(y) = grad_linear::linear(x, weight, bias)? {
                return Ok(y);
            }
        }
        KernelChoice::Candle => {}
    }
    // A bf16 weight meeting float32 activations (the bf16 kernels off): float32 products.
    let weight = if weight.dtype() != x.dtype() {
        &weight.to_dtype(x.dtype())?
    } else {
        weight
    };
    let y = x.matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// `a + b`, with `b` broadcast to `a`'s shape when needed (candle's `broadcast_add`). Where a
/// tracked tensor meets an untracked one, the untracked side gets no gradient buffer in the
/// backward pass (see `nn/grad_join.rs`): residual connections and timestep embeddings at the
/// edge of a LoRA graph.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fast_cpu_kernels() {
        let joined = match (needs_backward(a), needs_backward(b)) {
            (true, false) => grad_join::add(a, b)?,
            // f32 addition commutes exactly: b + a is a + b.
            (false, true) => grad_join::add(b, a)?,
            _ => None,
        };
        if let Some(y) = joined {
            return Ok(y);
        }
    }
    a.broadcast_add(b)
}

/// `cat([a, b], dim)`; where one side is tracked and the other not, the untracked side gets no
/// gradient buffer in the backward pass (skip connections from before a LoRA graph's start).
pub fn cat_pair(a: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    if fast_cpu_kernels() {
        let joined = match (needs_backward(a), needs_backward(b)) {
            (true, false) => grad_join::cat(a, b, false, dim)?,
            (false, true) => grad_join::cat(b, a, true, dim)?,
            _ => None,
        };
        if let Some(y) = joined {
            return Ok(y);
        }
    }
    Tensor::cat(&[a, b], dim)
}

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernel_choice(&[x, &self.weight, &self.bias]) == KernelChoice::Differentiable
            && let Some(y) = grad_norm::layer_norm(x, &self.weight, &self.bias, self.eps)?
        {
            return Ok(y);
        }
        self.forward_candle(x)
    }
}

impl LayerNorm {
    /// candle's layer norm: the composed (differentiable) ops when anything is tracked, else
    /// candle-nn's fused kernel. The reference the fused kernels are tested against.
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        if needs_backward(x) || needs_backward(&self.weight) || needs_backward(&self.bias) {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
        }
    }
}

/// Group normalisation over [B, C, ...] (diffusers' `nn.GroupNorm` with an affine transform).
///
/// candle-nn's version is composed of differentiable ops (about eight passes over the tensor,
/// each on one thread); when no gradient is needed on the CPU, a fused multi-threaded kernel
/// computes the same thing in two passes.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    composed: candle_nn::GroupNorm,
}

impl GroupNorm {
    /// A group norm from its per-channel `weight` and `bias` `[channels]`.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dims1()?;
        let composed =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            composed,
        })
    }

    /// The per-channel scale `[channels]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The per-channel shift `[channels]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// candle-nn's composed (differentiable) group norm, whatever the input: the reference the
    /// fused kernel is tested and benchmarked against.
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        self.composed.forward(x)
    }
}

impl GroupNorm {
    /// `silu(self.forward(x))`, fused into the group norm's single output pass when the CPU
    /// kernel applies (no separate single-threaded SiLU pass nor intermediate tensor).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_fused(x, true)? {
            return Ok(y);
        }
        self.composed.forward(x)?.silu()
    }

    /// The fused kernel's group norm (+ SiLU), when one applies.
    fn forward_fused(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        let (w, b, groups, eps) = (&self.weight, &self.bias, self.groups, self.eps);
        match kernel_choice(&[x, w, b]) {
            KernelChoice::Candle => Ok(None),
            KernelChoice::Inference => cpu::group_norm(x, w, b, groups, eps, silu),
            KernelChoice::Differentiable => grad_norm::group_norm(x, w, b, groups, eps, silu),
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_fused(x, false)? {
            return Ok(y);
        }
        self.composed.forward(x)
    }
}

/// Loads a group norm's `weight` and `bias` `[channels]` (1 and 0 in a fresh `VarMap`, as torch
/// initialises them).
pub fn group_norm(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    GroupNorm::new(weight, bias, groups, eps)
}

/// A 2-D convolution with bias (diffusers' `nn.Conv2d`), weight [out, in, k, k].
///
/// On the CPU, the forward pass is an im2col into contiguous column blocks, each followed by
/// one large multi-threaded GEMM (bias fused in), instead of candle's tiled convolution, which
/// runs many small GEMMs; when tracked (float32), its backward pass is built of the same blocks.
/// Elsewhere it is candle's (differentiable) `conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    /// A convolution from its weight `[out, in / groups, k_h, k_w]`, optional bias `[out]` and
    /// configuration.
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: candle_nn::Conv2dConfig) -> Self {
        Self {
            inner: candle_nn::Conv2d::new(weight, bias, config),
        }
    }

    /// The kernel [out, in / groups, k_h, k_w].
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The per-output-channel bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    /// Padding, stride, dilation and groups.
    pub fn config(&self) -> &candle_nn::Conv2dConfig {
        self.inner.config()
    }

    /// candle's convolution (differentiable) whatever the input: the reference the CPU kernel
    /// is tested and benchmarked against.
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (weight, bias, config) = (self.weight(), self.bias(), self.config());
        let choice = match bias {
            Some(bias) => kernel_choice(&[x, weight, bias]),
            None => kernel_choice(&[x, weight]),
        };
        let fused = match choice {
            KernelChoice::Candle => None,
            KernelChoice::Inference if bf16::applies(x, weight) => {
                bf16::conv2d(x, weight, bias, config)?
            }
            KernelChoice::Inference => cpu::conv2d(x, weight, bias, config)?,
            KernelChoice::Differentiable => grad_conv::conv2d(x, weight, bias, config)?,
        };
        match fused {
            Some(y) => Ok(y),
            // A bf16 weight meeting float32 activations (the bf16 kernels off): float32.
            None if weight.dtype() != x.dtype() => {
                let weight = weight.to_dtype(x.dtype())?;
                candle_nn::Conv2d::new(weight, bias.cloned(), *config).forward(x)
            }
            None => self.inner.forward(x),
        }
    }
}

/// Loads a 2-D convolution with bias, `padding` on every side: `weight` [out, in, k, k] and
/// `bias` `[out]`.
pub fn conv2d(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    let inner = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?;
    match inner.weight().dtype() {
        DType::F32 => {
            let weight = product_weight(inner.weight().clone())?;
            Ok(Conv2d::new(weight, inner.bias().cloned(), cfg))
        }
        _ => Ok(Conv2d { inner }),
    }
}

/// The environment variable that picks the kernels for the whole process: `generic` runs
/// candle's own ops everywhere (exactly the ops a GPU runs, so the GPU's path can be checked on a
/// CPU), `fast` (the default) the fused CPU kernels where they apply.
pub const KERNELS_VAR: &str = "INSTRUCT_PIX2PIX_KERNELS";

/// The choice [`KERNELS_VAR`] and [`set_fast_cpu_kernels`] make.
static KERNELS: KernelSwitch = KernelSwitch::new(
    KERNELS_VAR,
    ("fast", "the fused CPU kernels"),
    ("generic", "candle's ops, as on a GPU"),
);

/// Whether float32 convolutions of stride 1 run the direct kernel here (a CPU with AVX-512F or
/// AVX2 + FMA, the fast kernels on): no im2col columns, one zero-bordered copy of an image
/// instead.
pub fn direct_conv_available() -> bool {
    fast_cpu_kernels() && cpu::direct_conv::available()
}

pub use cpu::winograd::{
    WINOGRAD_VAR, from_env as winograd_from_env, set_enabled as set_winograd_conv,
};

/// Whether wide 3×3 convolutions of stride 1 and padding 1 run Winograd's algorithm here (the
/// fast kernels on, [`WINOGRAD_VAR`] not `off`).
pub fn winograd_conv_available() -> bool {
    fast_cpu_kernels() && cpu::winograd::enabled()
}

/// Which CPU kernels run float32 work here, as a report names them: `generic` (candle's ops, as
/// on a GPU) or, with the fused kernels on, the best instructions they use (`avx512`, `avx2`,
/// `portable`: the values `INSTRUCT_PIX2PIX_CPU_ISA` takes).
pub fn cpu_kernels_name() -> &'static str {
    if !fast_cpu_kernels() {
        return "generic";
    }
    match ip2p_kernels::isa() {
        ip2p_kernels::Isa::Avx512 => "avx512",
        ip2p_kernels::Isa::Avx2Fma => "avx2",
        ip2p_kernels::Isa::Portable => "portable",
    }
}

/// What [`KERNELS_VAR`] asks for: `Ok(None)` when it is unset, an error naming the variable
/// for any value other than `fast` or `generic`.
pub fn kernels_from_env() -> std::result::Result<Option<bool>, String> {
    KERNELS.read_env()
}

/// Turns the fused CPU kernels on or off for the whole process, for A/B benchmarks in one
/// process (results agree within float32 rounding either way); overrides [`KERNELS_VAR`].
pub fn set_fast_cpu_kernels(enabled: bool) {
    KERNELS.set(enabled);
}

/// Whether the fused CPU kernels are on: as last set by [`set_fast_cpu_kernels`], else as
/// [`KERNELS_VAR`] says (read once; a bad value was refused by the command line), else on.
pub fn fast_cpu_kernels() -> bool {
    KERNELS.enabled()
}

/// The differentiable fused CPU kernels themselves, each `Ok(None)` where it does not apply
/// (another device, dtype or shape): what the modules above run when an input is tracked,
/// callable directly for tests and benchmarks against candle's ops.
pub mod differentiable {
    pub use super::grad_attention::attention;
    pub use super::grad_conv::conv2d;
    pub use super::grad_geglu::geglu;
    pub use super::grad_linear::linear;
    pub use super::grad_norm::{group_norm, layer_norm};
}

/// Which kernels compute an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KernelChoice {
    /// candle's ops (the fused kernels are off).
    Candle,
    /// The inference kernels of `nn/cpu.rs`: no input is tracked.
    Inference,
    /// The differentiable fused kernels: some input is tracked for a backward pass.
    Differentiable,
}

/// The kernels for an op on `tensors`; each kernel still declines (and candle's op runs) on
/// another device or an unsupported dtype or shape.
fn kernel_choice(tensors: &[&Tensor]) -> KernelChoice {
    if !fast_cpu_kernels() {
        KernelChoice::Candle
    } else if tensors.iter().any(|t| needs_backward(t)) {
        KernelChoice::Differentiable
    } else {
        KernelChoice::Inference
    }
}

/// Softmax over the last dimension, fused when no gradient is needed.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if needs_backward(x) {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

/// Whether `x` is part of a graph that a `backward()` call will differentiate.
pub fn needs_backward(x: &Tensor) -> bool {
    x.track_op()
}

/// Multi-head scaled dot-product attention.
///
/// `q` is [batch, q_len, heads·head_dim], `k` and `v` are [batch, kv_len, heads·head_dim];
/// returns [batch, q_len, heads·head_dim]. Scores are computed in f32 for half-precision inputs,
/// as torch's SDPA math path does.
///
/// On the CPU (float32), a fused kernel computes it in blocks of query rows, never building the
/// whole score tensor, with a backward pass in the same blocks when tracked; otherwise it is
/// [`attention_composed`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let fused = match kernel_choice(&[q, k, v]) {
        KernelChoice::Candle => None,
        KernelChoice::Inference => cpu::attention(q, k, v, heads)?,
        KernelChoice::Differentiable => grad_attention::attention(q, k, v, heads)?,
    };
    match fused {
        Some(out) => Ok(out),
        None => attention_composed(q, k, v, heads),
    }
}

/// [`attention`] with its two products in bf16 (q·kᵀ and p·v; the softmax in float32) when the
/// CPU's bf16 kernels apply: for the attention of layers whose weights are bf16
/// ([`Linear::uses_bf16_products`]). Anywhere else it is [`attention`].
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if kernel_choice(&[q, k, v]) == KernelChoice::Inference
        && let Some(out) = bf16::attention(q, k, v, heads)?
    {
        return Ok(out);
    }
    attention(q, k, v, heads)
}

/// [`attention`] composed of candle ops (differentiable): the heads split out, the full score
/// tensor, its softmax, the product with the values.
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (batch, q_len, inner) = q.dims3()?;
    let kv_len = k.dim(1)?;
    let head_dim = inner / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((batch, len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q, q_len)?, split(k, kv_len)?, split(v, kv_len)?);
    let dtype = q.dtype();
    let work_dtype = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q
        .to_dtype(work_dtype)?
        .matmul(&k.to_dtype(work_dtype)?.t()?)?
        * scale)?;
    let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
    let out = probs.matmul(&v)?;
    out.transpose(1, 2)?.reshape((batch, q_len, inner))
}

/// GEGLU's activation, `value · gelu(gate)` (GELU in its exact erf form): one fused pass with a
/// fused backward on the CPU in float32 (the same values as the composed ops, bit for bit),
/// candle's ops elsewhere.
pub fn geglu(value: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if fast_cpu_kernels()
        && let Some(y) = grad_geglu::geglu(value, gate)?
    {
        return Ok(y);
    }
    value * gelu(gate)?
}

/// GELU with the exact erf form (torch's default `F.gelu`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}
