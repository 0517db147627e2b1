//! The MQTT publisher against a real mosquitto (started by each test on a free port, with
//! persistence) and a persistent-session subscriber (fixed client id, clean session off,
//! QoS 1), as a consumer that must not miss alerts would run.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dfwatch::publish::mqtt::MqttConfig;
use dfwatch::publish::publisher::{self, PublisherHandle};
use dfwatch::types::NodeId;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

mod mqtt_support;

use mqtt_support::{Broker, Hits, free_port, receiver, subscriber, wait_until};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Raw messages received: `(topic, payload bytes)`.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

fn config(url: &str) -> MqttConfig {
    let mut c = MqttConfig {
        url: url.into(),
        ..MqttConfig::default()
    };
    c.backoff.base = Duration::from_millis(100);
    c.backoff.cap = Duration::from_millis(500);
    c
}

fn node() -> NodeId {
    NodeId::new("test-node").unwrap()
}

fn alert(i: usize) -> (String, Vec<u8>) {
    let id = format!("01TESTALERT{i:015}");
    (
        id.clone(),
        format!("{{\"alert_id\":\"{id}\"}}").into_bytes(),
    )
}

fn alert_ids(got: &Arc<Mutex<Vec<(String, String)>>>) -> BTreeSet<String> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.ends_with("/alerts"))
        .map(|(_, p)| p.clone())
        .collect()
}

