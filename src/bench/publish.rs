//! `dfwatch bench publish`: alerts per second into a local mosquitto with the durable spool
//! (fsynced before publishing, removed on PUBACK), p50 and p99 from enqueue to PUBACK, beside
//! the same QoS 1 publishes straight through rumqttc without the spool, in the same run.

use std::collections::{HashMap, VecDeque};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use dfwatch::publish::mqtt::MqttConfig;
use dfwatch::publish::publisher;
use dfwatch::types::NodeId;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn payload(i: usize) -> Vec<u8> {
    // About the size of a real alert.
    format!(
        "{{\"alert_id\":\"01BENCH{i:019}\",\"pad\":\"{}\"}}",
        "x".repeat(1500)
    )
    .into_bytes()
}

async fn durable(
    port: u16,
    n: usize,
    producers: usize,
    dir: &std::path::Path,
) -> anyhow::Result<(f64, Vec<Duration>)> {
    let cfg = MqttConfig {
        url: format!("mqtt://127.0.0.1:{port}"),
        ..MqttConfig::default()
    };
    let p = Arc::new(publisher::spawn(
        &cfg,
        &NodeId::new("bench")?,
        &dir.join("spool"),
    )?);
    let mut stats = p.subscribe();
    stats.wait_for(|s| s.connected).await?;
    let mut acks = p.acks();
    let enq: Arc<std::sync::Mutex<HashMap<u64, Instant>>> = Default::default();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..producers {
        let p = p.clone();
        let enq = enq.clone();
        tasks.push(tokio::spawn(async move {
            for i in (k..n).step_by(producers) {
                let at = Instant::now();
                let seq = p.publish_alert(&format!("a{i}"), false, payload(i)).await?;
                enq.lock().expect("lock").insert(seq, at);
            }
            anyhow::Ok(())
        }));
    }
    let mut lat = Vec::with_capacity(n);
    let mut acked_at: HashMap<u64, Instant> = HashMap::new();
    while acked_at.len() < n {
        let seq = tokio::time::timeout(Duration::from_secs(30), acks.recv())
            .await
            .context("no PUBACK for 30 s")??;
        acked_at.insert(seq, Instant::now());
    }
    let elapsed = t0.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    {
        let enq = enq.lock().expect("lock");
        for (seq, at) in &acked_at {
            if let Some(e) = enq.get(seq) {
                lat.push(at.saturating_duration_since(*e));
            }
        }
    }
    if let Ok(p) = Arc::try_unwrap(p) {
        p.stop(Duration::from_secs(2)).await;
    }
    Ok((n as f64 / elapsed, lat))
}

async fn bare(port: u16, n: usize) -> anyhow::Result<(f64, Vec<Duration>)> {
    let mut o = MqttOptions::new("bench-bare", "127.0.0.1", port);
    o.set_inflight(200);
    let (client, mut events) = AsyncClient::new(o, 1024);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = events.poll().await? {
            break;
        }
    }
    let t0 = Instant::now();
    let mut sent_at: VecDeque<Instant> = VecDeque::new();
    let mut inflight: HashMap<u16, Instant> = HashMap::new();
    let mut lat = Vec::with_capacity(n);
    let mut next = 0;
    while lat.len() < n {
        while next < n && sent_at.len() + inflight.len() < 200 {
            if client
                .try_publish(
                    "dfwatch/bench/alerts",
                    QoS::AtLeastOnce,
                    false,
                    payload(next),
                )
                .is_err()
            {
                break;
            }
            sent_at.push_back(Instant::now());
            next += 1;
        }
        match events.poll().await? {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(t) = sent_at.pop_front() {
                    inflight.insert(pkid, t);
                }
            }
            Event::Incoming(Packet::PubAck(a)) => {
                if let Some(t) = inflight.remove(&a.pkid) {
                    lat.push(t.elapsed());
                }
            }
            _ => {}
        }
    }
    Ok((n as f64 / t0.elapsed().as_secs_f64(), lat))
}

/// `dfwatch bench publish`: alerts/s and enqueue-to-PUBACK latency with the durable spool,
/// beside plain QoS 1 publishes.
#[derive(clap::Parser)]
struct Args {
    /// Alerts per run.
    #[arg(long, default_value_t = 20_000)]
    alerts: usize,
    /// Concurrent producers.
    #[arg(long, default_value_t = 64)]
    producers: usize,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let Args {
        alerts: n,
        producers,
    } = super::parse_args("publish", args);
    let dir = tempfile_dir()?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"),
    )?;
    let mut broker = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("mosquitto (package mosquitto)")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (bare_rate, mut bare_lat) = bare(port, n).await?;
        let (dur_rate, mut dur_lat) = durable(port, n, producers, &dir).await?;
        bare_lat.sort();
        dur_lat.sort();
        println!(
            "bench publish: {n} alerts of ~1.5 kB, QoS 1, local mosquitto; durable: {producers} \
             concurrent producers, spool fsynced (group commit) before publishing"
        );
        println!(
            "{:<40} {:>12} {:>10} {:>10}",
            "variant", "alerts/s", "p50 ms", "p99 ms"
        );
        let row = |name: &str, rate: f64, lat: &[Duration]| {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{:<40} {:>12.0} {:>10.2} {:>10.2}",
                name,
                rate,
                ms(percentile(lat, 0.5)),
                ms(percentile(lat, 0.99))
            );
        };
        row("rumqttc QoS 1, no spool (baseline)", bare_rate, &bare_lat);
        row("dfwatch, durable spool", dur_rate, &dur_lat);
        println!(
            "targets: >= 5,000 alerts/s durable ({}), and >= half the spool-less rate ({:.2})",
            if dur_rate >= 5000.0 { "met" } else { "NOT met" },
            dur_rate / bare_rate
        );
        anyhow::Ok(())
    });
    let _ = broker.kill();
    let _ = broker.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("dfwatch-bench-publish-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
