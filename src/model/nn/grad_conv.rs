//! The differentiable CPU convolution: the forward pass of `cpu.rs` (Winograd's, the direct
//! kernel or im2col + one large GEMM per block of output rows, as inference chooses) as a candle
//! custom op whose backward pass is built of GEMMs too:
//!
//! - the weight gradient dW [C_out, C_in·k_h·k_w] = Σ over blocks of dy_block · columnsᵀ,
//! - the input gradient: column gradients Wᵀ · dy_block, scattered back onto the input (col2im),
//!   or, at stride 1, the convolution of dy with the turned weight (Winograd's or the direct
//!   kernel, as the forward pass chooses),
//! - the bias gradient: dy summed per output channel.
//!
//! Each gradient is computed only for the tensors that were tracked when the forward pass ran,
//! so a frozen layer (LoRA training) costs no weight gradient.

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Device, Result, Shape, Tensor};
use candle_nn::Conv2dConfig;
use half::bf16;
use rayon::prelude::*;

use super::cpu::{self, COL_BLOCK_ELEMENTS, ConvShape, direct_conv, winograd};
use super::fused_op::{FrozenBf16Kernel, Grads3, apply_frozen_bf16, apply_weight_bias};
use super::product::{Product, Threads};

/// `x` [B, C_in, H, W] convolved with `weight` [C_out, C_in, k_h, k_w] (+ `bias` [C_out]) as a
/// differentiable op, when the kernel applies (CPU, f32, no groups or dilation; a frozen weight
/// may be held in bf16, widened to f32 for each product).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &Conv2dConfig,
) -> Result<Option<Tensor>> {
    let f32_bias = bias.is_none_or(|b| b.dtype() == DType::F32);
    if x.dtype() != DType::F32 || !f32_bias || !super::grad_linear::usable_weight(weight) {
        return Ok(None);
    }
    let Some(shape) = ConvShape::of_mixed(x, weight, bias, cfg)? else {
        return Ok(None);
    };
    let op = ConvOp {
        shape,
        col_block_elements: COL_BLOCK_ELEMENTS,
        input_tracked: x.track_op(),
        weight_tracked: weight.track_op(),
        bias_tracked: bias.is_some_and(Tensor::track_op),
    };
    if weight.dtype() == DType::BF16 && super::bf16::cpu_bf16_enabled() && !op.bias_tracked {
        return apply_frozen_bf16(FrozenBf16Conv(op), x, weight, bias).map(Some);
    }
    apply_weight_bias(op, x, weight, bias).map(Some)
}

/// The convolution over a frozen weight held in bf16 (LoRA's base in bf16 mixed precision, on
/// a CPU with avx512_bf16): the forward pass is the bf16 inference kernel's, and the input's
/// gradient (the only one) takes the column gradients Wᵀ · dy as bf16 products.
struct FrozenBf16Conv(ConvOp);

impl FrozenBf16Kernel for FrozenBf16Conv {
    fn name(&self) -> &'static str {
        "frozen-bf16-conv2d"
    }

    fn forward(
        &self,
        x: &[f32],
        weight: &[bf16],
        bias: Option<&[f32]>,
    ) -> Result<(Vec<f32>, Shape)> {
        let s = &self.0.shape;
        let out = super::bf16::conv_slices(x, weight, bias, s)?;
        Ok((
            out,
            Shape::from((s.batch, s.out_channels, s.out_h, s.out_w)),
        ))
    }

    fn input_gradient(&self, weight: &[bf16], dy: &[f32]) -> Result<Tensor> {
        let s = &self.0.shape;
        let input_shape = (s.batch, s.in_channels, s.in_h, s.in_w);
        // As in float32: a convolution of dy with the weight turned, where that convolution
        // runs by Winograd's algorithm; else the column gradients below.
        if let Some(transposed) = transposed_conv(s).filter(super::bf16::takes_winograd) {
            let turned = flipped_transpose(weight, s);
            let input_grad = super::bf16::conv_slices(dy, &turned, None, &transposed)?;
            return Tensor::from_vec(input_grad, input_shape, &Device::Cpu);
        }
        let (patch_len, out_c) = (s.patch_len(), s.out_channels);
        // Wᵀ [patch, C_out] by rows: the bf16 kernels read their left operand by rows.
        let mut transposed = vec![bf16::ZERO; weight.len()];
        transposed
            .par_chunks_mut(out_c)
            .enumerate()
            .for_each(|(patch_index, row)| {
                for (o, value) in row.iter_mut().enumerate() {
                    *value = weight[o * patch_len + patch_index];
                }
            });
        let weight = ConvWeight::Bf16Transposed(&transposed);
        let (input_grad, _) = if s.is_pointwise() {
            self.0.pointwise_backward(&[], weight, dy)?
        } else {
            self.0.im2col_backward(&[], weight, dy)?
        };
        let input_grad = input_grad.unwrap_or_default();
        Tensor::from_vec(input_grad, input_shape, &Device::Cpu)
    }
}

