//! Progress bars on stderr for downloads and denoising steps (hidden with `--quiet` or when stderr
//! is not a terminal).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::model::hub::DownloadProgress;

pub struct Progress {
    quiet: bool,
    download: Option<ProgressBar>,
}

impl Progress {
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            download: None,
        }
    }

    fn target(&self) -> ProgressDrawTarget {
        if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        }
    }

    /// Called by the model fetcher for every chunk it downloads.
    pub fn on_download(&mut self, update: &DownloadProgress) {
        if self.quiet {
            return;
        }
        let bar = self.download.get_or_insert_with(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        bar.set_message(update.file.clone());
        bar.set_length(update.bytes_total);
        bar.set_position(update.bytes_done);
    }

    pub fn finish_download(&mut self) {
        if let Some(bar) = self.download.take() {
            bar.finish_and_clear();
        }
    }

    /// A bar over the denoising steps of one image.
    pub fn steps(&self, total: usize, label: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(total as u64), self.target());
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        bar
    }

    /// A bar over the denoising steps of a whole folder; its message says which image and the
    /// time left.
    pub fn folder(&self, total_steps: usize) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(total_steps as u64), self.target());
        bar.set_style(
            ProgressStyle::with_template("[{bar:30}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    }

    /// A spinner with a message for work without steps (loading the model).
    pub fn spinner(&self, message: &str) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(None, self.target());
        bar.set_message(message.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    }
}
