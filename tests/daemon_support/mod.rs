//! The `dfwatch` binary as a child process and the ways tests look at it (HTTP, metrics,
//! MQTT messages), shared by the daemon and hostile-input tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const SECS: fn(u64) -> Duration = Duration::from_secs;
/// The API token the generated configs name (through `http.token_file`).
pub const TOKEN: &str = "e2e-test-token-0123456789";

/// A tiny synthetic bundle whose median logit(q0) is `shift`.
pub fn bundle(dir: &Path, shift: f64) -> PathBuf {
    let out = dir.join(format!("bundle{shift}"));
    let st = Command::new(".venv/bin/python")
        .args([
            "tools/model.py",
            "synth",
            "--arch",
            "tiny",
            "--labels",
            "ffpp",
        ])
        .args(["--seed", "3", "--shift", &shift.to_string(), "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("python (run ./tools/setup.sh)");
    assert!(st.success(), "tools/model.py synth failed");
    out
}

/// A clip of `seconds` with the astronaut's face panned and zoomed, H.264 in MP4.
pub fn face_clip(dir: &Path, seconds: u32) -> PathBuf {
    let out = dir.join("face.mp4");
    let cmd = format!(
        ".venv/bin/python tools/make_sample.py --width 480 --height 270 --frames {} | \
         gst-launch-1.0 -q fdsrc ! rawvideoparse format=rgb width=480 height=270 \
         framerate=30/1 ! videoconvert ! x264enc speed-preset=ultrafast key-int-max=30 ! \
         h264parse ! mp4mux ! filesink location={}",
        seconds * 30,
        out.display()
    );
    let st = Command::new("sh").arg("-c").arg(&cmd).status().expect("sh");
    assert!(st.success(), "making the face clip failed: {cmd}");
    out
}

/// The daemon as a child process; killed if the test ends early.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, dir: &Path, env: &[(&str, String)]) -> Daemon {
        Self::start_with_nofile(config, dir, env, None)
    }

    /// Like [`Daemon::start`], with the open-file limit (`RLIMIT_NOFILE`) set to `nofile` as
    /// a service manager would (systemd's soft default is 1024).
    pub fn start_with_nofile(
        config: &Path,
        dir: &Path,
        env: &[(&str, String)],
        nofile: Option<u64>,
    ) -> Daemon {
        Self::spawn(config, dir, env, nofile, None)
    }

    /// Like [`Daemon::start`], in the working directory `cwd` (the checkout's root for the
    /// README's command, the state directory as systemd starts it), `config` named exactly
    /// as given.
    pub fn start_in(config: &Path, dir: &Path, cwd: &Path) -> Daemon {
        Self::spawn(config, dir, &[], None, Some(cwd))
    }

    fn spawn(
        config: &Path,
        dir: &Path,
        env: &[(&str, String)],
        nofile: Option<u64>,
        cwd: Option<&Path>,
    ) -> Daemon {
        let log = dir.join("daemon.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dfwatch"));
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        cmd.args(["run", "--config"])
            .arg(config)
            .env("STATE_DIRECTORY", dir.join("state"))
            .env("DFWATCH_LOG", "info,dfwatch=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit, async-signal-safe, runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
        Daemon {
            child: Some(cmd.spawn().expect("dfwatch binary")),
            log,
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        assert!(
            Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for the exit; returns its code and how long it took.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, Duration) {
        let t0 = Instant::now();
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return (st.code(), t0.elapsed());
            }
            assert!(
                t0.elapsed() < timeout,
                "dfwatch did not exit within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            eprintln!("--- dfwatch log ---\n{}", self.log());
        }
    }
}

/// A minimal HTTP/1.1 request: returns status and body.
pub fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = match std::net::TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(_) => return (0, String::new()),
    };
    s.set_read_timeout(Some(SECS(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// The value of one sample in a Prometheus text body (`name{labels}` exactly as written).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// One stream's entry in GET /api/streams.
pub fn stream_report(port: u16, token: &str, id: &str) -> Option<serde_json::Value> {
    let (_, body) = http(port, "GET", "/api/streams", Some(token), "");
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v.as_array()?.iter().find(|s| s["id"] == id).cloned()
}

/// The `last_error.kind` of one stream, if it has one.
pub fn last_error_kind(port: u16, token: &str, id: &str) -> Option<String> {
    stream_report(port, token, id)?["status"]["last_error"]["kind"]
        .as_str()
        .map(str::to_string)
}

pub fn metrics(port: u16) -> String {
    http(port, "GET", "/metrics", None, "").1
}

pub type Got = Arc<Mutex<Vec<(String, String)>>>;

pub fn on_topic(got: &Got, suffix: &str) -> Vec<serde_json::Value> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t.ends_with(suffix))
        .filter_map(|(_, p)| serde_json::from_str(p).ok())
        .collect()
}

/// Faster cadence and thresholds than the shipped defaults, so tests of other behaviour see
/// alerts sooner. The tests of the defaults' own promise leave these sections out.
pub const TUNED_CADENCE: &str = r#"
[track]
score_every = "300ms"

[evidence]
window = "3s"
min_frames = 3
min_duration = "600ms"
update_every = "1s"
"#;

/// One stream `cam` looping `clip` with `store_media = true`, the tuned cadence, and reads
/// behind the token (`read_auth = "token"`, as on a non-loopback listener).
pub fn media_stream_config(
    dir: &Path,
    http_port: u16,
    mqtt_url: &str,
    model: &Path,
    clip: &Path,
) -> PathBuf {
    let stream = format!(
        "[[streams]]\nid = \"cam\"\nuri = \"{}\"\non_eos = \"loop\"\nstore_media = true\n",
        clip.display()
    );
    let config = write_config_with(dir, http_port, mqtt_url, model, &stream, TUNED_CADENCE);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "token_file = \"token\"\n",
        "token_file = \"token\"\nread_auth = \"token\"\n",
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// A config whose `[track]` and `[evidence]` sections are `cadence` (empty: the defaults).
pub fn write_config_with(
    dir: &Path,
    http_port: u16,
    mqtt_url: &str,
    model: &Path,
    streams: &str,
    cadence: &str,
) -> PathBuf {
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let text = format!(
        r#"
[node]
id = "e2e"
shutdown_grace = "4s"

[ingest]
analysis_fps = 5.0

{streams}

[model]
bundle = "{model}"

[onnx]
threads = 1
{cadence}
[mqtt]
url = "{mqtt_url}"
spool_dir = "{spool}"
backoff = {{ base = "100ms", cap = "500ms", reset_after = "5s" }}

[http]
listen = "127.0.0.1:{http_port}"
token_file = "token"
api_schemes = ["rtsp", "file"]
"#,
        model = model.display(),
        spool = dir.join("spool").display(),
    );
    let path = dir.join("dfwatch.toml");
    std::fs::write(&path, text).unwrap();
    path
}
