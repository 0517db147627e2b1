//! Logging set-up. Log lines put fields first (`warn!(stream = %id, error = %e, "...")`) and
//! nothing per frame is logged above `debug`.

use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber writing to stderr. The filter comes from
/// `DFWATCH_LOG` (or `RUST_LOG`), else `default` (e.g. `"info"`).
pub fn init(default: &str) {
    let filter = std::env::var("DFWATCH_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
