//! bfloat16 matrix products on the CPU, with float32 everywhere else.
//!
//! candle 0.11 has no bf16 matrix product on the CPU. Here a model loaded for bf16 on the CPU
//! holds the weights of its convolutions and linear layers in bf16 (half float32's memory;
//! [`with_bf16_products`] makes the loaders convert them), while its activations stay float32
//! between layers. This module owns the products that meet there:
//!
//! - the GEMM (`bf16/gemm.rs`): A rows of bf16 (a weight in place, or activations converted),
//!   B packed into pair-interleaved panels, float32 accumulators: AMX tiles (`tdpbf16ps`) where
//!   the CPU has them (`INSTRUCT_PIX2PIX_NO_AMX` set turns them off), else `vdpbf16ps` on
//!   avx512_bf16 (a portable kernel computes the same products elsewhere, slowly);
//! - a linear layer `x Wᵀ + b` and a convolution (im2col blocks, as `nn/cpu.rs`) whose weight is
//!   bf16 and input float32 ([`linear`], [`conv2d`]);
//! - the attention (`bf16/attention.rs`): q·kᵀ and p·v as bf16 products, the softmax in float32.
//!
//! Group norm, layer norm, softmax, the activations and the scheduler stay float32. The kernels
//! run only for inference (nothing tracked for a backward pass) and only where
//! [`cpu_bf16_enabled`]; `INSTRUCT_PIX2PIX_CPU_BF16=0` turns them off.

mod attention;
mod gemm;
#[cfg(test)]
mod tests;

use std::cell::Cell;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::Conv2dConfig;
use half::bf16;
use rayon::prelude::*;

pub(in crate::model::nn) use attention::attention;
use gemm::cpu_has_bf16_dot;
pub(in crate::model::nn) use gemm::{Bf16Product, Lhs, Rhs};

use super::cpu::{ConvShape, contiguous_slice, winograd};
use super::product::Threads;

/// The environment variable that turns the CPU's bf16 kernels off (`0`): `--dtype bf16` then
/// runs in float32, as on a CPU without avx512_bf16.
pub const CPU_BF16_VAR: &str = "INSTRUCT_PIX2PIX_CPU_BF16";

/// Whether bf16 products run on this CPU: it has avx512_bf16 and [`CPU_BF16_VAR`] is not `0`.
pub fn cpu_bf16_enabled() -> bool {
    cpu_has_bf16_dot() && cpu_bf16_allowed()
}

/// Whether [`CPU_BF16_VAR`] allows the bf16 kernels (anything but `0`, `off`, `false`).
pub fn cpu_bf16_allowed() -> bool {
    !matches!(
        std::env::var(CPU_BF16_VAR).as_deref().map(str::trim),
        Ok("0" | "off" | "false")
    )
}

/// Whether this CPU has the bf16 dot-product instructions (avx512_bf16), whatever the
/// environment says.
pub fn cpu_has_bf16_instructions() -> bool {
    cpu_has_bf16_dot()
}

thread_local! {
    /// Set while [`with_bf16_products`] runs: the loaders convert matrix-product weights.
    static LOADING_BF16: Cell<bool> = const { Cell::new(false) };
}

/// Runs `load` with the loaders of linear layers and convolutions converting their float32
/// CPU weights to bf16 (biases, norms and embeddings stay float32): how a model is loaded for
/// bf16 products on the CPU. The previous setting is restored afterwards, also on error.
pub fn with_bf16_products<T>(load: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            LOADING_BF16.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(LOADING_BF16.with(|flag| flag.replace(true)));
    load()
}

/// A matrix-product weight as the current load wants it: bf16 inside [`with_bf16_products`]
/// (for a float32 CPU tensor), unchanged otherwise.
pub(in crate::model::nn) fn product_weight(weight: Tensor) -> Result<Tensor> {
    if LOADING_BF16.with(Cell::get) && weight.dtype() == DType::F32 && weight.device().is_cpu() {
        weight.to_dtype(DType::BF16)
    } else {
        Ok(weight)
    }
}

