//! Fused CPU kernels for inference (no backward pass): convolution (Winograd's for wide 3×3
//! ones, `cpu/winograd.rs`; direct at stride 1 on AVX-512 or AVX2, `cpu/direct_conv.rs`;
//! im2col + GEMM otherwise), group normalisation and blocked attention. Each returns
//! `Ok(None)` when it does not apply (another device, dtype or configuration), and the caller
//! falls back to candle's differentiable ops.
//!
//! The slice-level pieces (im2col, the normalisation loop, the attention blocks) are shared with
//! the differentiable kernels of `grad_conv.rs`, `grad_norm.rs` and `grad_attention.rs`.
//!
//! This file owns the convolution and group-norm kernels and the slice helpers; the attention
//! kernel lives in `cpu/attention.rs` and is re-exported here.

mod attention;
pub(super) mod direct_conv;
pub(super) mod winograd;

pub(super) use attention::{
    AttentionShape, QUERY_BLOCK_ROWS, attention, attention_forward, exp_minus_in_place,
    exp_minus_max_in_place, exp_non_positive,
};

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor, WithDType};
use candle_nn::Conv2dConfig;
use gemm::Parallelism;
use half::f16;
pub(super) use ip2p_kernels::norm::mean_and_inv_std;
use ip2p_kernels::norm::normalize_row;
pub(super) use ip2p_kernels::sum_f64;
use rayon::prelude::*;

/// Largest im2col block, in elements (32 MiB of f32). A block holds whole output rows, so this
/// bounds memory on large images (the VAE at 512² would otherwise need a 1.2 GB column matrix)
/// while keeping every GEMM wide enough to run near the machine's peak.
pub(super) const COL_BLOCK_ELEMENTS: usize = 8 << 20;

/// The geometry of one convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvShape {
    pub(super) batch: usize,
    pub(super) in_channels: usize,
    pub(super) in_h: usize,
    pub(super) in_w: usize,
    pub(super) out_channels: usize,
    pub(super) k_h: usize,
    pub(super) k_w: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
    pub(super) out_h: usize,
    pub(super) out_w: usize,
}

impl ConvShape {
    /// A 3×3 convolution of stride 1 and padding 1 (the output the input's size), for tests.
    #[cfg(test)]
    pub(super) fn same_3x3(
        batch: usize,
        in_channels: usize,
        out_channels: usize,
        h: usize,
        w: usize,
    ) -> Self {
        Self {
            batch,
            in_channels,
            in_h: h,
            in_w: w,
            out_channels,
            k_h: 3,
            k_w: 3,
            stride: 1,
            padding: 1,
            out_h: h,
            out_w: w,
        }
    }

    /// The geometry of `x` [B, C_in, H, W] convolved with `weight` [C_out, C_in, k_h, k_w]
    /// (+ `bias` [C_out]) when the fused kernels handle it (CPU, one dtype, no groups or
    /// dilation); `None` for anything else, including mismatched shapes and a kernel larger
    /// than the padded input, which candle's convolution then reports.
    pub(super) fn of(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        cfg: &Conv2dConfig,
    ) -> Result<Option<Self>> {
        let dtype = x.dtype();
        let same_dtype = weight.dtype() == dtype && bias.is_none_or(|b| b.dtype() == dtype);
        if !same_dtype {
            return Ok(None);
        }
        Self::of_mixed(x, weight, bias, cfg)
    }

    /// [`Self::of`] whatever the dtypes (the bf16 kernels take a bf16 weight and float32
    /// input and bias; the caller checks them).
    pub(super) fn of_mixed(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        cfg: &Conv2dConfig,
    ) -> Result<Option<Self>> {
        let on_cpu = x.device().is_cpu()
            && weight.device().is_cpu()
            && bias.is_none_or(|b| b.device().is_cpu());
        if !on_cpu || cfg.groups != 1 || cfg.dilation != 1 || x.rank() != 4 || weight.rank() != 4 {
            return Ok(None);
        }
        let (batch, in_channels, in_h, in_w) = x.dims4()?;
        let (out_channels, weight_in, k_h, k_w) = weight.dims4()?;
        let bias_ok = match bias {
            Some(b) => b.dims() == [out_channels],
            None => true,
        };
        let (padded_h, padded_w) = (in_h + 2 * cfg.padding, in_w + 2 * cfg.padding);
        if weight_in != in_channels
            || !bias_ok
            || cfg.stride == 0
            || padded_h < k_h
            || padded_w < k_w
            || batch == 0
        {
            return Ok(None);
        }
        Ok(Some(Self {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            k_h,
            k_w,
            stride: cfg.stride,
            padding: cfg.padding,
            out_h: (padded_h - k_h) / cfg.stride + 1,
            out_w: (padded_w - k_w) / cfg.stride + 1,
        }))
    }

