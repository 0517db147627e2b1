//! Publish: alerts and statuses out over MQTT, through a durable spool.
//!
//! Built so far: the alert payload (schema version 1, [`payload`]), the durable spool
//! ([`spool`]) and the MQTT publisher ([`mqtt`]). The embedded broker is not built yet.

pub mod mqtt;
pub mod payload;
pub mod spool;
