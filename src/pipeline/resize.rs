//! Pillow-exact resampling of RGB8 images: `Image.resize(size, filter)` for LANCZOS (the edit's
//! input, [`crate::pipeline::image::resize_lanczos`]) and BICUBIC (Pillow's default, which
//! `train_instruct_pix2pix.py`'s `convert_to_np` calls).
//!
//! Pillow's `Resample.c` two-pass fixed-point scheme: per output pixel, weights of the kernel
//! stretched by the downscale factor, normalised to sum 1 and rounded to 22-bit fixed point; each
//! pass rounds and clips to 8 bits; Pillow 13's pass order; a pass skipped when its axis keeps its
//! size.

use image::RgbImage;

/// Fixed-point precision of Pillow's 8-bit resampling coefficients (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A Pillow resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BICUBIC`: Keys' cubic convolution with a = -0.5, support 2 (Pillow's default for
    /// `resize`).
    Bicubic,
    /// `Image.LANCZOS`: windowed sinc, support 3.
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bicubic => bicubic(x),
            Filter::Lanczos => lanczos(x),
        }
    }
}

/// Pillow's `bicubic_filter` (a = -0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's `sinc_filter`.
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Pillow's `lanczos_filter`.
fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// The weights of one axis: for each output pixel, the first input pixel and how many follow,
/// and `ksize` fixed-point weights (only `count` of them used).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole input range (no box).
fn precompute_coefficients(in_size: u32, out_size: u32, filter: Filter) -> Coefficients {
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size as usize);
    let mut weights = vec![0i32; out_size as usize * ksize];
    let mut k = vec![0f64; ksize];
    let inv_filter_scale = 1.0 / filter_scale;
    for xx in 0..out_size as usize {
        let center = (xx as f64 + 0.5) * scale;
        // C's (int) cast truncates toward zero, as `as i64` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
        let count = (xmax - xmin).max(0) as usize;
        let mut sum = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(count) {
            let w = filter.weight(((x as i64 + xmin) as f64 - center + 0.5) * inv_filter_scale);
            *slot = w;
            sum += w;
        }
        let row = &mut weights[xx * ksize..xx * ksize + count];
        for (dst, &w) in row.iter_mut().zip(&k[..count]) {
            let w = if sum != 0.0 { w / sum } else { w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            *dst = if w < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin as usize, count));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: the fixed-point sum back to a byte, clamped to 0..=255.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `image.resize((width, height))` with its default filter (BICUBIC) on RGB8, exactly.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize(img, width, height, Filter::Bicubic)
}

/// PIL's `image.resize((width, height), filter)` on RGB8, exactly (Pillow 13). Returns a copy of
/// the input when the size is the same; a zero target size gives an empty image.
pub fn resize(img: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = img.dimensions();
    if (in_w, in_h) == (width, height) {
        return img.clone();
    }
    if width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return RgbImage::new(width, height);
    }
    let need_horizontal = width != in_w;
    let need_vertical = height != in_h;
    let horizontal = precompute_coefficients(in_w, width, filter);
    let mut vertical = precompute_coefficients(in_h, height, filter);

    let out = if need_vertical && vertical_first(in_w, in_h, width, height) {
        let stage = vertical_pass(img.as_raw(), in_w as usize, &vertical);
        if need_horizontal {
            horizontal_pass(&stage, in_w as usize, 0..height as usize, &horizontal)
        } else {
            stage
        }
    } else if need_horizontal {
        // Only the source rows that the vertical pass reads get the horizontal pass.
        let (row_first, row_last) = match (vertical.bounds.first(), vertical.bounds.last()) {
            (Some(&(first, _)), Some(&(last_start, last_count))) if need_vertical => {
                (first, last_start + last_count)
            }
            _ => (0, in_h as usize),
        };
        let stage = horizontal_pass(
            img.as_raw(),
            in_w as usize,
            row_first..row_last,
            &horizontal,
        );
        if need_vertical {
            for bound in &mut vertical.bounds {
                bound.0 -= row_first;
            }
            vertical_pass(&stage, width as usize, &vertical)
        } else {
            stage
        }
    } else {
        vertical_pass(img.as_raw(), in_w as usize, &vertical)
    };
    // The buffer has exactly width*height*3 bytes by construction.
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Pillow 13's pass order: vertical first when the height shrinks by more than twice as many
/// pixels as the width does, horizontal first otherwise (each pass rounds, so order matters).
fn vertical_first(in_w: u32, in_h: u32, out_w: u32, out_h: u32) -> bool {
    let shrink_h = i64::from(in_h) - i64::from(out_h);
    let shrink_w = i64::from(in_w) - i64::from(out_w);
    out_h < in_h && shrink_h > 2 * shrink_w
}

fn horizontal_pass(
    src: &[u8],
    in_w: usize,
    rows: std::ops::Range<usize>,
    coeffs: &Coefficients,
) -> Vec<u8> {
    let out_w = coeffs.bounds.len();
    let mut out = Vec::with_capacity(rows.len() * out_w * 3);
    for y in rows {
        let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        for (xx, &(xmin, count)) in coeffs.bounds.iter().enumerate() {
            let k = &coeffs.weights[xx * coeffs.ksize..xx * coeffs.ksize + count];
            let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
            for (px, &w) in row[xmin * 3..(xmin + count) * 3].chunks_exact(3).zip(k) {
                let w = i64::from(w);
                acc[0] += i64::from(px[0]) * w;
                acc[1] += i64::from(px[1]) * w;
                acc[2] += i64::from(px[2]) * w;
            }
            out.extend(acc.map(clip8));
        }
    }
    out
}

fn vertical_pass(src: &[u8], width: usize, coeffs: &Coefficients) -> Vec<u8> {
    let stride = width * 3;
    let mut out = Vec::with_capacity(coeffs.bounds.len() * stride);
    let mut acc = vec![0i64; stride];
    for (yy, &(ymin, count)) in coeffs.bounds.iter().enumerate() {
        let k = &coeffs.weights[yy * coeffs.ksize..yy * coeffs.ksize + count];
        acc.fill(1i64 << (PRECISION_BITS - 1));
        for (dy, &w) in k.iter().enumerate() {
            let w = i64::from(w);
            let row = &src[(ymin + dy) * stride..(ymin + dy + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += i64::from(v) * w;
            }
        }
        out.extend(acc.iter().map(|&a| clip8(a)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_kernel_matches_pillow_values() {
        // Keys' kernel with a = -0.5: 1 at 0, 0 at the integers, -0.0625 at 1.5, 0.5625 at 0.5.
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(-2.0), 0.0);
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(-1.5), -0.0625);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [Filter::Lanczos, Filter::Bicubic] {
            for (in_size, out_size) in [(67u32, 64u32), (45, 101), (300, 7), (10, 1)] {
                let c = precompute_coefficients(in_size, out_size, filter);
                for (i, &(start, count)) in c.bounds.iter().enumerate() {
                    assert!(start + count <= in_size as usize);
                    let sum: i64 = c.weights[i * c.ksize..i * c.ksize + count]
                        .iter()
                        .map(|&w| i64::from(w))
                        .sum();
                    // Each weight is rounded separately: off by at most half a unit each.
                    assert!((sum - (1 << PRECISION_BITS)).abs() <= count as i64, "{sum}");
                }
            }
        }
    }
}
