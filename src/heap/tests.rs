use super::*;

const MIB: usize = 1024 * 1024;

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Fills a block with a pattern and checks it, so that a block handed out twice would show.
unsafe fn fill(ptr: *mut u8, size: usize, value: u8) {
    unsafe { std::ptr::write_bytes(ptr, value, size) };
}

unsafe fn all_equal(ptr: *mut u8, size: usize, value: u8) -> bool {
    unsafe { std::slice::from_raw_parts(ptr, size) }
        .iter()
        .all(|&b| b == value)
}

#[test]
fn a_freed_large_block_is_handed_out_again_to_the_same_size() {
    let heap = LargeBlockCache::new();
    unsafe {
        let first = heap.alloc(layout(3 * MIB));
        fill(first, 3 * MIB, 7);
        heap.dealloc(first, layout(3 * MIB));
        let stats = heap.stats();
        assert_eq!(stats.live_bytes, 0);
        assert_eq!(stats.cached_bytes, size_class(3 * MIB));

        let second = heap.alloc(layout(3 * MIB));
        assert_eq!(second, first, "the cached block is reused");
        let stats = heap.stats();
        assert_eq!((stats.hits, stats.misses), (1, 1));
        assert_eq!(stats.cached_bytes, 0);
        heap.dealloc(second, layout(3 * MIB));
        heap.release_cached();
        assert_eq!(heap.stats().cached_bytes, 0);
    }
}

#[test]
fn a_reused_block_asked_for_zeroed_is_zero() {
    let heap = LargeBlockCache::new();
    unsafe {
        let first = heap.alloc(layout(MIB));
        fill(first, MIB, 0xAB);
        heap.dealloc(first, layout(MIB));
        let zeroed = heap.alloc_zeroed(layout(MIB));
        assert_eq!(zeroed, first);
        assert!(all_equal(zeroed, MIB, 0));
        heap.dealloc(zeroed, layout(MIB));
        heap.release_cached();
    }
}

#[test]
fn nearly_equal_sizes_share_a_class_and_waste_at_most_a_sixteenth() {
    for size in [
        LARGE_BLOCK_BYTES,
        300_000,
        MIB,
        MIB + 1,
        5 * MIB + 12_345,
        59 * MIB,
        1 << 33,
    ] {
        let class = size_class(size);
        assert!(class >= size, "{size}");
        assert!(
            class - size <= (size / 16).max(64 * 1024),
            "{size} → {class}"
        );
        assert_eq!(size_class(class), class, "a class is its own class");
    }
    let heap = LargeBlockCache::new();
    unsafe {
        let a = heap.alloc(layout(4_000_000));
        heap.dealloc(a, layout(4_000_000));
        // Same class: served by the same block, which is big enough for it.
        assert_eq!(size_class(4_000_000), size_class(4_050_000));
        let b = heap.alloc(layout(4_050_000));
        assert_eq!(a, b);
        fill(b, 4_050_000, 1);
        heap.dealloc(b, layout(4_050_000));
        heap.release_cached();
    }
}

#[test]
fn the_cache_never_holds_the_process_above_its_peak_of_live_blocks() {
    let heap = LargeBlockCache::new();
    unsafe {
        let small = heap.alloc(layout(MIB));
        heap.dealloc(small, layout(MIB));
        assert_eq!(heap.stats().peak_live_bytes, MIB);
        // A larger block than any before: the cached one's pages are part of it, so the
        // footprint is the new block alone, as it would be without the cache.
        let big = heap.alloc(layout(2 * MIB));
        let stats = heap.stats();
        assert_eq!(stats.cached_bytes, 0);
        assert_eq!(stats.live_bytes, 2 * MIB);
        assert_eq!(
            stats.fresh_bytes as usize,
            2 * MIB,
            "the first 1 MiB, and 1 MiB more"
        );
        heap.dealloc(big, layout(2 * MIB));

        // A request of two thirds of its size or more takes the cached 2 MiB block whole (it
        // costs the same memory cached as handed out) and gives it back whole.
        let most = MIB + MIB / 2;
        let one = heap.alloc(layout(most));
        assert_eq!(one, big);
        let stats = heap.stats();
        assert_eq!(
            (stats.live_bytes, stats.cached_bytes, stats.hits),
            (2 * MIB, 0, 1)
        );
        heap.dealloc(one, layout(most));
        assert_eq!(heap.stats().cached_bytes, 2 * MIB);
        // A smaller one takes the cached block's start; its tail stays cached, and the
        // footprint stays the peak's.
        let half = heap.alloc(layout(MIB / 2));
        assert_eq!(half, big, "the cached block's start");
        let stats = heap.stats();
        assert_eq!(
            (stats.live_bytes, stats.cached_bytes),
            (MIB / 2, MIB + MIB / 2)
        );
        heap.dealloc(half, layout(MIB / 2));
        heap.release_cached();

        // Peak 4 MiB; with 1 MiB live and 2 + 1 MiB cached, a new 3 MiB block (which neither
        // cached block serves) is made of both's pages: nothing fresh.
        let heap = LargeBlockCache::new();
        let a = heap.alloc(layout(MIB));
        let b = heap.alloc(layout(2 * MIB));
        let d = heap.alloc(layout(MIB));
        heap.dealloc(b, layout(2 * MIB));
        heap.dealloc(d, layout(MIB));
        let c = heap.alloc(layout(3 * MIB));
        fill(c, 3 * MIB, 5);
        let stats = heap.stats();
        assert_eq!(stats.peak_live_bytes, 4 * MIB);
        assert_eq!(stats.cached_bytes, 0);
        assert_eq!(stats.live_bytes, 4 * MIB);
        assert_eq!((stats.misses, stats.resized), (4, 1));
        assert_eq!(
            stats.fresh_bytes as usize,
            4 * MIB,
            "nothing fresh for the last"
        );
        heap.dealloc(a, layout(MIB));
        heap.dealloc(c, layout(3 * MIB));
        assert_eq!(heap.stats().live_bytes, 0);
        heap.release_cached();
    }
}

