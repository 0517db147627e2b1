//! Publish: alerts and statuses out over MQTT, through a durable spool.
//!
//! Built so far: the alert payload (schema version 1, [`payload`]) and the durable spool
//! ([`spool`]). The MQTT client and the embedded broker are not built yet.

pub mod payload;
pub mod spool;