async fn publish_n(p: &PublisherHandle, range: std::ops::Range<usize>) {
    for i in range {
        let (id, payload) = alert(i);
        p.publish_alert(&id, false, payload).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_the_broker_and_leave_the_spool() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        let got = subscriber(broker.port, "sub-basic");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p =
            publisher::spawn(&config(&broker.url()), &node(), &dir.path().join("spool")).unwrap();
        publish_n(&p, 0..5).await;
        p.publish_retained("streams/cam/status", b"{\"state\":\"online\"}".to_vec())
            .await
            .unwrap();
        wait_until("5 alerts", SECS(20), || alert_ids(&got).len() == 5).await;
        wait_until("the stream status", SECS(10), || {
            got.lock()
                .unwrap()
                .iter()
                .any(|(t, v)| t == "dfwatch/test-node/streams/cam/status" && v.contains("online"))
        })
        .await;
        // Retained: a subscriber arriving later still gets it.
        let late = subscriber(broker.port, "sub-late");
        wait_until("the retained stream status", SECS(10), || {
            late.lock()
                .unwrap()
                .iter()
                .any(|(t, _)| t == "dfwatch/test-node/streams/cam/status")
        })
        .await;
        let mut stats = p.subscribe();
        let _ = tokio::time::timeout(SECS(10), stats.wait_for(|s| s.pending == 0)).await;
        assert_eq!(p.stats().pending, 0, "{:?}", p.stats());
        assert!(
            got.lock()
                .unwrap()
                .iter()
                .any(|(t, v)| t == "dfwatch/test-node/status" && v == "online")
        );
        p.stop(SECS(2)).await;
        wait_until("stopped status", SECS(10), || {
            got.lock().unwrap().iter().any(|(_, v)| v == "stopped")
        })
        .await;
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_for_ten_seconds_loses_none_of_100_alerts() {
    tokio::time::timeout(SECS(90), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        let got = subscriber(broker.port, "sub-outage");
        let p =
            publisher::spawn(&config(&broker.url()), &node(), &dir.path().join("spool")).unwrap();
        publish_n(&p, 0..3).await;
        wait_until("the first alerts", SECS(20), || alert_ids(&got).len() == 3).await;
        broker.stop();
        // 100 alerts raised while the broker is away: each is durable when publish returns.
        publish_n(&p, 3..103).await;
        tokio::time::sleep(SECS(10)).await;
        assert!(p.stats().pending >= 100, "{:?}", p.stats());
        broker.start().await;
        wait_until("all 103 distinct alerts", SECS(40), || {
            alert_ids(&got).len() == 103
        })
        .await;
        let mut stats = p.subscribe();
        let _ = tokio::time::timeout(SECS(10), stats.wait_for(|s| s.pending == 0)).await;
        assert_eq!(p.stats().pending, 0);
        assert!(p.stats().reconnects >= 1);
        p.stop(SECS(2)).await;
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_arrives_when_the_publisher_dies() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        let got = subscriber(broker.port, "sub-will");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p =
            publisher::spawn(&config(&broker.url()), &node(), &dir.path().join("spool")).unwrap();
        wait_until("online", SECS(20), || {
            got.lock().unwrap().iter().any(|(_, v)| v == "online")
        })
        .await;
        // A crash: the connection drops without DISCONNECT.
        p.abort();
        wait_until("the last will", SECS(20), || {
            got.lock()
                .unwrap()
                .iter()
                .any(|(t, v)| t == "dfwatch/test-node/status" && v == "offline")
        })
        .await;
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_spooled_before_a_crash_are_sent_after_the_restart() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        let spool = dir.path().join("spool");
        // No broker yet: the alerts can only go to the spool, then the process dies.
        let p = publisher::spawn(&config(&broker.url()), &node(), &spool).unwrap();
        publish_n(&p, 0..3).await;
        p.abort();
        broker.start().await;
        let got = subscriber(broker.port, "sub-restart");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p = publisher::spawn(&config(&broker.url()), &node(), &spool).unwrap();
        wait_until("the 3 spooled alerts", SECS(20), || {
            alert_ids(&got).len() == 3
        })
        .await;
        p.stop(SECS(2)).await;
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn bad_urls_and_unreadable_tls_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let err = |cfg: MqttConfig| match publisher::spawn(&cfg, &node(), &spool) {
        Ok(_) => panic!("accepted {cfg:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err(config("ftp://h:1")).contains("unsupported scheme \"ftp\""));
    let e = err(config("mqtt://user:secret@h:1"));
    assert!(
        e.contains("credentials in the URL are refused") && !e.contains("secret"),
        "{e}"
    );
    assert!(err(config("mqtts://h:8883")).contains("mqtt.ca_file"));
    let mut c = config("mqtts://h:8883");
    c.ca_file = Some(dir.path().join("missing-ca.pem"));
    let e = err(c);
    assert!(
        e.starts_with("mqtt.ca_file: cannot read") && e.contains("missing-ca.pem"),
        "{e}"
    );
    let mut c = config("mqtt://h:1");
    c.password_env = Some("DFWATCH_TEST_UNSET_MQTT_PASSWORD".into());
    assert!(err(c).contains("DFWATCH_TEST_UNSET_MQTT_PASSWORD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_carries_alerts_statuses_and_the_last_will() {
    tokio::time::timeout(SECS(60), async {
        let port = free_port();
        let listen: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        dfwatch::publish::broker::start_embedded(listen).unwrap();
        // The port is now taken: a second start says so.
        let e = dfwatch::publish::broker::start_embedded(listen)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot listen"), "{e}");
        let got = subscriber(port, "sub-embedded");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dir = tempfile::tempdir().unwrap();
        let url = format!("mqtt://127.0.0.1:{port}");
        let p = publisher::spawn(&config(&url), &node(), &dir.path().join("spool")).unwrap();
        publish_n(&p, 0..10).await;
        wait_until("10 alerts", SECS(20), || alert_ids(&got).len() == 10).await;
        let mut stats = p.subscribe();
        let _ = tokio::time::timeout(SECS(10), stats.wait_for(|s| s.pending == 0)).await;
        assert_eq!(p.stats().pending, 0);
        p.abort();
        wait_until("the last will", SECS(20), || {
            got.lock().unwrap().iter().any(|(_, v)| v == "offline")
        })
        .await;
    })
    .await
    .expect("in time");
}

/// Child process for the SIGKILL test: spools 5 alerts (broker down), says so, then waits to
/// be killed. Runs only when the parent test launches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by alerts_in_the_spool_survive_a_sigkill as a child process"]
async fn child_spools_alerts_then_waits_to_be_killed() {
    let Some(spool) = std::env::var_os("DFWATCH_CHILD_SPOOL") else {
        return;
    };
    let url = std::env::var("DFWATCH_CHILD_URL").unwrap();
    let p = publisher::spawn(&config(&url), &node(), Path::new(&spool)).unwrap();
    publish_n(&p, 0..5).await;
    println!("SPOOLED");
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(SECS(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_in_the_spool_survive_a_sigkill() {
    tokio::time::timeout(SECS(90), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        let spool = dir.path().join("spool");
        // A real process, killed with SIGKILL while its alerts sit in the spool (the broker
        // is down, so none can have been delivered).
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_spools_alerts_then_waits_to_be_killed",
                "--ignored",
                "--nocapture",
            ])
            .env("DFWATCH_CHILD_SPOOL", &spool)
            .env("DFWATCH_CHILD_URL", broker.url())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while out.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                buf.push(byte[0]);
                if String::from_utf8_lossy(&buf).contains("SPOOLED") {
                    return;
                }
            }
            panic!(
                "the child ended without spooling: {}",
                String::from_utf8_lossy(&buf)
            );
        })
        .await
        .unwrap();
        let status = Command::new("kill")
            .args(["-9", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let _ = child.wait();
        broker.start().await;
        let got = subscriber(broker.port, "sub-sigkill");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p = publisher::spawn(&config(&broker.url()), &node(), &spool).unwrap();
        wait_until("the 5 alerts of the killed process", SECS(20), || {
            alert_ids(&got).len() == 5
        })
        .await;
        p.stop(SECS(2)).await;
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn face_crops_go_out_as_jpeg_and_are_never_retained() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        let got: Received = Arc::new(Mutex::new(Vec::new()));
        let mut o = MqttOptions::new("sub-face", "127.0.0.1", broker.port);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(o, 64);
        let sink = got.clone();
        tokio::spawn(async move {
            while let Ok(ev) = events.poll().await {
                match ev {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        let _ = client
                            .subscribe("dfwatch/+/alerts/+/face", QoS::AtLeastOnce)
                            .await;
                    }
                    Event::Incoming(Packet::Publish(p)) => {
                        sink.lock()
                            .unwrap()
                            .push((p.topic.clone(), p.payload.to_vec()));
                    }
                    _ => {}
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p =
            publisher::spawn(&config(&broker.url()), &node(), &dir.path().join("spool")).unwrap();
        let mut stats = p.subscribe();
        stats.wait_for(|s| s.connected).await.unwrap();
        let rgb: Vec<u8> = (0..224 * 224 * 3).map(|i| (i % 251) as u8).collect();
        let jpeg = dfwatch::crop::encode_jpeg(&rgb, 224, 85).unwrap();
        p.publish_face_crop("01TESTALERT000000000000001", jpeg.clone())
            .await
            .unwrap();
        wait_until("the face crop", SECS(10), || {
            !got.lock().unwrap().is_empty()
        })
        .await;
        let (topic, bytes) = got.lock().unwrap()[0].clone();
        assert_eq!(
            topic,
            "dfwatch/test-node/alerts/01TESTALERT000000000000001/face"
        );
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (224, 224));
        // Not retained: a subscriber arriving now gets nothing on that topic.
        let late = subscriber(broker.port, "sub-face-late");
        tokio::time::sleep(SECS(2)).await;
        assert!(
            !late
                .lock()
                .unwrap()
                .iter()
                .any(|(t, _)| t.ends_with("/face"))
        );
        // Not spooled: nothing pending.
        assert_eq!(p.stats().pending, 0);
        p.stop(SECS(2)).await;
    })
    .await
    .expect("in time");
}

/// A mosquitto with a TLS listener beside its plain one (subscribers stay on plain TCP);
/// returns the broker, the TLS port and the CA file.
async fn tls_broker(dir: &Path, require_client_cert: bool) -> (Broker, u16, PathBuf) {
    let (ca, cert, key) = tls_files(dir);
    let mut broker = Broker::new(dir);
    let tls_port = free_port();
    let mut conf = std::fs::read_to_string(&broker.conf).unwrap();
    conf.push_str(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
         require_certificate {require_client_cert}\n",
        ca.display(),
        cert.display(),
        key.display()
    ));
    std::fs::write(&broker.conf, conf).unwrap();
    broker.start().await;
    (broker, tls_port, ca)
}

/// Makes a CA and a server certificate for 127.0.0.1 with openssl; returns (ca, cert, key).
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(st.success(), "openssl {args:?}");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=dfwatch-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    // A client certificate from the same CA, for brokers that require one (X.509 v3: webpki
    // refuses v1 certificates).
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=dfwatch-test-client",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "client.ext",
        "-out",
        "client.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_client_certificate_when_the_broker_requires_one() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (broker, tls_port, ca) = tls_broker(dir.path(), true).await;
        let got = subscriber(broker.port, "sub-client-cert");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Without a client certificate the broker refuses the handshake: alerts stay spooled.
        let mut cfg = config(&format!("mqtts://127.0.0.1:{tls_port}"));
        cfg.ca_file = Some(ca.clone());
        let p = publisher::spawn(&cfg, &node(), &dir.path().join("spool-no-cert")).unwrap();
        publish_n(&p, 20..22).await;
        tokio::time::sleep(SECS(2)).await;
        assert!(!p.stats().connected);
        assert_eq!(p.stats().pending, 2);
        p.stop(SECS(1)).await;
        // With one, they arrive.
        cfg.client_cert_file = Some(dir.path().join("client.pem"));
        cfg.client_key_file = Some(dir.path().join("client.key"));
        let p = publisher::spawn(&cfg, &node(), &dir.path().join("spool-cert")).unwrap();
        publish_n(&p, 0..3).await;
        wait_until("3 alerts with a client certificate", SECS(20), || {
            alert_ids(&got).len() == 3
        })
        .await;
        p.stop(SECS(2)).await;
        // Only one of the pair: a clear error at start.
        cfg.client_key_file = None;
        let err = publisher::spawn(&cfg, &node(), &dir.path().join("spool-half"))
            .err()
            .expect("half a client identity is refused")
            .to_string();
        assert!(err.contains("client_key_file"), "{err}");
    })
    .await
    .expect("in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_ca_file_reaches_a_tls_broker() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let (broker, tls_port, ca) = tls_broker(dir.path(), false).await;
        let got = subscriber(broker.port, "sub-tls");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut cfg = config(&format!("mqtts://127.0.0.1:{tls_port}"));
        cfg.ca_file = Some(ca.clone());
        let p = publisher::spawn(&cfg, &node(), &dir.path().join("spool")).unwrap();
        publish_n(&p, 0..3).await;
        wait_until("3 alerts over TLS", SECS(20), || alert_ids(&got).len() == 3).await;
        p.stop(SECS(2)).await;
        // The wrong CA: the handshake fails, nothing is delivered, the alerts stay spooled.
        let other = tempfile::tempdir().unwrap();
        let (wrong_ca, _, _) = tls_files(other.path());
        let mut cfg = config(&format!("mqtts://127.0.0.1:{tls_port}"));
        cfg.ca_file = Some(wrong_ca);
        let p = publisher::spawn(&cfg, &node(), &dir.path().join("spool-wrong-ca")).unwrap();
        publish_n(&p, 10..12).await;
        tokio::time::sleep(SECS(2)).await;
        assert!(!p.stats().connected);
        assert_eq!(p.stats().pending, 2);
        p.stop(SECS(1)).await;
    })
    .await
    .expect("in time");
}

/// Child process for the full-disk test: its files may not grow past 12 KiB (RLIMIT_FSIZE,
/// SIGXFSZ ignored, so writes past it fail as on a full disk). With the broker still down it
/// spools 40 alerts of about 1 KiB, most of which the disk refuses: it must say it is not
/// durable. Once the parent starts the broker, every alert must reach it, and the emptied
/// spool must be durable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by alerts_flow_while_the_disk_refuses_writes as a child process"]
async fn child_publishes_while_its_disk_is_full() {
    let Some(spool) = std::env::var_os("DFWATCH_CHILD_SPOOL") else {
        return;
    };
    use nix::sys::resource::{Resource, setrlimit};
    use nix::sys::signal::{SigHandler, Signal, signal};
    use std::io::Write;
    // SAFETY: SIG_IGN installs no handler code; it only makes the kernel fail the write
    // (EFBIG) instead of killing the process when a file would pass its size limit.
    unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) }.unwrap();
    setrlimit(Resource::RLIMIT_FSIZE, 12 * 1024, 12 * 1024).unwrap();
    let url = std::env::var("DFWATCH_CHILD_URL").unwrap();
    let p = publisher::spawn(&config(&url), &node(), Path::new(&spool)).unwrap();
    let mut refused = 0;
    for i in 0..40 {
        let id = format!("01FULLDISK{i:016}");
        let payload = format!("{{\"alert_id\":\"{id}\",\"pad\":\"{}\"}}", "x".repeat(1000));
        if p.publish_alert(&id, false, payload.into_bytes())
            .await
            .is_err()
        {
            refused += 1;
        }
    }
    let st = p.stats();
    assert!(refused > 0, "the file size limit never bit");
    assert!(!st.durable && st.spool_write_errors > 0, "{st:?}");
    assert_eq!(st.pending, 40, "every alert is still held, durable or not");
    println!("NOT DURABLE ({refused} refused by the disk)");
    std::io::stdout().flush().unwrap();
    let mut stats = p.subscribe();
    tokio::time::timeout(SECS(30), stats.wait_for(|s| s.acked == 40))
        .await
        .expect("every alert acknowledged by the broker")
        .unwrap();
    // Emptied, the spool fits the disk again: durable once the rewrite lands.
    tokio::time::timeout(SECS(20), stats.wait_for(|s| s.durable))
        .await
        .expect("durable again")
        .unwrap();
    println!("DELIVERED {} AND DURABLE AGAIN", p.stats().acked);
    p.stop(SECS(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_flow_while_the_disk_refuses_writes() {
    tokio::time::timeout(SECS(90), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        // The subscriber's persistent session first, then the broker goes down: what the
        // child publishes after the restart is queued for it however fast it reconnects.
        broker.start().await;
        let got = subscriber(broker.port, "sub-full-disk");
        tokio::time::sleep(Duration::from_millis(500)).await;
        broker.stop();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_publishes_while_its_disk_is_full",
                "--ignored",
                "--nocapture",
            ])
            .env("DFWATCH_CHILD_SPOOL", dir.path().join("spool"))
            .env("DFWATCH_CHILD_URL", broker.url())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let out = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut buf = Vec::new();
            let mut byte = [0u8; 1];
            while out.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                buf.push(byte[0]);
                if String::from_utf8_lossy(&buf).contains("NOT DURABLE") {
                    return out;
                }
            }
            panic!("the child never said so: {}", String::from_utf8_lossy(&buf));
        })
        .await
        .unwrap();
        broker.start().await;
        let rest = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut out = out;
            let mut rest = String::new();
            let _ = out.read_to_string(&mut rest);
            rest
        })
        .await
        .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "{rest}");
        assert!(rest.contains("DELIVERED 40 AND DURABLE AGAIN"), "{rest}");
        wait_until("all 40 alerts at the subscriber", SECS(20), || {
            alert_ids(&got)
                .iter()
                .filter(|p| p.contains("01FULLDISK"))
                .count()
                == 40
        })
        .await;
    })
    .await
    .expect("in time");
}

