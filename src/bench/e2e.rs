//! `dfwatch bench e2e`: how many 720p30 streams with one face each this machine analyses in
//! real time on the CPU path, through the whole daemon (ingest, detect, track, crop, encode,
//! score, evidence, publish to the embedded broker).
//!
//! For N = 1, 2, ... streams of the same looping clip (the astronaut panned and zoomed, made
//! once under var/bench/), the daemon runs in this process; after a warm-up, its own
//! `/metrics` are read at the start and end of the measured window. N is in real time when:
//! the decoders keep up (at least 95% of 30 fps x N decoded), no frame is dropped beyond the
//! configured sampling, coverage (faces scored / faces due) is at least 0.95 overall and for
//! every stream (none starves), and the p95 decode-to-publish latency is under 1 s. Every N up
//! to `--max-streams` is measured, past the first that fails. CPU per stage comes from the threads' own CPU time
//! (/proc/self/task), grouped by thread name.
//!
//! Baseline in the same run: the decode alone (`gst-launch-1.0` decoding the same clip to
//! RGB at 5 fps into fakesink, N at once) gives the CPU floor any analysis pays before it
//! looks at a pixel; the table shows what analysis adds on top of it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;

use super::{CpuOf, cpu_seconds};
use dfwatch::config::Config;

const W: u32 = 1280;
const H: u32 = 720;

fn clip() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from("var/bench/face720.mp4");
    if path.exists() {
        return Ok(std::fs::canonicalize(&path)?);
    }
    std::fs::create_dir_all("var/bench")?;
    eprintln!(
        "bench e2e: making {} (20 s of 1280x720 at 30 fps)",
        path.display()
    );
    let cmd = format!(
        ".venv/bin/python tools/make_sample.py --width {W} --height {H} --frames 600 | \
         gst-launch-1.0 -q fdsrc ! rawvideoparse format=rgb width={W} height={H} \
         framerate=30/1 ! videoconvert ! x264enc speed-preset=veryfast key-int-max=30 \
         bitrate=3000 ! h264parse ! mp4mux ! filesink location={}.part",
        path.display()
    );
    let st = Command::new("sh").arg("-c").arg(&cmd).status()?;
    if !st.success() {
        bail!("making the clip failed (run ./tools/setup.sh first): {cmd}");
    }
    std::fs::rename(format!("{}.part", path.display()), &path)?;
    Ok(std::fs::canonicalize(&path)?)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out.split_once("\r\n\r\n")?.1.to_string()))
}

/// Samples of a Prometheus text body: `name{labels}` -> value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn sum_prefix(m: &BTreeMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

/// CPU seconds of each live thread (by thread id) with its group, from
/// /proc/self/task/*/stat (USER_HZ = 100 on Linux).
fn thread_cpu() -> BTreeMap<u64, (&'static str, f64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3; utime 14, stime 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f.get(11).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let comm = comm.trim();
        let group = if comm.starts_with("faces-") {
            "detect+track+crop"
        } else if comm == "encoder" {
            "encode (its own thread)"
        } else if comm == "onnx-pool" {
            // The shared intra-op pool's workers run both models' operators.
            "ONNX pool workers (detect and encode)"
        } else if comm.starts_with("dfwatch-rt") || comm.starts_with("tokio") {
            "score+evidence+http"
        } else if comm == "dfwatch" {
            "main (bench driver)"
        } else if comm.starts_with("dfwatch-spool")
            || comm.starts_with("mqtt")
            || comm.starts_with("router")
            || comm.starts_with("dfwatch-embedde")
        {
            "publish+broker"
        } else {
            "decode (GStreamer)"
        };
        out.insert(tid, (group, ticks / 100.0));
    }
    out
}

