//! Publish: alerts and statuses out over MQTT, through a durable spool.
//!
//! Owns the `[mqtt]` config section. Parts: the alert payload (schema version 1,
//! [`payload`]), the durable spool ([`spool`]), the sans-IO outbox that says what each sink
//! owes and when an alert may leave the spool ([`outbox`]), the publisher that feeds every
//! sink from it ([`publisher`]: its handle and its task), MQTT ([`mqtt`]: config, session,
//! retained state, the sweep at connect), the webhooks that share the spool ([`webhook`]),
//! Home Assistant discovery ([`homeassistant`]) and the embedded broker ([`broker`]).

pub mod broker;
pub mod homeassistant;
pub mod mqtt;
pub mod outbox;
pub mod payload;
pub mod publisher;
pub mod spool;
pub mod webhook;
