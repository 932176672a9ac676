// Started from the Start menu or Explorer, the Windows build is a window without a console; run
// from a terminal, `cli::main` attaches to that terminal's console for its output.
#![cfg_attr(all(windows, not(debug_assertions)), windows_subsystem = "windows")]

fn main() -> std::process::ExitCode {
    instruct_pix2pix::cli::main()
}