#[test]
fn a_miss_is_made_of_cached_blocks_pages_and_fresh_ones_for_the_rest() {
    let heap = LargeBlockCache::new();
    unsafe {
        let sizes = [MIB, 4 * MIB, 16 * MIB];
        let patterns = [0x11, 0x44, 0x16];
        let blocks = sizes.map(|size| heap.alloc(layout(size)));
        for ((block, size), pattern) in blocks.into_iter().zip(sizes).zip(patterns) {
            fill(block, size, pattern);
            heap.dealloc(block, layout(size));
        }
        assert_eq!(heap.stats().fresh_bytes as usize, 21 * MIB);

        // 7 MiB: the block nearest in size (4 MiB) and the start of the largest other (16 MiB),
        // their pages moved, not cleared; the 16 MiB block's tail stays cached.
        let joined = heap.alloc(layout(7 * MIB));
        assert!(all_equal(joined, 4 * MIB, 0x44));
        assert!(all_equal(joined.add(4 * MIB), 3 * MIB, 0x16));
        let stats = heap.stats();
        assert_eq!((stats.hits, stats.misses, stats.resized), (0, 4, 1));
        assert_eq!(stats.fresh_bytes as usize, 21 * MIB, "nothing fresh");
        assert_eq!((stats.live_bytes, stats.cached_bytes), (7 * MIB, 14 * MIB));

        // 20 MiB: the 16 MiB block's 13 MiB tail (the nearest), and the 1 MiB block; 6 MiB
        // fresh, and the peak grows by the same.
        let grown = heap.alloc(layout(20 * MIB));
        assert!(all_equal(grown, 13 * MIB, 0x16));
        assert!(all_equal(grown.add(13 * MIB), MIB, 0x11));
        assert!(all_equal(grown.add(14 * MIB), 6 * MIB, 0), "fresh pages");
        let stats = heap.stats();
        assert_eq!(stats.resized, 2);
        assert_eq!(stats.fresh_bytes as usize, 27 * MIB);
        assert_eq!((stats.live_bytes, stats.cached_bytes), (27 * MIB, 0));
        assert_eq!(stats.peak_live_bytes, 27 * MIB);
        fill(grown, 20 * MIB, 2);
        assert!(
            all_equal(joined, 4 * MIB, 0x44),
            "the blocks do not overlap"
        );

        // Freed, they serve their sizes again.
        heap.dealloc(joined, layout(7 * MIB));
        heap.dealloc(grown, layout(20 * MIB));
        let again = heap.alloc(layout(20 * MIB));
        assert_eq!(again, grown);
        assert_eq!(heap.stats().hits, 1);
        heap.dealloc(again, layout(20 * MIB));

        // Joined blocks (several of the kernel's mappings each) are never pieces of another
        // (the mapping count would compound); neither of these covers 40 MiB alone.
        let before = heap.stats();
        let larger = heap.alloc(layout(40 * MIB));
        assert!(all_equal(larger, 40 * MIB, 0), "fresh pages");
        let stats = heap.stats();
        assert_eq!(stats.fresh_bytes - before.fresh_bytes, 40 * MIB as u64);
        assert_eq!(stats.resized, before.resized);
        heap.dealloc(larger, layout(40 * MIB));
        heap.release_cached();
        assert_eq!(heap.stats().cached_bytes, 0);
    }
}