    /// Rows of the column matrix (and columns of the flattened kernel): C_in·k_h·k_w.
    pub(super) fn patch_len(&self) -> usize {
        self.in_channels * self.k_h * self.k_w
    }

    pub(super) fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    pub(super) fn is_pointwise(&self) -> bool {
        self.k_h == 1 && self.k_w == 1 && self.stride == 1 && self.padding == 0
    }

    /// Output rows per im2col block: whole rows (numbered across images) whose columns fit in
    /// `col_block_elements`, at least one.
    pub(super) fn rows_per_block(&self, col_block_elements: usize) -> usize {
        (col_block_elements / (self.patch_len() * self.out_w)).clamp(1, self.batch * self.out_h)
    }

    /// The im2col blocks of output rows and where each block's product goes. Images of at
    /// least [`PER_IMAGE_MIN_PIXELS`] are done one by one, each block written straight into
    /// the [B, C_out, P] output (rows P apart); smaller images share blocks across the batch
    /// (wider products) in a [C_out, B·P] matrix that [`ConvBlocks::finish`] reorders.
    pub(super) fn blocks(&self, col_block_elements: usize) -> ConvBlocks {
        let pixels = self.out_pixels();
        let per_image = self.batch == 1 || pixels >= PER_IMAGE_MIN_PIXELS;
        let rows_per_block = if per_image {
            self.rows_per_block(col_block_elements).min(self.out_h)
        } else {
            self.rows_per_block(col_block_elements)
        };
        let mut blocks = Vec::new();
        let total_rows = self.batch * self.out_h;
        let mut first_row = 0;
        while first_row < total_rows {
            let (rows, dst_offset) = if per_image {
                let (image, row) = (first_row / self.out_h, first_row % self.out_h);
                (
                    rows_per_block.min(self.out_h - row),
                    image * self.out_channels * pixels + row * self.out_w,
                )
            } else {
                (
                    rows_per_block.min(total_rows - first_row),
                    first_row * self.out_w,
                )
            };
            blocks.push(ConvBlock {
                first_row,
                rows,
                dst_offset,
            });
            first_row += rows;
        }
        ConvBlocks {
            blocks,
            dst_row_stride: if per_image {
                pixels
            } else {
                self.batch * pixels
            },
            per_image,
            max_block_pixels: rows_per_block * self.out_w,
        }
    }

    /// The output columns `first..end` whose input column `ox·stride + kx − padding` lies
    /// inside the image, for kernel column `kx`.
    pub(super) fn inside_columns(&self, kx: usize) -> (usize, usize) {
        let first = self
            .padding
            .saturating_sub(kx)
            .div_ceil(self.stride)
            .min(self.out_w);
        let end = if self.in_w + self.padding > kx {
            (self.in_w + self.padding - kx)
                .div_ceil(self.stride)
                .clamp(first, self.out_w)
        } else {
            first
        };
        (first, end)
    }
}

/// `x` [B, C_in, H, W] convolved with `weight` [C_out, C_in, k_h, k_w] (+ `bias` [C_out]),
/// when the fused kernel applies (CPU, f32/f64/f16, no groups or dilation).
pub(super) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
) -> Result<Option<Tensor>> {
    let Some(shape) = ConvShape::of(x, weight, bias, cfg)? else {
        return Ok(None);
    };
    match x.dtype() {
        DType::F32 => conv2d_typed(x, weight, bias, &shape, |x, w, b, s| {
            conv_f32(x, w, b, s, COL_BLOCK_ELEMENTS)
        })
        .map(Some),
        DType::F64 => conv2d_typed(x, weight, bias, &shape, |x, w, b, s| {
            conv_slices::<f64>(x, w, b, s, COL_BLOCK_ELEMENTS)
        })
        .map(Some),
        DType::F16 => conv2d_typed(x, weight, bias, &shape, |x, w, b, s| {
            conv_slices::<f16>(x, w, b, s, COL_BLOCK_ELEMENTS)
        })
        .map(Some),
        _ => Ok(None),
    }
}

