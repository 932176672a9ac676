//! The differentiable fused CPU kernels (`model::nn::differentiable`, what the modules run when
//! an input is tracked) against candle's composed ops on the same inputs: the values and the
//! gradient of every tracked input of Σ y·r (r fixed random weights, so that every output
//! element's gradient differs), over odd sizes, batches, strides, 1×1 kernels, padding,
//! cross-attention lengths, and tracked or untracked weights.
//!
//! Tolerance: the largest difference at most 1e-5 of the largest reference value for outputs
//! and 2e-5 for gradients (one more product and reduction deep). Both sides sum the same
//! float32 terms in different orders, which moves a result by about 1e-7 relative per term
//! cancelled; an indexing mistake is of order 1.

use candle_core::{DType, Device, Module, Tensor, Var};
use instruct_pix2pix::model::nn::{self, Conv2d, GroupNorm, LayerNorm};

const VALUE_TOLERANCE: f32 = 1e-5;
const GRADIENT_TOLERANCE: f32 = 2e-5;

/// Deterministic values in [-1, 1) plus `offset`, varied enough to catch index mix-ups.
fn values(shape: &[usize], seed: u64, offset: f32) -> Tensor {
    let count: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let data: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0 + offset
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// max |actual − expected| / max |expected|.
fn relative_diff(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims());
    assert_eq!(actual.dtype(), DType::F32);
    let diff = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = expected
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(scale > 0.0, "the reference is all zeros");
    diff / scale
}

/// An input of an op: a `Var` when tracked, else a plain tensor.
enum Input {
    Tracked(Var),
    Plain(Tensor),
}

impl Input {
    fn new(value: Tensor, tracked: bool) -> Self {
        if tracked {
            Self::Tracked(Var::from_tensor(&value).unwrap())
        } else {
            Self::Plain(value)
        }
    }

    fn tensor(&self) -> &Tensor {
        match self {
            Self::Tracked(var) => var.as_tensor(),
            Self::Plain(tensor) => tensor,
        }
    }
}

/// Runs `fused` and `reference` on the same `inputs` and compares the outputs and the
/// gradients of Σ y·r for every tracked input; untracked inputs must get no gradient.
fn check(
    case: &str,
    inputs: &[Input],
    fused: impl Fn(&[&Tensor]) -> Tensor,
    reference: impl Fn(&[&Tensor]) -> Tensor,
) {
    let tensors: Vec<&Tensor> = inputs.iter().map(Input::tensor).collect();
    let fused_out = fused(&tensors);
    let reference_out = reference(&tensors);
    let diff = relative_diff(&fused_out, &reference_out);
    assert!(diff <= VALUE_TOLERANCE, "{case}: output differs by {diff}");

    let r = values(reference_out.dims(), 77, 0.0);
    let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap();
    let fused_grads = loss(&fused_out).backward().unwrap();
    let reference_grads = loss(&reference_out).backward().unwrap();
    for (index, input) in inputs.iter().enumerate() {
        match input {
            Input::Tracked(var) => {
                let fused = fused_grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{case}: no gradient for input {index}"));
                let expected = reference_grads.get(var.as_tensor()).unwrap();
                let diff = relative_diff(fused, expected);
                assert!(
                    diff <= GRADIENT_TOLERANCE,
                    "{case}: gradient of input {index} differs by {diff}"
                );
            }
            Input::Plain(tensor) => {
                assert!(fused_grads.get(tensor).is_none(), "{case}: input {index}");
            }
        }
    }
}

/// (x, weight, bias) tracked: every input, the input only (frozen layer), the parameters only.
const TRACKED_SETS: [[bool; 3]; 3] = [
    [true, true, true],
    [true, false, false],
    [false, true, true],
];

