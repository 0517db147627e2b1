//! `dfwatch bench ingest`: what dfwatch's ingest costs beyond bare GStreamer.
//!
//! Four pre-encoded 720p30 H.264 files (made once with GStreamer's x264enc and cached) are
//! decoded as fast as possible (no clock sync), sampled to the analysis rate and converted to
//! RGB: once through dfwatch's ingest (in this process), once through `gst-launch-1.0` running
//! the same decode, rate conversion and colour conversion into fakesink. Both read the same
//! files in the same run; CPU time comes from getrusage.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{CpuOf, cpu_seconds};
use dfwatch::channel::{FullPolicy, bounded};
use dfwatch::ingest::{self, EosAction, IngestConfig, StreamConfig, StreamState};
use dfwatch::types::{Frame, StreamId};

/// `dfwatch bench ingest`: decode 720p30 H.264 files flat out through dfwatch's ingest and
/// through gst-launch-1.0.
#[derive(clap::Parser)]
struct Args {
    /// Streams decoded at once.
    #[arg(long, default_value_t = 4)]
    streams: usize,
    /// Seconds of video per file.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Analysis rate (frames kept per second).
    #[arg(long, default_value_t = 5.0)]
    fps: f64,
    /// Rounds of each side.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the test files are made.
    #[arg(long, default_value = "var/bench")]
    dir: PathBuf,
}

fn parse_args(args: &[String]) -> anyhow::Result<Args> {
    let a: Args = super::parse_args("ingest", args);
    if a.streams == 0 || a.seconds == 0 || a.rounds == 0 {
        bail!("--streams, --seconds and --rounds must be above 0");
    }
    Ok(a)
}

const PATTERNS: &[&str] = &["ball", "smpte", "snow", "pinwheel", "gradient", "spokes"];

/// Makes (or reuses) `n` 720p30 H.264 MP4 files of `seconds` each.
fn ensure_clips(dir: &Path, n: usize, seconds: u32) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    for i in 0..n {
        let path = dir.join(format!("720p30-h264-{seconds}s-{i}.mp4"));
        if !path.exists() {
            eprintln!("making {} ...", path.display());
            let tmp = path.with_extension("mp4.part");
            let status = Command::new("gst-launch-1.0")
                .arg("-q")
                .args(
                    format!(
                        "videotestsrc num-buffers={} pattern={} ! \
                         video/x-raw,width=1280,height=720,framerate=30/1 ! \
                         x264enc speed-preset=veryfast key-int-max=60 bitrate=3000 ! \
                         h264parse ! mp4mux ! filesink",
                        seconds * 30,
                        PATTERNS[i % PATTERNS.len()]
                    )
                    .split_whitespace(),
                )
                .arg(format!("location={}", tmp.display()))
                .status()
                .context("running gst-launch-1.0 (package gstreamer1.0-tools)")?;
            if !status.success() {
                bail!("gst-launch-1.0 failed to encode {}", path.display());
            }
            std::fs::rename(&tmp, &path)?;
        }
        out.push(std::fs::canonicalize(&path)?);
    }
    Ok(out)
}

struct Measured {
    wall: Duration,
    cpu_s: f64,
    decoded: u64,
    delivered: u64,
}

fn run_baseline(clips: &[PathBuf], fps: f64) -> anyhow::Result<Measured> {
    let max_rate = fps.round().max(1.0) as u32;
    let mut line = String::new();
    for c in clips {
        line.push_str(&format!(
            "filesrc location={} ! decodebin ! videorate drop-only=true max-rate={max_rate} ! \
             videoconvert ! video/x-raw,format=RGB ! fakesink sync=false ",
            c.display()
        ));
    }
    let cpu0 = cpu_seconds(CpuOf::Children);
    let t0 = Instant::now();
    let status = Command::new("gst-launch-1.0")
        .arg("-q")
        .args(line.split_whitespace())
        .status()
        .context("running gst-launch-1.0")?;
    let wall = t0.elapsed();
    if !status.success() {
        bail!("baseline gst-launch-1.0 failed");
    }
    Ok(Measured {
        wall,
        cpu_s: cpu_seconds(CpuOf::Children) - cpu0,
        decoded: 0,
        delivered: 0,
    })
}