/// A float32 convolution: Winograd's where it applies (wide 3×3 of stride 1 and padding 1), else
/// the direct kernel where it applies (stride 1 on AVX-512 or AVX2, not 1×1), else
/// [`conv_slices`] with im2col blocks of at most `col_block_elements`. Inference and the
/// differentiable kernel's forward and input-gradient passes all choose here.
pub(super) fn conv_f32(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    shape: &ConvShape,
    col_block_elements: usize,
) -> Result<Vec<f32>> {
    if winograd::applies(shape) {
        winograd::conv(x, weight, bias, shape)
    } else if direct_conv::applies(shape) {
        direct_conv::conv(x, weight, bias, shape)
    } else {
        conv_slices(x, weight, bias, shape, col_block_elements)
    }
}

/// A convolution of contiguous slices: one matrix product per image for 1×1, im2col blocks
/// otherwise.
fn conv_slices<T: WithDType>(
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    shape: &ConvShape,
    col_block_elements: usize,
) -> Result<Vec<T>> {
    if shape.is_pointwise() {
        pointwise_conv(x, weight, bias, shape)
    } else {
        im2col_conv(x, weight, bias, shape, col_block_elements)
    }
}

/// A convolution of contiguous slices: input, weight, bias → output.
type ConvKernel<T> = fn(&[T], &[T], Option<&[T]>, &ConvShape) -> Result<Vec<T>>;

fn conv2d_typed<T: WithDType>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    shape: &ConvShape,
    kernel: ConvKernel<T>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    let x_data = contiguous_slice::<T>(&x_storage, x_layout)?;
    let w_data = contiguous_slice::<T>(&w_storage, w_layout)?;
    let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_data = match &bias_guard {
        Some((storage, layout)) => Some(contiguous_slice::<T>(storage, layout)?),
        None => None,
    };
    let out = kernel(x_data, w_data, bias_data, shape)?;
    Tensor::from_vec(
        out,
        (shape.batch, shape.out_channels, shape.out_h, shape.out_w),
        &Device::Cpu,
    )
}

/// A 1×1 convolution with stride 1 is a matrix product per image:
/// out[b] [C_out, H·W] = weight [C_out, C_in] · x[b] [C_in, H·W].
pub(super) fn pointwise_conv<T: WithDType>(
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    s: &ConvShape,
) -> Result<Vec<T>> {
    let pixels = s.out_pixels();
    let mut out = vec![T::zero(); s.batch * s.out_channels * pixels];
    for (image, dst) in x
        .chunks_exact(s.in_channels * pixels)
        .zip(out.chunks_exact_mut(s.out_channels * pixels))
    {
        if let Some(bias) = bias {
            fill_rows_with_bias(dst, bias, pixels);
        }
        let product = MatProduct {
            m: s.out_channels,
            n: pixels,
            k: s.in_channels,
            dst_row_stride: pixels,
            lhs_row_stride: s.in_channels,
            rhs_row_stride: pixels,
        };
        product.run(dst, bias.is_some(), weight, image)?;
    }
    Ok(out)
}

/// Images of this many output pixels and more are convolved one by one, straight into the
/// output; smaller ones together (see [`ConvShape::blocks`]).
const PER_IMAGE_MIN_PIXELS: usize = 256;

/// One im2col block: output rows `first_row..first_row + rows` (numbered across images),
/// whose product starts at `dst_offset` of the output.
#[derive(Debug, Clone, Copy)]
pub(super) struct ConvBlock {
    pub(super) first_row: usize,
    pub(super) rows: usize,
    pub(super) dst_offset: usize,
}

impl ConvBlock {
    /// Builds this block's im2col columns [patch, pixels] at the start of `columns` and returns
    /// them.
    pub(super) fn fill_columns<'c, T: WithDType>(
        &self,
        x: &[T],
        s: &ConvShape,
        columns: &'c mut [T],
    ) -> &'c mut [T] {
        let block_pixels = self.rows * s.out_w;
        let columns = &mut columns[..s.patch_len() * block_pixels];
        columns
            .par_chunks_mut(block_pixels)
            .enumerate()
            .for_each(|(patch_index, column_row)| {
                fill_column_row(x, s, patch_index, self.first_row, column_row);
            });
        columns
    }
}

/// The blocks of a convolution (see [`ConvShape::blocks`]).
pub(super) struct ConvBlocks {
    pub(super) blocks: Vec<ConvBlock>,
    /// Elements between two output channels' rows in the products' destination.
    pub(super) dst_row_stride: usize,
    per_image: bool,
    /// The largest block's pixels (for the column buffer).
    pub(super) max_block_pixels: usize,
}

impl ConvBlocks {
    /// The destination of the products, with the bias in every channel's rows (or zero).
    pub(super) fn destination<T: WithDType>(&self, s: &ConvShape, bias: Option<&[T]>) -> Vec<T> {
        let pixels = s.out_pixels();
        let mut out = vec![T::zero(); s.batch * s.out_channels * pixels];
        if let Some(bias) = bias {
            fill_rows_with_bias(
                &mut out,
                bias,
                if self.per_image {
                    pixels
                } else {
                    s.batch * pixels
                },
            );
        }
        out
    }

