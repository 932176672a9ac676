//! From coefficients to pixels as libjpeg-turbo 3 does it with its defaults (what Pillow uses):
//! the accurate integer IDCT (`jidctint.c`, `JDCT_ISLOW`), "fancy" upsampling (`jdsample.c`:
//! the triangle filter for 2:1 horizontal, vertical or both, a box filter for other integral
//! ratios and for chroma one or two samples wide) with the context rows `jdmainct.c` gives it
//! (the first and last rows repeated), and the colour conversions of `jdcolor.c` (YCbCr → RGB
//! through its 16-bit fixed-point tables, YCCK → CMYK).

use super::JpegError;
use super::entropy::Coefficients;

/// One decoded component's samples before upsampling: `width × height` is its downsampled size
/// (`downsampled_width`/`height` in libjpeg), `stride` the row length stored.
pub(super) struct Plane {
    pub width: usize,
    pub height: usize,
    pub stride: usize,
    pub samples: Vec<u8>,
}

impl Plane {
    fn row(&self, y: usize) -> &[u8] {
        let y = y.min(self.height.saturating_sub(1));
        &self.samples[y * self.stride..y * self.stride + self.width]
    }
}

/// A vector of `len` zeros, or an error instead of an abort when memory runs out.
pub(super) fn zeroed<T: Clone + Default>(len: usize) -> Result<Vec<T>, JpegError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| JpegError::OutOfMemory)?;
    v.resize(len, T::default());
    Ok(v)
}

// jidctint.c's constants (CONST_BITS 13, PASS1_BITS 2).
const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

fn descale(x: i64, n: u32) -> i64 {
    (x + (1i64 << (n - 1))) >> n
}

/// libjpeg's post-IDCT range limit (`IDCT_range_limit`, indexed with `& RANGE_MASK`): the
/// sample for an IDCT output `x` before the +128 level shift; values within ±512 clamp to
/// 0..=255, the rest wrap around as the table does.
fn range_limit_idct(x: i64) -> u8 {
    let x = (x & 1023) as i32;
    match x {
        0..=127 => (x + 128) as u8,
        128..=511 => 255,
        512..=895 => 0,
        _ => (x - 896) as u8,
    }
}

/// `jpeg_idct_islow` on one block: `coef` in natural order, `quant` the component's table as
/// libjpeg's `ISLOW_MULT_TYPE` (16 bits in a SIMD build); writes 8×8 samples at `out` with
/// row `stride`.
fn idct_islow(coef: &[i16; 64], quant: &[i16; 64], out: &mut [u8], stride: usize) {
    let mut ws = [0i32; 64];
    let dequant = |i: usize| -> i64 { i64::from(i32::from(coef[i]) * i32::from(quant[i])) };
    for col in 0..8 {
        if (1..8).all(|r| coef[r * 8 + col] == 0) {
            let dc = (dequant(col) << PASS1_BITS) as i32;
            for r in 0..8 {
                ws[r * 8 + col] = dc;
            }
            continue;
        }
        let z2 = dequant(16 + col);
        let z3 = dequant(48 + col);
        let z1 = (z2 + z3) * FIX_0_541196100;
        let tmp2 = z1 + z3 * -FIX_1_847759065;
        let tmp3 = z1 + z2 * FIX_0_765366865;
        let z2 = dequant(col);
        let z3 = dequant(32 + col);
        let tmp0 = (z2 + z3) << CONST_BITS;
        let tmp1 = (z2 - z3) << CONST_BITS;
        let tmp10 = tmp0 + tmp3;
        let tmp13 = tmp0 - tmp3;
        let tmp11 = tmp1 + tmp2;
        let tmp12 = tmp1 - tmp2;
        let (t0, t1, t2, t3) = odd_part(
            dequant(56 + col),
            dequant(40 + col),
            dequant(24 + col),
            dequant(8 + col),
        );
        let shift = CONST_BITS - PASS1_BITS;
        ws[col] = descale(tmp10 + t3, shift) as i32;
        ws[56 + col] = descale(tmp10 - t3, shift) as i32;
        ws[8 + col] = descale(tmp11 + t2, shift) as i32;
        ws[48 + col] = descale(tmp11 - t2, shift) as i32;
        ws[16 + col] = descale(tmp12 + t1, shift) as i32;
        ws[40 + col] = descale(tmp12 - t1, shift) as i32;
        ws[24 + col] = descale(tmp13 + t0, shift) as i32;
        ws[32 + col] = descale(tmp13 - t0, shift) as i32;
    }
    for row in 0..8 {
        let w = &ws[row * 8..row * 8 + 8];
        let o = &mut out[row * stride..row * stride + 8];
        if w[1..].iter().all(|&v| v == 0) {
            o.fill(range_limit_idct(descale(i64::from(w[0]), PASS1_BITS + 3)));
            continue;
        }
        let z2 = i64::from(w[2]);
        let z3 = i64::from(w[6]);
        let z1 = (z2 + z3) * FIX_0_541196100;
        let tmp2 = z1 + z3 * -FIX_1_847759065;
        let tmp3 = z1 + z2 * FIX_0_765366865;
        let tmp0 = (i64::from(w[0]) + i64::from(w[4])) << CONST_BITS;
        let tmp1 = (i64::from(w[0]) - i64::from(w[4])) << CONST_BITS;
        let tmp10 = tmp0 + tmp3;
        let tmp13 = tmp0 - tmp3;
        let tmp11 = tmp1 + tmp2;
        let tmp12 = tmp1 - tmp2;
        let (t0, t1, t2, t3) = odd_part(
            i64::from(w[7]),
            i64::from(w[5]),
            i64::from(w[3]),
            i64::from(w[1]),
        );
        let shift = CONST_BITS + PASS1_BITS + 3;
        o[0] = range_limit_idct(descale(tmp10 + t3, shift));
        o[7] = range_limit_idct(descale(tmp10 - t3, shift));
        o[1] = range_limit_idct(descale(tmp11 + t2, shift));
        o[6] = range_limit_idct(descale(tmp11 - t2, shift));
        o[2] = range_limit_idct(descale(tmp12 + t1, shift));
        o[5] = range_limit_idct(descale(tmp12 - t1, shift));
        o[3] = range_limit_idct(descale(tmp13 + t0, shift));
        o[4] = range_limit_idct(descale(tmp13 - t0, shift));
    }
}

