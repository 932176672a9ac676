//! The transforms of Winograd's minimal filtering F(2×2, 3×3) (Lavin and Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2016) for 3×3 convolutions of stride 1 and
//! padding 1: each 2×2 block of output pixels (a tile) is computed from the 4×4 input patch
//! around it with 16 products per channel pair instead of 36.
//!
//! ```text
//! Y = Aᵀ [ Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B) ] A
//! ```
//!
//! The sum over input channels c of the 16 elementwise products is 16 matrix products,
//! M[ξ] [C_out, tiles] = U[ξ] [C_out, C_in] · V[ξ] [C_in, tiles], which the caller runs (a GEMM
//! library); this module makes U from the weights ([`transform_weights`]), V from the input
//! ([`transform_input`]) and the output from M ([`transform_output`]). The 2.25 times fewer
//! multiply-adds come at the price of a slightly different rounding than the direct sum (the
//! transforms add and subtract inputs before they are multiplied), within float32's error of
//! the direct convolution for images of ordinary magnitude: the tests bound it.
//!
//! Tiles are numbered across the batch, row by row: tile row R is row R mod tile_rows of image
//! R / tile_rows; the caller transforms and multiplies a block of whole tile rows at a time so
//! that V and M stay a few megabytes.

use rayon::prelude::*;

use crate::DisjointOut;

/// Values per tile in the transformed domain (4×4).
pub const TILE_VALUES: usize = 16;

/// A 3×3 convolution of stride 1 and padding 1 (output as large as the input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Geometry {
    /// Tile rows per image (2 output rows each; the last may be half outside the image).
    pub fn tile_rows(&self) -> usize {
        self.height.div_ceil(2)
    }

    /// Tile columns per image.
    pub fn tile_cols(&self) -> usize {
        self.width.div_ceil(2)
    }

    /// Tiles of one image.
    pub fn tiles_per_image(&self) -> usize {
        self.tile_rows() * self.tile_cols()
    }

    /// Tiles of the whole batch.
    pub fn tiles(&self) -> usize {
        self.batch * self.tiles_per_image()
    }

    /// (image, tile row within it) of tile row `row` numbered across the batch.
    fn image_and_row(&self, row: usize) -> (usize, usize) {
        (row / self.tile_rows(), row % self.tile_rows())
    }
}

/// U [16, C_out, C_in] from the weight [C_out, C_in, 3, 3]: U[ξ][o][i] = (G g Gᵀ)[ξ] with
/// g = weight[o][i] and G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
pub fn transform_weights(weight: &[f32], out_channels: usize, in_channels: usize) -> Vec<f32> {
    transform_weights_as(weight, out_channels, in_channels, |w| w, |u| u)
}

/// [`transform_weights`] for weights of another type (bf16 bits, say): `widen` reads each
/// value as float32, the transform runs in float32, `narrow` stores each of U's values, all in
/// one pass.
pub fn transform_weights_as<W, U>(
    weight: &[W],
    out_channels: usize,
    in_channels: usize,
    widen: impl Fn(W) -> f32 + Sync,
    narrow: impl Fn(f32) -> U + Sync,
) -> Vec<U>
where
    W: Copy + Sync,
    U: Copy + Default + Send + Sync,
{
    assert_eq!(
        weight.len(),
        out_channels * in_channels * 9,
        "weight is not [C_out, C_in, 3, 3]"
    );
    let pair_count = out_channels * in_channels;
    let mut u = vec![U::default(); TILE_VALUES * pair_count];
    // One task per output channel transforms its filters into 16 rows of a scratch buffer, then
    // copies each row into its U[ξ]: for the usual channel counts the 16 planes lie a multiple
    // of 4 KiB apart, so writing a filter's 16 values in place would send 16 stores to one L1
    // cache set.
    let u_ptr = DisjointOut(u.as_mut_ptr());
    weight
        .par_chunks(in_channels * 9)
        .enumerate()
        .for_each_init(
            || vec![U::default(); TILE_VALUES * in_channels],
            |rows, (o, filters)| {
                let u_ptr = &u_ptr;
                for (i, g) in filters.chunks_exact(9).enumerate() {
                    let g: [f32; 9] = std::array::from_fn(|tap| widen(g[tap]));
                    for (xi, value) in weight_tile(&g).into_iter().enumerate() {
                        rows[xi * in_channels + i] = narrow(value);
                    }
                }
                for (xi, row) in rows.chunks_exact(in_channels).enumerate() {
                    // SAFETY: U[ξ][o] (in_channels values) is this task's alone, inside the
                    // buffer, and does not overlap the scratch row.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            row.as_ptr(),
                            u_ptr.0.add(xi * pair_count + o * in_channels),
                            in_channels,
                        )
                    };
                }
            },
        );
    u
}

