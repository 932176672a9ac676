//! The process's allocator for large blocks: freed blocks of 256 KiB and more are kept and handed
//! out again to the next request of (nearly) the same size, or of up to a third less, instead of
//! going back to the system.
//!
//! Why: a training step or a denoising step allocates the same tensors every time (activations,
//! gradients, im2col columns, the optimizer's temporaries). Through the system allocator each of
//! them is a fresh mapping whose every page faults on first touch: the kernel clears the page and,
//! where the page was read before it was written, flushes the other cores' TLBs. Profiled on 2
//! cores, that was a third of a full-size training step (2026-12-06, `perf`).
//!
//! The cache never makes the process bigger than it already was: a request that finds no cached
//! block first returns cached blocks to the system until the live blocks, the cached ones and the
//! new one together fit under the highest live total seen so far. Smaller blocks go straight to
//! the system allocator, which reuses them well. [`release_cached`] hands every cached block back
//! (the window calls it when a fine-tuning run ends, so that it does not keep a training step's
//! peak; an editing window keeps its blocks, which makes the next edit's steps fault-free).
//!
//! [`PROCESS_HEAP`] is the global allocator of every binary that links this crate; the rest of the
//! crate sees only [`stats`] and [`release_cached`].

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks of this size and more are cached.
pub const LARGE_BLOCK_BYTES: usize = 256 * 1024;
/// How many freed blocks are kept at most (a full fine-tuning step frees ~700 gradients at once).
const CACHE_SLOTS: usize = 2048;
/// How many live blocks may be larger than their request (see [`CacheState::take`]).
const OVERSIZED_SLOTS: usize = 1024;
/// Blocks handed back to the system per pass (outside the lock).
const RELEASE_BATCH: usize = 64;

/// The allocator. `const` so that it can be a `static` global allocator.
pub struct LargeBlockCache {
    state: SpinLock<CacheState>,
}

/// A lock that never allocates: std's `Mutex` may allocate on first use on some platforms
/// (a boxed pthread mutex), which inside the allocator would recurse. Held only for a scan of
/// the slots, never across a system call.
struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through a guard, and one guard exists at a time.
unsafe impl<T: Send> Sync for SpinLock<T> {}

struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> SpinLock<T> {
    const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    fn lock(&self) -> SpinGuard<'_, T> {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.locked.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        }
        SpinGuard { lock: self }
    }
}

impl<T> std::ops::Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> std::ops::DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard holds the lock, and `&mut self` makes this the only reference.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// The process's allocator, for every binary that links this crate (the program, its tests).
#[global_allocator]
pub static PROCESS_HEAP: LargeBlockCache = LargeBlockCache::new();

/// What the cache holds now and has done (bytes are the blocks' full sizes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes of large blocks in use.
    pub live_bytes: usize,
    /// Bytes of freed large blocks kept for reuse.
    pub cached_bytes: usize,
    /// The most large-block bytes ever in use at once: the cache's ceiling.
    pub peak_live_bytes: usize,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that went to the system allocator.
    pub misses: u64,
}

#[derive(Clone, Copy)]
struct CachedBlock {
    ptr: *mut u8,
    size: usize,
    align: usize,
    /// When it was freed (a counter): the oldest goes back to the system first.
    freed_at: u64,
}

struct CacheState {
    // Fixed arrays: the allocator must not allocate while it holds its own lock.
    slots: [Option<CachedBlock>; CACHE_SLOTS],
    /// Live blocks handed out for a smaller request: (address, the block's size); 0: free.
    oversized: [(usize, usize); OVERSIZED_SLOTS],
    stats: HeapStats,
    clock: u64,
}

// SAFETY: the pointers are blocks this allocator owns exclusively while they are cached; they are
// only touched under the lock.
unsafe impl Send for CacheState {}

impl LargeBlockCache {
    pub const fn new() -> Self {
        Self {
            state: SpinLock::new(CacheState {
                slots: [None; CACHE_SLOTS],
                oversized: [(0, 0); OVERSIZED_SLOTS],
                stats: HeapStats {
                    live_bytes: 0,
                    cached_bytes: 0,
                    peak_live_bytes: 0,
                    hits: 0,
                    misses: 0,
                },
                clock: 0,
            }),
        }
    }

