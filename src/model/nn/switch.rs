//! A process-wide on/off choice of kernels: an environment variable, read once (the command
//! line refuses a bad value before anything runs), that a program may override for A/B
//! measurements in one process.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// One switch: its variable, the words it takes for on and off (each with what it means, for
/// the error message), and the choice made in the process.
pub(super) struct KernelSwitch {
    var: &'static str,
    on: (&'static str, &'static str),
    off: (&'static str, &'static str),
    /// 0 no choice yet (the environment decides), 1 on, 2 off.
    set: AtomicU8,
    from_env: OnceLock<bool>,
}

impl KernelSwitch {
    /// A switch read from `var`, on by default: `on` and `off` are (word, meaning).
    pub(super) const fn new(
        var: &'static str,
        on: (&'static str, &'static str),
        off: (&'static str, &'static str),
    ) -> Self {
        Self {
            var,
            on,
            off,
            set: AtomicU8::new(0),
            from_env: OnceLock::new(),
        }
    }

    /// What the variable asks for: `Ok(None)` when it is unset, an error naming the variable
    /// and the words it takes for any other value.
    pub(super) fn read_env(&self) -> Result<Option<bool>, String> {
        match std::env::var(self.var) {
            Err(_) => Ok(None),
            Ok(value) => match value.trim() {
                word if word == self.on.0 => Ok(Some(true)),
                word if word == self.off.0 => Ok(Some(false)),
                other => Err(format!(
                    "{}={other:?}: use {} ({}) or {} ({})",
                    self.var, self.on.0, self.on.1, self.off.0, self.off.1
                )),
            },
        }
    }

    /// Turns it on or off for the whole process; overrides the variable.
    pub(super) fn set(&self, enabled: bool) {
        self.set
            .store(if enabled { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// As last [`KernelSwitch::set`], else as the variable says (read once), else on.
    pub(super) fn enabled(&self) -> bool {
        match self.set.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => *self
                .from_env
                .get_or_init(|| self.read_env().ok().flatten().unwrap_or(true)),
        }
    }
}
