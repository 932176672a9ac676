//! Strided float32 matrix products on the CPU (the `gemm` crate; those with one narrow side on
//! AVX-512 `ip2p_kernels::skinny`), for the differentiable kernels' backward passes, which
//! multiply by transposed views of their buffers, and for the inference kernels' float32
//! products.

use candle_core::Result;
use gemm::Parallelism;
use ip2p_kernels::skinny::{MAX_NARROW, Skinny};

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

    /// The product as a [`Skinny`] one when one side is narrow and the other wide (and the
    /// CPU has AVX-512F); `true` when the operands swap places (m is the narrow side).
    fn skinny(&self) -> Option<(Skinny, bool)> {
        const MIN_WIDE: usize = 128;
        if self.k < 16 || !ip2p_kernels::skinny::available() {
            return None;
        }
        if self.n <= MAX_NARROW && self.m >= MIN_WIDE {
            let product = Skinny {
                wide: self.m,
                narrow: self.n,
                k: self.k,
                a: self.lhs,
                b: self.rhs,
                out: self.dst,
            };
            return Some((product, false));
        }
        if self.m <= MAX_NARROW && self.n >= MIN_WIDE {
            // dstᵀ = rhsᵀ · lhsᵀ: every operand with its strides swapped.
            let swap = |(r, c): (usize, usize)| (c, r);
            let product = Skinny {
                wide: self.n,
                narrow: self.m,
                k: self.k,
                a: swap(self.rhs),
                b: swap(self.lhs),
                out: swap(self.dst),
            };
            return Some((product, true));
        }
        None
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
        if let Some((skinny, swapped)) = self.skinny() {
            let (a, b) = if swapped { (rhs, lhs) } else { (lhs, rhs) };
            // SAFETY: the checks above keep every element the strides address inside its
            // buffer; `dst` is borrowed mutably, so it aliases neither input.
            let threaded = threads == Threads::All && thread_count() > 1;
            unsafe { skinny.run(dst, a, b, scale, accumulate, threaded) };
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

#[cfg(test)]
mod tests {
    use super::super::test_values::lcg_values;
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        lcg_values(len, u64::from(seed) + 1)
    }

    /// `dst (+)= scale · lhs · rhs` in f64, element by element.
    fn reference(
        p: &Product,
        dst: &[f32],
        lhs: &[f32],
        rhs: &[f32],
        scale: f32,
        acc: bool,
    ) -> Vec<f64> {
        let mut out: Vec<f64> = dst.iter().map(|&v| f64::from(v)).collect();
        for i in 0..p.m {
            for j in 0..p.n {
                let sum: f64 = (0..p.k)
                    .map(|k| {
                        f64::from(lhs[i * p.lhs.0 + k * p.lhs.1])
                            * f64::from(rhs[k * p.rhs.0 + j * p.rhs.1])
                    })
                    .sum();
                let at = i * p.dst.0 + j * p.dst.1;
                out[at] = f64::from(scale) * sum + if acc { out[at] } else { 0.0 };
            }
        }
        out
    }

    /// Narrow products (either side, 1 to 5 vectors, a partial last tile of the wide side,
    /// transposed operands and destination, scaling and accumulation, one thread or all)
    /// equal the f64 reference to float32 rounding; so do the wide ones that stay with gemm.
    #[test]
    fn narrow_and_wide_products_match_the_reference() {
        // (m, n, k, lhs transposed, rhs transposed, dst transposed)
        let cases = [
            (130, 16, 64, false, false, false),
            (203, 40, 33, true, false, false),
            (129, 77, 50, false, true, false),
            (150, 80, 20, false, false, true),
            (16, 300, 40, false, true, false),
            (64, 1280 / 8, 128, true, true, true),
            (77, 96, 24, false, false, false),
        ];
        for (n, &(m, cols, k, lt, rt, dt)) in cases.iter().enumerate() {
            let strides = |rows: usize, cols: usize, t: bool| if t { (1, rows) } else { (cols, 1) };
            let p = Product::new(
                m,
                cols,
                k,
                strides(m, cols, dt),
                strides(m, k, lt),
                strides(k, cols, rt),
            );
            let lhs = values(m * k, 3 * n as u32);
            let rhs = values(k * cols, 3 * n as u32 + 1);
            for (scale, accumulate, threads) in
                [(1.0, false, Threads::All), (0.5, true, Threads::One)]
            {
                let mut dst = values(m * cols, 3 * n as u32 + 2);
                let expected = reference(&p, &dst, &lhs, &rhs, scale, accumulate);
                p.run(&mut dst, &lhs, &rhs, scale, accumulate, threads)
                    .unwrap();
                for (i, (&a, &e)) in dst.iter().zip(&expected).enumerate() {
                    assert!(
                        (f64::from(a) - e).abs() <= 1e-5 * (k as f64).sqrt().max(e.abs()),
                        "case {n} {p:?} scale {scale}: element {i}: {a} vs {e}"
                    );
                }
            }
        }
    }
}