/// A removed stream's retained status and verdict are cleared on the broker (an empty
/// retained message), are not published again after a reconnect, and a late status for it
/// is dropped; a stream of that id added again publishes normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_streams_retained_messages_are_cleared_and_stay_cleared() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        let got = subscriber(broker.port, "sub-clear");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p =
            publisher::spawn(&config(&broker.url()), &node(), &dir.path().join("spool")).unwrap();
        let status = "dfwatch/test-node/streams/gone/status";
        let verdict = "dfwatch/test-node/streams/gone/verdict";
        let kept = "dfwatch/test-node/streams/kept/status";
        for topic in [
            "streams/gone/status",
            "streams/gone/verdict",
            "streams/kept/status",
        ] {
            p.publish_retained(topic, b"{\"state\":\"online\"}".to_vec())
                .await
                .unwrap();
        }
        let seen = |topic: &str, empty: bool| {
            got.lock()
                .unwrap()
                .iter()
                .any(|(t, v)| t == topic && v.is_empty() == empty)
        };
        wait_until("three retained messages", SECS(10), || {
            seen(status, false) && seen(verdict, false) && seen(kept, false)
        })
        .await;
        p.clear_retained("streams/gone/").await.unwrap();
        wait_until(
            "empty retained messages for the removed stream",
            SECS(10),
            || seen(status, true) && seen(verdict, true),
        )
        .await;
        // A late status for the removed stream (a task that had not stopped yet) is dropped.
        p.publish_retained("streams/gone/status", b"{\"state\":\"late\"}".to_vec())
            .await
            .unwrap();
        // After a reconnect only the kept stream's status is published again.
        broker.stop();
        broker.start().await;
        let mut stats = p.subscribe();
        tokio::time::timeout(SECS(20), stats.wait_for(|s| s.connected))
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(SECS(1)).await;
        let fresh = subscriber(broker.port, "sub-fresh");
        wait_until("the kept stream's retained status", SECS(10), || {
            fresh.lock().unwrap().iter().any(|(t, _)| t == kept)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stale: Vec<_> = fresh
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, v)| t.contains("/streams/gone/") && !v.is_empty())
            .cloned()
            .collect();
        assert!(stale.is_empty(), "{stale:?}");
        assert!(
            !got.lock().unwrap().iter().any(|(_, v)| v.contains("late")),
            "the late status went out"
        );
        // The id comes back: its status is published again.
        p.allow_retained("streams/gone/").await.unwrap();
        p.publish_retained("streams/gone/status", b"{\"state\":\"again\"}".to_vec())
            .await
            .unwrap();
        wait_until("the re-added stream's status", SECS(10), || {
            got.lock()
                .unwrap()
                .iter()
                .any(|(t, v)| t == status && v.contains("again"))
        })
        .await;
        p.stop(SECS(2)).await;
    })
    .await
    .expect("in time");
}

