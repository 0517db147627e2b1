//! `[mqtt]`: the broker, its credentials and TLS, the spool's bounds; every rule checked in
//! [`MqttConfig::validate`], which the publisher runs again at start ([`prepare`]), so what
//! `validate` accepts the publisher accepts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::{LastWill, MqttOptions, QoS};
use serde::{Deserialize, Serialize};

use super::MqttError;
use crate::backoff::BackoffConfig;
use crate::types::NodeId;
use crate::validation::{Checker, ConfigError, ConfigErrors};

/// `keep_alive`: MQTT counts it in whole seconds (rumqttc refuses less than 1 s).
pub const KEEP_ALIVE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);
/// `spool_max_pending`.
pub const MAX_PENDING_RANGE: std::ops::RangeInclusive<u64> = 1..=1_000_000;
/// `spool_max_bytes`: 1 MiB to 64 GiB.
pub const MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 30);
/// `spool_max_age`: 1 minute to a year.
pub const MAX_AGE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(60)..=Duration::from_secs(365 * 24 * 3600);

/// `[mqtt]`: where alerts go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port` or `mqtts://host:port`; no credentials in it.
    pub url: String,
    /// Client id; default `dfwatch-<node>`.
    pub client_id: Option<String>,
    /// Topic prefix (first level).
    pub prefix: String,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// PEM CA certificate for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that require them.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Reconnect timing.
    pub backoff: BackoffConfig,
    /// Spool directory (relative to the config file); default `var/spool`.
    pub spool_dir: Option<PathBuf>,
    /// Pending alerts past which updates are coalesced.
    pub spool_max_pending: usize,
    /// Bytes the spool may hold while the broker is away; past it, updates are dropped
    /// first, then ended alerts, the `new` of open alerts last (counted by reason).
    pub spool_max_bytes: u64,
    /// Alerts older than this leave the spool unpublished (counted).
    #[serde(with = "humantime_serde")]
    pub spool_max_age: Duration,
    /// Run an in-process broker (rumqttd, in memory) on `embedded_listen` and publish to it
    /// instead of `url`: zero set-up for a first run; use a real broker in production.
    pub embedded: bool,
    /// Loopback address of the embedded broker.
    pub embedded_listen: std::net::SocketAddr,
    /// Home Assistant MQTT discovery: per stream a device with a `binary_sensor` (a fake face
    /// on screen), a `sensor` (the leading track's fake probability, in percent), an `event`
    /// (each alert with its explanation) and a diagnostic `sensor` (stream state), available
    /// while the node and the stream are online.
    pub homeassistant: bool,
    /// Home Assistant's discovery prefix (its birth message is `<prefix>/status`).
    pub homeassistant_prefix: String,
    /// The web page as Home Assistant's users reach it (each device's link to it, and each
    /// alert event's `url`). Default: `http://<http.listen>/` unless that is a wildcard
    /// address (then none).
    pub homeassistant_page_url: Option<String>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            prefix: "dfwatch".into(),
            username: None,
            password_env: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            keep_alive: Duration::from_secs(15),
            backoff: BackoffConfig {
                base: Duration::from_millis(250),
                cap: Duration::from_secs(15),
                reset_after: Duration::from_secs(30),
            },
            spool_dir: None,
            spool_max_pending: 10_000,
            spool_max_bytes: 256 << 20,
            spool_max_age: Duration::from_secs(7 * 24 * 3600),
            embedded: false,
            embedded_listen: std::net::SocketAddr::from(([127, 0, 0, 1], 1883)),
            homeassistant: false,
            homeassistant_prefix: "homeassistant".into(),
            homeassistant_page_url: None,
        }
    }
}