/// CPU per group over a window: each thread's growth between the two samples (a thread born
/// in the window counts from zero). Threads that ended within the window took their time
/// with them: what the process spent beyond the groups is shown as its own line, so no
/// group can come out negative.
fn group_cpu(
    t0: &BTreeMap<u64, (&'static str, f64)>,
    t1: &BTreeMap<u64, (&'static str, f64)>,
    process: f64,
) -> BTreeMap<&'static str, f64> {
    let mut out: BTreeMap<&'static str, f64> = BTreeMap::new();
    for (tid, (group, cpu)) in t1 {
        let before = t0.get(tid).map(|(_, c)| *c).unwrap_or(0.0);
        *out.entry(group).or_default() += (cpu - before).max(0.0);
    }
    let seen: f64 = out.values().sum();
    out.insert("threads that ended", (process - seen).max(0.0));
    out
}

/// The CPU's model name and the cores this process may use.
fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{model}, {cores} cores")
}

/// The smallest histogram bound under which a fraction `q` of the window's observations fall.
fn quantile(m0: &BTreeMap<String, f64>, m1: &BTreeMap<String, f64>, name: &str, q: f64) -> f64 {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = m1
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v - m0.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total <= 0.0 {
        return f64::NAN;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|b| b.0)
        .unwrap_or(f64::INFINITY)
}

struct Row {
    n: usize,
    decoded_fps: f64,
    dropped: f64,
    due: f64,
    scored: f64,
    coverage: f64,
    p50: f64,
    p95: f64,
    cpu: f64,
    groups: BTreeMap<&'static str, f64>,
    /// Each stream's coverage (faces scored / faces due over the window; above 1 when a
    /// backlog from before the window drained), lowest first.
    per_stream: Vec<(String, f64)>,
    realtime: bool,
}