/// Messages a [`ha_client`] received: `(topic, payload, retained)`.
type Collected = Arc<Mutex<Vec<(String, Vec<u8>, bool)>>>;

/// A client on `filter` that collects what it receives and can publish.
fn ha_client(port: u16, id: &str, filter: &'static str) -> (AsyncClient, Collected) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(o, 64);
    let sink = got.clone();
    let c = client.clone();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.subscribe(filter, QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    sink.lock()
                        .unwrap()
                        .push((p.topic.clone(), p.payload.to_vec(), p.retain));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (client, got)
}

/// Home Assistant discovery through a real broker: a started stream's four configs arrive
/// retained, each naming the node's availability topic, the stream's own device and its state
/// topics; Home Assistant's birth message brings them again (once for a burst of births); a
/// removed stream's configs are cleared (empty retained messages) and a client arriving later
/// sees only the other stream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_discovery_announces_reannounces_on_birth_and_clears_removed_streams() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        let (ha, got) = ha_client(broker.port, "ha-1", "homeassistant/#");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut cfg = config(&broker.url());
        cfg.homeassistant = true;
        let p = publisher::spawn(&cfg, &node(), &dir.path().join("spool")).unwrap();
        let (cam, cam2) = (
            dfwatch::types::StreamId::new("cam").unwrap(),
            dfwatch::types::StreamId::new("cam_2").unwrap(),
        );
        p.announce_stream(&cam).await.unwrap();
        p.announce_stream(&cam2).await.unwrap();
        let configs = |got: &Collected| {
            got.lock()
                .unwrap()
                .iter()
                .filter(|(t, v, _)| t.ends_with("/config") && !v.is_empty())
                .map(|(t, v, _)| (t.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        wait_until("eight discovery configs", SECS(20), || {
            configs(&got).len() >= 8
        })
        .await;
        let first = configs(&got);
        let mut ids = BTreeSet::new();
        for (topic, payload) in &first {
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            let stream = if topic.contains("/dfwatch_test-node/cam_2_") {
                "cam_2"
            } else {
                "cam"
            };
            assert!(
                ids.insert(v["unique_id"].as_str().unwrap().to_string()),
                "{topic}"
            );
            assert_eq!(v["availability"][0]["topic"], "dfwatch/test-node/status");
            assert_eq!(
                v["device"]["identifiers"][0],
                format!("dfwatch:test-node:{stream}").as_str()
            );
            let state = v["state_topic"].as_str().unwrap();
            assert!(
                state.starts_with(&format!("dfwatch/test-node/streams/{stream}/")),
                "{topic}: {state}"
            );
        }
        assert_eq!(ids.len(), 8);
        // Home Assistant restarts (and flaps: 50 births at once): every config comes again,
        // once for the burst.
        got.lock().unwrap().clear();
        for _ in 0..50 {
            ha.publish("homeassistant/status", QoS::AtLeastOnce, false, "online")
                .await
                .unwrap();
        }
        wait_until("the configs again after the birth", SECS(20), || {
            configs(&got).len() >= 8
        })
        .await;
        tokio::time::sleep(SECS(4)).await;
        assert_eq!(configs(&got).len(), 8, "one answer to a burst of births");
        // cam goes: its four configs are cleared, cam_2's stay.
        p.retract_stream(&cam).await.unwrap();
        wait_until("cam's configs cleared", SECS(20), || {
            got.lock()
                .unwrap()
                .iter()
                .filter(|(t, v, _)| {
                    v.is_empty() && t.contains("/dfwatch_test-node/cam_") && !t.contains("cam_2")
                })
                .count()
                == 4
        })
        .await;
        assert!(
            !got.lock()
                .unwrap()
                .iter()
                .any(|(t, v, _)| v.is_empty() && t.contains("cam_2")),
            "only the removed stream's configs are cleared"
        );
        let (_late, seen) = ha_client(broker.port, "ha-2", "homeassistant/#");
        wait_until("the retained configs of cam_2", SECS(20), || {
            configs(&seen).len() == 4
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let kept = configs(&seen);
        assert_eq!(kept.len(), 4, "{kept:?}");
        assert!(
            kept.iter()
                .all(|(t, _)| t.contains("/dfwatch_test-node/cam_2_"))
        );
        p.stop(SECS(5)).await;
    })
    .await
    .expect("test timed out");
}

/// What a crashed run left retained on a persistent broker (a gone stream's status, verdict
/// `fake`, availability `online` and Home Assistant configs; a current stream's availability
/// `online` while it is not): at connect the publisher reads it back and clears the gone
/// stream's, sets the current one's availability `offline`, and says the node is `online`
/// only after that, so Home Assistant never shows a stale entity as available. A stream's
/// availability then follows it online, and a stop turns it `offline` first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_leftovers_of_an_earlier_run_are_swept_at_connect_and_availability_follows_the_stream()
 {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        // The earlier run's leftovers, written by a plain client.
        let (old, _) = ha_client(broker.port, "old-run", "unused/#");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let gone = dfwatch::types::StreamId::new("gone").unwrap();
        let cam = dfwatch::types::StreamId::new("cam").unwrap();
        let d = dfwatch::publish::homeassistant::Discovery::new(
            "homeassistant",
            "dfwatch",
            &node(),
            None,
        );
        let mut leftovers: Vec<(String, Vec<u8>)> = d.stream_configs(&gone);
        for (t, v) in [
            (
                "dfwatch/test-node/streams/gone/status",
                &b"{\"state\":\"online\"}"[..],
            ),
            (
                "dfwatch/test-node/streams/gone/verdict",
                b"{\"verdict\":\"fake\"}",
            ),
            ("dfwatch/test-node/streams/gone/availability", b"online"),
            ("dfwatch/test-node/streams/cam/availability", b"online"),
            ("dfwatch/test-node/status", b"offline"),
        ] {
            leftovers.push((t.to_string(), v.to_vec()));
        }
        for (t, v) in &leftovers {
            old.publish(t.as_str(), QoS::AtLeastOnce, true, v.clone())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Everything the new run sends, in order, as a subscriber sees it.
        let (_ha, seen) = ha_client(broker.port, "watcher", "#");
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen.lock().unwrap().clear();
        let mut cfg = config(&broker.url());
        cfg.homeassistant = true;
        let p = publisher::spawn(&cfg, &node(), &dir.path().join("spool")).unwrap();
        p.set_streams([cam.clone()].into()).await.unwrap();
        p.announce_stream(&cam).await.unwrap();
        let node_online = |s: &Collected| {
            s.lock()
                .unwrap()
                .iter()
                .position(|(t, v, _)| t == "dfwatch/test-node/status" && v == b"online")
        };
        wait_until("the node online", SECS(20), || node_online(&seen).is_some()).await;
        let online_at = node_online(&seen).unwrap();
        let got = seen.lock().unwrap().clone();
        let position = |topic: &str, payload: &[u8]| {
            got.iter()
                .position(|(t, v, _)| t == topic && v == payload)
                .unwrap_or_else(|| panic!("{topic} = {payload:?} not sent: {got:?}"))
        };
        // The gone stream's discovery configs are cleared before the node is online (Home
        // Assistant drops its entities); its state topics after a grace, so no entity that
        // still exists reads an emptied topic.
        let configs: Vec<&String> = leftovers
            .iter()
            .map(|(t, _)| t)
            .filter(|t| t.starts_with("homeassistant/") && t.contains("gone"))
            .collect();
        assert_eq!(configs.len(), 4);
        let last_config = configs.iter().map(|t| position(t, b"")).max().unwrap();
        assert!(
            last_config < online_at,
            "configs cleared before the node is online"
        );
        assert!(
            position("dfwatch/test-node/streams/cam/availability", b"offline") < online_at,
            "cam's stale availability goes offline before the node is online"
        );
        let states: Vec<&String> = leftovers
            .iter()
            .map(|(t, _)| t)
            .filter(|t| t.starts_with("dfwatch/test-node/streams/gone/"))
            .collect();
        assert_eq!(states.len(), 3);
        wait_until("the gone stream's state topics cleared", SECS(15), || {
            let got = seen.lock().unwrap();
            states.iter().all(|t| {
                got.iter()
                    .position(|(x, v, _)| x == *t && v.is_empty())
                    .is_some_and(|at| at > online_at)
            })
        })
        .await;
        // A client arriving now finds nothing of the gone stream.
        let (_late, late) = ha_client(broker.port, "late", "#");
        tokio::time::sleep(SECS(1)).await;
        let stale: Vec<_> = late
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, v, _)| t.contains("gone") && !v.is_empty())
            .map(|(t, _, _)| t.clone())
            .collect();
        assert!(stale.is_empty(), "{stale:?}");
        // Availability follows the stream, and a stop turns it offline first.
        let availability = |s: &Collected| {
            s.lock()
                .unwrap()
                .iter()
                .rev()
                .find(|(t, _, _)| t == "dfwatch/test-node/streams/cam/availability")
                .map(|(_, v, _)| String::from_utf8_lossy(v).into_owned())
        };
        p.stream_online(&cam, true).await.unwrap();
        wait_until("cam available", SECS(10), || {
            availability(&seen).as_deref() == Some("online")
        })
        .await;
        p.stopping().await.unwrap();
        wait_until("cam unavailable at the stop", SECS(10), || {
            availability(&seen).as_deref() == Some("offline")
        })
        .await;
        // Once stopping, nothing makes it available again.
        p.stream_online(&cam, true).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(availability(&seen).as_deref(), Some("offline"));
        p.stop(SECS(5)).await;
    })
    .await
    .expect("test timed out");
}

