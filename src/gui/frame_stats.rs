//! Frame times for the "never blocks" benchmark (`--frame-stats`, read by tests/real_window.rs
//! and scripts/bench_window.sh): how long each frame took and how far apart frames started while
//! an edit ran, summarised as frames arrive, written as JSON at exit.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A gap in milliseconds, ordered by [`f64::total_cmp`] so it can sit in a heap.
#[derive(Debug, Clone, Copy)]
struct Millis(f64);

impl PartialEq for Millis {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Millis {}

impl PartialOrd for Millis {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Millis {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// The 99th percentile of a growing list, exactly what sorting the whole list would give
/// (`sorted[(n - 1) * 99 / 100]`), without sorting: the values up to that rank sit in a max-heap,
/// the rest in a min-heap, so each new value costs O(log n).
#[derive(Debug, Clone, Default)]
struct RunningP99 {
    /// The smallest `(n - 1) * 99 / 100 + 1` values; the largest of them is the percentile.
    low: BinaryHeap<Millis>,
    /// Every other value.
    high: BinaryHeap<Reverse<Millis>>,
}

impl RunningP99 {
    /// Adds `value` and returns the percentile of all values so far.
    fn push(&mut self, value: f64) -> f64 {
        let value = Millis(value);
        match self.low.peek() {
            Some(top) if value > *top => self.high.push(Reverse(value)),
            _ => self.low.push(value),
        }
        let count = self.low.len() + self.high.len();
        let wanted = (count - 1) * 99 / 100 + 1;
        while self.low.len() > wanted {
            if let Some(top) = self.low.pop() {
                self.high.push(Reverse(top));
            }
        }
        while self.low.len() < wanted {
            match self.high.pop() {
                Some(Reverse(bottom)) => self.low.push(bottom),
                None => break,
            }
        }
        self.low.peek().map_or(value.0, |top| top.0)
    }
}

/// Frame times, for the "never blocks" benchmark.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FrameStats {
    pub frames: u64,
    /// Frames drawn while an edit ran.
    pub frames_during_edit: u64,
    /// Longest time spent in one frame's logic and drawing, any time / during an edit (ms).
    pub worst_frame_ms: f64,
    pub worst_frame_during_edit_ms: f64,
    /// Mean frame time during an edit (ms).
    pub mean_frame_during_edit_ms: f64,
    /// Longest gap between the starts of two frames during an edit (ms): includes rendering and
    /// any wait for the CPU, which the model thread keeps busy.
    pub worst_gap_during_edit_ms: f64,
    /// 99th percentile of those gaps (ms), and how many exceeded 50 ms.
    pub p99_gap_during_edit_ms: f64,
    pub gaps_over_50ms_during_edit: u64,
    #[serde(skip)]
    gaps_during_edit: RunningP99,
    #[serde(skip)]
    sum_during_edit_ms: f64,
    #[serde(skip)]
    last_frame_start: Option<Instant>,
}

impl FrameStats {
    /// One frame that started at `started` and took `took`.
    pub fn record(&mut self, started: Instant, took: Duration, during_edit: bool) {
        let ms = took.as_secs_f64() * 1000.0;
        self.frames += 1;
        self.worst_frame_ms = self.worst_frame_ms.max(ms);
        if during_edit {
            if let Some(last) = self.last_frame_start {
                let gap = started.duration_since(last).as_secs_f64() * 1000.0;
                self.worst_gap_during_edit_ms = self.worst_gap_during_edit_ms.max(gap);
                self.gaps_over_50ms_during_edit += u64::from(gap > 50.0);
                self.p99_gap_during_edit_ms = self.gaps_during_edit.push(gap);
            }
            self.frames_during_edit += 1;
            self.sum_during_edit_ms += ms;
            self.worst_frame_during_edit_ms = self.worst_frame_during_edit_ms.max(ms);
            self.mean_frame_during_edit_ms =
                self.sum_during_edit_ms / self.frames_during_edit as f64;
        }
        self.last_frame_start = during_edit.then_some(started);
    }
}

/// Times the frames of a run and writes [`FrameStats`] at exit when asked to.
#[derive(Debug, Default)]
pub struct FrameRecorder {
    pub stats: FrameStats,
    /// Where to write the statistics at exit; None: nothing is written (nor redrawn on purpose).
    path: Option<PathBuf>,
    /// Redraws per second during an edit while measuring; 0: only when something arrives.
    redraw_fps: u32,
    frame_started: Option<Instant>,
}

impl FrameRecorder {
    pub fn new(path: Option<PathBuf>, redraw_fps: u32) -> Self {
        Self {
            path,
            redraw_fps,
            ..Self::default()
        }
    }

    /// A frame's logic starts now.
    pub fn frame_started(&mut self) {
        self.frame_started = Some(Instant::now());
    }

    /// The frame is drawn. Returns when to draw the next one: while measuring during an edit, the
    /// window redraws steadily (as while a user drags a slider) so the gaps between frames show
    /// any wait on the model thread or the CPU.
    pub fn frame_ended(&mut self, during_edit: bool) -> Option<Duration> {
        let started = self.frame_started.take()?;
        self.stats.record(started, started.elapsed(), during_edit);
        (during_edit && self.path.is_some() && self.redraw_fps > 0)
            .then(|| Duration::from_secs_f64(1.0 / f64::from(self.redraw_fps)))
    }

    /// Writes the statistics as JSON where asked; a failure is printed, never fatal.
    pub fn write(&self) {
        if let Some(path) = &self.path {
            let json = serde_json::to_string_pretty(&self.stats).unwrap_or_default();
            if let Err(e) = std::fs::write(path, json) {
                eprintln!(
                    "error: {}: cannot write frame statistics: {e}",
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_percentile_equals_the_sorted_rank_after_every_value() {
        let mut running = RunningP99::default();
        let mut all = Vec::new();
        // A deterministic spread with repeats, runs up and down and outliers.
        let mut state: u64 = 12345;
        for i in 0..700u64 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let value = match i % 7 {
                0 => 16.0,
                1 => (state >> 40) as f64 / 1000.0,
                2 => 120.0 + (i % 13) as f64,
                _ => ((state >> 33) % 40) as f64 + 0.5,
            };
            all.push(value);
            let got = running.push(value);
            let mut sorted = all.clone();
            sorted.sort_by(f64::total_cmp);
            assert_eq!(
                got,
                sorted[(sorted.len() - 1) * 99 / 100],
                "after {} values",
                i + 1
            );
        }
    }

    #[test]
    fn gaps_count_only_between_frames_during_an_edit() {
        let mut stats = FrameStats::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let took = Duration::from_millis(4);
        stats.record(at(0), took, false);
        stats.record(at(10), took, true);
        stats.record(at(30), took, true);
        stats.record(at(100), took, true);
        stats.record(at(200), took, false);
        stats.record(at(210), took, true);
        assert_eq!(stats.frames, 6);
        assert_eq!(stats.frames_during_edit, 4);
        // Gaps 20 and 70 ms; the frame after the pause starts a new run.
        assert_eq!(stats.worst_gap_during_edit_ms, 70.0);
        assert_eq!(stats.p99_gap_during_edit_ms, 20.0);
        assert_eq!(stats.gaps_over_50ms_during_edit, 1);
        assert!((stats.mean_frame_during_edit_ms - 4.0).abs() < 1e-9);
    }
}