async fn measure(
    n: usize,
    clip: &Path,
    model: &Path,
    fps: f64,
    sections: &str,
    (warmup, seconds): (Duration, Duration),
) -> anyhow::Result<Row> {
    let dir = std::env::temp_dir().join(format!("dfwatch-bench-e2e-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let http = free_port()?;
    let broker = free_port()?;
    let mut streams = String::new();
    for i in 0..n {
        streams.push_str(&format!(
            "[[streams]]\nid = \"s{i}\"\nuri = \"{}\"\non_eos = \"loop\"\n\n",
            clip.display()
        ));
    }
    std::fs::write(dir.join("token"), "bench-token-0123456789abcdef")?;
    let text = format!(
        "[node]\nid = \"bench\"\nshutdown_grace = \"4s\"\n\n[ingest]\nanalysis_fps = {fps}\n\n\
         {streams}{sections}[model]\nbundle = \"{}\"\n\n[mqtt]\nembedded = true\n\
         embedded_listen = \"127.0.0.1:{broker}\"\nspool_dir = \"{}\"\n\n[http]\n\
         listen = \"127.0.0.1:{http}\"\ntoken_file = \"token\"\n",
        model.display(),
        dir.join("spool").display()
    );
    let path = dir.join("bench.toml");
    std::fs::write(&path, &text)?;
    let config = Config::parse(&text, &dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(dfwatch::app::run_until(config, path, stop.clone()));
    let t0 = Instant::now();
    while http_get(http, "/readyz").map(|r| r.0) != Some(200) {
        if t0.elapsed() > Duration::from_secs(60) || task.is_finished() {
            stop.cancel();
            task.await??;
            bail!("the daemon did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(warmup).await;
    let m0 = parse_metrics(&http_get(http, "/metrics").context("metrics")?.1);
    let (cpu0, g0, w0) = (cpu_seconds(CpuOf::Process), thread_cpu(), Instant::now());
    tokio::time::sleep(seconds).await;
    let m1 = parse_metrics(&http_get(http, "/metrics").context("metrics")?.1);
    let (cpu1, g1, wall) = (cpu_seconds(CpuOf::Process), thread_cpu(), w0.elapsed());
    stop.cancel();
    task.await??;
    let _ = std::fs::remove_dir_all(&dir);
    let d = |prefix: &str| sum_prefix(&m1, prefix) - sum_prefix(&m0, prefix);
    let secs = wall.as_secs_f64();
    let decoded = d("dfwatch_frames_decoded_total{");
    let dropped = d("dfwatch_frames_dropped_total{");
    let due = d("dfwatch_faces_due_total{");
    let scored = d("dfwatch_faces_scored_total{");
    let coverage = if due > 0.0 { scored / due } else { f64::NAN };
    let p50 = quantile(&m0, &m1, "dfwatch_decode_to_publish_seconds", 0.5);
    let p95 = quantile(&m0, &m1, "dfwatch_decode_to_publish_seconds", 0.95);
    let groups = group_cpu(&g0, &g1, cpu1 - cpu0)
        .into_iter()
        .map(|(k, v)| (k, v / secs))
        .collect();
    let mut per_stream: Vec<(String, f64)> = (0..n)
        .map(|i| {
            let due = d(&format!("dfwatch_faces_due_total{{stream=\"s{i}\"}}"));
            let scored = d(&format!("dfwatch_faces_scored_total{{stream=\"s{i}\"}}"));
            (
                format!("s{i}"),
                if due > 0.0 { scored / due } else { f64::NAN },
            )
        })
        .collect();
    per_stream.sort_by(|a, b| a.1.total_cmp(&b.1));
    let decoded_fps = decoded / secs;
    // A stream with no due face in the window counts as starved.
    let lowest = per_stream
        .iter()
        .map(|(_, c)| if c.is_nan() { 0.0 } else { *c })
        .fold(f64::INFINITY, f64::min);
    let realtime = decoded_fps >= 0.95 * 30.0 * n as f64
        && dropped == 0.0
        && coverage >= 0.95
        && lowest >= 0.95
        && p95 < 1.0;
    Ok(Row {
        n,
        decoded_fps,
        dropped,
        due,
        scored,
        coverage,
        p50,
        p95,
        cpu: (cpu1 - cpu0) / secs,
        groups,
        per_stream,
        realtime,
    })
}

/// The baseline: N decodes of the clip to RGB at the analysis rate, nothing else.
/// Returns CPU seconds per stream-second (the clip is 20 s, decoded as fast as possible).
fn decode_only(clip: &Path, n: usize, fps: f64) -> anyhow::Result<f64> {
    let mut branches = String::new();
    for _ in 0..n {
        branches.push_str(&format!(
            " filesrc location={} ! qtdemux ! h264parse ! avdec_h264 ! videorate drop-only=true \
             ! video/x-raw,framerate={}/1000 ! videoconvert ! video/x-raw,format=RGB ! fakesink \
             sync=false",
            clip.display(),
            (fps * 1000.0).round() as u64
        ));
    }
    let before = cpu_seconds(CpuOf::Children);
    let st = Command::new("gst-launch-1.0")
        .arg("-q")
        .args(branches.split_whitespace())
        .stdout(std::process::Stdio::null())
        .status()
        .context("gst-launch-1.0")?;
    if !st.success() {
        bail!("gst-launch-1.0 decode baseline failed");
    }
    let clip_seconds = 20.0;
    Ok((cpu_seconds(CpuOf::Children) - before) / (clip_seconds * n as f64))
}

/// `dfwatch bench e2e`: the largest number of 720p30 one-face streams analysed in real time.
#[derive(clap::Parser)]
struct Args {
    /// Go up to this many streams (past the first N that fails).
    #[arg(long, default_value_t = 6)]
    max_streams: usize,
    /// Seconds measured per N.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Seconds of warm-up per N before measuring.
    #[arg(long, default_value_t = 6.0)]
    warmup: f64,
    /// Analysis rate per stream.
    #[arg(long, default_value_t = 5.0)]
    fps: f64,
    /// Model bundle.
    #[arg(long, default_value = dfwatch::runtime::DEFAULT_SYNTH_BUNDLE)]
    model: PathBuf,
    /// `track.detect_every` (full searches of a frame every this many analysed frames);
    /// unset: the shipped default.
    #[arg(long)]
    detect_every: Option<u32>,
    /// `onnx.threads` (the intra-op pool the detector and the encoder share); unset: the
    /// shipped default (the cores).
    #[arg(long)]
    onnx_threads: Option<usize>,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let Args {
        max_streams: max,
        seconds,
        warmup,
        fps,
        model,
        detect_every,
        onnx_threads,
    } = super::parse_args("e2e", args);
    // Config sections the options set, written before [model].
    let mut sections = detect_every
        .map(|d| format!("[track]\ndetect_every = {d}\n\n"))
        .unwrap_or_default();
    if let Some(t) = onnx_threads {
        sections.push_str(&format!("[onnx]\nthreads = {t}\n\n"));
    }
    let clip = clip()?;
    let model = std::fs::canonicalize(&model)
        .with_context(|| format!("model bundle {} (run ./tools/setup.sh)", model.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dfwatch-rt")
        .enable_all()
        .build()?;
    println!(
        "bench e2e: 1280x720 30 fps H.264 streams with one moving face each, analysed at {fps} \
         fps, model {}, track.detect_every = {}, onnx.threads = {}; {warmup} s warm-up, \
         {seconds} s measured per N; on {}",
        model.display(),
        detect_every.unwrap_or(dfwatch::track::TrackConfig::default().detect_every),
        onnx_threads.map_or("the cores".to_string(), |t| t.to_string()),
        machine()
    );
    println!(
        "{:>3} {:>9} {:>8} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9} {:>5}",
        "N",
        "dec fps",
        "dropped",
        "due",
        "scored",
        "coverage",
        "lowest",
        "p50 ms",
        "p95 ms",
        "CPU/s",
        "decode-only",
        "analysis/",
        "real"
    );
    let mut best = 0;
    let mut rows = Vec::new();
    let bar = dfwatch::progress::bar(max as u64, "e2e");
    for n in 1..=max {
        let row = rt.block_on(measure(
            n,
            &clip,
            &model,
            fps,
            &sections,
            (
                Duration::from_secs_f64(warmup),
                Duration::from_secs_f64(seconds),
            ),
        ))?;
        let base = decode_only(&clip, n, fps)? * n as f64;
        // What the analysis adds on top of decoding, in units of the decode itself.
        let ratio = (row.cpu - base) / base;
        let lowest = row.per_stream.first().map(|s| s.1).unwrap_or(f64::NAN);
        bar.suspend(|| {
            println!(
                "{:>3} {:>9.1} {:>8.0} {:>7.0} {:>7.0} {:>8.3} {:>8.3} {:>8.0} {:>8.0} {:>8.2} {:>10.2} {:>8.2}x {:>5}",
                row.n,
                row.decoded_fps,
                row.dropped,
                row.due,
                row.scored,
                row.coverage,
                lowest,
                row.p50 * 1e3,
                row.p95 * 1e3,
                row.cpu,
                base,
                ratio,
                if row.realtime { "yes" } else { "no" }
            )
        });
        bar.inc(1);
        if row.realtime && best == n - 1 {
            best = n;
        }
        rows.push(row);
    }
    bar.finish_and_clear();
    for row in &rows {
        println!(
            "N={}: coverage per stream {}; CPU seconds per second by stage:",
            row.n,
            row.per_stream
                .iter()
                .map(|(s, c)| format!("{s} {c:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (k, v) in &row.groups {
            println!("  {k:<38} {v:>6.2}");
        }
    }
    println!(
        "largest N in real time, every N up to it included (decode >= 95% of 30 fps x N, no \
         drops, coverage >= 0.95 overall and for every stream, p95 decode-to-publish < 1 s): \
         {best}"
    );
    println!(
        "analysis/decode: the CPU the daemon spends beyond N decodes, over what the decodes \
         cost (the issue's target is 1.0x or less)"
    );
    println!(
        "decode-only: CPU seconds per second of N gst-launch-1.0 decodes of the same clip to RGB \
         at {fps} fps (the floor before any analysis); p50/p95 are histogram bucket bounds"
    );
    Ok(())
}