/// The weight as the input gradient's product reads it.
#[derive(Clone, Copy)]
enum ConvWeight<'a> {
    /// float32 [C_out, patch], read transposed.
    F32(&'a [f32]),
    /// bf16, already transposed to [patch, C_out].
    Bf16Transposed(&'a [bf16]),
}

impl ConvWeight<'_> {
    /// `dst [rows, cols] = Wᵀ [rows, C_out] · dy [C_out, cols]` (dy's rows `dy_row_stride`
    /// apart), rows being the patch length (C_in for a 1×1 convolution).
    fn transposed_times(
        self,
        dst: &mut [f32],
        (rows, cols, out_c): (usize, usize, usize),
        dy: &[f32],
        dy_row_stride: usize,
    ) -> Result<()> {
        match self {
            ConvWeight::F32(weight) => Product::new(
                rows,
                cols,
                out_c,
                (cols, 1),
                (1, rows),
                (dy_row_stride, 1),
            )
            .run(dst, weight, dy, 1.0, false, Threads::All),
            ConvWeight::Bf16Transposed(transposed) => super::bf16::Bf16Product {
                m: rows,
                n: cols,
                k: out_c,
                dst_row_stride: cols,
            }
            .run(
                dst,
                super::bf16::Lhs::Bf16 {
                    data: transposed,
                    row_stride: out_c,
                },
                super::bf16::Rhs::F32 {
                    data: dy,
                    strides: (dy_row_stride, 1),
                },
                1.0,
                false,
                Threads::All,
            ),
        }
    }
}

/// The convolution op: its geometry and which inputs need a gradient.
#[derive(Clone, Copy)]
struct ConvOp {
    shape: ConvShape,
    /// Largest im2col block in elements (a whole output row at least).
    col_block_elements: usize,
    input_tracked: bool,
    weight_tracked: bool,
    bias_tracked: bool,
}

/// The gradients of the input, the weight and the bias, each `None` when not needed.
/// The input's and the weight's gradient values, each where it was tracked.
type GradValues = (Option<Vec<f32>>, Option<Vec<f32>>);

impl ConvOp {
    fn convolve(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let s = &self.shape;
        let out = cpu::conv_f32(x, weight, bias, s, self.col_block_elements)?;
        let shape = Shape::from((s.batch, s.out_channels, s.out_h, s.out_w));
        Ok((CpuStorage::F32(out), shape))
    }

