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
//! A request that finds no cached block of its size (or up to half again as large) is made of
//! cached blocks' pages (Linux): the block nearest in size, cut to the request where it is
//! larger, else grown with the pages of the largest other cached blocks, moved into place by
//! `mremap` (page tables move; no page is cleared or copied). Only what the cache cannot give is
//! fresh memory. Before that, a training step mapped and cleared over a gigabyte of fresh pages
//! (2026-12-07: 520 blocks, 1.35 GB a LoRA step at 256²) while holding as much in blocks of the
//! wrong sizes.
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
/// How many live blocks may differ from their request's size class: larger (see
/// [`CacheState::take`]) or joined from pieces (see [`CacheState::take_pages`]).
const RECORD_SLOTS: usize = 1024;
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
    /// Requests that went to the system allocator (a fresh block, or a cached one resized).
    pub misses: u64,
    /// Of the misses, those served (at least partly) with cached blocks' pages.
    pub resized: u64,
    /// Bytes of fresh memory taken from the system for requests (whole fresh blocks, and what
    /// cached pages did not cover): each such page is faulted in and cleared by the kernel.
    pub fresh_bytes: u64,
}

#[derive(Clone, Copy)]
struct CachedBlock {
    ptr: *mut u8,
    size: usize,
    align: usize,
    /// When it was freed (a counter): the oldest goes back to the system first.
    freed_at: u64,
    /// How many of the kernel's mappings it may span: 1, or for a block joined from pieces
    /// at most [`MAX_PIECES`] + 1. A joined block is never one of several pieces again, so
    /// that this never compounds: it bounds the process's mapping count (the kernel's limit is
    /// 65530; (cached slots + records) × 7 stays well under it).
    spans: u8,
}

/// A record's address while its block is being joined (no block lies at address 1).
const RESERVED: usize = 1;

/// Most cached blocks one request's block is made of.
const MAX_PIECES: usize = 6;

/// Cached pages taken for one request ([`CacheState::take_pages`]): page-aligned pieces of
/// the backing's mappings (each the start of a cached block, or a whole one), joined in this
/// order into the new block by [`backing::join`].
#[derive(Default)]
struct Pages {
    pieces: [Option<(*mut u8, usize)>; MAX_PIECES],
    /// Their total size.
    bytes: usize,
    /// How many of the kernel's mappings the block they make may span.
    spans: u8,
    /// The record reserved for that block where it spans more than one.
    record: Option<usize>,
}