#[test]
fn conv_matches_candle_values_and_gradients() {
    // (batch, in, out, h, w, kernel, stride, padding, bias)
    let cases = [
        (2, 5, 7, 9, 11, 3, 1, 1, true),
        (3, 4, 6, 9, 9, 3, 2, 1, true),
        (1, 3, 4, 7, 7, 3, 2, 0, true),
        (2, 6, 5, 6, 7, 1, 1, 0, true),
        (2, 6, 5, 7, 7, 1, 2, 0, false),
        (1, 2, 3, 5, 5, 5, 1, 2, false),
        (2, 3, 4, 2, 3, 3, 1, 1, true),
        // Rows of 32 pixels and more: the direct kernel, forward and input gradient (9
        // channels: a partial channel tile; 37: a row ending inside a vector).
        (2, 5, 9, 5, 37, 3, 1, 1, true),
        (1, 3, 4, 4, 34, 3, 1, 0, false),
        (1, 2, 3, 4, 33, 5, 1, 2, false),
        // 3×3, padding 1, 32 channels and more, 96 tiles and more: Winograd's F(2×2, 3×3),
        // forward and input gradient (odd sizes: tiles half outside the image).
        (3, 32, 33, 9, 21, 3, 1, 1, true),
    ];
    for (batch, in_c, out_c, h, w, kernel, stride, padding, has_bias) in cases {
        let config = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        for tracked in TRACKED_SETS {
            let mut inputs = vec![
                Input::new(values(&[batch, in_c, h, w], 1, 0.0), tracked[0]),
                Input::new(values(&[out_c, in_c, kernel, kernel], 2, 0.0), tracked[1]),
            ];
            if has_bias {
                inputs.push(Input::new(values(&[out_c], 3, 0.0), tracked[2]));
            }
            let conv =
                |t: &[&Tensor]| Conv2d::new(t[1].clone(), t.get(2).cloned().cloned(), config);
            let case = format!(
                "conv {:?} tracked {tracked:?}",
                (batch, in_c, out_c, h, w, kernel, stride, padding, has_bias)
            );
            check(
                &case,
                &inputs,
                |t| {
                    nn::differentiable::conv2d(t[0], t[1], t.get(2).copied(), &config)
                        .unwrap()
                        .expect("the kernel applies")
                },
                |t| conv(t).forward_candle(t[0]).unwrap(),
            );
            // The module dispatches to the same kernel when an input is tracked.
            let module = conv(&inputs.iter().map(Input::tensor).collect::<Vec<_>>());
            let x = inputs[0].tensor();
            let diff = relative_diff(
                &module.forward(x).unwrap(),
                &module.forward_candle(x).unwrap(),
            );
            assert!(
                diff <= VALUE_TOLERANCE,
                "{case}: module output differs by {diff}"
            );
        }
    }
}

#[test]
fn group_norm_matches_candle_values_and_gradients() {
    // (shape, groups, offset): an offset mean stresses the variance; 1 channel per group too.
    let cases = [
        (vec![2, 6, 5, 7], 3, 3.0),
        (vec![1, 8, 33], 4, -0.5),
        (vec![3, 4, 2, 2], 4, 0.0),
    ];
    for (shape, groups, offset) in cases {
        let channels = shape[1];
        for tracked in TRACKED_SETS {
            let inputs = [
                Input::new(values(&shape, 23, offset), tracked[0]),
                Input::new(values(&[channels], 21, 1.0), tracked[1]),
                Input::new(values(&[channels], 22, 0.0), tracked[2]),
            ];
            for silu in [false, true] {
                let norm = |t: &[&Tensor]| {
                    GroupNorm::new(t[1].clone(), t[2].clone(), groups, 1e-6).unwrap()
                };
                let case = format!("group norm {shape:?}/{groups} silu {silu} tracked {tracked:?}");
                check(
                    &case,
                    &inputs,
                    |t| {
                        nn::differentiable::group_norm(t[0], t[1], t[2], groups, 1e-6, silu)
                            .unwrap()
                            .expect("the kernel applies")
                    },
                    |t| {
                        let y = norm(t).forward_composed(t[0]).unwrap();
                        if silu { y.silu().unwrap() } else { y }
                    },
                );
            }
        }
    }
}