/// Whether an op on float32 `x` with a bf16 `weight` runs the bf16 kernels here.
pub(in crate::model::nn) fn applies(x: &Tensor, weight: &Tensor) -> bool {
    x.dtype() == DType::F32
        && weight.dtype() == DType::BF16
        && x.device().is_cpu()
        && weight.device().is_cpu()
}

/// `x` [rows, in] (float32) · `weight` [out, in]ᵀ (bf16) + `bias` [out] (float32), when the
/// kernel applies (CPU, those dtypes); `None` otherwise.
pub(in crate::model::nn) fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !applies(x, weight) || bias.is_some_and(|b| b.dtype() != DType::F32 || !b.device().is_cpu())
    {
        return Ok(None);
    }
    let (rows, in_features) = x.dims2()?;
    let (out_features, weight_in) = weight.dims2()?;
    if weight_in != in_features || bias.is_some_and(|b| b.dims() != [out_features]) {
        return Ok(None);
    }
    let out = with_input_and_weight(x, weight, |x_data, w_data| {
        let mut out = vec![0f32; rows * out_features];
        let accumulate = match bias {
            Some(bias) => {
                let bias = bias.to_vec1::<f32>()?;
                for row in out.chunks_exact_mut(out_features) {
                    row.copy_from_slice(&bias);
                }
                true
            }
            None => false,
        };
        FrozenBf16Products {
            w: w_data,
            rows,
            in_features,
            out_features,
        }
        .forward(&mut out, x_data, accumulate)?;
        Ok(out)
    })?;
    Tensor::from_vec(out, (rows, out_features), &Device::Cpu).map(Some)
}

/// `f` on the float32 values of `x` and the bf16 values of `weight` (CPU tensors, made
/// contiguous), their storages borrowed for the call.
fn with_input_and_weight<R>(
    x: &Tensor,
    weight: &Tensor,
    f: impl FnOnce(&[f32], &[bf16]) -> Result<R>,
) -> Result<R> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    let x_data = contiguous_slice::<f32>(&x_storage, x_layout)?;
    let w_data = contiguous_slice::<bf16>(&w_storage, w_layout)?;
    f(x_data, w_data)
}

/// The two products of a linear layer whose weight `w` [out, in] is held in bf16, on the CPU's
/// bf16 kernels (float32 operands rounded to bf16 as they are packed, float32 sums: torch's
/// bf16 autocast): the forward `y [rows, out] (+)= x [rows, in] · wᵀ` and the input's gradient
/// `dx [rows, in] = dy [rows, out] · w`. For the differentiable linear over a frozen bf16 weight.
pub(in crate::model::nn) struct FrozenBf16Products<'a> {
    pub(in crate::model::nn) w: &'a [bf16],
    pub(in crate::model::nn) rows: usize,
    pub(in crate::model::nn) in_features: usize,
    pub(in crate::model::nn) out_features: usize,
}