    fn gradients(
        &self,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
        has_bias: bool,
    ) -> Result<Grads3> {
        let s = &self.shape;
        let grad = grad.contiguous()?;
        let (g_storage, g_layout) = grad.storage_and_layout();
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let dy = cpu::contiguous_slice::<f32>(&g_storage, g_layout)?;
        let x_data = cpu::contiguous_slice::<f32>(&x_storage, x_layout)?;
        let w_data = cpu::contiguous_f32(&w_storage, w_layout)?;

        let bias_grad = (has_bias && self.bias_tracked).then(|| output_channel_sums(dy, s));
        let transposed = transposed_conv(s);
        let (input_grad, weight_grad) = if s.is_pointwise() {
            self.pointwise_backward(x_data, ConvWeight::F32(&w_data), dy)?
        } else if let Some(transposed) = transposed.filter(|_| self.input_tracked) {
            // The input's gradient as a convolution of dy (Winograd's or the direct one); only
            // the weight's (when tracked) takes the column matrix.
            let input_grad = cpu::conv_f32(
                dy,
                &flipped_transpose(&w_data, s),
                None,
                &transposed,
                self.col_block_elements,
            )?;
            let weight_grad = if self.weight_tracked {
                let weight_only = ConvOp {
                    input_tracked: false,
                    ..*self
                };
                weight_only
                    .im2col_backward(x_data, ConvWeight::F32(&w_data), dy)?
                    .1
            } else {
                None
            };
            (Some(input_grad), weight_grad)
        } else {
            self.im2col_backward(x_data, ConvWeight::F32(&w_data), dy)?
        };
        drop((g_storage, x_storage, w_storage));

        let input_grad = input_grad
            .map(|d| Tensor::from_vec(d, (s.batch, s.in_channels, s.in_h, s.in_w), &Device::Cpu))
            .transpose()?;
        let weight_grad = weight_grad
            .map(|d| {
                Tensor::from_vec(
                    d,
                    (s.out_channels, s.in_channels, s.k_h, s.k_w),
                    &Device::Cpu,
                )
            })
            .transpose()?;
        let bias_grad = bias_grad
            .map(|d| Tensor::from_vec(d, s.out_channels, &Device::Cpu))
            .transpose()?;
        Ok((input_grad, weight_grad, bias_grad))
    }

    /// 1×1, stride 1: per image, dW += dy[b] [C_out, P] · x[b]ᵀ [P, C_in] and
    /// dx[b] = Wᵀ [C_in, C_out] · dy[b] [C_out, P].
    fn pointwise_backward(
        &self,
        x: &[f32],
        weight: ConvWeight<'_>,
        dy: &[f32],
    ) -> Result<GradValues> {
        let s = &self.shape;
        let pixels = s.out_pixels();
        let (in_c, out_c) = (s.in_channels, s.out_channels);
        let mut weight_grad = self.weight_tracked.then(|| vec![0f32; out_c * in_c]);
        let mut input_grad = self
            .input_tracked
            .then(|| vec![0f32; s.batch * in_c * pixels]);
        for image in 0..s.batch {
            let dy_image = &dy[image * out_c * pixels..][..out_c * pixels];
            if let Some(dw) = &mut weight_grad {
                let product =
                    Product::new(out_c, in_c, pixels, (in_c, 1), (pixels, 1), (1, pixels));
                let x_image = &x[image * in_c * pixels..][..in_c * pixels];
                product.run(dw, dy_image, x_image, 1.0, true, Threads::All)?;
            }
            if let Some(dx) = &mut input_grad {
                let dx_image = &mut dx[image * in_c * pixels..][..in_c * pixels];
                weight.transposed_times(dx_image, (in_c, pixels, out_c), dy_image, pixels)?;
            }
        }
        Ok((input_grad, weight_grad))
    }

