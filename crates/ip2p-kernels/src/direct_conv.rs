//! The direct ("implicit GEMM") float32 convolution for stride 1 on AVX-512 or AVX2 + FMA: no
//! column matrix.
//!
//! Each image is copied once into a zero-bordered buffer, so every kernel tap (input channel,
//! row, column) is a fixed offset from the output pixel it feeds. A tile of output channels ×
//! pixels of one output row is held in vector registers (AVX-512: 8 channels × 48 pixels in 24
//! of its 32 registers; AVX2: 4 channels × 24 pixels, or 6 × 16 for rows of 32, in 12 of its
//! 16); for each tap the tile loads its vectors of the padded image at the tap's offset
//! (consecutive output pixels read consecutive input pixels at stride 1) and multiplies them by
//! its channels' weights for that tap.
//! The im2col path instead writes 9 copies of the input (3×3) and the GEMM then repacks them;
//! at the VAE's 256² that copying was a fifth of the encoder's time.
//!
//! The taps are taken in chunks so that a tile's weights for one chunk (8 × 256 × 4 bytes)
//! stay in the L1 cache while the chunk sweeps the tile's rows; a later chunk adds onto what
//! the earlier ones stored.

use rayon::prelude::*;

use crate::{DisjointOut, Isa, KernelError};

/// A tile's shape on one instruction set: output channels × vectors of `lanes` pixels, with
/// registers left for the loads and the broadcast weight.
#[derive(Debug, Clone, Copy)]
struct TileShape {
    channels: usize,
    vectors: usize,
    lanes: usize,
}

impl TileShape {
    /// The shape for `isa` and output rows `out_w` pixels wide, `None` where `isa` has no vector
    /// kernel.
    fn of(isa: Isa, out_w: usize) -> Option<TileShape> {
        match isa {
            // 8 × 3 of the 32 registers.
            Isa::Avx512 => Some(TileShape {
                channels: 8,
                vectors: 3,
                lanes: 16,
            }),
            // Rows of 25 to 32 pixels (the UNet's 32² level): 6 × 2 of the 16 registers, two
            // tiles a row; a 4 × 3 tile would run them as 2 + 2 vectors with 8 accumulators,
            // 10% slower (interleaved, three runs).
            Isa::Avx2Fma if out_w.div_ceil(8) == 4 => Some(TileShape {
                channels: 6,
                vectors: 2,
                lanes: 8,
            }),
            // Wider rows: 4 × 3, 3 registers for the loads and 1 for the weight (6 × 2 was
            // 0-19% slower on the VAE's rows; 3 × 4, which spills, 30%).
            Isa::Avx2Fma => Some(TileShape {
                channels: 4,
                vectors: 3,
                lanes: 8,
            }),
            Isa::Portable => None,
        }
    }
}

/// Kernel taps per pass over a tile's rows.
const TAP_CHUNK: usize = 256;
/// Output rows per task at most: the band's input for a tap chunk (here 256 taps of 3×3 =
/// 28 channels × 10 rows of 258 pixels at 256², 290 KB) stays in L2 for every channel tile.
const BAND_ROWS: usize = 8;
/// Narrower output rows go through im2col: a tile would be mostly masked lanes.
const MIN_OUT_WIDTH: usize = 32;

/// A stride-1 convolution's geometry: `x` [batch, in_channels, in_h, in_w] convolved with a
/// weight [out_channels, in_channels, k_h, k_w], zero padding on every side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub batch: usize,
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_channels: usize,
    pub k_h: usize,
    pub k_w: usize,
    pub padding: usize,
}

impl Geometry {
    /// Output rows (zero when the kernel is taller than the padded input).
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.padding + 1).saturating_sub(self.k_h)
    }

    /// Output columns (zero when the kernel is wider than the padded input).
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.padding + 1).saturating_sub(self.k_w)
    }

    /// Weights per output channel: in_channels × k_h × k_w.
    fn taps(&self) -> usize {
        self.in_channels * self.k_h * self.k_w
    }
}

