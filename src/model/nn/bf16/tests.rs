//! The bf16 kernels against candle's composed float32 ops.
//!
//! Two bounds: against candle's product of the *same bf16-rounded* inputs in float32, only the
//! order of the float32 sums differs (relative 1e-5 of the largest output); against the
//! unrounded float32 product, bf16's 8-bit mantissas move each result by about 2⁻⁸ of its
//! terms' size (bound: 1.5e-2 of the largest output, several times what random inputs show).
//! The AVX-512 kernel runs where the CPU has avx512_bf16, the AMX kernel where it has AMX; the
//! portable kernel, the fallback of every other CPU, always runs.

use candle_core::{DType, Device, Module, Tensor};
use half::bf16;

use super::super::test_values::{lcg_values, values};
use super::super::{self as nn, Conv2d, Linear};
use super::gemm::{Bf16Product, Kernel, Lhs, PackedRhs, Rhs};
use crate::model::nn::product::Threads;

const SAME_INPUTS: f32 = 1e-5;
const BF16_ROUNDING: f32 = 1.5e-2;

/// The kernels this CPU runs: the portable one always, AVX-512 where the CPU has it.
fn kernels() -> Vec<Kernel> {
    let mut kernels = vec![Kernel::Portable];
    if super::gemm::cpu_has_amx() {
        kernels.push(Kernel::Amx);
    }
    if super::cpu_has_bf16_dot() {
        kernels.push(Kernel::Avx512);
    } else {
        eprintln!("this CPU has no avx512_bf16: only the portable (fallback) kernel is tested");
    }
    kernels
}

fn round_bf16(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .and_then(|t| t.to_dtype(DType::F32))
        .expect("cast")
}

/// Largest difference over the largest reference value.
fn relative(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims());
    let scale = expected
        .abs()
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar::<f32>())
        .expect("scale");
    assert!(scale > 0.0, "the reference is all zeros");
    super::super::test_values::max_difference(actual, expected) / scale
}

/// Our product of `a` [m, k] and `b` [k, n] (float32 tensors) with `kernel`, through each way
/// of giving the operands: float32 rows and columns, transposed float32, bf16 in place,
/// pre-packed; every result must agree with the others within float32 summation order.
fn products(kernel: Kernel, a: &Tensor, b: &Tensor) -> Vec<(String, Tensor)> {
    let (m, k) = a.dims2().expect("a");
    let n = b.dim(1).expect("b");
    let a32 = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
    let a_t = a
        .t()
        .and_then(|t| t.contiguous())
        .and_then(|t| t.flatten_all());
    let a_t = a_t.and_then(|t| t.to_vec1::<f32>()).expect("aᵀ");
    let a16: Vec<bf16> = a32.iter().map(|&v| bf16::from_f32(v)).collect();
    let b32 = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
    let b_t = b
        .t()
        .and_then(|t| t.contiguous())
        .and_then(|t| t.flatten_all());
    let b_t = b_t.and_then(|t| t.to_vec1::<f32>()).expect("bᵀ");
    let b16_t: Vec<bf16> = b_t.iter().map(|&v| bf16::from_f32(v)).collect();
    let packed = PackedRhs::pack(
        &Rhs::F32 {
            data: &b32,
            strides: (n, 1),
        },
        k,
        n,
        Threads::All,
    )
    .expect("pack");
    let ways: Vec<(&str, Lhs<'_>, Rhs<'_>)> = vec![
        (
            "f32 rows × f32 rows",
            Lhs::F32 {
                data: &a32,
                strides: (k, 1),
            },
            Rhs::F32 {
                data: &b32,
                strides: (n, 1),
            },
        ),
        (
            "f32 transposed × f32 transposed",
            Lhs::F32 {
                data: &a_t,
                strides: (1, m),
            },
            Rhs::F32 {
                data: &b_t,
                strides: (1, k),
            },
        ),
        (
            "bf16 in place × bf16 transposed",
            Lhs::Bf16 {
                data: &a16,
                row_stride: k,
            },
            Rhs::Bf16 {
                data: &b16_t,
                strides: (1, k),
            },
        ),
        (
            "bf16 in place × packed",
            Lhs::Bf16 {
                data: &a16,
                row_stride: k,
            },
            Rhs::Packed(&packed),
        ),
    ];
    ways.into_iter()
        .map(|(name, lhs, rhs)| {
            // A row stride wider than n, one thread and all threads.
            let stride = n + 3;
            let mut out = vec![f32::NAN; m * stride];
            let threads = if name.starts_with("bf16") {
                Threads::One
            } else {
                Threads::All
            };
            Bf16Product {
                m,
                n,
                k,
                dst_row_stride: stride,
            }
            .run_with(kernel, &mut out, lhs, rhs, 1.0, false, threads)
            .expect("product");
            let rows: Vec<f32> = out
                .chunks(stride)
                .flat_map(|row| row[..n].to_vec())
                .collect();
            let tensor = Tensor::from_vec(rows, (m, n), &Device::Cpu).expect("shape");
            (format!("{kernel:?}, {name}"), tensor)
        })
        .collect()
}

