//! Strided float32 matrix products on the CPU (the `gemm` crate), for the differentiable
//! kernels' backward passes, which multiply by transposed views of their buffers.

use candle_core::Result;
use gemm::Parallelism;

/// `dst = scale · lhs · rhs` (or `dst += scale · lhs · rhs`): lhs [m, k], rhs [k, n],
/// dst [m, n], each given by its (row stride, column stride) in elements, so a transposed
/// operand is the same buffer with its strides swapped.
#[derive(Debug, Clone, Copy)]
pub(super) struct Product {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) dst: (usize, usize),
    pub(super) lhs: (usize, usize),
    pub(super) rhs: (usize, usize),
}

/// candle's thread count, read once: `candle_core::utils::get_num_threads` reads the environment
/// and, on Linux, `/proc/cpuinfo` on every call (5% of a small model's training step).
pub(super) fn thread_count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(candle_core::utils::get_num_threads)
}

/// How a product uses the machine's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Threads {
    /// On the calling thread: the caller runs many products at once.
    One,
    /// On candle's thread count: one large product at a time.
    All,
}

impl Product {
    /// The product of an [m, k] and a [k, n] operand into [m, n], each laid out by its
    /// (row stride, column stride).
    pub(super) const fn new(
        m: usize,
        n: usize,
        k: usize,
        dst: (usize, usize),
        lhs: (usize, usize),
        rhs: (usize, usize),
    ) -> Self {
        Self {
            m,
            n,
            k,
            dst,
            lhs,
            rhs,
        }
    }

    pub(super) fn run(
        &self,
        dst: &mut [f32],
        lhs: &[f32],
        rhs: &[f32],
        scale: f32,
        accumulate: bool,
        threads: Threads,
    ) -> Result<()> {
        let last = |rows: usize, cols: usize, (rs, cs): (usize, usize)| match (rows, cols) {
            (0, _) | (_, 0) => 0,
            (rows, cols) => (rows - 1) * rs + (cols - 1) * cs + 1,
        };
        if dst.len() < last(self.m, self.n, self.dst)
            || lhs.len() < last(self.m, self.k, self.lhs)
            || rhs.len() < last(self.k, self.n, self.rhs)
        {
            candle_core::bail!("matrix product {self:?} out of its buffers");
        }
        if self.m == 0 || self.n == 0 {
            return Ok(());
        }
        let parallelism = match (threads, thread_count()) {
            (Threads::All, count) if count > 1 => Parallelism::Rayon(count),
            _ => Parallelism::None,
        };
        // SAFETY: the checks above keep every element read or written inside `lhs`, `rhs` and
        // `dst` (the furthest one being (rows − 1)·row stride + (cols − 1)·column stride);
        // `dst` is borrowed mutably, so it aliases neither input.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                self.k,
                dst.as_mut_ptr(),
                self.dst.1 as isize,
                self.dst.0 as isize,
                accumulate,
                lhs.as_ptr(),
                self.lhs.1 as isize,
                self.lhs.0 as isize,
                rhs.as_ptr(),
                self.rhs.1 as isize,
                self.rhs.0 as isize,
                if accumulate { 1.0 } else { 0.0 },
                scale,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok(())
    }
}
