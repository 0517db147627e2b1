//! The embedded MQTT broker (`mqtt.embedded = true`, the default config): rumqttd in-process
//! on a loopback address, so `mosquitto_sub -t 'dfwatch/#' -v` works with zero set-up.
//!
//! It keeps everything in memory and lives and dies with the process: messages for offline
//! subscribers, retained statuses and sessions are lost on restart, and the last will cannot
//! outlive the broker it is registered with. Use a real broker (mosquitto with persistence)
//! in production.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::mqtt::MqttError;

/// Starts rumqttd on `listen` (a loopback address) on its own thread, and returns once it
/// accepts connections. rumqttd has no stop: the broker runs until the process exits.
pub fn start_embedded(listen: SocketAddr) -> Result<(), MqttError> {
    if !listen.ip().is_loopback() {
        return Err(MqttError::Url(format!(
            "the embedded broker listens on loopback only, not {listen}"
        )));
    }
    // Fail clearly when the port is taken (rumqttd would only log it on its own thread).
    drop(
        TcpListener::bind(listen).map_err(|e| {
            MqttError::Url(format!("embedded broker: cannot listen on {listen}: {e}"))
        })?,
    );
    let config: rumqttd::Config = serde_json::from_value(serde_json::json!({
        "id": 0,
        "router": {
            "max_connections": 1024,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 104_857_600,
            "max_segment_count": 10
        },
        "v4": {
            "1": {
                "name": "dfwatch-embedded",
                "listen": listen.to_string(),
                "next_connection_delay_ms": 1,
                "connections": {
                    "connection_timeout_ms": 60_000,
                    "max_payload_size": 1_048_576,
                    "max_inflight_count": 200,
                    "dynamic_filters": true
                }
            }
        }
    }))
    .map_err(|e| MqttError::Url(format!("embedded broker config: {e}")))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "Embedded MQTT broker stopped.");
            }
        })
        .map_err(|e| MqttError::Url(format!("embedded broker thread: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect(listen).is_ok() {
            tracing::info!(listen = %listen, "Embedded MQTT broker up (in memory).");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(MqttError::Url(format!(
        "embedded broker did not start listening on {listen} within 5 s"
    )))
}