#[test]
fn gemm_matches_float32_products_at_odd_sizes() {
    // Sizes around the panel (32 columns), tile (12 rows; 32 on AMX) and block (256 of k;
    // 2,048 on AMX) edges.
    for (m, n, k) in [
        (1, 1, 1),
        (13, 33, 7),
        (12, 32, 256),
        (25, 70, 129),
        (37, 65, 300),
        (250, 97, 514),
        (3, 200, 2),
        (40, 64, 64),
        (17, 33, 600),
        (45, 64, 4200),
    ] {
        let a = values(&[m, k], 1 + m as u64);
        let b = values(&[k, n], 2 + n as u64);
        let rounded = round_bf16(&a).matmul(&round_bf16(&b)).expect("matmul");
        let exact = a.matmul(&b).expect("matmul");
        for kernel in kernels() {
            for (name, ours) in products(kernel, &a, &b) {
                let same = relative(&ours, &rounded);
                assert!(
                    same <= SAME_INPUTS,
                    "{name} {m}×{n}×{k}: {same} from rounded"
                );
                let far = relative(&ours, &exact);
                assert!(far <= BF16_ROUNDING, "{name} {m}×{n}×{k}: {far} from f32");
            }
        }
    }
}

#[test]
fn gemm_accumulates_and_scales() {
    // α = 1 on whole panels is AMX's direct path (C loaded into the tiles and stored back).
    for ((m, n, k), alpha) in [
        ((30, 45, 77), 0.5),
        ((40, 64, 2500), 1.0),
        ((33, 96, 40), 1.0),
    ] {
        accumulates_and_scales(m, n, k, alpha);
    }
}

fn accumulates_and_scales(m: usize, n: usize, k: usize, alpha: f32) {
    let a = values(&[m, k], 5);
    let b = values(&[k, n], 6);
    let c = values(&[m, n], 7);
    let a32 = a.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("a");
    let b32 = b.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("b");
    let expected = ((round_bf16(&a).matmul(&round_bf16(&b)).expect("ab") * f64::from(alpha))
        .expect("scale")
        + &c)
        .expect("sum");
    for kernel in kernels() {
        let mut out = c.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("c");
        let product = Bf16Product {
            m,
            n,
            k,
            dst_row_stride: n,
        };
        let lhs = Lhs::F32 {
            data: &a32,
            strides: (k, 1),
        };
        let rhs = Rhs::F32 {
            data: &b32,
            strides: (n, 1),
        };
        product
            .run_with(kernel, &mut out, lhs, rhs, alpha, true, Threads::All)
            .expect("product");
        let ours = Tensor::from_vec(out, (m, n), &Device::Cpu).expect("shape");
        let diff = relative(&ours, &expected);
        assert!(
            diff <= SAME_INPUTS,
            "{kernel:?} {m}×{n}×{k} α {alpha}: {diff}"
        );
    }
}

#[test]
fn gemm_refuses_operands_outside_their_buffers() {
    let a = vec![0f32; 10];
    let b = vec![0f32; 10];
    let mut out = vec![0f32; 4];
    let product = Bf16Product {
        m: 2,
        n: 2,
        k: 6,
        dst_row_stride: 2,
    };
    let lhs = Lhs::F32 {
        data: &a,
        strides: (6, 1),
    };
    let rhs = Rhs::F32 {
        data: &b,
        strides: (2, 1),
    };
    let error = product
        .run(&mut out, lhs, rhs, 1.0, false, Threads::One)
        .expect_err("12 values of a do not fit in 10");
    assert!(error.to_string().contains("out of its buffer"), "{error}");
}

/// A bf16-weight layer and the same layer with the weight rounded to bf16 but in float32.
fn bf16_and_rounded(weight: &Tensor) -> (Tensor, Tensor) {
    let w16 = weight.to_dtype(DType::BF16).expect("cast");
    let w32 = w16.to_dtype(DType::F32).expect("cast");
    (w16, w32)
}