#[test]
fn a_joined_block_serves_only_as_the_one_piece_that_covers_a_request() {
    let heap = LargeBlockCache::new();
    let mut state = heap.lock();
    // Cached blocks of 1 MiB (their addresses are never touched here): one joined from 3
    // pieces, the most recently freed, and three of one mapping each.
    for (i, slot) in state.slots.iter_mut().take(4).enumerate() {
        *slot = Some(CachedBlock {
            ptr: ((i + 1) * 64 * MIB) as *mut u8,
            size: MIB,
            align: 8,
            freed_at: 10 - i as u64,
            spans: if i == 0 { 3 } else { 1 },
        });
    }
    state.stats.cached_bytes = 4 * MIB;
    // Half of it: the joined block's start, and the new block spans its 3 mappings.
    let half = state.take_pages(MIB / 2, 8);
    assert_eq!(half.pieces[0], Some(((64 * MIB) as *mut u8, MIB / 2)));
    assert_eq!((half.bytes, half.spans), (MIB / 2, 3));
    let record = half
        .record
        .expect("a block of several mappings is recorded");
    assert_eq!(state.records[record], (RESERVED, 0, 3));
    // 8 MiB: the three others and a fresh rest; the joined block's tail is no piece.
    let large = state.take_pages(8 * MIB, 8);
    assert_eq!(large.pieces.iter().flatten().count(), 3);
    assert_eq!((large.bytes, large.spans), (3 * MIB, 4));
    assert!(state.slots[0].is_some_and(|tail| tail.size == MIB / 2));
    // Without a free record, only a one-mapping block's start serves.
    state.records = [(RESERVED, 0, 1); RECORD_SLOTS];
    assert_eq!(state.take_pages(MIB / 4, 8).bytes, 0);
    // The fake blocks must never reach the system.
    state.slots = [None; CACHE_SLOTS];
    state.records = [(0, 0, 0); RECORD_SLOTS];
}

#[test]
fn a_joined_block_asked_for_zeroed_is_zero() {
    let heap = LargeBlockCache::new();
    unsafe {
        let one = heap.alloc(layout(MIB));
        let two = heap.alloc(layout(2 * MIB));
        fill(one, MIB, 0xAB);
        fill(two, 2 * MIB, 0xCD);
        heap.dealloc(one, layout(MIB));
        heap.dealloc(two, layout(2 * MIB));
        let joined = heap.alloc_zeroed(layout(3 * MIB));
        assert!(all_equal(joined, 3 * MIB, 0));
        let stats = heap.stats();
        assert_eq!((stats.resized, stats.fresh_bytes as usize), (1, 3 * MIB));
        heap.dealloc(joined, layout(3 * MIB));
        heap.release_cached();
    }
}

#[test]
fn blocks_of_other_alignments_are_not_mixed_and_small_blocks_bypass_the_cache() {
    let heap = LargeBlockCache::new();
    unsafe {
        let aligned = Layout::from_size_align(MIB, 4096).unwrap();
        let a = heap.alloc(aligned);
        assert_eq!(a as usize % 4096, 0);
        heap.dealloc(a, aligned);
        let b = heap.alloc(layout(MIB));
        // (The system may hand out the same address again; the cache did not.)
        assert_eq!(
            heap.stats().hits,
            0,
            "an 8-aligned request takes no 4096-aligned block"
        );
        heap.dealloc(b, layout(MIB));

        let before = heap.stats();
        let tiny = heap.alloc(layout(1000));
        heap.dealloc(tiny, layout(1000));
        assert_eq!(heap.stats(), before);
        heap.release_cached();
    }
}

#[test]
fn realloc_keeps_the_contents_across_the_large_threshold() {
    let heap = LargeBlockCache::new();
    unsafe {
        let mut size = 100_000;
        let mut ptr = heap.alloc(layout(size));
        for (i, b) in std::slice::from_raw_parts_mut(ptr, size)
            .iter_mut()
            .enumerate()
        {
            *b = (i % 251) as u8;
        }
        for new_size in [600_000, 600_001, 10 * MIB, 50_000] {
            ptr = heap.realloc(ptr, layout(size), new_size);
            assert!(!ptr.is_null());
            let kept = size.min(new_size).min(100_000);
            let data = std::slice::from_raw_parts(ptr, kept);
            assert!(data.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            size = new_size;
        }
        heap.dealloc(ptr, layout(size));
        assert_eq!(heap.stats().live_bytes, 0);
        heap.release_cached();
    }
}

#[test]
fn threads_allocating_at_once_never_share_a_block() {
    let heap = std::sync::Arc::new(LargeBlockCache::new());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let heap = heap.clone();
            std::thread::spawn(move || unsafe {
                for round in 0..50 {
                    let size = MIB + (round % 3) * 300_000;
                    let ptr = heap.alloc(layout(size));
                    fill(ptr, size, t);
                    std::thread::yield_now();
                    assert!(
                        all_equal(ptr, size, t),
                        "another thread wrote into this block"
                    );
                    heap.dealloc(ptr, layout(size));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let stats = heap.stats();
    assert_eq!(stats.live_bytes, 0);
    assert!(stats.hits > 0);
    heap.release_cached();
}
