//! Building blocks shared by the networks (CLIP text encoder, VAE, UNet), loaded by diffusers'
//! weight names through a `VarBuilder`.
//!
//! Everything here must stay differentiable so the same modules can train: candle-nn's fused
//! `softmax_last_dim` and `layer_norm` have no backward pass, so they are used only when the input
//! is not part of a tracked graph, and the slower composed ops otherwise.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A fully connected layer, `y = x Wᵀ + b`, for inputs of any rank (the last dim is the feature).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` [out, in] and, when `bias` is set, `bias` [out].
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias {
            Some(vb.get(out_features, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_features = x.dim(D::Minus1)?;
        let mut out_dims = x.dims().to_vec();
        let out_features = self.weight.dim(0)?;
        *out_dims.last_mut().expect("rank >= 1") = out_features;
        let flat = x.reshape(((), in_features))?;
        let y = flat.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.reshape(out_dims)
    }
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
        if needs_backward(x) || needs_backward(&self.weight) {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
        }
    }
}

/// Group normalisation (candle-nn's is composed of differentiable ops).
pub fn group_norm(
    vb: VarBuilder,
    groups: usize,
    channels: usize,
    eps: f64,
) -> Result<candle_nn::GroupNorm> {
    candle_nn::group_norm(groups, channels, eps, vb)
}

/// A 2-D convolution with bias, `padding` on every side.
pub fn conv2d(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<candle_nn::Conv2d> {
    let cfg = candle_nn::Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)
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
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
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

/// GELU with the exact erf form (torch's default `F.gelu`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}
