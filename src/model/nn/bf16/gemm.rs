//! The bfloat16 matrix product `C (+)= α · A · B` with float32 accumulators: A [m, k] as rows of
//! bf16 values (a weight read in place, or float32 activations converted once per product),
//! B [k, n] packed into panels of [`PANEL_COLS`] columns whose values go in pairs along k (what
//! `vdpbf16ps` multiplies), C [m, n] float32 with unit column stride.
//!
//! The micro-kernel keeps a tile of up to [`TILE_ROWS`] × [`PANEL_COLS`] accumulators in 24
//! zmm registers; per pair of k it loads two vectors of B and broadcasts one pair of A per row.
//! Work is split in tiles of rows × panel groups over rayon's threads. Without avx512_bf16 a
//! portable kernel computes the same products (bf16 values multiplied in float32).

use candle_core::Result;
use half::bf16;
use rayon::prelude::*;

use super::super::product::{Threads, thread_count};

/// Columns of B per packed panel: two zmm vectors of 16 float32 accumulators.
pub(in crate::model::nn) const PANEL_COLS: usize = 32;
/// Rows of A per micro-kernel call: 12 rows × 2 vectors = 24 accumulator registers.
pub(in crate::model::nn) const TILE_ROWS: usize = 12;
/// Pairs of k per block: a panel block (256 pairs × 32 columns × 4 bytes = 32 KiB) stays in L1
/// while the rows of A stream past it.
const BLOCK_PAIRS: usize = 256;
/// Most rows of A per task: the rows' k block (240 × 512 × 2 bytes = 240 KiB) stays in L2.
const MAX_TASK_ROWS: usize = 240;
/// Pairs of k per block on AMX: the tiles hold C through the block, so a block ends in one
/// store of C; 240 rows × 2,048 values of A (960 KiB) and a 128 KiB panel block fit L2.
const AMX_BLOCK_PAIRS: usize = 1024;

/// Whether this CPU runs the bf16 dot-product instructions (avx512_bf16 with AVX-512F/BW).
pub(in crate::model::nn) fn cpu_has_bf16_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512bf16")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs AMX's bf16 tile products (AMX-TILE and AMX-BF16, besides
/// avx512_bf16 for the edges) and Linux let this process use the tile registers.
pub(in crate::model::nn) fn cpu_has_amx() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| cpu_has_bf16_dot() && amx::available())
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// Which kernel a product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::model::nn) enum Kernel {
    /// AMX tiles (`tdpbf16ps`, 16 rows × 32 columns), the k pairs past a multiple of 16 and
    /// the edges with `vdpbf16ps` (only where [`cpu_has_amx`]).
    Amx,
    /// `vdpbf16ps` on AVX-512 (only where [`cpu_has_bf16_dot`]).
    Avx512,
    /// Plain Rust: the same bf16 values multiplied and summed in float32.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub(in crate::model::nn) fn best() -> Self {
        if cpu_has_amx() && std::env::var_os("INSTRUCT_PIX2PIX_NO_AMX").is_none() {
            Kernel::Amx
        } else if cpu_has_bf16_dot() {
            Kernel::Avx512
        } else {
            Kernel::Portable
        }
    }
}

/// float32 → bfloat16 bits, rounding to nearest even (as `vcvtne2ps2bf16` does).
#[inline(always)]
pub(in crate::model::nn) fn bf16_bits(value: f32) -> u16 {
    bf16::from_f32(value).to_bits()
}