impl FrozenBf16Products<'_> {
    /// `y (+)= x · wᵀ` (`accumulate`: onto `y`, e.g. the bias repeated per row).
    pub(in crate::model::nn) fn forward(
        &self,
        y: &mut [f32],
        x: &[f32],
        accumulate: bool,
    ) -> Result<()> {
        let (rows, n_in, n_out) = (self.rows, self.in_features, self.out_features);
        // Packing B costs a pass over it per call. With few rows, packing w (n_out · n_in)
        // costs more than the product's other operand plus a transpose of the output: then
        // yᵀ = w · xᵀ, with w read in place as the left operand.
        if rows * n_in + 2 * rows * n_out < n_out * n_in {
            return self.forward_transposed(y, x, accumulate);
        }
        Bf16Product {
            m: rows,
            n: n_out,
            k: n_in,
            dst_row_stride: n_out,
        }
        .run(
            y,
            Lhs::F32 {
                data: x,
                strides: (n_in, 1),
            },
            Rhs::Bf16 {
                data: self.w,
                strides: (1, n_in),
            },
            1.0,
            accumulate,
            Threads::All,
        )
    }

    /// [`FrozenBf16Products::forward`] as `yᵀ [out, rows] = w · xᵀ`, then transposed into y.
    fn forward_transposed(&self, y: &mut [f32], x: &[f32], accumulate: bool) -> Result<()> {
        let (rows, n_in, n_out) = (self.rows, self.in_features, self.out_features);
        let mut transposed = vec![0f32; n_out * rows];
        Bf16Product {
            m: n_out,
            n: rows,
            k: n_in,
            dst_row_stride: rows,
        }
        .run(
            &mut transposed,
            Lhs::Bf16 {
                data: self.w,
                row_stride: n_in,
            },
            Rhs::F32 {
                data: x,
                strides: (1, n_in),
            },
            1.0,
            false,
            Threads::All,
        )?;
        y.par_chunks_exact_mut(n_out)
            .enumerate()
            .for_each(|(row, y_row)| {
                for (out, value) in y_row.iter_mut().enumerate() {
                    let product = transposed[out * rows + row];
                    *value = if accumulate {
                        *value + product
                    } else {
                        product
                    };
                }
            });
        Ok(())
    }

    /// `dx = dy · w`.
    pub(in crate::model::nn) fn input_gradient(&self, dy: &[f32]) -> Result<Vec<f32>> {
        let (rows, n_in, n_out) = (self.rows, self.in_features, self.out_features);
        let mut dx = vec![0f32; rows * n_in];
        Bf16Product {
            m: rows,
            n: n_in,
            k: n_out,
            dst_row_stride: n_in,
        }
        .run(
            &mut dx,
            Lhs::F32 {
                data: dy,
                strides: (n_out, 1),
            },
            Rhs::Bf16 {
                data: self.w,
                strides: (n_in, 1),
            },
            1.0,
            false,
            Threads::All,
        )?;
        Ok(dx)
    }
}

/// Largest im2col block of the bf16 convolution, in float32 elements (4 MiB): smaller than the
/// float32 kernel's, so the columns are still in cache when they are packed to bf16 (the 3×3
/// convolution of the UNet's first level: 389 GFLOP/s with 32 MiB blocks, 416 with 4 MiB, 336
/// with 1 MiB, whose products are too narrow).
pub(in crate::model::nn) const BF16_COL_BLOCK_ELEMENTS: usize = 1 << 20;

/// `x` [B, C_in, H, W] (float32) convolved with `weight` [C_out, C_in, k_h, k_w] (bf16)
/// (+ `bias` [C_out], float32), when the kernel applies; `None` otherwise.
///
/// As `nn/cpu.rs`'s float32 kernel: the output of all images is one matrix
/// [C_out, B·H_out·W_out] = weight [C_out, C_in·k_h·k_w] · columns, the columns built (im2col)
/// in blocks of output rows; the weight is read in place as the product's bf16 rows and each
/// column block is converted to bf16 as it is packed.
pub(in crate::model::nn) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
) -> Result<Option<Tensor>> {
    if !applies(x, weight) || bias.is_some_and(|b| b.dtype() != DType::F32) {
        return Ok(None);
    }
    let Some(s) = ConvShape::of_mixed(x, weight, bias, cfg)? else {
        return Ok(None);
    };
    let out = with_input_and_weight(x, weight, |x_data, w_data| {
        let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
        conv_slices(x_data, w_data, bias.as_deref(), &s)
    })?;
    Tensor::from_vec(
        out,
        (s.batch, s.out_channels, s.out_h, s.out_w),
        &Device::Cpu,
    )
    .map(Some)
}

/// Winograd's convolution over a bf16 weight takes at least this many tiles (2×2 output pixels
/// across the batch), more than float32's: the bf16 products are faster, so transforming the
/// weight on every call weighs more. `bf16_bench gemm` on avx512_bf16 (Zen 4): a 256² edit's
/// 32² level (768 tiles) 1.0–1.3× im2col's speed, its 16² level (192) 0.6×, the VAE's 256² and
/// 64² levels 1.9×.
const BF16_WINOGRAD_MIN_TILES: usize = 512;

/// The convolution on slices (bf16 weight [C_out, patch], float32 input and output):
/// Winograd's where [`takes_winograd`], else im2col.
pub(in crate::model::nn) fn conv_slices(
    x: &[f32],
    weight: &[bf16],
    bias: Option<&[f32]>,
    s: &ConvShape,
) -> Result<Vec<f32>> {
    if takes_winograd(s) {
        winograd_conv(x, weight, bias, s, winograd::BLOCK_FLOATS)
    } else {
        im2col_conv(x, weight, bias, s, BF16_COL_BLOCK_ELEMENTS)
    }
}