fn run_dfwatch(
    rt: &tokio::runtime::Runtime,
    clips: &[PathBuf],
    fps: f64,
) -> anyhow::Result<Measured> {
    let ingest_cfg = IngestConfig {
        analysis_fps: fps,
        ..IngestConfig::default()
    };
    rt.block_on(async {
        let cpu0 = cpu_seconds(CpuOf::Process);
        let t0 = Instant::now();
        let mut handles = Vec::new();
        let mut sinks = Vec::new();
        for (i, c) in clips.iter().enumerate() {
            let id = StreamId::new(&format!("bench-{i}"))?;
            let mut s = StreamConfig::new(id, c.display().to_string());
            s.realtime = false;
            s.on_eos = EosAction::Stop;
            let (tx, rx) = bounded::<Frame>(
                "bench",
                NonZeroUsize::new(64).expect("64"),
                FullPolicy::DropOldest,
            );
            handles.push(ingest::spawn_stream(&s, &ingest_cfg, Path::new("."), tx)?);
            sinks.push(tokio::spawn(async move {
                while rx.recv_async().await.is_some() {}
            }));
        }
        let mut decoded = 0;
        let mut delivered = 0;
        for h in handles {
            let mut rx = h.subscribe();
            let st = rx
                .wait_for(|s| s.state == StreamState::Offline)
                .await
                .map(|s| s.clone())
                .context("stream status channel closed")?;
            if !st.finished {
                bail!("stream {} did not finish: {:?}", h.id(), st.last_error);
            }
            let stats = h.stats();
            decoded += stats.frames_decoded;
            delivered += stats.frames_delivered;
            h.stop().await;
        }
        let wall = t0.elapsed();
        for s in sinks {
            let _ = s.await;
        }
        // Teardown threads finish quickly for files; give them a moment to be counted.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(Measured {
            wall,
            cpu_s: cpu_seconds(CpuOf::Process) - cpu0,
            decoded,
            delivered,
        })
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let a = parse_args(args)?;
    ingest::init().map_err(anyhow::Error::msg)?;
    let clips = ensure_clips(&a.dir, a.streams, a.seconds)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let frames_total = (a.streams as u64) * (a.seconds as u64) * 30;
    let (mut base_wall, mut base_cpu, mut df_wall, mut df_cpu) = (vec![], vec![], vec![], vec![]);
    let mut last = None;
    // Warm-up: page cache and plugin loading for both sides.
    run_baseline(&clips, a.fps)?;
    run_dfwatch(&rt, &clips, a.fps)?;
    for r in 0..a.rounds {
        // Alternate the order so neither side always runs on a warmer machine.
        let (b, d) = if r % 2 == 0 {
            let b = run_baseline(&clips, a.fps)?;
            (b, run_dfwatch(&rt, &clips, a.fps)?)
        } else {
            let d = run_dfwatch(&rt, &clips, a.fps)?;
            (run_baseline(&clips, a.fps)?, d)
        };
        base_wall.push(b.wall.as_secs_f64());
        base_cpu.push(b.cpu_s);
        df_wall.push(d.wall.as_secs_f64());
        df_cpu.push(d.cpu_s);
        last = Some(d);
    }
    let d = last.expect("rounds > 0");
    let (bw, bc, dw, dc) = (
        median(base_wall),
        median(base_cpu),
        median(df_wall),
        median(df_cpu),
    );
    let n = a.streams as f64;
    println!(
        "bench ingest: {} x 1280x720 30 fps H.264, {} s each ({} frames in all), sampled to {} fps, RGB out; median of {} rounds",
        a.streams, a.seconds, frames_total, a.fps, a.rounds
    );
    println!(
        "dfwatch decoded {} frames and delivered {} (expected about {})",
        d.decoded,
        d.delivered,
        (a.streams as f64 * a.seconds as f64 * a.fps).round()
    );
    println!(
        "{:<28} {:>10} {:>14} {:>12} {:>16}",
        "variant", "wall s", "decode fps", "CPU s", "CPU s / stream"
    );
    println!(
        "{:<28} {:>10.2} {:>14.0} {:>12.2} {:>16.2}",
        "gst-launch-1.0 (baseline)",
        bw,
        frames_total as f64 / bw,
        bc,
        bc / n
    );
    println!(
        "{:<28} {:>10.2} {:>14.0} {:>12.2} {:>16.2}",
        "dfwatch ingest",
        dw,
        frames_total as f64 / dw,
        dc,
        dc / n
    );
    let ratio = dc / bc;
    println!(
        "CPU ratio dfwatch / baseline: {ratio:.3} (target <= 1.10: {})",
        if ratio <= 1.10 { "met" } else { "NOT met" }
    );
    Ok(())
}
