//! Float32 kernels written with AVX-512 intrinsics, on plain slices (no tensors): the direct
//! convolution of stride 1 ([`direct_conv`]), products with one narrow side ([`skinny`]) and
//! the softmax numerator (`softmax`, x86-64 only).
//! instruct-pix2pix's CPU backend (`src/model/nn/`) decides when they apply and calls them.
//!
//! They are a crate of their own so that debug builds optimise them as they do every
//! dependency: unoptimised, each intrinsic is a function call and each register array a
//! memory copy, and a tiny training step at 512² took minutes instead of seconds.

pub mod direct_conv;
pub mod skinny;
#[cfg(target_arch = "x86_64")]
pub mod softmax;

/// Pixels (float32 lanes) per AVX-512 vector.
const LANES: usize = 16;

/// Whether this CPU has AVX-512F, which every kernel here needs.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Why a kernel refused its arguments.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{kernel}: {shape} does not match its buffers")]
    ShapeMismatch { kernel: &'static str, shape: String },
    #[error("{0} needs AVX-512F, which this CPU lacks")]
    NoAvx512(&'static str),
}

#[cfg(test)]
mod tests {
    use super::direct_conv::{self, Geometry};
    use super::skinny::Skinny;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The convolution by its definition, in f64.
    fn reference_conv(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f64> {
        let (oh, ow) = (g.out_h(), g.out_w());
        let mut out = Vec::with_capacity(g.batch * g.out_channels * oh * ow);
        for b in 0..g.batch {
            for o in 0..g.out_channels {
                for y in 0..oh {
                    for x_out in 0..ow {
                        let mut sum = bias.map_or(0.0, |b| f64::from(b[o]));
                        for c in 0..g.in_channels {
                            for ky in 0..g.k_h {
                                for kx in 0..g.k_w {
                                    let (iy, ix) = (y + ky, x_out + kx);
                                    let (p, h, wd) = (g.padding, g.in_h, g.in_w);
                                    if iy < p || ix < p || iy - p >= h || ix - p >= wd {
                                        continue;
                                    }
                                    let xv =
                                        x[((b * g.in_channels + c) * h + iy - p) * wd + ix - p];
                                    let wv = w[((o * g.in_channels + c) * g.k_h + ky) * g.k_w + kx];
                                    sum += f64::from(xv) * f64::from(wv);
                                }
                            }
                        }
                        out.push(sum);
                    }
                }
            }
        }
        out
    }

    /// Partial channel tiles, rows ending inside a vector, the 2 + 2 split of four vectors,
    /// more taps than one chunk, padding 0 to 2, batch 3, with and without bias, one thread or
    /// several: the definition's values to float32 rounding.
    #[test]
    fn direct_conv_matches_its_definition() {
        if !super::available() {
            eprintln!("no AVX-512F: nothing to test on this CPU");
            return;
        }
        let geometry = |batch, in_channels, in_h, in_w, out_channels, k, padding| Geometry {
            batch,
            in_channels,
            in_h,
            in_w,
            out_channels,
            k_h: k,
            k_w: k,
            padding,
        };
        let cases = [
            geometry(1, 3, 11, 37, 11, 3, 1),
            geometry(3, 5, 6, 64, 9, 3, 1),
            geometry(2, 30, 4, 34, 8, 3, 0),
            geometry(1, 4, 7, 33, 3, 5, 2),
            geometry(1, 300, 3, 40, 17, 1, 0),
        ];
        for (n, g) in cases.iter().enumerate() {
            let taps = g.in_channels * g.k_h * g.k_w;
            let x = values(g.batch * g.in_channels * g.in_h * g.in_w, n as u32);
            let w = values(g.out_channels * taps, 100 + n as u32);
            let b = values(g.out_channels, 200 + n as u32);
            for (bias, threads) in [(Some(&b[..]), 4), (None, 1)] {
                let expected = reference_conv(&x, &w, bias, g);
                let actual = direct_conv::conv(&x, &w, bias, g, threads).unwrap();
                assert_eq!(actual.len(), expected.len());
                for (i, (&a, &e)) in actual.iter().zip(&expected).enumerate() {
                    assert!(
                        (f64::from(a) - e).abs() <= 1e-5 * (taps as f64).sqrt().max(e.abs()),
                        "case {n} {g:?}: element {i}: {a} vs {e}"
                    );
                }
            }
        }
        let g = cases[0];
        let x = values(g.batch * g.in_channels * g.in_h * g.in_w, 0);
        let error = direct_conv::conv(&x[1..], &x, None, &g, 1).unwrap_err();
        assert!(error.to_string().contains("does not match"), "{error}");
    }

    /// Narrow widths of 1 to 5 vectors (partial last vectors), a partial last tile of rows,
    /// transposed operands and output, scaling and accumulation, threaded or not.
    #[test]
    fn skinny_product_matches_its_definition() {
        if !super::available() {
            return;
        }
        // (wide, narrow, k, a transposed, b transposed, out transposed)
        let cases = [
            (131, 16, 20, false, false, false),
            (203, 40, 33, true, false, false),
            (129, 77, 50, false, true, true),
            (150, 80, 17, true, true, false),
            (9, 3, 64, false, false, true),
        ];
        for (n, &(wide, narrow, k, at, bt, ot)) in cases.iter().enumerate() {
            let strides = |rows: usize, cols: usize, t: bool| if t { (1, rows) } else { (cols, 1) };
            let product = Skinny {
                wide,
                narrow,
                k,
                a: strides(wide, k, at),
                b: strides(k, narrow, bt),
                out: strides(wide, narrow, ot),
            };
            let a = values(wide * k, 3 * n as u32);
            let b = values(k * narrow, 3 * n as u32 + 1);
            for (scale, accumulate, threaded) in [(1.0, false, true), (-0.5, true, false)] {
                let mut out = values(wide * narrow, 3 * n as u32 + 2);
                let before = out.clone();
                // SAFETY: AVX-512F checked above; every stride stays inside its buffer.
                unsafe { product.run(&mut out, &a, &b, scale, accumulate, threaded) };
                for i in 0..wide {
                    for j in 0..narrow {
                        let sum: f64 = (0..k)
                            .map(|l| {
                                f64::from(a[i * product.a.0 + l * product.a.1])
                                    * f64::from(b[l * product.b.0 + j * product.b.1])
                            })
                            .sum();
                        let at = i * product.out.0 + j * product.out.1;
                        let kept = if accumulate {
                            f64::from(before[at])
                        } else {
                            0.0
                        };
                        let expected = f64::from(scale) * sum + kept;
                        assert!(
                            (f64::from(out[at]) - expected).abs() <= 1e-5 * (k as f64).sqrt(),
                            "case {n}: ({i}, {j}): {} vs {expected}",
                            out[at]
                        );
                    }
                }
            }
        }
    }
}
