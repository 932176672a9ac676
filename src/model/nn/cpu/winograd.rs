//! The float32 3×3 convolution of stride 1 and padding 1 by Winograd's F(2×2, 3×3)
//! (`ip2p_kernels::winograd`: the transforms; here the 16 matrix products between them, on the
//! `gemm` crate): 2.25 times fewer multiply-adds than the direct convolution. Nearly every
//! convolution of the UNet and the VAE is of this kind (their resnets and the convolutions after
//! each upsampling), and so is the input gradient of each in training (the same convolution of
//! the output's gradient with the weight turned and transposed).
//!
//! Taken where both channel counts are wide enough for the products to run at the GEMM's speed
//! and the batch has enough tiles to amortise transforming the weight (which is 16/9 of the
//! weight's size, made again on every call: a cached copy would cost that much memory per
//! layer). [`WINOGRAD_VAR`] turns it off for the whole process.

use candle_core::Result;
use ip2p_kernels::winograd::{self, Geometry, TILE_VALUES};
use rayon::prelude::*;

use super::super::product::{Product, Threads};
use super::super::switch::KernelSwitch;
use super::ConvShape;

/// The environment variable that turns the Winograd convolution off (`off`) or on (`on`, the
/// default) for the whole process: for A/B measurements, or to get the direct convolution's
/// rounding exactly.
pub const WINOGRAD_VAR: &str = "INSTRUCT_PIX2PIX_WINOGRAD";

/// Both channel counts at least this: narrower products (the UNet's `conv_in` from 8 channels,
/// the VAE's from 3, `conv_out` to 4 or 3) run below the GEMM's speed and gain nothing.
const MIN_CHANNELS: usize = 32;

/// Tiles (2×2 output pixels, across the batch) at least this many: below it the products are
/// too narrow and transforming the weight costs as much as they save (a 1280-channel
/// convolution of 8² latents has 16 tiles an image).
const MIN_TILES: usize = 96;

/// V and M of one block of tiles together take about this many floats (16 MB): the blocks'
/// products then read U[ξ] and a cache-sized slice of V[ξ], and the buffers stay small next to
/// the images themselves.
pub(in crate::model::nn) const BLOCK_FLOATS: usize = 1 << 22;

/// The choice [`WINOGRAD_VAR`] and [`set_enabled`] make.
static SWITCH: KernelSwitch = KernelSwitch::new(
    WINOGRAD_VAR,
    (
        "on",
        "3×3 convolutions by Winograd's algorithm, the default",
    ),
    ("off", "the direct convolution"),
);

/// What [`WINOGRAD_VAR`] asks for: `Ok(None)` when it is unset, an error naming the variable
/// for any value other than `on` or `off`.
pub fn from_env() -> std::result::Result<Option<bool>, String> {
    SWITCH.read_env()
}

/// Turns the Winograd convolution on or off for the whole process (A/B measurements in one
/// process); overrides [`WINOGRAD_VAR`].
pub fn set_enabled(enabled: bool) {
    SWITCH.set(enabled);
}

/// Whether the Winograd convolution is on: as last set by [`set_enabled`], else as
/// [`WINOGRAD_VAR`] says (a bad value was refused by the command line), else on.
pub fn enabled() -> bool {
    SWITCH.enabled()
}

fn geometry(s: &ConvShape) -> Geometry {
    Geometry {
        batch: s.batch,
        in_channels: s.in_channels,
        out_channels: s.out_channels,
        height: s.in_h,
        width: s.in_w,
    }
}

/// Tiles of 2×2 output pixels across the batch.
pub(in crate::model::nn) fn tiles(s: &ConvShape) -> usize {
    geometry(s).tiles()
}

/// Whether this convolution runs here: 3×3, stride 1, padding 1, both channel counts at least
/// [`MIN_CHANNELS`], at least [`MIN_TILES`] tiles, and the algorithm on.
pub(in crate::model::nn) fn applies(s: &ConvShape) -> bool {
    (s.k_h, s.k_w, s.stride, s.padding) == (3, 3, 1, 1)
        && (s.out_h, s.out_w) == (s.in_h, s.in_w)
        && s.in_channels >= MIN_CHANNELS
        && s.out_channels >= MIN_CHANNELS
        && geometry(s).tiles() >= MIN_TILES
        && enabled()
}

/// `x` [B, C_in, H, W] convolved with `weight` [C_out, C_in, 3, 3] (+ `bias`), stride 1,
/// padding 1: [B, C_out, H, W]. The caller checks [`applies`] (any such shape is computed
/// correctly).
pub(in crate::model::nn) fn conv(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
) -> Result<Vec<f32>> {
    conv_in_blocks(x, weight, bias, s, BLOCK_FLOATS)
}

/// [`conv`] with blocks of whole tile rows whose V and M take about `block_floats` floats (one
/// tile row at least).
fn conv_in_blocks(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
    block_floats: usize,
) -> Result<Vec<f32>> {
    check_weight(s, weight.len())?;
    let (c_in, c_out) = (s.in_channels, s.out_channels);
    let u = winograd::transform_weights(weight, c_out, c_in);
    conv_with_products(x, bias, s, block_floats, |plane, m, v, count| {
        Product::new(c_out, count, c_in, (count, 1), (c_in, 1), (count, 1)).run(
            m,
            &u[plane * c_out * c_in..][..c_out * c_in],
            v,
            1.0,
            false,
            Threads::One,
        )
    })
}