/// The odd part of jidctint's 1-D IDCT, "per figure 8": inputs y7, y5, y3, y1.
fn odd_part(y7: i64, y5: i64, y3: i64, y1: i64) -> (i64, i64, i64, i64) {
    let z1 = y7 + y1;
    let z2 = y5 + y3;
    let z3 = y7 + y3;
    let z4 = y5 + y1;
    let z5 = (z3 + z4) * FIX_1_175875602;
    let tmp0 = y7 * FIX_0_298631336;
    let tmp1 = y5 * FIX_2_053119869;
    let tmp2 = y3 * FIX_3_072711026;
    let tmp3 = y1 * FIX_1_501321110;
    let z1 = z1 * -FIX_0_899976223;
    let z2 = z2 * -FIX_2_562915447;
    let z3 = z3 * -FIX_1_961570560 + z5;
    let z4 = z4 * -FIX_0_390180644 + z5;
    (
        tmp0 + z1 + z3,
        tmp1 + z2 + z4,
        tmp2 + z2 + z3,
        tmp3 + z1 + z4,
    )
}

/// The IDCT of every block of a component that holds real samples (`width × height`).
pub(super) fn inverse_dct(
    coefs: &Coefficients,
    quant: &[u16; 64],
    width: usize,
    height: usize,
) -> Result<Plane, JpegError> {
    let blocks_x = width.div_ceil(8).min(coefs.blocks_x);
    let blocks_y = height.div_ceil(8).min(coefs.blocks_y);
    let stride = blocks_x * 8;
    let mut samples = zeroed::<u8>(stride * blocks_y * 8)?;
    // ISLOW_MULT_TYPE is a 16-bit short in libjpeg-turbo's SIMD builds.
    let quant: [i16; 64] = std::array::from_fn(|i| quant[i] as i16);
    for by in 0..blocks_y {
        for bx in 0..blocks_x {
            let at = (by * coefs.blocks_x + bx) * 64;
            let Some(block) = coefs
                .data
                .get(at..at + 64)
                .and_then(|b| <&[i16; 64]>::try_from(b).ok())
            else {
                continue;
            };
            let out = &mut samples[by * 8 * stride + bx * 8..];
            idct_islow(block, &quant, out, stride);
        }
    }
    Ok(Plane {
        width,
        height,
        stride,
        samples,
    })
}

/// How a component is brought to full size (`jdsample.c`'s choice per component).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upsample {
    Full,
    /// 2:1 horizontal, triangle filter.
    H2V1Fancy,
    /// 2:1 vertical, triangle filter (4:4:0).
    H1V2Fancy,
    /// 2:1 both ways, triangle filter (4:2:0).
    H2V2Fancy,
    /// Sample replication by whole factors (also 2:1 chroma one or two samples wide).
    Box {
        h: usize,
        v: usize,
    },
}