#[inline(always)]
fn f32_of_bits(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// The left operand A [m, k].
#[derive(Debug, Clone, Copy)]
pub(in crate::model::nn) enum Lhs<'a> {
    /// bf16 rows, `row_stride` apart, unit column stride: read in place when k is even, or
    /// when k is odd and the rows have room after their k-th value (`row_stride > k`): that
    /// value is then read too and multiplied by B's zero padding, so it must be finite.
    Bf16 { data: &'a [bf16], row_stride: usize },
    /// float32 values by (row stride, column stride), converted to bf16 rows first.
    F32 {
        data: &'a [f32],
        strides: (usize, usize),
    },
}

/// The right operand B [k, n].
#[derive(Debug, Clone, Copy)]
pub(in crate::model::nn) enum Rhs<'a> {
    /// float32 values by (row stride, column stride), packed (converted) for the product.
    F32 {
        data: &'a [f32],
        strides: (usize, usize),
    },
    /// bf16 values by (row stride, column stride), packed for the product.
    Bf16 {
        data: &'a [bf16],
        strides: (usize, usize),
    },
    /// Already packed (the same B for many products).
    Packed(&'a PackedRhs),
}

/// B [k, n] in panels: panel `j` holds columns `32j..32j+32` (zero past n), for each pair of k
/// the 32 columns' (k even, k odd) bf16 values in one u32 each (zero past k).
#[derive(Debug, Clone)]
pub(in crate::model::nn) struct PackedRhs {
    k: usize,
    n: usize,
    data: Vec<u32>,
}

impl PackedRhs {
    fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(PANEL_COLS)
    }

    /// This packed B when it is [k, n], else an error.
    fn of_size(&self, k: usize, n: usize) -> Result<&Self> {
        if self.k != k || self.n != n {
            candle_core::bail!("bf16 product: packed operand of the wrong size");
        }
        Ok(self)
    }

    /// Packs `rhs` [k, n] (`Rhs::Packed` is cloned), on `threads`.
    pub(in crate::model::nn) fn pack(
        rhs: &Rhs<'_>,
        k: usize,
        n: usize,
        threads: Threads,
    ) -> Result<Self> {
        let pairs = k.div_ceil(2);
        let panel_len = pairs * PANEL_COLS;
        let mut data = vec![0u32; panel_len * n.div_ceil(PANEL_COLS)];
        let fill = |(panel, out): (usize, &mut [u32])| match *rhs {
            Rhs::F32 { data, strides } => pack_panel_f32(out, panel, k, n, data, strides),
            Rhs::Bf16 { data, strides } => {
                pack_panel_values(out, panel, k, n, data, strides, bf16::to_bits)
            }
            Rhs::Packed(_) => {}
        };
        let span = |(rs, cs): (usize, usize), len: usize| {
            k == 0 || n == 0 || (k - 1) * rs + (n - 1) * cs < len
        };
        let (strides, len) = match *rhs {
            Rhs::Packed(packed) => return packed.of_size(k, n).cloned(),
            Rhs::F32 { data, strides } => (strides, data.len()),
            Rhs::Bf16 { data, strides } => (strides, data.len()),
        };
        if !span(strides, len) {
            candle_core::bail!("bf16 product: right operand out of its buffer")
        }
        if panel_len > 0 {
            match threads {
                Threads::All if thread_count() > 1 => {
                    data.par_chunks_mut(panel_len).enumerate().for_each(fill)
                }
                _ => data.chunks_mut(panel_len).enumerate().for_each(fill),
            }
        }
        Ok(Self { k, n, data })
    }
}

/// Fills one panel from float32 B (zero past k and n): 16 columns at a time on AVX-512 BF16
/// when B's rows are contiguous, else as [`pack_panel_values`].
fn pack_panel_f32(
    out: &mut [u32],
    panel: usize,
    k: usize,
    n: usize,
    data: &[f32],
    (rs, cs): (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if cs == 1 && cpu_has_bf16_dot() {
        let first = panel * PANEL_COLS;
        let cols = PANEL_COLS.min(n - first);
        // SAFETY: the CPU has AVX-512F/BW and avx512_bf16; `pack` checked that every element
        // (row < k, column < n) lies inside `data`, and `out` holds a whole panel.
        unsafe { avx512::pack_panel_f32_rows(out, data, rs, first, cols, k) };
        return;
    }
    pack_panel_values(out, panel, k, n, data, (rs, cs), bf16_bits);
}

/// Fills one panel from B's values as bf16 bits (`bits`), zero past k and n: a pair per
/// column when B's columns are contiguous (a linear layer's weight, Wᵀ), else value by value.
#[inline(always)]
fn pack_panel_values<T: Copy>(
    out: &mut [u32],
    panel: usize,
    k: usize,
    n: usize,
    data: &[T],
    (rs, cs): (usize, usize),
    bits: impl Fn(T) -> u16,
) {
    let first = panel * PANEL_COLS;
    let cols = PANEL_COLS.min(n - first);
    if rs == 1 {
        // Each column's values are contiguous: read them in pairs.
        for c in 0..cols {
            let column = &data[(first + c) * cs..][..k];
            let mut pairs = column.chunks_exact(2);
            for (pair, values) in (&mut pairs).enumerate() {
                out[pair * PANEL_COLS + c] =
                    u32::from(bits(values[0])) | (u32::from(bits(values[1])) << 16);
            }
            if let [last] = pairs.remainder() {
                out[(k / 2) * PANEL_COLS + c] = u32::from(bits(*last));
            }
        }
        return;
    }
    pack_panel(out, first, cols, k, |row, col| {
        bits(data[row * rs + col * cs])
    });
}

/// Fills the panel of columns `first..first + cols` from `value(row, col)` (bf16 bits), zero
/// past k.
#[inline(always)]
fn pack_panel(
    out: &mut [u32],
    first: usize,
    cols: usize,
    k: usize,
    value: impl Fn(usize, usize) -> u16,
) {
    for (pair, dst) in out.chunks_exact_mut(PANEL_COLS).enumerate() {
        let (even, odd) = (2 * pair, 2 * pair + 1);
        for (c, slot) in dst[..cols].iter_mut().enumerate() {
            let low = u32::from(value(even, first + c));
            let high = if odd < k {
                u32::from(value(odd, first + c))
            } else {
                0
            };
            *slot = low | (high << 16);
        }
    }
}

/// A's rows as bf16 with an even row length (k padded with a zero): borrowed in place or
/// converted.
enum LhsRows<'a> {
    Borrowed(&'a [bf16], usize),
    Owned(Vec<bf16>, usize),
}

impl LhsRows<'_> {
    fn rows(&self) -> (&[bf16], usize) {
        match self {
            LhsRows::Borrowed(data, stride) => (data, *stride),
            LhsRows::Owned(data, stride) => (data, *stride),
        }
    }
}