/// G g Gᵀ of one 3×3 filter, row-major 4×4.
#[inline(always)]
fn weight_tile(g: &[f32]) -> [f32; TILE_VALUES] {
    // G g: 4×3, row by row.
    let mut gg = [[0f32; 3]; 4];
    for col in 0..3 {
        let (g0, g1, g2) = (g[col], g[3 + col], g[6 + col]);
        gg[0][col] = g0;
        gg[1][col] = 0.5 * (g0 + g1 + g2);
        gg[2][col] = 0.5 * (g0 - g1 + g2);
        gg[3][col] = g2;
    }
    // (G g) Gᵀ: 4×4.
    let mut out = [0f32; TILE_VALUES];
    for (row, r) in gg.iter().enumerate() {
        out[row * 4] = r[0];
        out[row * 4 + 1] = 0.5 * (r[0] + r[1] + r[2]);
        out[row * 4 + 2] = 0.5 * (r[0] - r[1] + r[2]);
        out[row * 4 + 3] = r[2];
    }
    out
}

/// V [16, C_in, count] for the tiles of tile rows `first_row..first_row + rows` (numbered
/// across the batch; count = rows · tile columns) of `x` [B, C_in, H, W]: V[ξ][c][t] =
/// (Bᵀ d B)[ξ] with d the 4×4 input patch of tile t in channel c (zeros outside the image) and
/// Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
///
/// Row by row: Bᵀ along the four input rows of a tile row at once (contiguous, vectorised),
/// then B along each tile's four columns (stride-2 reads, contiguous writes per ξ).
pub fn transform_input(x: &[f32], g: &Geometry, first_row: usize, rows: usize, v: &mut [f32]) {
    let plane = g.height * g.width;
    assert_eq!(
        x.len(),
        g.batch * g.in_channels * plane,
        "input is not [B, C_in, H, W]"
    );
    assert!(
        first_row + rows <= g.batch * g.tile_rows(),
        "tile rows past the batch"
    );
    let tile_cols = g.tile_cols();
    let count = rows * tile_cols;
    let per_value = g.in_channels * count;
    assert!(v.len() >= TILE_VALUES * per_value, "V buffer too small");
    let v_ptr = DisjointOut(v.as_mut_ptr());
    // Columns −1 ..= 2·tile_cols of a row (the zero border and a zero column past an odd width).
    let padded_w = 2 * tile_cols + 2;
    (0..g.in_channels).into_par_iter().for_each_init(
        || (vec![0f32; 4 * padded_w], vec![0f32; g.width]),
        |(u, zeros), c| {
            let v_ptr = &v_ptr;
            for row in 0..rows {
                let (image, tile_row) = g.image_and_row(first_row + row);
                let channel = &x[(image * g.in_channels + c) * plane..][..plane];
                // Input rows 2r − 1 ..= 2r + 2; zeros above and below the image.
                let d = |i: usize| -> &[f32] {
                    let y = 2 * tile_row + i;
                    if y == 0 || y > g.height {
                        zeros
                    } else {
                        &channel[(y - 1) * g.width..][..g.width]
                    }
                };
                let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                let (u0, rest) = u.split_at_mut(padded_w);
                let (u1, rest) = rest.split_at_mut(padded_w);
                let (u2, u3) = rest.split_at_mut(padded_w);
                // Bᵀ d over the image's columns (the border columns stay zero).
                let inner = 1..=g.width;
                for ((((((u0, u1), u2), u3), &a), &b), (&c2, &e)) in u0[inner.clone()]
                    .iter_mut()
                    .zip(u1[inner.clone()].iter_mut())
                    .zip(u2[inner.clone()].iter_mut())
                    .zip(u3[inner].iter_mut())
                    .zip(d0)
                    .zip(d1)
                    .zip(d2.iter().zip(d3))
                {
                    *u0 = a - c2;
                    *u1 = b + c2;
                    *u2 = c2 - b;
                    *u3 = b - e;
                }
                let local = row * tile_cols;
                for (i, ui) in [&*u0, &*u1, &*u2, &*u3].into_iter().enumerate() {
                    // SAFETY: the four runs (ξ = 4i .. 4i + 3, channel c, this tile row's
                    // tiles) are written by this task only and lie inside the buffer.
                    let out = |j: usize| unsafe {
                        std::slice::from_raw_parts_mut(
                            v_ptr.0.add((4 * i + j) * per_value + c * count + local),
                            tile_cols,
                        )
                    };
                    let (o0, o1, o2, o3) = (out(0), out(1), out(2), out(3));
                    for t in 0..tile_cols {
                        let k = 2 * t;
                        o0[t] = ui[k] - ui[k + 2];
                        o1[t] = ui[k + 1] + ui[k + 2];
                        o2[t] = ui[k + 2] - ui[k + 1];
                        o3[t] = ui[k + 1] - ui[k + 3];
                    }
                }
            }
        },
    );
}