/// A webhook that fails for 10 s and then recovers gets every event, oldest first; retries of
/// one event carry its key, distinct events distinct keys; MQTT delivers everything at once
/// meanwhile. Stopped while the webhook still owes events, a restarted publisher sends the
/// webhook the rest and MQTT nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_gets_every_event_once_it_recovers_and_never_holds_back_mqtt() {
    tokio::time::timeout(SECS(90), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        let got = subscriber(broker.port, "sub-webhook");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let healthy_at = tokio::time::Instant::now() + SECS(10);
        let (port, hits) = receiver(healthy_at).await;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "hook-token\n").unwrap();
        let hook_cfg = dfwatch::publish::webhook::WebhookConfig {
            name: "ops".into(),
            url: format!("http://127.0.0.1:{port}/hook/secret-path"),
            bearer_env: None,
            bearer_file: Some(token_file.clone()),
            ca_file: None,
            timeout: SECS(2),
            events: vec!["new".into(), "end".into()],
            max_owed: 1000,
            backoff: dfwatch::backoff::BackoffConfig {
                base: Duration::from_millis(200),
                cap: Duration::from_millis(800),
                reset_after: SECS(60),
            },
            give_up_after: SECS(3600),
        };
        let broker_url = broker.url();
        let start = || {
            let hook = dfwatch::publish::webhook::Webhook::prepare(&hook_cfg, dir.path()).unwrap();
            publisher::spawn_with_webhooks(
                &config(&broker_url),
                &node(),
                &dir.path().join("spool"),
                vec![Arc::new(hook)],
            )
            .unwrap()
        };
        let p = start();
        // Four events of two alerts: new, update (not for this webhook), end, new.
        let events = [
            ("01WEBHOOKALERT000000000001", "new"),
            ("01WEBHOOKALERT000000000001", "update"),
            ("01WEBHOOKALERT000000000001", "end"),
            ("01WEBHOOKALERT000000000002", "new"),
        ];
        for (id, kind) in events {
            let payload = format!("{{\"alert_id\":\"{id}\",\"kind\":\"{kind}\"}}").into_bytes();
            let kind = match kind {
                "new" => dfwatch::types::AlertChange::New,
                "update" => dfwatch::types::AlertChange::Update,
                _ => dfwatch::types::AlertChange::End,
            };
            p.enqueue_alert(id, kind, payload)
                .await
                .unwrap()
                .await
                .unwrap()
                .unwrap();
        }
        // MQTT does not wait for the failing webhook.
        let mqtt_count = |got: &Arc<Mutex<Vec<(String, String)>>>| {
            got.lock()
                .unwrap()
                .iter()
                .filter(|(t, _)| t.ends_with("/alerts"))
                .count()
        };
        wait_until("MQTT has all four events", SECS(5), || {
            mqtt_count(&got) == 4
        })
        .await;
        assert!(
            tokio::time::Instant::now() < healthy_at,
            "MQTT waited for the webhook"
        );
        let failing = hits.lock().unwrap().len();
        assert!(failing >= 1, "the webhook was tried while it failed");
        // Stop while the webhook owes (once the broker's acknowledgements are in: one still
        // in flight at a stop is sent again, as at-least-once allows); start again after the
        // webhook recovered.
        wait_until("the broker's acknowledgements", SECS(10), || {
            p.stats().mqtt_owed == 0
        })
        .await;
        assert!(p.stats().pending > 0, "the webhook still owes");
        p.stop(SECS(5)).await;
        tokio::time::sleep_until(healthy_at).await;
        let p = start();
        let delivered = |hits: &Hits| {
            hits.lock()
                .unwrap()
                .iter()
                .filter(|h| h.4 == 204)
                .map(|h| h.0.clone())
                .collect::<Vec<_>>()
        };
        wait_until(
            "the webhook has the three events it takes",
            SECS(30),
            || delivered(&hits).len() >= 3,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let keys = delivered(&hits);
        assert_eq!(keys.len(), 3, "each event delivered once: {keys:?}");
        let kinds: Vec<String> = keys
            .iter()
            .map(|k| k.split(':').nth(1).unwrap().to_string())
            .collect();
        assert_eq!(
            kinds,
            ["new", "end", "new"],
            "oldest first, updates not taken"
        );
        let all = hits.lock().unwrap().clone();
        for (key, event, auth, body, _) in &all {
            // Every attempt of an event carries that event's key; the body is the alert.
            let (id, kind, _seq) = {
                let mut k = key.split(':');
                (k.next().unwrap(), k.next().unwrap(), k.next().unwrap())
            };
            assert_eq!(kind, event);
            assert!(body.contains(id) && body.contains(kind), "{body}");
            assert_eq!(auth, "Bearer hook-token");
            assert!(
                keys.contains(key),
                "a retried event has its original key: {key}"
            );
        }
        // MQTT took everything before the restart: nothing was sent to it again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            mqtt_count(&got),
            4,
            "MQTT got no duplicates after the restart"
        );
        let stats = p.webhook_stats();
        assert_eq!((stats[0].delivered, stats[0].owed), (3, 0), "{stats:?}");
        wait_until("the spool empty", SECS(5), || p.stats().pending == 0).await;
        let keys: std::collections::BTreeSet<_> = keys.into_iter().collect();
        assert_eq!(keys.len(), 3, "distinct events have distinct keys");
        // The broker goes away; an event reaches the webhook only. After a restart with the
        // broker back, MQTT gets it and the webhook does not get it again.
        broker.stop();
        let id = "01WEBHOOKALERT000000000003";
        p.enqueue_alert(
            id,
            dfwatch::types::AlertChange::New,
            format!("{{\"alert_id\":\"{id}\"}}").into_bytes(),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .unwrap();
        wait_until("the webhook has the fourth event", SECS(10), || {
            delivered(&hits).len() == 4
        })
        .await;
        p.stop(SECS(3)).await;
        broker.start().await;
        let p = start();
        wait_until(
            "MQTT gets the fourth event after the restart",
            SECS(20),
            || mqtt_count(&got) == 5,
        )
        .await;
        tokio::time::sleep(SECS(1)).await;
        assert_eq!(
            delivered(&hits).len(),
            4,
            "the webhook had it: not sent again"
        );
        wait_until("the spool empty", SECS(5), || p.stats().pending == 0).await;
        p.stop(SECS(5)).await;
    })
    .await
    .expect("test timed out");
}