fn lhs_rows<'a>(lhs: &Lhs<'a>, m: usize, k: usize, threads: Threads) -> Result<LhsRows<'a>> {
    let last = |rs: usize, cs: usize| match (m, k) {
        (0, _) | (_, 0) => 0,
        _ => (m - 1) * rs + (k - 1) * cs + 1,
    };
    match *lhs {
        Lhs::Bf16 { data, row_stride } => {
            if data.len() < last(row_stride, 1) {
                candle_core::bail!("bf16 product: left operand out of its buffer");
            }
            if k.is_multiple_of(2) || (row_stride > k && data.len() > last(row_stride, 1)) {
                return Ok(LhsRows::Borrowed(data, row_stride));
            }
            let stride = k + 1;
            let mut rows = vec![bf16::ZERO; m * stride];
            for (dst, src) in rows.chunks_exact_mut(stride).zip(data.chunks(row_stride)) {
                dst[..k].copy_from_slice(&src[..k]);
            }
            Ok(LhsRows::Owned(rows, stride))
        }
        Lhs::F32 { data, strides } => {
            if data.len() < last(strides.0, strides.1) {
                candle_core::bail!("bf16 product: left operand out of its buffer");
            }
            let stride = k.next_multiple_of(2);
            let mut rows = vec![bf16::ZERO; m * stride];
            let convert = |(row, dst): (usize, &mut [bf16])| {
                if strides.1 == 1 {
                    convert_row(&mut dst[..k], &data[row * strides.0..][..k]);
                } else {
                    for (col, value) in dst[..k].iter_mut().enumerate() {
                        *value = bf16::from_f32(data[row * strides.0 + col * strides.1]);
                    }
                }
            };
            // The conversion is a pass over all of A: on every core when it is large.
            if stride > 0 && matches!(threads, Threads::All) && m * k >= 1 << 16 {
                rows.par_chunks_exact_mut(stride)
                    .enumerate()
                    .for_each(convert);
            } else {
                rows.chunks_exact_mut(stride.max(1))
                    .enumerate()
                    .for_each(convert);
            }
            Ok(LhsRows::Owned(rows, stride))
        }
    }
}

/// `dst[i] = bf16(src[i])`, 32 at a time on AVX-512 BF16.
pub(in crate::model::nn) fn convert_row(dst: &mut [bf16], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if cpu_has_bf16_dot() {
        // SAFETY: the CPU was just checked to have AVX-512F/BW and avx512_bf16.
        unsafe { avx512::convert_row(dst, src) };
        return;
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

/// `C = α · A · B` (or `C += α · A · B`): A [m, k], B [k, n], C [m, n] with rows
/// `dst_row_stride` apart.
#[derive(Debug, Clone, Copy)]
pub(in crate::model::nn) struct Bf16Product {
    pub(in crate::model::nn) m: usize,
    pub(in crate::model::nn) n: usize,
    pub(in crate::model::nn) k: usize,
    pub(in crate::model::nn) dst_row_stride: usize,
}

/// A raw pointer to the output that rayon's tasks share; each writes its own tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint tiles of the output (see `Bf16Product::run_with`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl Bf16Product {
    /// Runs the product with the best kernel for this CPU.
    pub(in crate::model::nn) fn run(
        &self,
        dst: &mut [f32],
        lhs: Lhs<'_>,
        rhs: Rhs<'_>,
        alpha: f32,
        accumulate: bool,
        threads: Threads,
    ) -> Result<()> {
        self.run_with(Kernel::best(), dst, lhs, rhs, alpha, accumulate, threads)
    }

    /// Runs the product with `kernel` (the portable one anywhere; AVX-512 only where the CPU
    /// has it, else an error).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::model::nn) fn run_with(
        &self,
        kernel: Kernel,
        dst: &mut [f32],
        lhs: Lhs<'_>,
        rhs: Rhs<'_>,
        alpha: f32,
        accumulate: bool,
        threads: Threads,
    ) -> Result<()> {
        let Self {
            m,
            n,
            k,
            dst_row_stride,
        } = *self;
        if kernel == Kernel::Avx512 && !cpu_has_bf16_dot() {
            candle_core::bail!("bf16 product: this CPU has no avx512_bf16");
        }
        if kernel == Kernel::Amx && !cpu_has_amx() {
            candle_core::bail!("bf16 product: this CPU (or process) has no AMX");
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if dst.len() < (m - 1) * dst_row_stride + n || dst_row_stride < n {
            candle_core::bail!("bf16 product {self:?} out of its output buffer");
        }
        let packed_here;
        let packed = match rhs {
            Rhs::Packed(packed) => packed.of_size(k, n)?,
            other => {
                packed_here = PackedRhs::pack(&other, k, n, threads)?;
                &packed_here
            }
        };
        let rows = lhs_rows(&lhs, m, k, threads)?;
        let (a, a_stride) = rows.rows();
        let workers = match threads {
            Threads::All => thread_count().max(1),
            Threads::One => 1,
        };
        // Tasks: blocks of rows × groups of panels, at least two per worker when the
        // product is large enough to share.
        let panels = packed.panels();
        let row_tiles = m.div_ceil(TILE_ROWS);
        let wanted = 2 * workers;
        let row_blocks = row_tiles
            .div_ceil(MAX_TASK_ROWS / TILE_ROWS)
            .max(wanted.min(row_tiles))
            .max(1);
        let task_rows = row_tiles.div_ceil(row_blocks) * TILE_ROWS;
        let row_blocks = m.div_ceil(task_rows);
        let panel_groups = if row_blocks >= wanted {
            1
        } else {
            wanted.div_ceil(row_blocks).min(panels)
        };
        let group_panels = panels.div_ceil(panel_groups);
        let panel_groups = panels.div_ceil(group_panels);
        let out = OutPtr(dst.as_mut_ptr());
        let task = |index: usize| {
            let (block, group) = (index / panel_groups, index % panel_groups);
            let row_range = (block * task_rows, ((block + 1) * task_rows).min(m));
            let panel_range = (
                group * group_panels,
                ((group + 1) * group_panels).min(panels),
            );
            // SAFETY: each task writes only the rows `row_range` × the columns of its panels,
            // disjoint from every other task's, all inside `dst` (checked above); `dst` is
            // borrowed mutably for the whole call, so nothing else reads or writes it.
            unsafe {
                compute_block(
                    kernel,
                    (a, a_stride),
                    packed,
                    out,
                    dst_row_stride,
                    row_range,
                    panel_range,
                    n,
                    alpha,
                    accumulate,
                );
            }
        };
        let tasks = row_blocks * panel_groups;
        if workers > 1 && tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            (0..tasks).for_each(task);
        }
        Ok(())
    }
}

