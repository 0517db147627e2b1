//! Configuration: one TOML file, checked completely before anything starts.
//!
//! Each top-level section belongs to one module, which defines its struct (serde, doc comments,
//! `deny_unknown_fields`, `#[serde(default)]`) and, when it has rules beyond types, a
//! `validate` that pushes every problem it finds with its path. This file only lists the
//! sections; a new stage adds its section in [`Config`] and one line in [`Config::from_table`].
//!
//! Loading never stops at the first problem: every section and every stream is parsed on its
//! own, then the semantic checks run, and all errors come back together, each with a path such
//! as `streams[2].uri` (see [`ConfigError`]). `dfwatch validate` prints them.
//!
//! Every number and duration has a documented range (configs/example.toml), checked by its
//! section's `validate`; rules that span sections (nv12 on the CPU path, whether a stream's
//! scoring cadence can fill the evidence window: [`cadence`]) are checked here. The daemon
//! runs exactly these checks at start, on reload and for streams added through the API.

pub mod cadence;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

pub use crate::validation::{ConfigError, ConfigErrors};

use crate::detect::DetectConfig;
use crate::encode::EncoderConfig;
use crate::evidence::EvidenceConfig;
use crate::http::HttpConfig;
use crate::ingest::{IngestConfig, StreamConfig};
use crate::model::ModelConfig;
use crate::onnx::OnnxConfig;
use crate::publish::mqtt::MqttConfig;
use crate::track::TrackConfig;
use crate::types::NodeId;

/// `[node]`: who this instance is.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Id of this instance, `[A-Za-z0-9_-]{1,64}`: the `<node>` level of MQTT topics.
    /// Default: the host name with every other character replaced by `-`.
    pub id: NodeId,
    /// On SIGTERM: how long in-flight work may drain and the spool may flush before the
    /// process exits (what is not acknowledged stays on disk). Keep it below systemd's
    /// TimeoutStopSec (the unit uses 20 s). Range 1s to 10m.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: std::time::Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: default_node_id(),
            shutdown_grace: std::time::Duration::from_secs(8),
        }
    }
}

