//! A real mosquitto per test (free port, persistence in a temp dir) and a persistent-session
//! subscriber, shared by the publisher and daemon tests.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A mosquitto process with persistence in `dir`.
pub struct Broker {
    pub port: u16,
    pub conf: PathBuf,
    child: Option<Child>,
}

impl Broker {
    pub fn new(dir: &Path) -> Broker {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {}/\nautosave_interval 1\n\
                 # Started as root (CI), keep root: the files live in a private temp dir.\n\
                 user root\n\
                 # Above mosquitto's default of 1000 queued QoS 1 messages per client, so a\n\
                 # test subscriber slowed by a loaded machine loses none of a 1200 burst.\n\
                 max_queued_messages 10000\n",
                dir.display()
            ),
        )
        .unwrap();
        Broker {
            port,
            conf,
            child: None,
        }
    }

    pub async fn start(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto (package mosquitto; tools/setup.sh installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("mosquitto did not start on port {}", self.port);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: mosquitto saves its persistent sessions on the way out.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A persistent-session subscriber collecting `(topic, payload)` of `dfwatch/#`.
pub fn subscriber(port: u16, id: &str) -> Arc<Mutex<Vec<(String, String)>>> {
    subscriber_on(port, id, "dfwatch/#")
}

/// [`subscriber`] on another topic filter.
pub fn subscriber_on(
    port: u16,
    id: &str,
    filter: &'static str,
) -> Arc<Mutex<Vec<(String, String)>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(false);
    o.set_keep_alive(Duration::from_secs(5));
    // Face-crop JPEGs are tens of kB; rumqttc refuses packets over 10 kB by default.
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(o, 64);
    let sink = got.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(filter, QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    sink.lock().unwrap().push((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    got
}

pub async fn wait_until(what: &str, timeout: Duration, cond: impl Fn() -> bool) {
    let t = tokio::time::Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the test's webhook receiver saw: `(idempotency key, event header, authorization,
/// body)` of every request, and the answer it gave.
pub type Hits = Arc<Mutex<Vec<(String, String, String, String, u16)>>>;

/// A webhook receiver on 127.0.0.1 that answers 500 until `healthy_at`, then 200.
pub async fn receiver(healthy_at: tokio::time::Instant) -> (u16, Hits) {
    use axum::http::{HeaderMap, StatusCode};
    let hits: Hits = Arc::default();
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hook/secret-path",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let h = h.clone();
            async move {
                let get = |k: &str| {
                    headers
                        .get(k)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let code = if tokio::time::Instant::now() < healthy_at {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                };
                h.lock().unwrap().push((
                    get("idempotency-key"),
                    get("x-dfwatch-event"),
                    get("authorization"),
                    body,
                    code.as_u16(),
                ));
                code
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, hits)
}
