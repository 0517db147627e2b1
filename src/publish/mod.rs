//! Publish: alerts and statuses out over MQTT, through a durable spool.
//!
//! Owns the `[mqtt]` config section. Parts: the alert payload (schema version 1,
//! [`payload`]), the durable spool ([`spool`]), the MQTT publisher ([`mqtt`]) and the
//! embedded broker ([`broker`]). Not built yet: face-crop JPEGs on a sibling topic.

pub mod broker;
pub mod mqtt;
pub mod payload;
pub mod spool;