impl MqttConfig {
    /// Every rule of `[mqtt]`, including the TLS ones: the publisher runs the same checks
    /// at start ([`spawn`]), so what `validate` accepts it accepts.
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<ConfigError>) {
        let mut c = Checker::new(path, errors);
        let tls = match BrokerUrl::parse(&self.url) {
            Ok(u) => Some(u.tls),
            Err(e) => {
                let msg = e.to_string();
                c.error("url", msg.trim_start_matches("mqtt.url: "));
                None
            }
        };
        if self.prefix.is_empty() || self.prefix.len() > 256 || self.prefix.contains(['+', '#']) {
            c.error(
                "prefix",
                format!(
                    "{:?} is not a usable topic level (1 to 256 bytes, no + or #)",
                    self.prefix
                ),
            );
        }
        let levels_ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 256
                && !t.contains(['+', '#', '\0'])
                && t.split('/').all(|l| !l.is_empty())
        };
        if !levels_ok(&self.homeassistant_prefix) {
            c.error(
                "homeassistant_prefix",
                format!(
                    "{:?} is not a usable topic prefix (1 to 256 bytes, no + # or NUL, no empty \
                     level)",
                    self.homeassistant_prefix
                ),
            );
        }
        if let Some(u) = &self.homeassistant_page_url
            && !url::Url::parse(u).is_ok_and(|x| {
                matches!(x.scheme(), "http" | "https")
                    && x.username().is_empty()
                    && x.password().is_none()
            })
        {
            c.error(
                "homeassistant_page_url",
                format!("{u:?} is not an http:// or https:// URL (without credentials)"),
            );
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 256 || id.contains('\0'))
        {
            c.error("client_id", "must be 1 to 256 bytes without NUL");
        }
        c.duration("keep_alive", self.keep_alive, KEEP_ALIVE_RANGE);
        c.count(
            "spool_max_pending",
            self.spool_max_pending as u64,
            MAX_PENDING_RANGE,
        );
        c.count("spool_max_bytes", self.spool_max_bytes, MAX_BYTES_RANGE);
        c.duration("spool_max_age", self.spool_max_age, MAX_AGE_RANGE);
        self.backoff.validate(&mut c.table("backoff"));
        if self.embedded && !self.embedded_listen.ip().is_loopback() {
            c.error(
                "embedded_listen",
                format!("{} is not a loopback address", self.embedded_listen),
            );
        }
        if self.password_env.is_some() && self.password_file.is_some() {
            c.error("", "set one of password_env and password_file, not both");
        }
        c.env_name("password_env", self.password_env.as_deref());
        // TLS: mqtts:// needs the CA; a client identity is a pair; TLS files on a plain
        // connection mean the operator believes it is encrypted when it is not.
        let identity = (&self.client_cert_file, &self.client_key_file);
        if tls == Some(true) && self.ca_file.is_none() {
            c.error(
                "ca_file",
                "mqtts:// needs mqtt.ca_file (the broker's CA certificate, PEM)",
            );
        }
        if matches!(identity, (Some(_), None) | (None, Some(_))) {
            c.error(
                if self.client_key_file.is_none() {
                    "client_key_file"
                } else {
                    "client_cert_file"
                },
                "set both mqtt.client_cert_file and mqtt.client_key_file, or neither",
            );
        }
        let tls_files = self.ca_file.is_some() || identity != (&None, &None);
        if tls == Some(false) && tls_files {
            c.error(
                "url",
                format!(
                    "{:?} is a plain connection but TLS files are set; use mqtts://",
                    self.url
                ),
            );
        }
    }

    /// The problems [`MqttConfig::validate`] finds, as one error.
    pub fn check(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        self.validate("mqtt", &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// A broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(s: &str) -> Result<Self, MqttError> {
        let u = url::Url::parse(s).map_err(|e| MqttError::Url(format!("{s:?}: {e}")))?;
        let tls = match u.scheme() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            other => {
                return Err(MqttError::Url(format!(
                    "unsupported scheme {other:?}; use mqtt:// or mqtts://"
                )));
            }
        };
        if !u.username().is_empty() || u.password().is_some() {
            return Err(MqttError::Url(
                "credentials in the URL are refused; use mqtt.username and mqtt.password_env \
                 or mqtt.password_file"
                    .into(),
            ));
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| MqttError::Url(format!("{s:?} has no host")))?
            .trim_matches(['[', ']'])
            .to_string();
        Ok(BrokerUrl {
            tls,
            host,
            port: u.port().unwrap_or(if tls { 8883 } else { 1883 }),
        })
    }
}

fn read_file(field: &'static str, p: &Path) -> Result<Vec<u8>, MqttError> {
    std::fs::read(p).map_err(|e| MqttError::File {
        field,
        path: p.display().to_string(),
        reason: e.to_string(),
    })
}

/// QoS 1 publishes awaiting their PUBACK at once.
pub(crate) const MAX_IN_FLIGHT: usize = 200;

/// Topic of the node's retained status.
pub fn status_topic(prefix: &str, node: &NodeId) -> String {
    format!("{prefix}/{node}/status")
}