/// Whether this CPU has a vector kernel for the direct convolution (AVX-512F, or AVX2 and FMA,
/// as [`crate::isa`] allows).
pub fn available() -> bool {
    TileShape::of(crate::isa(), MIN_OUT_WIDTH).is_some()
}

/// Whether the direct kernel is worth taking for this convolution: padding smaller than the
/// kernel, output rows at least 32 pixels wide (`MIN_OUT_WIDTH`), on a CPU with a vector kernel.
pub fn applies(g: &Geometry) -> bool {
    g.padding < g.k_h && g.padding < g.k_w && g.out_w() >= MIN_OUT_WIDTH && available()
}

/// `x` [B, C_in, H, W] convolved with `weight` [C_out, C_in, k_h, k_w] (+ `bias`), stride 1:
/// [B, C_out, H_out, W_out], on up to `threads` tasks at once (rayon's pool runs them), on the
/// best instructions this CPU has. Any geometry is computed correctly; [`applies`] says when it
/// is worth it (narrow rows just waste lanes).
pub fn conv(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &Geometry,
    threads: usize,
) -> Result<Vec<f32>, KernelError> {
    conv_on(crate::isa(), x, weight, bias, s, threads)
}

/// [`conv`] on the given instructions: an error where this CPU lacks them or they have no
/// kernel ([`Isa::Portable`]).
pub fn conv_on(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    s: &Geometry,
    threads: usize,
) -> Result<Vec<f32>, KernelError> {
    let taps = s.taps();
    let (padded_h, padded_w) = (s.in_h + 2 * s.padding, s.in_w + 2 * s.padding);
    let (out_h, out_w) = (s.out_h(), s.out_w());
    if out_h == 0
        || out_w == 0
        || x.len() != s.batch * s.in_channels * s.in_h * s.in_w
        || weight.len() != s.out_channels * taps
        || bias.is_some_and(|b| b.len() != s.out_channels)
    {
        return Err(KernelError::ShapeMismatch {
            kernel: "direct conv2d",
            shape: format!("{s:?}"),
        });
    }
    let Some(shape) = TileShape::of(isa, out_w).filter(|_| isa.supported()) else {
        return Err(KernelError::Unsupported {
            kernel: "direct conv2d",
            isa,
        });
    };
    let plane = padded_h * padded_w;
    // The offset of each tap from its output pixel's top-left input, in the weight's
    // [C_in, k_h, k_w] order.
    let offsets: Vec<usize> = (0..s.in_channels)
        .flat_map(|c| {
            (0..s.k_h).flat_map(move |ky| (0..s.k_w).map(move |kx| c * plane + ky * padded_w + kx))
        })
        .collect();
    let packed = pack_weights(weight, s.out_channels, taps, shape.channels);
    let out_plane = out_h * out_w;
    let image_out = s.out_channels * out_plane;
    let total = s.batch * image_out;
    let mut out: Vec<f32> = Vec::with_capacity(total);
    // Slack after the last row: a tile's last vector may read past the row's end (lanes that
    // are never stored), and must stay inside the buffer.
    let mut padded = vec![0f32; s.in_channels * plane + shape.vectors * shape.lanes];
    let tiles = s.out_channels.div_ceil(shape.channels);
    let threads = threads.max(1);
    // Tasks own bands of a few output rows, so that the band's padded input for one tap chunk
    // stays in the L2 cache while every channel tile sweeps it; when the image has too few
    // rows to keep every thread busy, the channel tiles are split between tasks too.
    let band_rows = out_h.div_ceil(4 * threads).clamp(1, BAND_ROWS);
    let bands = out_h.div_ceil(band_rows);
    let tile_groups = (4 * threads).div_ceil(bands).clamp(1, tiles);
    let tiles_per_group = tiles.div_ceil(tile_groups);
    for image in 0..s.batch {
        fill_padded(
            &x[image * s.in_channels * s.in_h * s.in_w..][..s.in_channels * s.in_h * s.in_w],
            s,
            &mut padded,
        );
        let out_image = DisjointOut(
            out.spare_capacity_mut()[image * image_out..]
                .as_mut_ptr()
                .cast(),
        );
        (0..bands * tile_groups).into_par_iter().for_each(|task| {
            let (band, group) = (task / tile_groups, task % tile_groups);
            let first_row = band * band_rows;
            let first_tile = group * tiles_per_group;
            let job = BandJob {
                isa,
                shape,
                padded: &padded,
                padded_w,
                offsets: &offsets,
                packed: &packed,
                bias,
                out: out_image,
                out_channels: s.out_channels,
                out_plane,
                out_w,
            };
            // SAFETY: the CPU has `isa` (checked above); tasks write disjoint (channel tiles, rows)
            // parts of this image's output, and every read stays inside `padded` (its slack
            // covers the last tile's over-read).
            unsafe {
                job.run(
                    first_tile..(first_tile + tiles_per_group).min(tiles),
                    first_row..(first_row + band_rows).min(out_h),
                )
            };
        });
    }
    // SAFETY: every (channel, pixel) of every image was stored by the first tap chunk of the
    // task that owns it, and f32 has no invalid values.
    unsafe { out.set_len(total) };
    Ok(out)
}

