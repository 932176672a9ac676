//! Float32 products with one narrow side (at most [`MAX_NARROW`] columns) on AVX-512: the
//! small layers of the UNet (8×8 and 4×4 latents: 64 and 16 tokens or pixels, 1280 channels)
//! and their backward passes, where the gemm crate packs the whole wide operand for a product
//! that then uses each packed value 16 to 64 times, and reaches a third of the machine's speed.
//!
//! Here the narrow operand is copied into a [k, narrow] panel (small: it is the narrow one),
//! and the wide operand is read in place: a tile of up to 8 of its rows × the whole narrow
//! width is held in registers while k runs, each step broadcasting one value per row and
//! loading the panel's row once. The wide operand is read once, in any layout.

use rayon::prelude::*;

use crate::LANES;

/// Whether this CPU has AVX-512F (and [`crate::ISA_VAR`] allows it), which the narrow products
/// need (on AVX2 the gemm crate's kernels already run them near the machine's peak).
pub fn available() -> bool {
    crate::isa() == crate::Isa::Avx512
}

/// The narrow side's limit: 5 vectors of 16.
pub const MAX_NARROW: usize = 80;

/// `out(i, j) = scale · Σ_k a(i, k) · b(k, j)` (`+ out(i, j)` when accumulating) for
/// `i < wide`, `j < narrow`: each operand given by its (row stride, column stride) in elements.
#[derive(Debug, Clone, Copy)]
pub struct Skinny {
    pub wide: usize,
    pub narrow: usize,
    pub k: usize,
    /// a(i, k) at `a[i·a.0 + k·a.1]`.
    pub a: (usize, usize),
    /// b(k, j) at `b[k·b.0 + j·b.1]`.
    pub b: (usize, usize),
    /// out(i, j) at `out[i·out.0 + j·out.1]`.
    pub out: (usize, usize),
}

impl Skinny {
    /// Runs the product, its tiles spread over rayon's pool when `threaded`; the caller has
    /// checked the buffers' extents, `narrow` ≤ [`MAX_NARROW`], `wide`, `narrow` and `k`
    /// above zero, and [`available`].
    ///
    /// # Safety
    /// Every element the strides address lies inside its buffer, and `out` aliases neither
    /// input.
    pub unsafe fn run(
        &self,
        out: &mut [f32],
        a: &[f32],
        b: &[f32],
        scale: f32,
        accumulate: bool,
        threaded: bool,
    ) {
        let vectors = self.narrow.div_ceil(LANES);
        let width = vectors * LANES;
        // The narrow operand as [k, width], zero past `narrow`.
        let mut panel = vec![0f32; self.k * width];
        for (k, row) in panel.chunks_exact_mut(width).enumerate() {
            for (j, value) in row[..self.narrow].iter_mut().enumerate() {
                *value = b[k * self.b.0 + j * self.b.1];
            }
        }
        let rows_per_tile = tile_rows(vectors);
        let tiles = self.wide.div_ceil(rows_per_tile);
        // The products of the tiles, [wide rounded up to tiles, width], then added into `out`.
        let mut products = vec![0f32; tiles * rows_per_tile * width];
        let tile_len = rows_per_tile * width;
        let run_tile = |(tile, dst): (usize, &mut [f32])| {
            let first = tile * rows_per_tile;
            // Rows past the end repeat the last row (read, never kept).
            let rows: [usize; 8] =
                std::array::from_fn(|r| (first + r).min(self.wide - 1) * self.a.0);
            // SAFETY: AVX-512F (the caller's check); `rows` and k·a.1 stay inside `a` (the
            // caller's), the panel has k rows of `width`, `dst` has `rows_per_tile` rows.
            unsafe { tile_product(vectors, a, self.a.1, &rows, &panel, self.k, dst) };
        };
        if threaded {
            products
                .par_chunks_mut(tile_len)
                .enumerate()
                .for_each(run_tile);
        } else {
            products.chunks_mut(tile_len).enumerate().for_each(run_tile);
        }
        for i in 0..self.wide {
            let row = &products[i * width..][..self.narrow];
            for (j, &value) in row.iter().enumerate() {
                let dst = &mut out[i * self.out.0 + j * self.out.1];
                *dst = if accumulate {
                    *dst + scale * value
                } else {
                    scale * value
                };
            }
        }
    }
}

/// Rows of the wide operand per tile: 24 accumulators at most, with registers left for the
/// panel's vectors.
fn tile_rows(vectors: usize) -> usize {
    match vectors {
        1..=3 => 8,
        4 => 6,
        _ => 4,
    }
}

/// # Safety
/// AVX-512F; `a[rows[r] + k·a_k]` inside `a` for every r < 8 and k < `k`; `panel` holds
/// `k × vectors·16` values; `dst` holds `tile_rows(vectors) × vectors·16`.
unsafe fn tile_product(
    vectors: usize,
    a: &[f32],
    a_k: usize,
    rows: &[usize; 8],
    panel: &[f32],
    k: usize,
    dst: &mut [f32],
) {
    // SAFETY: forwarded.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match vectors {
            1 => tile::<8, 1>(a, a_k, rows, panel, k, dst),
            2 => tile::<8, 2>(a, a_k, rows, panel, k, dst),
            3 => tile::<8, 3>(a, a_k, rows, panel, k, dst),
            4 => tile::<6, 4>(a, a_k, rows, panel, k, dst),
            _ => tile::<4, 5>(a, a_k, rows, panel, k, dst),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (vectors, a, a_k, rows, panel, k, dst);
        unreachable!("the skinny product runs only where AVX-512F was detected")
    }
}

/// # Safety
/// As [`tile_product`], with `R` rows and `V` vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(
    a: &[f32],
    a_k: usize,
    rows: &[usize; 8],
    panel: &[f32],
    k: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let a = a.as_ptr();
    let mut row_ptrs = [a; R];
    for (r, ptr) in row_ptrs.iter_mut().enumerate() {
        // SAFETY: the caller's bound on rows[r].
        *ptr = unsafe { a.add(rows[r]) };
    }
    let mut panel_row = panel.as_ptr();
    for step in 0..k {
        let offset = step * a_k;
        // SAFETY: the caller's bounds on the panel and on a(rows[r], step).
        unsafe {
            let mut inputs = [_mm512_setzero_ps(); V];
            for (v, input) in inputs.iter_mut().enumerate() {
                *input = _mm512_loadu_ps(panel_row.add(v * LANES));
            }
            for (row, ptr) in acc.iter_mut().zip(&row_ptrs) {
                let value = _mm512_set1_ps(*ptr.add(offset));
                for (sum, &input) in row.iter_mut().zip(&inputs) {
                    *sum = _mm512_fmadd_ps(input, value, *sum);
                }
            }
            panel_row = panel_row.add(V * LANES);
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (v, &sum) in row.iter().enumerate() {
            // SAFETY: `dst` holds R rows of V vectors.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add((r * V + v) * LANES), sum) };
        }
    }
}