fn choose(h: usize, v: usize, max_h: usize, max_v: usize, width: usize) -> Option<Upsample> {
    Some(if h == max_h && v == max_v {
        Upsample::Full
    } else if h * 2 == max_h && v == max_v {
        if width > 2 {
            Upsample::H2V1Fancy
        } else {
            Upsample::Box { h: 2, v: 1 }
        }
    } else if h == max_h && v * 2 == max_v {
        Upsample::H1V2Fancy
    } else if h * 2 == max_h && v * 2 == max_v {
        if width > 2 {
            Upsample::H2V2Fancy
        } else {
            Upsample::Box { h: 2, v: 2 }
        }
    } else if max_h.is_multiple_of(h) && max_v.is_multiple_of(v) {
        Upsample::Box {
            h: max_h / h,
            v: max_v / v,
        }
    } else {
        return None;
    })
}

/// Whether libjpeg-turbo can upsample these sampling factors (integral ratios only).
pub(super) fn sampling_supported(factors: &[(usize, usize)]) -> bool {
    let max_h = factors.iter().map(|f| f.0).max().unwrap_or(1);
    let max_v = factors.iter().map(|f| f.1).max().unwrap_or(1);
    factors
        .iter()
        .all(|&(h, v)| choose(h, v, max_h, max_v, 3).is_some())
}

/// Output row `y` of a component, `out.len()` samples wide (the image width), as
/// `jdsample.c` makes it.
fn upsample_row(plane: &Plane, method: Upsample, y: usize, out: &mut [u8], wide: &mut [u8]) {
    match method {
        Upsample::Full => out.copy_from_slice(&plane.row(y)[..out.len()]),
        Upsample::Box { h, v } => {
            let row = plane.row(y / v);
            for (x, o) in out.iter_mut().enumerate() {
                *o = row[x / h];
            }
        }
        Upsample::H2V1Fancy => {
            let inp = plane.row(y);
            let n = inp.len();
            let wide = &mut wide[..2 * n];
            let s = |i: usize| i32::from(inp[i]);
            wide[0] = inp[0];
            wide[1] = ((s(0) * 3 + s(1) + 2) >> 2) as u8;
            for i in 1..n - 1 {
                let v = s(i) * 3;
                wide[2 * i] = ((v + s(i - 1) + 1) >> 2) as u8;
                wide[2 * i + 1] = ((v + s(i + 1) + 2) >> 2) as u8;
            }
            wide[2 * n - 2] = ((s(n - 1) * 3 + s(n - 2) + 1) >> 2) as u8;
            wide[2 * n - 1] = inp[n - 1];
            out.copy_from_slice(&wide[..out.len()]);
        }
        Upsample::H1V2Fancy => {
            let inrow = y / 2;
            let near = plane.row(inrow);
            let (far, bias) = if y.is_multiple_of(2) {
                (plane.row(inrow.saturating_sub(1)), 1)
            } else {
                (plane.row(inrow + 1), 2)
            };
            for (x, o) in out.iter_mut().enumerate() {
                *o = ((i32::from(near[x]) * 3 + i32::from(far[x]) + bias) >> 2) as u8;
            }
        }
        Upsample::H2V2Fancy => {
            let inrow = y / 2;
            let near = plane.row(inrow);
            let far = if y.is_multiple_of(2) {
                plane.row(inrow.saturating_sub(1))
            } else {
                plane.row(inrow + 1)
            };
            let n = near.len();
            let wide = &mut wide[..2 * n];
            let sum = |i: usize| i32::from(near[i]) * 3 + i32::from(far[i]);
            let mut this = sum(0);
            let mut next = sum(1);
            wide[0] = ((this * 4 + 8) >> 4) as u8;
            wide[1] = ((this * 3 + next + 7) >> 4) as u8;
            let mut last = this;
            this = next;
            for i in 1..n - 1 {
                next = sum(i + 1);
                wide[2 * i] = ((this * 3 + last + 8) >> 4) as u8;
                wide[2 * i + 1] = ((this * 3 + next + 7) >> 4) as u8;
                last = this;
                this = next;
            }
            wide[2 * n - 2] = ((this * 3 + last + 8) >> 4) as u8;
            wide[2 * n - 1] = ((this * 4 + 7) >> 4) as u8;
            out.copy_from_slice(&wide[..out.len()]);
        }
    }
}

/// The colour space of the coded components (libjpeg's `jpeg_color_space`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ColorSpace {
    Gray,
    YCbCr,
    Rgb,
    Cmyk,
    Ycck,
}

/// `jdcolor.c`'s tables (`build_ycc_rgb_table`, SCALEBITS 16).
struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i64; 256],
    cb_g: [i64; 256],
}