/// The output pixels of tile rows `first_row..first_row + rows` from M [16, C_out, count]:
/// Y = Aᵀ m A (+ bias) with Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]], written into `out`
/// [B, C_out, H, W] (the parts of a tile outside the image are dropped).
pub fn transform_output(
    m: &[f32],
    bias: Option<&[f32]>,
    g: &Geometry,
    first_row: usize,
    rows: usize,
    out: &mut [f32],
) {
    let plane = g.height * g.width;
    assert_eq!(
        out.len(),
        g.batch * g.out_channels * plane,
        "output is not [B, C_out, H, W]"
    );
    assert!(
        first_row + rows <= g.batch * g.tile_rows(),
        "tile rows past the batch"
    );
    let tile_cols = g.tile_cols();
    let count = rows * tile_cols;
    let per_value = g.out_channels * count;
    assert!(m.len() >= TILE_VALUES * per_value, "M buffer too small");
    assert!(
        bias.is_none_or(|b| b.len() == g.out_channels),
        "bias is not [C_out]"
    );
    let out_ptr = DisjointOut(out.as_mut_ptr());
    (0..g.out_channels).into_par_iter().for_each_init(
        // Aᵀ m (4 columns × 2 rows of tile_cols values), then one output line.
        || vec![0f32; 8 * tile_cols + 2 * tile_cols],
        |scratch, o| {
            let out_ptr = &out_ptr;
            let shift = bias.map_or(0.0, |b| b[o]);
            let (w, pixels) = scratch.split_at_mut(8 * tile_cols);
            for row in 0..rows {
                let (image, tile_row) = g.image_and_row(first_row + row);
                let local = row * tile_cols;
                let m_run = |xi: usize| &m[xi * per_value + o * count + local..][..tile_cols];
                // Aᵀ m: for each of the 4 columns j, the tile's two rows.
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (m_run(j), m_run(4 + j), m_run(8 + j), m_run(12 + j));
                    let (w0, rest) = w[2 * j * tile_cols..].split_at_mut(tile_cols);
                    let w1 = &mut rest[..tile_cols];
                    for t in 0..tile_cols {
                        w0[t] = m0[t] + m1[t] + m2[t];
                        w1[t] = m1[t] - m2[t] - m3[t];
                    }
                }
                // (Aᵀ m) A: two output rows of 2·tile_cols pixels.
                for dy in 0..2 {
                    let y = 2 * tile_row + dy;
                    if y >= g.height {
                        break;
                    }
                    let w_run = |j: usize| &w[(2 * j + dy) * tile_cols..][..tile_cols];
                    let (w0, w1, w2, w3) = (w_run(0), w_run(1), w_run(2), w_run(3));
                    let line = &mut *pixels;
                    for t in 0..tile_cols {
                        line[2 * t] = w0[t] + w1[t] + w2[t] + shift;
                        line[2 * t + 1] = w1[t] - w2[t] - w3[t] + shift;
                    }
                    // SAFETY: row y of channel o in this image is written by this task only
                    // and lies inside the buffer.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out_ptr
                                .0
                                .add((image * g.out_channels + o) * plane + y * g.width),
                            g.width,
                        )
                    };
                    dst.copy_from_slice(&line[..g.width]);
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::direct_conv;
    use crate::test_support::{reference_conv, values};

    /// The 3×3, padding 1 convolution by its definition, in f64.
    fn reference(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &Geometry) -> Vec<f64> {
        let direct = direct_conv::Geometry {
            batch: g.batch,
            in_channels: g.in_channels,
            in_h: g.height,
            in_w: g.width,
            out_channels: g.out_channels,
            k_h: 3,
            k_w: 3,
            padding: 1,
        };
        reference_conv(x, w, bias, &direct)
    }

    /// The three transforms with the 16 products written out, over blocks of `block` tile rows.
    fn winograd(
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        g: &Geometry,
        block: usize,
    ) -> Vec<f32> {
        let u = transform_weights(w, g.out_channels, g.in_channels);
        let mut out = vec![f32::NAN; g.batch * g.out_channels * g.height * g.width];
        let all_rows = g.batch * g.tile_rows();
        let mut first = 0;
        while first < all_rows {
            let rows = block.min(all_rows - first);
            let count = rows * g.tile_cols();
            let mut v = vec![0f32; TILE_VALUES * g.in_channels * count];
            transform_input(x, g, first, rows, &mut v);
            let mut m = vec![0f32; TILE_VALUES * g.out_channels * count];
            for xi in 0..TILE_VALUES {
                for o in 0..g.out_channels {
                    for t in 0..count {
                        m[(xi * g.out_channels + o) * count + t] = (0..g.in_channels)
                            .map(|i| {
                                u[(xi * g.out_channels + o) * g.in_channels + i]
                                    * v[(xi * g.in_channels + i) * count + t]
                            })
                            .sum();
                    }
                }
            }
            transform_output(&m, bias, g, first, rows, &mut out);
            first += rows;
        }
        out
    }

    #[test]
    fn winograd_equals_the_convolution_s_definition() {
        // Odd and even sizes, a batch of 3, blocks of tile rows that split images.
        for (n, &(batch, c_in, c_out, h, w, block)) in [
            (1, 1, 1, 2, 2, 1),
            (1, 3, 2, 5, 7, 2),
            (3, 4, 5, 6, 6, 2),
            (2, 8, 3, 9, 4, 100),
            (3, 2, 4, 1, 3, 2),
            (2, 3, 3, 7, 1, 3),
        ]
        .iter()
        .enumerate()
        {
            let g = Geometry {
                batch,
                in_channels: c_in,
                out_channels: c_out,
                height: h,
                width: w,
            };
            let x = values(batch * c_in * h * w, 3 * n as u32);
            let weight = values(c_out * c_in * 9, 3 * n as u32 + 1);
            let bias = values(c_out, 3 * n as u32 + 2);
            for bias in [None, Some(bias.as_slice())] {
                let expected = reference(&x, &weight, bias, &g);
                let got = winograd(&x, &weight, bias, &g, block);
                let scale = (9 * c_in) as f64;
                for (i, (&a, &e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (f64::from(a) - e).abs() <= 4e-7 * scale,
                        "case {n}, element {i}: {a} vs {e}"
                    );
                }
            }
        }
    }
}