/// The weight [C_out, taps] by tiles of `tile_channels` rows, each tile laid out tap-major
/// ([taps, rows]) so the kernel reads one tap's weights for all its channels together.
fn pack_weights(
    weight: &[f32],
    out_channels: usize,
    taps: usize,
    tile_channels: usize,
) -> Vec<f32> {
    let mut packed = vec![0f32; weight.len()];
    packed
        .par_chunks_mut(tile_channels * taps)
        .enumerate()
        .for_each(|(tile, dst)| {
            let first = tile * tile_channels;
            let rows = tile_channels.min(out_channels - first);
            for tap in 0..taps {
                for row in 0..rows {
                    dst[tap * rows + row] = weight[(first + row) * taps + tap];
                }
            }
        });
    packed
}

/// One image [C_in, H, W] into `padded` [C_in, H + 2p, W + 2p] with a zero border (the slack
/// after it stays zero).
fn fill_padded(x: &[f32], s: &Geometry, padded: &mut [f32]) {
    let (p, h, w) = (s.padding, s.in_h, s.in_w);
    let padded_w = w + 2 * p;
    let plane = (h + 2 * p) * padded_w;
    padded[..s.in_channels * plane]
        .par_chunks_mut(plane)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            dst[..p * padded_w].fill(0.0);
            for (y, src_row) in src.chunks_exact(w).enumerate() {
                let row = &mut dst[(y + p) * padded_w..][..padded_w];
                row[..p].fill(0.0);
                row[p..p + w].copy_from_slice(src_row);
                row[p + w..].fill(0.0);
            }
            dst[(h + p) * padded_w..].fill(0.0);
        });
}

/// What a task needs: the padded image, the tap offsets, the packed weights and the bias of
/// every channel, where this image's output goes.
struct BandJob<'a> {
    isa: Isa,
    shape: TileShape,
    padded: &'a [f32],
    padded_w: usize,
    offsets: &'a [usize],
    packed: &'a [f32],
    bias: Option<&'a [f32]>,
    out: DisjointOut,
    out_channels: usize,
    out_plane: usize,
    out_w: usize,
}

/// How a tile's accumulators start.
#[derive(Clone, Copy)]
enum Start {
    /// The first tap chunk: the bias (or zero).
    Bias(Option<*const f32>),
    /// A later chunk: what the earlier chunks stored.
    Stored,
}