    /// The output [B, C_out, P] from the destination: itself when the images were done one
    /// by one, else [C_out, B, P] with the first two axes swapped.
    pub(super) fn finish<T: WithDType>(&self, s: &ConvShape, merged: Vec<T>) -> Vec<T> {
        if self.per_image || s.batch == 1 {
            return merged;
        }
        let pixels = s.out_pixels();
        let mut out = vec![T::zero(); merged.len()];
        out.par_chunks_mut(pixels)
            .enumerate()
            .for_each(|(dst_index, dst)| {
                let (image, channel) = (dst_index / s.out_channels, dst_index % s.out_channels);
                let start = (channel * s.batch + image) * pixels;
                dst.copy_from_slice(&merged[start..start + pixels]);
            });
        out
    }
}

/// The general case: output = weight [C_out, C_in·k_h·k_w] · columns [C_in·k_h·k_w, pixels],
/// the columns built (im2col) for a block of output rows at a time (see [`ConvShape::blocks`]).
pub(super) fn im2col_conv<T: WithDType>(
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    s: &ConvShape,
    col_block_elements: usize,
) -> Result<Vec<T>> {
    let patch_len = s.patch_len();
    let plan = s.blocks(col_block_elements);
    let mut out = plan.destination(s, bias);
    let mut columns = vec![T::zero(); patch_len * plan.max_block_pixels];
    for block in &plan.blocks {
        let block_pixels = block.rows * s.out_w;
        let columns = block.fill_columns(x, s, &mut columns);
        let product = MatProduct {
            m: s.out_channels,
            n: block_pixels,
            k: patch_len,
            dst_row_stride: plan.dst_row_stride,
            lhs_row_stride: patch_len,
            rhs_row_stride: block_pixels,
        };
        product.run(
            &mut out[block.dst_offset..],
            bias.is_some(),
            weight,
            columns,
        )?;
    }
    Ok(plan.finish(s, out))
}

/// One row of the column matrix: input channel and kernel offset `patch_index` (in the weight's
/// [C_in, k_h, k_w] order) for the output rows `first_row..` (numbered across images), zero
/// where the kernel reads padding.
pub(super) fn fill_column_row<T: WithDType>(
    x: &[T],
    s: &ConvShape,
    patch_index: usize,
    first_row: usize,
    column_row: &mut [T],
) {
    let channel = patch_index / (s.k_h * s.k_w);
    let ky = (patch_index / s.k_w) % s.k_h;
    let kx = patch_index % s.k_w;
    let (first_inside, end_inside) = s.inside_columns(kx);
    for (i, dst) in column_row.chunks_exact_mut(s.out_w).enumerate() {
        let row = first_row + i;
        let (image, oy) = (row / s.out_h, row % s.out_h);
        let iy = oy * s.stride + ky;
        if iy < s.padding || iy - s.padding >= s.in_h {
            dst.fill(T::zero());
            continue;
        }
        let src_start = ((image * s.in_channels + channel) * s.in_h + iy - s.padding) * s.in_w;
        let src = &x[src_start..src_start + s.in_w];
        dst[..first_inside].fill(T::zero());
        dst[end_inside..].fill(T::zero());
        let inside = &mut dst[first_inside..end_inside];
        if s.stride == 1 {
            // ox ≥ first_inside ≥ padding − kx, so the subtraction cannot underflow.
            let start = first_inside + kx - s.padding;
            inside.copy_from_slice(&src[start..start + inside.len()]);
        } else {
            for (j, value) in inside.iter_mut().enumerate() {
                *value = src[(first_inside + j) * s.stride + kx - s.padding];
            }
        }
    }
}