#[test]
fn linear_layer_matches_candle_in_float32() {
    // Batch 3 of 77 tokens (the text encoder's), odd feature counts; few rows and many
    // outputs take the transposed product (w read in place).
    for (rows, inputs, outputs) in [
        (3 * 77, 65, 33),
        (3 * 16, 320, 1280),
        (5, 7, 3),
        (3 * 2, 129, 1000),
    ] {
        let x = values(&[3, rows / 3, inputs], 11);
        let weight = values(&[outputs, inputs], 12);
        let bias = values(&[outputs], 13);
        let (w16, w32) = bf16_and_rounded(&weight);
        let ours = Linear::new(w16, Some(bias.clone()))
            .forward(&x)
            .expect("bf16 linear");
        let rounded = Linear::new(w32, Some(bias.clone()))
            .forward(&round_bf16(&x))
            .expect("f32 linear");
        let exact = x
            .broadcast_matmul(&weight.t().expect("t"))
            .and_then(|y| y.broadcast_add(&bias))
            .expect("candle");
        let same = relative(&ours, &rounded);
        assert!(same <= SAME_INPUTS, "{rows}×{inputs}→{outputs}: {same}");
        let far = relative(&ours, &exact);
        assert!(far <= BF16_ROUNDING, "{rows}×{inputs}→{outputs}: {far}");
    }
}

#[test]
fn convolution_matches_candle_in_float32() {
    // (batch, in, out, h, w, kernel, stride, padding): batch 3, an odd patch length (3·3·3),
    // stride 2, a 1×1 convolution, a non-square image; images of 256 pixels and more are
    // convolved one by one into the output.
    for (batch, in_c, out_c, h, w, kernel, stride, padding) in [
        (3, 5, 33, 17, 16, 3, 1, 1),
        (3, 3, 7, 9, 11, 3, 1, 1),
        (3, 8, 13, 8, 8, 3, 2, 1),
        (3, 6, 5, 6, 7, 1, 1, 0),
        (1, 33, 40, 5, 6, 3, 1, 1),
    ] {
        let weight = values(&[out_c, in_c, kernel, kernel], 21);
        let bias = values(&[out_c], 22);
        let x = values(&[batch, in_c, h, w], 23);
        let config = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let (w16, w32) = bf16_and_rounded(&weight);
        let ours = Conv2d::new(w16, Some(bias.clone()), config)
            .forward(&x)
            .expect("bf16 conv");
        let exact = Conv2d::new(weight, Some(bias.clone()), config)
            .forward_candle(&x)
            .expect("candle conv");
        let rounded = Conv2d::new(w32, Some(bias), config)
            .forward_candle(&round_bf16(&x))
            .expect("candle conv");
        let case = (batch, in_c, out_c, h, w, kernel, stride);
        let same = relative(&ours, &rounded);
        assert!(same <= SAME_INPUTS, "{case:?}: {same}");
        let far = relative(&ours, &exact);
        assert!(far <= BF16_ROUNDING, "{case:?}: {far}");
    }
}

#[test]
fn attention_matches_composed_float32() {
    // (batch, q_len, kv_len, heads, head_dim): batch 3, 77 keys (odd: the text context), more
    // than one block of query rows, head sizes of the UNet's levels.
    for (batch, q_len, kv_len, heads, head_dim) in
        [(3, 64, 77, 8, 40), (3, 200, 200, 2, 80), (1, 10, 3, 1, 6)]
    {
        let inner = heads * head_dim;
        let q = values(&[batch, q_len, inner], 31);
        let k = (values(&[batch, kv_len, inner], 32) * 2.0).expect("scale");
        let v = values(&[batch, kv_len, inner], 33);
        let ours = nn::attention_bf16(&q, &k, &v, heads).expect("bf16 attention");
        let exact = nn::attention_composed(&q, &k, &v, heads).expect("composed");
        let far = relative(&ours, &exact);
        let case = (batch, q_len, kv_len, heads, head_dim);
        assert!(far <= BF16_ROUNDING, "{case:?}: {far}");
        // Not float32 by accident: the products do round to bf16.
        assert!(far > 0.0, "{case:?}: identical to float32");
    }
}

#[test]
fn bf16_weights_load_only_inside_the_switch() {
    let weight = values(&[4, 6], 41);
    let outside = super::product_weight(weight.clone()).expect("weight");
    assert_eq!(outside.dtype(), DType::F32);
    let inside =
        super::with_bf16_products(|| super::product_weight(weight.clone())).expect("weight");
    assert_eq!(inside.dtype(), DType::BF16);
    let after = super::product_weight(weight).expect("weight");
    assert_eq!(after.dtype(), DType::F32, "the switch is restored");
}

