//! The `dfwatch` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use dfwatch::config::Config;

mod bench;

/// Exit statuses, also in the man page.
const EXIT_STATUS: &str = "\
Exit status:
  0   success
  1   runtime failure (the daemon stopped on an error; a command failed)
  2   invalid config (validate, run: every problem is printed with its path)
  64  usage error (unknown command or option, missing argument)

Config file when --config is not given: $DFWATCH_CONFIG, else /etc/dfwatch/dfwatch.toml.
Environment: DFWATCH_LOG (log filter, e.g. info,dfwatch=debug), DFWATCH_LOG_FORMAT (text or
json), STATE_DIRECTORY (spool, API token, TensorRT engines; default var/state).";

/// Watches live video for DeepFake faces and raises explained alerts over MQTT.
#[derive(Parser)]
#[command(
    name = "dfwatch",
    version,
    about,
    propagate_version = true,
    after_long_help = EXIT_STATUS
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon on a config file (stops cleanly on SIGINT or SIGTERM).
    Run {
        /// The TOML config, e.g. configs/default.toml. Default: $DFWATCH_CONFIG, else
        /// /etc/dfwatch/dfwatch.toml.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check config files; print every problem with its path. Exits 2 if any file is invalid.
    Validate {
        /// Config files. Default: $DFWATCH_CONFIG, else /etc/dfwatch/dfwatch.toml.
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
        /// One JSON object per file on standard output (file, ok, errors with path and
        /// message, the worst-case alert delay, the ONNX Runtime providers).
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to standard output.
    Completions { shell: clap_complete::Shell },
    /// Print the man page, dfwatch(1), as roff to standard output; with --dir, write it and a
    /// page per subcommand (dfwatch-run(1), ...) into DIR.
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Score aligned face crops (PNG/JPEG, square, at least the model's input size) and print
    /// JSON: q0, its logit, log Z, every label's logit and marginal, and an explanation.
    Score {
        /// Model bundle directory (see engines/SCHEMA.md; make one with tools/model.py).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Path of libonnxruntime.so (default: see [onnx] in configs/example.toml).
        #[arg(long, value_name = "FILE")]
        onnx_library: Option<PathBuf>,
        /// Intra-op threads for ONNX Runtime (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Include each image's raw embedding.
        #[arg(long)]
        embeddings: bool,
        #[arg(required = true, value_name = "IMAGE")]
        images: Vec<PathBuf>,
    },
    /// An offline verdict for one video (file or seekable URL), as JSON: the paper's protocol
    /// (evenly spaced frames, mean q0 of the largest face) with per-frame scores and the
    /// explanation, plus the daemon's own per-track verdicts.
    Analyze {
        /// Video file or URL.
        #[arg(value_name = "FILE|URL")]
        input: String,
        /// Model bundle directory.
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Frames to sample, evenly spaced.
        #[arg(long, default_value_t = 64)]
        frames: usize,
        /// Take [detect], [track], [evidence], [onnx] and ingest.analysis_fps from this config.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Write the JSON here instead of standard output.
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// The paper's protocol over a labelled LIST (CSV: path,label[,method][,video_id]; videos
    /// or aligned face crops, paths relative to the LIST): video- and frame-level AUC, AP,
    /// EER and accuracy with bootstrap intervals, per-method AUC, the explanations against
    /// what each FF++ method alters. Writes JSON (-o) and an HTML page beside it; resumable.
    Eval {
        #[arg(value_name = "LIST")]
        list: PathBuf,
        /// Model bundle directory.
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Frames per video, evenly spaced (the paper: 64 for the FF++ model, 32 for FFSC).
        #[arg(long, default_value_t = 64)]
        frames: usize,
        /// Take [detect], [track], [onnx] from this config.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The JSON report (default: standard output); the page goes to the same path with
        /// .html and the cache to .cache unless --html or --cache say otherwise.
        #[arg(long, short, value_name = "REPORT")]
        out: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        /// Per-file results, by file hash and model SHA-256 (a rerun resumes from it).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        #[arg(long)]
        no_cache: bool,
        /// Bootstrap resamples for the 95% intervals.
        #[arg(long, default_value_t = 1000)]
        bootstrap: usize,
        /// Seed of the bootstrap (stated in the report).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The [evidence] thresholds for a false-alarm budget: replays the LIST's videos through
    /// the daemon's own face stage, tracker and decision stage over a grid of enter_fake,
    /// exit_fake and window, counts false alarms per hour on the real videos and the delay
    /// to an alert on the fake ones, and writes the section that meets the budget with the
    /// shortest delay (and the curve it chose from).
    Calibrate {
        #[arg(value_name = "LIST")]
        list: PathBuf,
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// False alarms per stream-hour allowed on the real videos.
        #[arg(long, value_name = "X")]
        false_alarms_per_hour: f64,
        /// The daemon's config (its [ingest] analysis_fps, [detect], [track], [evidence]).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Where the [evidence] section goes (default: standard output).
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The curve as JSON (default: beside --out, .curve.json).
        #[arg(long, value_name = "FILE")]
        curve: Option<PathBuf>,
    },
    /// Export the events an operator marked as false alarms in an event store as a LIST
    /// (their stored face crops, labelled real) for `eval`.
    ExportFalseAlarms {
        /// The event store ([events] path), opened read-only.
        #[arg(long, value_name = "FILE")]
        events: PathBuf,
        /// Directory for list.csv and the crops.
        #[arg(long, short, value_name = "DIR")]
        out: PathBuf,
    },
    /// Print version, GStreamer version, cargo features and the video decoders available.
    Version {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// What the GPU path finds on this machine: the `cuda` feature, each CUDA library, the
    /// devices, the CUDA headers; `--compile` also compiles every kernel with NVRTC.
    GpuInfo {
        #[arg(long)]
        json: bool,
        /// Compile kernels/*.cu with NVRTC for the first device's architecture (compute_90
        /// without a device).
        #[arg(long)]
        compile: bool,
        /// Crop this image on the GPU under 16 similarity maps and compare with the CPU fused
        /// crop (target: >= 99.9% of values within 1/255).
        #[arg(long, value_name = "IMAGE")]
        check_crop: Option<PathBuf>,
    },
    /// Check the native GPU engine on this machine's GPU: every kernel against its CPU twin,
    /// the engine against its fp16 CPU emulation, and its speed per batch bucket; writes
    /// DIR/report.json (tools/gpu-check.sh runs it beside the PyTorch baselines).
    GpuCheck {
        /// Model bundle (with image_encoder.safetensors).
        #[arg(long, value_name = "DIR")]
        model: PathBuf,
        /// Directory for report.json and the raw embeddings.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Crops compared end to end.
        #[arg(long, default_value_t = 8)]
        crops: usize,
        /// Timed forwards per bucket and mode.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Run a benchmark that prints its baseline measured in the same run.
    Bench {
        /// Benchmark name; leave out to list them.
        name: Option<String>,
        /// Arguments for the benchmark (see `dfwatch bench NAME --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                // 2 means an invalid config; usage errors get EX_USAGE.
                _ => ExitCode::from(64),
            };
        }
    };
    // Benchmarks print tables, and the offline commands a report and a progress bar; their
    // stages' (and ONNX Runtime's) info lines would only interleave with them.
    // The embedded broker (rumqttd) logs every client connect and disconnect, and errors for
    // clients that only probe its port; our own connection problems are reported by the
    // publisher. DFWATCH_LOG=info,rumqttd=info brings them back.
    let default_level = if matches!(
        cli.command,
        Cmd::Bench { .. }
            | Cmd::Analyze { .. }
            | Cmd::Eval { .. }
            | Cmd::Calibrate { .. }
            | Cmd::ExportFalseAlarms { .. }
    ) {
        "warn,rumqttd=off"
    } else {
        "info,rumqttd=off"
    };
    dfwatch::telemetry::init(default_level);
    match cli.command {
        Cmd::Run { config } => match config_path(config) {
            Ok(path) => run(path),
            Err(code) => code,
        },
        Cmd::Validate { files, json } => {
            if files.is_empty() {
                match config_path(None) {
                    Ok(path) => validate(&[path], json),
                    Err(code) => {
                        if json {
                            println!(
                                "{}",
                                serde_json::json!({"file": null, "ok": false, "errors": [{
                                    "path": "", "message": "no config file (see --help)"}]})
                            );
                        }
                        code
                    }
                }
            } else {
                validate(&files, json)
            }
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "dfwatch", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Cmd::Man { dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let r = match dir {
                // dfwatch.1 and one page per subcommand (dfwatch-run.1, ...), as the main
                // page's SUBCOMMANDS section refers to them.
                Some(d) => {
                    std::fs::create_dir_all(&d).and_then(|_| clap_mangen::generate_to(cmd, &d))
                }
                None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
            };
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Version { json } => version(json),
        Cmd::Score {
            model,
            onnx_library,
            threads,
            embeddings,
            images,
        } => score(&model, onnx_library, threads, embeddings, &images),
        Cmd::Bench { name, args } => bench(name, &args),
        Cmd::GpuInfo {
            json,
            compile,
            check_crop,
        } => gpu_info(json, compile, check_crop),
        Cmd::GpuCheck {
            model,
            out,
            crops,
            iters,
            seed,
        } => gpu_check(&model, &out, crops, iters, seed),
        Cmd::Analyze {
            input,
            model,
            frames,
            config,
            out,
        } => analyze(&input, &model, frames, config, out),
        #[cfg(feature = "gstreamer")]
        Cmd::Eval {
            list,
            model,
            frames,
            config,
            out,
            html,
            cache,
            no_cache,
            bootstrap,
            seed,
        } => offline_config(config).map_or_else(
            |code| code,
            |config| {
                report_result(dfwatch::offline::eval::run(
                    dfwatch::offline::eval::EvalArgs {
                        list,
                        model,
                        frames,
                        config,
                        out,
                        html,
                        cache,
                        no_cache,
                        bootstrap: dfwatch::offline::metrics::Bootstrap {
                            resamples: bootstrap,
                            seed,
                        },
                    },
                ))
            },
        ),
        #[cfg(feature = "gstreamer")]
        Cmd::Calibrate {
            list,
            model,
            false_alarms_per_hour,
            config,
            out,
            curve,
        } => offline_config(config).map_or_else(
            |code| code,
            |config| {
                use dfwatch::offline::calibrate::{CalibrateArgs, run};
                report_result(run(CalibrateArgs {
                    list,
                    model,
                    config,
                    budget: false_alarms_per_hour,
                    out,
                    curve,
                }))
            },
        ),
        #[cfg(not(feature = "gstreamer"))]
        cmd @ (Cmd::Eval { .. } | Cmd::Calibrate { .. }) => {
            let what = if matches!(cmd, Cmd::Eval { .. }) {
                "eval"
            } else {
                "calibrate"
            };
            report_result(Err(anyhow::anyhow!(
                "{what} reads video through GStreamer; this build has no `gstreamer` feature"
            )))
        }
        Cmd::ExportFalseAlarms { events, out } => report_result(
            dfwatch::offline::false_alarms::export(&events, &out).map(|done| {
                eprintln!(
                    "{} false alarms with a face crop -> {}{}{}",
                    done.crops,
                    out.join("list.csv").display(),
                    if done.without_crop > 0 {
                        format!(
                            " ({} without a stored crop, named in comments)",
                            done.without_crop
                        )
                    } else {
                        String::new()
                    },
                    if done.bad_ids > 0 {
                        format!(
                            "; {} with an id that is not an alert id, skipped",
                            done.bad_ids
                        )
                    } else {
                        String::new()
                    }
                );
            }),
        ),
    }
}

/// The config of an offline command: the file given, else the defaults (paths relative to
/// the working directory).
#[cfg(feature = "gstreamer")]
fn offline_config(config: Option<PathBuf>) -> Result<Config, ExitCode> {
    match config {
        Some(p) => load_config(&p),
        None => Ok(Config {
            base_dir: PathBuf::from("."),
            ..Config::default()
        }),
    }
}

fn report_result(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn gpu_info(json: bool, compile: bool, check_crop: Option<PathBuf>) -> ExitCode {
    if let Some(image) = check_crop {
        return gpu_check_crop(&image);
    }
    let info = dfwatch::gpu::probe();
    let ort = onnxruntime_json();
    let compiled = compile.then(|| {
        let arch = dfwatch::gpu::arch_for(info.devices.first().map(|d| d.compute_capability));
        (arch, dfwatch::gpu::compile_kernels(arch))
    });
    if json {
        let mut v = serde_json::to_value(&info).expect("serialisable");
        v["onnxruntime"] = ort;
        if let Some((arch, r)) = &compiled {
            v["kernels"] = match r {
                Ok(k) => {
                    serde_json::json!({"arch": arch, "compiled": k.iter().map(|(n, p)| serde_json::json!({"kernel": n, "ptx_bytes": p.len()})).collect::<Vec<_>>()})
                }
                Err(e) => serde_json::json!({"arch": arch, "error": e.to_string()}),
            };
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serialisable")
        );
    } else {
        println!(
            "cuda feature: {}",
            if info.feature_cuda {
                "on"
            } else {
                "off (build with --features cuda)"
            }
        );
        for (lib, ok) in &info.libraries {
            println!("  {lib:<18} {}", if *ok { "found" } else { "MISSING" });
        }
        for d in &info.devices {
            println!(
                "  device {}: {} (compute capability {}.{})",
                d.ordinal, d.name, d.compute_capability.0, d.compute_capability.1
            );
        }
        if let Some(e) = &info.device_error {
            println!("  devices: none ({e})");
        }
        match &info.include_dir {
            Some(p) => println!("  CUDA headers: {}", p.display()),
            None => println!("  CUDA headers: not found (DFWATCH_CUDA_INCLUDE, CUDA_PATH)"),
        }
        match (
            ort["version"].as_str(),
            ort["available_providers"].as_array(),
        ) {
            (Some(v), Some(p)) => println!(
                "ONNX Runtime {v} ({}): providers {}",
                ort["library"].as_str().unwrap_or(""),
                p.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => println!(
                "ONNX Runtime: {}",
                ort["error"].as_str().unwrap_or("unknown")
            ),
        }
        if let Some((arch, r)) = &compiled {
            match r {
                Ok(k) => {
                    for (n, p) in k {
                        println!(
                            "  kernel {n}: compiled for {arch} ({} bytes of PTX)",
                            p.len()
                        );
                    }
                }
                Err(e) => println!("  kernels: {e}"),
            }
        }
        println!("engine: {}", info.engine);
    }
    match compiled {
        Some((_, Err(_))) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

#[cfg(feature = "cuda")]
fn gpu_check_crop(image: &std::path::Path) -> ExitCode {
    match dfwatch::gpu::crop::check_crop(image) {
        Ok((n, within, worst)) => {
            let pass = within >= 0.999;
            println!(
                "crop kernel vs CPU fused crop: {n} values, {:.4}% within 1/255, largest \
                 difference {worst:.2}/255: {}",
                within * 100.0,
                if pass { "PASS" } else { "FAIL" }
            );
            if pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_check(
    model: &std::path::Path,
    out: &std::path::Path,
    crops: usize,
    iters: usize,
    seed: u64,
) -> ExitCode {
    let args = dfwatch::gpu::vit::check::CheckArgs {
        model,
        out,
        crops,
        seed,
        iters,
    };
    match dfwatch::gpu::vit::check::run(&args) {
        Ok(report) => {
            let pass = report["pass"] == serde_json::json!(true);
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            println!(
                "gpu-check: {} (report: {})",
                if pass { "PASS" } else { "FAIL" },
                out.join("report.json").display()
            );
            if pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: gpu-check: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(
    _model: &std::path::Path,
    _out: &std::path::Path,
    _crops: usize,
    _iters: usize,
    _seed: u64,
) -> ExitCode {
    eprintln!("error: {}", dfwatch::gpu::GpuError::FeatureDisabled);
    ExitCode::FAILURE
}

#[cfg(not(feature = "cuda"))]
fn gpu_check_crop(_image: &std::path::Path) -> ExitCode {
    eprintln!("error: {}", dfwatch::gpu::GpuError::FeatureDisabled);
    ExitCode::FAILURE
}

/// Loads a config, printing every problem (exit code 2) when it is invalid.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path)
        .and_then(|c| dfwatch::preflight::check(&c).map(|_| c))
        .map_err(|errors| {
            eprintln!("{}: invalid config:", path.display());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            ExitCode::from(2)
        })
}

fn run(path: PathBuf) -> ExitCode {
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dfwatch-rt")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dfwatch::app::run(config, path)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "gstreamer")]
fn analyze(
    input: &str,
    model: &std::path::Path,
    frames: usize,
    config: Option<PathBuf>,
    out: Option<PathBuf>,
) -> ExitCode {
    let config = match offline_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let bar = dfwatch::progress::bar(frames as u64, "analyze");
    let result =
        dfwatch::offline::analyze::analyze(input, model, frames, &config, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        });
    bar.finish_and_clear();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let json = serde_json::to_string_pretty(&report).expect("report serialises");
    match out {
        Some(p) => {
            if let Err(e) = std::fs::write(&p, json + "\n") {
                eprintln!("error: writing {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
            eprintln!(
                "{}: {} (score {}, {} of {} frames with a face) -> {}",
                report.input,
                report.verdict,
                report
                    .score
                    .map(|s| format!("{s:.3}"))
                    .unwrap_or("-".into()),
                report.frames_with_face,
                report.frames_decoded,
                p.display()
            );
        }
        None => println!("{json}"),
    }
    ExitCode::SUCCESS
}

#[cfg(not(feature = "gstreamer"))]
fn analyze(
    _input: &str,
    _model: &std::path::Path,
    _frames: usize,
    _config: Option<PathBuf>,
    _out: Option<PathBuf>,
) -> ExitCode {
    eprintln!(
        "error: analyze reads video through GStreamer; this build has no `gstreamer` feature"
    );
    ExitCode::FAILURE
}

/// The config file when the command line names none: `$DFWATCH_CONFIG`, else
/// `/etc/dfwatch/dfwatch.toml` (the package's). Says which it took; exit 2 when neither is
/// there.
fn config_path(given: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    let (path, why) = match (given, std::env::var_os("DFWATCH_CONFIG")) {
        (Some(p), _) => (p, "--config"),
        (None, Some(p)) if !p.is_empty() => (PathBuf::from(p), "$DFWATCH_CONFIG"),
        _ => (PathBuf::from(DEFAULT_CONFIG), "the default location"),
    };
    if why != "--config" && !path.exists() {
        eprintln!(
            "error: no config file: {} ({why}) does not exist; pass --config FILE, set \
             DFWATCH_CONFIG, or install one at {DEFAULT_CONFIG}",
            path.display()
        );
        return Err(ExitCode::from(2));
    }
    tracing::info!(config = %path.display(), from = why, "config file");
    Ok(path)
}

/// Where the Debian package installs the config.
const DEFAULT_CONFIG: &str = "/etc/dfwatch/dfwatch.toml";

fn validate(files: &[PathBuf], json: bool) -> ExitCode {
    let mut bad = false;
    for f in files {
        let checked = Config::load(f).and_then(|c| {
            let found = dfwatch::preflight::check(&c)?;
            Ok((c, found.providers, found.gpu))
        });
        if json {
            let v = match &checked {
                Ok((c, providers, gpu)) => {
                    let fps = c.ingest.analysis_fps;
                    serde_json::json!({
                        "gpu": gpu,
                        "file": f.display().to_string(),
                        "ok": true,
                        "errors": [],
                        "warnings": c.warnings().iter().map(|e| serde_json::json!({
                            "path": e.path, "message": e.message,
                        })).collect::<Vec<_>>(),
                        "streams": c.streams.len(),
                        "alert_delay_s": c.cadence(fps).alert_delay(&c.track).as_secs_f64(),
                        "onnx_providers": providers,
                    })
                }
                Err(errors) => serde_json::json!({
                    "file": f.display().to_string(),
                    "ok": false,
                    "errors": errors.0.iter().map(|e| serde_json::json!({
                        "path": e.path, "message": e.message,
                    })).collect::<Vec<_>>(),
                }),
            };
            bad |= checked.is_err();
            println!("{v}");
            continue;
        }
        match checked {
            Ok((c, providers, gpu)) => {
                let fps = c.ingest.analysis_fps;
                println!(
                    "{}: ok ({} streams); a steady fake face at {fps} fps alerts within {} plus \
                     the pipeline's latency",
                    f.display(),
                    c.streams.len(),
                    dfwatch::validation::human(c.cadence(fps).alert_delay(&c.track))
                );
                for w in c.warnings() {
                    println!("{}: warning: {w}", f.display());
                }
                if let Some(line) = gpu {
                    println!("{}: model.backend = \"cuda\": {line}", f.display());
                }
                if let Some(line) = providers {
                    println!("{}: onnx.providers: {line}", f.display());
                }
            }
            Err(errors) => {
                bad = true;
                println!("{}: {} problem(s)", f.display(), errors.0.len());
                for e in &errors.0 {
                    println!("  {e}");
                }
            }
        }
    }
    if bad {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn score(
    model: &std::path::Path,
    library: Option<PathBuf>,
    threads: Option<usize>,
    embeddings: bool,
    images: &[PathBuf],
) -> ExitCode {
    let onnx = dfwatch::onnx::OnnxConfig {
        library,
        threads,
        ..Default::default()
    };
    match dfwatch::offline::score_images::score_images(model, images, &onnx, embeddings) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            let failed = report.results.iter().any(|r| {
                matches!(
                    r,
                    dfwatch::offline::score_images::ImageResult::Failed { .. }
                )
            });
            if failed {
                eprintln!("error: some images could not be scored (see their \"error\")");
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "gstreamer") {
        f.push("gstreamer");
    }
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    f
}

/// The ONNX Runtime library found by default (`$ORT_DYLIB_PATH`, `var/lib`): its path,
/// version and the execution providers it was built with, or why it could not be loaded.
fn onnxruntime_json() -> serde_json::Value {
    match dfwatch::onnx::init(&dfwatch::onnx::OnnxConfig::default()) {
        Ok(i) => serde_json::json!({
            "library": i.library,
            "version": i.version,
            "available_providers": i.available_providers,
        }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

fn version(json: bool) -> ExitCode {
    #[cfg(feature = "gstreamer")]
    let gst = dfwatch::ingest::info();
    #[cfg(not(feature = "gstreamer"))]
    let gst: Result<(), String> =
        Err("not built in (cargo feature `gstreamer` is off): ingest is unavailable".into());
    let gpu = dfwatch::gpu::availability().err().map(|e| e.to_string());
    if json {
        let v = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "features": features(),
            "gstreamer": match &gst {
                Ok(g) => serde_json::to_value(g).unwrap_or_default(),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            },
            "gpu": gpu,
            "onnxruntime": onnxruntime_json(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    println!("dfwatch {}", env!("CARGO_PKG_VERSION"));
    println!("features: {}", features().join(", "));
    #[cfg(feature = "gstreamer")]
    match &gst {
        Ok(g) => {
            println!("gstreamer: {}", g.version);
            println!(
                "nvcodec (NVIDIA) decoders: {}",
                if g.nvcodec {
                    "registered, preferred"
                } else {
                    "not registered; software decoding"
                }
            );
            println!(
                "video decoders for streaming codecs (in the order GStreamer tries them; \
                 --json lists all):"
            );
            const STREAMING: &[&str] = &[
                "video/x-h264",
                "video/x-h265",
                "video/x-vp8",
                "video/x-vp9",
                "video/x-av1",
                "image/jpeg",
                "video/mpeg",
            ];
            for d in g
                .decoders
                .iter()
                .filter(|d| d.codecs.iter().any(|c| STREAMING.contains(&c.as_str())))
            {
                println!(
                    "  {:<22} rank {:>3}{}  {}",
                    d.name,
                    d.rank,
                    if d.hardware { " hw" } else { "   " },
                    d.codecs.join(", ")
                );
            }
        }
        Err(e) => println!("gstreamer: unavailable: {e}"),
    }
    #[cfg(not(feature = "gstreamer"))]
    if let Err(e) = &gst {
        println!("gstreamer: {e}");
    }
    if let Some(g) = gpu {
        println!("gpu: {g}");
    }
    ExitCode::SUCCESS
}

fn bench(name: Option<String>, args: &[String]) -> ExitCode {
    let Some(name) = name else {
        println!("benchmarks:");
        for b in bench::BENCHES {
            println!("  {:<10} {}", b.name, b.about);
        }
        return ExitCode::SUCCESS;
    };
    let Some(b) = bench::find(&name) else {
        let names: Vec<_> = bench::BENCHES.iter().map(|b| b.name).collect();
        eprintln!(
            "error: no benchmark {name:?}; available: {}",
            names.join(", ")
        );
        // A usage error (2 means an invalid config).
        return ExitCode::from(64);
    };
    match (b.run)(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: bench {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
