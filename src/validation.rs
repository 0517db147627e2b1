//! Config errors and the range checks every section uses. A leaf: it imports nothing of the
//! crate, so every stage can report problems with its section without importing `config`
//! (which imports every stage's section).
//!
//! Each section's `validate` walks its keys with a [`Checker`], which prefixes the section's
//! path and says the accepted range in the same words everywhere:
//! `mqtt.keep_alive: 500ms is out of range; use 1s to 1h`.

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

/// One problem in a configuration, with the path of the value it concerns, for example
/// `streams[2].uri: unsupported scheme "ftp"`. An empty path concerns the whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one configuration, in file order where possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn one(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A duration as the config file writes it (`1m 30s`, `250ms`).
pub fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Collects the problems of one section (or table) under its path.
pub struct Checker<'a> {
    prefix: String,
    errors: &'a mut Vec<ConfigError>,
}

impl<'a> Checker<'a> {
    /// Checks under `prefix` (e.g. `mqtt`, `streams[2]`), pushing into `errors`.
    pub fn new(prefix: impl Into<String>, errors: &'a mut Vec<ConfigError>) -> Self {
        Checker {
            prefix: prefix.into(),
            errors,
        }
    }

    /// The full path of `key` (the section itself when `key` is empty).
    pub fn path(&self, key: &str) -> String {
        match (self.prefix.is_empty(), key.is_empty()) {
            (_, true) => self.prefix.clone(),
            (true, false) => key.to_string(),
            (false, false) => format!("{}.{key}", self.prefix),
        }
    }

    /// The collected errors, for a nested value whose own `validate` takes them.
    pub fn errors(&mut self) -> &mut Vec<ConfigError> {
        self.errors
    }

    /// A nested table, e.g. `backoff` under `mqtt`.
    pub fn table(&mut self, key: &str) -> Checker<'_> {
        Checker {
            prefix: self.path(key),
            errors: self.errors,
        }
    }

    /// Records a problem with `key` (empty: the section as a whole).
    pub fn error(&mut self, key: &str, message: impl Into<String>) {
        let path = self.path(key);
        self.errors.push(ConfigError::new(path, message));
    }

    /// `v` must lie within `range` (both ends included).
    pub fn duration(&mut self, key: &str, v: Duration, range: RangeInclusive<Duration>) {
        if !range.contains(&v) {
            self.error(
                key,
                format!(
                    "{} is out of range; use {} to {}",
                    show_duration(v),
                    show_duration(*range.start()),
                    show_duration(*range.end())
                ),
            );
        }
    }

    /// `v` must be a finite number within `range` (NaN and infinities are refused).
    pub fn number(&mut self, key: &str, v: f64, range: RangeInclusive<f64>) {
        if !(v.is_finite() && range.contains(&v)) {
            self.error(
                key,
                format!(
                    "{v} is out of range; use a number from {} to {}",
                    range.start(),
                    range.end()
                ),
            );
        }
    }

    /// `v` must be a finite number above `low` (excluded) and at most `high`.
    pub fn number_above(&mut self, key: &str, v: f64, low: f64, high: f64) {
        if !(v.is_finite() && v > low && v <= high) {
            self.error(
                key,
                format!("{v} is out of range; use a number above {low} and at most {high}"),
            );
        }
    }

    /// `v` must be a whole number within `range`.
    pub fn count(&mut self, key: &str, v: u64, range: RangeInclusive<u64>) {
        if !range.contains(&v) {
            self.error(
                key,
                format!(
                    "{v} is out of range; use {} to {}",
                    range.start(),
                    range.end()
                ),
            );
        }
    }

    /// `name` must be an environment variable name.
    pub fn env_name(&mut self, key: &str, name: Option<&str>) {
        if let Some(name) = name
            && (name.is_empty()
                || name.len() > 255
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        {
            self.error(
                key,
                format!("{name:?} is not an environment variable name ([A-Za-z0-9_]{{1,255}})"),
            );
        }
    }
}

fn show_duration(d: Duration) -> String {
    if d.is_zero() { "0s".into() } else { human(d) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_key_and_the_range() {
        let mut errors = Vec::new();
        let mut c = Checker::new("mqtt", &mut errors);
        c.duration(
            "keep_alive",
            Duration::from_millis(500),
            Duration::from_secs(1)..=Duration::from_secs(3600),
        );
        c.duration(
            "ok",
            Duration::from_secs(1),
            Duration::from_secs(1)..=Duration::from_secs(1),
        );
        c.number("nan", f64::NAN, 0.0..=1.0);
        c.number("inf", f64::INFINITY, 0.0..=1e6);
        c.number("edge", 1.0, 0.0..=1.0);
        c.number_above("zero", 0.0, 0.0, 1.0);
        c.count("big", 9_000_000_000_000_000_000, 1..=64);
        c.table("backoff").error("base", "must be above zero");
        let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            shown,
            [
                "mqtt.keep_alive: 500ms is out of range; use 1s to 1h",
                "mqtt.nan: NaN is out of range; use a number from 0 to 1",
                "mqtt.inf: inf is out of range; use a number from 0 to 1000000",
                "mqtt.zero: 0 is out of range; use a number above 0 and at most 1",
                "mqtt.big: 9000000000000000000 is out of range; use 1 to 64",
                "mqtt.backoff.base: must be above zero",
            ]
        );
    }
}
