//! Publish: alerts and statuses out over MQTT, through a durable spool.
//!
//! Built so far: the alert payload (schema version 1, [`payload`]). The MQTT client, the
//! spool and the embedded broker are not built yet.

pub mod payload;
