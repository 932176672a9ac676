//! The UNet's attention: diffusers' `Attention` (run in query chunks to bound the score
//! matrix), `FeedForward`, `BasicTransformerBlock` and `Transformer2DModel`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::nn::{self, GroupNorm, LayerNorm, Linear};

/// diffusers' `Attention` as the transformer blocks use it (no bias on q/k/v, biased output).
#[derive(Debug, Clone)]
pub struct Attention {
    /// `to_q`: queries from the hidden states.
    pub to_q: Linear,
    /// `to_k`: keys from the context (or the hidden states).
    pub to_k: Linear,
    /// `to_v`: values from the context (or the hidden states).
    pub to_v: Linear,
    /// `to_out.0` (`to_out.1` is a dropout).
    pub to_out: Linear,
    /// Number of attention heads.
    pub heads: usize,
}

impl Attention {
    pub(super) fn load(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
        })
    }

    /// The four projections with their diffusers names (`to_q`, `to_k`, `to_v`, `to_out.0`),
    /// in the order diffusers registers them.
    pub fn projections(&self) -> [(&'static str, &Linear); 4] {
        [
            ("to_q", &self.to_q),
            ("to_k", &self.to_k),
            ("to_v", &self.to_v),
            ("to_out.0", &self.to_out),
        ]
    }

    /// [`Attention::projections`], mutable (to attach or remove adapters).
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 4] {
        [
            ("to_q", &mut self.to_q),
            ("to_k", &mut self.to_k),
            ("to_v", &mut self.to_v),
            ("to_out.0", &mut self.to_out),
        ]
    }

    /// `x` [B, N, query_dim]; `context` [B, M, context_dim] or `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let attend = if self.to_q.uses_bf16_products() {
            nn::attention_bf16
        } else {
            nn::attention
        };
        let out =
            attention_in_query_chunks(&q, &k, &v, self.heads, ATTENTION_SCORES_BUDGET, attend)?;
        self.to_out.forward(&out)
    }
}

/// Most attention-score elements one [`nn::attention`] call may hold at inference: 32 Mi f32
/// (128 MiB). At 512×512 a self-attention of the first level has 3·8·4096² scores (1.6 GB, and
/// the scaled and softmaxed copies beside them); split by query rows it stays near this budget.
const ATTENTION_SCORES_BUDGET: usize = 32 << 20;

/// [`nn::attention`], computed for chunks of query rows when the score matrix would exceed
/// `max_scores` elements and no gradient is tracked. Each query row's result depends only on
/// that row, so the chunks concatenate to the same output.
fn attention_in_query_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    max_scores: usize,
    attend: fn(&Tensor, &Tensor, &Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let (batch, q_len, _) = q.dims3()?;
    let kv_len = k.dim(1)?;
    let scores_per_row = batch * heads * kv_len;
    if scores_per_row * q_len <= max_scores || nn::needs_backward(q) || nn::needs_backward(k) {
        return attend(q, k, v, heads);
    }
    let rows = (max_scores / scores_per_row.max(1)).max(1);
    let chunks = (0..q_len)
        .step_by(rows)
        .map(|start| {
            let q_chunk = q.narrow(1, start, rows.min(q_len - start))?;
            attend(&q_chunk, k, v, heads)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&chunks, 1)
}

/// diffusers' `FeedForward` with its default GEGLU activation: `net.0.proj` (dim → 2·inner, the
/// value half then the gate half), `value · gelu(gate)`, then `net.2` (inner → dim).
#[derive(Debug, Clone)]
pub struct FeedForward {
    /// Rows `0..inner` of `net.0.proj` (a view of the loaded weight, so its gradient reaches it).
    pub value_proj: Linear,
    /// Rows `inner..2·inner` of `net.0.proj`.
    pub gate_proj: Linear,
    /// `net.2`: inner → dim.
    pub proj_out: Linear,
}

impl FeedForward {
    pub(super) fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner_dim = dim * 4;
        // Two products on the halves of the weight give contiguous value and gate tensors,
        // where slicing one product's output would make the activation and product strided.
        let proj = Linear::load(vb.pp("net").pp("0").pp("proj"), dim, inner_dim * 2, true)?;
        let half = |start: usize| -> Result<Linear> {
            Ok(Linear::new(
                proj.weight.narrow(0, start, inner_dim)?,
                match &proj.bias {
                    Some(bias) => Some(bias.narrow(0, start, inner_dim)?),
                    None => None,
                },
            ))
        };
        Ok(Self {
            value_proj: half(0)?,
            gate_proj: half(inner_dim)?,
            proj_out: Linear::load(vb.pp("net").pp("2"), inner_dim, dim, true)?,
        })
    }

    /// `x` [B, N, dim].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let value = self.value_proj.forward(x)?;
        let gate = self.gate_proj.forward(x)?;
        self.proj_out.forward(&nn::geglu(&value, &gate)?)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention, GEGLU).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    /// Layer norm before self-attention.
    pub norm1: LayerNorm,
    /// Self-attention (attends to the text when `only_cross_attention`).
    pub attn1: Attention,
    /// Layer norm before cross-attention.
    pub norm2: LayerNorm,
    /// Cross-attention to the text.
    pub attn2: Attention,
    /// Layer norm before the feed-forward.
    pub norm3: LayerNorm,
    /// GEGLU feed-forward.
    pub ff: FeedForward,
    /// `attn1` attends to the text too (`only_cross_attention`).
    pub only_cross_attention: bool,
}