/// Sets every row of `rows` (rows of `row_len` values) to its channel's bias.
fn fill_rows_with_bias<T: WithDType>(rows: &mut [T], bias: &[T], row_len: usize) {
    for (row, &b) in rows.chunks_exact_mut(row_len).zip(bias.iter().cycle()) {
        row.fill(b);
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs`), row-major matrices with unit column stride:
/// lhs [m, k], rhs [k, n], dst [m, n], each row `*_row_stride` elements after the previous one.
#[derive(Debug, Clone, Copy)]
struct MatProduct {
    m: usize,
    n: usize,
    k: usize,
    dst_row_stride: usize,
    lhs_row_stride: usize,
    rhs_row_stride: usize,
}

impl MatProduct {
    fn run<T: WithDType>(
        &self,
        dst: &mut [T],
        accumulate: bool,
        lhs: &[T],
        rhs: &[T],
    ) -> Result<()> {
        let span = |rows: usize, stride: usize, cols: usize| match rows {
            0 => 0,
            rows => (rows - 1) * stride + cols,
        };
        if dst.len() < span(self.m, self.dst_row_stride, self.n)
            || lhs.len() < span(self.m, self.lhs_row_stride, self.k)
            || rhs.len() < span(self.k, self.rhs_row_stride, self.n)
        {
            candle_core::bail!("conv2d kernel: matrix product {self:?} out of its buffers");
        }
        if T::DTYPE == DType::F32 {
            // float32 goes through `Product`, which takes a narrow product (a small image's
            // convolution) without packing the weight.
            let product = super::product::Product::new(
                self.m,
                self.n,
                self.k,
                (self.dst_row_stride, 1),
                (self.lhs_row_stride, 1),
                (self.rhs_row_stride, 1),
            );
            // SAFETY: T is f32 (checked just above), so each slice is the same memory as an
            // f32 slice of the same length.
            let (dst, lhs, rhs) = unsafe {
                (
                    std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()),
                    std::slice::from_raw_parts(lhs.as_ptr().cast::<f32>(), lhs.len()),
                    std::slice::from_raw_parts(rhs.as_ptr().cast::<f32>(), rhs.len()),
                )
            };
            return product.run(dst, lhs, rhs, 1.0, accumulate, super::product::Threads::All);
        }
        let threads = super::product::thread_count();
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: the checks above keep every element the product reads or writes inside
        // `lhs`, `rhs` and `dst`; `dst` is borrowed mutably, so it aliases neither input. T is
        // f32, f64 or f16 (the callers' dtype match), all of which gemm implements.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                self.k,
                dst.as_mut_ptr(),
                1,
                self.dst_row_stride as isize,
                accumulate,
                lhs.as_ptr(),
                1,
                self.lhs_row_stride as isize,
                rhs.as_ptr(),
                1,
                self.rhs_row_stride as isize,
                T::from_f64(1.0),
                T::from_f64(1.0),
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok(())
    }
}

/// Group normalisation of `x` [B, C, ...] in `groups` groups, then `· weight[c] + bias[c]`,
/// then SiLU when `silu` is set, when the fused kernel applies (CPU, f32).
pub(super) fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    let Some(norm) = GroupNormShape::of(x, weight, bias, groups, eps) else {
        return Ok(None);
    };
    let dims = x.dims();
    let x = x.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    let (b_storage, b_layout) = bias.storage_and_layout();
    let x_data = contiguous_slice::<f32>(&x_storage, x_layout)?;
    let w_data = strided_vector::<f32>(&w_storage, w_layout)?;
    let b_data = strided_vector::<f32>(&b_storage, b_layout)?;
    let out = group_norm_forward(x_data, &w_data, &b_data, &norm, silu);
    drop(x_storage);
    Tensor::from_vec(out, dims, &Device::Cpu).map(Some)
}

/// The layout of a group norm's input: [images, `channels`, `spatial`] in `groups` groups of
/// consecutive channels.
#[derive(Debug, Clone, Copy)]
pub(super) struct GroupNormShape {
    pub(super) groups: usize,
    pub(super) channels: usize,
    pub(super) spatial: usize,
    pub(super) eps: f64,
}

impl GroupNormShape {
    pub(super) fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// Values in one group of one image.
    pub(super) fn group_len(&self) -> usize {
        self.channels_per_group() * self.spatial
    }

    /// The shape of a group norm of `x` [B, C, ...] by per-channel `weight` and `bias` in
    /// `groups` groups, when the fused kernels apply to it: all f32 on the CPU, C a multiple of
    /// `groups`, nothing empty. `None` sends the caller to candle's ops.
    pub(super) fn of(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        groups: usize,
        eps: f64,
    ) -> Option<Self> {
        let all_f32 = [x, weight, bias].iter().all(|t| t.dtype() == DType::F32);
        let on_cpu = [x, weight, bias].iter().all(|t| t.device().is_cpu());
        if !all_f32 || !on_cpu || x.rank() < 3 || groups == 0 {
            return None;
        }
        let dims = x.dims();
        let channels = dims[1];
        if !channels.is_multiple_of(groups)
            || weight.dims() != [channels]
            || bias.dims() != [channels]
            || x.elem_count() == 0
        {
            return None;
        }
        Some(Self {
            groups,
            channels,
            spatial: dims[2..].iter().product(),
            eps,
        })
    }
}

/// The group norm (+ SiLU) of contiguous `x`, with per-channel `weight` and `bias`.
pub(super) fn group_norm_forward(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    s: &GroupNormShape,
    silu: bool,
) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    let channels_per_group = s.channels_per_group();
    out.par_chunks_mut(s.group_len())
        .zip(x.par_chunks(s.group_len()))
        .enumerate()
        .for_each(|(index, (dst, src))| {
            let group = index % s.groups;
            let (mean, inv_std) = mean_and_inv_std(src, s.eps);
            for (offset, (dst, src)) in dst
                .chunks_exact_mut(s.spatial)
                .zip(src.chunks_exact(s.spatial))
                .enumerate()
            {
                let channel = group * channels_per_group + offset;
                let scale = (inv_std * f64::from(weight[channel])) as f32;
                normalize_row(dst, src, mean, scale, bias[channel], silu);
            }
        });
    out
}

/// The values of a contiguous CPU tensor.
pub(super) fn contiguous_slice<'a, T: WithDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("fused CPU kernel given a tensor on {:?}", storage.device());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused CPU kernel given a non-contiguous tensor");
    };
    Ok(&cpu.as_slice::<T>()?[start..end])
}

/// The f32 values of a contiguous storage, as a custom op's `cpu_fwd` receives it; a bf16
/// storage (a frozen weight held in bf16: LoRA's base in bf16 mixed precision) is widened into
/// a temporary copy.
pub(super) fn cpu_storage_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused CPU kernel given a non-contiguous tensor");
    };
    match storage {
        CpuStorage::BF16(values) => Ok(Cow::Owned(widen_bf16(&values[start..end]))),
        _ => Ok(Cow::Borrowed(&storage.as_slice::<f32>()?[start..end])),
    }
}

/// [`contiguous_slice`] as f32, widening a bf16 tensor (see [`cpu_storage_slice`]).
pub(super) fn contiguous_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<Cow<'a, [f32]>> {
    match storage {
        Storage::Cpu(cpu @ CpuStorage::BF16(_)) => cpu_storage_slice(cpu, layout),
        _ => contiguous_slice::<f32>(storage, layout).map(Cow::Borrowed),
    }
}

/// bf16 values as f32 (exact), on every core for a large weight.
fn widen_bf16(values: &[half::bf16]) -> Vec<f32> {
    let mut out = vec![0f32; values.len()];
    out.par_chunks_mut(1 << 16)
        .zip(values.par_chunks(1 << 16))
        .for_each(|(out, values)| {
            for (o, v) in out.iter_mut().zip(values) {
                *o = v.to_f32();
            }
        });
    out
}

/// The values of a rank-1 CPU tensor, whatever its stride.
pub(super) fn strided_vector<T: WithDType>(storage: &Storage, layout: &Layout) -> Result<Vec<T>> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("fused CPU kernel given a tensor on {:?}", storage.device());
    };
    let data = cpu.as_slice::<T>()?;
    let (&len, &stride) = match (layout.dims(), layout.stride()) {
        ([len], [stride]) => (len, stride),
        _ => candle_core::bail!(
            "fused CPU kernel expected a vector, got {:?}",
            layout.dims()
        ),
    };
    Ok((0..len)
        .map(|i| data[layout.start_offset() + i * stride])
        .collect())
}

#[cfg(test)]
mod tests {
    //! The fused kernels against candle's ops on the same inputs. Tolerance: the largest
    //! difference at most 1e-5 of the largest output value; the two sides sum the same
    //! products in different orders, which in float32 moves results by about 1e-7 relative
    //! per term cancelled, far below this, while any indexing mistake is of order 1.

    use super::*;
    use crate::model::nn::{self, Conv2d, GroupNorm};
    use candle_core::{Module, Var};

    const TOLERANCE: f32 = 1e-5;

    /// Deterministic values in [-1, 1) (plus `offset`), varied enough to catch index mix-ups.
    fn values(shape: &[usize], seed: u64, offset: f32) -> Tensor {
        let count: usize = shape.iter().product();
        let seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let data: Vec<f32> = super::super::test_values::lcg_values(count, seed)
            .into_iter()
            .map(|v| v + offset)
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).expect("shape matches the data")
    }

    fn relative_diff(actual: &Tensor, expected: &Tensor) -> f32 {
        assert_eq!(actual.dims(), expected.dims());
        let as_f32 = |t: &Tensor| t.to_dtype(DType::F32).expect("cast");
        let (actual, expected) = (as_f32(actual), as_f32(expected));
        let diff = (&actual - &expected)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference");
        let scale = expected
            .abs()
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("scale");
        assert!(scale > 0.0, "the reference output is all zeros");
        diff / scale
    }

    fn conv(
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Conv2d {
        let weight = values(&[out_c, in_c, kernel, kernel], 7, 0.0);
        let bias = bias.then(|| values(&[out_c], 8, 0.0));
        let config = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Conv2d::new(weight, bias, config)
    }

    #[test]
    fn conv_matches_candle_across_shapes() {
        // (batch, in, out, h, w, kernel, stride, padding, bias)
        let cases = [
            (2, 5, 7, 9, 11, 3, 1, 1, true),
            (3, 4, 6, 8, 8, 3, 2, 1, true),
            (1, 3, 4, 7, 5, 3, 2, 0, true),
            (2, 6, 5, 6, 7, 1, 1, 0, true),
            (2, 6, 5, 6, 7, 1, 2, 0, false),
            (1, 2, 3, 5, 5, 5, 1, 2, false),
            (2, 3, 4, 2, 3, 3, 1, 1, true),
        ];
        for (batch, in_c, out_c, h, w, kernel, stride, padding, bias) in cases {
            let conv = conv(in_c, out_c, kernel, stride, padding, bias);
            let x = values(&[batch, in_c, h, w], 3, 0.0);
            let fused = cpu_conv(&conv, &x);
            let reference = conv.forward_candle(&x).expect("candle conv");
            let diff = relative_diff(&fused, &reference);
            assert!(
                diff <= TOLERANCE,
                "case {:?}: relative difference {diff}",
                (batch, in_c, out_c, h, w, kernel, stride, padding)
            );
        }
    }

    /// The fused result, failing the test if the kernel declined.
    fn cpu_conv(conv: &Conv2d, x: &Tensor) -> Tensor {
        conv2d(x, conv.weight(), conv.bias(), conv.config())
            .expect("kernel ran")
            .expect("kernel applies")
    }

    /// How far the fused result is from candle's convolution.
    fn diff_from_candle(conv: &Conv2d, x: &Tensor) -> f32 {
        relative_diff(&cpu_conv(conv, x), &conv.forward_candle(x).expect("candle"))
    }

    /// `conv` with its weight and bias cast to `dtype`.
    fn conv_in(conv: &Conv2d, dtype: DType) -> Conv2d {
        let cast = |t: &Tensor| t.to_dtype(dtype).expect("cast");
        Conv2d::new(cast(conv.weight()), conv.bias().map(cast), *conv.config())
    }

    #[test]
    fn conv_reads_non_contiguous_inputs_and_f64() {
        let conv = conv(4, 3, 3, 1, 1, true);
        // [B, W, C, H] transposed to [B, C, H, W]: strided, not contiguous.
        let x = values(&[2, 6, 4, 5], 5, 0.0)
            .permute((0, 2, 3, 1))
            .expect("permute");
        assert!(!x.is_contiguous());
        let diff = diff_from_candle(&conv, &x);
        assert!(
            diff <= TOLERANCE,
            "strided input: relative difference {diff}"
        );

        let conv64 = conv_in(&conv, DType::F64);
        let x64 = x.to_dtype(DType::F64).expect("cast");
        let diff = diff_from_candle(&conv64, &x64);
        assert!(diff <= 1e-12, "f64: relative difference {diff}");
    }

    #[test]
    fn conv_in_f16_matches_candle() {
        let conv = conv(6, 5, 3, 1, 1, true);
        let conv16 = conv_in(&conv, DType::F16);
        let x = values(&[2, 6, 5, 4], 9, 0.0)
            .to_dtype(DType::F16)
            .expect("cast");
        let diff = diff_from_candle(&conv16, &x);
        // Half precision: both sides round products and sums to 11-bit mantissas.
        assert!(diff <= 5e-3, "f16: relative difference {diff}");
    }

    #[test]
    fn conv_in_several_column_blocks_matches_one_block() {
        // 7×6: small images share blocks across the batch (blocks straddle the two images);
        // 17×16 (272 pixels): each image alone, written in place, 17 rows in blocks of 3.
        for (h, w) in [(7, 6), (17, 16)] {
            blocks_match_one_block(h, w);
        }
    }

    fn blocks_match_one_block(h: usize, w: usize) {
        let s = ConvShape::same_3x3(2, 3, 4, h, w);
        let x = values(&[2, 3, h, w], 11, 0.0)
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("x");
        let weight = values(&[4, 27], 12, 0.0)
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("w");
        let b = values(&[4], 13, 0.0).to_vec1::<f32>().expect("b");
        let whole = im2col_conv(&x, &weight, Some(&b), &s, usize::MAX).expect("one block");
        // 27·w·3 elements: three output rows per block.
        let blocked = im2col_conv(&x, &weight, Some(&b), &s, 27 * w * 3).expect("blocks");
        assert_eq!(whole, blocked, "{h}×{w}");
        let tensor = |v: Vec<f32>| Tensor::from_vec(v, (2, 4, h, w), &Device::Cpu).expect("shape");
        let reference = conv(3, 4, 3, 1, 1, true);
        let reference = Conv2d::new(
            Tensor::from_vec(weight.clone(), (4, 3, 3, 3), &Device::Cpu).expect("w"),
            Some(Tensor::from_vec(b.clone(), 4, &Device::Cpu).expect("b")),
            *reference.config(),
        );
        let x = Tensor::from_vec(x, (2, 3, h, w), &Device::Cpu).expect("x");
        let diff = relative_diff(
            &tensor(blocked),
            &reference.forward_candle(&x).expect("candle"),
        );
        assert!(diff <= TOLERANCE, "{h}×{w}: relative difference {diff}");
    }

    #[test]
    fn conv_with_tracked_input_stays_differentiable() {
        let conv = conv(2, 3, 3, 1, 1, true);
        let x = Var::from_tensor(&values(&[1, 2, 4, 4], 1, 0.0)).expect("var");
        let y = conv.forward(x.as_tensor()).expect("forward");
        assert!(
            nn::needs_backward(&y),
            "a tracked input runs a differentiable op"
        );
        let grads = y.sum_all().and_then(|s| s.backward()).expect("backward");
        assert!(grads.get(x.as_tensor()).is_some());
    }

    #[test]
    fn group_norm_matches_candle() {
        // An offset mean stresses the variance computation.
        for (shape, groups, offset) in [
            (vec![2, 6, 5, 7], 3, 3.0),
            (vec![1, 8, 33], 4, -0.5),
            (vec![3, 4, 2, 2], 4, 0.0),
        ] {
            let channels = shape[1];
            let norm = GroupNorm::new(
                values(&[channels], 21, 1.0),
                values(&[channels], 22, 0.0),
                groups,
                1e-6,
            )
            .expect("group norm");
            let x = values(&shape, 23, offset);
            let reference = norm.forward_composed(&x).expect("candle");
            for silu in [false, true] {
                let fused = group_norm(&x, norm.weight(), norm.bias(), groups, 1e-6, silu)
                    .expect("kernel ran")
                    .expect("kernel applies");
                let expected = if silu {
                    reference.silu().expect("silu")
                } else {
                    reference.clone()
                };
                let diff = relative_diff(&fused, &expected);
                assert!(
                    diff <= TOLERANCE,
                    "{shape:?} silu {silu}: relative difference {diff}"
                );
            }
        }
    }

    #[test]
    fn attention_matches_composed() {
        // (batch, q_len, kv_len, heads, head_dim); 300 query rows over 600 keys make two
        // blocks of query rows, the second one partial; 512 keys take the padded score stride.
        for (batch, q_len, kv_len, heads, head_dim) in [
            (2, 10, 10, 2, 4),
            (1, 300, 600, 3, 5),
            (2, 7, 3, 1, 6),
            (2, 400, 512, 2, 8),
        ] {
            let inner = heads * head_dim;
            let q = values(&[batch, q_len, inner], 31, 0.0);
            let k = (values(&[batch, kv_len, inner], 32, 0.0) * 3.0).expect("scale");
            let v = values(&[batch, kv_len, inner], 33, 0.0);
            let fused = attention(&q, &k, &v, heads)
                .expect("kernel ran")
                .expect("kernel applies");
            let reference = nn::attention_composed(&q, &k, &v, heads).expect("composed");
            let diff = relative_diff(&fused, &reference);
            assert!(
                diff <= TOLERANCE,
                "{:?}: relative difference {diff}",
                (batch, q_len, kv_len, heads)
            );
        }
    }

    #[test]
    fn exp_is_accurate_to_about_one_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let exact = f64::from(x).exp();
            let error = (f64::from(exp_non_positive(x)) - exact).abs() / exact;
            worst = worst.max(error);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_non_positive(0.0), 1.0);
        assert_eq!(exp_non_positive(-200.0), 0.0);
        assert_eq!(exp_non_positive(f32::NEG_INFINITY), 0.0);
        assert!(exp_non_positive(f32::NAN).is_nan());
    }
}
