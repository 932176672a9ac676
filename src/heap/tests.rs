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
        // A larger block than any before: the cached one goes back first, so the footprint is
        // the new block alone, as it would be without the cache.
        let big = heap.alloc(layout(2 * MIB));
        let stats = heap.stats();
        assert_eq!(stats.cached_bytes, 0);
        assert_eq!(stats.live_bytes, 2 * MIB);
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
        // A smaller one misses and returns the cached block first: 2 MiB + 512 KiB would pass
        // the peak.
        let half = heap.alloc(layout(MIB / 2));
        let stats = heap.stats();
        assert_eq!((stats.live_bytes, stats.cached_bytes), (MIB / 2, 0));
        heap.dealloc(half, layout(MIB / 2));
        heap.release_cached();

        // Peak 4 MiB; with 1 MiB live and 2 + 1 MiB cached, a new 300 KiB block (which neither
        // cached block serves) returns the oldest cached block (2 MiB) and keeps the other.
        let heap = LargeBlockCache::new();
        let a = heap.alloc(layout(MIB));
        let b = heap.alloc(layout(2 * MIB));
        let d = heap.alloc(layout(MIB));
        heap.dealloc(b, layout(2 * MIB));
        heap.dealloc(d, layout(MIB));
        let small = 300 * 1024;
        let c = heap.alloc(layout(small));
        let stats = heap.stats();
        assert_eq!(stats.peak_live_bytes, 4 * MIB);
        assert_eq!(stats.cached_bytes, MIB);
        assert_eq!(stats.live_bytes, MIB + size_class(small));
        let d_again = heap.alloc(layout(MIB));
        assert_eq!(d_again, d, "the newer block stayed cached");
        heap.dealloc(a, layout(MIB));
        heap.dealloc(c, layout(small));
        heap.dealloc(d_again, layout(MIB));
        assert_eq!(heap.stats().live_bytes, 0);
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
