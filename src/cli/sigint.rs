//! Ctrl+C as a stop request: the first SIGINT sets a flag (the handler only stores an atomic,
//! which is async-signal-safe) and restores the default action, so a second one ends the process.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[cfg(target_os = "linux")]
extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the handler (Linux; elsewhere Ctrl+C keeps its default action) and returns the
/// flag it sets.
pub fn install() -> &'static AtomicBool {
    #[cfg(target_os = "linux")]
    // SAFETY: the handler only stores to an atomic; SA_RESETHAND restores the default action
    // after the first signal.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
    &INTERRUPTED
}