/// Refuses a weight of `len` values that is not [C_out, C_in, 3, 3] for `s` (before the
/// transform, which would panic), and what [`check_shape`] refuses.
pub(in crate::model::nn) fn check_weight(s: &ConvShape, len: usize) -> Result<()> {
    check_shape(s)?;
    if len != s.out_channels * s.in_channels * 9 {
        candle_core::bail!("winograd conv2d: the weight does not match {s:?}");
    }
    Ok(())
}

/// Refuses what is not a 3×3 convolution of stride 1 and padding 1.
fn check_shape(s: &ConvShape) -> Result<()> {
    if (s.k_h, s.k_w, s.stride, s.padding) != (3, 3, 1, 1) || (s.out_h, s.out_w) != (s.in_h, s.in_w)
    {
        candle_core::bail!(
            "winograd conv2d: {s:?} is not a 3×3 convolution of stride 1, padding 1"
        );
    }
    Ok(())
}

/// The transforms around the 16 products, in blocks of whole tile rows whose V and M take about
/// `block_floats` floats. `plane_product(ξ, m, v, count)` writes M[ξ] [C_out, count] =
/// U[ξ] · V[ξ] for V[ξ] [C_in, count] (rows `count` apart, as M's): float32 or bf16 products of
/// a weight transformed once per call. The 16 run as one task each, in parallel.
pub(in crate::model::nn) fn conv_with_products(
    x: &[f32],
    bias: Option<&[f32]>,
    s: &ConvShape,
    block_floats: usize,
    plane_product: impl Fn(usize, &mut [f32], &[f32], usize) -> Result<()> + Sync,
) -> Result<Vec<f32>> {
    check_shape(s)?;
    let g = geometry(s);
    let (c_in, c_out) = (s.in_channels, s.out_channels);
    if x.len() != g.batch * c_in * s.in_h * s.in_w || bias.is_some_and(|b| b.len() != c_out) {
        candle_core::bail!("winograd conv2d: buffers do not match {s:?}");
    }
    let (tile_rows, tile_cols) = (g.batch * g.tile_rows(), g.tile_cols());
    // Whole tile rows a block.
    let block_rows =
        (block_floats / (TILE_VALUES * (c_in + c_out) * tile_cols)).clamp(1, tile_rows.max(1));
    let block_tiles = block_rows * tile_cols;
    let mut v = vec![0f32; TILE_VALUES * c_in * block_tiles];
    let mut m = vec![0f32; TILE_VALUES * c_out * block_tiles];
    let mut out = vec![0f32; g.batch * c_out * s.in_h * s.in_w];
    let mut first = 0;
    while first < tile_rows {
        let rows = block_rows.min(tile_rows - first);
        let count = rows * tile_cols;
        let (v, m) = (
            &mut v[..TILE_VALUES * c_in * count],
            &mut m[..TILE_VALUES * c_out * count],
        );
        winograd::transform_input(x, &g, first, rows, v);
        m.par_chunks_mut(c_out * count)
            .zip(v.par_chunks(c_in * count))
            .enumerate()
            .try_for_each(|(plane, (m, v))| plane_product(plane, m, v, count))?;
        winograd::transform_output(m, bias, &g, first, rows, &mut out);
        first += rows;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::super::test_values::lcg_values;
    use super::*;

    fn shape(batch: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> ConvShape {
        ConvShape::same_3x3(batch, c_in, c_out, h, w)
    }

    /// The products between the transforms give the im2col convolution's values, in one block
    /// and in blocks that split images and tile rows (a batch of 3, odd sizes), with and
    /// without bias.
    #[test]
    fn winograd_equals_the_im2col_convolution() {
        for (n, s) in [
            shape(3, 32, 40, 9, 13),
            shape(1, 64, 32, 32, 32),
            shape(2, 48, 64, 31, 17),
        ]
        .into_iter()
        .enumerate()
        {
            let x = lcg_values(s.batch * s.in_channels * s.in_h * s.in_w, 10 + n as u64);
            let w = lcg_values(s.out_channels * s.in_channels * 9, 20 + n as u64);
            let bias = lcg_values(s.out_channels, 30 + n as u64);
            for bias in [None, Some(bias.as_slice())] {
                let expected = super::super::im2col_conv(&x, &w, bias, &s, 1 << 20).unwrap();
                let largest = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
                // One tile row a block: blocks end inside images.
                let small_blocks = 1;
                for block_floats in [BLOCK_FLOATS, small_blocks] {
                    let got = conv_in_blocks(&x, &w, bias, &s, block_floats).unwrap();
                    for (i, (&a, &e)) in got.iter().zip(&expected).enumerate() {
                        assert!(
                            (a - e).abs() <= 2e-6 * largest.max(1.0),
                            "case {n}, blocks of {block_floats} floats, element {i}: {a} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn only_wide_3x3_convolutions_of_padding_1_apply() {
        assert!(applies(&shape(3, 320, 320, 32, 32)) || !enabled());
        assert!(!applies(&shape(3, 8, 320, 32, 32)));
        assert!(!applies(&shape(3, 320, 4, 32, 32)));
        assert!(!applies(&shape(3, 1280, 1280, 4, 4)));
        let mut padded_0 = shape(1, 64, 64, 32, 32);
        padded_0.padding = 0;
        (padded_0.out_h, padded_0.out_w) = (30, 30);
        assert!(!applies(&padded_0));
    }
}