/// Whether [`conv_slices`] computes this convolution by Winograd's algorithm.
pub(in crate::model::nn) fn takes_winograd(s: &ConvShape) -> bool {
    winograd::applies(s) && winograd::tiles(s) >= BF16_WINOGRAD_MIN_TILES
}

/// Winograd's F(2×2, 3×3) over a bf16 weight: the transforms in float32 (the weight's exactly,
/// its bf16 values being float32 ones), the 16 products on the bf16 kernels, the transformed
/// weight rounded to bf16 and the transformed input as it is packed, as the im2col kernel
/// rounds the weight and the columns. 2.25 times fewer multiply-adds than im2col, as in
/// float32; the extra rounding of transformed values keeps the result within bf16's distance
/// of float32 (`bf16/tests.rs`).
fn winograd_conv(
    x: &[f32],
    weight: &[bf16],
    bias: Option<&[f32]>,
    s: &ConvShape,
    block_floats: usize,
) -> Result<Vec<f32>> {
    winograd::check_weight(s, weight.len())?;
    let (c_in, c_out) = (s.in_channels, s.out_channels);
    let u = ip2p_kernels::winograd::transform_weights_as(
        weight,
        c_out,
        c_in,
        bf16::to_f32,
        bf16::from_f32,
    );
    winograd::conv_with_products(x, bias, s, block_floats, |plane, m, v, count| {
        Bf16Product {
            m: c_out,
            n: count,
            k: c_in,
            dst_row_stride: count,
        }
        .run(
            m,
            Lhs::Bf16 {
                data: &u[plane * c_out * c_in..][..c_out * c_in],
                row_stride: c_in,
            },
            Rhs::F32 {
                data: v,
                strides: (count, 1),
            },
            1.0,
            false,
            Threads::One,
        )
    })
}

/// The im2col convolution on slices: bf16 weight [C_out, patch], float32 input and output.
pub(in crate::model::nn) fn im2col_conv(
    x: &[f32],
    weight: &[bf16],
    bias: Option<&[f32]>,
    s: &ConvShape,
    col_block_elements: usize,
) -> Result<Vec<f32>> {
    let patch_len = s.patch_len();
    let lhs = Lhs::Bf16 {
        data: weight,
        row_stride: patch_len,
    };
    if s.is_pointwise() {
        // A 1×1 convolution reads each image's [C_in, H·W] in place as the columns and
        // writes its [C_out, H·W] in place.
        let pixels = s.out_pixels();
        let mut out = vec![0f32; s.batch * s.out_channels * pixels];
        for (src, dst) in x
            .chunks_exact(s.in_channels * pixels)
            .zip(out.chunks_exact_mut(s.out_channels * pixels))
        {
            if let Some(bias) = bias {
                for (row, &b) in dst.chunks_exact_mut(pixels).zip(bias) {
                    row.fill(b);
                }
            }
            let product = Bf16Product {
                m: s.out_channels,
                n: pixels,
                k: s.in_channels,
                dst_row_stride: pixels,
            };
            let rhs = Rhs::F32 {
                data: src,
                strides: (pixels, 1),
            };
            product.run(dst, lhs, rhs, 1.0, bias.is_some(), Threads::All)?;
        }
        return Ok(out);
    }
    let plan = s.blocks(col_block_elements);
    let mut out = plan.destination(s, bias);
    let mut columns = vec![0f32; patch_len * plan.max_block_pixels];
    for block in &plan.blocks {
        let block_pixels = block.rows * s.out_w;
        let columns = block.fill_columns(x, s, &mut columns);
        let product = Bf16Product {
            m: s.out_channels,
            n: block_pixels,
            k: patch_len,
            dst_row_stride: plan.dst_row_stride,
        };
        let rhs = Rhs::F32 {
            data: columns,
            strides: (block_pixels, 1),
        };
        product.run(
            &mut out[block.dst_offset..],
            lhs,
            rhs,
            1.0,
            bias.is_some(),
            Threads::All,
        )?;
    }
    Ok(plan.finish(s, out))
}