/// The tiles of rows `rows.0..rows.1` × panels `panels.0..panels.1`.
///
/// # Safety
/// `out` points at a C with rows `dst_row_stride` apart holding every row of `rows` and column
/// below `n`, and no other thread touches those tiles meanwhile; `kernel` is `Portable` or the
/// CPU has avx512_bf16; `a` holds `rows.1` rows of `2 · packed.pairs()` values `a.1` apart.
#[allow(clippy::too_many_arguments)]
unsafe fn compute_block(
    kernel: Kernel,
    a: (&[bf16], usize),
    packed: &PackedRhs,
    out: OutPtr,
    dst_row_stride: usize,
    rows: (usize, usize),
    panels: (usize, usize),
    n: usize,
    alpha: f32,
    accumulate: bool,
) {
    let pairs = packed.pairs();
    let (a_data, a_stride) = a;
    // AMX keeps C in its tiles across a block of k: longer blocks mean fewer stores of C.
    let block_pairs = if kernel == Kernel::Amx {
        AMX_BLOCK_PAIRS
    } else {
        BLOCK_PAIRS
    };
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let mut tiles = amx::TileState::default();
    let mut start = 0;
    while start < pairs {
        let count = block_pairs.min(pairs - start);
        let load_c = accumulate || start > 0;
        for panel in panels.0..panels.1 {
            let cols = PANEL_COLS.min(n - panel * PANEL_COLS);
            let b = &packed.data[(panel * pairs + start) * PANEL_COLS..][..count * PANEL_COLS];
            // SAFETY: the caller's contract (the tiles of this task inside C, the kernel's
            // instructions on this CPU), passed on.
            let c = unsafe { out.0.add(panel * PANEL_COLS) };
            let region = Region {
                a: &a_data[2 * start..],
                a_stride,
                b,
                pairs: count,
                c,
                c_stride: dst_row_stride,
                cols,
                alpha,
                load_c,
            };
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if kernel == Kernel::Amx {
                // SAFETY: as above; Amx is chosen only where the CPU and Linux allow it.
                unsafe { amx::rows(&region, rows, &mut tiles) };
                continue;
            }
            // SAFETY: as above.
            unsafe { vector_rows(kernel, &region, rows) };
        }
        start += count;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    // SAFETY: tiles are configured only on a CPU with AMX.
    unsafe {
        tiles.release()
    };
}

/// One panel's share of a block: A from row 0 (rows `a_stride` apart, starting at the block's
/// first pair), the panel's `pairs` pairs of B, C at column 0 of the panel (row 0).
struct Region<'a> {
    a: &'a [bf16],
    a_stride: usize,
    b: &'a [u32],
    pairs: usize,
    c: *mut f32,
    c_stride: usize,
    cols: usize,
    alpha: f32,
    load_c: bool,
}