/// Topic of alerts.
pub fn alerts_topic(prefix: &str, node: &NodeId) -> String {
    format!("{prefix}/{node}/alerts")
}

/// A stream's topic under its node, `streams/<id>/<leaf>` (`status`, `verdict`,
/// `availability`, `event`): the one place the layout is written.
pub fn stream_suffix(stream: &crate::types::StreamId, leaf: &str) -> String {
    format!("{}{leaf}", stream_scope(stream))
}

/// Everything a stream has under its node: `streams/<id>/`.
pub fn stream_scope(stream: &crate::types::StreamId) -> String {
    format!("streams/{stream}/")
}

/// A stream's full topic: `<node_prefix>streams/<id>/<leaf>` (`node_prefix` ends in `/`).
pub fn stream_topic(node_prefix: &str, stream: &crate::types::StreamId, leaf: &str) -> String {
    format!("{node_prefix}{}", stream_suffix(stream, leaf))
}

/// The stream and leaf of a full topic under `node_prefix`, if it is a stream's topic.
pub fn parse_stream_topic<'a>(
    node_prefix: &str,
    topic: &'a str,
) -> Option<(crate::types::StreamId, &'a str)> {
    let (id, leaf) = topic
        .strip_prefix(node_prefix)?
        .strip_prefix("streams/")?
        .split_once('/')?;
    (!leaf.is_empty() && !leaf.contains('/'))
        .then(|| crate::types::StreamId::new(id).ok().map(|s| (s, leaf)))
        .flatten()
}

/// Everything resolved at start, so the task itself cannot fail on configuration.
#[derive(Clone)]
pub(crate) struct Prepared {
    pub(crate) options: MqttOptions,
    pub(crate) status: String,
    pub(crate) alerts: String,
    /// `<prefix>/<node>/`, for retained messages.
    pub(crate) node_prefix: String,
    pub(crate) backoff: BackoffConfig,
    /// Home Assistant discovery, when on.
    pub(crate) discovery: Option<crate::publish::homeassistant::Discovery>,
}

pub(crate) fn prepare(cfg: &MqttConfig, node: &NodeId) -> Result<Prepared, MqttError> {
    cfg.check().map_err(MqttError::Config)?;
    let url = BrokerUrl::parse(&cfg.url)?;
    let id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("dfwatch-{node}"));
    let mut o = MqttOptions::new(id, url.host.clone(), url.port);
    o.set_keep_alive(cfg.keep_alive);
    o.set_clean_session(true);
    o.set_inflight(MAX_IN_FLIGHT as u16);
    // Face-crop JPEGs are tens of kB; rumqttc's default limit is 10 kB.
    o.set_max_packet_size(1 << 20, 1 << 20);
    let status = status_topic(&cfg.prefix, node);
    o.set_last_will(LastWill::new(&status, "offline", QoS::AtLeastOnce, true));
    let password = match (&cfg.password_env, &cfg.password_file) {
        (Some(var), _) => Some(std::env::var(var).map_err(|_| MqttError::MissingEnv(var.clone()))?),
        (None, Some(p)) => {
            Some(
                crate::files::read_secret_file(p).map_err(|e| MqttError::File {
                    field: "password_file",
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?,
            )
        }
        (None, None) => None,
    };
    if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), password.unwrap_or_default());
    }
    if url.tls {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Checked above: TLS has its CA, and a client identity is a whole pair.
        let ca = match &cfg.ca_file {
            Some(p) => read_file("ca_file", p)?,
            None => Vec::new(),
        };
        let client_auth = match (&cfg.client_cert_file, &cfg.client_key_file) {
            (Some(c), Some(k)) => Some((
                read_file("client_cert_file", c)?,
                read_file("client_key_file", k)?,
            )),
            _ => None,
        };
        o.set_transport(rumqttc::Transport::tls(ca, client_auth, None));
    }
    Ok(Prepared {
        options: o,
        alerts: alerts_topic(&cfg.prefix, node),
        node_prefix: format!("{}/{node}/", cfg.prefix),
        discovery: cfg.homeassistant.then(|| {
            crate::publish::homeassistant::Discovery::new(
                &cfg.homeassistant_prefix,
                &cfg.prefix,
                node,
                cfg.homeassistant_page_url.clone(),
            )
        }),
        status,
        backoff: cfg.backoff,
    })
}
