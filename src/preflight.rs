//! A config against this machine: what the daemon needs of it beyond the file itself (the
//! ONNX Runtime library's execution providers, a GPU for `model.backend = "cuda"`, the face
//! detector's weights, each webhook's token and CA files, the event store's file). `dfwatch
//! validate` and `dfwatch run` run these same checks ([`check`]), and every failing check is
//! reported, never only the first.

use crate::config::Config;
use crate::validation::{ConfigError, ConfigErrors};

/// What the checks found worth saying when nothing failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preflight {
    /// What `onnx.providers` will run, or why it could not be checked here.
    pub providers: Option<String>,
    /// The device `model.backend = "cuda"` will run on.
    pub gpu: Option<String>,
}

/// Every check of `c` against this machine; all failures together.
pub fn check(c: &Config) -> Result<Preflight, ConfigErrors> {
    let mut errors = Vec::new();
    let providers = providers(c).unwrap_or_else(|e| {
        errors.push(e);
        None
    });
    let gpu = gpu(c).unwrap_or_else(|e| {
        errors.push(e);
        None
    });
    if let Some(why) = c.detect.missing(&c.base_dir) {
        errors.push(ConfigError::new("detect.model_dir", why));
    }
    errors.extend(webhooks(c));
    if let Err(e) = events(c) {
        errors.push(e);
    }
    if errors.is_empty() {
        Ok(Preflight { providers, gpu })
    } else {
        Err(ConfigErrors(errors))
    }
}

/// `onnx.providers` against the ONNX Runtime library the config names (loaded here).
fn providers(c: &Config) -> Result<Option<String>, ConfigError> {
    use crate::onnx::ProviderCheck;
    match crate::onnx::check_providers(&c.onnx) {
        Ok(ProviderCheck::CpuOnly) => Ok(None),
        Ok(ProviderCheck::Met(line)) => Ok(Some(line)),
        Ok(ProviderCheck::NotChecked(why)) => Ok(Some(format!(
            "not checked: the ONNX Runtime library could not be loaded here ({why})"
        ))),
        Err(e) => Err(ConfigError::new("onnx.providers", e)),
    }
}

/// The machine's share of `model.backend = "cuda"` (the build's is `Config::parse`'s).
fn gpu(c: &Config) -> Result<Option<String>, ConfigError> {
    if c.model.backend != crate::model::Backend::Cuda {
        return Ok(None);
    }
    crate::gpu::check_backend(&c.gpu).map(Some).map_err(|e| {
        let key = match e {
            crate::gpu::GpuError::NoDevice { .. } => "gpu.device",
            _ => "model.backend",
        };
        ConfigError::new(key, format!("\"cuda\" cannot run on this machine: {e}"))
    })
}

/// What each webhook needs of this machine (its token from the environment or a file, its
/// CA file, the system's CA certificates for https://).
fn webhooks(c: &Config) -> Vec<ConfigError> {
    c.webhooks
        .iter()
        .enumerate()
        .filter_map(|(i, w)| {
            crate::publish::webhook::Webhook::prepare(w, &c.base_dir)
                .err()
                .map(|e| ConfigError::new(format!("webhooks[{i}]"), e.to_string()))
        })
        .collect()
}

/// The event store's file as the daemon will open it (a symbolic link, a device, a parent
/// that is a file are refused).
fn events(c: &Config) -> Result<(), ConfigError> {
    let file = c.events.file(&c.base_dir, &crate::types::state_dir());
    crate::events::db::check_file(&file)
        .map(|_| ())
        .map_err(|e| ConfigError::new("events.path", format!("{}: {e}", file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failing_check_is_reported_not_only_the_first() {
        let d = tempfile::tempdir().unwrap();
        // A detector directory that is not there, a webhook token from an unset variable,
        // and an event store path through a file: three problems, all named.
        std::fs::write(d.path().join("afile"), b"x").unwrap();
        let c = Config::parse(
            r#"
            [detect]
            model_dir = "no-such-dir"

            [events]
            path = "afile/events.db"

            [[webhooks]]
            name = "ops"
            url = "http://127.0.0.1:9/hook"
            bearer_env = "DFWATCH_TEST_UNSET_TOKEN_VARIABLE"
            "#,
            d.path(),
        )
        .unwrap();
        let e = check(&c).unwrap_err();
        let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["detect.model_dir", "webhooks[0]", "events.path"],
            "{e}"
        );
        assert!(e.0[0].message.contains("no-such-dir"), "{e}");
    }
}