/// The rows `rows.0..rows.1` of a region with the vector (or portable) micro-kernel.
///
/// # Safety
/// Those rows of C (`cols` columns) are the caller's to write; `kernel` runs on this CPU.
unsafe fn vector_rows(kernel: Kernel, region: &Region<'_>, rows: (usize, usize)) {
    let mut row = rows.0;
    while row < rows.1 {
        let tile_rows = TILE_ROWS.min(rows.1 - row);
        let tile = Tile {
            a: &region.a[row * region.a_stride..],
            a_stride: region.a_stride,
            b: region.b,
            pairs: region.pairs,
            // SAFETY: row < rows.1, inside C (the contract).
            c: unsafe { region.c.add(row * region.c_stride) },
            c_stride: region.c_stride,
            rows: tile_rows,
            cols: region.cols,
            alpha: region.alpha,
            load_c: region.load_c,
        };
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the vector kernels are chosen only where the CPU has avx512_bf16.
            Kernel::Avx512 | Kernel::Amx => unsafe { avx512::tile(&tile) },
            // SAFETY: the tile lies inside C (the contract).
            _ => unsafe { portable_tile(&tile) },
        }
        row += tile_rows;
    }
}

/// One micro-kernel call: `rows` × `cols` of C (+)= α · A · B over `pairs` pairs of k.
struct Tile<'a> {
    a: &'a [bf16],
    a_stride: usize,
    b: &'a [u32],
    pairs: usize,
    c: *mut f32,
    c_stride: usize,
    rows: usize,
    cols: usize,
    alpha: f32,
    load_c: bool,
}