/// Hundreds of retained messages at once (a reconnect with many streams, Home Assistant's
/// birth) exceed rumqttc's request queue and in-flight window: none is lost, the rest go as
/// room frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_retained_messages_all_reach_the_broker() {
    tokio::time::timeout(SECS(60), async {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::new(dir.path());
        broker.start().await;
        let got = subscriber(broker.port, "sub-burst");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let p =
            publisher::spawn(&config(&broker.url()), &node(), &dir.path().join("spool")).unwrap();
        let mut s = p.subscribe();
        s.wait_for(|s| s.connected).await.unwrap();
        let n = 1200;
        for i in 0..n {
            p.publish_retained(
                &format!("streams/s{i}/status"),
                b"{\"state\":\"online\"}".to_vec(),
            )
            .await
            .unwrap();
        }
        let seen = |got: &Arc<Mutex<Vec<(String, String)>>>| {
            got.lock()
                .unwrap()
                .iter()
                .filter(|(t, _)| t.ends_with("/status") && t.contains("/streams/s"))
                .map(|(t, _)| t.clone())
                .collect::<BTreeSet<_>>()
                .len()
        };
        wait_until("every retained message", SECS(30), || seen(&got) == n).await;
        p.stop(SECS(5)).await;
    })
    .await
    .expect("test timed out");
}