    /// What the cache holds now.
    pub fn stats(&self) -> HeapStats {
        self.lock().stats
    }

    /// Hands every cached block back to the system.
    pub fn release_cached(&self) {
        loop {
            let mut batch = [None; RELEASE_BATCH];
            let mut taken = 0;
            {
                let mut state = self.lock();
                for slot in state.slots.iter_mut().filter(|slot| slot.is_some()) {
                    if taken == RELEASE_BATCH {
                        break;
                    }
                    batch[taken] = slot.take();
                    taken += 1;
                }
                let bytes: usize = batch.iter().flatten().map(|block| block.size).sum();
                state.stats.cached_bytes -= bytes;
            }
            release(batch);
            if taken < RELEASE_BATCH {
                return;
            }
        }
    }

    fn lock(&self) -> SpinGuard<'_, CacheState> {
        self.state.lock()
    }

    /// A large block for `layout`: a cached one of its size class (or up to 1.5 times it), or a
    /// fresh one from the system after returning enough cached blocks to stay under the peak.
    unsafe fn alloc_large(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let class = size_class(layout.size());
        let reused = loop {
            let mut to_release = [None; RELEASE_BATCH];
            let mut state = self.lock();
            let found = state.take(class, layout.align());
            let room_made = found.is_some() || state.make_room(class, &mut to_release);
            if room_made {
                let size = match found {
                    Some(block) => {
                        state.stats.hits += 1;
                        block.size
                    }
                    None => {
                        state.stats.misses += 1;
                        class
                    }
                };
                // Counted live before the system call, so that concurrent misses see each other.
                state.stats.live_bytes += size;
                state.stats.peak_live_bytes =
                    state.stats.peak_live_bytes.max(state.stats.live_bytes);
                drop(state);
                release(to_release);
                break found;
            }
            drop(state);
            release(to_release);
        };
        if let Some(block) = reused {
            if zeroed {
                // SAFETY: the block is at least `class` ≥ `layout.size()` bytes and ours now.
                unsafe { std::ptr::write_bytes(block.ptr, 0, layout.size()) };
            }
            return block.ptr;
        }
        // SAFETY: a valid layout of non-zero size (the class is at least LARGE_BLOCK_BYTES).
        let ptr = unsafe {
            backing::alloc(
                Layout::from_size_align_unchecked(class, layout.align()),
                zeroed,
            )
        };
        if ptr.is_null() {
            self.lock().stats.live_bytes -= class;
        } else {
            // Only the requested bytes: the class's unused tail stays unmapped.
            backing::prefault(ptr, layout.size());
        }
        ptr
    }

    /// Takes a freed large block back: into the cache, or to the system when every slot is full.
    unsafe fn dealloc_large(&self, ptr: *mut u8, layout: Layout) {
        let block = {
            let mut state = self.lock();
            let class = state.block_size(ptr, layout.size());
            state.stats.live_bytes = state.stats.live_bytes.saturating_sub(class);
            state.clock += 1;
            let block = CachedBlock {
                ptr,
                size: class,
                align: layout.align(),
                freed_at: state.clock,
            };
            match state.slots.iter_mut().find(|slot| slot.is_none()) {
                Some(slot) => {
                    *slot = Some(block);
                    state.stats.cached_bytes += class;
                    return;
                }
                None => block,
            }
        };
        // SAFETY: the block came from the backing with its class size and this alignment.
        unsafe { backing::dealloc(block.ptr, block.layout()) };
    }
}