impl BandJob<'_> {
    /// # Safety
    /// The CPU has `self.isa`; no other task writes these rows of these channel tiles.
    unsafe fn run(&self, tiles: std::ops::Range<usize>, rows: std::ops::Range<usize>) {
        let taps = self.offsets.len();
        let TileShape {
            channels: tile_channels,
            vectors: tile_vectors,
            lanes,
        } = self.shape;
        let mut first_tap = 0;
        while first_tap < taps {
            let chunk = TAP_CHUNK.min(taps - first_tap);
            let offsets = &self.offsets[first_tap..first_tap + chunk];
            for tile in tiles.clone() {
                let first_channel = tile * tile_channels;
                let channels = tile_channels.min(self.out_channels - first_channel);
                // This tile's packed weights for the chunk: [chunk, channels].
                let weights = self.packed[first_channel * taps + first_tap * channels..].as_ptr();
                let start = if first_tap == 0 {
                    Start::Bias(self.bias.map(|b| b[first_channel..].as_ptr()))
                } else {
                    Start::Stored
                };
                for y in rows.clone() {
                    let mut x = 0;
                    while x < self.out_w {
                        let left = self.out_w - x;
                        let vectors = match left.div_ceil(lanes) {
                            // 2 + 2 rather than 3 + 1: a one-vector tile runs at half speed.
                            4 if tile_vectors == 3 => 2,
                            n => n.min(tile_vectors),
                        };
                        let covered = (vectors * lanes).min(left);
                        let last_lanes = covered - (vectors - 1) * lanes;
                        let tile = Tile {
                            image: self.padded[y * self.padded_w + x..].as_ptr(),
                            offsets,
                            weights,
                            // SAFETY (of the add): inside this image's output.
                            out: unsafe {
                                self.out
                                    .0
                                    .add(first_channel * self.out_plane + y * self.out_w + x)
                            },
                            out_plane: self.out_plane,
                            last_lanes,
                            start,
                        };
                        // SAFETY: as this function's.
                        unsafe { tile.dispatch(self.isa, channels, vectors) };
                        x += covered;
                    }
                }
            }
            first_tap += chunk;
        }
    }
}

/// One tile's operands: `image` at the tile's first output pixel (tap offsets added to it),
/// the tap chunk's offsets and packed weights ([taps, channels]), the output at the tile's
/// first channel and pixel (channels `out_plane` apart).
struct Tile<'a> {
    image: *const f32,
    offsets: &'a [usize],
    weights: *const f32,
    out: *mut f32,
    out_plane: usize,
    /// The lanes of the last vector inside the row.
    last_lanes: usize,
    start: Start,
}

impl Tile<'_> {
    /// # Safety
    /// As [`BandJob::run`]; `channels` and `vectors` within `isa`'s [`TileShape`].
    unsafe fn dispatch(&self, isa: Isa, channels: usize, vectors: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded.
        unsafe {
            match isa {
                Isa::Avx512 => avx512::dispatch(self, channels, vectors),
                Isa::Avx2Fma => avx2_fma::dispatch(self, channels, vectors),
                Isa::Portable => unreachable!("no direct convolution without vectors"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, channels, vectors);
            unreachable!("the direct convolution runs only where vectors were detected")
        }
    }
}