fn default_node_id() -> NodeId {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let cleaned: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(crate::types::MAX_ID_LEN)
        .collect();
    NodeId::new(&cleaned).unwrap_or_else(|_| NodeId::new("dfwatch").expect("literal id is valid"))
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Config {
    /// `[node]`
    pub node: NodeConfig,
    /// `[[streams]]`: the video sources to watch.
    pub streams: Vec<StreamConfig>,
    /// `[ingest]`: defaults and limits for every stream.
    pub ingest: IngestConfig,
    /// `[model]`: the model bundle and its backend.
    pub model: ModelConfig,
    /// `[encoder]`: batching of crops for the image encoder.
    pub encoder: EncoderConfig,
    /// `[onnx]`: the ONNX Runtime library and its thread budget.
    pub onnx: OnnxConfig,
    /// `[detect]`: the face detector.
    pub detect: DetectConfig,
    /// `[track]`: face tracking and scoring cadence.
    pub track: TrackConfig,
    /// `[evidence]`: the per-track decision rule.
    pub evidence: EvidenceConfig,
    /// `[mqtt]`: the broker alerts go to.
    pub mqtt: MqttConfig,
    /// `[http]`: health, metrics and the stream API.
    pub http: HttpConfig,
    /// `[gpu]`: the device of `model.backend = "cuda"`.
    pub gpu: crate::gpu::GpuConfig,
    /// `[[webhooks]]`: HTTP endpoints every alert event is POSTed to, through the spool.
    pub webhooks: Vec<crate::publish::webhook::WebhookConfig>,
    /// `[events]`: the event store (alert history, evidence media) and its retention.
    pub events: crate::events::EventsConfig,
    /// Directory of the file this came from: plain relative paths in stream URIs resolve
    /// against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors::one(ConfigError::new(
                "",
                format!("cannot read {}: {e}", path.display()),
            ))
        })?;
        let base = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        let cfg = Config::parse(&text, &base)?;
        // A bundle the file names must be there: the daemon would refuse to start without it.
        // (Left unset, the daemon looks for the default bundles at start and says which.)
        if let Some(b) = &cfg.model.bundle {
            let dir = crate::files::resolve(&cfg.base_dir, b);
            if !dir.join("manifest.toml").is_file() {
                return Err(ConfigErrors::one(ConfigError::new(
                    "model.bundle",
                    format!(
                        "{}: no model bundle there (no manifest.toml); make a synthetic one with \
                         `tools/model.py synth` or import a checkpoint (see docs/src/models.md)",
                        dir.display()
                    ),
                )));
            }
        }
        Ok(cfg)
    }

    /// Parses and checks TOML text; `base_dir` anchors relative file paths.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let at = e
                .span()
                .map(|s| line_col(text, s.start))
                .map(|(l, c)| format!(" at line {l}, column {c}"))
                .unwrap_or_default();
            ConfigErrors::one(ConfigError::new(
                "",
                format!("not valid TOML{at}: {}", e.message()),
            ))
        })?;
        let mut errors = Vec::new();
        let (mut cfg, stream_index, webhook_index) = Config::from_table(table, &mut errors);
        cfg.base_dir = base_dir.to_path_buf();
        cfg.anchor_paths();
        cfg.validate(&stream_index, &webhook_index, &mut errors);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Relative paths resolved against the file's directory once, as it is loaded, with `.`
    /// and `..` removed (see [`crate::files::resolve`]): every later reader, log line, API
    /// answer and comparison sees one absolute spelling, whatever the working directory. A
    /// stream written as a plain path becomes its `file://` URI.
    fn anchor_paths(&mut self) {
        let base = self.base_dir.clone();
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(x) = p {
                *x = crate::files::resolve(&base, x);
            }
        };
        fix(&mut self.model.bundle);
        fix(&mut self.detect.model_dir);
        fix(&mut self.onnx.library);
        fix(&mut self.events.path);
        fix(&mut self.http.token_file);
        for set in self.http.api_credentials.values_mut() {
            fix(&mut set.password_file);
        }
        let m = &mut self.mqtt;
        for p in [
            &mut m.password_file,
            &mut m.ca_file,
            &mut m.client_cert_file,
            &mut m.client_key_file,
            &mut m.spool_dir,
        ] {
            fix(p);
        }
        for w in &mut self.webhooks {
            fix(&mut w.bearer_file);
            fix(&mut w.ca_file);
        }
        for s in &mut self.streams {
            if let Some(c) = &mut s.credentials {
                fix(&mut c.password_file);
            }
            // A plain path (no scheme) is a local file; a URI is left as written. One that
            // does not parse is left too: `validate` names it.
            if !s.uri.contains("://")
                && let Ok(src) = crate::ingest::Source::parse(&s.uri, &base)
            {
                s.uri = src.uri().to_string();
            }
        }
    }

    /// Every rule `validate` applies to a parsed file, on a config built or changed in code
    /// (`dfwatch calibrate` checks each candidate `[evidence]` with it).
    pub fn check(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let streams: Vec<usize> = (0..self.streams.len()).collect();
        let webhooks: Vec<usize> = (0..self.webhooks.len()).collect();
        self.validate(&streams, &webhooks, &mut errors);
        errors
    }

    /// Type-level parse: every section on its own, so one bad section hides no other error.
    /// Also returns each parsed stream's and webhook's index in the file (entries that failed
    /// to parse are left out, and later errors must still name the right `streams[i]`).
    fn from_table(
        mut table: toml::Table,
        errors: &mut Vec<ConfigError>,
    ) -> (Config, Vec<usize>, Vec<usize>) {
        let node = section(&mut table, "node", errors);
        let ingest = section(&mut table, "ingest", errors);
        let model = section(&mut table, "model", errors);
        let encoder = section(&mut table, "encoder", errors);
        let onnx = section(&mut table, "onnx", errors);
        let detect = section(&mut table, "detect", errors);
        let track = section(&mut table, "track", errors);
        let evidence = section(&mut table, "evidence", errors);
        let mqtt = section(&mut table, "mqtt", errors);
        let http = section(&mut table, "http", errors);
        let gpu = section(&mut table, "gpu", errors);
        let events = section(&mut table, "events", errors);
        let webhooks =
            array_section::<crate::publish::webhook::WebhookConfig>(&mut table, "webhooks", errors);
        let webhook_index: Vec<usize> = webhooks.iter().map(|(i, _)| *i).collect();
        let webhooks: Vec<_> = webhooks.into_iter().map(|(_, w)| w).collect();
        let (stream_index, streams) = array_section(&mut table, "streams", errors)
            .into_iter()
            .unzip();
        for key in table.keys() {
            errors.push(ConfigError::new(
                key,
                format!(
                    "unknown section; known sections: {}",
                    KNOWN_SECTIONS.join(", ")
                ),
            ));
        }
        let cfg = Config {
            node,
            streams,
            ingest,
            model,
            encoder,
            onnx,
            detect,
            track,
            evidence,
            mqtt,
            http,
            gpu,
            webhooks,
            events,
            base_dir: PathBuf::new(),
        };
        (cfg, stream_index, webhook_index)
    }

    /// Rules beyond types, each module checking its own section.
    fn validate(
        &self,
        stream_index: &[usize],
        webhook_index: &[usize],
        errors: &mut Vec<ConfigError>,
    ) {
        self.ingest.validate("ingest", errors);
        self.model.validate("model", errors);
        self.encoder.validate("encoder", errors);
        self.onnx.validate("onnx", errors);
        self.detect.validate("detect", errors);
        self.track.validate("track", errors);
        self.evidence.validate("evidence", errors);
        self.mqtt.validate("mqtt", errors);
        self.http.validate("http", errors);
        self.gpu.validate("gpu", errors);
        self.events.validate("events", errors);
        crate::validation::Checker::new("node", errors).duration(
            "shutdown_grace",
            self.node.shutdown_grace,
            SHUTDOWN_GRACE_RANGE,
        );
        // The CPU backend crops packed RGB; NV12 is for the GPU crop.
        if self.cpu() && self.ingest.format == crate::types::PixelFormat::Nv12 {
            errors.push(ConfigError::new("ingest.format", NV12_REFUSED));
        }
        // The default rate applies to every stream without its own (API streams included).
        if self.cadence_checkable(self.ingest.analysis_fps) {
            let defaults = self.cadence(self.ingest.analysis_fps);
            if !defaults.fits() {
                errors.push(ConfigError::new(
                    "evidence.window",
                    defaults.explain("ingest.analysis_fps", &self.track, &self.evidence),
                ));
            }
        }
        if self.webhooks.len() > crate::publish::webhook::MAX_WEBHOOKS {
            errors.push(ConfigError::new(
                "webhooks",
                format!(
                    "{} webhooks; at most {}",
                    self.webhooks.len(),
                    crate::publish::webhook::MAX_WEBHOOKS
                ),
            ));
        }
        let mut names = std::collections::HashMap::new();
        for (&i, w) in webhook_index.iter().zip(&self.webhooks) {
            let path = format!("webhooks[{i}]");
            w.validate(&path, errors);
            // The spool holds what a webhook owes: it must stay below the spool's own bound,
            // or a dead webhook keeps the spool at its limit (updates merged for everyone).
            if w.max_owed >= self.mqtt.spool_max_pending {
                errors.push(ConfigError::new(
                    format!("{path}.max_owed"),
                    format!(
                        "{} is not below mqtt.spool_max_pending = {}",
                        w.max_owed, self.mqtt.spool_max_pending
                    ),
                ));
            }
            if let Some(first) = names.insert(w.name.clone(), i) {
                errors.push(ConfigError::new(
                    format!("{path}.name"),
                    format!("{:?} is already used by webhooks[{first}]", w.name),
                ));
            }
        }
        let mut seen = std::collections::HashMap::new();
        for (&i, s) in stream_index.iter().zip(&self.streams) {
            let path = format!("streams[{i}]");
            self.validate_stream(s, &path, errors);
            if let Some(first) = seen.insert(s.id.clone(), i) {
                errors.push(ConfigError::new(
                    format!("{path}.id"),
                    format!("{:?} is already used by streams[{first}]", s.id.as_str()),
                ));
            }
        }
    }

    fn cpu(&self) -> bool {
        self.model.backend == crate::model::Backend::Cpu
    }

    /// The cadence rule is only worth stating when its inputs passed their own checks.
    fn cadence_checkable(&self, fps: f64) -> bool {
        let mut scratch = Vec::new();
        self.track.validate("track", &mut scratch);
        self.evidence.validate("evidence", &mut scratch);
        let rates = crate::ingest::MIN_ANALYSIS_FPS..=crate::ingest::MAX_ANALYSIS_FPS;
        scratch.is_empty() && rates.contains(&fps)
    }

    /// The scoring cadence at `fps` under this config's `[track]` and `[evidence]`.
    pub fn cadence(&self, fps: f64) -> cadence::Cadence {
        cadence::Cadence::new(fps, &self.track, &self.evidence)
    }

    /// What the daemon accepts but cannot do, known before it starts: an enabled stream's
    /// local file that is not there or not a regular file (the stream would go offline with
    /// `not_found`). `validate` prints these without failing: the file may appear before the
    /// daemon starts or reloads, and the other streams run meanwhile.
    pub fn warnings(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        for (i, s) in self.streams.iter().enumerate().filter(|(_, s)| s.enabled) {
            let Some(file) = crate::ingest::Source::parse(&s.uri, &self.base_dir)
                .ok()
                .and_then(|src| src.file_path())
            else {
                continue;
            };
            let why = match std::fs::metadata(&file) {
                Ok(m) if m.is_file() => continue,
                Ok(_) => "is not a regular file".to_string(),
                Err(e) => e.to_string(),
            };
            out.push(ConfigError::new(
                format!("streams[{i}].uri"),
                format!(
                    "{}: {why}; the stream will go offline with not_found",
                    file.display()
                ),
            ));
        }
        out
    }

    /// Every rule for one stream under this config (`path` prefixes the errors): its own
    /// section, the pixel format for the backend, and its scoring cadence. The daemon runs it
    /// for streams added through the API too.
    pub fn validate_stream(&self, s: &StreamConfig, path: &str, errors: &mut Vec<ConfigError>) {
        let before = errors.len();
        s.validate(path, &self.base_dir, errors);
        if self.cpu() && s.format == Some(crate::types::PixelFormat::Nv12) {
            errors.push(ConfigError::new(format!("{path}.format"), NV12_REFUSED));
        }
        // A stream at the default rate is covered by the check of [ingest].
        if let Some(fps) = s.analysis_fps
            && errors.len() == before
            && self.cadence_checkable(fps)
        {
            let c = self.cadence(fps);
            if !c.fits() {
                let key = format!("{path}.analysis_fps");
                errors.push(ConfigError::new(
                    key.clone(),
                    c.explain(&key, &self.track, &self.evidence),
                ));
            }
        }
    }
}