/// The portable micro-kernel.
///
/// # Safety
/// `t.c` addresses `t.rows` rows (`t.c_stride` apart) of `t.cols` writable values.
unsafe fn portable_tile(t: &Tile<'_>) {
    for r in 0..t.rows {
        let a = &t.a[r * t.a_stride..][..2 * t.pairs];
        let mut acc = [0f32; PANEL_COLS];
        for (pair, b) in t.b.chunks_exact(PANEL_COLS).enumerate() {
            let (a0, a1) = (
                f32_of_bits(a[2 * pair].to_bits()),
                f32_of_bits(a[2 * pair + 1].to_bits()),
            );
            for (sum, &packed) in acc.iter_mut().zip(b) {
                let b0 = f32_of_bits(packed as u16);
                let b1 = f32_of_bits((packed >> 16) as u16);
                *sum += a0 * b0 + a1 * b1;
            }
        }
        for (col, &sum) in acc[..t.cols].iter().enumerate() {
            // SAFETY: row r < rows and col < cols lie inside C (the function's contract).
            let c = unsafe { &mut *t.c.add(r * t.c_stride + col) };
            *c = if t.load_c {
                *c + t.alpha * sum
            } else {
                t.alpha * sum
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 BF16 micro-kernel and conversion.

    use std::arch::x86_64::*;

    use half::bf16;

    use super::{PANEL_COLS, TILE_ROWS, Tile};

    /// `dst[i] = bf16(src[i])` (round to nearest even).
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW and avx512_bf16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert_row(dst: &mut [bf16], src: &[f32]) {
        let len = dst.len().min(src.len());
        let mut i = 0;
        while i + 32 <= len {
            // SAFETY: i + 32 ≤ len keeps both loads and the store inside the slices.
            unsafe {
                let low = _mm512_loadu_ps(src.as_ptr().add(i));
                let high = _mm512_loadu_ps(src.as_ptr().add(i + 16));
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                _mm512_storeu_si512(dst.as_mut_ptr().add(i).cast(), packed);
            }
            i += 32;
        }
        for j in i..len {
            dst[j] = bf16::from_f32(src[j]);
        }
    }

    /// One panel of B from float32 rows `rs` apart (unit column stride): columns
    /// `first..first + cols`, for each pair of rows the two rows' values converted to bf16 and
    /// interleaved, 16 columns per vector; zero past k and past `cols`.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW and avx512_bf16; every `data[row · rs + first + c]` with
    /// row < k and c < cols lies inside `data`; `out` holds ⌈k/2⌉ · 32 values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_panel_f32_rows(
        out: &mut [u32],
        data: &[f32],
        rs: usize,
        first: usize,
        cols: usize,
        k: usize,
    ) {
        // Lane 2i takes the even row's column i (low half), lane 2i + 1 the odd row's.
        let mut order = [0i16; 32];
        for (i, pair) in order.chunks_exact_mut(2).enumerate() {
            pair[0] = i as i16;
            pair[1] = 16 + i as i16;
        }
        // SAFETY: 32 i16 are the 64 bytes of one vector.
        let order = unsafe { _mm512_loadu_si512(order.as_ptr().cast()) };
        let pairs = k.div_ceil(2);
        debug_assert!(out.len() >= pairs * PANEL_COLS);
        for pair in 0..pairs {
            let even = pair * 2;
            let odd = even + 1;
            for half in 0..2 {
                let start = half * 16;
                if start >= cols {
                    break;
                }
                let count = (cols - start).min(16);
                let mask = ((1u32 << count) - 1) as __mmask16;
                // SAFETY: the masked loads read columns first + start .. + count of rows
                // `even` and `odd` (< k), inside `data` (the function's contract); the store
                // writes 16 values at pair · 32 + start ≤ len − 16 of `out`.
                unsafe {
                    let low =
                        _mm512_maskz_loadu_ps(mask, data.as_ptr().add(even * rs + first + start));
                    let high = if odd < k {
                        _mm512_maskz_loadu_ps(mask, data.as_ptr().add(odd * rs + first + start))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let converted: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                    let interleaved = _mm512_permutexvar_epi16(order, converted);
                    _mm512_storeu_si512(
                        out.as_mut_ptr().add(pair * PANEL_COLS + start).cast(),
                        interleaved,
                    );
                }
            }
        }
    }

    /// The micro-kernel: dispatches on the tile's rows to a kernel with that many unrolled.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW and avx512_bf16; `t.c` addresses `t.rows` rows (`t.c_stride`
    /// apart) of `t.cols` ≤ 32 writable values; `t.a` holds `t.rows` rows of `2 · t.pairs`
    /// values `t.a_stride` apart; `t.b` holds `t.pairs · 32` values.
    pub(super) unsafe fn tile(t: &Tile<'_>) {
        debug_assert!(t.rows >= 1 && t.rows <= TILE_ROWS && t.cols <= PANEL_COLS);
        debug_assert!(t.b.len() >= t.pairs * PANEL_COLS);
        debug_assert!(t.a.len() >= (t.rows - 1) * t.a_stride + 2 * t.pairs);
        // SAFETY: the caller's contract, passed on.
        unsafe {
            match t.rows {
                1 => tile_rows::<1>(t),
                2 => tile_rows::<2>(t),
                3 => tile_rows::<3>(t),
                4 => tile_rows::<4>(t),
                5 => tile_rows::<5>(t),
                6 => tile_rows::<6>(t),
                7 => tile_rows::<7>(t),
                8 => tile_rows::<8>(t),
                9 => tile_rows::<9>(t),
                10 => tile_rows::<10>(t),
                11 => tile_rows::<11>(t),
                _ => tile_rows::<12>(t),
            }
        }
    }

    /// [`tile`] for exactly `R` rows.
    ///
    /// # Safety
    /// As [`tile`], with `t.rows == R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile_rows<const R: usize>(t: &Tile<'_>) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let a = t.a.as_ptr();
        let b = t.b.as_ptr();
        for pair in 0..t.pairs {
            // SAFETY: pair < t.pairs, so the 32 values of B and each row's pair of A read
            // here lie inside the slices (the function's contract).
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(pair * 32).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(pair * 32 + 16).cast()));
                for (r, row) in acc.iter_mut().enumerate() {
                    let word = a
                        .add(r * t.a_stride + 2 * pair)
                        .cast::<i32>()
                        .read_unaligned();
                    let a_pair: __m512bh = std::mem::transmute(_mm512_set1_epi32(word));
                    row[0] = _mm512_dpbf16_ps(row[0], a_pair, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], a_pair, b1);
                }
            }
        }
        let alpha = _mm512_set1_ps(t.alpha);
        let mask = |first: usize| -> __mmask16 {
            let count = t.cols.saturating_sub(first).min(16);
            ((1u32 << count) - 1) as __mmask16
        };
        let masks = [mask(0), mask(16)];
        for (r, row) in acc.iter().enumerate() {
            for (half, (&sum, &m)) in row.iter().zip(&masks).enumerate() {
                if m == 0 {
                    continue;
                }
                // SAFETY: the masked lanes are the tile's columns below t.cols of row r < R,
                // inside C (the function's contract).
                unsafe {
                    let c = t.c.add(r * t.c_stride + half * 16);
                    let value = if t.load_c {
                        _mm512_fmadd_ps(sum, alpha, _mm512_maskz_loadu_ps(m, c))
                    } else {
                        _mm512_mul_ps(sum, alpha)
                    };
                    _mm512_mask_storeu_ps(c, m, value);
                }
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    //! AMX tiles: `tdpbf16ps` multiplies a 16-row × 16-pair tile of A by a 16-pair × 16-column
    //! tile of B (the panels' layout, 128 bytes a pair) into 16 × 16 float32 accumulators.

    use std::arch::asm;

    use super::{PANEL_COLS, Region, TILE_ROWS, Tile};

    /// Pairs of k per tile product (64 bytes of A per row).
    const TILE_PAIRS: usize = 16;
    /// Rows per call: two tiles of 16.
    const AMX_ROWS: usize = 32;

    /// The CPU has AMX-TILE and AMX-BF16 (CPUID 7.0 EDX bits 24 and 22) and Linux grants this
    /// process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
    pub(super) fn available() -> bool {
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let tile_and_bf16 = (leaf.edx >> 24) & 1 == 1 && (leaf.edx >> 22) & 1 == 1;
        if !tile_and_bf16 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only asks the kernel for a permission.
        let status = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        status == 0
    }

    /// Which tile configuration is loaded on this thread (within one task): the rows of the
    /// C and A tiles (0: none). `ldtilecfg` is costly, so it is loaded again only when a
    /// region's row count changes (the last rows of a task).
    #[derive(Default)]
    pub(super) struct TileState {
        rows: usize,
    }

    impl TileState {
        /// Loads the configuration for `rows` (1–32) rows of C unless it is loaded already:
        /// tiles 0–3 C (rows 0–15 and 16–31 × columns 0–15 and 16–31), 4–5 A (rows 0–15,
        /// 16–31), 6–7 B (columns 0–15, 16–31).
        ///
        /// # Safety
        /// The CPU has AMX with tile data permitted.
        unsafe fn configure(&mut self, rows: usize) {
            if self.rows == rows {
                return;
            }
            let (low, high) = (rows.min(16), rows.saturating_sub(16));
            let mut config = [0u8; 64];
            config[0] = 1; // palette 1
            let tiles: [u8; 8] = [low, low, high, high, low, high, 16, 16].map(|r| r as u8);
            for (tile, &tile_rows) in tiles.iter().enumerate() {
                let colsb: u16 = if tile_rows == 0 { 0 } else { 64 };
                config[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&colsb.to_le_bytes());
                config[48 + tile] = tile_rows;
            }
            // SAFETY: a valid palette-1 configuration (the contract: the CPU has AMX).
            unsafe { asm!("ldtilecfg [{0}]", in(reg) config.as_ptr(), options(nostack)) };
            self.rows = rows;
        }

        /// Releases the tiles if a configuration was loaded.
        ///
        /// # Safety
        /// As [`TileState::configure`] (nothing to do where none was loaded).
        pub(super) unsafe fn release(&mut self) {
            if self.rows != 0 {
                // SAFETY: the tiles were configured on this CPU.
                unsafe { asm!("tilerelease", options(nostack)) };
                self.rows = 0;
            }
        }
    }

    /// The rows `rows.0..rows.1` of a region: AMX for 16-row tiles over the pairs up to a
    /// multiple of 16, then `vdpbf16ps` for the remaining pairs (accumulating). Full panels
    /// with α = 1 load and store C straight from the tiles; others go through `sums`.
    ///
    /// # Safety
    /// Those rows of C (`cols` columns) are the caller's to write; the CPU has AMX (tile data
    /// permitted) and avx512_bf16; A holds those rows of `2 · pairs` values, B `pairs` pairs.
    pub(super) unsafe fn rows(region: &Region<'_>, rows: (usize, usize), tiles: &mut TileState) {
        let amx_pairs = region.pairs / TILE_PAIRS * TILE_PAIRS;
        let direct = region.alpha == 1.0 && region.cols == PANEL_COLS;
        let mut sums = [0f32; AMX_ROWS * PANEL_COLS];
        let mut row = rows.0;
        while row < rows.1 {
            let tile_rows = AMX_ROWS.min(rows.1 - row);
            let a = &region.a[row * region.a_stride..];
            // SAFETY: row < rows.1, inside C (the contract).
            let c = unsafe { region.c.add(row * region.c_stride) };
            if amx_pairs > 0 {
                debug_assert!(a.len() >= (tile_rows - 1) * region.a_stride + 2 * amx_pairs);
                let (sums_at, sums_stride, load_sums) = if direct {
                    (c, region.c_stride * 4, region.load_c)
                } else {
                    (sums.as_mut_ptr(), PANEL_COLS * 4, false)
                };
                // SAFETY: the tile loads read `tile_rows` rows of 2·amx_pairs values of `a`
                // and amx_pairs pairs of B (the contract); C's tiles are `tile_rows` rows of
                // 32 values of C (full panel, the contract) or of `sums`.
                unsafe {
                    tiles.configure(tile_rows);
                    product(
                        a.as_ptr().cast(),
                        region.a_stride * 2,
                        region.b.as_ptr(),
                        amx_pairs,
                        (sums_at.cast(), sums_stride, load_sums),
                        tile_rows,
                    );
                }
                if !direct {
                    // SAFETY: the CPU has AVX-512 (the contract); C's rows as above.
                    unsafe {
                        store(
                            &sums,
                            c,
                            region.c_stride,
                            tile_rows,
                            region.cols,
                            region.alpha,
                            region.load_c,
                        );
                    }
                }
            }
            let rest = region.pairs - amx_pairs;
            let mut done = 0;
            while rest > 0 && done < tile_rows {
                let part = TILE_ROWS.min(tile_rows - done);
                let tile = Tile {
                    a: &a[done * region.a_stride + 2 * amx_pairs..],
                    a_stride: region.a_stride,
                    b: &region.b[amx_pairs * PANEL_COLS..],
                    pairs: rest,
                    // SAFETY: row + done < rows.1, inside C.
                    c: unsafe { c.add(done * region.c_stride) },
                    c_stride: region.c_stride,
                    rows: part,
                    cols: region.cols,
                    alpha: region.alpha,
                    load_c: region.load_c || amx_pairs > 0,
                };
                // SAFETY: the CPU has avx512_bf16; the tile lies inside A, B and C.
                unsafe { super::avx512::tile(&tile) };
                done += part;
            }
            row += tile_rows;
        }
    }

    /// C [rows × 32] (+)= A [rows × 2·pairs] · B panel (pairs × 32), rows ≤ 32, pairs a
    /// multiple of 16, in the tiles `TileState::configure(rows)` set up; C is
    /// `(pointer, row stride in bytes, whether to add to its values)`.
    ///
    /// # Safety
    /// The CPU has AMX and the tiles are configured for `rows`; `a` addresses `rows` rows
    /// `a_stride_bytes` apart of 4·pairs readable bytes; `b` addresses pairs · 32 readable u32;
    /// C `rows` rows of 128 readable and writable bytes.
    unsafe fn product(
        a: *const u8,
        a_stride_bytes: usize,
        b: *const u32,
        pairs: usize,
        c: (*mut u8, usize, bool),
        rows: usize,
    ) {
        let high = rows > 16;
        let (c, c_stride, load_c) = c;
        let b_stride = PANEL_COLS * 4;
        // SAFETY: every load reads `rows` (A, C) or 16 (B) rows of 64 bytes inside the
        // operands (the contract); the stores write `rows` rows of 128 bytes of C; tiles of
        // 0 rows (2, 3 and 5 when rows ≤ 16) are never touched.
        unsafe {
            let c_high = c.add(16 * c_stride);
            // Two C tiles side by side (columns 0–15 and 16–31) at `$c`.
            macro_rules! c_tiles {
                ($left:literal, $right:literal, $c:expr) => {
                    asm!($left, $right, c = in(reg) $c, c1 = in(reg) $c.add(64),
                        sc = in(reg) c_stride, options(nostack))
                };
            }
            if load_c {
                c_tiles!(
                    "tileloadd tmm0, [{c} + {sc}*1]",
                    "tileloadd tmm1, [{c1} + {sc}*1]",
                    c
                );
                if high {
                    c_tiles!(
                        "tileloadd tmm2, [{c} + {sc}*1]",
                        "tileloadd tmm3, [{c1} + {sc}*1]",
                        c_high
                    );
                }
            } else {
                asm!("tilezero tmm0", "tilezero tmm1", options(nostack));
                if high {
                    asm!("tilezero tmm2", "tilezero tmm3", options(nostack));
                }
            }
            let a_high = a.add(16 * a_stride_bytes);
            let mut chunk = 0;
            while chunk < pairs {
                let b_chunk = b.add(chunk * PANEL_COLS).cast::<u8>();
                if high {
                    asm!(
                        "tileloadd tmm4, [{a} + {sa}*1]",
                        "tileloadd tmm6, [{b} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tileloadd tmm5, [{ah} + {sa}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a = in(reg) a.add(chunk * 4),
                        ah = in(reg) a_high.add(chunk * 4),
                        sa = in(reg) a_stride_bytes,
                        b = in(reg) b_chunk,
                        b1 = in(reg) b_chunk.add(64),
                        sb = in(reg) b_stride,
                        options(nostack),
                    );
                } else {
                    asm!(
                        "tileloadd tmm4, [{a} + {sa}*1]",
                        "tileloadd tmm6, [{b} + {sb}*1]",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        a = in(reg) a.add(chunk * 4),
                        sa = in(reg) a_stride_bytes,
                        b = in(reg) b_chunk,
                        b1 = in(reg) b_chunk.add(64),
                        sb = in(reg) b_stride,
                        options(nostack),
                    );
                }
                chunk += TILE_PAIRS;
            }
            c_tiles!(
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                c
            );
            if high {
                c_tiles!(
                    "tilestored [{c} + {sc}*1], tmm2",
                    "tilestored [{c1} + {sc}*1], tmm3",
                    c_high
                );
            }
        }
    }

    /// C's `rows` × `cols` (+)= α · sums.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `c` addresses `rows` rows `c_stride` apart of `cols` ≤ 32
    /// writable values.
    #[target_feature(enable = "avx512f")]
    unsafe fn store(
        sums: &[f32; AMX_ROWS * PANEL_COLS],
        c: *mut f32,
        c_stride: usize,
        rows: usize,
        cols: usize,
        alpha: f32,
        load_c: bool,
    ) {
        use std::arch::x86_64::*;
        let alpha = _mm512_set1_ps(alpha);
        for r in 0..rows {
            for half in 0..2 {
                let count = cols.saturating_sub(half * 16).min(16);
                if count == 0 {
                    continue;
                }
                let mask = ((1u32 << count) - 1) as __mmask16;
                // SAFETY: the masked lanes are columns below `cols` of row r < rows of C (the
                // contract) and values of `sums`.
                unsafe {
                    let sum = _mm512_loadu_ps(sums.as_ptr().add(r * PANEL_COLS + half * 16));
                    let dst = c.add(r * c_stride + half * 16);
                    let value = if load_c {
                        _mm512_fmadd_ps(sum, alpha, _mm512_maskz_loadu_ps(mask, dst))
                    } else {
                        _mm512_mul_ps(sum, alpha)
                    };
                    _mm512_mask_storeu_ps(dst, mask, value);
                }
            }
        }
    }
}