#[test]
fn conversion_rounds_to_nearest_even_like_half() {
    // Ties, both directions, large and tiny values: the vector conversion (where the CPU has
    // it) and `half` agree bit for bit.
    let mut source = lcg_values(100, 51);
    source.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -3.0e38,
        1.0e-30,
        0.0,
        -0.0,
    ]);
    let mut ours = vec![bf16::ZERO; source.len()];
    super::gemm::convert_row(&mut ours, &source);
    for (&value, &converted) in source.iter().zip(&ours) {
        assert_eq!(converted, bf16::from_f32(value), "{value}");
    }
}

/// Winograd's convolution over a bf16 weight (3×3, stride 1, padding 1, wide channels): within
/// bf16's distance of the float32 convolution (measured: 0.4% of the largest output, against
/// im2col's 0.2%), in one block and in blocks of one tile row (a batch of 3, odd sizes, an odd
/// channel count); the layer, which takes im2col at these few tiles, within it too.
#[test]
fn winograd_convolution_stays_within_bf16_rounding_of_float32() {
    for (batch, in_c, out_c, h, w) in [(3, 32, 40, 9, 13), (2, 48, 33, 17, 16), (1, 64, 48, 24, 20)]
    {
        let weight = values(&[out_c, in_c, 3, 3], 31);
        let bias = values(&[out_c], 32);
        let x = values(&[batch, in_c, h, w], 33);
        let config = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let exact = Conv2d::new(weight.clone(), Some(bias.clone()), config)
            .forward_candle(&x)
            .expect("candle conv");
        let (w16, _) = bf16_and_rounded(&weight);
        let s = super::super::cpu::ConvShape::same_3x3(batch, in_c, out_c, h, w);
        assert!(
            super::winograd::applies(&s) || !super::winograd::enabled(),
            "{s:?}"
        );
        let x_data = x.flatten_all().and_then(|t| t.to_vec1::<f32>()).unwrap();
        let w_data = w16.flatten_all().and_then(|t| t.to_vec1::<bf16>()).unwrap();
        let b_data = bias.to_vec1::<f32>().unwrap();
        let case = (batch, in_c, out_c, h, w);
        for block_floats in [super::winograd::BLOCK_FLOATS, 1] {
            let out = super::winograd_conv(&x_data, &w_data, Some(&b_data), &s, block_floats)
                .expect("winograd bf16");
            let out = Tensor::from_vec(out, exact.dims(), &Device::Cpu).unwrap();
            let far = relative(&out, &exact);
            assert!(
                far <= BF16_ROUNDING,
                "{case:?}, blocks {block_floats}: {far}"
            );
            assert!(far > 0.0, "{case:?}: identical to float32");
        }
        let layer = Conv2d::new(w16, Some(bias), config)
            .forward(&x)
            .expect("bf16 conv");
        let far = relative(&layer, &exact);
        assert!(far <= BF16_ROUNDING, "{case:?}, the layer: {far}");
    }
}

/// The differentiable convolution over a frozen bf16 weight (LoRA's base in bf16 mixed
/// precision) where Winograd's applies to its forward pass and to its input's gradient (a
/// convolution of dy with the weight turned): values and the input's gradient within bf16's
/// distance of candle's float32 ones.
#[test]
fn frozen_bf16_convolution_by_winograd_has_the_float32_input_gradient() {
    if !super::cpu_bf16_enabled() {
        eprintln!("this CPU has no avx512_bf16: the frozen bf16 kernels do not run");
        return;
    }
    let (batch, in_c, out_c, side) = (2, 32, 40, 32);
    let weight = values(&[out_c, in_c, 3, 3], 41);
    let bias = values(&[out_c], 42);
    let x = candle_core::Var::from_tensor(&values(&[batch, in_c, side, side], 43)).unwrap();
    let upstream = values(&[batch, out_c, side, side], 44);
    let config = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let (w16, w32) = bf16_and_rounded(&weight);
    let run = |layer: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
        let y = layer(x.as_tensor()).expect("forward");
        let grads = (&y * &upstream)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.backward())
            .expect("backward");
        let dx = grads.get(x.as_tensor()).expect("input gradient").clone();
        (y, dx)
    };
    let frozen = Conv2d::new(w16, Some(bias.clone()), config);
    let reference = Conv2d::new(w32, Some(bias), config);
    let (y, dx) = run(&|x| frozen.forward(x));
    let (y_ref, dx_ref) = run(&|x| reference.forward_candle(x));
    let far = relative(&y, &y_ref);
    assert!(far <= BF16_ROUNDING, "forward: {far}");
    let far = relative(&dx, &dx_ref);
    assert!(far <= BF16_ROUNDING, "input gradient: {far}");
    assert!(far > 0.0, "the input gradient ran in float32");
}