struct CacheState {
    // Fixed arrays: the allocator must not allocate while it holds its own lock.
    slots: [Option<CachedBlock>; CACHE_SLOTS],
    /// Live blocks other than their request's size class made fresh: (address, the block's
    /// size, its spans); address 0: free, [`RESERVED`]: taken for a block being joined.
    records: [(usize, usize, u8); RECORD_SLOTS],
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
                records: [(0, 0, 0); RECORD_SLOTS],
                stats: HeapStats {
                    live_bytes: 0,
                    cached_bytes: 0,
                    peak_live_bytes: 0,
                    hits: 0,
                    misses: 0,
                    resized: 0,
                    fresh_bytes: 0,
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

    /// A large block for `layout`: a cached one of its size class (or up to 1.5 times it), else
    /// one made of cached blocks' pages ([`CacheState::take_pages`]), else (or for the rest) fresh
    /// memory from the system, after returning enough cached blocks to stay under the peak.
    unsafe fn alloc_large(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        let class = size_class(layout.size());
        // Taken out of the cache on the first pass and kept while room is made.
        let mut pages: Option<Pages> = None;
        let pages = loop {
            let mut to_release = [None; RELEASE_BATCH];
            let mut state = self.lock();
            if pages.is_none() {
                if let Some(block) = state.take(class, layout.align()) {
                    state.stats.hits += 1;
                    state.count_live(block.size);
                    drop(state);
                    if zeroed {
                        // SAFETY: the block is at least `class` ≥ `layout.size()` bytes and
                        // ours now.
                        unsafe { std::ptr::write_bytes(block.ptr, 0, layout.size()) };
                    }
                    return block.ptr;
                }
                pages = Some(state.take_pages(class, layout.align()));
            }
            if state.make_room(class, &mut to_release) {
                let cached_bytes = pages.as_ref().map_or(0, |pages| pages.bytes);
                state.stats.misses += 1;
                state.stats.fresh_bytes += (class - cached_bytes) as u64;
                if cached_bytes > 0 {
                    state.stats.resized += 1;
                }
                // Counted live before the system call, so that concurrent misses see each other.
                state.count_live(class);
                drop(state);
                release(to_release);
                break pages.unwrap_or_default();
            }
            drop(state);
            release(to_release);
        };
        let ptr = if pages.bytes == 0 {
            // SAFETY: a valid layout of non-zero size (the class is at least LARGE_BLOCK_BYTES).
            unsafe {
                backing::alloc(
                    Layout::from_size_align_unchecked(class, layout.align()),
                    zeroed,
                )
            }
        } else {
            let cached_bytes = pages.bytes;
            let (record, spans) = (pages.record, pages.spans);
            // SAFETY: the pieces were cached (unused) parts of the backing's mappings, taken out
            // of the cache; `class` is a page multiple no smaller than their sum.
            let ptr = unsafe { backing::join(pages, class) };
            if let Some(record) = record {
                self.lock().records[record] = if ptr.is_null() {
                    (0, 0, 0)
                } else {
                    (ptr as usize, class, spans)
                };
            }
            if !ptr.is_null() && zeroed {
                // The cached pages come first and hold old contents; the rest is fresh, zero.
                // SAFETY: they lie in the new block.
                unsafe { std::ptr::write_bytes(ptr, 0, layout.size().min(cached_bytes)) };
            }
            ptr
        };
        if ptr.is_null() {
            self.lock().stats.live_bytes -= class;
        } else {
            // Only the requested bytes: the class's unused tail stays unmapped. (Pages already
            // there cost a page-table walk.)
            backing::prefault(ptr, layout.size());
        }
        ptr
    }

    /// Takes a freed large block back: into the cache, or to the system when every slot is full.
    unsafe fn dealloc_large(&self, ptr: *mut u8, layout: Layout) {
        let block = {
            let mut state = self.lock();
            let (class, spans) = state.block_size(ptr, layout.size());
            state.stats.live_bytes = state.stats.live_bytes.saturating_sub(class);
            state.clock += 1;
            let block = CachedBlock {
                ptr,
                size: class,
                align: layout.align(),
                freed_at: state.clock,
                spans,
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

    pub(super) const PAGE: usize = 4096;
    /// Cached blocks of up to [`PAGE`] alignment can give their pages ([`join`]).
    pub(super) const JOINS: bool = true;

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

    /// Joins the cached pages' pieces into one block of `size` bytes: a piece of that size is
    /// the block; otherwise a fresh mapping of `size` bytes receives the pieces' pages in order
    /// (`mremap` moves the page tables; a piece may span several of the kernel's mappings
    /// since Linux 6.17, and where the kernel refuses, the piece is given back and the block
    /// keeps fresh pages there). What the pieces do not cover is fresh. Null where the system
    /// has no memory for the mapping (the pieces are then given back).
    ///
    /// # Safety
    /// Each piece is a page-aligned range of mappings made by [`alloc`], unused and owned by
    /// the caller; their sum is at most `size`, a page multiple.
    pub(super) unsafe fn join(pages: super::Pages, size: usize) -> *mut u8 {
        let pieces = pages.pieces.into_iter().flatten();
        if let [Some((only, only_size)), None, ..] = pages.pieces
            && only_size == size
        {
            return only;
        }
        // SAFETY: a page-multiple size, page alignment.
        let block = unsafe { alloc(Layout::from_size_align_unchecked(size, PAGE), false) };
        let mut offset = 0;
        for (ptr, piece_size) in pieces {
            let moved = if block.is_null() {
                libc::MAP_FAILED
            } else {
                // SAFETY: the destination lies inside the new block, past what is already
                // placed; FIXED replaces the block's untouched pages there with the piece's.
                unsafe {
                    libc::mremap(
                        ptr.cast(),
                        piece_size,
                        piece_size,
                        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                        block.add(offset).cast::<libc::c_void>(),
                    )
                }
            };
            if moved == libc::MAP_FAILED {
                // SAFETY: the piece is intact after a failed mremap, and the caller's.
                unsafe { libc::munmap(ptr.cast(), piece_size) };
            }
            offset += piece_size;
        }
        block
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

    pub(super) const PAGE: usize = 4096;
    /// Blocks from the system allocator cannot give their pages to another.
    pub(super) const JOINS: bool = false;

    /// Never called (see [`JOINS`]).
    ///
    /// # Safety
    /// None needed: it touches nothing.
    pub(super) unsafe fn join(_pages: super::Pages, _size: usize) -> *mut u8 {
        std::ptr::null_mut()
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
        let free_record = self.free_record();
        // A joined block needs a record to be remembered as joined when it comes back.
        let exact = cached()
            .filter(|(_, block)| block.size == size && (block.spans == 1 || free_record.is_some()))
            .max_by_key(|(_, block)| block.freed_at)
            .map(|(i, _)| i);
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
        if (block.size != size || block.spans > 1)
            && let Some(record) = free_record
        {
            self.records[record] = (block.ptr as usize, block.size, block.spans);
        }
        Some(block)
    }

    fn free_record(&self) -> Option<usize> {
        self.records.iter().position(|&(address, ..)| address == 0)
    }

    /// Takes cached pages for a request of `size` bytes (a size class) out of the cache: the
    /// block nearest in size (of equally near ones the most recently freed) and, while that is
    /// short of `size`, the largest of the others. A block larger than what is still needed
    /// gives only its start; its tail stays cached as a block of its own. A joined block
    /// serves only as the one piece that covers the request (its start, no pages moved), and a
    /// new block spanning more than one mapping needs a free record. Nothing for blocks the
    /// backing cannot join ([`backing::JOINS`], alignments above a page).
    fn take_pages(&mut self, size: usize, align: usize) -> Pages {
        let mut pages = Pages::default();
        if !backing::JOINS || align > backing::PAGE {
            return pages;
        }
        let record = self.free_record();
        for (taken, piece) in pages.pieces.iter_mut().enumerate() {
            let wanted = size - pages.bytes;
            let usable = |block: &CachedBlock| {
                let covers = taken == 0 && block.size >= wanted;
                block.align == align
                    && if record.is_some() {
                        block.spans == 1 || covers
                    } else {
                        block.spans == 1 && covers
                    }
            };
            let candidates = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, slot)| slot.map(|block| (i, block)))
                .filter(|(_, block)| usable(block));
            let chosen = if taken == 0 {
                candidates.min_by_key(|(_, block)| {
                    (block.size.abs_diff(wanted), u64::MAX - block.freed_at)
                })
            } else {
                candidates.max_by_key(|(_, block)| (block.size, block.freed_at))
            };
            let Some((index, block)) = chosen else { break };
            pages.spans += block.spans;
            if block.size > wanted {
                // The start is taken; the tail stays in the slot.
                self.slots[index] = Some(CachedBlock {
                    // SAFETY: inside the block's mapping (`wanted` < its size).
                    ptr: unsafe { block.ptr.add(wanted) },
                    size: block.size - wanted,
                    ..block
                });
                *piece = Some((block.ptr, wanted));
                pages.bytes += wanted;
            } else {
                self.slots[index] = None;
                *piece = Some((block.ptr, block.size));
                pages.bytes += block.size;
            }
            self.stats.cached_bytes -= piece.map_or(0, |(_, size)| size);
            if pages.bytes == size {
                break;
            }
        }
        if pages.bytes > 0 && pages.bytes < size {
            pages.spans += 1; // the fresh mapping's rest
        }
        if pages.spans > 1
            && let Some(record) = record
        {
            self.records[record] = (RESERVED, 0, pages.spans);
            pages.record = Some(record);
        }
        pages
    }

    /// Counts a block of `size` bytes handed out.
    fn count_live(&mut self, size: usize) {
        self.stats.live_bytes += size;
        self.stats.peak_live_bytes = self.stats.peak_live_bytes.max(self.stats.live_bytes);
    }

    /// The size of the live block at `ptr` whose owner asked for `requested` bytes, and how
    /// many mappings it spans: its class and 1, or what was recorded when it was handed out.
    fn block_size(&mut self, ptr: *mut u8, requested: usize) -> (usize, u8) {
        match self
            .records
            .iter_mut()
            .find(|(address, ..)| *address == ptr as usize)
        {
            Some(record) => {
                let (_, size, spans) = *record;
                *record = (0, 0, 0);
                (size, spans)
            }
            None => (size_class(requested), 1),
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