impl YccTables {
    fn new() -> Self {
        const SCALEBITS: u32 = 16;
        const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
        let fix = |x: f64| (x * f64::from(1u32 << SCALEBITS) + 0.5) as i64;
        let mut t = Self {
            cr_r: [0; 256],
            cb_b: [0; 256],
            cr_g: [0; 256],
            cb_g: [0; 256],
        };
        for i in 0..256 {
            let x = i as i64 - 128;
            t.cr_r[i] = ((fix(1.40200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cb_b[i] = ((fix(1.77200) * x + ONE_HALF) >> SCALEBITS) as i32;
            t.cr_g[i] = -fix(0.71414) * x;
            t.cb_g[i] = -fix(0.34414) * x + ONE_HALF;
        }
        t
    }

    /// R, G, B before range limiting.
    fn convert(&self, y: u8, cb: u8, cr: u8) -> [i32; 3] {
        let y = i32::from(y);
        let (cb, cr) = (usize::from(cb), usize::from(cr));
        [
            y + self.cr_r[cr],
            y + ((self.cb_g[cb] + self.cr_g[cr]) >> 16) as i32,
            y + self.cb_b[cb],
        ]
    }
}

fn clamp(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// Upsamples and colour-converts every row: `planes` in frame order with their sampling
/// factors; returns interleaved samples, 1 per pixel for gray, 3 for YCbCr/RGB (as RGB), 4 for
/// CMYK/YCCK (as CMYK, not inverted).
pub(super) fn to_pixels(
    planes: &[(Plane, (usize, usize))],
    space: ColorSpace,
    width: usize,
    height: usize,
) -> Result<Vec<u8>, JpegError> {
    let max_h = planes.iter().map(|p| p.1.0).max().unwrap_or(1);
    let max_v = planes.iter().map(|p| p.1.1).max().unwrap_or(1);
    let methods = planes
        .iter()
        .map(|(plane, (h, v))| choose(*h, *v, max_h, max_v, plane.width))
        .collect::<Option<Vec<_>>>()
        .ok_or(JpegError::Unsupported(
            "its sampling factors are not in whole ratios (libjpeg-turbo refuses them too)",
        ))?;
    let channels = planes.len();
    let out_channels = match space {
        ColorSpace::Gray => 1,
        ColorSpace::YCbCr | ColorSpace::Rgb => 3,
        ColorSpace::Cmyk | ColorSpace::Ycck => 4,
    };
    if channels != out_channels {
        return Err(JpegError::Invalid(format!(
            "{channels} components do not fit its colour space"
        )));
    }
    let mut pixels = zeroed::<u8>(width * height * out_channels)?;
    let mut rows = vec![vec![0u8; width]; channels];
    let widest = planes.iter().map(|p| p.0.width).max().unwrap_or(0);
    let mut wide = vec![0u8; 2 * widest + 2];
    let tables = YccTables::new();
    for y in 0..height {
        for (c, ((plane, _), method)) in planes.iter().zip(&methods).enumerate() {
            upsample_row(plane, *method, y, &mut rows[c], &mut wide);
        }
        let line = &mut pixels[y * width * out_channels..(y + 1) * width * out_channels];
        match space {
            ColorSpace::Gray => line.copy_from_slice(&rows[0]),
            ColorSpace::Rgb => {
                for (x, px) in line.chunks_exact_mut(3).enumerate() {
                    px.copy_from_slice(&[rows[0][x], rows[1][x], rows[2][x]]);
                }
            }
            ColorSpace::YCbCr => {
                for (x, px) in line.chunks_exact_mut(3).enumerate() {
                    let rgb = tables.convert(rows[0][x], rows[1][x], rows[2][x]);
                    px.copy_from_slice(&rgb.map(clamp));
                }
            }
            ColorSpace::Cmyk => {
                for (x, px) in line.chunks_exact_mut(4).enumerate() {
                    px.copy_from_slice(&[rows[0][x], rows[1][x], rows[2][x], rows[3][x]]);
                }
            }
            ColorSpace::Ycck => {
                for (x, px) in line.chunks_exact_mut(4).enumerate() {
                    let rgb = tables.convert(rows[0][x], rows[1][x], rows[2][x]);
                    let cmy = rgb.map(|v| clamp(255 - v));
                    px.copy_from_slice(&[cmy[0], cmy[1], cmy[2], rows[3][x]]);
                }
            }
        }
    }
    Ok(pixels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_limit_matches_libjpegs_table() {
        assert_eq!(range_limit_idct(0), 128);
        assert_eq!(range_limit_idct(-128), 0);
        assert_eq!(range_limit_idct(127), 255);
        assert_eq!(range_limit_idct(300), 255);
        assert_eq!(range_limit_idct(-300), 0);
        assert_eq!(range_limit_idct(511), 255);
        assert_eq!(range_limit_idct(-512), 0);
        // Beyond ±512 the table wraps around.
        assert_eq!(range_limit_idct(1024), 128);
    }

    #[test]
    fn a_dc_only_block_is_flat() {
        let mut coef = [0i16; 64];
        coef[0] = 10;
        let quant = [16i16; 64];
        let mut out = [0u8; 64];
        idct_islow(&coef, &quant, &mut out, 8);
        // 10 * 16 / 8 = 20 above the level shift.
        assert!(out.iter().all(|&v| v == 148), "{out:?}");
    }
}