    /// The general case, in the forward pass's blocks of output rows (numbered across images):
    /// dy is first laid out as [C_out, B·P] (the forward pass's merged output), then for each
    /// block dW += dy_block · columnsᵀ and column gradients = Wᵀ · dy_block, added onto the
    /// input (col2im).
    fn im2col_backward(&self, x: &[f32], weight: ConvWeight<'_>, dy: &[f32]) -> Result<GradValues> {
        let s = &self.shape;
        let patch_len = s.patch_len();
        let pixels = s.out_pixels();
        let all_pixels = s.batch * pixels;
        let merged: Cow<[f32]> = if s.batch == 1 {
            Cow::Borrowed(dy)
        } else {
            // [B, C_out, P] → [C_out, B, P].
            let mut merged = vec![0f32; dy.len()];
            merged
                .par_chunks_mut(pixels)
                .enumerate()
                .for_each(|(index, dst)| {
                    let (channel, image) = (index / s.batch, index % s.batch);
                    let start = (image * s.out_channels + channel) * pixels;
                    dst.copy_from_slice(&dy[start..start + pixels]);
                });
            Cow::Owned(merged)
        };
        let total_rows = s.batch * s.out_h;
        let rows_per_block = s.rows_per_block(self.col_block_elements);
        let block_len = patch_len * rows_per_block * s.out_w;
        let mut weight_grad = self
            .weight_tracked
            .then(|| vec![0f32; s.out_channels * patch_len]);
        let mut input_grad = self
            .input_tracked
            .then(|| vec![0f32; s.batch * s.in_channels * s.in_h * s.in_w]);
        let mut columns = vec![0f32; if self.weight_tracked { block_len } else { 0 }];
        let mut column_grads = vec![0f32; if self.input_tracked { block_len } else { 0 }];
        let mut first_row = 0;
        while first_row < total_rows {
            let rows = rows_per_block.min(total_rows - first_row);
            let block_pixels = rows * s.out_w;
            let dy_block = &merged[first_row * s.out_w..];
            if let Some(dw) = &mut weight_grad {
                let block = &mut columns[..patch_len * block_pixels];
                block.par_chunks_mut(block_pixels).enumerate().for_each(
                    |(patch_index, column_row)| {
                        cpu::fill_column_row(x, s, patch_index, first_row, column_row);
                    },
                );
                let product = Product::new(
                    s.out_channels,
                    patch_len,
                    block_pixels,
                    (patch_len, 1),
                    (all_pixels, 1),
                    (1, block_pixels),
                );
                product.run(dw, dy_block, block, 1.0, true, Threads::All)?;
            }
            if let Some(dx) = &mut input_grad {
                let block = &mut column_grads[..patch_len * block_pixels];
                let sizes = (patch_len, block_pixels, s.out_channels);
                weight.transposed_times(block, sizes, dy_block, all_pixels)?;
                add_columns_to_image(block, s, first_row, rows, dx);
            }
            first_row += rows;
        }
        Ok((input_grad, weight_grad))
    }
}

/// The convolution whose output is the input gradient of `s` (stride 1, square kernel, where
/// Winograd's or the direct kernel applies): dy [B, C_out, H_out, W_out] convolved with the
/// weight turned half a circle and its channel axes swapped ([`flipped_transpose`]), padded by
/// k − 1 − p.
fn transposed_conv(s: &ConvShape) -> Option<ConvShape> {
    if s.stride != 1 || s.k_h != s.k_w || s.padding >= s.k_h {
        return None;
    }
    let transposed = ConvShape {
        batch: s.batch,
        in_channels: s.out_channels,
        in_h: s.out_h,
        in_w: s.out_w,
        out_channels: s.in_channels,
        k_h: s.k_h,
        k_w: s.k_w,
        stride: 1,
        padding: s.k_h - 1 - s.padding,
        out_h: s.in_h,
        out_w: s.in_w,
    };
    (winograd::applies(&transposed) || direct_conv::applies(&transposed)).then_some(transposed)
}

/// W [C_out, C_in, k_h, k_w] → W' [C_in, C_out, k_h, k_w] with W'[i, o, a, b] =
/// W[o, i, k_h − 1 − a, k_w − 1 − b].
fn flipped_transpose<T: Copy + Default + Send + Sync>(weight: &[T], s: &ConvShape) -> Vec<T> {
    let (kh, kw) = (s.k_h, s.k_w);
    let taps = kh * kw;
    let mut flipped = vec![T::default(); weight.len()];
    flipped
        .par_chunks_mut(s.out_channels * taps)
        .enumerate()
        .for_each(|(i, dst)| {
            for o in 0..s.out_channels {
                let src = &weight[(o * s.in_channels + i) * taps..][..taps];
                for (tap, value) in dst[o * taps..][..taps].iter_mut().enumerate() {
                    *value = src[taps - 1 - tap];
                }
            }
        });
    flipped
}