impl BasicTransformerBlock {
    pub(super) fn load(vb: VarBuilder, dim: usize, spec: &TransformerSpec) -> Result<Self> {
        let self_context_dim = if spec.only_cross_attention {
            spec.cross_attention_dim
        } else {
            dim
        };
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, TRANSFORMER_NORM_EPS)?,
            attn1: Attention::load(
                vb.pp("attn1"),
                dim,
                self_context_dim,
                spec.heads,
                spec.head_dim,
            )?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, TRANSFORMER_NORM_EPS)?,
            attn2: Attention::load(
                vb.pp("attn2"),
                dim,
                spec.cross_attention_dim,
                spec.heads,
                spec.head_dim,
            )?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, TRANSFORMER_NORM_EPS)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
            only_cross_attention: spec.only_cross_attention,
        })
    }

    /// `x` [B, N, dim], `context` [B, M, cross_attention_dim].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let self_context = self.only_cross_attention.then_some(context);
        let x = nn::add(
            &self.attn1.forward(&self.norm1.forward(x)?, self_context)?,
            x,
        )?;
        let x = nn::add(
            &self
                .attn2
                .forward(&self.norm2.forward(&x)?, Some(context))?,
            &x,
        )?;
        nn::add(&self.ff.forward(&self.norm3.forward(&x)?)?, &x)
    }
}

/// The transformer blocks' layer-norm epsilon (diffusers' `Transformer2DModel` default; the UNet
/// does not pass its `norm_eps` down).
const TRANSFORMER_NORM_EPS: f64 = 1e-5;
/// The group-norm epsilon of `Transformer2DModel`'s input norm (fixed in diffusers).
const TRANSFORMER_GROUP_NORM_EPS: f64 = 1e-6;

/// Shape of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub(super) struct TransformerSpec {
    pub(super) heads: usize,
    pub(super) head_dim: usize,
    pub(super) layers: usize,
    pub(super) cross_attention_dim: usize,
    pub(super) only_cross_attention: bool,
    pub(super) use_linear_projection: bool,
    pub(super) groups: usize,
}

/// diffusers' `Transformer2DModel` on continuous (latent image) inputs.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    /// Group norm of the input (eps 1e-6).
    pub norm: GroupNorm,
    /// `proj_in`: a linear layer, or a 1×1 convolution applied as the same linear map on the
    /// channels-last layout (its weight is the convolution's, reshaped).
    pub proj_in: Linear,
    /// The transformer blocks, applied in order.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// `proj_out`, like `proj_in`.
    pub proj_out: Linear,
}

impl Transformer2DModel {
    pub(super) fn load(vb: VarBuilder, channels: usize, spec: &TransformerSpec) -> Result<Self> {
        let inner = spec.heads * spec.head_dim;
        let projection = |vb: VarBuilder, in_dim: usize, out_dim: usize| -> Result<Linear> {
            if spec.use_linear_projection {
                Linear::load(vb, in_dim, out_dim, true)
            } else {
                let weight = nn::product_weight(
                    vb.get((out_dim, in_dim, 1, 1), "weight")?
                        .reshape((out_dim, in_dim))?,
                )?;
                let bias = vb.get(out_dim, "bias")?;
                Ok(Linear::new(weight, Some(bias)))
            }
        };
        let transformer_blocks = (0..spec.layers)
            .map(|i| BasicTransformerBlock::load(vb.pp("transformer_blocks").pp(i), inner, spec))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: nn::group_norm(
                vb.pp("norm"),
                spec.groups,
                channels,
                TRANSFORMER_GROUP_NORM_EPS,
            )?,
            proj_in: projection(vb.pp("proj_in"), channels, inner)?,
            transformer_blocks,
            proj_out: projection(vb.pp("proj_out"), inner, channels)?,
        })
    }

    /// `x` [B, C, H, W], `context` [B, M, cross_attention_dim]; returns [B, C, H, W].
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let h = self.norm.forward(x)?;
        // Channels last: [B, H·W, C]. A 1×1 convolution before the permute (diffusers' order for
        // conv projections) is the same linear map as this one after it.
        let h = h
            .permute((0, 2, 3, 1))?
            .reshape((batch, height * width, channels))?;
        let mut h = self.proj_in.forward(&h)?;
        for block in &self.transformer_blocks {
            h = block.forward(&h, context)?;
        }
        let h = self.proj_out.forward(&h)?;
        let h = h
            .reshape((batch, height, width, channels))?
            .permute((0, 3, 1, 2))?;
        nn::add(&h, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn attention_split_by_query_rows_equals_one_call() {
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 37, 16), &device).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 23, 16), &device).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 23, 16), &device).unwrap();
        let whole = nn::attention(&q, &k, &v, 4).unwrap();
        // 2·4·23 scores per query row: a budget of 5 rows gives 8 chunks, the last one short.
        let chunked =
            attention_in_query_chunks(&q, &k, &v, 4, 5 * 2 * 4 * 23, nn::attention).unwrap();
        assert_eq!(chunked.dims(), whole.dims());
        let diff = crate::model::max_abs_diff(&chunked, &whole);
        // Row-independent maths; only the matrix products' blocking may differ (f32 ulps).
        assert!(diff < 1e-6, "{diff}");
    }
}
