//! Progress for long work: a live line on a terminal, nothing otherwise.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress reporter (hidden unless stderr is a terminal and it was asked for); clones
/// report to the same line.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A reporter that draws on stderr when `show` and stderr is a terminal.
    pub fn new(show: bool, what: &str) -> Self {
        let bar = if show && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix} {binary_bytes} ({binary_bytes_per_sec}) {pos} files {msg}",
                )
                .expect("valid template"),
            );
            b.set_prefix(what.to_string());
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b
        } else {
            ProgressBar::hidden()
        };
        Self { bar }
    }

    /// A reporter that never draws.
    pub fn hidden() -> Self {
        Self {
            bar: ProgressBar::hidden(),
        }
    }

    /// Bytes processed.
    pub fn bytes(&self, n: u64) {
        self.bar.inc_length(0);
        self.bar.set_length(self.bar.length().unwrap_or(0) + n);
    }

    /// A file finished (`read`: its bytes were already counted).
    pub fn file_done(&self, skipped_bytes: u64, _read: bool) {
        if skipped_bytes > 0 {
            self.bytes(skipped_bytes);
        }
        self.bar.inc(1);
    }

    /// A warning line above the bar.
    pub fn warn(&self, msg: &str) {
        if !self.bar.is_hidden() {
            self.bar.println(format!("warning: {msg}"));
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