/// col2im: adds the column gradients of output rows `first_row..first_row + rows` (numbered
/// across images, [C_in·k_h·k_w, rows·W_out]) onto the input gradient [B, C_in, H, W] at the
/// input pixels each column entry was read from. One task per (image, channel) plane, so no
/// two tasks write the same value.
fn add_columns_to_image(
    column_grads: &[f32],
    s: &ConvShape,
    first_row: usize,
    rows: usize,
    input_grad: &mut [f32],
) {
    let block_pixels = rows * s.out_w;
    input_grad
        .par_chunks_mut(s.in_h * s.in_w)
        .enumerate()
        .for_each(|(plane_index, plane)| {
            let (image, channel) = (plane_index / s.in_channels, plane_index % s.in_channels);
            let image_rows = image * s.out_h..(image + 1) * s.out_h;
            let lo = first_row.max(image_rows.start);
            let hi = (first_row + rows).min(image_rows.end);
            if lo >= hi {
                return;
            }
            for ky in 0..s.k_h {
                for kx in 0..s.k_w {
                    let patch_index = (channel * s.k_h + ky) * s.k_w + kx;
                    let grad_row = &column_grads[patch_index * block_pixels..][..block_pixels];
                    let (first, end) = s.inside_columns(kx);
                    if first >= end {
                        continue;
                    }
                    for row in lo..hi {
                        let iy = (row - image_rows.start) * s.stride + ky;
                        if iy < s.padding || iy - s.padding >= s.in_h {
                            continue;
                        }
                        let dst = &mut plane[(iy - s.padding) * s.in_w..][..s.in_w];
                        let src = &grad_row[(row - first_row) * s.out_w..][..s.out_w];
                        if s.stride == 1 {
                            // first ≥ padding − kx (see `inside_columns`): no underflow.
                            let start = first + kx - s.padding;
                            for (d, g) in dst[start..start + end - first]
                                .iter_mut()
                                .zip(&src[first..end])
                            {
                                *d += g;
                            }
                        } else {
                            for ox in first..end {
                                dst[ox * s.stride + kx - s.padding] += src[ox];
                            }
                        }
                    }
                }
            }
        });
}

/// Σ over images and pixels of `dy` [B, C_out, P], per output channel: the bias gradient.
fn output_channel_sums(dy: &[f32], s: &ConvShape) -> Vec<f32> {
    let pixels = s.out_pixels();
    (0..s.out_channels)
        .into_par_iter()
        .map(|channel| {
            let total: f64 = (0..s.batch)
                .map(|image| {
                    let start = (image * s.out_channels + channel) * pixels;
                    cpu::sum_f64(&dy[start..start + pixels], |v| v)
                })
                .sum();
            total as f32
        })
        .collect()
}

super::fused_op::impl_weight_bias_kernels!(ConvOp, "fused-conv2d", convolve);

#[cfg(test)]
mod tests {
    use super::super::fused_op::Fused;
    use super::super::test_values::{max_difference, values, weighted_sum_gradients};
    use super::*;
    use candle_core::{Module, Var};

    /// Gradients of Σ y·r for x, weight and bias through `conv`.
    fn gradients(
        x: &Var,
        weight: &Var,
        bias: &Var,
        conv: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    ) -> Vec<Vec<f32>> {
        let y = conv(x.as_tensor(), weight.as_tensor(), bias.as_tensor());
        let r = values(y.dims(), 99);
        let grads = weighted_sum_gradients(&y, &r);
        [x, weight, bias]
            .iter()
            .map(|v| {
                let g = grads.get(v.as_tensor()).expect("gradient");
                g.flatten_all()
                    .and_then(|g| g.to_vec1::<f32>())
                    .expect("values")
            })
            .collect()
    }