/// The tile kernel, written once over the vector operations that each instruction set's module
/// defines (`zero`, `splat`, `load`, `store`, the masked `load_part`/`store_part`, `fmadd`,
/// `prefetch`, the `Mask` of a partial vector and `LANES`), and its dispatch on the tile's size.
#[cfg(target_arch = "x86_64")]
macro_rules! tile_kernel {
    ($feature:literal, $max_channels:literal, [$($c:literal),*], [$($v:literal),*]) => {
        /// # Safety
        /// As [`super::BandJob::run`]; `channels` ≤ the shape's channels, `vectors` ≤ its
        /// vectors.
        pub(super) unsafe fn dispatch(tile: &super::Tile, channels: usize, vectors: usize) {
            macro_rules! by_vectors {
                ($channels:literal) => {
                    match vectors {
                        $($v => unsafe { run::<$channels, $v>(tile) },)*
                        _ => unreachable!("a tile has 1 to {} vectors", [$($v),*].len()),
                    }
                };
            }
            match channels {
                $($c => by_vectors!($c),)*
                _ => unreachable!("a tile has 1 to {} channels", $max_channels),
            }
        }

        /// # Safety
        /// As [`dispatch`], with `C` channels and `V` vectors.
        #[target_feature(enable = $feature)]
        unsafe fn run<const C: usize, const V: usize>(tile: &super::Tile) {
            let last_mask = mask(tile.last_lanes);
            let mut acc = [[zero(); V]; C];
            // SAFETY (of every load and store below): the caller's contract; the last vector
            // is masked to the row's pixels when stored or reloaded.
            unsafe {
                match tile.start {
                    super::Start::Bias(Some(bias)) => {
                        for (c, row) in acc.iter_mut().enumerate() {
                            *row = [splat(*bias.add(c)); V];
                        }
                    }
                    super::Start::Bias(None) => {}
                    super::Start::Stored => {
                        for (c, row) in acc.iter_mut().enumerate() {
                            let out = tile.out.add(c * tile.out_plane);
                            for (v, value) in row.iter_mut().enumerate() {
                                *value = if v + 1 == V {
                                    load_part(out.add(v * LANES), last_mask)
                                } else {
                                    load(out.add(v * LANES))
                                };
                            }
                        }
                    }
                }
                let mut weights = tile.weights;
                for &offset in tile.offsets {
                    let pixels = tile.image.add(offset);
                    // The next tile's pixels for this tap (the row goes on to the right).
                    prefetch(pixels.add(V * LANES + LANES));
                    let mut inputs = [zero(); V];
                    for (v, input) in inputs.iter_mut().enumerate() {
                        *input = load(pixels.add(v * LANES));
                    }
                    for row in acc.iter_mut() {
                        let w = splat(*weights);
                        weights = weights.add(1);
                        for (value, &input) in row.iter_mut().zip(&inputs) {
                            *value = fmadd(input, w, *value);
                        }
                    }
                }
                for (c, row) in acc.iter().enumerate() {
                    let out = tile.out.add(c * tile.out_plane);
                    for (v, &value) in row.iter().enumerate() {
                        if v + 1 == V {
                            store_part(out.add(v * LANES), last_mask, value);
                        } else {
                            store(out.add(v * LANES), value);
                        }
                    }
                }
            }
        }
    };
}

/// The tile kernel on AVX-512F: 16 lanes, partial vectors by mask registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const LANES: usize = 16;
    type Mask = __mmask16;

    #[inline(always)]
    fn mask(lanes: usize) -> Mask {
        u16::MAX >> (LANES - lanes)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn splat(value: f32) -> __m512 {
        _mm512_set1_ps(value)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load(at: *const f32) -> __m512 {
        unsafe { _mm512_loadu_ps(at) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_part(at: *const f32, mask: Mask) -> __m512 {
        unsafe { _mm512_maskz_loadu_ps(mask, at) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(at: *mut f32, value: __m512) {
        unsafe { _mm512_storeu_ps(at, value) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_part(at: *mut f32, mask: Mask, value: __m512) {
        unsafe { _mm512_mask_storeu_ps(at, mask, value) }
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn prefetch(at: *const f32) {
        _mm_prefetch::<_MM_HINT_T0>(at.cast())
    }

    tile_kernel!("avx512f", 8, [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3]);
}

/// The tile kernel on AVX2 + FMA: 8 lanes, partial vectors by lane masks in a register.
#[cfg(target_arch = "x86_64")]
mod avx2_fma {
    use std::arch::x86_64::*;

    const LANES: usize = 8;
    type Mask = __m256i;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mask(lanes: usize) -> Mask {
        // Lane i is on (sign bit set) when i < lanes.
        let indices = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), indices)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn splat(value: f32) -> __m256 {
        _mm256_set1_ps(value)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(at: *const f32) -> __m256 {
        unsafe { _mm256_loadu_ps(at) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load_part(at: *const f32, mask: Mask) -> __m256 {
        unsafe { _mm256_maskload_ps(at, mask) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(at: *mut f32, value: __m256) {
        unsafe { _mm256_storeu_ps(at, value) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_part(at: *mut f32, mask: Mask, value: __m256) {
        unsafe { _mm256_maskstore_ps(at, mask, value) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn prefetch(at: *const f32) {
        _mm_prefetch::<_MM_HINT_T0>(at.cast())
    }

    tile_kernel!("avx2,fma", 6, [1, 2, 3, 4, 5, 6], [1, 2, 3]);
}