/// `node.shutdown_grace`.
pub const SHUTDOWN_GRACE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(600);

/// Why `nv12` frames are refused on the CPU backend.
const NV12_REFUSED: &str = "\"nv12\" is for model.backend = \"cuda\" (the device crops NV12 \
     frames); the CPU backend crops \"rgb8\"";

const KNOWN_SECTIONS: &[&str] = &[
    "node", "streams", "ingest", "model", "encoder", "onnx", "detect", "track", "evidence", "mqtt",
    "http", "gpu", "webhooks", "events",
];

/// Takes `[key]` out of `table` and parses it, recording errors with their full path. A missing
/// or broken section yields its defaults (the error is recorded, so nothing runs on them).
fn section<T: DeserializeOwned + Default>(
    table: &mut toml::Table,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> T {
    match table.remove(key) {
        None => T::default(),
        Some(v @ toml::Value::Table(_)) => parse_value(v, key, errors).unwrap_or_default(),
        Some(other) => {
            errors.push(ConfigError::new(
                key,
                format!("expected a table [{key}], found {}", other.type_str()),
            ));
            T::default()
        }
    }
}

/// Takes `[[key]]` out of `table` and parses each element on its own; returns the elements
/// that parsed, with their index in the file.
fn array_section<T: DeserializeOwned>(
    table: &mut toml::Table,
    key: &str,
    errors: &mut Vec<ConfigError>,
) -> Vec<(usize, T)> {
    match table.remove(key) {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| parse_value(v, &format!("{key}[{i}]"), errors).map(|t| (i, t)))
            .collect(),
        Some(other) => {
            errors.push(ConfigError::new(
                key,
                format!(
                    "expected an array of tables [[{key}]], found {}",
                    other.type_str()
                ),
            ));
            Vec::new()
        }
    }
}

fn parse_value<T: DeserializeOwned>(
    v: toml::Value,
    prefix: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(v) {
        Ok(t) => Some(t),
        Err(e) => {
            let inner = e.path().to_string();
            let path = if inner == "." || inner.is_empty() {
                prefix.to_string()
            } else {
                format!("{prefix}.{inner}")
            };
            errors.push(ConfigError::new(
                path,
                e.into_inner().message().trim().to_string(),
            ));
            None
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

#[cfg(test)]
mod tests;
