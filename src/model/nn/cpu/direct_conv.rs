//! The direct float32 convolution of stride 1 (`ip2p_kernels::direct_conv`: AVX-512 or
//! AVX2 + FMA, no im2col columns) for the fused kernels' [`ConvShape`]. The kernel crate checks
//! it against the convolution's definition; `tests/integration/nn_grad.rs` against candle's, through
//! `Conv2d`, forward and gradients.

use candle_core::Result;
use ip2p_kernels::direct_conv::{self, Geometry};

use super::ConvShape;

fn geometry(s: &ConvShape) -> Geometry {
    Geometry {
        batch: s.batch,
        in_channels: s.in_channels,
        in_h: s.in_h,
        in_w: s.in_w,
        out_channels: s.out_channels,
        k_h: s.k_h,
        k_w: s.k_w,
        padding: s.padding,
    }
}

/// Whether the direct kernel takes this convolution: stride 1, not 1×1 (one matrix product
/// per image needs no copy at all), and what [`direct_conv::applies`] asks (narrow padding,
/// rows of 32 pixels or more, AVX-512F or AVX2 + FMA).
pub(in crate::model::nn) fn applies(s: &ConvShape) -> bool {
    s.stride == 1 && !s.is_pointwise() && direct_conv::applies(&geometry(s))
}

/// Whether this CPU runs the direct kernel (AVX-512F, or AVX2 and FMA).
pub(in crate::model::nn) fn available() -> bool {
    direct_conv::available()
}

/// `x` [B, C_in, H, W] convolved with `weight` [C_out, C_in, k_h, k_w] (+ `bias`), stride 1:
/// [B, C_out, H_out, W_out] on the program's threads. The caller checks [`applies`].
pub(in crate::model::nn) fn conv(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
) -> Result<Vec<f32>> {
    let g = geometry(s);
    if s.stride != 1 || (g.out_h(), g.out_w()) != (s.out_h, s.out_w) {
        candle_core::bail!("direct conv2d: {s:?} is not a stride-1 convolution's shape");
    }
    let threads = super::super::product::thread_count();
    direct_conv::conv(x, weight, bias, &g, threads)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(
        batch: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        k: usize,
        p: usize,
    ) -> ConvShape {
        ConvShape {
            batch,
            in_channels: c_in,
            in_h: h,
            in_w: w,
            out_channels: c_out,
            k_h: k,
            k_w: k,
            stride: 1,
            padding: p,
            out_h: h + 2 * p - k + 1,
            out_w: w + 2 * p - k + 1,
        }
    }

    #[test]
    fn direct_conv_refuses_buffers_of_another_shape() {
        let s = shape(1, 2, 8, 40, 3, 3, 1);
        let x = vec![0f32; 2 * 8 * 40];
        let w = vec![0f32; 3 * 2 * 9];
        let error = conv(&x[1..], &w, None, &s).unwrap_err();
        assert!(error.to_string().contains("does not match"), "{error}");
        let strided = ConvShape { stride: 2, ..s };
        assert!(!applies(&strided));
        assert!(conv(&x, &w, None, &strided).is_err());
    }
}
