//! Progress bars for long CLI work (import, analyze, benchmarks): drawn on standard error only
//! when it is a terminal, so logs, pipes and CI output stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps labelled `what`; hidden when standard error is not a terminal.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:32}] {pos}/{len} {msg} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b.set_prefix(what.to_string());
    b
}

/// A spinner for work of unknown length.
pub fn spinner(what: &str) -> ProgressBar {
    let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    s.set_style(
        ProgressStyle::with_template("{prefix:>10} {spinner} {msg} {elapsed}")
            .expect("valid template"),
    );
    s.set_prefix(what.to_string());
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}
