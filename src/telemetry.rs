//! Logging set-up. Log lines put fields first (`warn!(stream = %id, error = %e, "...")`) and
//! nothing per frame is logged above `debug`.

use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber writing to stderr. The filter comes from
/// `DFWATCH_LOG` (or `RUST_LOG`), else `default` (e.g. `"info"`). `DFWATCH_LOG_FORMAT=json`
/// writes one JSON object per line (timestamp, level, fields, message) for log shippers;
/// `text` (the default) is for people, coloured only on a terminal.
pub fn init(default: &str) {
    let filter = std::env::var("DFWATCH_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let format = std::env::var("DFWATCH_LOG_FORMAT").unwrap_or_default();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format.as_str() {
        "json" => {
            let _ = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .try_init();
        }
        other => {
            use std::io::IsTerminal;
            if !other.is_empty() && other != "text" {
                eprintln!(
                    "DFWATCH_LOG_FORMAT={other:?} is neither \"text\" nor \"json\": using text"
                );
            }
            let _ = builder
                .with_ansi(std::io::stderr().is_terminal())
                .try_init();
        }
    }
}
