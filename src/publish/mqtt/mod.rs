//! MQTT: alerts from the spool to the broker, QoS 1, with a last will.
//!
//! [`config`] holds `[mqtt]`, every rule about it and the topic builders; [`session`] one
//! connection's state (rumqttc's client and event loop); [`retained`] the retained messages
//! and what a connect publishes; [`sweep`] reads back what an earlier run left retained. The
//! publisher's task (`crate::publish::publisher`) drives them.
//!
//! - [`PublisherHandle::publish_alert`] hands a payload to the task, which records it in the
//!   spool and passes the encoded records to the spool's writer thread; once written the
//!   alert joins the outbox ([`crate::publish::outbox`]) and goes to rumqttc. The task never
//!   blocks on the disk: alerts arriving during one fsync are written together by the next
//!   (group commit), and PUBACKs keep flowing meanwhile.
//! - PUBACK matching is the outbox's: rumqttc does not say which publish a PUBACK answers,
//!   only the packet id it gave each outgoing publish (`Outgoing::Publish(pkid)`, in
//!   hand-over order); the outbox matches them and says when an alert may leave the spool.
//! - Connection loss: the client and event loop are dropped (with them rumqttc's own queue of
//!   in-flight messages, whose re-sends could not be matched), and after a backoff with full
//!   jitter a fresh client connects and the outbox sends again everything the broker has not
//!   acknowledged. An alert whose PUBACK was lost is therefore sent twice: delivery to the
//!   broker is at least once, and consumers deduplicate by `alert_id`.
//! - Node status `<prefix>/<node>/status` is retained: `online` on connect, last will
//!   `offline`, `stopped` on a clean stop. A removed stream's retained messages are cleared.
//! - With `homeassistant`, each stream's discovery configs ([`crate::publish::homeassistant`])
//!   are retained messages too (cleared when the stream goes), and the task subscribes to
//!   Home Assistant's status topic to send them again when Home Assistant starts.

pub mod config;
pub(crate) mod retained;
pub(crate) mod session;
pub mod sweep;

pub use config::{
    BrokerUrl, KEEP_ALIVE_RANGE, MAX_AGE_RANGE, MAX_BYTES_RANGE, MAX_PENDING_RANGE, MqttConfig,
    alerts_topic, parse_stream_topic, status_topic, stream_scope, stream_suffix, stream_topic,
};

use crate::validation::ConfigErrors;

/// What is wrong with `[mqtt]` or what it names on this machine.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("{0}")]
    Config(ConfigErrors),
    #[error("mqtt.url: {0}")]
    Url(String),
    #[error("mqtt.{field}: cannot read {path}: {reason}")]
    File {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("mqtt.password_env: environment variable {0} is not set")]
    MissingEnv(String),
}