#[test]
fn layer_norm_matches_candle_values_and_gradients() {
    for (shape, offset) in [
        (vec![2, 7, 12], 2.0),
        (vec![5, 33], -0.5),
        (vec![3, 130, 16], 0.0),
    ] {
        let features = *shape.last().unwrap();
        for tracked in TRACKED_SETS {
            let inputs = [
                Input::new(values(&shape, 41, offset), tracked[0]),
                Input::new(values(&[features], 42, 1.0), tracked[1]),
                Input::new(values(&[features], 43, 0.0), tracked[2]),
            ];
            let case = format!("layer norm {shape:?} tracked {tracked:?}");
            check(
                &case,
                &inputs,
                |t| {
                    nn::differentiable::layer_norm(t[0], t[1], t[2], 1e-5)
                        .unwrap()
                        .expect("the kernel applies")
                },
                |t| {
                    let norm = LayerNorm {
                        weight: t[1].clone(),
                        bias: t[2].clone(),
                        eps: 1e-5,
                    };
                    norm.forward_candle(t[0]).unwrap()
                },
            );
        }
    }
}

#[test]
fn attention_matches_composed_values_and_gradients() {
    // (batch, q_len, kv_len, heads, head_dim): self-attention; 300 query rows make two blocks
    // of rows, the second partial; cross-attention over 77 text tokens; a single head.
    let cases = [
        (2, 10, 10, 2, 4),
        (1, 300, 300, 2, 5),
        (2, 300, 77, 3, 4),
        (2, 7, 3, 1, 6),
    ];
    // (q, k, v) tracked: all; q only (a frozen text projection); k and v only.
    let tracked_sets = [
        [true, true, true],
        [true, false, false],
        [false, true, true],
    ];
    for (batch, q_len, kv_len, heads, head_dim) in cases {
        let inner = heads * head_dim;
        for tracked in tracked_sets {
            let inputs = [
                Input::new(values(&[batch, q_len, inner], 31, 0.0), tracked[0]),
                Input::new(
                    (values(&[batch, kv_len, inner], 32, 0.0) * 3.0).unwrap(),
                    tracked[1],
                ),
                Input::new(values(&[batch, kv_len, inner], 33, 0.0), tracked[2]),
            ];
            let case = format!(
                "attention {:?} tracked {tracked:?}",
                (batch, q_len, kv_len, heads, head_dim)
            );
            check(
                &case,
                &inputs,
                |t| {
                    nn::differentiable::attention(t[0], t[1], t[2], heads)
                        .unwrap()
                        .expect("the kernel applies")
                },
                |t| nn::attention_composed(t[0], t[1], t[2], heads).unwrap(),
            );
        }
    }
}

#[test]
fn kernels_decline_what_they_do_not_handle() {
    let x = values(&[1, 4, 5, 5], 1, 0.0).to_dtype(DType::F64).unwrap();
    let w = values(&[4, 4, 3, 3], 2, 0.0).to_dtype(DType::F64).unwrap();
    let config = candle_nn::Conv2dConfig::default();
    assert!(
        nn::differentiable::conv2d(&x, &w, None, &config)
            .unwrap()
            .is_none()
    );
    let grouped = candle_nn::Conv2dConfig {
        groups: 2,
        ..Default::default()
    };
    let (x, w) = (values(&[1, 4, 5, 5], 1, 0.0), values(&[4, 2, 3, 3], 2, 0.0));
    assert!(
        nn::differentiable::conv2d(&x, &w, None, &grouped)
            .unwrap()
            .is_none()
    );
    let q = values(&[1, 4, 6], 3, 0.0);
    assert!(
        nn::differentiable::attention(&q, &q, &q, 4)
            .unwrap()
            .is_none(),
        "6 % 4 ≠ 0"
    );
}
