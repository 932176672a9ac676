// Started from the Start menu or Explorer, the Windows build is a window without a console; run
// from a terminal, `cli::main` attaches to that terminal's console for its output.
#![cfg_attr(all(windows, not(debug_assertions)), windows_subsystem = "windows")]

/// candle's elementwise ops run on a thread pool of its own, beside rayon's that runs the fused
/// kernels; its idle threads spin 25,000 pauses before sleeping, and on a 2-core machine that
/// spinning took 5% of a training step's CPU time from the kernels (`perf record`, 2026-12-06;
/// 0.9% with this limit). Spin briefly unless the user chose a limit.
const CANDLE_SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

fn main() -> std::process::ExitCode {
    if std::env::var_os(CANDLE_SPIN_LIMIT_VAR).is_none() {
        // SAFETY: the first thing the program does: no other thread exists yet to read the
        // environment while it changes.
        unsafe { std::env::set_var(CANDLE_SPIN_LIMIT_VAR, "500") };
    }
    instruct_pix2pix::cli::main()
}