    #[test]
    fn backward_in_several_column_blocks_matches_one_block() {
        let cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let x = Var::from_tensor(&values(&[2, 3, 7, 7], 1)).expect("x");
        let weight = Var::from_tensor(&values(&[4, 3, 3, 3], 2)).expect("weight");
        let bias = Var::from_tensor(&values(&[4], 3)).expect("bias");
        let run = |col_block_elements: usize| {
            gradients(&x, &weight, &bias, |x, w, b| {
                let shape = ConvShape::of(x, w, Some(b), &cfg)
                    .expect("shape")
                    .expect("applies");
                let op = ConvOp {
                    shape,
                    col_block_elements,
                    input_tracked: true,
                    weight_tracked: true,
                    bias_tracked: true,
                };
                x.apply_op3(w, b, Fused(op)).expect("forward")
            })
        };
        // Three output rows (of 4 columns) per block: blocks of 3, 3 and 2 of the 8 rows, the
        // second one crossing from the first image into the second. (7×7: candle's own
        // backward fails when height and width leave different remainders at stride 2.)
        let blocked = run(27 * 4 * 3);
        let whole = run(usize::MAX);
        for (blocked, whole) in blocked.iter().zip(&whole) {
            for (a, b) in blocked.iter().zip(whole) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
        let reference = gradients(&x, &weight, &bias, |x, w, b| {
            candle_nn::Conv2d::new(w.clone(), Some(b.clone()), cfg)
                .forward(x)
                .expect("candle")
        });
        for (blocked, reference) in blocked.iter().zip(&reference) {
            for (a, b) in blocked.iter().zip(reference) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    /// A frozen weight held in bf16 that the bf16 kernels do not take (here: a trained bias
    /// beside it; likewise a CPU without avx512_bf16) is widened for each product: exactly what
    /// its values compute in f32, 3×3 and 1×1, and no gradient for the weight.
    #[test]
    fn a_frozen_bf16_weight_computes_as_its_f32_values() {
        for (kernel, padding) in [(3, 1), (1, 0)] {
            let cfg = Conv2dConfig {
                padding,
                ..Default::default()
            };
            let x = Var::from_tensor(&values(&[3, 5, 6, 7], 1)).expect("x");
            let held = values(&[4, 5, kernel, kernel], 2)
                .to_dtype(DType::BF16)
                .expect("bf16");
            let widened = held.to_dtype(DType::F32).expect("f32");
            let bias = Var::from_tensor(&values(&[4], 3)).expect("bias");
            let run = |weight: &Tensor| {
                let y = conv2d(x.as_tensor(), weight, Some(bias.as_tensor()), &cfg)
                    .expect("forward")
                    .expect("applies");
                let r = values(y.dims(), 99);
                let grads = weighted_sum_gradients(&y, &r);
                assert!(grads.get(weight).is_none());
                let dx = grads.get(x.as_tensor()).expect("dx").clone();
                (y, dx)
            };
            let (y_held, dx_held) = run(&held);
            let (y_f32, dx_f32) = run(&widened);
            for (a, b) in [(y_held, y_f32), (dx_held, dx_f32)] {
                assert_eq!(max_difference(&a, &b), 0.0, "{kernel}×{kernel}");
            }
        }
    }

    fn largest(t: &Tensor) -> f32 {
        max_difference(t, &t.zeros_like().expect("zeros"))
    }

    /// Where the CPU has avx512_bf16, a frozen bf16 weight's convolution runs the bf16 kernels:
    /// its forward pass equals the inference kernel's, and the input's gradient is the float32
    /// one to bf16's rounding (3×3 with stride 2, 1×1, batch 3).
    #[test]
    fn a_frozen_bf16_weight_runs_the_bf16_kernels_where_the_cpu_has_them() {
        if !super::super::bf16::cpu_bf16_enabled() {
            return;
        }
        for (kernel, padding, stride) in [(3, 1, 2), (3, 1, 1), (1, 0, 1)] {
            let cfg = Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let x = Var::from_tensor(&values(&[3, 6, 9, 7], 1)).expect("x");
            let held = values(&[8, 6, kernel, kernel], 2)
                .to_dtype(DType::BF16)
                .expect("bf16");
            let bias = values(&[8], 3);
            let y = conv2d(x.as_tensor(), &held, Some(&bias), &cfg)
                .expect("forward")
                .expect("applies");
            let inference =
                super::super::bf16::conv2d(&x.as_tensor().detach(), &held, Some(&bias), &cfg)
                    .expect("inference")
                    .expect("applies");
            assert_eq!(max_difference(&y, &inference), 0.0);
            let r = values(y.dims(), 99);
            let dx = weighted_sum_gradients(&y, &r)
                .get(x.as_tensor())
                .expect("dx")
                .clone();
            let widened = held.to_dtype(DType::F32).expect("f32");
            let x_f32 = Var::from_tensor(x.as_tensor()).expect("x");
            let reference = candle_nn::Conv2d::new(widened, Some(bias.clone()), cfg)
                .forward(x_f32.as_tensor())
                .expect("reference");
            let expected = weighted_sum_gradients(&reference, &r)
                .get(x_f32.as_tensor())
                .expect("dx")
                .clone();
            let error = max_difference(&dx, &expected);
            assert!(
                error <= 1e-2 * largest(&expected),
                "{kernel}×{kernel} stride {stride}: {error}"
            );
        }
    }
}