unsafe impl GlobalAlloc for LargeBlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE_BLOCK_BYTES {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc(layout) }
        } else {
            // SAFETY: as above.
            unsafe { self.alloc_large(layout, false) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() < LARGE_BLOCK_BYTES {
            // SAFETY: the caller's contract, passed on.
            unsafe { System.alloc_zeroed(layout) }
        } else {
            // SAFETY: as above.
            unsafe { self.alloc_large(layout, true) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() < LARGE_BLOCK_BYTES {
            // SAFETY: the caller's contract; small blocks were System's.
            unsafe { System.dealloc(ptr, layout) }
        } else {
            // SAFETY: large blocks were ours.
            unsafe { self.dealloc_large(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < LARGE_BLOCK_BYTES && new_size < LARGE_BLOCK_BYTES {
            // SAFETY: the caller's contract; small blocks stay System's.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        if layout.size() >= LARGE_BLOCK_BYTES
            && new_size >= LARGE_BLOCK_BYTES
            && size_class(new_size) == size_class(layout.size())
        {
            // The block already holds the new size.
            return ptr;
        }
        // SAFETY: the caller guarantees new_size forms a valid layout with this alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: non-zero size (the caller's contract).
        let new_ptr = unsafe { self.alloc(new_layout) };
        if !new_ptr.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes and do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new_ptr, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new_ptr
    }
}

/// The size a large request is served with: rounded up to a sixteenth of the power of two below
/// it (at least 64 KiB), so that nearly equal requests share blocks and at most 1/16 is wasted.
pub fn size_class(size: usize) -> usize {
    let power_below = 1usize << (usize::BITS - 1 - size.max(1).leading_zeros());
    let step = (power_below / 16).max(64 * 1024);
    size.div_ceil(step) * step
}

fn release(blocks: [Option<CachedBlock>; RELEASE_BATCH]) {
    for block in blocks.into_iter().flatten() {
        // SAFETY: cached blocks came from the backing with their class size and alignment and
        // are unused.
        unsafe { backing::dealloc(block.ptr, block.layout()) };
    }
}

/// Where large blocks come from. On Linux, their own anonymous mappings: a block handed back
/// is gone from the process at once (through the C allocator, blocks under its 32 MiB mapping
/// threshold would stay in its arenas, uncounted by the cache's ceiling), and a fresh mapping
/// is already zero.
#[cfg(target_os = "linux")]
mod backing {
    use std::alloc::{GlobalAlloc, Layout, System};

    const PAGE: usize = 4096;

    /// # Safety
    /// A layout of non-zero size that is a multiple of the page size (a size class).
    pub(super) unsafe fn alloc(layout: Layout, zeroed: bool) -> *mut u8 {
        if layout.align() > PAGE {
            // SAFETY: the caller's contract.
            return unsafe {
                if zeroed {
                    System.alloc_zeroed(layout)
                } else {
                    System.alloc(layout)
                }
            };
        }
        // SAFETY: a fresh private anonymous mapping; nothing else is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            ptr.cast()
        }
    }

    /// # Safety
    /// `ptr` came from [`alloc`] with this layout and is no longer used.
    pub(super) unsafe fn dealloc(ptr: *mut u8, layout: Layout) {
        if layout.align() > PAGE {
            // SAFETY: the caller's contract.
            unsafe { System.dealloc(ptr, layout) };
        } else {
            // SAFETY: the whole mapping made by `alloc`.
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
        }
    }

    /// Faults a fresh block's first `size` bytes in at once (`MADV_POPULATE_WRITE`, Linux 5.14;
    /// ignored where the kernel lacks it): one call instead of a page fault per 4 KiB, and no
    /// read-then-write faults (a page first read maps the shared zero page; the write after
    /// it then copies the page and flushes every core's TLB). Not 2 MiB pages: their
    /// background collapsing kept sparsely touched ranges resident (a full-size training
    /// step's peak grew from 14.6 to 17.6 GB).
    pub(super) fn prefault(ptr: *mut u8, size: usize) {
        if !(ptr as usize).is_multiple_of(PAGE) {
            return; // not one of our mappings (an over-aligned block from the C allocator)
        }
        let len = size.next_multiple_of(PAGE);
        // SAFETY: the range lies inside the mapping just made; populating changes no contents.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
    }
}

/// Elsewhere, the system allocator.
#[cfg(not(target_os = "linux"))]
mod backing {
    use std::alloc::{GlobalAlloc, Layout, System};

    /// # Safety
    /// A layout of non-zero size.
    pub(super) unsafe fn alloc(layout: Layout, zeroed: bool) -> *mut u8 {
        // SAFETY: the caller's contract.
        unsafe {
            if zeroed {
                System.alloc_zeroed(layout)
            } else {
                System.alloc(layout)
            }
        }
    }

    /// # Safety
    /// `ptr` came from [`alloc`] with this layout.
    pub(super) unsafe fn dealloc(ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    pub(super) fn prefault(_ptr: *mut u8, _size: usize) {}
}

/// What the process's cache holds now.
pub fn stats() -> HeapStats {
    PROCESS_HEAP.stats()
}

/// Hands the process's cached blocks back to the system (when a job ends).
pub fn release_cached() {
    PROCESS_HEAP.release_cached()
}

impl Default for LargeBlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl CachedBlock {
    fn layout(&self) -> Layout {
        // SAFETY: size and alignment came from a valid Layout.
        unsafe { Layout::from_size_align_unchecked(self.size, self.align) }
    }
}

impl CacheState {
    /// A cached block for a request of `size` (a size class) and `align`: the most recently
    /// freed one of that size (its pages are the likeliest still in the caches), else the
    /// smallest of up to 1.5 times that size (twice cost a full training step 1 GB of peak). A larger block sitting in the cache costs the
    /// process the same memory as handed out, and reusing it saves mapping and clearing fresh
    /// pages (a training step's activations and gradients come in many sizes); its size is
    /// remembered for [`CacheState::block_size`].
    fn take(&mut self, size: usize, align: usize) -> Option<CachedBlock> {
        let cached = || {
            self.slots
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| slot.map(|block| (i, block)))
                .filter(move |(_, block)| block.align == align)
        };
        let exact = cached()
            .filter(|(_, block)| block.size == size)
            .max_by_key(|(_, block)| block.freed_at)
            .map(|(i, _)| i);
        let free_record = self.oversized.iter().position(|&(ptr, _)| ptr == 0);
        let index = match (exact, free_record) {
            (Some(i), _) => i,
            (None, Some(_)) => {
                cached()
                    .filter(|(_, block)| block.size > size && block.size <= size + size / 2)
                    .min_by_key(|(_, block)| block.size)?
                    .0
            }
            (None, None) => return None,
        };
        let block = self.slots[index].take()?;
        self.stats.cached_bytes -= block.size;
        if block.size != size
            && let Some(record) = free_record
        {
            self.oversized[record] = (block.ptr as usize, block.size);
        }
        Some(block)
    }

    /// The size of the live block at `ptr` whose owner asked for `requested` bytes: its class,
    /// or what [`CacheState::take`] recorded when it handed out a larger block.
    fn block_size(&mut self, ptr: *mut u8, requested: usize) -> usize {
        match self
            .oversized
            .iter_mut()
            .find(|(address, _)| *address == ptr as usize)
        {
            Some(record) => {
                let size = record.1;
                *record = (0, 0);
                size
            }
            None => size_class(requested),
        }
    }

    /// Moves the oldest cached blocks into `out` (at most its length) while a new block of
    /// `size` would take the total above the peak of live bytes. True when there is room now
    /// (or nothing left to return).
    fn make_room(&mut self, size: usize, out: &mut [Option<CachedBlock>; RELEASE_BATCH]) -> bool {
        let ceiling = self.stats.peak_live_bytes.max(self.stats.live_bytes + size);
        for out in out.iter_mut() {
            if self.stats.live_bytes + self.stats.cached_bytes + size <= ceiling {
                return true;
            }
            let Some(oldest) = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| slot.map(|block| (i, block.freed_at)))
                .min_by_key(|&(_, freed_at)| freed_at)
                .map(|(i, _)| i)
            else {
                return true;
            };
            let Some(block) = self.slots[oldest].take() else {
                return true;
            };
            self.stats.cached_bytes -= block.size;
            *out = Some(block);
        }
        self.stats.live_bytes + self.stats.cached_bytes + size <= ceiling
            || self.slots.iter().all(Option::is_none)
    }
}

#[cfg(test)]
mod tests;
